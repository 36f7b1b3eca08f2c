"""Image encoders behind one interface: the Llama 3 encoder, any open_clip ViT, any timm ViT.

The Llama 3 paper (section 7.2) starts its image encoder from a contrastively pre-trained ViT; these
wrappers let a user start from whatever CLIP-style (open_clip) or timm ViT weights they have on disk.
Every backend takes the tensors of Hugging Face's Mllama processor and returns multi-layer token
features per tile:

    features = backend(pixel_values, aspect_ratio_ids, aspect_ratio_mask)   # [b, n, t, p, output_dim]

Shapes: b batch, n images per sample, t tiles per image, c channels, p tokens per tile (prefix
tokens such as the class token, then patches), d the ViT's width, N real tiles in the batch.

For open_clip and timm, each tile is encoded on its own (no tile embeddings, no cross-tile layers);
only real tiles (``aspect_ratio_mask == 1``) are computed, and padding tiles come back as zeros.
Their features are ``[final | layers[0] | layers[1] | …]`` along the last axis, each ``d`` wide:
``final`` is the last block's output passed through the model's final norm (open_clip ``ln_post``,
timm ``norm``), ``layers[i]`` the raw output of block ``layers[i]`` (0-based). Note that this is
the *output* of the block, whereas the Llama 3 encoder's ``intermediate_layers`` name the layers
whose *input* is kept (Meta's convention): Llama 3's intermediate layer ``i`` corresponds to a
backend ``layers`` entry ``i - 1``.

Nothing here reaches the network: model names are resolved from the libraries' built-in registries,
weights are only ever read from a local file, and names or tags that would download are refused.
open_clip and timm are imported when a backend is built, not when ``mm.encoders`` is imported.
"""

from __future__ import annotations

import os
import types
from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from mm.encoders.image_encoder import ImageEncoder, ImageEncoderConfig

__all__ = ["OpenClipVisionBackend", "TimmVisionBackend", "VisionBackend", "build_image_encoder"]


@runtime_checkable
class VisionBackend(Protocol):
    """What the multimodal model needs from an image encoder.

    Attributes:
        output_dim: features per token (the projector's input width).
        num_patches: tokens per tile ``p``, prefix tokens included.
        image_size: side of one square tile in pixels.
    """

    output_dim: int
    num_patches: int
    image_size: int

    def __call__(
        self, pixel_values: torch.Tensor, aspect_ratio_ids: torch.Tensor, aspect_ratio_mask: torch.Tensor
    ) -> torch.Tensor:
        """``[b, n, t, c, H, W]``, ``[b, n]``, ``[b, n, t]`` -> ``[b, n, t, p, output_dim]``."""
        ...


def _layer_indices(layers: Sequence[int], depth: int) -> tuple[int, ...]:
    """0-based block indices (negative ones count from the end), checked against ``depth``."""
    out = []
    for i in layers:
        if not -depth <= int(i) < depth:
            raise ValueError(f"layer index {i} is outside a ViT with {depth} blocks")
        out.append(int(i) % depth)
    return tuple(out)


def _local_file(path: str | os.PathLike, what: str) -> str:
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{what} must be the path of a checkpoint file on this machine; {str(path)!r} is not one "
            "(mm never downloads weights: fetch them yourself and pass the file)"
        )
    return os.fspath(path)


