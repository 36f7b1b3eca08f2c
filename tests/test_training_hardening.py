"""The trainer refuses what would train nonsense or continue the wrong run, and says so in one line.

Four classes of user error, each with the case a probe found and variants of it:

1. a run's identity: a fresh run refuses a folder holding another run's checkpoints, ``--resume``
   refuses a checkpoint of another run (other seed, other stage settings, another start model, or
   one that names no run), ``--replace`` starts over;
2. values out of range (a negative ``max_grad_norm``, ``save_every: -1``, betas outside [0, 1),
   numbers YAML read as text);
3. wrong types and missing inputs, found before any work starts, and errors met while training (a
   truncated shard, a full disk): one line on stderr naming the key or the file, exit code 2;
4. what a kill leaves: bad-sample counts continue after a resume, temporary folders of a killed
   write are removed.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from mm_testing import colour_conversations, write_colour_folder
from test_training import write_colour_shard

from mm import ModelConfig, MultimodalModel
from mm.training.recipe import RecipeError, load_recipe, parse_recipe
from mm.training.trainer import Trainer

STAGE = {
    "name": "s1",
    "trainable": ["image_encoder", "image_adapter"],
    "data": [{"shards": "in-memory"}],
    "optimizer": {"lr": 3e-3, "weight_decay": 0.01},
    "schedule": {"warmup_steps": 2},
    "steps": 6,
    "batch_size": 4,
    "image": {"tile_size": 28, "max_tiles": 2},
    "log_every": 1,
    "save_every": 2,
}
MODEL = {"preset": "tiny", "tokenizer": "byte"}


def recipe_dict(stage=None, **top):
    return {"name": "h", "model": dict(MODEL), **top, "stages": [{**STAGE, **(stage or {})}]}


def recipe_of(stage=None, **top):
    return parse_recipe(recipe_dict(stage, **top))


def write_recipe(path: Path, stage=None, **top) -> Path:
    path.write_text(yaml.safe_dump(recipe_dict(stage, **top), sort_keys=False))
    return path


class Killed(Exception):
    """Stands for a kill: the run stops after a step, its last checkpoint on disk."""


def kill_after(step: int):
    def callback(model, done, metrics):
        if done == step:
            raise Killed

    return callback


def mm_train(*args, timeout=300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "2"}
    cmd = [sys.executable, "-m", "mm.cli", "train", *map(str, args)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def one_line_error(code: int, stderr: str, *needles: str, alone: bool = False) -> str:
    """The user error of ``mm train``: exit 2, no traceback, one ``mm train:`` line printed last."""
    assert code == 2, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("mm train: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], stderr[-3000:]
    if alone:  # found before any work: nothing else was printed
        assert lines == errors, stderr[-3000:]
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


def checkpoints(folder: Path) -> list[str]:
    return (
        sorted(p.name for p in (folder / "checkpoints").iterdir())
        if (folder / "checkpoints").exists()
        else []
    )


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    from mm.datasets import pack

    tmp = tmp_path_factory.mktemp("hardening-shards")
    write_colour_folder(tmp / "src", 32, seed=5)
    pack(tmp / "src", tmp / "shards", shard_bytes=8_000)
    return tmp / "shards"


def shard_stage(shards: Path, **over):
    return {
        **STAGE,
        "data": [{"shards": str(shards), "shuffle_buffer": 8}],
        "optimizer": {"lr": 2.0e-3},
        **over,
    }


# ====================================================================== 1. the run a checkpoint belongs to
def test_a_fresh_run_refuses_another_runs_folder_and_resume_refuses_its_checkpoints(shards, tmp_path):
    """The probe's sequence: run A (seed 1) finishes; run B (seed 2, another lr) into the same folder
    used to delete its own checkpoints as they were written, and ``--resume`` then "finished" B from
    A's last step and wrote A's adapters as B's model."""
    out = tmp_path / "out"
    a = write_recipe(tmp_path / "a.yaml", shard_stage(shards, optimizer={"lr": 2.0e-3}), seed=1)
    b = write_recipe(tmp_path / "b.yaml", shard_stage(shards, optimizer={"lr": 3.0e-3}), seed=2)
    done = mm_train(a, "--output-dir", out)
    assert done.returncode == 0, done.stderr[-3000:]
    stage = out / "s1"
    before = {n: (stage / "checkpoints" / n / "state.json").read_text() for n in checkpoints(stage)}
    adapters = (stage / "model" / "adapters.safetensors").read_bytes()
    assert list(before) == ["step-00000004", "step-00000006"]

    done = mm_train(b, "--output-dir", out)
    one_line_error(done.returncode, done.stderr, str(stage), "--resume", "--replace", alone=True)
    done = mm_train(b, "--output-dir", out, "--resume")
    error = one_line_error(done.returncode, done.stderr, "step-00000006", alone=True)
    assert "seed 1 there, 2 now" in error and "optimizer.lr" in error

    # Nothing of A was touched.
    after = {n: (stage / "checkpoints" / n / "state.json").read_text() for n in checkpoints(stage)}
    assert after == before
    assert (stage / "model" / "adapters.safetensors").read_bytes() == adapters
    run = json.loads(before["step-00000006"])["run"]
    assert run["seed"] == 1 and run["recipe_hash"] and run["start"]["kind"] == "previous"
    assert json.loads((stage / "summary.json").read_text())["run"] == run


