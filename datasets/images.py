"""Safe image loading: any common image source to an upright 8-bit RGB ``PIL.Image``.

Images reach the model through :class:`mm.datasets.ImageProcessor` (Llama 3 paper, section 7.1,
"image encoder": RGB tiles); this module is the guarded door in front of it. Training data and
server requests are untrusted, so loading refuses, with an :class:`ImageError` naming the problem,
instead of crashing, hanging or allocating without bound:

* **Size is checked from the header, before any pixel is decoded.** ``PIL.Image.open`` only reads
  the header, so an image claiming more than ``max_pixels`` pixels (a decompression bomb, or just
  an absurd size) costs nothing to refuse. Zero width or height is refused too.
* **PIL's own process-wide guard** (``PIL.Image.MAX_IMAGE_PIXELS``) is never modified here. Its
  warning is silenced while opening, because the ``max_pixels`` check replaces it; its error, which
  fires above ``2 * MAX_IMAGE_PIXELS`` (about 179 M pixels by default) before the header size can be
  seen, becomes an :class:`ImageError`. A ``max_pixels`` above that bound therefore also needs the
  application to raise ``PIL.Image.MAX_IMAGE_PIXELS``; the error message says so. (Silencing uses
  ``warnings.catch_warnings``, which in Python < 3.14 briefly swaps the process's warning filters.)
* **Truncated files are errors.** Pixels are decoded eagerly (``.load()``) with PIL's
  ``ImageFile.LOAD_TRUNCATED_IMAGES`` left as it is (``False`` unless the application changed it),
  so a cut-off file is never silently half-decoded.

Orientation and colour, in this order:

1. EXIF orientation is applied (``ImageOps.exif_transpose``) to every decoded file, so the result
   is the upright picture a viewer shows. That includes a PIL image straight from ``Image.open``
   (its ``format`` is set), but not a PIL image made in memory (``format`` is ``None``: converted,
   rotated, drawn, ...): such pixels are taken as they are, because ``convert`` and ``transpose``
   copy the file's EXIF along, and re-applying it would rotate an image its owner already handled.
   (Hugging Face applies EXIF in its file loader and never to PIL images passed in.)
2. 16-bit greyscale (``I;16*``, and ``I``, which is how PIL represents 16-bit greyscale from several
   formats) is scaled to 8 bits as ``round(v * 255 / 65535)`` (``I`` is first clipped to
   ``[0, 65535]``). PIL's own conversion (used by Hugging Face) clips at 255 instead, which turns
   nearly every 16-bit image white. A 16-bit ``transparency`` value becomes white, as below.
3. Transparency is composited onto a white background, exactly as Hugging Face's
   ``convert_to_rgb`` does: an image with an alpha band (``RGBA``, ``LA``, ``PA``) or a
   ``transparency`` entry (palette or greyscale/RGB with a transparent colour) is converted to
   ``RGBA`` and alpha-composited over opaque white with ``PIL.Image.alpha_composite``.
4. Everything else (``L``, ``1``, ``P``, ``CMYK``, ``YCbCr``, ``F``, ...) uses PIL's own
   ``convert("RGB")``, as Hugging Face does.

Multi-frame files (GIF, TIFF, ...) give their first frame.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps

from mm.datasets._media_file import read_media_file

__all__ = ["DEFAULT_MAX_IMAGE_PIXELS", "ImageError", "ImageLike", "load_image", "to_rgb"]

DEFAULT_MAX_IMAGE_PIXELS = 64_000_000
"""Default refusal limit in pixels (width x height): 8000 x 8000, far above any camera photo."""

ImageLike = Image.Image | str | os.PathLike | bytes | bytearray | memoryview | BinaryIO
"""What :func:`load_image` accepts: a PIL image, a file path, encoded bytes, or a binary file object."""

_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})


class ImageError(ValueError):
    """An image that cannot be used: unreadable, truncated, not an image, empty or too large."""


def load_image(source: ImageLike, *, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """Load ``source`` as an upright 8-bit RGB image, refusing anything unsafe or broken.

    Args:
        source: A ``PIL.Image.Image``, a file path (``str`` or ``os.PathLike``), encoded image bytes
            (``bytes``, ``bytearray`` or ``memoryview``), or a binary file object open for reading.
        max_pixels: Largest accepted ``width * height``. Checked from the header before decoding.

    Returns:
        A new, fully decoded ``PIL.Image.Image`` in mode ``RGB`` (the caller's image is not modified).

    Raises:
        ImageError: If the source cannot be read or decoded (missing file, not an image, truncated,
            corrupt), has zero width or height, or has more than ``max_pixels`` pixels.
        TypeError: If ``source`` is of an unsupported type.
    """
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels <= 0:
        raise ValueError(f"max_pixels must be a positive int, got {max_pixels!r}")
    if isinstance(source, Image.Image):
        return _finish(source, _describe(source), max_pixels)
    label = _describe(source)
    if isinstance(source, (str, os.PathLike)):
        fp: BinaryIO | str | os.PathLike = io.BytesIO(
            read_media_file(source, kind="image", error=ImageError, missing=ImageError)
        )
    elif isinstance(source, (bytes, bytearray, memoryview)):
        if not memoryview(source).nbytes:
            raise ImageError(f"{label}: empty, there is no image data")
        fp = io.BytesIO(bytes(source))
    elif hasattr(source, "read"):
        fp = source
    else:
        raise TypeError(
            "image source must be a PIL image, a file path, bytes or a binary file object, "
            f"got {type(source).__name__}"
        )
    image = _open(fp, label)
    try:
        return _finish(image, label, max_pixels)
    finally:
        if fp is not source or not hasattr(source, "read"):
            image.close()  # PIL's close() would also close a caller's file object: leave that one open


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert a decoded image of any mode to 8-bit ``RGB`` (rules 2-4 of the module docstring)."""
    if image.mode in _SIXTEEN_BIT_MODES:
        return _sixteen_bit_to_rgb(image)
    has_alpha = "A" in image.getbands() or image.info.get("transparency") is not None
    if has_alpha:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def _open(fp: BinaryIO | str | os.PathLike, label: str) -> Image.Image:
    """Open lazily (header only), turning every failure into an :class:`ImageError`."""
    try:
        with warnings.catch_warnings():
            # The max_pixels check in _finish replaces PIL's warning; its hard error still applies.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(fp)
    except Image.DecompressionBombError as e:
        raise ImageError(
            f"{label}: refused as a possible decompression bomb by PIL's process-wide guard ({e}); "
            "raise PIL.Image.MAX_IMAGE_PIXELS in your application to accept such images"
        ) from e
    except FileNotFoundError as e:
        raise ImageError(f"{label}: no such file") from e
    except Image.UnidentifiedImageError as e:
        raise ImageError(
            f"{label}: not an image, or its header is corrupt (no image format recognises it)"
        ) from e
    except Exception as e:  # decoders raise many types (OSError, SyntaxError, struct.error, ...)
        raise ImageError(
            f"{label}: cannot read image header (truncated or corrupt?): {type(e).__name__}: {e}"
        ) from e


def _finish(image: Image.Image, label: str, max_pixels: int) -> Image.Image:
    """Check the size, decode every pixel, apply EXIF orientation and convert to RGB."""
    width, height = image.size
    if width <= 0 or height <= 0:
        raise ImageError(f"{label}: image has zero size ({width} x {height} pixels)")
    if width * height > max_pixels:
        raise ImageError(
            f"{label}: image is {width} x {height} = {width * height} pixels, more than the limit of "
            f"{max_pixels} pixels (max_pixels); refusing it as a possible decompression bomb"
        )
    try:
        image.load()
    except Exception as e:
        raise ImageError(
            f"{label}: cannot decode image (truncated or corrupt?): {type(e).__name__}: {e}"
        ) from e
    upright = image
    if image.format is not None:  # decoded from a file, not made in memory
        try:
            upright = ImageOps.exif_transpose(image)
        except Exception as e:
            raise ImageError(f"{label}: cannot apply EXIF orientation: {type(e).__name__}: {e}") from e
    try:
        return to_rgb(upright)
    except Exception as e:
        raise ImageError(f"{label}: cannot convert mode {upright.mode!r} to RGB: {e}") from e


def _sixteen_bit_to_rgb(image: Image.Image) -> Image.Image:
    """Scale 16-bit greyscale to 8 bits by rounding ``v * 255 / 65535``; transparent value -> white."""
    values = np.asarray(image).astype(np.int64)
    clipped = np.clip(values, 0, 65535)
    grey = ((clipped * 255 + 32767) // 65535).astype(np.uint8)  # round(v * 255 / 65535), exact
    transparent = image.info.get("transparency")
    if isinstance(transparent, int):
        grey[values == transparent] = 255
    return Image.fromarray(grey).convert("RGB")


def _describe(source: object) -> str:
    """A short label naming the source in error messages."""
    if isinstance(source, Image.Image):
        return f"PIL image ({source.mode}, {source.size[0]} x {source.size[1]})"
    if isinstance(source, (str, os.PathLike)):
        return f"image file {str(Path(source))!r}"
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"image bytes ({len(source)} bytes)"
    name = getattr(source, "name", None)
    return f"image file object {name!r}" if isinstance(name, str) else "image file object"
