"""The text backbone against Hugging Face's LlamaForCausalLM, on checkpoints transformers writes itself."""

from __future__ import annotations

import json
import math

import pytest
import torch
from mm_testing import make_hf_llama

from mm.text_backbone import CheckpointError, TextBackbone, TextConfig
from mm.text_backbone.key_maps import META_SHARD_DIM, permute_from_meta

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 10000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
}


def _logits_hf(hf, ids, **kw):
    with torch.no_grad():
        return hf(ids, **kw).logits


@pytest.mark.parametrize(
    "overrides",
    [
        pytest.param({}, id="plain-rope-gqa4"),
        pytest.param({"rope_parameters": LLAMA3_ROPE}, id="llama3-rope-past-original-context"),
        pytest.param({"num_key_value_heads": 8}, id="mha"),
        pytest.param({"num_key_value_heads": 1}, id="mqa"),
        pytest.param({"tie_word_embeddings": True}, id="tied"),
        pytest.param(
            {"head_dim": 16, "num_attention_heads": 4, "num_key_value_heads": 2}, id="explicit-head-dim"
        ),
    ],
)
def test_logits_match_transformers(tmp_path, overrides):
    hf = make_hf_llama(tmp_path, **overrides)
    bb = TextBackbone.from_pretrained(tmp_path)
    # 100 tokens: past the 32-token original context of the llama3-scaled case.
    ids = torch.randint(0, 300, (2, 100))
    with torch.no_grad():
        ours = bb(ids)
    assert ours.shape == (2, 100, 300)
    torch.testing.assert_close(ours, _logits_hf(hf, ids), atol=1e-4, rtol=0)