class _PerTileBackend(nn.Module):
    """Runs ``encode_tiles`` over the real tiles only and puts zeros in the padding tiles."""

    output_dim: int
    num_patches: int
    image_size: int
    num_channels: int = 3

    def encode_tiles(self, tiles: torch.Tensor) -> torch.Tensor:
        """``[N, c, H, W]`` -> ``[N, p, output_dim]``."""
        raise NotImplementedError

    def forward(
        self, pixel_values: torch.Tensor, aspect_ratio_ids: torch.Tensor, aspect_ratio_mask: torch.Tensor
    ) -> torch.Tensor:
        """See :class:`VisionBackend`. ``aspect_ratio_ids`` is only checked: tiles are encoded alone."""
        if pixel_values.ndim != 6:
            raise ValueError(
                f"pixel_values must be [b, n, t, c, H, W], got shape {tuple(pixel_values.shape)}"
            )
        b, n, t, c, hh, ww = pixel_values.shape
        if c != self.num_channels or hh != self.image_size or ww != self.image_size:
            raise ValueError(
                f"tiles must be {self.num_channels}×{self.image_size}×{self.image_size}, got {c}×{hh}×{ww}"
            )
        if tuple(aspect_ratio_ids.shape) != (b, n):
            raise ValueError(
                f"aspect_ratio_ids must be [b, n] = {[b, n]}, got {list(aspect_ratio_ids.shape)}"
            )
        if tuple(aspect_ratio_mask.shape) != (b, n, t):
            raise ValueError(
                f"aspect_ratio_mask must be [b, n, t] = {[b, n, t]}, got {list(aspect_ratio_mask.shape)}"
            )
        weight = next(self.parameters())
        real = aspect_ratio_mask.to(pixel_values.device).bool()  # [b, n, t]
        tiles = pixel_values[real].to(weight.dtype)  # [N, c, H, W]
        features = self.encode_tiles(tiles)  # [N, p, output_dim]
        out = features.new_zeros(b, n, t, self.num_patches, self.output_dim)
        out[real] = features
        return out


# ---------------------------------------------------------------------------- open_clip
class OpenClipVisionBackend(_PerTileBackend):
    """The vision tower of an open_clip ViT, with multi-layer token features.

    Only the vision tower is built (open_clip's own ``_build_vision_tower``, the function
    ``open_clip.create_model`` uses), so no text tower is allocated and no text configuration is
    fetched. The module is held as ``visual``, with open_clip's own parameter names; its pooled
    output projection, unused here, is removed.

    Args:
        model_name: a built-in open_clip model name (``"ViT-H-14"``, ``"ViT-L-14-336"``, …) or an
            open_clip model configuration (the ``model_cfg`` mapping of its JSON files, with
            ``embed_dim`` and ``vision_cfg``).
        pretrained: path of a local open_clip checkpoint (``.safetensors``, ``.bin`` or ``.pt``
            holding ``visual.*`` tensors, as open_clip writes them); ``None`` keeps random weights.
            Pretrained *tags* are refused: they would download.
        layers: 0-based indices of blocks whose outputs join the final features.
        image_size: tile side to build for, when it differs from the configuration's; position
            embeddings read from ``pretrained`` are resized to it (open_clip's bicubic resize).
    """

    def __init__(
        self,
        model_name: str | Mapping[str, Any],
        *,
        pretrained: str | os.PathLike | None = None,
        layers: Sequence[int] = (),
        image_size: int | None = None,
    ) -> None:
        super().__init__()
        import open_clip
        from open_clip import model as open_clip_model

        path = None if pretrained is None else _local_file(pretrained, "pretrained")
        if isinstance(model_name, str):
            if ":" in model_name:
                raise ValueError(
                    f"open_clip model {model_name!r}: only built-in names or a config mapping are accepted "
                    "(schemas such as 'hf-hub:' fetch from the network); pass weights with pretrained=<file>"
                )
            model_cfg = open_clip.get_model_config(model_name)
            if model_cfg is None:
                raise ValueError(f"unknown open_clip model {model_name!r}; see open_clip.list_models()")
        else:
            model_cfg = dict(model_name)
        vision_cfg = dict(model_cfg["vision_cfg"])
        if vision_cfg.get("timm_model_name"):
            raise ValueError(
                f"this open_clip config wraps the timm model {vision_cfg['timm_model_name']!r}; "
                "use TimmVisionBackend with that model's timm checkpoint instead"
            )
        if isinstance(vision_cfg.get("layers"), Sequence):
            raise ValueError("this open_clip config is a ResNet, not a ViT")
        if image_size is not None:
            vision_cfg["image_size"] = image_size
        vision_cfg["patch_dropout"] = 0.0  # dropped patches would change the token count
        if not hasattr(open_clip_model, "_build_vision_tower"):
            raise ImportError(
                f"open_clip {open_clip.__version__} lacks _build_vision_tower; upgrade open_clip_torch"
            )
        visual = open_clip_model._build_vision_tower(
            embed_dim=model_cfg["embed_dim"],
            vision_cfg=vision_cfg,
            quick_gelu=bool(model_cfg.get("quick_gelu", False)),
            cast_dtype=None,
        )
        if not hasattr(visual, "forward_intermediates"):
            raise ImportError(
                f"open_clip {open_clip.__version__} has no forward_intermediates; upgrade open_clip_torch"
            )
        if getattr(visual, "attn_pool", None) is not None:
            raise ValueError("open_clip towers with an attentional pooler (CoCa) are not supported")
        if path is not None:
            _load_open_clip_visual(visual, path, open_clip_model)

        depth = len(visual.transformer.resblocks)
        self.layers = _layer_indices(layers, depth)
        visual.prune_intermediate_layers(indices=[depth - 1], prune_norm=False, prune_head=True)
        self.visual = visual
        self.depth = depth
        grid_h, grid_w = visual.grid_size
        if grid_h != grid_w:
            raise ValueError(f"tiles are square; this tower's patch grid is {grid_h}×{grid_w}")
        self.image_size = int(visual.image_size[0])
        self.num_patches = grid_h * grid_w + 1
        self.width = int(visual.transformer.width)
        self.output_dim = self.width * (len(self.layers) + 1)

    def encode_tiles(self, tiles: torch.Tensor) -> torch.Tensor:
        last = self.depth - 1
        indices = sorted({*self.layers, last})
        out = self.visual.forward_intermediates(
            tiles, indices=indices, output_fmt="NLC", output_extra_tokens=True, intermediates_only=True
        )
        tokens = {
            i: torch.cat([prefix, spatial], dim=1)  # [N, p, d]
            for i, prefix, spatial in zip(
                indices, out["image_intermediates_prefix"], out["image_intermediates"]
            )
        }
        final = self.visual.ln_post(tokens[last])
        return torch.cat([final, *(tokens[i] for i in self.layers)], dim=-1)