def test_replace_discards_the_old_run_and_trains_afresh(shards, tmp_path):
    out = tmp_path / "out"
    a = write_recipe(tmp_path / "a.yaml", shard_stage(shards, steps=8), seed=1)
    b = write_recipe(tmp_path / "b.yaml", shard_stage(shards, optimizer={"lr": 3.0e-3}), seed=2)
    assert mm_train(a, "--output-dir", out).returncode == 0
    done = mm_train(b, "--output-dir", out, "--resume", "--replace")
    one_line_error(done.returncode, done.stderr, "--resume", "--replace", alone=True)
    done = mm_train(b, "--output-dir", out, "--replace")
    assert done.returncode == 0, done.stderr[-3000:]
    stage = out / "s1"
    assert checkpoints(stage) == ["step-00000004", "step-00000006"]  # A's step 8 is gone
    for name in checkpoints(stage):
        assert json.loads((stage / "checkpoints" / name / "state.json").read_text())["run"]["seed"] == 2
    # The same as B in a folder of its own.
    (clean,) = Trainer(load_recipe(b), output_dir=tmp_path / "clean", progress=False).run()
    rows = [json.loads(line)["loss"] for line in (stage / "metrics.jsonl").read_text().splitlines()]
    torch.testing.assert_close(torch.tensor(rows), torch.tensor(clean.losses), atol=1e-5, rtol=1e-5)


def test_resume_refuses_changed_stage_settings_but_not_changed_cadence(tmp_path):
    data = {"s1": colour_conversations(24, seed=1)}
    with pytest.raises(Killed):
        Trainer(recipe_of(), output_dir=tmp_path, data=data, progress=False, callbacks=[kill_after(3)]).run()
    assert checkpoints(tmp_path / "s1") == ["step-00000002"]
    # A fresh run of the very same recipe refuses too: its checkpoints would mix with the old ones.
    with pytest.raises(RecipeError, match="holds checkpoints"):
        Trainer(recipe_of(), output_dir=tmp_path, data=data, progress=False).run()
    changed = recipe_of({"optimizer": {"lr": 1e-3, "weight_decay": 0.01}})
    with pytest.raises(
        RecipeError, match=r"the recipe's stage changed: optimizer\.lr 0\.003 there, 0\.001 now"
    ):
        Trainer(changed, output_dir=tmp_path, data=data, progress=False).run(resume=True)
    with pytest.raises(RecipeError, match="batch_size 4 there, 2 now"):
        Trainer(recipe_of({"batch_size": 2}), output_dir=tmp_path, data=data, progress=False).run(resume=True)
    # How often it logs, saves and keeps checkpoints is no part of what is trained.
    cadence = recipe_of({"log_every": 2, "save_every": 1, "keep_last": 4}, output_dir=str(tmp_path / "x"))
    (result,) = Trainer(cadence, output_dir=tmp_path, data=data, progress=False).run(resume=True)
    assert result.steps == 6 and len(result.losses) == 4


