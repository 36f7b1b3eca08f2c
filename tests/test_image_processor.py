"""mm.datasets.ImageProcessor / load_image against Hugging Face's MllamaImageProcessor.

Reference: ``transformers.MllamaImageProcessor`` (transformers 5.x), which resolves to the
*torchvision* backend (``TorchvisionBackend``: uint8 antialiased bilinear resize, fused
rescale+normalise). Pixel values are compared with it at ``atol=1e-6`` (they agree bit for bit).
The PIL backend (``MllamaImageProcessorPil``) is used only where the torchvision backend is broken:
batches in which some sample has no image (it drops those samples from ``aspect_ratio_ids`` /
``aspect_ratio_mask``, or fails when the first sample has none). The two backends' resizers
disagree by one 8-bit level on some pixels, so only its layout (ids, mask, num_tiles) is compared.

Tiles are tiny (16-56 px) to keep every test fast.
"""

from __future__ import annotations

import io
import struct
import warnings
import zlib

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from mm.datasets.image_processing import (
    CLIP_MEAN,
    CLIP_STD,
    ImageProcessor,
    ProcessedImages,
    fit_to_canvas,
    optimal_tile_grid,
    supported_aspect_ratios,
)
from mm.datasets.images import ImageError, load_image

transformers = pytest.importorskip("transformers")
from transformers.models.mllama import image_processing_mllama as hf_mllama  # noqa: E402

ATOL = 1e-6


def hf_processor(tile_size: int, max_tiles: int, backend: str = "torchvision", **kwargs):
    cls = (
        transformers.MllamaImageProcessor
        if backend == "torchvision"
        else transformers.MllamaImageProcessorPil
    )
    kwargs.setdefault("image_mean", list(CLIP_MEAN))
    kwargs.setdefault("image_std", list(CLIP_STD))
    return cls(size={"height": tile_size, "width": tile_size}, max_image_tiles=max_tiles, **kwargs)


def random_image(height: int, width: int, seed: int, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    if mode == "RGB":
        return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    if mode == "RGBA":
        return Image.fromarray(rng.integers(0, 256, (height, width, 4), dtype=np.uint8))
    if mode == "L":
        return Image.fromarray(rng.integers(0, 256, (height, width), dtype=np.uint8))
    if mode == "LA":
        return Image.fromarray(rng.integers(0, 256, (height, width, 4), dtype=np.uint8)).convert("LA")
    if mode == "1":
        return Image.fromarray(rng.integers(0, 2, (height, width), dtype=np.uint8) * 255).convert("1")
    if mode == "CMYK":
        return Image.fromarray(rng.integers(0, 256, (height, width, 4), dtype=np.uint8), mode="CMYK")
    if mode in ("P", "P-transparency"):
        image = random_image(height, width, seed).quantize(colors=16)
        if mode == "P-transparency":
            image.info["transparency"] = 3
        return image
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 65536, (height, width), dtype=np.uint16))
    raise ValueError(mode)


def assert_matches(ours: ProcessedImages, ref) -> None:
    assert ours.pixel_values.dtype == torch.float32
    assert ours.pixel_values.shape == ref["pixel_values"].shape
    torch.testing.assert_close(ours.pixel_values, ref["pixel_values"], atol=ATOL, rtol=0)
    assert torch.equal(ours.aspect_ratio_ids, ref["aspect_ratio_ids"])
    assert torch.equal(ours.aspect_ratio_mask, ref["aspect_ratio_mask"])
    assert ours.num_tiles == ref["num_tiles"]


def png_bytes(image: Image.Image, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG", **kwargs)
    return buffer.getvalue()


def jpeg_bytes(image: Image.Image, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=95, **kwargs)
    return buffer.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width x height`` RGB pixels but holds no pixel data (costs ~60 bytes)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b""))
        + chunk(b"IEND", b"")
    )


def jpeg_with_claimed_size(width: int, height: int) -> bytes:
    """A valid small JPEG with its SOF0 frame header patched to claim ``width x height``."""
    data = bytearray(jpeg_bytes(random_image(16, 16, seed=0)))
    sof = data.index(
        b"\xff\xc0"
    )  # baseline frame header: marker, length(2), precision(1), height(2), width(2)
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


# ----------------------------------------------------------------------------- grid geometry


@pytest.mark.parametrize("max_tiles", range(1, 10))
def test_supported_aspect_ratios_match_reference(max_tiles):
    ours = supported_aspect_ratios(max_tiles)
    assert list(ours) == hf_mllama.get_all_supported_aspect_ratios(max_tiles)
    assert ImageProcessor(16, max_tiles).supported_aspect_ratios == ours


