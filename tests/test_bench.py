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

from mm.bench.run import (
    SIZES,
    WRITTEN_MARKER,
    _reusable_checkpoint,
    decode_bytes,
    run_worker,
    targets_for,
    train_step_flops,
)
from mm.text_backbone.greedy_head import ScreenedHead

TINY = SIZES["tiny"]


def _tiny_bench(out, workdir, *extra: str) -> subprocess.CompletedProcess:
    """``mm bench --size tiny`` writing ``out``, its checkpoint in ``workdir``; must succeed."""
    command = ["--size", "tiny", "--out", str(out), "--workdir", str(workdir), *extra]
    proc = subprocess.run(
        [sys.executable, "-m", "mm.cli", "bench", *command], capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """One real tiny run: (stdout, results JSON, the folder holding its checkpoint folder ``work``)."""
    root = tmp_path_factory.mktemp("bench")
    proc = _tiny_bench(root / "results.json", root / "work", "--serve", "--threads", "2")
    return proc.stdout, json.loads((root / "results.json").read_text()), root


def test_results_json_has_the_documented_keys(bench):
    _, report, _ = bench
    for key in (
        "schema",
        "command",
        "config",
        "versions",
        "hardware",
        "matmul_peak",
        "bandwidth",
        "flops",
        "roofline",
        "results",
        "table",
    ):
        assert key in report, key
    assert report["config"]["size"]["name"] == "tiny"
    assert {"torch", "transformers", "mm", "python"} <= set(report["versions"])
    assert report["hardware"]["cpu"] and report["hardware"]["cpu_cores"] >= 1
    assert set(report["results"]) == {"train", "decode", "serve", "packing"}
    assert set(report["results"]["train"]) == {"mm", "mm_hf_call", "hf"}
    assert set(report["results"]["decode"]) == {"mm", "hf"}
    assert set(report["results"]["serve"]) == {"mm"}


def test_mm_loss_is_hugging_faces_loss_on_the_same_batch(bench):
    _, report, _ = bench
    mm, hf = report["results"]["train"]["mm"], report["results"]["train"]["hf"]
    assert math.isfinite(mm["first_loss"]) and mm["first_loss"] > 0
    assert mm["first_loss"] == pytest.approx(hf["first_loss"], rel=1e-5, abs=1e-5)
    # Both train the image encoder, projector and cross-attention layers, nothing else.
    assert mm["trainable_params"] == hf["trainable_params"] > 0
    assert report["comparison"]["trainable_params_diff"] == 0
    # Called as Hugging Face's users call it, mm computes the same loss and trains the same set.
    call = report["results"]["train"]["mm_hf_call"]
    assert call["first_loss"] == pytest.approx(hf["first_loss"], rel=1e-5, abs=1e-5)
    assert call["trainable_params"] == hf["trainable_params"]
    assert report["comparison"]["train_hf_call_speedup"] > 0


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
    for key in (
        "train_speedup",
        "decode_speedup",
        "train_memory_ratio",
        "prefill_speedup",
        "generate_speedup",
    ):
        assert report["comparison"][key] > 0
    bandwidth = report["bandwidth"]
    assert bandwidth["bytes_per_s"] > 0 and len(bandwidth["runs"]) == 2
    assert bandwidth["bytes_per_s"] == max(r["bytes_per_s"] for r in bandwidth["runs"])
    roof = report["roofline"]
    assert roof["bytes_per_token"] == decode_bytes(TINY, "fp32")
    assert roof["tokens_per_s"] == pytest.approx(bandwidth["bytes_per_s"] / roof["bytes_per_token"]["total"])
    for impl in ("mm", "hf"):
        tokens_per_s = report["results"]["decode"][impl]["decode_tokens_per_s"]
        assert roof["fraction"][impl] == pytest.approx(tokens_per_s / roof["tokens_per_s"])
    # mm's own bytes (CPU, fp32): the output head's fp32 matrix (512 x 64) read as its int8 screen,
    # whose rows hold a scale and two bound terms beside the 64 int8 values (more with oneDNN's fp32 scales).
    kernel = report["results"]["decode"]["mm"]["screen_kernel"]
    assert ScreenedHead.kernel_is_bounded(kernel, 64)  # the worker's choice (it also times them)
    row = {"onednn": 64 + 12, "int8pack": 64 + 10}[kernel]
    assert roof["mm_bytes_per_token"] == decode_bytes(TINY, "fp32")["total"] - 4 * 512 * 64 + 512 * row
    mm_rate = report["results"]["decode"]["mm"]["decode_tokens_per_s"]
    assert roof["mm_fraction"] == pytest.approx(
        mm_rate * roof["mm_bytes_per_token"] / bandwidth["bytes_per_s"]
    )


def test_every_target_is_in_the_table_and_json_with_its_verdict(bench):
    _, report, _ = bench
    targets = targets_for(TINY)
    rows = report["table"]
    with_target = {row["figure"]: row for row in rows if row["target"] is not None}
    assert sorted(row["target"] for row in with_target.values()) == sorted(targets.values())
    for row in with_target.values():
        assert row["ratio"] > 0, row
        low = row["better"] == "low"
        assert row["met"] == (row["ratio"] <= row["target"] if low else row["ratio"] >= row["target"])
    cmp = report["comparison"]
    speed = next(r for r in rows if r["figure"].startswith("train step, s (trainer"))
    assert speed["ratio"] == cmp["train_speedup"]
    assert speed["ratio"] == pytest.approx(speed["hf"] / speed["mm"])


def test_packing_figure_is_packed_over_padded_tokens_per_s(bench):
    _, report, _ = bench
    packing = report["results"]["packing"]["mm"]
    tps = packing["tokens_per_s"]
    assert packing["num_samples"] == 16 and packing["embed_dim"] == 64  # the tiny size's settings
    assert tps["packed"] == pytest.approx(packing["real_tokens"] / packing["seconds"]["packed"])
    assert report["comparison"]["packing_speedup"] == pytest.approx(tps["packed"] / tps["padded"])
    row = next(r for r in report["table"] if r["figure"].startswith("train tokens/s packed"))
    assert (row["mm"], row["ratio"], row["target"]) == (tps["packed"], packing["speedup"], 1.8)
    # The same padded batches as mm runs them by default (unpadded), against the padding computed.
    assert tps["unpadded"] == pytest.approx(packing["real_tokens"] / packing["seconds"]["unpadded"])
    assert packing["unpadded_speedup"] == pytest.approx(tps["unpadded"] / tps["padded"])
    row = next(
        r for r in report["table"] if r["figure"].startswith("train tokens/s padded batches, unpadded")
    )
    assert (row["mm"], row["ratio"], row["target"]) == (tps["unpadded"], packing["unpadded_speedup"], None)


def test_serve_batches_concurrent_clients_and_answers_as_alone(bench):
    _, report, _ = bench
    serve = report["results"]["serve"]["mm"]
    assert [lv["clients"] for lv in serve["levels"]] == [1, 4, 8, 16]
    for lv in serve["levels"]:
        # Every request decodes exactly max_tokens (the model cannot stop early), batched or alone.
        assert lv["tokens"] == serve["requests"] * serve["max_tokens"] == 16 * 8
        assert lv["tokens_per_s"] > 0 and lv["ttft_median_s"] > 0
        assert lv["same_answers_as_alone"] is True
        # The level reported is the median of its repeated runs.
        runs = lv["tokens_per_s_runs"]
        assert len(runs) == serve["repeats"] == 3 and lv["tokens_per_s"] == sorted(runs)[1]
    assert serve["speedup"]["1"] == 1.0
    mid = serve["mid_batch"]
    assert mid["arrived_mid_batch"] is True
    assert mid["ratio"] == pytest.approx(mid["mid_batch_s"] / mid["alone_s"])
    assert len(mid["ratio_runs"]) == 3 and mid["ratio"] == sorted(mid["ratio_runs"])[1]
    assert report["comparison"]["serve_speedup_8"] == serve["speedup"]["8"]


def test_roofline_bytes_match_a_hand_count_for_the_tiny_size():
    # tiny: d 64, 4 heads of 16, 2 KV heads, MLP 128, vocabulary 512; 10 layers of which 2 are
    # cross-attention (8 backbone layers, 2 blocks); prompt 8, 4 new tokens; 4 tiles of 2x2 patches + 1.
    layer = 64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 128 + 2 * 64  # q, k, v, o, MLP, norms
    block = 64 * 64 + 64 * 64 + 3 * 64 * 128 + 2 * 64 + 2 * 16 + 2  # q, o, MLP, norms, q/k norms, gates
    weights = 8 * layer + 2 * block + 64 + 512 * 64 + 64  # final norm, head, one embedding row
    # Decode tokens 1..3 read 9, 10 and 11 positions: 10 on average, K and V of 2 x 16 in 8 layers.
    kv = 10 * 2 * 2 * 16 * 8
    cross = 2 * 2 * 2 * 16 * (4 * 5)
    got = decode_bytes(TINY, "fp32")
    assert got["weights"] == 4 * weights == 1578768
    assert got["kv_cache"] == 4 * kv
    assert got["cross_kv"] == 4 * cross
    assert got["total"] == 4 * (weights + kv + cross)
    assert decode_bytes(TINY, "bf16")["total"] == 2 * (weights + kv + cross)


def test_roofline_weights_are_the_checkpoints_parameters_a_decoded_token_reads():
    import torch
    from transformers import MllamaConfig, MllamaForConditionalGeneration

    for name in ("tiny", "small-4k"):
        size = SIZES[name]
        config = MllamaConfig(
            vision_config=dict(size.vision),
            text_config=size.hf_text_config(),
            image_token_index=size.text["vocab_size"],
        )
        with torch.device("meta"):
            hf = MllamaForConditionalGeneration(config)
        read = 0
        for key, p in hf.named_parameters():
            if "vision_model" in key or "multi_modal_projector" in key:
                continue  # run once at prefill
            if "cross_attn.k_proj" in key or "cross_attn.v_proj" in key:
                continue  # the image's keys/values are cached at prefill
            read += p.shape[1] if "embed_tokens" in key else p.numel()  # one embedding row
        assert decode_bytes(size, "fp32")["weights"] == 4 * read, name


def test_small_4k_is_small_with_a_4096_token_vocabulary():
    small, small4k = SIZES["small"], SIZES["small-4k"]
    assert small4k.text["vocab_size"] == 4096
    differs = {k for k in small.text if small.text[k] != small4k.text[k]}
    assert differs == {"vocab_size", "bos_token_id", "eos_token_id", "pad_token_id"}
    assert small4k.vision == small.vision and small4k.train_lengths == small.train_lengths
    assert targets_for(small4k)["generate_speedup"] == 1.5 and "generate_speedup" not in targets_for(small)
    # Memory, decode and prefill targets are the issues' for the Llama 3 vocabulary only.
    for key in ("train_memory_ratio", "decode_speedup", "prefill_speedup"):
        assert key in targets_for(small) and key not in targets_for(small4k)


def test_bandwidth_worker_counts_bytes_moved(tmp_path):
    spec = {"task": "bandwidth", "size": "tiny", "device": "cpu", "dtype": "fp32", "stream_elements": 2**16}
    result = run_worker({**spec, "trials": 3}, timeout=120, workdir=tmp_path)
    assert set(result["best"]) == {"copy", "triad"}
    assert result["bytes_per_s"] == max(result["best"].values()) > 0
    assert len(result["raw_bytes_per_s"]["triad"]) == 3


def test_the_table_prints_every_figure(bench):
    stdout, _, _ = bench
    for label in (
        "train step, s (trainer's call",
        "train step, s (HF-style call",
        "train peak memory",
        "train MFU",
        "prefill, s",
        "decode tokens/s",
        "decode bytes/token",
        "memory bandwidth",
        "decode roofline",
        "decode fraction of roofline",
        "serve tokens/s, 8 clients",
        "serve TTFT mid-batch",
    ):
        assert label in stdout
    assert "target" in stdout.splitlines()[3 if "warning" in stdout else 2]
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


def test_serve_figures_are_the_median_run_and_the_worse_middle_of_an_even_count():
    from mm.bench.serve import _median_run

    runs = [{"clients": 8, "tokens_per_s": v} for v in (300.0, 100.0, 200.0)]
    assert _median_run(runs, "tokens_per_s") == {**runs[2], "tokens_per_s_runs": [300.0, 100.0, 200.0]}
    four = [{"ratio": v, "arrived_mid_batch": True} for v in (1.0, 4.0, 2.0, 3.0)]
    assert _median_run(four, "ratio", lower_is_better=True)["ratio"] == 3.0  # a ratio: the higher middle
    even = [{"tokens_per_s": v} for v in (1.0, 4.0, 2.0, 3.0)]
    assert _median_run(even, "tokens_per_s")["tokens_per_s"] == 2.0  # a throughput: the lower middle
    failed = {"clients": 8, "error": "boom"}
    assert _median_run([runs[0], failed], "tokens_per_s") == failed


def test_a_gpu_decode_reports_whether_its_cuda_graph_gave_the_eager_tokens():
    from mm.bench.run import summarise_decode

    def run(graph_tokens, eager_tokens):
        out = {"load_s": 1.0, "prefill_s": [0.1], "decode_s": [0.2], "tokens": graph_tokens}
        if eager_tokens is not None:  # what task_decode records for mm on a CUDA device
            out.update(
                cuda_graph=True, eager_tokens=eager_tokens, same_tokens_as_eager=graph_tokens == eager_tokens
            )
        return out

    cpu = summarise_decode([run([1, 2], None)], TINY, (1.0, 1.0), None)
    assert "cuda_graph" not in cpu and "same_tokens_as_eager" not in cpu
    alike = summarise_decode([run([1, 2], [1, 2]), run([1, 2], [1, 2])], TINY, (1.0, 1.0), None)
    assert alike["cuda_graph"] is True and alike["same_tokens_as_eager"] is True
    one_differs = summarise_decode([run([1, 2], [1, 2]), run([1, 2], [1, 3])], TINY, (1.0, 1.0), None)
    assert one_differs["same_tokens_as_eager"] is False
