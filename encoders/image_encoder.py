"""The Llama 3 image encoder (paper section 7.2), as released in Llama 3.2 Vision.

A ViT-H/14 run over the tiles of an image: 14×14 patch convolution, a class token per tile, a
gated patch-position embedding plus a gated per-aspect-ratio tile-position embedding, aspect-ratio
embeddings before and after the local transformer, a local transformer (32 layers at full size)
whose features are also taken from several intermediate layers, then 8 gated "global"
self-attention layers over all tiles of an image. The paper names the 4th, 8th, 16th, 24th and 31st
layers; Meta's reference (llama-models ``ImageTransformer.forward``, what the released weights were
trained with) keeps the *inputs* of local layers 3, 7, 15, 23 and 30 (0-based), i.e. the outputs
of layers 2, 6, 14, 22 and 29. ``intermediate_layers`` holds those indices and means the same here.
(Hugging Face transformers 4.45 agreed; its 5.x vision encoder collects the *outputs* of the listed
layers instead, one layer too deep for every released checkpoint.) Every patch ends up
with ``width * (len(intermediate_layers) + 1)`` features (1280 × 6 = 7680 at full size); the
projection to the language model's width belongs to the multimodal model, not to this module.

Shapes: b batch, n images per sample, t tiles per image, p tokens per tile (class token + patches),
l ``p`` padded to a multiple of 8, d width, k intermediate layers taken, h heads, hd head dim.

Numerics follow the released model exactly, quirks included:

* each tile's token sequence is padded with zero tokens to a multiple of 8, and those tokens take
  part in attention (their values are not zero after the first layer);
* the attention mask only stops a *padding* token (padding patch or padding tile) from attending to
  another padding token: real tokens attend to everything, padding tokens to real tokens only;
* intermediate features are stacked along a last axis and flattened feature-major, so the output
  is ``[final (d) | intermediates (d k)]`` with the ``k`` layers of one feature side by side.

A built encoder can change its tile size in place (:meth:`ImageEncoder.resize_tiles`): the paper
pre-trains at 336 px tiles and anneals at a higher resolution (section 7.4), and only the patch-grid
rows of the two position tables depend on the tile size.

The module and parameter names are mm's own; the Hugging Face ``MllamaVisionModel`` names appear
only in :mod:`mm.encoders.image_encoder_keys`.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint

from mm._strict import check_fields
from mm._values import ConfigValueError, as_float, as_int, as_int_tuple, check_values, nested
from mm.text_backbone.linear import Linear, project

__all__ = ["ImageEncoder", "ImageEncoderConfig", "resize_image_encoder", "resize_patch_grid"]

# Tile grids (rows, cols), i.e. (tiles down, tiles across), of Llama 3.2 Vision for at most 4 tiles. Aspect-ratio id
# ``i + 1`` names entry ``i``; id 0 means "no image".
_LLAMA32_ASPECT_RATIOS = ((1, 1), (1, 2), (1, 3), (1, 4), (2, 1), (2, 2), (3, 1), (4, 1))

# The released model normalises before and after the local transformer with LayerNorm's default
# epsilon, whatever ``norm_eps`` its layers use.
_OUTER_NORM_EPS = 1e-5


@dataclass(frozen=True, kw_only=True)
class ImageEncoderConfig:
    """Sizes of the Llama 3 image encoder. The defaults are Llama 3.2 Vision's (11B and 90B alike).

    Args:
        image_size: side of one square tile in pixels.
        patch_size: side of one patch in pixels.
        width: token width ``d``.
        num_layers: layers of the local transformer.
        num_global_layers: gated global layers after it.
        num_heads: attention heads of every layer.
        mlp_dim: hidden width of every MLP.
        norm_eps: LayerNorm epsilon inside the layers.
        max_num_tiles: tiles per image ``t`` (inputs always carry exactly this many).
        intermediate_layers: 0-based indices of local layers whose *inputs* join the features
            (Meta's ``return_intermediate``: index 3 is the output of layer 2).
        supported_aspect_ratios: tile grids ``(rows, cols)`` (tiles down, tiles across); aspect-ratio
            id ``i + 1`` is entry ``i``.
        num_channels: image channels.
    """

    image_size: int = 560
    patch_size: int = 14
    width: int = 1280
    num_layers: int = 32
    num_global_layers: int = 8
    num_heads: int = 16
    mlp_dim: int = 5120
    norm_eps: float = 1e-5
    max_num_tiles: int = 4
    intermediate_layers: tuple[int, ...] = (3, 7, 15, 23, 30)
    supported_aspect_ratios: tuple[tuple[int, int], ...] = _LLAMA32_ASPECT_RATIOS
    num_channels: int = 3

    def __post_init__(self) -> None:
        """Types and ranges of every field (:mod:`mm._values`), then the checks that combine them.

        Sizes are positive ints (``num_global_layers`` may be 0); ``norm_eps`` a positive number;
        ``intermediate_layers`` indices of local layers; every aspect ratio a ``(rows, cols)`` pair
        of positive ints that fits in ``max_num_tiles``, none twice.
        """
        positive = as_int(minimum=1)
        check_values(
            self,
            {
                "image_size": positive,
                "patch_size": positive,
                "width": positive,
                "num_layers": positive,
                "num_global_layers": as_int(minimum=0),
                "num_heads": positive,
                "mlp_dim": positive,
                "norm_eps": as_float(positive=True),
                "max_num_tiles": positive,
                "num_channels": positive,
            },
        )
        check_values(
            self,
            {
                "intermediate_layers": as_int_tuple(as_int(minimum=0, below=self.num_layers)),
                "supported_aspect_ratios": nested(as_int_tuple(positive, size=2)),
            },
        )
        if self.image_size % self.patch_size:
            raise ConfigValueError(
                f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}"
            )
        if self.width % self.num_heads:
            raise ConfigValueError(f"width {self.width} is not divisible by num_heads {self.num_heads}")
        too_big = [r for r in self.supported_aspect_ratios if r[0] * r[1] > self.max_num_tiles]
        if too_big:
            raise ConfigValueError(
                f"holds grids of more tiles than max_num_tiles={self.max_num_tiles}: "
                f"{[list(r) for r in too_big]}",
                key="supported_aspect_ratios",
            )
        if not self.supported_aspect_ratios:
            raise ConfigValueError("must not be empty", key="supported_aspect_ratios")
        if len(set(self.supported_aspect_ratios)) != len(self.supported_aspect_ratios):
            raise ConfigValueError(
                f"names a grid twice: {[list(r) for r in self.supported_aspect_ratios]}",
                key="supported_aspect_ratios",
            )

    # ------------------------------------------------------------------ derived sizes
    @property
    def num_patches(self) -> int:
        """Tokens per tile ``p``: the patch grid plus the class token."""
        return (self.image_size // self.patch_size) ** 2 + 1

    @property
    def padded_num_patches(self) -> int:
        """``p`` rounded up to a multiple of 8, the per-tile length the transformers run on."""
        return math.ceil(self.num_patches / 8) * 8

    @property
    def output_dim(self) -> int:
        """Features per token: the final output plus one ``width`` per intermediate layer."""
        return self.width * (len(self.intermediate_layers) + 1)

    @property
    def num_aspect_ratio_ids(self) -> int:
        """Rows of the aspect-ratio tables: one per supported grid, plus id 0 (no image)."""
        return len(self.supported_aspect_ratios) + 1

    def aspect_ratio_id(self, rows: int, cols: int) -> int:
        """The id of a tile grid (what the image processor writes into ``aspect_ratio_ids``)."""
        try:
            return self.supported_aspect_ratios.index((rows, cols)) + 1
        except ValueError:
            raise ValueError(
                f"tile grid {(rows, cols)} is not among {self.supported_aspect_ratios}"
            ) from None

    # ------------------------------------------------------------------ dicts
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ImageEncoderConfig:
        """Strict inverse of :meth:`to_dict`: unknown keys are an error."""
        data = check_fields(cls, data, "image encoder config", error=ConfigValueError)
        return cls(**data)

    def replace(self, **changes: Any) -> ImageEncoderConfig:
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ Hugging Face vision_config
    @classmethod
    def from_hf(cls, hf: Mapping[str, Any]) -> ImageEncoderConfig:
        """Read the ``vision_config`` dictionary of a Hugging Face Mllama ``config.json``."""
        act = hf.get("hidden_act", "gelu")
        if act != "gelu":
            raise ValueError(f"unsupported hidden_act {act!r}: the Llama 3 image encoder uses exact 'gelu'")
        image_size = _square(hf.get("image_size", 560), "image_size")
        patch_size = _square(hf.get("patch_size", 14), "patch_size")
        heads = hf.get("attention_heads", hf.get("num_attention_heads", 16))
        config = cls(
            image_size=image_size,
            patch_size=patch_size,
            width=int(hf.get("hidden_size", 1280)),
            num_layers=int(hf.get("num_hidden_layers", 32)),
            num_global_layers=int(hf.get("num_global_layers", 8)),
            num_heads=int(heads),
            mlp_dim=int(hf.get("intermediate_size", 5120)),
            norm_eps=float(hf.get("norm_eps", 1e-5)),
            max_num_tiles=int(hf.get("max_num_tiles", 4)),
            intermediate_layers=tuple(hf.get("intermediate_layers_indices") or (3, 7, 15, 23, 30)),
            supported_aspect_ratios=tuple(
                tuple(r) for r in (hf.get("supported_aspect_ratios") or _LLAMA32_ASPECT_RATIOS)
            ),
            num_channels=int(hf.get("num_channels", 3)),
        )
        declared = hf.get("vision_output_dim")
        if declared is not None and int(declared) != config.output_dim:
            raise ValueError(
                f"vision_output_dim {declared} disagrees with hidden_size × (intermediate layers + 1) "
                f"= {config.output_dim}"
            )
        return config

    def to_hf(self) -> dict[str, Any]:
        """A ``vision_config`` dictionary that ``transformers.MllamaVisionConfig`` reads."""
        return {
            "model_type": "mllama_vision_model",
            "hidden_size": self.width,
            "hidden_act": "gelu",
            "num_hidden_layers": self.num_layers,
            "num_global_layers": self.num_global_layers,
            "attention_heads": self.num_heads,
            "num_channels": self.num_channels,
            "intermediate_size": self.mlp_dim,
            "vision_output_dim": self.output_dim,
            "image_size": self.image_size,
            "patch_size": self.patch_size,
            "norm_eps": self.norm_eps,
            "max_num_tiles": self.max_num_tiles,
            "intermediate_layers_indices": list(self.intermediate_layers),
            "supported_aspect_ratios": [list(r) for r in self.supported_aspect_ratios],
            "initializer_range": 0.02,
        }


def _square(value: int | Sequence[int], name: str) -> int:
    if isinstance(value, Sequence):
        if len(value) != 2 or value[0] != value[1]:
            raise ValueError(f"{name} {list(value)} is not square; the Llama 3 encoder uses square tiles")
        value = value[0]
    return int(value)


# ---------------------------------------------------------------------------- building blocks
class AspectRatioEmbedding(nn.Module):
    """One gated vector per tile, looked up by the image's aspect-ratio id, added to every token.

    Args:
        num_ids: rows (supported aspect ratios + 1).
        max_num_tiles: tiles per image ``t``.
        width: token width ``d``.
    """

    def __init__(self, num_ids: int, max_num_tiles: int, width: int) -> None:
        super().__init__()
        self.max_num_tiles = max_num_tiles
        self.embedding = nn.Embedding(num_ids, max_num_tiles * width)
        self.gate = nn.Parameter(torch.zeros(1))  # tanh(0) = 0: a fresh table adds nothing

    def forward(self, x: torch.Tensor, aspect_ratio_ids: torch.Tensor) -> torch.Tensor:
        """``x [bn, t, p, d]``, ``aspect_ratio_ids [bn]`` -> ``[bn, t, p, d]``."""
        per_tile = rearrange(self.embedding(aspect_ratio_ids), "bn (t d) -> bn t 1 d", t=self.max_num_tiles)
        return x + per_tile * self.gate.tanh()


class GatedPositionalEmbedding(nn.Module):
    """Patch positions shared by all tiles, blended by one gate with per-aspect-ratio tile positions.

    ``x + (1 - tanh(gate)) * position + tanh(gate) * tile_position[aspect_ratio_id]``.

    Args:
        num_ids: rows of the tile table (supported aspect ratios + 1).
        max_num_tiles: tiles per image ``t``.
        num_patches: tokens per tile ``p`` (class token included).
        width: token width ``d``.
    """

    def __init__(self, num_ids: int, max_num_tiles: int, num_patches: int, width: int) -> None:
        super().__init__()
        self.max_num_tiles = max_num_tiles
        self.num_patches = num_patches
        self.position = nn.Parameter(nn.init.normal_(torch.empty(num_patches, width), std=width**-0.5))
        self.tile_position = nn.Embedding(num_ids, max_num_tiles * num_patches * width)
        self.gate = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, aspect_ratio_ids: torch.Tensor) -> torch.Tensor:
        """``x [bn, t, p, d]``, ``aspect_ratio_ids [bn]`` -> ``[bn, t, p, d]``."""
        gate = self.gate.tanh()
        x = x + (1 - gate) * self.position
        tile = rearrange(
            self.tile_position(aspect_ratio_ids),
            "bn (t p d) -> bn t p d",
            t=self.max_num_tiles,
            p=self.num_patches,
        )
        return x + gate * tile


class VisionAttention(nn.Module):
    """Bidirectional multi-head self-attention without biases, through ``scaled_dot_product_attention``."""

    def __init__(self, width: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q_proj = Linear(width, width, bias=False)
        self.k_proj = Linear(width, width, bias=False)
        self.v_proj = Linear(width, width, bias=False)
        self.o_proj = Linear(width, width, bias=False)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """``x [b, s, d]``, ``mask [b, 1, s, s]`` (additive, or boolean with True = may attend) -> ``[b, s, d]``."""
        q, k, v = (
            rearrange(t, "b s (h hd) -> b h s hd", h=self.num_heads)  # [b, h, s, hd]
            for t in project(x, self.q_proj, self.k_proj, self.v_proj)
        )
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # [b, h, s, hd]
        return self.o_proj(rearrange(out, "b h s hd -> b s (h hd)"))


class VisionMLP(nn.Module):
    """``fc2(gelu(fc1(x)))`` with the exact (erf) GELU."""

    def __init__(self, width: int, hidden_dim: int) -> None:
        super().__init__()
        self.fc1 = Linear(width, hidden_dim)
        self.fc2 = Linear(hidden_dim, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class VisionEncoderLayer(nn.Module):
    """Pre-norm transformer layer; a *gated* layer scales both residual branches by ``tanh(gate)``.

    Args:
        width: token width ``d``.
        num_heads: attention heads.
        mlp_dim: MLP hidden width.
        norm_eps: LayerNorm epsilon.
        gated: give the layer ``attn_gate`` and ``mlp_gate`` (the paper's global layers; they start at
            π/4, so a fresh layer passes about two thirds of each branch).
    """

    def __init__(self, *, width: int, num_heads: int, mlp_dim: int, norm_eps: float, gated: bool) -> None:
        super().__init__()
        self.gated = gated
        self.attn_norm = nn.LayerNorm(width, eps=norm_eps)
        self.attn = VisionAttention(width, num_heads)
        self.mlp_norm = nn.LayerNorm(width, eps=norm_eps)
        self.mlp = VisionMLP(width, mlp_dim)
        if gated:
            self.attn_gate = nn.Parameter(torch.full((1,), math.pi / 4))
            self.mlp_gate = nn.Parameter(torch.full((1,), math.pi / 4))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        attn = self.attn(self.attn_norm(x), mask)
        x = x + (self.attn_gate.tanh() * attn if self.gated else attn)
        mlp = self.mlp(self.mlp_norm(x))
        return x + (self.mlp_gate.tanh() * mlp if self.gated else mlp)


# ---------------------------------------------------------------------------- the encoder
class ImageEncoder(nn.Module):
    """The Llama 3 image encoder (paper section 7.2; Llama 3.2 Vision's vision model).

    Args:
        config: sizes (see :class:`ImageEncoderConfig`).
        activation_checkpointing: recompute each layer in the backward pass instead of keeping its
            activations (only while gradients are enabled).

    Attributes:
        output_dim: features per token, ``width * (len(intermediate_layers) + 1)``.
        num_patches: tokens per tile ``p`` (class token included).
        image_size: side of one tile in pixels.
    """

    def __init__(self, config: ImageEncoderConfig, *, activation_checkpointing: bool = False) -> None:
        super().__init__()
        self.config = config
        self.activation_checkpointing = activation_checkpointing
        self.output_dim = config.output_dim
        self.num_patches = config.num_patches
        self.image_size = config.image_size
        self.max_num_tiles = config.max_num_tiles
        d = config.width
        num_ids = config.num_aspect_ratio_ids
        self.patch_embed = nn.Conv2d(
            config.num_channels, d, kernel_size=config.patch_size, stride=config.patch_size, bias=False
        )
        self.class_embedding = nn.Parameter(nn.init.normal_(torch.empty(d), std=d**-0.5))
        self.pre_tile_aspect_embedding = AspectRatioEmbedding(num_ids, config.max_num_tiles, d)
        self.positional_embedding = GatedPositionalEmbedding(
            num_ids, config.max_num_tiles, config.num_patches, d
        )
        self.ln_pre = nn.LayerNorm(d, eps=_OUTER_NORM_EPS)
        layer_sizes = dict(
            width=d, num_heads=config.num_heads, mlp_dim=config.mlp_dim, norm_eps=config.norm_eps
        )
        self.layers = nn.ModuleList(
            VisionEncoderLayer(**layer_sizes, gated=False) for _ in range(config.num_layers)
        )
        self.ln_post = nn.LayerNorm(d, eps=_OUTER_NORM_EPS)
        self.post_tile_aspect_embedding = AspectRatioEmbedding(num_ids, config.max_num_tiles, d)
        self.global_layers = nn.ModuleList(
            VisionEncoderLayer(**layer_sizes, gated=True) for _ in range(config.num_global_layers)
        )

    def forward(
        self,
        pixel_values: torch.Tensor,
        aspect_ratio_ids: torch.Tensor,
        aspect_ratio_mask: torch.Tensor,
    ) -> torch.Tensor:
        """Encode every tile of every image.

        Args:
            pixel_values: ``[b, n, t, c, H, W]`` normalised tiles, ``t == max_num_tiles``,
                ``H == W == image_size`` (the layout of Hugging Face's Mllama processor).
            aspect_ratio_ids: ``[b, n]`` integer ids (0 = no image; see
                :meth:`ImageEncoderConfig.aspect_ratio_id`).
            aspect_ratio_mask: ``[b, n, t]``, 1 for real tiles and 0 for padding tiles. An image with
                no real tile at all is treated as if its first tile were real (the processor always
                marks it so), which keeps every output finite.

        Returns:
            ``[b, n, t, p, output_dim]`` features. Padding tiles hold values too (computed exactly as
            the released model does); the cross-attention mask is what ignores them.
        """
        b, n, t = self._check_inputs(pixel_values, aspect_ratio_ids, aspect_ratio_mask)
        cfg = self.config
        p, padded = cfg.num_patches, cfg.padded_num_patches
        weight = self.patch_embed.weight
        ids = aspect_ratio_ids.to(weight.device).reshape(b * n)
        tile_mask = aspect_ratio_mask.to(weight.device).reshape(b * n, t)

        tiles = rearrange(pixel_values.to(weight.device, weight.dtype), "b n t c hh ww -> (b n t) c hh ww")
        x = self.patch_embed(tiles)  # [(b n t), d, gh, gw]
        x = rearrange(x, "(bn t) d gh gw -> bn t (gh gw) d", t=t)
        x = self.pre_tile_aspect_embedding(x, ids)
        cls = self.class_embedding.to(x.dtype).expand(b * n, t, 1, -1)
        x = torch.cat([cls, x], dim=2)  # [bn, t, p, d]
        x = self.positional_embedding(x, ids)
        x = self.ln_pre(x)
        x = F.pad(x, (0, 0, 0, padded - p))  # [bn, t, l, d]
        x = rearrange(x, "bn t l d -> bn (t l) d")
        # One additive mask for every layer: given the boolean one, scaled_dot_product_attention
        # would build this float copy (-inf where False) in each layer, and a layer that trains
        # keeps its copy for the backward pass (about 8 GB for 4 images of 4 tiles at 11B size).
        allowed = self._attention_mask(tile_mask, p, padded)
        mask = torch.zeros(allowed.shape, dtype=x.dtype, device=x.device).masked_fill_(
            ~allowed, float("-inf")
        )
        del allowed

        taken = set(cfg.intermediate_layers)
        kept: dict[int, torch.Tensor] = {}
        for i, layer in enumerate(self.layers):
            if i in taken:  # the layer's input, as Meta's reference keeps it
                kept[i] = x
            x = self._run(layer, x, mask)
        x = self.ln_post(x)
        x = rearrange(x, "bn (t l) d -> bn t l d", t=t)
        x = self.post_tile_aspect_embedding(x, ids)
        x = rearrange(x, "bn t l d -> bn (t l) d")
        for layer in self.global_layers:
            x = self._run(layer, x, mask)

        if kept:  # intermediates as the release lays them out: [..., d, k] flattened feature-major
            stacked = torch.stack([kept[i] for i in cfg.intermediate_layers], dim=-1)  # [bn, t*l, d, k]
            x = torch.cat([x, rearrange(stacked, "bn s d k -> bn s (d k)")], dim=-1)  # [bn, t*l, output_dim]
        x = rearrange(x, "(b n) (t l) f -> b n t l f", b=b, t=t)
        return x[:, :, :, :p]

    # ------------------------------------------------------------------ tile size
    def resize_tiles(self, image_size: int) -> None:
        """Change the tile side in place, resampling the patch-position tables (paper section 7.4).

        The paper trains the image adapter on 336 px tiles, then anneals at a higher resolution
        (Llama 3.2 Vision ships 560 px tiles). The patch convolution and every other weight do not
        depend on the tile size; only the patch-grid rows of ``positional_embedding.position``
        ``[p, d]`` and of each aspect-ratio id's and tile's block of
        ``positional_embedding.tile_position`` (rows of ``[t, p, d]``) do. Those grids are resampled
        bicubically (see :func:`resize_patch_grid`); class-token rows are kept as they are. ``config``, ``image_size`` and
        ``num_patches`` follow; padded lengths and attention masks are derived from the config at
        every call.

        The two resampled tables become *new* ``nn.Parameter`` objects (same names, dtype, device
        and ``requires_grad``; no ``.grad``), so an optimizer, a DDP/FSDP wrapper or a compiled
        module built before the call still points at the old ones: resize first, then build
        them. A :class:`~mm.MultimodalModel` holding this encoder must also take the new
        ``config`` (``model.config.replace(image_encoder=encoder.config)``). Resizing to the
        current size changes nothing at all (the very same tensors stay).

        Args:
            image_size: new tile side in pixels, a positive multiple of ``patch_size``.

        Raises:
            ValueError: ``image_size`` is not a positive integer multiple of ``patch_size``.
        """
        cfg = self.config
        if isinstance(image_size, bool):
            raise ValueError(f"image_size must be an integer number of pixels, got {image_size!r}")
        try:
            image_size = operator.index(image_size)
        except TypeError:
            raise ValueError(f"image_size must be an integer number of pixels, got {image_size!r}") from None
        if image_size <= 0 or image_size % cfg.patch_size:
            raise ValueError(
                f"cannot resize tiles to {image_size} px: the tile side must be a positive multiple "
                f"of patch_size {cfg.patch_size}"
            )
        if image_size == cfg.image_size:
            return
        new_cfg = cfg.replace(image_size=image_size)
        grid = image_size // cfg.patch_size
        pos = self.positional_embedding
        with torch.no_grad():
            position = resize_patch_grid(pos.position.detach(), grid)  # [p', d]
            tile = rearrange(
                pos.tile_position.weight.detach(),
                "i (t p d) -> i t p d",
                t=cfg.max_num_tiles,
                p=cfg.num_patches,
            )
            tile = rearrange(resize_patch_grid(tile, grid), "i t p d -> i (t p d)")
        pos.position = _parameter_like(pos.position, position)
        pos.tile_position.weight = _parameter_like(pos.tile_position.weight, tile)
        pos.tile_position.embedding_dim = tile.shape[1]
        pos.num_patches = new_cfg.num_patches
        self.config = new_cfg
        self.image_size = new_cfg.image_size
        self.num_patches = new_cfg.num_patches

    # ------------------------------------------------------------------ helpers
    def _run(self, layer: VisionEncoderLayer, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.activation_checkpointing and torch.is_grad_enabled():
            return checkpoint(layer, x, mask, use_reentrant=False)
        return layer(x, mask)

    @staticmethod
    def _attention_mask(tile_mask: torch.Tensor, num_patches: int, padded: int) -> torch.Tensor:
        """Boolean ``[bn, 1, t*l, t*l]``: False only where a padding token meets a padding token."""
        real_tile = tile_mask.bool()  # [bn, t]
        # An image without any real tile would leave its padding rows nothing to attend to.
        real_tile = real_tile.clone()
        real_tile[:, 0] |= ~real_tile.any(dim=1)
        real_patch = torch.arange(padded, device=tile_mask.device) < num_patches  # [l]
        is_pad = ~(real_tile[:, :, None] & real_patch)  # [bn, t, l]
        is_pad = rearrange(is_pad, "bn t l -> bn (t l)")
        return ~(is_pad[:, None, :, None] & is_pad[:, None, None, :])  # [bn, 1, t*l, t*l]

    def _check_inputs(
        self, pixel_values: torch.Tensor, aspect_ratio_ids: torch.Tensor, aspect_ratio_mask: torch.Tensor
    ) -> tuple[int, int, int]:
        cfg = self.config
        if pixel_values.ndim != 6:
            raise ValueError(
                f"pixel_values must be [b, n, t, c, H, W], got shape {tuple(pixel_values.shape)}"
            )
        b, n, t, c, hh, ww = pixel_values.shape
        if t != cfg.max_num_tiles:
            raise ValueError(
                f"pixel_values has {t} tiles per image; this encoder takes exactly {cfg.max_num_tiles}"
            )
        if c != cfg.num_channels or hh != cfg.image_size or ww != cfg.image_size:
            raise ValueError(
                f"tiles must be {cfg.num_channels}×{cfg.image_size}×{cfg.image_size}, got {c}×{hh}×{ww}"
            )
        if tuple(aspect_ratio_ids.shape) != (b, n):
            raise ValueError(
                f"aspect_ratio_ids must be [b, n] = {[b, n]}, got {list(aspect_ratio_ids.shape)}"
            )
        if tuple(aspect_ratio_mask.shape) != (b, n, t):
            raise ValueError(
                f"aspect_ratio_mask must be [b, n, t] = {[b, n, t]}, got {list(aspect_ratio_mask.shape)}"
            )
        if aspect_ratio_ids.is_floating_point():
            raise ValueError("aspect_ratio_ids must be an integer tensor")
        return b, n, t


# ---------------------------------------------------------------------------- tile-size changes
def resize_image_encoder(encoder: nn.Module, image_size: int) -> None:
    """Change the tile side of a Llama 3 image encoder in place (see :meth:`ImageEncoder.resize_tiles`).

    Build the optimizer after this call: the resized tables are new parameters.

    Args:
        encoder: the encoder to resize.
        image_size: new tile side in pixels, a positive multiple of the encoder's ``patch_size``.

    Raises:
        TypeError: ``encoder`` is not an :class:`ImageEncoder` (the open_clip / timm backends are
            built for one tile size; build them again with ``image_size`` instead).
        ValueError: ``image_size`` is not a positive multiple of ``patch_size``.
    """
    if not isinstance(encoder, ImageEncoder):
        raise TypeError(
            f"only mm's Llama 3 ImageEncoder can change its tile size in place, not {type(encoder).__name__}"
        )
    encoder.resize_tiles(image_size)


def resize_patch_grid(table: torch.Tensor, grid: int) -> torch.Tensor:
    """Resample the patch-grid rows of a position table to a ``grid × grid`` patch grid.

    Bicubic interpolation with ``align_corners=False`` (patch centres keep their place in the
    tile), computed in at least float32 and returned in the table's dtype; the class-token row is
    copied unchanged. PyTorch's *antialiased* bicubic is used in both directions: shrinking, it
    widens the kernel so every old patch contributes; growing, it is the Keys cubic with
    ``a = -0.5`` (PIL's bicubic), which reproduces linear and quadratic fields exactly away from
    the border, whereas the plain ``a = -0.75`` kernel adds a ripple of about 5 % of one patch
    step to a linear field.

    Args:
        table: ``[..., p, d]`` with ``p = 1 + g * g``: the class token's row first, then the patch
            grid row by row (row ``r``, column ``c`` at ``1 + r * g + c``, the order the patch
            convolution's output is flattened in).
        grid: patches per side of the new grid.

    Returns:
        ``[..., 1 + grid * grid, d]``; ``table`` itself when the grid does not change.
    """
    if table.ndim < 2:
        raise ValueError(f"position table must be [..., p, d], got shape {tuple(table.shape)}")
    *lead, p, d = table.shape
    g = math.isqrt(max(p - 1, 0))
    if p < 2 or g * g != p - 1:
        raise ValueError(f"position table has {p} rows, not one class token plus a square patch grid")
    if grid < 1:
        raise ValueError(f"grid must be at least 1 patch per side, got {grid}")
    if grid == g:
        return table
    compute = torch.promote_types(table.dtype, torch.float32)
    cls, patches = table[..., :1, :], table[..., 1:, :]  # [..., 1, d], [..., g*g, d]
    img = rearrange(patches.reshape(-1, g * g, d), "m (gh gw) d -> m d gh gw", gh=g)  # [m, d, g, g]
    img = F.interpolate(
        img.to(compute), size=(grid, grid), mode="bicubic", align_corners=False, antialias=True
    )  # [m, d, grid, grid]
    patches = rearrange(img, "m d gh gw -> m (gh gw) d").to(table.dtype).reshape(*lead, grid * grid, d)
    return torch.cat([cls, patches], dim=-2)  # [..., 1 + grid*grid, d]


def _parameter_like(old: nn.Parameter, value: torch.Tensor) -> nn.Parameter:
    """A new parameter holding ``value`` with ``old``'s dtype, device and ``requires_grad``."""
    return nn.Parameter(
        value.detach().to(device=old.device, dtype=old.dtype).contiguous(), requires_grad=old.requires_grad
    )
