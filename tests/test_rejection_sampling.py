"""Rejection sampling (``mm sample``, mm.training.rejection): best-of-N kept, batch- and resume-independent."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch

from mm import ModelConfig, MultimodalModel
from mm.datasets import ImageProcessor
from mm.datasets.preprocessing import Preprocessor
from mm.datasets.shards import pack
from mm.datasets.webdata import DataCounters, expand_shards, read_shard
from mm.model.reward import attach_reward_head
from mm.text_backbone import ByteTokenizer
from mm.training.rejection import RejectionError, _metric, answer_seed, rejection_sample

N = 3
TOKENS = 4


def _tiny(seed: int) -> MultimodalModel:
    torch.manual_seed(seed)
    model = MultimodalModel(ModelConfig.preset("tiny")).eval()
    with torch.no_grad():  # never stops by itself; images matter (open, random gates)
        model.backbone.lm_head.weight[[257, 264, 265]] = 0.0
        for block in model.image_blocks:
            block.attn_gate.uniform_(0.5, 1.5)
            block.mlp_gate.uniform_(0.5, 1.5)
    model.preprocessor = Preprocessor(ByteTokenizer(), ImageProcessor(tile_size=28, max_tiles=4))
    return model


@pytest.fixture(scope="module")
def policy():
    return _tiny(0)


@pytest.fixture(scope="module")
def stopping():
    """A policy whose answers end after varying lengths (some rows leave and others join mid-decode)."""
    model = _tiny(0)
    torch.manual_seed(5)
    with torch.no_grad():
        for i in model.stop_token_ids:
            model.backbone.lm_head.weight[i] = torch.randn(model.backbone.lm_head.weight.shape[1]) * 0.4
    return model


@pytest.fixture(scope="module")
def reward():
    model = _tiny(1)
    attach_reward_head(model)
    with torch.no_grad():
        model.reward_head.weight.normal_(0, 1.0)
        model.reward_head.bias.normal_(0, 1.0)
    return model


def _png(seed: int, size=(28, 30)) -> bytes:
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _shards(folder: Path, references: dict[str, str] | None = None, *, count=5, no_reference=()) -> Path:
    """Pack ``count`` samples (images on the even ones) into several shards; returns the shard folder."""
    src = folder / "src"
    src.mkdir(parents=True)
    lines = []
    for i in range(count):
        key = f"q{i:02d}"
        content: list = [{"type": "text", "text": f"Question {i}: what is shown?"}]
        if i % 2 == 0:
            (src / f"{key}.png").write_bytes(_png(i))
            content.insert(0, {"type": "image", "image": f"{key}.png"})
        messages = [{"role": "user", "content": content}]
        if i not in no_reference:
            answer = (references or {}).get(key, f"answer {i}")
            messages.append({"role": "assistant", "content": answer})
        lines.append(json.dumps({"key": key, "messages": messages}))
    (src / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    pack(src / "manifest.jsonl", folder / "shards", shard_bytes=6_000)
    return folder / "shards"


def _samples(folder: Path) -> list[dict]:
    out = []
    for url in expand_shards(folder):
        for key, fields, _ in read_shard(url, DataCounters()):
            out.append(
                {"key": key, **json.loads(fields["json"]), "media": sorted(f for f in fields if f != "json")}
            )
    return out


def _progress(out: Path) -> dict[str, dict]:
    lines = (out / "progress.jsonl").read_text().splitlines()
    assert "settings" in json.loads(lines[0])
    return {row["key"]: row for row in map(json.loads, lines[1:])}


def _tar_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.tar"))}


def _run(model, shards, out, **kw):
    settings = dict(
        n=N, temperature=1.5, top_p=0.95, seed=7, batch_size=4, max_new_tokens=TOKENS, progress=False
    )
    settings.update(kw)
    return rejection_sample(model, shards, out, **settings)


def test_kept_answer_is_the_best_by_the_metric(tmp_path, policy, reward):
    shards = _shards(tmp_path / "a")
    assert len(expand_shards(shards)) > 1  # several shards, read in order
    first = _run(policy, shards, tmp_path / "out1", reward_model=reward)
    answers = {k: row["answers"] for k, row in _progress(tmp_path / "out1").items()}
    assert first["prompts"] == 5 and all(len(a) == N for a in answers.values())
    # Make answer 1 of each prompt its reference: the same keys and prompts give the same answers,
    # and exact match must keep that answer (the first exact one, should an earlier one equal it).
    refs = {k: a[1].strip() for k, a in answers.items()}
    assert all(refs.values()), "a blank candidate; pick another seed"
    shards_b = _shards(tmp_path / "b", refs)
    summary = _run(policy, shards_b, tmp_path / "out2", metric="exact")
    rows = _progress(tmp_path / "out2")
    kept = {s["key"]: s for s in _samples(tmp_path / "out2" / "sft")}
    assert summary["sft"] == len(kept) == 5 and summary["mean_best"] == 1.0
    exact = _metric("exact")
    for key, row in rows.items():
        assert row["answers"] == answers[key]  # the scorer does not change the sampling
        recomputed = [exact(a, refs[key]) for a in row["answers"]]
        assert row["scores"] == recomputed
        best = recomputed.index(max(recomputed))
        assert best <= 1 and row["answers"][best].strip() == refs[key]
        messages = kept[key]["messages"]
        assert messages[-1] == {"role": "assistant", "content": row["answers"][best]}
        assert kept[key]["meta"]["answer"] == best
    # the prompt (with its image) travels with the kept answer
    assert kept["q00"]["media"] == ["0.png"] and kept["q01"]["media"] == []
    assert summary["mean_first"] == pytest.approx(sum(r["scores"][0] for r in rows.values()) / 5)
    # ANLS and relaxed scores are mm.eval's functions, higher is better; WER negated
    assert _metric("anls")("kitten", "sitting") == pytest.approx(1 - 3 / 7)
    assert _metric("wer")("a b c", "a b d") == pytest.approx(-1 / 3)


def test_answers_do_not_depend_on_batch_size_and_pairs_are_written(tmp_path, stopping, reward):
    shards = _shards(tmp_path / "a")
    kw = dict(reward_model=reward, pairs=True, max_new_tokens=8)
    one = _run(stopping, shards, tmp_path / "b1", batch_size=1, **kw)
    four = _run(stopping, shards, tmp_path / "b4", batch_size=4, **kw)
    rows1, rows4 = _progress(tmp_path / "b1"), _progress(tmp_path / "b4")
    assert rows1 == rows4  # the same answers, and the same scores (one reward batch per prompt)
    lengths = {len(a) for r in rows1.values() for a in r["answers"]}
    assert len(lengths) > 2  # answers of several lengths: rows left and joined mid-decode
    assert len({a for r in rows1.values() for a in r["answers"]}) > N  # really sampled
    assert _tar_bytes(tmp_path / "b1" / "sft") == _tar_bytes(tmp_path / "b4" / "sft")
    assert {k: v for k, v in one.items() if k != "settings"} == {
        k: v for k, v in four.items() if k != "settings"
    }
    # scores are the reward model's own, and pairs are best / worst as preference samples
    (p,) = [q for q in _samples(shards) if q["key"] == "q01"]
    conversation = [p["messages"][0], {"role": "assistant", "content": rows1["q01"]["answers"][1]}]
    assert reward.score(conversation) == pytest.approx(rows1["q01"]["scores"][1], abs=1e-5)
    pairs = {s["key"]: s for s in _samples(tmp_path / "b1" / "pairs")}
    assert one["pairs"] == len(pairs) > 0 and one["pairs"] + one["skipped_tied"] == one["sft"]
    for key, sample in pairs.items():
        scores, answers = rows1[key]["scores"], rows1[key]["answers"]
        usable = [j for j in range(N) if answers[j].strip()]  # blank answers are never kept
        assert sample["chosen"] == answers[max(usable, key=lambda j: (scores[j], -j))]
        assert sample["rejected"] == answers[min(usable, key=lambda j: (scores[j], j))]
        assert sample["messages"][-1]["role"] == "user" and "edited" not in sample


def test_interrupted_and_resumed_equals_one_go(tmp_path, stopping, reward):
    policy = stopping
    shards = _shards(tmp_path / "a", count=6)
    _run(policy, shards, tmp_path / "whole", reward_model=reward, pairs=True, batch_size=4)

    class Stop(Exception):
        pass

    def stop(done):
        if done >= 2:
            raise Stop

    out = tmp_path / "resumed"
    with pytest.raises(Stop):
        _run(policy, shards, out, reward_model=reward, pairs=True, batch_size=2, on_saved=stop)
    assert 2 <= len(_progress(out)) < 6 and not (out / "sft").exists()
    with open(out / "progress.jsonl", "ab") as f:  # a write torn by the interruption
        f.write(b'{"index": 5, "key": "q0')
    with pytest.raises(RejectionError, match="--resume"):
        _run(policy, shards, out, reward_model=reward, pairs=True)
    with pytest.raises(RejectionError, match="other settings"):
        _run(policy, shards, out, reward_model=reward, pairs=True, seed=8, resume=True)
    _run(policy, shards, out, reward_model=reward, pairs=True, batch_size=3, resume=True)
    for name in ("sft", "pairs"):
        assert _tar_bytes(out / name) == _tar_bytes(tmp_path / "whole" / name)
        assert _tar_bytes(out / name)
    assert _progress(out) == _progress(tmp_path / "whole")
    lines = (out / "progress.jsonl").read_text().splitlines()
    assert len(lines) == 1 + 6  # the finished prompts were not sampled again (the torn line is gone)
    # a finished result is kept unless overwritten
    with pytest.raises(RejectionError, match="overwrite"):
        _run(policy, shards, out, reward_model=reward, pairs=True, resume=True)
    summary = _run(policy, shards, out, reward_model=reward, overwrite=True, n=2)
    assert summary["settings"]["n"] == 2 and not (out / "pairs").exists()


def test_bad_inputs_are_refused_before_anything_is_written(tmp_path, policy, reward):
    shards = _shards(tmp_path / "a", no_reference=(3,))
    out = tmp_path / "out"
    with pytest.raises(RejectionError, match="key 'q03'.*no reference"):
        _run(policy, shards, out, metric="anls")
    assert not out.exists()
    (tmp_path / "empty").mkdir()
    with pytest.raises(RejectionError, match="no .tar shards"):
        _run(policy, tmp_path / "empty", out, metric="anls")
    with pytest.raises(RejectionError, match="n must be"):
        _run(policy, shards, out, reward_model=reward, n=0)
    with pytest.raises(RejectionError, match="exactly one"):
        _run(policy, shards, out, reward_model=reward, metric="exact")
    with pytest.raises(RejectionError, match="unknown metric"):
        _run(policy, shards, out, metric="rouge")
    assert not out.exists()
    # without a metric, a prompt with no reference is fine
    assert _run(policy, shards, out, reward_model=reward, n=1)["prompts"] == 5


def test_answer_seed_is_stable_and_distinct():
    assert answer_seed(0, "q00", 0) == answer_seed(0, "q00", 0)
    assert len({answer_seed(s, k, j) for s in (0, 1) for k in ("a", "b") for j in range(3)}) == 12
    assert all(0 <= answer_seed(3, "k", j) < 2**63 for j in range(10))


def test_cli(tmp_path, policy, capsys):
    from mm.cli import main

    policy.save_pretrained(tmp_path / "model", copy_backbone=True)
    shards = _shards(tmp_path / "a", count=3)
    argv = ["sample", str(tmp_path / "model"), str(shards), str(tmp_path / "out"), "--n", "2"]
    argv += ["--temperature", "1.5", "--top-p", "0.9", "--seed", "3", "--metric", "anls", "--pairs"]
    argv += ["--batch-size", "3", "--max-new-tokens", "3", "--device", "cpu", "--no-progress"]
    assert main(argv) == 0
    summary = json.loads((tmp_path / "out" / "sample.json").read_text())
    assert summary["prompts"] == 3 and summary["settings"]["scorer"] == "metric:anls"
    assert summary["sft"] == len(_samples(tmp_path / "out" / "sft"))
    assert main(argv) == 2
    assert "finished result" in capsys.readouterr().err
    assert main([*argv, "--overwrite"]) == 0
    bad = _shards(tmp_path / "b", count=2, no_reference=(1,))
    assert (
        main(["sample", str(tmp_path / "model"), str(bad), str(tmp_path / "out2"), "--metric", "exact"]) == 2
    )
    assert "no reference" in capsys.readouterr().err and not (tmp_path / "out2").exists()


def test_folder_packed_shards_are_sampled_and_repacked(tmp_path, policy):
    """A folder sample's image member is named by its extension alone (``q00.png`` -> field ``png``):
    the kept samples must still pack, image and all."""
    src = tmp_path / "src"
    src.mkdir()
    for i in range(3):
        (src / f"q{i:02d}.png").write_bytes(_png(i))
        messages = [
            {
                "role": "user",
                "content": [{"type": "image", "image": f"q{i:02d}.png"}, {"type": "text", "text": "What?"}],
            },
            {"role": "assistant", "content": f"answer {i}"},
        ]
        (src / f"q{i:02d}.json").write_text(json.dumps({"messages": messages}))
    pack(src, tmp_path / "shards")
    summary = _run(policy, tmp_path / "shards", tmp_path / "out", metric="exact")
    assert summary["sft"] == 3
    images = {}
    for url in expand_shards(tmp_path / "out" / "sft"):
        for _, fields, _ in read_shard(url, DataCounters()):
            (image,) = [v for f, v in fields.items() if f != "json"]
            images[json.loads(fields["json"])["messages"][-1]["content"]] = image
    assert len(images) == 3
    assert sorted(images.values()) == sorted(_png(i) for i in range(3))  # the images came along