@pytest.mark.parametrize(("tile_size", "max_tiles"), [(28, 4), (16, 1), (16, 6), (10, 9), (560, 4)])
def test_grid_and_fit_match_reference_over_many_sizes(tile_size, max_tiles):
    rng = np.random.default_rng(tile_size * 100 + max_tiles)
    edges = [1, 2, tile_size - 1, tile_size, tile_size + 1, 2 * tile_size, 3 * tile_size + 1, 5 * tile_size]
    sizes = [(h, w) for h in edges for w in edges]
    sizes += [tuple(int(v) for v in rng.integers(1, 6 * tile_size, 2)) for _ in range(300)]
    for height, width in sizes:
        canvas_h, canvas_w = hf_mllama.get_optimal_tiled_canvas(height, width, max_tiles, tile_size)
        rows, cols = optimal_tile_grid(height, width, tile_size=tile_size, max_tiles=max_tiles)
        assert (rows * tile_size, cols * tile_size) == (canvas_h, canvas_w), (height, width)
        expected = hf_mllama.get_image_size_fit_to_canvas(height, width, canvas_h, canvas_w, tile_size)
        ours = fit_to_canvas(
            height, width, canvas_height=canvas_h, canvas_width=canvas_w, tile_size=tile_size
        )
        assert ours == tuple(int(v) for v in expected), (height, width)


# ----------------------------------------------------------------------------- parity: sizes

SIZES = [
    (1, 1),  # tiny
    (1, 97),  # 1 x N strip
    (3, 200),  # wide strip beyond any canvas
    (131, 1),  # N x 1 strip
    (28, 28),  # exactly one tile
    (27, 29),  # around one tile
    (10, 17),  # smaller than a tile
    (56, 56),  # exactly 2 x 2 tiles
    (30, 50),  # upscaled to 2 x 2
    (90, 20),  # tall
    (40, 120),  # wide
    (300, 260),  # larger than the biggest canvas
    (513, 77),
    (64, 64),
]


@pytest.mark.parametrize(("tile_size", "max_tiles"), [(28, 4), (16, 6), (20, 1)])
def test_matches_reference_over_many_sizes(tile_size, max_tiles):
    images = [random_image(h, w, seed=k) for k, (h, w) in enumerate(SIZES)]
    batch = [images[:5], images[5:7], images[7:]]  # samples with different image counts
    ours = ImageProcessor(tile_size, max_tiles)(batch)
    ref = hf_processor(tile_size, max_tiles)(batch, return_tensors="pt")
    assert_matches(ours, ref)
    assert ours.pixel_values.shape == (3, len(SIZES) - 7, max_tiles, 3, tile_size, tile_size)


def test_matches_reference_on_random_sizes():
    rng = np.random.default_rng(1)
    images = [random_image(int(h), int(w), seed=k) for k, (h, w) in enumerate(rng.integers(1, 200, (24, 2)))]
    batch = [images[k : k + 3] for k in range(0, len(images), 3)]
    assert_matches(ImageProcessor(32, 4)(batch), hf_processor(32, 4)(batch, return_tensors="pt"))


def test_matches_reference_at_llama_settings():
    """The released model's settings (560 px tiles, 4 tiles, CLIP mean/std, bilinear) are the defaults."""
    batch = [[random_image(400, 900, seed=0)], [random_image(700, 500, seed=1), random_image(50, 40, seed=2)]]
    ours = ImageProcessor()(batch)
    assert_matches(ours, hf_processor(560, 4)(batch, return_tensors="pt"))
    assert ours.pixel_values.shape == (2, 2, 4, 3, 560, 560)


@pytest.mark.parametrize("resample", ["bicubic", "nearest"])
def test_matches_reference_with_other_resampling(resample):
    batch = [[random_image(h, w, seed=k) for k, (h, w) in enumerate(SIZES)]]
    ours = ImageProcessor(28, 4, resample=resample)(batch)
    code = {"bicubic": Image.Resampling.BICUBIC, "nearest": Image.Resampling.NEAREST}[resample]
    assert_matches(ours, hf_processor(28, 4, resample=code)(batch, return_tensors="pt"))


def test_matches_reference_with_other_mean_std():
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    batch = [[random_image(50, 70, seed=3), random_image(9, 9, seed=4)]]
    ours = ImageProcessor(28, 4, mean=mean, std=std)(batch)
    ref = hf_processor(28, 4, image_mean=list(mean), image_std=list(std))(batch, return_tensors="pt")
    assert_matches(ours, ref)


# ----------------------------------------------------------------------------- parity: modes


