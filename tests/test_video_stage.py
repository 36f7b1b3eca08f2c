"""The video stage (Llama 3 section 7.4): its trainable set, cached frame features, bad videos.

Everything runs the real path: moving-shapes clips written as H.264 mp4 by PyAV, packed into
shards, streamed and decoded by the trainer; ``cache-features`` replaces the clips by the frame
tokens of the model's frozen image encoder and projector.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mm import ModelConfig, MultimodalModel
from mm.datasets import ImageProcessor, VideoConfig, pack
from mm.datasets.preprocessing import Preprocessor
from mm.datasets.webdata import DataCounters, read_shard
from mm.demo.data import make_video_qa, video_qa_messages, write_video_qa_folder
from mm.model.components import trainable_components
from mm.text_backbone import ByteTokenizer
from mm.training.cache_features import (
    StaleFeaturesError,
    cache_features,
    features_fingerprint,
    features_preprocessor,
    read_features,
)
from mm.training.data import StageData
from mm.training.recipe import DataSource, parse_recipe
from mm.training.trainer import Trainer

FRAMES = 8  # frames per clip, merged 4 -> 1 by the tiny-av aggregator (group_size 4)
SIZE = 28  # the tiny-av image encoder's tile


def _clips(n: int, seed: int):
    return make_video_qa(n, split="train", seed=seed, num_frames=FRAMES, size=SIZE)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny-av model whose video gates are open, so the video decides the loss."""
    torch.manual_seed(0)
    model = MultimodalModel(ModelConfig.preset("tiny-av"))
    model.init_placeholder_embeddings()
    with torch.no_grad():
        for block in model.video_blocks:
            block.attn_gate.fill_(0.5)
            block.mlp_gate.fill_(0.5)
    # One tile per frame, padded to the encoder's four: the fingerprint covers that padding too.
    model.preprocessor = Preprocessor(
        ByteTokenizer(), ImageProcessor(tile_size=SIZE, max_tiles=1), video=VideoConfig(num_frames=FRAMES)
    )
    path = tmp_path_factory.mktemp("video-stage") / "model"
    model.save_pretrained(path, copy_backbone=True)
    return path


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """Ten clips with questions, packed into several shards."""
    root = tmp_path_factory.mktemp("video-shards")
    write_video_qa_folder(_clips(10, seed=1), root / "raw")
    pack(root / "raw", root / "shards", shard_bytes="12KB")
    return root / "shards"


def _recipe(
    start: Path, data, *, steps: int, num_frames: int = FRAMES, lr: float = 3e-3, trainable=("video_adapter",)
):
    stage = {
        "name": "video",
        "trainable": list(trainable),
        "data": data,
        "optimizer": {"lr": lr, "lr_scale": {"*_gate": 10}},
        "steps": steps,
        "batch_size": 4,
        "video": {"num_frames": num_frames, "group_size": 4},
        "max_seq_len": 256,
        "start": {"checkpoint": str(start)},
        "log_every": 1,
        "seed": 5,
    }
    return parse_recipe({"name": "v", "model": {"checkpoint": str(start)}, "stages": [stage]})


def test_the_video_stage_trains_only_the_video_adapter_and_its_loss_falls(model_dir, tmp_path):
    seen = {}

    def inspect(model, step, metrics):
        if step == 1:
            seen["trainable"] = trainable_components(model)
            seen["frozen_grads"] = [
                p.grad
                for n, p in model.named_parameters()
                if not n.startswith(("video_aggregator", "video_blocks"))
            ]

    conversations = [video_qa_messages(s) for s in _clips(16, seed=2)]  # frames given in memory
    recipe = _recipe(model_dir, {"shards": "in-memory"}, steps=24, lr=1e-2)
    trainer = Trainer(
        recipe, output_dir=tmp_path, data={"video": conversations}, progress=False, callbacks=[inspect]
    )
    (result,) = trainer.run()
    assert seen["trainable"] == ["video_adapter"]
    assert seen["frozen_grads"] and all(g is None for g in seen["frozen_grads"])
    first, last = sum(result.losses[:4]) / 4, sum(result.losses[-4:]) / 4
    assert last < 0.7 * first, result.losses
    before = MultimodalModel.from_pretrained(model_dir).state_dict()
    after = MultimodalModel.from_pretrained(tmp_path / "video" / "model").state_dict()
    changed = {k.split(".")[0] for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"video_aggregator", "video_blocks"}


def test_cached_features_give_the_losses_of_pixels_and_the_stage_runs_without_pixels(
    model_dir, shards, tmp_path
):
    result = cache_features(model_dir, shards, tmp_path / "cached", batch_size=3, progress=False)
    source = sorted(p.name for p in shards.glob("*.tar"))
    assert len(source) >= 2 and list(result.shards) == source
    assert result.samples == result.videos == 10 and not result.skipped
    manifest = json.loads((tmp_path / "cached" / "manifest.json").read_text())
    model = MultimodalModel.from_pretrained(model_dir)
    assert manifest["features"]["backbone_digest"] == model.backbone.digest()
    assert manifest["features"]["fingerprint"]["num_frames"] == FRAMES

    # The stage's batches carry frame tokens and no pixels ...
    pre = features_preprocessor(model)
    pre.video_features_fingerprint = features_fingerprint(model, pre)
    batch = StageData([DataSource(shards=str(tmp_path / "cached"))], pre, batch_size=4).next_batch()
    assert batch["video"].pixel_values is None
    assert batch["video"].features.shape[:3] == (4, 1, FRAMES)
    # ... that matter: the open video gates make the loss depend on them.
    with torch.no_grad():
        loss = model(**batch).loss
        zeros = torch.zeros_like(batch["video"].features)
        blank = model(**{**batch, "video": batch["video"].replace(features=zeros)}).loss
    assert abs(float(loss) - float(blank)) > 1e-3

    # The trainer's losses on the cached shards are those on the mp4 shards, step by step.
    losses = {}
    for name, data in (("pixels", shards), ("cached", tmp_path / "cached")):
        recipe = _recipe(model_dir, [{"shards": str(data)}], steps=3)
        (run,) = Trainer(recipe, output_dir=tmp_path / name, progress=False).run()
        losses[name] = run.losses
    assert len(losses["cached"]) == 3
    assert abs(losses["cached"][0] - losses["pixels"][0]) < 1e-6, losses
    torch.testing.assert_close(
        torch.tensor(losses["cached"]), torch.tensor(losses["pixels"]), atol=1e-5, rtol=0
    )

    # A features member is a plain safetensors file with its fingerprint in the header.
    key, fields, _ = next(read_shard(str(tmp_path / "cached" / source[0]), DataCounters()))
    assert sorted(fields) == ["json", "mp4.safetensors"]
    tokens, fingerprint = read_features(fields["mp4.safetensors"])
    assert tokens.dtype == torch.float32 and tokens.shape[0] == FRAMES
    assert fingerprint == manifest["features"]["fingerprint"]


