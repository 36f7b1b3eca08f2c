"""Changing the tile size of a built Llama 3 image encoder (paper section 7.4: pre-training at 336 px
tiles, annealing at a higher resolution). Tiny random encoders, CPU only."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from einops import rearrange

from mm.encoders.image_encoder import (
    ImageEncoder,
    ImageEncoderConfig,
    resize_image_encoder,
    resize_patch_grid,
)
from mm.model.presets import TINY_IMAGE_ENCODER


def _encoder(config: ImageEncoderConfig = TINY_IMAGE_ENCODER, seed: int = 0) -> ImageEncoder:
    torch.manual_seed(seed)
    enc = ImageEncoder(config).eval()
    with torch.no_grad():  # open every gate so both position tables reach the output
        for p in enc.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return enc


def _inputs(config: ImageEncoderConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every aspect-ratio id once (and id 0, no image), with their padding tiles marked."""
    ratios = config.supported_aspect_ratios
    ids = [0] + [config.aspect_ratio_id(*r) for r in ratios]
    mask = [[1] + [0] * (config.max_num_tiles - 1)]
    mask += [[1] * (w * h) + [0] * (config.max_num_tiles - w * h) for w, h in ratios]
    ids_t = torch.tensor(ids).reshape(1, -1)  # [b=1, n]
    mask_t = torch.tensor(mask).reshape(1, len(ids), config.max_num_tiles)  # [b, n, t]
    size = config.image_size
    pixels = torch.randn(1, len(ids), config.max_num_tiles, config.num_channels, size, size)
    return pixels, ids_t, mask_t


