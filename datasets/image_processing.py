"""Image tiling for the image encoder, as in Llama 3.2 Vision (Llama 3 paper, section 7.1).

The image encoder sees square tiles (560 x 560 px for the released models). An image is fitted to
the best grid of at most ``max_tiles`` tiles for its aspect ratio, resized without distortion,
padded at the bottom and right, normalised with the CLIP mean and std, and cut into tiles. The grid
is sent along as an aspect-ratio id so the encoder can embed tile positions.

The output layout and every value equal Hugging Face's ``MllamaImageProcessor`` (transformers 5.x,
its torchvision backend, which the name ``MllamaImageProcessor`` resolves to) for equal settings:

* Grids are ``(rows, cols)`` pairs listed row count first: ``(1, 1), (1, 2), ..., (1, max_tiles),
  (2, 1), ...`` with ``rows * cols <= max_tiles``. ``aspect_ratio_ids`` are 1-based indices into
  that list; 0 marks a padding slot (a sample with fewer images than the batch maximum).
* The chosen grid is the one needing the least upscaling (scale = the smaller of the two
  canvas/image ratios); if every grid needs downscaling, the one needing the least downscaling;
  ties go to the smallest canvas, then to the earliest grid in the list.
* The image is resized (torchvision, uint8, antialiased) to keep its aspect ratio, with each side
  pulled into ``[tile_size, canvas side]`` first, then zero-padded (before normalisation, so padding
  becomes ``-mean / std``), normalised as ``(x - 255 mean) / (255 std)`` in float32 (the reference's
  fused rescale-and-normalise, so values agree bit for bit), and split row by row into tiles.
* ``aspect_ratio_mask`` marks the tiles an image uses; like the reference, the first tile of a
  padding slot is also marked 1 (the encoder then never sees a fully masked image). Unused tiles
  and padding slots have all-zero pixels.

``backend="pil"`` computes instead exactly what Meta's reference transform computes (llama-models
``VariableSizeImageTransform``, what the released weights were trained with): the same grid and
size, resized by PIL (``Image.resize``, bilinear), padded with black, then ``x / 255``, minus the
mean, divided by the std in float32. The two backends pick the same grids and sizes; PIL's and
torchvision's antialiased resizes differ by one 8-bit level on a few percent of the values of a
resized image, and the two normalisation orders by float rounding (~2e-7). Models imported from
Llama 3.2 Vision use ``"pil"``; ``"torchvision"`` (Hugging Face's default backend) is the default.

Unlike the reference, a batch may hold samples without images anywhere (transformers 5.24's
torchvision backend fails when the first sample has none and sizes ``aspect_ratio_ids``/``mask``
wrongly when a later one has none), and a batch without any image gives tensors with ``n = 0``.

Shapes: b batch, n images per sample (the batch maximum), t tiles (``max_tiles``), 3 RGB channels,
H = W = ``tile_size``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import torch
from einops import rearrange
from PIL import Image
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as tvF

from mm.datasets.images import DEFAULT_MAX_IMAGE_PIXELS, ImageError, ImageLike, load_image

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "ImageProcessor",
    "ProcessedImages",
    "fit_to_canvas",
    "optimal_tile_grid",
    "supported_aspect_ratios",
]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
"""Per-channel RGB mean of OpenAI CLIP, used by Llama 3.2 Vision."""
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
"""Per-channel RGB standard deviation of OpenAI CLIP, used by Llama 3.2 Vision."""

_RESCALE = 1 / 255
_INTERPOLATION = {
    "nearest": InterpolationMode.NEAREST_EXACT,  # what the reference maps PIL's NEAREST to
    "bilinear": InterpolationMode.BILINEAR,
    "bicubic": InterpolationMode.BICUBIC,
}
_PIL_RESAMPLE_CODES = {"nearest": 0, "bilinear": 2, "bicubic": 3}  # PIL.Image.Resampling values
BACKENDS = ("torchvision", "pil")

# Hugging Face preprocessor-config keys that carry no processing choice.
_HF_METADATA_KEYS = frozenset({"image_processor_type", "processor_class", "auto_map", "_processor_class"})


@lru_cache(maxsize=32)
def supported_aspect_ratios(max_tiles: int) -> tuple[tuple[int, int], ...]:
    """All tile grids ``(rows, cols)`` with ``rows * cols <= max_tiles``, in the id order.

    ``aspect_ratio_ids`` index this list from 1. (Hugging Face's docstring calls the pairs
    ``(width, height)``, but its code uses the first entry as the row count; the list is symmetric,
    so only the id assignment matters, and it is the same.)
    """
    if max_tiles < 1:
        raise ValueError(f"max_tiles must be >= 1, got {max_tiles}")
    return tuple(
        (r, c) for r in range(1, max_tiles + 1) for c in range(1, max_tiles + 1) if r * c <= max_tiles
    )


@lru_cache(maxsize=1024)
def optimal_tile_grid(height: int, width: int, *, tile_size: int, max_tiles: int) -> tuple[int, int]:
    """The grid ``(rows, cols)`` an image of ``height x width`` pixels is fitted to.

    Each grid's scale is the factor that fits the image inside its canvas. The smallest scale
    ``>= 1`` wins (least upscaling); if there is none, the largest (least downscaling). Among equal
    scales the smallest canvas wins, and among equal canvases the earliest grid in the list.
    """
    grids = supported_aspect_ratios(max_tiles)
    # Python float division of ints is correctly rounded, as the reference's float64 arithmetic.
    scales = [min(r * tile_size / height, c * tile_size / width) for r, c in grids]
    upscales = [s for s in scales if s >= 1]
    chosen = min(upscales) if upscales else max(scales)
    best: tuple[int, int] | None = None
    for grid, scale in zip(grids, scales):
        if scale == chosen and (best is None or grid[0] * grid[1] < best[0] * best[1]):
            best = grid
    assert best is not None
    return best


def fit_to_canvas(
    height: int, width: int, *, canvas_height: int, canvas_width: int, tile_size: int
) -> tuple[int, int]:
    """The ``(height, width)`` an image is resized to inside its canvas, keeping its aspect ratio.

    Each side's target is its own length clipped to ``[tile_size, canvas side]``; the side whose
    target needs the smaller scale takes its target exactly, the other is scaled by the same factor
    (rounded down, at least 1 and at most its own target).
    """
    target_h = min(max(height, tile_size), canvas_height)
    target_w = min(max(width, tile_size), canvas_width)
    scale_h = target_h / height
    scale_w = target_w / width
    if scale_w < scale_h:
        return min(math.floor(height * scale_w) or 1, target_h), target_w
    return target_h, min(math.floor(width * scale_h) or 1, target_w)


@dataclass(frozen=True)
class ProcessedImages:
    """A batch of tiled images, in the layout of Hugging Face's Mllama processor.

    Attributes:
        pixel_values: ``[b, n, t, 3, H, W]`` float32, normalised tiles; zero where unused.
        aspect_ratio_ids: ``[b, n]`` int64, 1-based index of each image's grid; 0 for padding slots.
        aspect_ratio_mask: ``[b, n, t]`` int64, 1 for the tiles an image uses (and for tile 0 of a
            padding slot, as in the reference).
        num_tiles: ``num_tiles[i][j]`` tiles used by image ``j`` of sample ``i`` (ragged, no padding).
    """

    pixel_values: torch.Tensor
    aspect_ratio_ids: torch.Tensor
    aspect_ratio_mask: torch.Tensor
    num_tiles: list[list[int]]


class ImageProcessor:
    """Turn per-sample lists of images into the tiled tensors the image encoder takes.

    Llama 3 paper, section 7.1; matches ``transformers.MllamaImageProcessor`` (see module docstring).

    Args:
        tile_size: Side of a square tile in pixels (560 for Llama 3.2 Vision).
        max_tiles: Most tiles one image may use (4 for Llama 3.2 Vision).
        mean: Per-channel RGB mean (of pixel values in ``[0, 1]``) subtracted before dividing by ``std``.
        std: Per-channel RGB standard deviation.
        max_image_pixels: Images with more pixels (width x height, read from the header before
            decoding) are refused with an :class:`~mm.datasets.images.ImageError`.
        resample: Resize interpolation: ``"bilinear"`` (the released models), ``"bicubic"`` or
            ``"nearest"``.
        backend: ``"torchvision"`` (Hugging Face's ``MllamaImageProcessor``) or ``"pil"`` (Meta's
            reference transform); see the module docstring.
    """

    def __init__(
        self,
        tile_size: int = 560,
        max_tiles: int = 4,
        *,
        mean: Sequence[float] = CLIP_MEAN,
        std: Sequence[float] = CLIP_STD,
        max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
        resample: str = "bilinear",
        backend: str = "torchvision",
    ) -> None:
        for name, value in (
            ("tile_size", tile_size),
            ("max_tiles", max_tiles),
            ("max_image_pixels", max_image_pixels),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        mean, std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f"mean and std need one value per RGB channel, got mean={mean}, std={std}")
        if not all(s > 0 for s in std):
            raise ValueError(f"std must be positive, got {std}")
        if resample not in _INTERPOLATION:
            raise ValueError(f"resample must be one of {sorted(_INTERPOLATION)}, got {resample!r}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.backend = backend
        self.tile_size = tile_size
        self.max_tiles = max_tiles
        self.mean = mean
        self.std = std
        self.max_image_pixels = max_image_pixels
        self.resample = resample
        # Rescale by 1/255 folded into mean and std in float32, exactly as the reference does it.
        self._mean_255 = (torch.tensor(mean, dtype=torch.float32) * (1.0 / _RESCALE)).view(3, 1, 1)
        self._std_255 = (torch.tensor(std, dtype=torch.float32) * (1.0 / _RESCALE)).view(3, 1, 1)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.to_dict().items())
        return f"{type(self).__name__}({args})"

    @property
    def supported_aspect_ratios(self) -> tuple[tuple[int, int], ...]:
        """The tile grids ``(rows, cols)``; ``aspect_ratio_ids`` index this from 1."""
        return supported_aspect_ratios(self.max_tiles)

    # ------------------------------------------------------------------ settings

    def to_dict(self) -> dict[str, Any]:
        """The settings as plain JSON-serialisable values (the inverse of :meth:`from_dict`)."""
        return {
            "tile_size": self.tile_size,
            "max_tiles": self.max_tiles,
            "mean": list(self.mean),
            "std": list(self.std),
            "max_image_pixels": self.max_image_pixels,
            "resample": self.resample,
            "backend": self.backend,
        }

    @classmethod
    def from_dict(cls, settings: Mapping[str, Any]) -> ImageProcessor:
        """Build from :meth:`to_dict` output; missing keys take defaults, unknown keys are an error."""
        allowed = {"tile_size", "max_tiles", "mean", "std", "max_image_pixels", "resample", "backend"}
        unknown = sorted(set(settings) - allowed)
        if unknown:
            raise ValueError(f"unknown ImageProcessor settings {unknown}; allowed: {sorted(allowed)}")
        return cls(**settings)

    def to_hf_config(self) -> dict[str, Any]:
        """The equivalent Hugging Face ``preprocessor_config.json`` content for ``MllamaImageProcessor``."""
        return {
            "image_processor_type": "MllamaImageProcessor",
            "do_convert_rgb": True,
            "do_resize": True,
            "do_rescale": True,
            "do_normalize": True,
            "do_pad": True,
            "size": {"height": self.tile_size, "width": self.tile_size},
            "max_image_tiles": self.max_tiles,
            "resample": _PIL_RESAMPLE_CODES[self.resample],
            "rescale_factor": _RESCALE,
            "image_mean": list(self.mean),
            "image_std": list(self.std),
        }

    @classmethod
    def from_hf_config(
        cls, config: Mapping[str, Any], *, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    ) -> ImageProcessor:
        """Build from a Hugging Face Mllama ``preprocessor_config.json`` (as a dict).

        Missing keys take the *Hugging Face class* defaults (224 px tiles, mean and std 0.5), as
        transformers would. Settings this processor cannot reproduce are an error.
        """
        processing = {k: v for k, v in config.items() if k not in _HF_METADATA_KEYS}
        known = {
            "do_convert_rgb",
            "do_resize",
            "do_rescale",
            "do_normalize",
            "do_pad",
            "size",
            "max_image_tiles",
            "resample",
            "rescale_factor",
            "image_mean",
            "image_std",
        }
        unknown = sorted(set(processing) - known)
        if unknown:
            raise ValueError(f"unsupported keys in Mllama preprocessor config: {unknown}")
        for flag in ("do_convert_rgb", "do_resize", "do_rescale", "do_normalize", "do_pad"):
            if processing.get(flag, True) is not True:
                raise ValueError(
                    f"Mllama preprocessor config sets {flag}={processing[flag]!r}; only True is supported"
                )
        if not math.isclose(float(processing.get("rescale_factor", _RESCALE)), _RESCALE, rel_tol=1e-12):
            raise ValueError(f"rescale_factor must be 1/255, got {processing['rescale_factor']!r}")
        size = processing.get("size", {"height": 224, "width": 224})
        if set(size) != {"height", "width"} or size["height"] != size["width"]:
            raise ValueError(f"size must be square {{'height': s, 'width': s}}, got {size!r}")
        codes = {code: name for name, code in _PIL_RESAMPLE_CODES.items()}
        resample = processing.get("resample", 2)
        if resample not in codes:
            raise ValueError(f"resample {resample!r} unsupported; supported PIL codes: {codes}")
        return cls(
            tile_size=int(size["height"]),
            max_tiles=int(processing.get("max_image_tiles", 4)),
            mean=processing.get("image_mean", (0.5, 0.5, 0.5)),
            std=processing.get("image_std", (0.5, 0.5, 0.5)),
            max_image_pixels=max_image_pixels,
            resample=codes[resample],
        )

    # ------------------------------------------------------------------ processing

    def tile(self, image: ImageLike) -> tuple[torch.Tensor, tuple[int, int]]:
        """Load, fit, pad, normalise and cut one image.

        Returns:
            The tiles ``[k, 3, H, W]`` (float32, ``k = rows * cols``, row by row) and the grid ``(rows, cols)``.
        """
        return self._tile_rgb(load_image(image, max_pixels=self.max_image_pixels))

    def _tile_rgb(self, rgb: Image.Image) -> tuple[torch.Tensor, tuple[int, int]]:
        width, height = rgb.size
        size = self.tile_size
        rows, cols = optimal_tile_grid(height, width, tile_size=size, max_tiles=self.max_tiles)
        new_h, new_w = fit_to_canvas(
            height, width, canvas_height=rows * size, canvas_width=cols * size, tile_size=size
        )
        if self.backend == "pil":  # PIL returns a copy when the size does not change
            rgb = rgb.resize((new_w, new_h), resample=_PIL_RESAMPLE_CODES[self.resample])
        pixels = torch.from_numpy(np.array(rgb, dtype=np.uint8)).permute(2, 0, 1).contiguous()  # [3, h, w]
        if self.backend == "torchvision":
            pixels = tvF.resize(
                pixels, [new_h, new_w], interpolation=_INTERPOLATION[self.resample], antialias=True
            )
        canvas = torch.zeros(3, rows * size, cols * size, dtype=torch.uint8)
        canvas[:, :new_h, :new_w] = pixels  # pad bottom and right with 0 before normalising
        if self.backend == "pil":  # Meta: ToTensor (x / 255), then Normalize (- mean, / std)
            mean = torch.tensor(self.mean, dtype=torch.float32).view(3, 1, 1)
            std = torch.tensor(self.std, dtype=torch.float32).view(3, 1, 1)
            normalised = canvas.to(torch.float32).div(255).sub_(mean).div_(std)
        else:
            normalised = (canvas.to(torch.float32) - self._mean_255) / self._std_255
        tiles = rearrange(normalised, "c (r h) (k w) -> (r k) c h w", r=rows, k=cols)  # [k, 3, H, W]
        return tiles, (rows, cols)

    def __call__(self, images: Sequence[Sequence[ImageLike]]) -> ProcessedImages:
        """Process a batch: ``images[i]`` is the (possibly empty) list of images of sample ``i``.

        Each image may be a PIL image, a file path, encoded bytes or a binary file object; see
        :func:`~mm.datasets.images.load_image` for decoding, orientation and colour handling.

        Returns:
            A :class:`ProcessedImages` with ``n`` = the most images any sample has.

        Raises:
            ImageError: If an image cannot be used; the message names the sample and image index.
            TypeError: If ``images`` is not a list of per-sample lists.
        """
        if not isinstance(images, (list, tuple)) or not all(isinstance(s, (list, tuple)) for s in images):
            raise TypeError(
                "images must be a list with one list of images per sample, e.g. [[img], [], [img1, img2]]; "
                f"got {type(images).__name__}"
                + ("" if not isinstance(images, (list, tuple)) else " whose items are not all lists")
            )
        b, t, size = len(images), self.max_tiles, self.tile_size
        n = max((len(sample) for sample in images), default=0)
        pixel_values = torch.zeros(b, n, t, 3, size, size, dtype=torch.float32)
        aspect_ratio_ids = torch.zeros(b, n, dtype=torch.long)
        aspect_ratio_mask = torch.zeros(b, n, t, dtype=torch.long)
        aspect_ratio_mask[:, :, 0] = 1  # padding slots too, as the reference
        ids = {grid: k + 1 for k, grid in enumerate(self.supported_aspect_ratios)}
        num_tiles: list[list[int]] = []
        for i, sample in enumerate(images):
            counts = []
            for j, image in enumerate(sample):
                try:
                    tiles, grid = self.tile(image)
                except ImageError as e:
                    raise ImageError(f"sample {i}, image {j}: {e}") from e
                k = tiles.shape[0]
                pixel_values[i, j, :k] = tiles
                aspect_ratio_ids[i, j] = ids[grid]
                aspect_ratio_mask[i, j, :k] = 1
                counts.append(k)
            num_tiles.append(counts)
        return ProcessedImages(pixel_values, aspect_ratio_ids, aspect_ratio_mask, num_tiles)