def test_stale_or_uncheckable_features_are_refused(model_dir, shards, tmp_path):
    cache_features(model_dir, shards, tmp_path / "cached", progress=False)
    cached = [{"shards": str(tmp_path / "cached")}]
    # Another projector: the frame tokens it would give are not the cached ones.
    other = MultimodalModel.from_pretrained(model_dir)
    with torch.no_grad():
        other.projector.bias.add_(0.01)
    other.save_pretrained(tmp_path / "other", copy_backbone=True)
    with pytest.raises(StaleFeaturesError, match="another image encoder / projector"):
        Trainer(_recipe(tmp_path / "other", cached, steps=1), output_dir=tmp_path / "a", progress=False).run()
    # Other frame settings.
    with pytest.raises(StaleFeaturesError, match="sample 8 frames per clip, this stage samples 16"):
        Trainer(
            _recipe(model_dir, cached, steps=1, num_frames=16), output_dir=tmp_path / "b", progress=False
        ).run()
    # A stage that trains the projector changes the frame tokens at every step: none are read.
    with pytest.raises(StaleFeaturesError, match="cannot be checked"):
        Trainer(
            _recipe(model_dir, cached, steps=1, trainable=("video_adapter", "projector.*")),
            output_dir=tmp_path / "c",
            progress=False,
        ).run()
    # A preprocessor that was not told which encoder it serves cannot check them.
    model = MultimodalModel.from_pretrained(model_dir)
    data = StageData([DataSource(shards=str(tmp_path / "cached"))], model.preprocessor, batch_size=2)
    with pytest.raises(StaleFeaturesError, match="cannot be checked"):
        data.next_batch()


def _cut_member_in_half(shards, name: str) -> None:
    """Rewrite the shard holding member ``name`` with that member cut off mid-stream."""
    import io
    import tarfile

    for path in sorted(shards.glob("*.tar")):
        with tarfile.open(path) as tar:
            members = [(m, tar.extractfile(m).read()) for m in tar.getmembers() if m.isfile()]
        if not any(m.name.endswith(name) for m, _ in members):
            continue
        with tarfile.open(path, "w") as tar:
            for info, data in members:
                if info.name.endswith(name):
                    data = data[: len(data) // 2]
                    info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        return
    raise AssertionError(f"no shard in {shards} holds {name}")


def test_a_corrupt_video_is_skipped_and_counted_in_training_and_in_caching(model_dir, tmp_path):
    write_video_qa_folder(_clips(8, seed=3), tmp_path / "raw")
    clip = sorted((tmp_path / "raw").glob("*.mp4"))[2]
    pack(tmp_path / "raw", tmp_path / "shards")  # `mm data pack` refuses a broken clip: break it after
    _cut_member_in_half(tmp_path / "shards", f"{clip.stem}.mp4")
    data = [{"shards": str(tmp_path / "shards"), "max_bad_fraction": 0.2}]
    (run,) = Trainer(_recipe(model_dir, data, steps=2), output_dir=tmp_path / "out", progress=False).run()
    assert run.steps == 2
    (counters,) = json.loads((tmp_path / "out" / "video" / "summary.json").read_text())["data"]
    assert counters["bad_by_reason"] == {"decode failed (VideoError)": 1}
    assert clip.stem in counters["examples"]["decode failed (VideoError)"]

    result = cache_features(model_dir, tmp_path / "shards", tmp_path / "cached", progress=False)
    assert result.samples == 7 and result.skipped == {"decode failed (VideoError)": 1}
    manifest = json.loads((tmp_path / "cached" / "manifest.json").read_text())
    assert manifest["features"]["skipped"] == {"decode failed (VideoError)": 1}


def test_mm_data_cache_features_command(model_dir, shards, tmp_path, capsys):
    from mm.cli import main

    out = tmp_path / "cached"
    assert main(["data", "cache-features", str(model_dir), str(shards), str(out), "--batch-size", "4"]) == 0
    assert "cached 10 videos of 10 samples" in capsys.readouterr().out
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["samples"] == 10 and manifest["features"]["fingerprint"]["num_frames"] == FRAMES
    # An earlier cache is kept unless --overwrite; a source that holds features already is refused.
    assert main(["data", "cache-features", str(model_dir), str(shards), str(out)]) == 2
    assert "overwrite" in capsys.readouterr().err
    assert main(["data", "cache-features", str(model_dir), str(out), str(tmp_path / "again")]) == 2
    assert "already holds cached features" in capsys.readouterr().err
