"""FSDP2 under ``torchrun``: two CPU processes (gloo) train as one process does, and resume exactly.

One script runs a tiny stage three times: in one process on batches of 8 (the reference); under
``torch.distributed.run --nproc_per_node 2`` with ``fsdp=True`` on 2 samples per rank and 2
accumulated micro-batches (the same global batch of 8), with activation checkpointing; and once more
under FSDP, resuming from that run's step-3 checkpoint. The data mix image questions with text-only
ones, so some micro-batches have images on one rank only (the case where ranks must still call the
same sharded modules).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mm import ModelConfig, MultimodalModel

SCRIPT = """\
import json, sys
import torch
sys.path.insert(0, __TESTS__)
from mm_testing import colour_conversations
from mm.training.recipe import parse_recipe
from mm.training.trainer import Trainer

batch, accum, out, mode = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
text_only = [
    [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": c}]
    for c in ("red", "blue", "green", "black") * 4
]
data = colour_conversations(24, seed=9) + text_only
recipe = parse_recipe({"name": "f", "model": {"preset": "tiny", "tokenizer": "byte"}, "stages": [{
    "name": "s1", "trainable": ["image_encoder", "image_adapter"], "data": {"shards": "mem"},
    "optimizer": {"lr": 3e-3}, "steps": 6, "batch_size": batch, "grad_accum": accum,
    "activation_checkpointing": mode != "one", "max_grad_norm": 0.5, "save_every": 3, "keep_last": 3,
    "image": {"tile_size": 28, "max_tiles": 2}, "log_every": 1}]})
record = {"forced": 0}


class Probe(Trainer):
    def initial_model(self):
        model = super().initial_model()

        def count(module, args, kwargs):
            # A micro-batch whose rows see no image runs the image path because another rank's do.
            mask = kwargs.get("cross_attention_mask")
            if kwargs.get("run_media_path") and mask is not None and not bool(mask.any()):
                record["forced"] += 1

        model.register_forward_pre_hook(count, with_kwargs=True)
        return model


def layout(model, step, metrics):
    if step != 1 or mode == "one":
        return
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    record["units"] = [n for n, m in model.named_modules() if isinstance(m, FSDPModule)]
    record["backbone_local"] = sum(
        p.to_local().numel() for p in model.backbone.parameters() if isinstance(p, DTensor)
    )
    record["backbone_total"] = sum(p.numel() for p in model.backbone.parameters())


trainer = Probe(recipe, output_dir=out, data={"s1": data}, progress=False, fsdp=mode != "one",
                callbacks=[layout])
(res,) = trainer.run(resume=mode == "resume")
rank = trainer.accelerator.process_index
json.dump({**record, "losses": res.losses}, open(f"{out}/{mode}-rank{rank}.json", "w"))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd: list[str]) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-4000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fsdp")
    script = tmp / "run.py"
    script.write_text(SCRIPT.replace("__TESTS__", repr(str(Path(__file__).parent))))
    _run([sys.executable, str(script), "8", "1", str(tmp / "one"), "one"])

    def torchrun(out: Path, mode: str) -> None:
        port = str(_free_port())
        launch = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            port,
        ]
        _run([*launch, str(script), "2", "2", str(out), mode])

    torchrun(tmp / "fsdp", "fsdp")
    # A run killed after its step-3 checkpoint: the same folder without anything written later.
    shutil.copytree(tmp / "fsdp", tmp / "resumed")
    shutil.rmtree(tmp / "resumed" / "s1" / "checkpoints" / "step-00000006")
    shutil.rmtree(tmp / "resumed" / "s1" / "model")
    torchrun(tmp / "resumed", "resume")

    def read(out: str, mode: str, rank: int = 0) -> dict:
        return json.loads((tmp / out / f"{mode}-rank{rank}.json").read_text())

    return tmp, read


def test_fsdp_shards_the_backbone_layers_encoder_blocks_and_root(runs):
    tmp, read = runs
    rec = read("fsdp", "fsdp")
    units = set(rec["units"])
    expected = {"", "image_encoder"}
    expected |= {f"backbone.layers.{i}" for i in range(4)}
    expected |= {f"image_encoder.layers.{i}" for i in range(4)}
    expected |= {f"image_encoder.global_layers.{i}" for i in range(2)}
    blocks = len(ModelConfig.preset("tiny").cross_attention_layers)
    assert blocks > 0
    expected |= {f"image_blocks.{i}" for i in range(blocks)}
    assert units == expected
    # Each rank holds half of the frozen backbone (every tensor has an even first dimension).
    assert 2 * rec["backbone_local"] == rec["backbone_total"]


def test_two_fsdp_processes_give_the_losses_and_weights_of_one(runs):
    tmp, read = runs
    one = read("one", "one")["losses"]
    two = read("fsdp", "fsdp")["losses"]
    assert len(one) == 6
    torch.testing.assert_close(torch.tensor(two), torch.tensor(one), atol=1e-5, rtol=1e-5)
    # Ranks with text only ran the image path because the other rank had images.
    assert read("fsdp", "fsdp", 0)["forced"] + read("fsdp", "fsdp", 1)["forced"] > 0
    # Gradient clipping bit (global norm over the shards) and gave the same norms.
    norms = [
        [r["grad_norm"] for r in map(json.loads, (tmp / d / "s1" / "metrics.jsonl").read_text().splitlines())]
        for d in ("one", "fsdp")
    ]
    assert max(norms[0]) > 0.5
    torch.testing.assert_close(torch.tensor(norms[1]), torch.tensor(norms[0]), atol=1e-6, rtol=1e-5)


def test_fsdp_checkpoint_is_the_single_process_format_with_the_same_values(runs):
    tmp, _ = runs
    for step in ("step-00000003", "step-00000006"):
        a, b = (tmp / d / "s1" / "checkpoints" / step for d in ("one", "fsdp"))
        assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir())
        assert json.loads((a / "optimizer.json").read_text()) == json.loads(
            (b / "optimizer.json").read_text()
        )
        for name in ("adapters.safetensors", "optimizer.safetensors"):
            x, y = load_file(a / name), load_file(b / name)
            assert x.keys() == y.keys()
            for k in x:
                torch.testing.assert_close(y[k], x[k], atol=1e-5, rtol=1e-4, msg=f"{step}/{name}: {k}")


def test_fsdp_resume_continues_exactly(runs):
    tmp, read = runs
    full = read("fsdp", "fsdp")["losses"]
    resumed = read("resumed", "resume")["losses"]
    assert resumed == full[3:]
    a = load_file(tmp / "fsdp" / "s1" / "model" / "adapters.safetensors")
    b = load_file(tmp / "resumed" / "s1" / "model" / "adapters.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_fsdp_model_folder_loads_in_one_process_with_the_trained_weights(runs):
    tmp, _ = runs
    model = MultimodalModel.from_pretrained(tmp / "fsdp" / "s1" / "model")
    weights = model.adapter_state_dict()
    # Exactly the run's final weights (its last checkpoint holds them too) ...
    final = load_file(tmp / "fsdp" / "s1" / "checkpoints" / "step-00000006" / "adapters.safetensors")
    assert weights.keys() == final.keys()
    assert all(torch.equal(weights[k], final[k]) for k in final)
    # ... which are those one process trains.
    reference = MultimodalModel.from_pretrained(tmp / "one" / "s1" / "model").adapter_state_dict()
    for k, v in reference.items():
        torch.testing.assert_close(weights[k], v, atol=1e-5, rtol=1e-4, msg=k)
    ids = torch.randint(0, 256, (2, 9))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, model.backbone(ids))