def _grid_coords(g: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Patch centres of a ``g × g`` grid in tile units (0..1), row-major like the patch tokens."""
    centres = (torch.arange(g, dtype=torch.float64) + 0.5) / g
    rows, cols = torch.meshgrid(centres, centres, indexing="ij")
    return rows.reshape(-1), cols.reshape(-1)  # [g*g] each


def _interior(old: int, new: int) -> torch.Tensor:
    """Boolean ``[new*new]``: new patches whose bicubic window lies inside the old grid.

    A new patch centre lands at ``s = (j + 0.5) * old / new - 0.5`` in old patch indices; the
    (antialiased) cubic kernel reaches ``2 * max(1, old / new)`` old patches either side, and
    where that window would leave the grid the border is replicated, which a linear function
    does not survive.
    """
    j = torch.arange(new, dtype=torch.float64)
    s = (j + 0.5) * old / new - 0.5
    reach = 2 * max(1.0, old / new)
    ok = (s - reach >= 0) & (s + reach <= old - 1)
    return (ok[:, None] & ok[None, :]).reshape(-1)


# ---------------------------------------------------------------------------- no-op
def test_same_size_is_a_no_op():
    enc = _encoder()
    before = {name: p for name, p in enc.named_parameters()}
    values = {name: p.detach().clone() for name, p in before.items()}
    config = enc.config
    enc.resize_tiles(config.image_size)
    resize_image_encoder(enc, config.image_size)
    assert enc.config is config
    after = dict(enc.named_parameters())
    assert after.keys() == before.keys()
    for name, p in after.items():
        assert p is before[name], name
        assert torch.equal(p, values[name]), name


# ---------------------------------------------------------------------------- shapes and forward
def test_resize_up_and_down_keeps_a_working_encoder():
    cfg = TINY_IMAGE_ENCODER  # 28 px tiles of 14 px patches
    enc = _encoder(cfg)
    names = [name for name, _ in enc.named_parameters()]
    d, t, ids = cfg.width, cfg.max_num_tiles, cfg.num_aspect_ratio_ids

    for size, grid in ((56, 4), (28, 2)):
        resize_image_encoder(enc, size)
        p = grid * grid + 1
        assert enc.config == cfg.replace(image_size=size)
        assert (enc.image_size, enc.num_patches, enc.positional_embedding.num_patches) == (size, p, p)
        assert enc.positional_embedding.position.shape == (p, d)
        assert enc.positional_embedding.tile_position.weight.shape == (ids, t * p * d)
        assert enc.positional_embedding.tile_position.embedding_dim == t * p * d
        assert [name for name, _ in enc.named_parameters()] == names
        assert all(isinstance(q, torch.nn.Parameter) for q in enc.parameters())

        pixels, ar_ids, ar_mask = _inputs(enc.config)
        with torch.no_grad():
            out = enc(pixels, ar_ids, ar_mask)
        assert out.shape == (1, ids, t, p, cfg.output_dim)
        assert torch.isfinite(out).all()

        # The resized module behaves exactly like one built for the new size with its weights.
        fresh = ImageEncoder(enc.config).eval()
        fresh.load_state_dict(enc.state_dict(), strict=True)
        with torch.no_grad():
            torch.testing.assert_close(fresh(pixels, ar_ids, ar_mask), out, rtol=0, atol=0)

        # The old tile size is now refused by forward.
        wrong = torch.randn(1, 1, t, cfg.num_channels, 42, 42)
        with pytest.raises(ValueError, match="tiles must be"):
            enc(wrong, ar_ids[:, :1], ar_mask[:, :1])


def test_resized_tables_keep_dtype_device_and_trainability_and_learn():
    enc = _encoder().to(torch.bfloat16)
    enc.positional_embedding.tile_position.weight.requires_grad_(False)
    enc.resize_tiles(56)
    pos = enc.positional_embedding
    assert pos.position.dtype == pos.tile_position.weight.dtype == torch.bfloat16
    assert pos.position.requires_grad and not pos.tile_position.weight.requires_grad

    enc.float()
    optimizer = torch.optim.SGD([q for q in enc.parameters() if q.requires_grad], lr=0.1)
    pixels, ids, mask = _inputs(enc.config)
    start = pos.position.detach().clone()
    enc(pixels, ids, mask).square().mean().backward()
    assert pos.position.grad is not None and pos.position.grad.abs().sum() > 0
    assert pos.tile_position.weight.grad is None
    optimizer.step()
    assert not torch.equal(pos.position.detach(), start)


# ---------------------------------------------------------------------------- the interpolation itself
@pytest.mark.parametrize(("old_size", "new_size"), [(16, 32), (32, 16), (16, 24)])
def test_linear_position_fields_are_resampled_exactly_inside_the_grid(old_size, new_size):
    """Bicubic resampling reproduces a linear field of the patch centre; rows and columns get
    different slopes per feature, per aspect-ratio id and per tile, so a transposed or mis-ordered
    grid shows."""
    cfg = ImageEncoderConfig(
        image_size=old_size,
        patch_size=2,
        width=8,
        num_layers=1,
        num_global_layers=1,
        num_heads=2,
        mlp_dim=16,
        intermediate_layers=(0,),
    )
    enc = ImageEncoder(cfg)
    old, new = old_size // 2, new_size // 2
    d, t, ids = cfg.width, cfg.max_num_tiles, cfg.num_aspect_ratio_ids
    gen = torch.Generator().manual_seed(0)

    def field(g: int, slopes: torch.Tensor) -> torch.Tensor:
        rows, cols = _grid_coords(g)  # [g*g]
        a, b, c = slopes.unbind(-2)  # [..., d] each
        return a[..., None, :] * rows[:, None] + b[..., None, :] * cols[:, None] + c[..., None, :]

    pos_slopes = torch.randn(3, d, generator=gen, dtype=torch.float64)
    tile_slopes = torch.randn(ids, t, 3, d, generator=gen, dtype=torch.float64)
    pos_cls = torch.randn(1, d, generator=gen)
    tile_cls = torch.randn(ids, t, 1, d, generator=gen)
    with torch.no_grad():
        enc.positional_embedding.position.copy_(torch.cat([pos_cls, field(old, pos_slopes).float()]))
        tile = torch.cat([tile_cls, field(old, tile_slopes).float()], dim=2)  # [ids, t, p, d]
        enc.positional_embedding.tile_position.weight.copy_(rearrange(tile, "i t p d -> i (t p d)"))

    enc.resize_tiles(new_size)

    inside = _interior(old, new)
    assert inside.sum() >= 4
    position = enc.positional_embedding.position.detach()
    torch.testing.assert_close(
        position[1:][inside], field(new, pos_slopes)[inside].float(), atol=1e-5, rtol=0
    )
    tile = rearrange(
        enc.positional_embedding.tile_position.weight.detach(), "i (t p d) -> i t p d", t=t, p=new * new + 1
    )
    torch.testing.assert_close(
        tile[:, :, 1:][:, :, inside], field(new, tile_slopes)[:, :, inside].float(), atol=1e-5, rtol=0
    )

    # Class-token rows are copied, not interpolated.
    assert torch.equal(position[:1], pos_cls)
    assert torch.equal(tile[:, :, :1], tile_cls)


@pytest.mark.parametrize(("old", "new"), [(2, 4), (4, 2), (8, 12), (16, 8), (3, 7)])
def test_matches_pillow_bicubic_resize_everywhere(old, new):
    """Pillow's bicubic resize of each feature's grid (an independent implementation), borders included."""
    from PIL import Image

    gen = torch.Generator().manual_seed(old * 100 + new)
    table = torch.randn(2, 1 + old * old, 3, generator=gen)  # [m, p, d]
    out = resize_patch_grid(table, new)
    assert out.shape == (2, 1 + new * new, 3)
    for m in range(2):
        for c in range(3):
            grid = table[m, 1:, c].reshape(old, old).numpy()  # [rows, cols]
            ref = Image.fromarray(grid).resize((new, new), Image.Resampling.BICUBIC)
            expected = torch.from_numpy(np.asarray(ref).copy()).reshape(-1)
            torch.testing.assert_close(out[m, 1:, c], expected, atol=1e-5, rtol=0)
    assert torch.equal(out[:, :1], table[:, :1])


def test_constant_fields_stay_constant_everywhere():
    """A constant grid survives resampling at every position, borders and antialiasing included."""
    g = torch.Generator().manual_seed(1)
    values = torch.randn(2, 1, 5, generator=g)  # [m, 1, d]
    table = torch.cat([torch.randn(2, 1, 5, generator=g), values.expand(2, 16, 5)], dim=1)  # [m, 1+4*4, d]
    for grid in (2, 3, 7):
        out = resize_patch_grid(table, grid)
        assert out.shape == (2, 1 + grid * grid, 5)
        torch.testing.assert_close(out[:, 1:], values.expand(2, grid * grid, 5), atol=1e-5, rtol=0)
        assert torch.equal(out[:, :1], table[:, :1])
    assert resize_patch_grid(table, 4) is table


# ---------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("size", [30, 0, -14, 28.0, True, "56"])
def test_bad_sizes_are_refused_and_leave_the_encoder_alone(size):
    enc = _encoder()
    state = {k: v.clone() for k, v in enc.state_dict().items()}
    with pytest.raises(ValueError, match="image_size|multiple of patch_size"):
        enc.resize_tiles(size)
    assert enc.config == TINY_IMAGE_ENCODER
    assert all(torch.equal(v, state[k]) for k, v in enc.state_dict().items())


def test_only_the_llama3_encoder_resizes():
    with pytest.raises(TypeError, match="ImageEncoder"):
        resize_image_encoder(torch.nn.Linear(2, 2), 56)


def test_resize_patch_grid_rejects_tables_without_a_square_grid():
    with pytest.raises(ValueError, match="square patch grid"):
        resize_patch_grid(torch.zeros(6, 4), 3)
    with pytest.raises(ValueError, match="at least 1"):
        resize_patch_grid(torch.zeros(5, 4), 0)