def _start_folder(path: Path, bump: float = 0.0) -> Path:
    from mm.datasets import ImageProcessor
    from mm.datasets.preprocessing import Preprocessor
    from mm.text_backbone import ByteTokenizer

    torch.manual_seed(0)
    model = MultimodalModel(ModelConfig.preset("tiny"))
    model.init_placeholder_embeddings()
    with torch.no_grad():
        next(model.projector.parameters()).add_(bump)
    model.preprocessor = Preprocessor(ByteTokenizer(), ImageProcessor(tile_size=28, max_tiles=2))
    shutil.rmtree(path, ignore_errors=True)
    model.save_pretrained(path, copy_backbone=True)
    return path


def test_resume_refuses_a_stage_that_now_starts_from_another_model(tmp_path):
    start = _start_folder(tmp_path / "start")
    recipe = parse_recipe({**recipe_dict(), "model": {"checkpoint": str(start)}})
    data = {"s1": colour_conversations(24, seed=1)}
    with pytest.raises(Killed):
        Trainer(
            recipe, output_dir=tmp_path / "out", data=data, progress=False, callbacks=[kill_after(3)]
        ).run()
    _start_folder(start, bump=0.01)  # same path, same backbone, other adapters
    with pytest.raises(RecipeError, match="starts from another model"):
        Trainer(recipe, output_dir=tmp_path / "out", data=data, progress=False).run(resume=True)


def test_resume_refuses_a_checkpoint_that_names_no_run(tmp_path):
    data = {"s1": colour_conversations(24, seed=1)}
    with pytest.raises(Killed):
        Trainer(recipe_of(), output_dir=tmp_path, data=data, progress=False, callbacks=[kill_after(3)]).run()
    state_file = tmp_path / "s1" / "checkpoints" / "step-00000002" / "state.json"
    state = json.loads(state_file.read_text())
    state.pop("run", None)  # as an older mm wrote it
    state_file.write_text(json.dumps(state))
    with pytest.raises(RecipeError, match="does not name the run"):
        Trainer(recipe_of(), output_dir=tmp_path, data=data, progress=False).run(resume=True)