@pytest.mark.parametrize("mode", ["RGB", "L", "LA", "RGBA", "P", "P-transparency", "1", "CMYK"])
def test_matches_reference_for_image_modes(mode):
    images = [random_image(h, w, seed=k, mode=mode) for k, (h, w) in enumerate([(30, 50), (7, 90), (61, 61)])]
    batch = [images[:1], images[1:]]
    assert_matches(ImageProcessor(28, 4)(batch), hf_processor(28, 4)(batch, return_tensors="pt"))


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P-transparency"])
def test_transparency_is_composited_on_white(mode):
    image = random_image(6, 5, seed=0, mode=mode)
    rgb = np.asarray(load_image(image), dtype=np.float64)
    rgba = np.asarray(image.convert("RGBA"), dtype=np.float64)
    alpha = rgba[..., 3:] / 255
    expected = rgba[..., :3] * alpha + 255 * (1 - alpha)
    assert np.abs(rgb - expected).max() <= 1.0  # PIL's integer compositing rounds
    assert (alpha < 1).any()  # the test image really has transparency


def test_sixteen_bit_is_scaled_not_clipped():
    values = np.array([[0, 1, 128, 129, 257, 32896, 65279, 65535]], dtype=np.uint16)
    expected = np.round(values.astype(np.float64) * 255 / 65535).astype(np.uint8)
    for source in (Image.fromarray(values), png_bytes(Image.fromarray(values))):
        rgb = np.asarray(load_image(source))
        assert rgb.shape == (1, 8, 3)
        assert np.array_equal(rgb[..., 0], expected) and np.array_equal(rgb[..., 2], expected)
    as_int32 = Image.fromarray(values.astype(np.int32))  # mode "I"
    assert as_int32.mode == "I"
    assert np.array_equal(np.asarray(load_image(as_int32))[..., 1], expected)


def test_sixteen_bit_processing_equals_reference_on_scaled_image():
    """Hugging Face clips 16-bit values at 255 (PIL's convert); mm scales them. Given the 8-bit
    scaled image, the reference produces exactly what mm produces from the 16-bit original."""
    image = random_image(45, 70, seed=5, mode="I;16")
    values = np.asarray(image).astype(np.float64)
    scaled = Image.fromarray(np.round(values * 255 / 65535).astype(np.uint8)).convert("RGB")
    assert_matches(ImageProcessor(28, 4)([[image]]), hf_processor(28, 4)([[scaled]], return_tensors="pt"))


# ----------------------------------------------------------------------------- batches


def test_batches_with_empty_samples():
    """Layout from the PIL backend (the torchvision one mishandles empty samples); pixels of each
    sample from the torchvision backend run on that sample alone."""
    a, b, c = random_image(30, 50, seed=0), random_image(90, 20, seed=1), random_image(20, 20, seed=2)
    for batch in ([[], [a]], [[a], [], [b, c]], [[b, c], [], [], [a]]):
        ours = ImageProcessor(28, 4)(batch)
        layout = hf_processor(28, 4, backend="pil")(batch, return_tensors="pt")
        assert torch.equal(ours.aspect_ratio_ids, layout["aspect_ratio_ids"])
        assert torch.equal(ours.aspect_ratio_mask, layout["aspect_ratio_mask"])
        assert ours.num_tiles == layout["num_tiles"]
        assert ours.pixel_values.shape == layout["pixel_values"].shape
        for i, sample in enumerate(batch):
            if sample:
                ref = hf_processor(28, 4)([sample], return_tensors="pt")["pixel_values"][0]
                torch.testing.assert_close(ours.pixel_values[i, : len(sample)], ref, atol=ATOL, rtol=0)
            assert not ours.pixel_values[i, len(sample) :].any()  # padding slots are zero
            assert not ours.aspect_ratio_ids[i, len(sample) :].any()


def test_batch_without_images():
    out = ImageProcessor(16, 3)([[], []])
    assert out.pixel_values.shape == (2, 0, 3, 3, 16, 16)
    assert out.aspect_ratio_ids.shape == (2, 0) and out.aspect_ratio_ids.dtype == torch.long
    assert out.aspect_ratio_mask.shape == (2, 0, 3) and out.aspect_ratio_mask.dtype == torch.long
    assert out.num_tiles == [[], []]
    empty = ImageProcessor(16, 3)([])
    assert empty.pixel_values.shape == (0, 0, 3, 3, 16, 16) and empty.num_tiles == []


