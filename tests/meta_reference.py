"""Meta's reference implementation of Llama 3.2 Vision (llama-models 0.3.0) as a test oracle.

``llama_models.llama3.multimodal.model.CrossAttentionTransformer`` is what the released weights were
trained and published with. Its layers are fairscale model-parallel layers, so a process needs a
(one-process, gloo) model-parallel group before building it: :func:`model_parallel` sets one up once.

The reference's own initialisers leave most tensors uninitialised (``init_method=lambda x: x``);
:func:`build_reference` draws every parameter, the gates included, so no branch is zero.
"""

from __future__ import annotations

import copy
import json
import shutil
import socket
from pathlib import Path

import torch

__all__ = [
    "META_TOKENIZER",
    "build_reference",
    "meta_generate",
    "meta_logits",
    "model_parallel",
    "reference_args",
    "save_meta_folder",
]


def _meta_tokenizer_path() -> Path:
    import llama_models.llama3

    return Path(llama_models.llama3.__file__).parent / "tokenizer.model"


META_TOKENIZER = _meta_tokenizer_path()
"""The real Llama 3 ``tokenizer.model`` shipped inside llama-models."""


def model_parallel() -> None:
    """A one-process gloo group and fairscale model parallelism of size 1 (idempotent)."""
    import torch.distributed as dist
    from fairscale.nn.model_parallel.initialize import (
        initialize_model_parallel,
        model_parallel_is_initialized,
    )

    if not dist.is_initialized():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    if not model_parallel_is_initialized():
        initialize_model_parallel(1)


def reference_args(**overrides):
    """``ModelArgs`` of a small Llama 3.2 Vision: the real vocabulary, 8 text layers, 2 image blocks.

    The image encoder is always Meta's ViT-H/14 (width 1280, 32 + 8 layers); 56 px tiles keep it fast.
    """
    from llama_models.llama3.args import ModelArgs

    params = dict(
        dim=64,
        n_layers=8,
        n_heads=4,
        n_kv_heads=2,
        vocab_size=128256,
        multiple_of=16,
        ffn_dim_multiplier=1.3,
        norm_eps=1e-5,
        rope_theta=500000.0,
        use_scaled_rope=True,
        vision_chunk_size=56,
        vision_max_num_chunks=4,
        vision_num_cross_attention_layers=2,
    )
    params.update(overrides)
    return params, ModelArgs(max_seq_len=160, max_batch_size=4, **params)


def build_reference(seed: int = 0, **overrides):
    """A random ``CrossAttentionTransformer`` (fp32) and its ``params.json`` dict.

    Every parameter is drawn, as bf16-representable values (the dtype Meta publishes): weights with
    standard deviation 0.05 (0.02 inside the 1280-wide image encoder), norms around 1, gates
    uniform in (-1, 1).
    """
    from llama_models.llama3.multimodal.model import CrossAttentionTransformer

    model_parallel()
    params, args = reference_args(**overrides)
    torch.manual_seed(seed)
    model = CrossAttentionTransformer(args).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "gate" in name:
                p.uniform_(-1.0, 1.0, generator=g)
            elif p.ndim == 1 and ("norm" in name or "ln_" in name) and name.endswith("weight"):
                p.uniform_(0.8, 1.2, generator=g)
            else:
                std = 0.02 if name.startswith("vision_model.vision_encoder") else 0.05
                p.uniform_(-std * 3**0.5, std * 3**0.5, generator=g)
            p.copy_(p.to(torch.bfloat16))
    model.setup_cache(args.max_batch_size, device=torch.device("cpu"), dtype=torch.float32)
    return model, params


def save_meta_folder(model, params: dict, folder: Path) -> Path:
    """Meta's layout: ``consolidated.00.pth`` (bf16), ``params.json`` and the real ``tokenizer.model``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}
    torch.save(state, folder / "consolidated.00.pth")
    (folder / "params.json").write_text(json.dumps(params, indent=2))
    shutil.copy(META_TOKENIZER, folder / "tokenizer.model")
    return folder


def meta_logits(model, tokens: list[list[int]], images: list[list], masks: list[list[list[int]]]):
    """Logits ``[b, s, V]`` of a right-padded batch through the reference's inference path.

    ``tokens`` are LLMInput tokens (``<|image|>`` as 128256), ``images`` PIL images per row and
    ``masks`` the rows' vision masks (``LLMInput.vision.mask``), exactly as ``Llama3.generate``
    passes them.
    """
    from llama_models.llama3.tokenizer import Tokenizer

    total = max(len(t) for t in tokens)
    batch = torch.full((len(tokens), total), Tokenizer.get_instance().pad_id, dtype=torch.long)
    for i, t in enumerate(tokens):
        batch[i, : len(t)] = torch.tensor(t)
    text_only = all(not row for row in images)
    with torch.inference_mode():
        caches, xmask, full = model.compute_vision_tokens_masks(
            batch_images=images, batch_masks=copy.deepcopy(masks), total_len=total, device=batch.device
        )
        return model.forward(torch.arange(total), batch, xmask, full, caches, text_only_inference=text_only)


def meta_generate(model, dialogs, max_gen_len: int) -> list[list[int]]:
    """Greedy answers (token ids, stop token excluded) of ``Llama3.chat_completion`` for dialogs of
    ``RawMessage``s."""
    from llama_models.llama3.generation import Llama3
    from llama_models.llama3.tokenizer import Tokenizer

    llama = Llama3(model, Tokenizer.get_instance(), model.params)
    out: list[list[int]] = [[] for _ in dialogs]
    done = [False] * len(dialogs)
    for results in llama.chat_completion(dialogs, temperature=0.0, max_gen_len=max_gen_len):
        for r in results:
            if r.ignore_token or done[r.batch_idx]:
                continue
            if r.token in llama.tokenizer.stop_tokens:
                done[r.batch_idx] = True
                continue
            out[r.batch_idx].append(r.token)
    return out