# ====================================================================== 2. values out of range
def test_a_negative_max_grad_norm_is_refused_before_any_work(shards, tmp_path):
    """The probe: ``max_grad_norm: -1.0`` flipped the gradients; the loss climbed from 1.03 to 16.2."""
    recipe = write_recipe(tmp_path / "r.yaml", shard_stage(shards, max_grad_norm=-1.0))
    done = mm_train(recipe, "--output-dir", tmp_path / "out")
    one_line_error(done.returncode, done.stderr, "r.yaml", "stages[0].max_grad_norm", "-1.0", alone=True)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "stage,top,key",
    [
        ({"save_every": -1}, {}, "stages[0].save_every"),
        ({"max_grad_norm": 0.0}, {}, "stages[0].max_grad_norm"),
        ({"optimizer": {"lr": 1e-3, "betas": [0.9, 1.0]}}, {}, r"stages[0].optimizer.betas[1]"),
        ({"optimizer": {"lr": 1e-3, "betas": [-0.1, 0.9]}}, {}, r"stages[0].optimizer.betas[0]"),
        ({"optimizer": {"lr": 0.0}}, {}, "stages[0].optimizer.lr"),
        ({"optimizer": {"lr": -1e-3}}, {}, "stages[0].optimizer.lr"),
        ({"optimizer": {"lr": float("nan")}}, {}, "stages[0].optimizer.lr"),
        ({"optimizer": {"lr": 3.0}}, {}, "stages[0].optimizer.lr"),
        ({"optimizer": {"lr": 1e-3, "eps": 0.0}}, {}, "stages[0].optimizer.eps"),
        ({"optimizer": {"lr": 1e-3, "weight_decay": -0.01}}, {}, "stages[0].optimizer.weight_decay"),
        (
            {"optimizer": {"lr": 1e-3, "lr_scale": {"*_gate": 0}}},
            {},
            "stages[0].optimizer.lr_scale['*_gate']",
        ),
        ({"steps": 0}, {}, "stages[0].steps"),
        ({"batch_size": 0}, {}, "stages[0].batch_size"),
        ({"grad_accum": 0}, {}, "stages[0].grad_accum"),
        ({"keep_last": 0}, {}, "stages[0].keep_last"),
        ({"log_every": 0}, {}, "stages[0].log_every"),
        ({"max_seq_len": 0}, {}, "stages[0].max_seq_len"),
        ({"num_workers": -1}, {}, "stages[0].num_workers"),
        ({"seed": -3}, {}, "stages[0].seed"),
        ({"schedule": {"warmup_steps": -1}}, {}, "stages[0].schedule.warmup_steps"),
        ({"schedule": {"warmup_steps": 6}}, {}, "stages[0].schedule.warmup_steps"),
        ({"schedule": {"min_lr_ratio": 1.5}}, {}, "stages[0].schedule.min_lr_ratio"),
        ({"image": {"tile_size": 0}}, {}, "stages[0].image.tile_size"),
        ({"image": {"tile_size": 28, "max_tiles": 0}}, {}, "stages[0].image.max_tiles"),
        ({"video": {"num_frames": 0}}, {}, "stages[0].video.num_frames"),
        ({"video": {"num_frames": 8, "group_size": 0}}, {}, "stages[0].video.group_size"),
        ({"data": [{"shards": "x", "shuffle_buffer": -1}]}, {}, "stages[0].data[0].shuffle_buffer"),
        ({"data": [{"shards": "x", "max_bad_fraction": 1.5}]}, {}, "stages[0].data[0].max_bad_fraction"),
        ({"data": [{"shards": "x", "weight": 0}]}, {}, "stages[0].data[0].weight"),
        ({"data": [{"shards": ""}]}, {}, "stages[0].data[0].shards"),
        ({"name": "../elsewhere"}, {}, "stages[0].name"),
        (
            {"objective": "best_rq", "trainable": ["speech_encoder"], "best_rq": {"mask_prob": 1.5}},
            {},
            "stages[0].best_rq.mask_prob",
        ),
        ({}, {"seed": -1}, "seed"),
    ],
)
def test_out_of_range_values_are_refused_naming_the_key(stage, top, key):
    with pytest.raises(RecipeError) as caught:
        recipe_of(stage, **top)
    assert str(caught.value).startswith(f"{key}: "), str(caught.value)


def test_numbers_yaml_reads_as_text_are_refused_with_the_fix(tmp_path):
    """The probe: ``lr: 5e-3`` is the string '5e-3' to YAML (``5.0e-3`` is the number)."""
    text = yaml.safe_dump(
        recipe_dict({"optimizer": {"lr": "LR", "weight_decay": 0.01}}), sort_keys=False
    ).replace("lr: LR", "lr: 5e-3")
    (tmp_path / "r.yaml").write_text(text)
    with pytest.raises(RecipeError) as caught:
        load_recipe(tmp_path / "r.yaml")
    assert str(caught.value) == (
        "r.yaml: stages[0].optimizer.lr: expected a number, got the string '5e-3' "
        "(YAML reads 5e-3 as text; write 5.0e-3)"
    )
    text = text.replace("lr: 5e-3", "lr: 5.0e-3").replace("weight_decay: 0.01", "eps: 1e-8")
    (tmp_path / "r.yaml").write_text(text)
    with pytest.raises(
        RecipeError, match=r"optimizer\.eps: .*'1e-8' \(YAML reads 1e-8 as text; write 1.0e-8\)"
    ):
        load_recipe(tmp_path / "r.yaml")


