"""Recipes, the trainable sets of stages, and the trainer's promises (on tiny models, CPU)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from mm_testing import colour_conversations, write_colour_folder

from mm import ModelConfig, MultimodalModel
from mm.model.components import COMPONENTS, component_of, set_trainable, trainable_components
from mm.training.metrics import read_metrics
from mm.training.recipe import RecipeError, load_recipe, parse_recipe, shipped_recipes
from mm.training.trainer import BackboneChanged, Trainer

ROOT = Path(__file__).resolve().parents[1]


def tiny_recipe(**stage_overrides):
    stage = {
        "name": "s1",
        "trainable": ["image_encoder", "image_adapter"],
        "data": {"shards": "in-memory"},
        "optimizer": {"lr": 3e-3, "weight_decay": 0.01},
        "schedule": {"warmup_steps": 2},
        "steps": 6,
        "batch_size": 4,
        "image": {"tile_size": 28, "max_tiles": 2},
        "log_every": 1,
    }
    stage.update(stage_overrides)
    return parse_recipe({"name": "t", "model": {"preset": "tiny", "tokenizer": "byte"}, "stages": [stage]})


# ---------------------------------------------------------------------- recipes
def test_every_shipped_recipe_loads_and_each_stage_trains_exactly_its_components():
    recipes = shipped_recipes()
    assert {"llama3-vision", "tiny-demo"} <= set(recipes)
    with torch.device("meta"):
        model = MultimodalModel(ModelConfig.preset("tiny"))
    for name in recipes:
        recipe = load_recipe(name)
        for stage in recipe.stages:
            names = set_trainable(model, stage.trainable)
            present = [c for c in COMPONENTS if c in stage.trainable and c in model.component_parameters()]
            assert trainable_components(model) == present, (name, stage.name)
            assert all(not p.requires_grad for p in model.backbone.parameters())
            # Calling it twice gives the same result.
            assert set_trainable(model, stage.trainable) == names


@pytest.mark.parametrize(
    "change,message",
    [
        ({"learning_rate": 1e-3}, "unknown keys"),
        ({"optimizer": {"lr": 1e-3, "momentum": 0.9}}, "unknown keys in .*optimizer"),
        ({"data": {"shards": "x", "weigth": 2}}, r"unknown keys in .*data\[0\]"),
        ({"trainable": ["backbone"]}, "never trained"),
        ({"trainable": ["vision"]}, "unknown trainable components"),
        ({"objective": "dpo-ish"}, "unknown objective"),
        ({"start": {"restore": "x"}}, "start must be"),
    ],
)
def test_recipe_errors_name_the_problem(change, message):
    with pytest.raises(RecipeError, match=message):
        tiny_recipe(**change)


def test_unknown_top_level_key_and_missing_recipe():
    with pytest.raises(RecipeError, match="unknown keys in recipe"):
        parse_recipe({"name": "x", "model": {"preset": "tiny"}, "stages": [], "epochs": 3})
    with pytest.raises(RecipeError, match="no recipe file"):
        load_recipe("no-such-recipe")


# ---------------------------------------------------------------------- the trainer
def test_loss_falls_and_frozen_parts_get_no_gradients_or_state(tmp_path):
    seen = {}

    def inspect(model, step, metrics):
        if step == 1:
            seen["backbone_grads"] = [p.grad for p in model.backbone.parameters()]
            seen["trainable"] = trainable_components(model)

    recipe = tiny_recipe(steps=40, batch_size=8, optimizer={"lr": 3e-3})
    trainer = Trainer(
        recipe,
        output_dir=tmp_path,
        data={"s1": colour_conversations(64)},
        progress=False,
        callbacks=[inspect],
    )
    (result,) = trainer.run()
    assert seen["trainable"] == ["image_encoder", "image_adapter"]
    assert all(g is None for g in seen["backbone_grads"])
    first, last = sum(result.losses[:5]) / 5, sum(result.losses[-5:]) / 5
    assert last < 0.65 * first, result.losses
    # The optimiser holds state for trainable parameters only.
    from safetensors import safe_open

    ckpt = tmp_path / "s1" / "checkpoints" / "step-00000040"
    with safe_open(ckpt / "optimizer.safetensors", "pt") as f:
        n_state = len({k.split(".")[0] for k in f.keys()})  # noqa: SIM118 (safe_open is no dict)
    model = MultimodalModel.from_pretrained(tmp_path / "s1" / "model")
    n_trainable = sum(
        1
        for n, _ in model.named_parameters()
        if n.startswith(("image_encoder", "projector", "image_blocks", "extra_embeddings"))
    )
    assert n_state == n_trainable
    for f in ("metrics.jsonl", "loss.png", "summary.json"):
        assert (tmp_path / "s1" / f).is_file()
    assert any((tmp_path / "s1" / "tensorboard").iterdir())
    # The saved model's text-only logits are the backbone's.
    ids = torch.randint(0, 272, (2, 9))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, model.backbone(ids))


def test_a_stage_that_touches_the_backbone_fails_and_writes_nothing(tmp_path):
    def tamper(model, step, metrics):
        if step == 3:
            with torch.no_grad():
                model.backbone.norm.weight[0] += 1e-3

    recipe = tiny_recipe(steps=6, save_every=2)
    trainer = Trainer(
        recipe, output_dir=tmp_path, data={"s1": colour_conversations(16)}, progress=False, callbacks=[tamper]
    )
    with pytest.raises(BackboneChanged, match="changed the backbone"):
        trainer.run()
    ckpts = sorted(p.name for p in (tmp_path / "s1" / "checkpoints").iterdir())
    assert ckpts == ["step-00000002"]  # written before the change; nothing after it
    assert not (tmp_path / "s1" / "model").exists()


def test_gradient_accumulation_and_activation_checkpointing_keep_the_losses(tmp_path):
    data = {"s1": colour_conversations(48, seed=3)}
    runs = {}
    for name, over in {
        "plain": {"batch_size": 8},
        "accum": {"batch_size": 4, "grad_accum": 2},
        "ckpt": {"batch_size": 8, "activation_checkpointing": True},
    }.items():
        (res,) = Trainer(
            tiny_recipe(steps=5, **over), output_dir=tmp_path / name, data=data, progress=False
        ).run()
        runs[name] = res.losses
    torch.testing.assert_close(torch.tensor(runs["accum"]), torch.tensor(runs["plain"]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.tensor(runs["ckpt"]), torch.tensor(runs["plain"]), atol=1e-5, rtol=1e-5)


def _shard_recipe(tmp_path, shards, steps, save_every, extra=""):
    path = tmp_path / "recipe.yaml"
    path.write_text(
        textwrap.dedent(
            f"""\
            name: kill-test
            seed: 3
            model: {{preset: tiny, tokenizer: byte}}
            stages:
              - name: s1
                trainable: [image_encoder, image_adapter]
                data: [{{shards: "{shards}", shuffle_buffer: 8}}]
                optimizer: {{lr: 2.0e-3}}
                schedule: {{warmup_steps: 2}}
                steps: {steps}
                batch_size: 4
                image: {{tile_size: 28, max_tiles: 2}}
                log_every: 1
                save_every: {save_every}
            """
        )
        + extra
    )
    return path


def _run(cmd, env):
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]


def test_resume_after_kill_continues_exactly(tmp_path):
    from mm.datasets import pack

    write_colour_folder(tmp_path / "src", 48, seed=5)
    pack(tmp_path / "src", tmp_path / "shards", shard_bytes=8_000)
    recipe = _shard_recipe(tmp_path, tmp_path / "shards", steps=10, save_every=3)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "mm.cli", "train", str(recipe)]
    _run([*cmd, "--output-dir", str(tmp_path / "full")], env)

    # Kill a second run as soon as its second checkpoint exists, then resume it.
    proc = subprocess.Popen(
        [*cmd, "--output-dir", str(tmp_path / "killed")],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    ckpts = tmp_path / "killed" / "s1" / "checkpoints"
    deadline = time.time() + 120
    while not (ckpts / "step-00000006").exists():
        assert proc.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed" / "s1" / "model").exists()
    _run([*cmd, "--output-dir", str(tmp_path / "killed"), "--resume"], env)

    full = [r["loss"] for r in read_metrics(tmp_path / "full" / "s1" / "metrics.jsonl")]
    resumed = [r["loss"] for r in read_metrics(tmp_path / "killed" / "s1" / "metrics.jsonl")]
    assert len(full) == 10 and resumed == full
    a = MultimodalModel.from_pretrained(tmp_path / "full" / "s1" / "model").adapter_state_dict()
    b = MultimodalModel.from_pretrained(tmp_path / "killed" / "s1" / "model").adapter_state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def write_colour_shard(path, n, seed=0, corrupt=()):
    """One shard of the colour task, written by hand: ``mm data pack`` refuses a broken image, and
    the trainer must cope with shards that hold one. Samples in ``corrupt`` get a cut-off PNG."""
    import io
    import tarfile

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for i, conv in enumerate(colour_conversations(n, seed)):
            buf = io.BytesIO()
            conv[0]["content"][0]["image"].save(buf, format="PNG")
            png = buf.getvalue()[: len(buf.getvalue()) // 3] if i in corrupt else buf.getvalue()
            conv[0]["content"][0]["image"] = "png"
            for name, data in (
                (f"s{i:05d}.json", json.dumps({"messages": conv}).encode()),
                (f"s{i:05d}.png", png),
            ):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def test_corrupt_shard_member_is_skipped_and_counted(tmp_path):
    write_colour_shard(tmp_path / "shards" / "shard-000000.tar", 40, seed=6, corrupt={7})
    recipe = _shard_recipe(tmp_path, tmp_path / "shards", steps=12, save_every=0)
    text = recipe.read_text().replace("shuffle_buffer: 8}", "shuffle_buffer: 8, max_bad_fraction: 0.1}")
    recipe.write_text(text)
    (result,) = Trainer(load_recipe(recipe), output_dir=tmp_path / "out", progress=False).run()
    summary = json.loads((tmp_path / "out" / "s1" / "summary.json").read_text())
    (counters,) = summary["data"]
    assert counters["bad"] == 1 and "decode failed (ImageError)" in counters["bad_by_reason"]
    assert result.steps == 12


def test_two_processes_give_the_losses_of_one(tmp_path):
    script = tmp_path / "run.py"
    script.write_text(
        textwrap.dedent(
            """\
            import json, sys
            import torch
            sys.path.insert(0, __TESTS__)
            from mm_testing import colour_conversations
            from mm.training.recipe import parse_recipe
            from mm.training.trainer import Trainer
            batch, out = int(sys.argv[1]), sys.argv[2]
            recipe = parse_recipe({"name": "d", "model": {"preset": "tiny", "tokenizer": "byte"}, "stages": [{
                "name": "s1", "trainable": ["image_encoder", "image_adapter"], "data": {"shards": "mem"},
                "optimizer": {"lr": 3e-3}, "steps": 5, "batch_size": batch,
                "image": {"tile_size": 28, "max_tiles": 2}, "log_every": 1}]})
            trainer = Trainer(recipe, output_dir=out, data={"s1": colour_conversations(40, seed=9)}, progress=False)
            (res,) = trainer.run()
            if trainer.accelerator.is_main_process:
                json.dump(res.losses, open(out + "/losses.json", "w"))
            """
        ).replace("__TESTS__", repr(str(Path(__file__).parent)))
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(
        [sys.executable, str(script), "8", str(tmp_path / "one")], check=True, env=env, capture_output=True
    )
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        "29533",
    ]
    done = subprocess.run(
        [*torchrun, str(script), "4", str(tmp_path / "two")], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    one = json.loads((tmp_path / "one" / "losses.json").read_text())
    two = json.loads((tmp_path / "two" / "losses.json").read_text())
    assert len(one) == 5
    torch.testing.assert_close(torch.tensor(two), torch.tensor(one), atol=1e-5, rtol=1e-5)


def test_trainable_globs_select_parameters_but_never_the_backbone():
    with torch.device("meta"):
        model = MultimodalModel(ModelConfig.preset("tiny"))
    names = set_trainable(model, ["image_encoder", "image_blocks.*", "projector.*"])
    assert names and not any(n.startswith(("extra_embeddings", "backbone")) for n in names)
    assert set_trainable(model, ["*_gate"]) == [n for n, _ in model.named_parameters() if n.endswith("_gate")]
    for entry in ("backbone", "backbone.*", "*"):
        with pytest.raises(ValueError, match="never trained"):
            set_trainable(model, [entry])


# ---------------------------------------------------------------------- speech stages
def _speech_conversations(n: int, seed: int) -> list:
    """Short generated "utterances" (tones whose pitch names a colour) and their transcripts."""
    gen = torch.Generator().manual_seed(seed)
    words = {"red": 300.0, "green": 500.0, "blue": 800.0}
    out = []
    for i in range(n):
        word = list(words)[i % len(words)]
        t = torch.arange(int(16000 * (0.5 + 0.3 * torch.rand((), generator=gen)))) / 16000
        wave = 0.3 * torch.sin(2 * torch.pi * words[word] * t) + 0.01 * torch.randn(t.shape, generator=gen)
        user = [{"type": "text", "text": "Repeat after me in English."}, {"type": "audio", "audio": wave}]
        out.append([{"role": "user", "content": user}, {"role": "assistant", "content": word}])
    return out


def test_every_shipped_stage_trains_exactly_its_components_on_a_model_with_every_component():
    with torch.device("meta"):
        model = MultimodalModel(ModelConfig.preset("tiny-av").replace(reward_head=True))
    assert all(model.component_parameters()[c] > 0 for c in COMPONENTS)
    stages = {(name, s.name): s for name in shipped_recipes() for s in load_recipe(name).stages}
    speech = {k: s for k, s in stages.items() if {"speech_encoder", "speech_adapter"} & set(s.trainable)}
    assert {s.objective for s in speech.values()} == {"best_rq", "lm"}  # pre-training and SFT ship
    for key, stage in stages.items():
        set_trainable(model, stage.trainable)
        assert trainable_components(model) == [c for c in COMPONENTS if c in stage.trainable], key
        if stage.objective == "best_rq":  # BEST-RQ pre-trains the speech encoder alone
            assert trainable_components(model) == ["speech_encoder"], key
        elif key in speech:  # speech SFT: encoder and adapter learn, everything else is frozen
            assert trainable_components(model) == ["speech_encoder", "speech_adapter"], key


def test_speech_stages_change_only_their_components_and_keep_the_backbone(tmp_path):
    """The paper's two speech stages (``llama3-speech``) at tiny size: BEST-RQ pre-training changes
    the speech encoder only and its classifiers are not saved; SFT changes encoder and adapter."""
    import dataclasses

    from mm.training.objectives import BestRqSettings

    paper = load_recipe("llama3-speech")
    small = {"steps": 4, "batch_size": 4, "max_seq_len": 256, "precision": "fp32", "log_every": 1}
    small.update(activation_checkpointing=False, save_every=0, num_workers=0)
    stages = tuple(dataclasses.replace(s, **small) for s in paper.stages)
    stages = (
        dataclasses.replace(
            stages[0], best_rq=BestRqSettings(codebook_size=32, num_codebooks=2, mask_prob=0.2, span=4)
        ),
        stages[1],
    )
    recipe = dataclasses.replace(
        paper,
        model=dataclasses.replace(paper.model, preset="tiny-av", backbone=None, tokenizer="byte"),
        stages=stages,
    )
    data = {s.name: _speech_conversations(16, seed=i) for i, s in enumerate(stages)}
    trainer = Trainer(recipe, output_dir=tmp_path, data=data, progress=False)
    before = {k: v.clone() for k, v in trainer.initial_model().state_dict().items()}
    results = trainer.run()
    assert [r.steps for r in results] == [4, 4] and all(math.isfinite(r.final_loss) for r in results)

    def changed(folder):
        after = MultimodalModel.from_pretrained(folder).state_dict()
        assert not any(k.startswith("best_rq") for k in after)  # the stage's own classifiers are gone
        assert set(after) == set(before)
        return {component_of(k) for k, v in after.items() if not torch.equal(v, before[k])}

    assert changed(tmp_path / "speech-pretrain" / "model") == {"speech_encoder"}
    assert changed(tmp_path / "speech-sft" / "model") == {"speech_encoder", "speech_adapter"}