def test_batched_equals_one_at_a_time():
    images = [random_image(h, w, seed=k) for k, (h, w) in enumerate([(30, 50), (90, 20), (5, 5)])]
    processor = ImageProcessor(16, 4)
    batched = processor([images[:2], images[2:]])
    for i, j, image in [(0, 0, images[0]), (0, 1, images[1]), (1, 0, images[2])]:
        alone = processor([[image]])
        assert torch.equal(batched.pixel_values[i, j], alone.pixel_values[0, 0])
        assert batched.aspect_ratio_ids[i, j] == alone.aspect_ratio_ids[0, 0]


def test_input_must_be_nested_lists():
    processor = ImageProcessor(16, 4)
    with pytest.raises(TypeError, match="one list of images per sample"):
        processor([random_image(5, 5, seed=0)])
    with pytest.raises(TypeError, match="one list of images per sample"):
        processor(random_image(5, 5, seed=0))
    with pytest.raises(TypeError, match="file object"):
        processor([[12345]])


# ----------------------------------------------------------------------------- sources and EXIF


def test_every_source_kind_gives_the_same_result(tmp_path):
    image = random_image(33, 47, seed=7)
    data = png_bytes(image)
    path = tmp_path / "image.png"
    path.write_bytes(data)
    processor = ImageProcessor(16, 4)
    expected = processor([[image]]).pixel_values
    with open(path, "rb") as file:
        sources = [str(path), path, data, bytearray(data), memoryview(data), io.BytesIO(data), file]
        for source in sources:
            assert torch.equal(processor([[source]]).pixel_values, expected), type(source)
        assert not file.closed  # the caller's file object is left open


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_exif_orientation_is_applied(tmp_path, fmt):
    # Stored 40 wide x 20 high: left half red, right half blue. Orientation 6 says "rotate 90 degrees
    # clockwise to display", so the upright image is 20 wide x 40 high, red on top, blue below.
    stored = np.zeros((20, 40, 3), dtype=np.uint8)
    stored[:, :20] = (255, 0, 0)
    stored[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / f"rotated.{fmt.lower()}"
    Image.fromarray(stored).save(path, fmt, exif=exif.tobytes(), **({"quality": 95} if fmt == "JPEG" else {}))

    upright = load_image(path)
    assert upright.size == (20, 40)
    pixels = np.asarray(upright, dtype=np.int64)
    assert np.abs(pixels[:16] - (255, 0, 0)).max() < 40  # JPEG is lossy near the colour edge
    assert np.abs(pixels[24:] - (0, 0, 255)).max() < 40

    with Image.open(path) as raw:  # the stored pixels, rotated by hand
        by_hand = raw.convert("RGB").transpose(Image.Transpose.ROTATE_270)
    assert np.array_equal(np.asarray(upright), np.asarray(by_hand))
    processor = ImageProcessor(16, 4)
    assert torch.equal(processor([[path]]).pixel_values, processor([[by_hand]]).pixel_values)
    # Hugging Face's own loader also honours EXIF: its image through the reference gives the same output.
    reference_image = transformers.image_utils.load_image(str(path))
    assert_matches(processor([[path]]), hf_processor(16, 4)([[reference_image]], return_tensors="pt"))


def test_exif_orientation_of_a_pil_image_source():
    exif = Image.Exif()
    exif[0x0112] = 3  # rotate 180
    image = random_image(8, 12, seed=0)
    with Image.open(io.BytesIO(png_bytes(image, exif=exif.tobytes()))) as opened:
        loaded = load_image(opened)  # straight from a file: its orientation applies
        assert np.array_equal(np.asarray(loaded), np.asarray(image)[::-1, ::-1])
        in_memory = opened.convert("RGB")  # carries the EXIF along, but is the owner's pixels
        assert in_memory.getexif().get(0x0112) == 3
        assert np.array_equal(np.asarray(load_image(in_memory)), np.asarray(image))


# ----------------------------------------------------------------------------- bad images


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_file_is_an_error(fmt):
    data = (png_bytes if fmt == "PNG" else jpeg_bytes)(random_image(64, 48, seed=0))
    for cut in (len(data) // 2, 200):
        with pytest.raises(ImageError, match="truncated"):
            load_image(data[:cut])
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_header_only_file_is_an_error():
    with pytest.raises(ImageError, match="truncated"):
        load_image(png_header_only(5, 5))


def test_not_an_image_is_an_error(tmp_path):
    junk = np.random.default_rng(0).integers(0, 256, 1000, dtype=np.uint8).tobytes()
    with pytest.raises(ImageError, match="not an image"):
        load_image(junk)
    text = tmp_path / "notes.txt"
    text.write_text("definitely not an image\n")
    with pytest.raises(ImageError, match="notes.txt.*not an image"):
        load_image(text)
    with pytest.raises(ImageError, match="no such file"):
        load_image(tmp_path / "missing.png")


def test_zero_size_is_an_error(tmp_path):
    with pytest.raises(ImageError, match="empty"):
        load_image(b"")
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    with pytest.raises(ImageError, match="empty file"):
        load_image(empty)
    with pytest.raises(ImageError, match=r"zero size \(0 x 5"):
        load_image(Image.new("RGB", (0, 5)))
    with pytest.raises(ImageError):  # PIL itself rejects a PNG header with zero width
        load_image(png_header_only(0, 10))


def test_decompression_bomb_is_refused_before_decoding():
    pil_limit = Image.MAX_IMAGE_PIXELS
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no DecompressionBombWarning may escape either
        # 100 M pixels: above mm's default limit and PIL's warning threshold, below PIL's error.
        for bomb in (png_header_only(10_000, 10_000), jpeg_with_claimed_size(10_000, 10_000)):
            with pytest.raises(ImageError, match=r"10000 x 10000 = 100000000 pixels.*limit of 64000000"):
                load_image(bomb)
        # 10 G pixels: PIL's own guard fires while reading the header; it becomes an ImageError too.
        for bomb in (png_header_only(100_000, 100_000), jpeg_with_claimed_size(65_000, 65_000)):
            with pytest.raises(ImageError, match="decompression bomb.*MAX_IMAGE_PIXELS"):
                load_image(bomb, max_pixels=10**12)
    assert pil_limit == Image.MAX_IMAGE_PIXELS  # never changed, not even temporarily left changed


def test_pixel_limit_is_configurable():
    image = random_image(80, 100, seed=0)  # 8000 pixels
    data = png_bytes(image)
    assert load_image(data, max_pixels=8000).size == (100, 80)
    with pytest.raises(ImageError, match=r"100 x 80 = 8000 pixels.*limit of 7999"):
        load_image(data, max_pixels=7999)
    with pytest.raises(ImageError, match="limit of 7999"):
        load_image(image, max_pixels=7999)  # in-memory images are held to the limit too
    processor = ImageProcessor(16, 4, max_image_pixels=7999)
    with pytest.raises(ImageError, match=r"sample 1, image 0: .*limit of 7999"):
        processor([[random_image(10, 10, seed=1)], [data]])
    assert ImageProcessor(16, 4, max_image_pixels=8000)([[data]]).num_tiles == [[4]]


# ----------------------------------------------------------------------------- settings


def test_settings_round_trip_and_strictness():
    processor = ImageProcessor(
        28, 6, mean=(0.1, 0.2, 0.3), std=(1.0, 2.0, 3.0), max_image_pixels=1234, resample="bicubic"
    )
    settings = processor.to_dict()
    restored = ImageProcessor.from_dict(settings)
    assert restored.to_dict() == settings
    assert ImageProcessor.from_dict({}).to_dict() == ImageProcessor().to_dict()
    with pytest.raises(ValueError, match=r"unknown ImageProcessor settings \['tile'\]"):
        ImageProcessor.from_dict({**settings, "tile": 3})


@pytest.mark.parametrize(
    "kwargs",
    [
        {"tile_size": 0},
        {"max_tiles": 0},
        {"max_tiles": 2.0},
        {"std": (1.0, 0.0, 1.0)},
        {"mean": (0.5,)},
        {"resample": "lanczos"},
        {"max_image_pixels": -1},
    ],
)
def test_bad_settings_are_refused(kwargs):
    with pytest.raises(ValueError):
        ImageProcessor(**kwargs)


def test_hf_config_round_trip():
    processor = ImageProcessor(24, 3)
    reference = transformers.MllamaImageProcessor(**processor.to_hf_config())
    batch = [[random_image(40, 70, seed=0), random_image(100, 20, seed=1)]]
    assert_matches(processor(batch), reference(batch, return_tensors="pt"))
    restored = ImageProcessor.from_hf_config(reference.to_dict())
    assert restored.to_dict() == processor.to_dict()
    # Missing keys take Hugging Face's class defaults, not mm's.
    defaults = ImageProcessor.from_hf_config({"image_processor_type": "MllamaImageProcessor"})
    assert (defaults.tile_size, defaults.max_tiles, defaults.mean) == (224, 4, (0.5, 0.5, 0.5))
    with pytest.raises(ValueError, match="do_pad"):
        ImageProcessor.from_hf_config({"do_pad": False})
    with pytest.raises(ValueError, match="unsupported keys"):
        ImageProcessor.from_hf_config({"crop_size": 3})