def test_sharded_bf16_checkpoint(tmp_path):
    hf = make_hf_llama(tmp_path, dtype=torch.bfloat16, max_shard_size="40KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    bb = TextBackbone.from_pretrained(tmp_path)
    assert bb.dtype == torch.bfloat16
    bb32 = TextBackbone.from_pretrained(tmp_path, dtype=torch.float32)
    # The reference, reading the same bf16 files, upcast to fp32.
    from transformers import LlamaForCausalLM

    ref = LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    del hf
    ids = torch.randint(0, 300, (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(bb32(ids), ref(ids).logits, atol=1e-4, rtol=0)
        # bf16 compute stays close to the fp32 reference.
        assert (bb(ids).float() - ref(ids).logits).abs().max() < 0.1


def test_padding_and_position_ids_match_transformers(tmp_path):
    hf = make_hf_llama(tmp_path, rope_parameters=LLAMA3_ROPE)
    bb = TextBackbone.from_pretrained(tmp_path)
    ids = torch.randint(3, 300, (2, 20))
    mask = torch.ones(2, 20, dtype=torch.long)
    mask[1, :7] = 0  # row 1 is left-padded by 7
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    ref = _logits_hf(hf, ids, attention_mask=mask, position_ids=pos)
    with torch.no_grad():
        ours = bb(ids, attention_mask=mask)  # positions derived from the mask by default
    torch.testing.assert_close(ours[0], ref[0], atol=1e-4, rtol=0)
    torch.testing.assert_close(ours[1, 7:], ref[1, 7:], atol=1e-4, rtol=0)
    # And a left-padded row equals the same tokens alone.
    with torch.no_grad():
        alone = bb(ids[1:, 7:])
    torch.testing.assert_close(ours[1, 7:], alone[0], atol=1e-5, rtol=0)


def test_kv_cache_decode_equals_full_recompute(tmp_path):
    make_hf_llama(tmp_path)
    bb = TextBackbone.from_pretrained(tmp_path)
    ids = torch.randint(0, 300, (3, 24))
    with torch.no_grad():
        full = bb(ids)
        cache = bb.new_cache(3, 24)
        parts = [bb(ids[:, :10], cache=cache), bb(ids[:, 10:16], cache=cache)]
        parts += [bb(ids[:, i : i + 1], cache=cache) for i in range(16, 24)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=0)


def test_inputs_embeds_equal_input_ids(tmp_path):
    make_hf_llama(tmp_path)
    bb = TextBackbone.from_pretrained(tmp_path)
    ids = torch.randint(0, 300, (2, 12))
    with torch.no_grad():
        assert torch.equal(bb(ids), bb(inputs_embeds=bb.embed_tokens(ids)))
    with pytest.raises(ValueError, match="exactly one"):
        bb(ids, inputs_embeds=bb.embed_tokens(ids))


def test_greedy_generation_equals_transformers(tmp_path):
    hf = make_hf_llama(tmp_path, rope_parameters=LLAMA3_ROPE, eos_token_id=2)
    bb = TextBackbone.from_pretrained(tmp_path)
    # Prompts of different lengths, left-padded as a batch.
    lengths = [9, 4, 13]
    prompts = [torch.randint(3, 300, (n,)) for n in lengths]
    width = max(lengths)
    ids = torch.full((3, width), 0)
    mask = torch.zeros(3, width, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = p
        mask[i, width - len(p) :] = 1
    ref = hf.generate(
        ids, attention_mask=mask, max_new_tokens=20, do_sample=False, pad_token_id=0, eos_token_id=[999]
    )[:, width:]
    ours = bb.generate(ids, attention_mask=mask, max_new_tokens=20, stop_token_ids=())
    assert torch.equal(ours, ref)
    # One at a time gives the same tokens as the batch.
    for i, p in enumerate(prompts):
        alone = bb.generate(p[None], max_new_tokens=20, stop_token_ids=())
        assert torch.equal(alone[0], ours[i])


def test_stop_tokens_and_sampling(tmp_path):
    make_hf_llama(tmp_path)
    bb = TextBackbone.from_pretrained(tmp_path)
    ids = torch.randint(3, 300, (2, 6))
    greedy = bb.generate(ids, max_new_tokens=12, stop_token_ids=())
    stop = int(greedy[0, 3])
    stopped = bb.generate(ids, max_new_tokens=12, stop_token_ids=(stop,))
    first = int((greedy[0] == stop).nonzero()[0])
    assert torch.equal(stopped[0, : first + 1], greedy[0, : first + 1])
    # Sampling is reproducible with a seed, varies without one fixed, and top_p -> 0 is greedy.
    a = bb.generate(ids, max_new_tokens=12, temperature=1.5, seed=7, stop_token_ids=())
    b = bb.generate(ids, max_new_tokens=12, temperature=1.5, seed=7, stop_token_ids=())
    c = bb.generate(ids, max_new_tokens=12, temperature=1.5, seed=8, stop_token_ids=())
    assert torch.equal(a, b) and not torch.equal(a, c)
    nucleus = bb.generate(ids, max_new_tokens=12, temperature=1.0, top_p=1e-6, seed=1, stop_token_ids=())
    assert torch.equal(nucleus, greedy)
    streamed = torch.stack(list(bb.stream(ids, max_new_tokens=12, stop_token_ids=())), dim=1)
    assert torch.equal(streamed, greedy)


def test_save_pretrained_loads_in_transformers(tmp_path):
    make_hf_llama(tmp_path / "src", tie_word_embeddings=True, rope_parameters=LLAMA3_ROPE)
    bb = TextBackbone.from_pretrained(tmp_path / "src")
    bb.save_pretrained(tmp_path / "out", max_shard_bytes=30_000)
    from transformers import LlamaForCausalLM

    ref = LlamaForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids = torch.randint(0, 300, (1, 50))
    with torch.no_grad():
        torch.testing.assert_close(bb(ids), ref(ids).logits, atol=1e-4, rtol=0)
    again = TextBackbone.from_pretrained(tmp_path / "out")
    assert again.digest() == bb.digest()


def _meta_rope_scores(wq, wk, x, num_heads, num_kv_heads, inv_freq):
    """Query-key scores the way Meta's reference computes them: interleaved pairs as complex numbers."""
    s = x.shape[0]
    q = (x @ wq.T).view(s, num_heads, -1)
    k = (x @ wk.T).view(s, num_kv_heads, -1)
    angles = torch.arange(s)[:, None].float() * inv_freq[None]
    rot = torch.polar(torch.ones_like(angles), angles)[:, None]  # [s, 1, hd/2]
    q = torch.view_as_real(torch.view_as_complex(q.reshape(s, num_heads, -1, 2)) * rot).flatten(2)
    k = torch.view_as_real(torch.view_as_complex(k.reshape(s, num_kv_heads, -1, 2)) * rot).flatten(2)
    k = k.repeat_interleave(num_heads // num_kv_heads, dim=1)
    return torch.einsum("qhd,khd->hqk", q, k)


def test_meta_layout_round_trip_and_rope_convention(tmp_path):
    hf = make_hf_llama(tmp_path / "hf", rope_parameters=LLAMA3_ROPE)
    bb = TextBackbone.from_pretrained(tmp_path / "hf")
    bb.save_pretrained(tmp_path / "meta", layout="meta")
    params = json.loads((tmp_path / "meta" / "params.json").read_text())
    assert params["use_scaled_rope"] and params["n_kv_heads"] == 2
    meta = TextBackbone.from_pretrained(tmp_path / "meta")
    ids = torch.randint(0, 300, (2, 60))
    with torch.no_grad():
        torch.testing.assert_close(meta(ids), _logits_hf(hf, ids), atol=1e-4, rtol=0)

    # The permutation is right, not merely self-inverse: scores computed with Meta's own complex
    # RoPE on Meta's stored weights equal those of mm's rotate-half RoPE on the converted weights.
    sd = torch.load(tmp_path / "meta" / "consolidated.00.pth", weights_only=True)
    wq, wk = sd["layers.0.attention.wq.weight"], sd["layers.0.attention.wk.weight"]
    x = torch.randn(7, 64)
    ref = _meta_rope_scores(wq, wk, x, 8, 2, bb._inv_freq)
    from mm.text_backbone.rope import apply_rope, rope_cos_sin

    q = (x @ permute_from_meta(wq, 8).T).view(1, 7, 8, 8).transpose(1, 2)
    k = (x @ permute_from_meta(wk, 2).T).view(1, 7, 2, 8).transpose(1, 2)
    cos, sin = rope_cos_sin(bb._inv_freq, torch.arange(7)[None], torch.float32)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin).repeat_interleave(4, dim=1)
    torch.testing.assert_close(torch.einsum("bhqd,bhkd->hqk", q, k), ref, atol=1e-4, rtol=1e-4)


def test_meta_model_parallel_shards(tmp_path):
    make_hf_llama(tmp_path / "hf")
    bb = TextBackbone.from_pretrained(tmp_path / "hf")
    bb.save_pretrained(tmp_path / "one", layout="meta")
    sd = torch.load(tmp_path / "one" / "consolidated.00.pth", weights_only=True)
    (tmp_path / "two").mkdir()
    (tmp_path / "two" / "params.json").write_text((tmp_path / "one" / "params.json").read_text())
    shards: list[dict] = [{}, {}]
    for name, t in sd.items():
        key = name.split(".", 2)[-1] if name.startswith("layers.") else name
        dim = META_SHARD_DIM[key]
        for i in range(2):
            shards[i][name] = t if dim is None else t.chunk(2, dim=dim)[i].clone()
    for i, shard in enumerate(shards):
        torch.save(shard, tmp_path / "two" / f"consolidated.{i:02d}.pth")
    two = TextBackbone.from_pretrained(tmp_path / "two")
    assert two.digest() == TextBackbone.from_pretrained(tmp_path / "one").digest()


def test_digest_detects_a_single_changed_bit(tmp_path):
    make_hf_llama(tmp_path)
    bb = TextBackbone.from_pretrained(tmp_path)
    d0 = bb.digest()
    assert d0 == TextBackbone.from_pretrained(tmp_path).digest()
    with torch.no_grad():
        w = bb.layers[1].mlp.up_proj.weight
        w.view(torch.int32)[3, 5] ^= 1  # flip the lowest mantissa bit of one weight
    assert bb.digest() != d0
    assert all(not p.requires_grad for p in bb.freeze().parameters())


# ---------------------------------------------------------------------- bad checkpoints
def test_missing_extra_and_misshaped_tensors_are_named(tmp_path):
    from safetensors.torch import load_file, save_file

    make_hf_llama(tmp_path)
    f = tmp_path / "model.safetensors"
    good = load_file(f)

    missing = dict(good)
    del missing["model.layers.2.mlp.down_proj.weight"]
    save_file(missing, f)
    with pytest.raises(CheckpointError, match=r"missing tensors \['layers\.2\.mlp\.down_proj\.weight'\]"):
        TextBackbone.from_pretrained(tmp_path)

    extra = dict(good, **{"model.layers.0.mlp.extra.weight": torch.zeros(2)})
    save_file(extra, f)
    with pytest.raises(
        CheckpointError, match=r"unexpected tensor 'layers\.0\.mlp\.extra\.weight' in .*model\.safetensors"
    ):
        TextBackbone.from_pretrained(tmp_path)

    shaped = dict(good, **{"model.norm.weight": torch.ones(65)})
    save_file(shaped, f)
    with pytest.raises(
        CheckpointError,
        match=r"'norm\.weight' in .*model\.safetensors has shape \(65,\); the config needs \(64,\)",
    ):
        TextBackbone.from_pretrained(tmp_path)


def test_corrupt_files_give_clear_errors(tmp_path):
    make_hf_llama(tmp_path)
    f = tmp_path / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])  # truncated download
    with pytest.raises(CheckpointError, match=r"cannot read .*model\.safetensors"):
        TextBackbone.from_pretrained(tmp_path)
    f.write_bytes(b"not a safetensors file at all")
    with pytest.raises(CheckpointError, match=r"cannot read .*model\.safetensors"):
        TextBackbone.from_pretrained(tmp_path)

    (tmp_path / "config.json").write_text("{ broken")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        TextBackbone.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mllama"}))
    with pytest.raises(CheckpointError, match="MultimodalModel"):
        TextBackbone.from_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="does not exist"):
        TextBackbone.from_pretrained(tmp_path / "nowhere")


def test_index_naming_a_missing_shard(tmp_path):
    make_hf_llama(tmp_path, max_shard_size="40KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    victim = sorted(set(index["weight_map"].values()))[-1]
    (tmp_path / victim).unlink()
    with pytest.raises(CheckpointError, match=f"not there: \\['{victim}'\\]"):
        TextBackbone.from_pretrained(tmp_path)


class _Payload:
    """Unpickling this would run code; weights_only loading must refuse it."""

    def __reduce__(self):
        return (print, ("pwned",))


def test_meta_checkpoint_with_code_is_refused(tmp_path):
    make_hf_llama(tmp_path / "hf")
    TextBackbone.from_pretrained(tmp_path / "hf").save_pretrained(tmp_path / "meta", layout="meta")
    sd = torch.load(tmp_path / "meta" / "consolidated.00.pth", weights_only=True)
    sd["norm.weight"] = _Payload()
    torch.save(sd, tmp_path / "meta" / "consolidated.00.pth")
    with pytest.raises(CheckpointError, match="tensor-only checkpoint"):
        TextBackbone.from_pretrained(tmp_path / "meta")


# ---------------------------------------------------------------------- presets
@pytest.mark.parametrize(
    "name,published",
    [
        ("llama3.2-1b", 1.236),
        ("llama3.2-3b", 3.213),
        ("llama3.1-8b", 8.030),
        ("llama3.1-70b", 70.554),
        ("llama3.1-405b", 405.853),
    ],
)
def test_presets_have_published_counts(name, published):
    config = TextConfig.preset(name)
    with torch.device("meta"):
        bb = TextBackbone(config)
    count = sum(p.numel() for p in bb.parameters())
    assert round(count / 1e9, 3) == published
    # The same count as transformers' own model for the equivalent config.json.
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        ref = LlamaForCausalLM(LlamaConfig(**config.to_hf()))
    assert count == sum(p.numel() for p in ref.parameters())
    assert TextConfig.from_hf(config.to_hf()) == config
    assert math.isclose(TextConfig.from_meta(config.to_meta()).intermediate_dim, config.intermediate_dim)
