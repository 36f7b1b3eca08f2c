"""``mm bench`` runs, and mm's figures come from real work: the same loss and tokens as Hugging Face.

Timings are not tested (they belong to the benchmark); only that the run completes, every figure is
a positive number, the JSON has its documented keys, the table prints, and failures are reported
per figure.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from mm.bench.run import SIZES, WRITTEN_MARKER, _reusable_checkpoint, run_worker, train_step_flops

TINY = SIZES["tiny"]


def _tiny_bench(out, workdir, *extra: str) -> subprocess.CompletedProcess:
    """``mm bench --size tiny`` writing ``out``, its checkpoint in ``workdir``; must succeed."""
    command = ["--size", "tiny", "--out", str(out), "--workdir", str(workdir), *extra]
    proc = subprocess.run(
        [sys.executable, "-m", "mm.cli", "bench", *command], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """One real tiny run: (stdout, results JSON, the folder holding its checkpoint folder ``work``)."""
    root = tmp_path_factory.mktemp("bench")
    proc = _tiny_bench(root / "results.json", root / "work")
    return proc.stdout, json.loads((root / "results.json").read_text()), root


def test_results_json_has_the_documented_keys(bench):
    _, report, _ = bench
    for key in ("schema", "command", "config", "versions", "hardware", "matmul_peak", "flops", "results"):
        assert key in report, key
    assert report["config"]["size"]["name"] == "tiny"
    assert {"torch", "transformers", "mm", "python"} <= set(report["versions"])
    assert report["hardware"]["cpu"] and report["hardware"]["cpu_cores"] >= 1
    assert set(report["results"]) == {"train", "decode"}
    for figure in ("train", "decode"):
        assert set(report["results"][figure]) == {"mm", "hf"}


def test_mm_loss_is_hugging_faces_loss_on_the_same_batch(bench):
    _, report, _ = bench
    mm, hf = report["results"]["train"]["mm"], report["results"]["train"]["hf"]
    assert math.isfinite(mm["first_loss"]) and mm["first_loss"] > 0
    assert mm["first_loss"] == pytest.approx(hf["first_loss"], rel=1e-5, abs=1e-5)
    # Both train the image encoder, projector and cross-attention layers, nothing else.
    assert mm["trainable_params"] == hf["trainable_params"] > 0
    assert report["comparison"]["trainable_params_diff"] == 0


def test_greedy_decoding_gives_hugging_faces_tokens(bench):
    _, report, _ = bench
    mm, hf = report["results"]["decode"]["mm"], report["results"]["decode"]["hf"]
    assert len(mm["tokens"]) == TINY.new_tokens
    assert mm["tokens"] == hf["tokens"]
    assert report["comparison"]["decode_same_tokens"] is True


def test_every_figure_is_a_positive_number_with_raw_timings(bench):
    _, report, _ = bench
    assert report["matmul_peak"]["flops_per_s"] > 0
    for impl in ("mm", "hf"):
        train = report["results"]["train"][impl]
        for key in ("seconds_per_step", "tokens_per_s", "peak_step_mb", "peak_process_mb", "mfu", "load_s"):
            assert train[key] > 0, (impl, key)
        steps = [s for run in train["runs"] for s in run["seconds"]]
        assert len(steps) == report["config"]["repeats"] * report["config"]["train_steps"]
        assert all(s > 0 for s in steps)
        decode = report["results"]["decode"][impl]
        for key in ("prefill_s", "decode_tokens_per_s", "prefill_mfu", "decode_mfu"):
            assert decode[key] > 0, (impl, key)
        assert len(decode["runs"][0]["prefill_s"]) == report["config"]["decode_runs"]
    for key in ("train_speedup", "decode_speedup", "train_memory_ratio"):
        assert report["comparison"][key] > 0


def test_the_table_prints_every_figure(bench):
    stdout, _, _ = bench
    for label in ("train step, s", "train peak memory", "train MFU", "prefill, s", "decode tokens/s"):
        assert label in stdout
    assert "error" not in stdout


def test_a_finished_checkpoint_in_workdir_is_reused_and_an_unfinished_one_is_not(bench, tmp_path):
    _, first, root = bench
    folder = root / "work" / "mllama-tiny-fp32"
    assert json.loads((folder / WRITTEN_MARKER).read_text())["params"] == first["checkpoint"]["params"]
    out = tmp_path / "again.json"
    proc = _tiny_bench(out, root / "work", "--figures", "decode")
    assert "reusing the tiny Mllama checkpoint" in proc.stderr
    again = json.loads(out.read_text())
    assert again["checkpoint"] == {"reused": True, "params": first["checkpoint"]["params"]}
    # Same weights: the same greedy tokens as the first run.
    assert again["results"]["decode"]["mm"]["tokens"] == first["results"]["decode"]["mm"]["tokens"]
    assert _reusable_checkpoint(folder, TINY, "bf16") is None  # another dtype: written anew
    assert _reusable_checkpoint(folder, SIZES["small"], "fp32") is None  # another size
    (folder / WRITTEN_MARKER).unlink()  # a write that never finished leaves no marker
    assert _reusable_checkpoint(folder, TINY, "fp32") is None


def test_flop_model_counts_backward_through_layers_below_the_first_block_only_when_asked():
    default = train_step_flops(TINY)
    assert train_step_flops(TINY, backward_from=0) > default
    depth = TINY.text["num_hidden_layers"] - len(TINY.text["cross_attention_layers"])
    assert train_step_flops(TINY, backward_from=depth) < default


def test_a_failing_worker_is_reported_not_raised(tmp_path):
    missing = {"task": "train", "impl": "mm", "size": "tiny", "device": "cpu", "dtype": "fp32", "steps": 1}
    result = run_worker({**missing, "folder": str(tmp_path / "absent")}, timeout=120, workdir=tmp_path)
    assert "error" in result and "absent" in result["error"]
    slow = {"task": "matmul", "size": "tiny", "device": "cpu", "dtype": "fp32", "matmul_n": 4096}
    assert run_worker(slow, timeout=0.5, workdir=tmp_path) == {"error": "timed out after 0.5 s"}


def test_missing_transformers_is_said_clearly():
    code = (
        "import sys; sys.modules['transformers'] = None; from mm.cli import main; sys.exit(main(['bench']))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "needs Hugging Face transformers" in proc.stderr


def test_11b_size_is_llama_3_2_11b_vision_for_both_implementations():
    import torch
    from transformers import MllamaConfig, MllamaForConditionalGeneration

    from mm.checkpoint.mllama import mllama_config
    from mm.model.multimodal import MultimodalModel

    size = SIZES["11b"]
    config = MllamaConfig(
        vision_config=dict(size.vision), text_config=size.hf_text_config(), image_token_index=128256
    )
    with torch.device("meta"):
        hf = MllamaForConditionalGeneration(config)
        ours = MultimodalModel(mllama_config(config.to_dict()))
    count = sum(p.numel() for p in hf.parameters())
    # meta-llama/Llama-3.2-11B-Vision's model.safetensors.index.json: total_size 21340441670 bytes of bf16.
    assert count == 21340441670 // 2
    assert sum(p.numel() for p in ours.parameters()) == count
    assert ours.config.cross_attention_layers == (3, 7, 11, 15, 19, 23, 27, 31)


def test_bench_subcommand_registers_on_the_mm_command():
    from mm.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(
        ["bench", "--size", "11b", "--device", "cuda", "--dtype", "bf16", "--repeats", "3"]
    )
    assert (args.size, args.device, args.dtype, args.repeats) == ("11b", "cuda", "bf16", 3)
    assert callable(args.func)
    with pytest.raises(SystemExit):
        parser.parse_args(["bench", "--repeats", "0"])