# ====================================================================== 3. wrong types, missing inputs
@pytest.mark.parametrize(
    "stage,top,message",
    [
        ({"batch_size": "4"}, {}, "stages[0].batch_size: expected an int, got the string '4'"),
        ({"steps": 2.5}, {}, "stages[0].steps: expected an int, got the float 2.5"),
        (
            {"optimizer": {"lr": 1e-3, "betas": [0.9]}},
            {},
            "stages[0].optimizer.betas: expected a list of 2 values, got the list [0.9]",
        ),
        ({"seed": "abc"}, {}, "stages[0].seed: expected an int or null, got the string 'abc'"),
        ({}, {"seed": "abc"}, "seed: expected an int, got the string 'abc'"),
        ({"steps": True}, {}, "stages[0].steps: expected an int, got the bool True"),
        ({"optimizer": {"lr": True}}, {}, "stages[0].optimizer.lr: expected a number, got the bool True"),
        ({"optimizer": {"lr": [1e-3]}}, {}, "stages[0].optimizer.lr: expected a number, got the list"),
        (
            {"activation_checkpointing": "yes"},
            {},
            "stages[0].activation_checkpointing: expected true or false",
        ),
        ({"trainable": ["image_adapter", 3]}, {}, "stages[0].trainable[1]: expected a string, got 3"),
        ({"data": [{"shards": 5}]}, {}, "stages[0].data[0].shards: expected a string, got 5"),
        ({"data": ["x"]}, {}, "stages[0].data[0]: expected a mapping"),
        (
            {"optimizer": {"lr": 1e-3, "lr_scale": {"*_gate": "10"}}},
            {},
            "stages[0].optimizer.lr_scale['*_gate']",
        ),
        (
            {"optimizer": {"lr": 1e-3, "lr_scale": ["*_gate"]}},
            {},
            "stages[0].optimizer.lr_scale: expected a mapping",
        ),
        (
            {"image": {"tile_size": 28.0}},
            {},
            "stages[0].image.tile_size: expected an int, got the float 28.0",
        ),
        ({"schedule": "cosine"}, {}, "stages[0].schedule: expected a mapping"),
        ({}, {"output_dir": 3}, "output_dir: expected a string or null, got 3"),
        (
            {},
            {"model": {"preset": "tiny", "tokenizer": "byte", "backbone": 7}},
            "model.backbone: expected a string",
        ),
    ],
)
def test_wrong_types_are_refused_naming_the_key(stage, top, message):
    with pytest.raises(RecipeError) as caught:
        recipe_of(stage, **top)
    assert str(caught.value).startswith(message), str(caught.value)


def test_a_trainable_glob_that_matches_nothing_is_named(tmp_path):
    """The probe: ``optimizer got an empty parameter list`` — or, beside a component, silently nothing."""
    data = {"s1": colour_conversations(8)}
    for trainable, named in (
        (["image_blocks.*_gates"], "image_blocks.*_gates"),
        (["image_adapter", "projectr.*"], "projectr.*"),
        (["image_adapter", "speech_adapter"], "speech_adapter"),  # the tiny preset hears nothing
    ):
        recipe = recipe_of({"trainable": trainable})
        with pytest.raises(RecipeError) as caught:
            Trainer(recipe, output_dir=tmp_path / "out", data=data, progress=False).run()
        message = str(caught.value)
        assert f"stages[0].trainable: {named!r} matches no parameter" in message, message
        assert "image_encoder" in message and "image_adapter" in message  # the components it has
    assert not (tmp_path / "out" / "s1" / "checkpoints").exists()