def _load_open_clip_visual(visual: nn.Module, path: str, open_clip_model: types.ModuleType) -> None:
    """Read the ``visual.*`` tensors of an open_clip checkpoint into ``visual`` (strictly)."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(path, device="cpu")
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, Mapping) and "state_dict" in state:
        state = state["state_dict"]
    state = {k.removeprefix("module."): v for k, v in state.items()}
    tower = {k: v for k, v in state.items() if k.startswith("visual.")}
    if not tower:
        raise ValueError(f"{path} holds no 'visual.*' tensors: it is not an open_clip CLIP checkpoint")
    # open_clip's own resize of the position grid, for tiles of another size than the checkpoint's.
    open_clip_model.resize_pos_embed(tower, types.SimpleNamespace(visual=visual))
    visual.load_state_dict({k.removeprefix("visual."): v for k, v in tower.items()}, strict=True)


# ---------------------------------------------------------------------------- timm
class TimmVisionBackend(_PerTileBackend):
    """A timm ViT (any model with ``forward_intermediates``), with multi-layer token features.

    The model is always created with ``pretrained=False`` and held as ``model`` with timm's own
    parameter names; its classifier head (unused here) is removed after loading.

    Args:
        model_name: a timm registry name (``"vit_large_patch14_clip_336"``, …); ``hf-hub:`` names are
            refused (they download).
        checkpoint_path: a local timm-format checkpoint, loaded strictly by timm; ``None`` keeps
            random weights.
        layers: 0-based indices of blocks whose outputs join the final features.
        **timm_kwargs: passed to ``timm.create_model`` (``img_size=448``, ``depth=…``, …).
    """

    def __init__(
        self,
        model_name: str,
        checkpoint_path: str | os.PathLike | None = None,
        layers: Sequence[int] = (),
        **timm_kwargs: Any,
    ) -> None:
        super().__init__()
        import timm

        if model_name.lower().startswith(("hf-hub:", "hf_hub:")):
            raise ValueError(f"timm model {model_name!r} would be fetched from the Hugging Face Hub; refused")
        for key in ("pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
            if key in timm_kwargs:
                raise ValueError(f"timm_kwargs may not set {key!r}: weights come from checkpoint_path only")
        path = None if checkpoint_path is None else _local_file(checkpoint_path, "checkpoint_path")
        model = timm.create_model(model_name, pretrained=False, checkpoint_path=path, **timm_kwargs)
        if not hasattr(model, "forward_intermediates") or not hasattr(model, "blocks"):
            raise ValueError(f"timm model {model_name!r} is not a ViT with forward_intermediates")
        depth = len(model.blocks)
        self.layers = _layer_indices(layers, depth)
        model.prune_intermediate_layers(indices=[depth - 1], prune_norm=False, prune_head=True)
        self.model = model
        self.depth = depth
        img_h, img_w = model.patch_embed.img_size
        grid_h, grid_w = model.patch_embed.grid_size
        if img_h != img_w:
            raise ValueError(f"tiles are square; this model takes {img_h}×{img_w} images")
        self.image_size = int(img_h)
        self.num_channels = int(model.patch_embed.proj.in_channels)
        self.num_patches = int(model.num_prefix_tokens) + grid_h * grid_w
        self.width = int(model.embed_dim)
        self.output_dim = self.width * (len(self.layers) + 1)

    def encode_tiles(self, tiles: torch.Tensor) -> torch.Tensor:
        last = self.depth - 1
        indices = sorted({*self.layers, last})
        final, intermediates = self.model.forward_intermediates(
            tiles, indices=indices, return_prefix_tokens=True, norm=False, output_fmt="NLC"
        )
        tokens = {}
        for i, item in zip(indices, intermediates):
            # (spatial, prefix) pairs when the model has prefix tokens, plain tensors otherwise
            tokens[i] = torch.cat([item[1], item[0]], dim=1) if isinstance(item, tuple) else item  # [N, p, d]
        return torch.cat([final, *(tokens[i] for i in self.layers)], dim=-1)


# ---------------------------------------------------------------------------- builder
_SPEC_KEYS = {
    "open_clip": ({"model_name"}, {"pretrained", "layers", "image_size"}),
    "timm": ({"model_name"}, {"checkpoint_path", "layers", "kwargs"}),
}


def build_image_encoder(spec: Mapping[str, Any]) -> nn.Module:
    """Build an image encoder from a plain mapping (a YAML or JSON entry).

    Specs (unknown keys are an error):

    * ``{"type": "llama3", <ImageEncoderConfig fields>..., "activation_checkpointing": bool}``
      — :class:`~mm.encoders.ImageEncoder`; missing fields take Llama 3.2 Vision's sizes;
    * ``{"type": "open_clip", "model_name": ..., "pretrained": <file>, "layers": [...],
      "image_size": int}`` — :class:`OpenClipVisionBackend`;
    * ``{"type": "timm", "model_name": ..., "checkpoint_path": <file>, "layers": [...],
      "kwargs": {...}}`` — :class:`TimmVisionBackend` (``kwargs`` go to ``timm.create_model``).
    """
    spec = dict(spec)
    kind = spec.pop("type", None)
    if kind == "llama3":
        checkpointing = bool(spec.pop("activation_checkpointing", False))
        return ImageEncoder(ImageEncoderConfig.from_dict(spec), activation_checkpointing=checkpointing)
    if kind not in _SPEC_KEYS:
        raise ValueError(f"image encoder type must be one of 'llama3', 'open_clip', 'timm'; got {kind!r}")
    required, optional = _SPEC_KEYS[kind]
    missing = sorted(required - set(spec))
    unknown = sorted(set(spec) - required - optional)
    if missing or unknown:
        raise ValueError(f"{kind} image encoder spec: missing keys {missing}, unknown keys {unknown}")
    layers = tuple(spec.get("layers", ()))
    if kind == "open_clip":
        return OpenClipVisionBackend(
            spec["model_name"],
            pretrained=spec.get("pretrained"),
            layers=layers,
            image_size=spec.get("image_size"),
        )
    return TimmVisionBackend(
        spec["model_name"],
        checkpoint_path=spec.get("checkpoint_path"),
        layers=layers,
        **spec.get("kwargs", {}),
    )