@pytest.mark.parametrize(
    "model,stage,key",
    [
        ({"preset": "tiny", "backbone": "NOPE/backbone"}, {}, "model.backbone"),
        (
            {"preset": "tiny", "tokenizer": "byte", "image_encoder": "NOPE/enc.safetensors"},
            {},
            "model.image_encoder",
        ),
        ({"preset": "tiny", "tokenizer": "NOPE/tokenizer.json"}, {}, "model.tokenizer"),
        ({"checkpoint": "NOPE/model"}, {}, "model.checkpoint"),
        (MODEL, {"start": {"hot_swap": "NOPE/instruct"}}, "stages[0].start"),
        (MODEL, {"start": {"checkpoint": "NOPE/model"}}, "stages[0].start"),
        (MODEL, {"data": [{"shards": "NOPE/shard-{000..002}.tar"}]}, "stages[0].data[0].shards"),
        ({"preset": "no-such-preset", "tokenizer": "byte"}, {}, "model.preset"),
    ],
)
def test_missing_inputs_are_named_before_any_work(tmp_path, model, stage, key):
    model = {k: v.replace("NOPE", str(tmp_path / "nope")) for k, v in model.items()}
    stage = json.loads(json.dumps(stage).replace("NOPE", str(tmp_path / "nope")))
    recipe = parse_recipe({**recipe_dict(stage), "model": model})
    data = {} if "data" in stage else {"s1": colour_conversations(8)}
    with pytest.raises(RecipeError) as caught:
        Trainer(recipe, output_dir=tmp_path / "out", data=data, progress=False).run()
    assert str(caught.value).startswith(f"{key}: "), str(caught.value)
    assert "no-such-preset" in str(caught.value) or str(tmp_path / "nope") in str(caught.value)
    assert not (tmp_path / "out").exists()


def test_a_stage_after_an_unfinished_one_is_refused_before_any_work(tmp_path):
    second = {**STAGE, "name": "s2"}
    recipe = parse_recipe({**recipe_dict(), "stages": [STAGE, second]})
    with pytest.raises(RecipeError, match="stages\\[1\\].start: .*'s1', which has not finished"):
        Trainer(
            recipe, output_dir=tmp_path / "out", data={"s2": colour_conversations(8)}, progress=False
        ).run(stages=["s2"])


@pytest.mark.parametrize(
    "case",
    ["batch_size-string", "seed-string", "unsubstituted", "missing-shard", "glob-matches-nothing"],
)
def test_user_errors_of_mm_train_are_one_line(shards, tmp_path, case):
    stage, top, needles, alone = shard_stage(shards), {}, (), True
    if case == "batch_size-string":
        stage["batch_size"], needles = "4", ("stages[0].batch_size", "the string '4'")
    elif case == "seed-string":
        top, needles = {"seed": "abc"}, ("seed: expected an int", "'abc'")
    elif case == "unsubstituted":  # the probe: an AssertionError about wds_WDS_DATA
        stage["data"] = [{"shards": "${DATA}/shard-{000000..000003}.tar"}]
        needles = ("stages[0].data[0].shards", "${DATA}", "--var DATA=")
    elif case == "missing-shard":
        stage["data"] = [{"shards": str(tmp_path / "gone" / "shard-000000.tar")}]
        needles = ("stages[0].data[0].shards", str(tmp_path / "gone"))
    else:
        stage["trainable"], needles, alone = ["image_adapter", "image_blockz.*"], ("'image_blockz.*'",), False
    recipe = write_recipe(tmp_path / "r.yaml", stage, **top)
    done = mm_train(recipe, "--output-dir", tmp_path / "out")
    one_line_error(done.returncode, done.stderr, *needles, alone=alone)
    assert not (tmp_path / "out" / "s1" / "checkpoints").exists()


def test_an_unsubstituted_model_path_names_the_variable(tmp_path):
    recipe = parse_recipe({**recipe_dict(), "model": {"preset": "tiny", "backbone": "${BACKBONE}"}})
    with pytest.raises(
        RecipeError, match=r"model\.backbone: \$\{BACKBONE\} was not filled in .*--var BACKBONE="
    ):
        Trainer(recipe, output_dir=tmp_path / "out", data={"s1": []}, progress=False).run()


def test_a_truncated_shard_through_mm_train_is_one_line(tmp_path):
    """The probe: a clear ``DataError``, but printed under a traceback."""
    import tarfile

    from mm.datasets import pack

    write_colour_folder(tmp_path / "src", 24, seed=2)
    pack(tmp_path / "src", tmp_path / "shards", shard_bytes=1 << 20)
    (shard,) = (tmp_path / "shards").glob("*.tar")
    with tarfile.open(shard) as tar:
        member = tar.getmembers()[15]
    shard.write_bytes(shard.read_bytes()[: member.offset_data + member.size // 2])  # cut inside a member
    stage = shard_stage(tmp_path / "shards", steps=8, save_every=0)
    stage["data"][0]["max_bad_fraction"] = 0.0
    recipe = write_recipe(tmp_path / "r.yaml", stage)
    done = mm_train(recipe, "--output-dir", tmp_path / "out")
    one_line_error(done.returncode, done.stderr, "truncated shard", shard.name)


def _disk_full_run(tmp_path, shards, monkeypatch, capsys, module, name, error):
    from mm import cli

    real = module.save_file

    def save_file(tensors, filename, *args, **kwargs):
        if name in str(filename):
            raise error
        return real(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(module, "save_file", save_file)
    recipe = write_recipe(tmp_path / "r.yaml", shard_stage(shards, steps=4, save_every=2))
    code = cli.main(["train", str(recipe), "--output-dir", str(tmp_path / "out")])
    return one_line_error(code, capsys.readouterr().err)


def test_a_full_disk_is_one_line_and_the_earlier_checkpoint_stays_intact(
    tmp_path, shards, monkeypatch, capsys
):
    """The probe: a raw ``SafetensorError`` traceback. Here the second checkpoint's write fails."""
    import mm.training.state as state

    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    error = _disk_full_run(tmp_path, shards, monkeypatch, capsys, state, "step-00000004", full)
    stage = tmp_path / "out" / "s1"
    assert "step-00000004" in error and "No space left on device" in error and "intact" in error
    assert checkpoints(stage) == ["step-00000002"]  # no half-written folder beside it
    state.load_train_state(stage / "checkpoints" / "step-00000002", None)  # and it reads back whole
    assert not (stage / "model").exists()


def test_a_safetensors_error_writing_the_model_is_one_line(tmp_path, shards, monkeypatch, capsys):
    from safetensors import SafetensorError

    import mm.checkpoint.native as native

    full = SafetensorError(
        'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space" })'
    )
    error = _disk_full_run(tmp_path, shards, monkeypatch, capsys, native, "adapters", full)
    stage = tmp_path / "out" / "s1"
    assert str(stage / "model") in error and "StorageFull" in error and "intact" in error
    assert checkpoints(stage) == ["step-00000002", "step-00000004"]
    assert [p.name for p in stage.iterdir() if p.name.startswith(".")] == []


# ====================================================================== 4. after a kill
@pytest.mark.parametrize(
    "samples,corrupt,steps,kill",
    [(32, {0, 1, 2, 3, 4}, 6, 4), (16, {2, 9}, 12, 8)],
    ids=["five-bad-before-the-kill", "resumed-in-a-later-epoch"],
)
def test_bad_sample_counts_continue_after_a_resume(tmp_path, samples, corrupt, steps, kill):
    write_colour_shard(tmp_path / "shards" / "shard-000000.tar", samples, seed=4, corrupt=corrupt)
    stage = shard_stage(tmp_path / "shards", steps=steps, save_every=3)
    stage["data"][0]["max_bad_fraction"] = 0.5
    recipe = recipe_of(stage)
    Trainer(recipe, output_dir=tmp_path / "full", progress=False).run()
    with pytest.raises(Killed):
        Trainer(recipe, output_dir=tmp_path / "killed", progress=False, callbacks=[kill_after(kill)]).run()
    Trainer(recipe, output_dir=tmp_path / "killed", progress=False).run(resume=True)
    full, resumed = (
        json.loads((tmp_path / d / "s1" / "summary.json").read_text()) for d in ("full", "killed")
    )
    assert full["data"][0]["bad"] == len(corrupt) if samples == 32 else full["data"][0]["bad"] > len(corrupt)
    assert resumed["data"] == full["data"] and resumed["skipped"] == full["skipped"]


def test_too_long_counts_continue_after_a_resume(tmp_path):
    data = colour_conversations(24, seed=3)
    for conv in data[::3]:
        conv[0]["content"][1]["text"] = "What colour is this? " * 20
    recipe = recipe_of({"max_seq_len": 96, "steps": 6, "save_every": 2})
    Trainer(recipe, output_dir=tmp_path / "full", data={"s1": data}, progress=False).run()
    with pytest.raises(Killed):
        Trainer(
            recipe, output_dir=tmp_path / "k", data={"s1": data}, progress=False, callbacks=[kill_after(5)]
        ).run()
    Trainer(recipe, output_dir=tmp_path / "k", data={"s1": data}, progress=False).run(resume=True)
    full, resumed = (json.loads((tmp_path / d / "s1" / "summary.json").read_text()) for d in ("full", "k"))
    assert full["skipped"]["too long"] > 0
    assert resumed["skipped"] == full["skipped"] and resumed["data"] == full["data"]


def _leftovers(stage: Path) -> tuple[list[Path], list[Path]]:
    """Temporary folders and files of killed atomic writes, and things that are not theirs."""
    (stage / "checkpoints").mkdir(parents=True, exist_ok=True)
    ours = [
        stage / ".model.tmp-x",
        stage / ".summary.json.tmp-3kd9_a0q",
        stage / "checkpoints" / ".step-00000004.tmp-q1w2e3r4",
    ]
    for p in ours:
        if "summary" in p.name:
            p.write_text("{")
        else:
            p.mkdir()
    (ours[-1] / "adapters.safetensors").write_bytes(b"\0" * 10)
    theirs = [
        stage / "notes.txt",
        stage / ".model.tmp",
        stage / ".mine.tmp-x",
        stage / "checkpoints" / "keep.me",
    ]
    for p in theirs:
        p.write_text("mine")
    return ours, theirs


def test_leftovers_of_a_killed_write_are_removed_on_resume(tmp_path):
    """The probe: an empty ``.model.tmp-*`` folder from a kill during the final write stayed forever."""
    data = {"s1": colour_conversations(24, seed=1)}
    with pytest.raises(Killed):
        Trainer(recipe_of(), output_dir=tmp_path, data=data, progress=False, callbacks=[kill_after(3)]).run()
    ours, theirs = _leftovers(tmp_path / "s1")
    Trainer(recipe_of(), output_dir=tmp_path, data=data, progress=False).run(resume=True)
    assert not any(p.exists() for p in ours)
    assert all(p.exists() for p in theirs)
    assert (tmp_path / "s1" / "model" / "config.json").is_file()


def test_leftovers_are_removed_when_a_fresh_run_starts(tmp_path):
    ours, theirs = _leftovers(tmp_path / "s1")
    seen = {}

    def look(model, step, metrics):
        seen.setdefault("gone", not any(p.exists() for p in ours))

    Trainer(
        recipe_of(),
        output_dir=tmp_path,
        data={"s1": colour_conversations(24)},
        progress=False,
        callbacks=[look],
    ).run()
    assert seen["gone"] and all(p.exists() for p in theirs)
