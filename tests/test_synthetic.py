"""Synthetic demo data (`mm.demo.data`): what the questions say is what the pixels show.

Every check reads the drawn pixels (or the decoded mp4) back with small independent helpers: a
flood fill for connected shapes, a silhouette classifier, and a colour classifier on normalised
RGB, so a drawing bug or a wrong answer fails here rather than silently in the demo.
"""

from __future__ import annotations

import io
import json
import re
from collections import Counter, deque

import numpy as np
import pytest
from PIL import Image

from mm.datasets.shards import check_messages, pack
from mm.datasets.video import VideoConfig, load_video
from mm.datasets.webdata import ShardStream
from mm.demo.data import (
    BACKGROUND,
    CHOICES,
    COLOUR_RGB,
    COLOURS,
    HELDOUT_COLOUR_SHAPE,
    HELDOUT_TRIPLES,
    IMAGE_KINDS,
    POSITIONS,
    QUESTIONS,
    SHAPES,
    VIDEO_KINDS,
    PlacedShape,
    ShapeScene,
    draw_scene,
    heldout_text,
    is_novel,
    make_image_qa,
    make_text_corpus,
    make_video_qa,
    qa_messages,
    quadrant,
    video_qa_messages,
    write_image_qa_folder,
    write_mp4,
    write_video_qa_folder,
)
from mm.demo.text_data import _TEXT
from mm.text_backbone.tokenizer import ByteTokenizer

# --------------------------------------------------------------------------- pixel helpers


def _mask(image: Image.Image, threshold: int = 60) -> np.ndarray:
    """``[h, w]`` bool: pixels far from the background in some channel."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.int16)
    return np.abs(pixels - np.array(BACKGROUND, dtype=np.int16)).max(axis=-1) > threshold


def _components(mask: np.ndarray) -> list[list[tuple[int, int]]]:
    """8-connected components of ``mask`` as lists of (row, col), by breadth-first flood fill."""
    seen = np.zeros_like(mask)
    comps = []
    h, w = mask.shape
    for r0, c0 in zip(*np.nonzero(mask)):
        if seen[r0, c0]:
            continue
        seen[r0, c0] = True
        queue, comp = deque([(int(r0), int(c0))]), []
        while queue:
            r, c = queue.popleft()
            comp.append((r, c))
            for dr in (-1, 0, 1):
                for dc in (-1, 0, 1):
                    rr, cc = r + dr, c + dc
                    if 0 <= rr < h and 0 <= cc < w and mask[rr, cc] and not seen[rr, cc]:
                        seen[rr, cc] = True
                        queue.append((rr, cc))
        comps.append(comp)
    return comps


_UNIT = {name: np.array(rgb, float) / max(rgb) for name, rgb in COLOUR_RGB.items()}


def _colour_of(pixels: np.ndarray) -> list[str]:
    """Nearest colour name of each ``[k, 3]`` pixel, by RGB divided by its largest channel (so a
    darker shade of yellow, as at a blurred edge, is still yellow); the white outline is left out."""
    pixels = pixels[pixels.min(axis=-1) < 200]
    unit = pixels.astype(float) / np.maximum(pixels.max(axis=-1, keepdims=True), 1)
    names = list(_UNIT)
    dist = np.stack([np.linalg.norm(unit - _UNIT[n], axis=-1) for n in names], axis=-1)
    return [names[i] for i in dist.argmin(axis=-1)]


def _silhouette(comp: list[tuple[int, int]]) -> str:
    """Classify a component: square fills its box; a triangle fills only its two bottom corners;
    a circle and a cross fill no corner and differ in how much of the box they cover."""
    rows, cols = zip(*comp)
    top, bottom, left, right = min(rows), max(rows), min(cols), max(cols)
    cells = set(comp)
    fill = len(cells) / ((bottom - top + 1) * (right - left + 1))
    corners = [(top, left), (top, right), (bottom, left), (bottom, right)]
    filled = [corner in cells for corner in corners]
    if all(filled) and fill > 0.9:
        return "square"
    if filled == [False, False, True, True]:
        return "triangle"
    if not any(filled):
        return "circle" if fill > 0.65 else "cross"
    return "?"


def _centroid(image: Image.Image, threshold: int = 60) -> np.ndarray:
    rows, cols = np.nonzero(_mask(image, threshold))
    return np.array([cols.mean(), rows.mean()]) / image.width  # (x, y) as fractions


# --------------------------------------------------------------------------- image questions


def test_images_are_deterministic_and_depend_on_seed_and_split():
    a = make_image_qa(24, split="train", seed=3)
    b = make_image_qa(24, split="train", seed=3)
    assert [(s.question, s.answer, s.kind, s.scene) for s in a] == [
        (s.question, s.answer, s.kind, s.scene) for s in b
    ]
    assert all(x.image.tobytes() == y.image.tobytes() for x, y in zip(a, b))
    other = make_image_qa(24, split="train", seed=4)
    assert [s.scene for s in a] != [s.scene for s in other]
    evals = make_image_qa(24, split="eval", seed=3)
    assert [s.scene for s in a] != [s.scene for s in evals]


@pytest.mark.parametrize("split", ["train", "eval"])
def test_kinds_and_answers_are_balanced(split):
    samples = make_image_qa(400, split=split, seed=0)
    kinds = Counter(s.kind for s in samples)
    assert set(kinds) == set(IMAGE_KINDS)
    for kind in IMAGE_KINDS:  # 400 samples are 25 whole blocks of the 16 (kind, answer) pairs
        answers = Counter(s.answer for s in samples if s.kind == kind)
        assert answers == dict.fromkeys(CHOICES[kind], 25), (kind, answers)
    for s in samples:
        assert s.choices == CHOICES[s.kind] and len(s.choices) == 4 and s.answer in s.choices


def _triples(scene: ShapeScene) -> set:
    return {(p.colour, p.shape, quadrant(p.x, p.y)) for p in scene.shapes}


def test_heldout_combinations_only_in_eval():
    assert len(HELDOUT_TRIPLES) == 8
    for values in (COLOURS, SHAPES, POSITIONS):  # each value is held out in exactly two triples
        assert all(sum(v in t for t in HELDOUT_TRIPLES) == 2 for v in values)
    train = make_image_qa(800, split="train", seed=1)
    for s in train:
        assert not _triples(s.scene) & HELDOUT_TRIPLES, s.scene
    seen_train = set().union(*(_triples(s.scene) for s in train))
    # every pair of attributes still appears in training: no attribute predicts another
    for i, j in ((0, 1), (0, 2), (1, 2)):
        assert len({(t[i], t[j]) for t in seen_train}) == 16
    assert len(seen_train) == 64 - 8

    evals = make_image_qa(400, split="eval", seed=1)
    seen_eval = set()
    for s in evals:
        assert _triples(s.scene) & HELDOUT_TRIPLES, s.scene
        assert is_novel(s.scene)
        seen_eval |= _triples(s.scene)
    assert seen_eval >= HELDOUT_TRIPLES


def test_heldout_phrasings_only_in_eval():
    train = {s.question for s in make_image_qa(400, split="train", seed=2)}
    evals = {s.question for s in make_image_qa(400, split="eval", seed=2, heldout_phrasings=True)}
    assert not {s.question for s in make_image_qa(400, split="eval", seed=2)} & {
        q for kind in IMAGE_KINDS for q in QUESTIONS[kind].heldout
    }
    heldout = {q for kind in IMAGE_KINDS for q in QUESTIONS[kind].heldout}
    assert train and not train & heldout
    assert evals & heldout == heldout
    assert train <= {q for kind in IMAGE_KINDS for q in QUESTIONS[kind].train}


@pytest.mark.parametrize("size", [28, 56])
@pytest.mark.parametrize("split", ["train", "eval"])
def test_pixels_show_what_the_answer_says(size, split):
    for s in make_image_qa(160, split=split, seed=5, image_size=size):
        assert s.image.size == (size, size) and s.image.mode == "RGB"
        comps = _components(_mask(s.image))
        assert len(comps) == len(s.scene.shapes), s.scene
        for comp in comps:  # fully inside the image, with a free border
            rows, cols = zip(*comp)
            assert min(rows) > 0 and min(cols) > 0 and max(rows) < size - 1 and max(cols) < size - 1
        if s.kind == "count":
            assert len(comps) == int(s.answer)
            continue
        (comp,) = comps
        rows, cols = np.array(comp).T
        pixels = np.asarray(s.image)[rows, cols]
        colour = Counter(_colour_of(pixels)).most_common(1)[0][0]
        position = quadrant(cols.mean() / size, rows.mean() / size)
        truth = {"colour": colour, "position": position, "shape": _silhouette(comp)}
        assert truth[s.kind] == s.answer, (s.kind, s.answer, truth, s.scene)
        # the same holds for the attributes that were not asked about
        item = s.scene.shapes[0]
        assert truth == {"colour": item.colour, "position": quadrant(item.x, item.y), "shape": item.shape}


def test_scene_validation():
    with pytest.raises(ValueError, match="unknown colour"):
        ShapeScene(shapes=[("circle", "purple", 0.3, 0.5, 0.5)])
    with pytest.raises(ValueError, match="unknown shape"):
        ShapeScene(shapes=[("star", "red", 0.3, 0.5, 0.5)])
    with pytest.raises(ValueError, match="fully inside"):
        ShapeScene(shapes=[("circle", "red", 0.3, 0.1, 0.5)])
    scene = ShapeScene(shapes=[("circle", "red", 0.3, 0.5, 0.5)])
    assert scene.shapes == (PlacedShape("circle", "red", 0.3, 0.5, 0.5),)
    with pytest.raises(ValueError, match="image size"):
        draw_scene(scene, size=4)
    with pytest.raises(ValueError, match="split"):
        make_image_qa(2, split="test", seed=0)


def test_draw_scene_is_resolution_independent():
    scene = ShapeScene(shapes=[("square", "blue", 0.25, 0.75, 0.25)], noise=8, noise_seed=1)
    for size in (28, 56, 112):
        x, y = _centroid(draw_scene(scene, size))
        assert abs(x - 0.75) < 1.5 / size and abs(y - 0.25) < 1.5 / size
        assert abs(_mask(draw_scene(scene, size)).mean() - 0.25**2) < 0.02


def test_qa_messages():
    (s,) = make_image_qa(1, split="train", seed=0)
    messages = qa_messages(s)
    assert messages == [
        {
            "role": "user",
            "content": [{"type": "image", "image": s.image}, {"type": "text", "text": s.question}],
        },
        {"role": "assistant", "content": s.answer},
    ]
    assert check_messages(qa_messages(s, "0.png")) == [("image", "0.png")]


def test_image_folder_packs_and_streams_back(tmp_path):
    samples = make_image_qa(12, split="eval", seed=7)
    keys = write_image_qa_folder(samples, tmp_path / "folder")
    assert sorted(p.name for p in (tmp_path / "folder").iterdir()) == sorted(
        f"{k}.{ext}" for k in keys for ext in ("png", "json")
    )
    row = json.loads((tmp_path / "folder" / f"{keys[0]}.json").read_text())
    assert row["messages"][0]["content"][0] == {"type": "image", "image": f"{keys[0]}.png"}
    result = pack(tmp_path / "folder", tmp_path / "shards")
    assert result.samples == 12
    stream = ShardStream(tmp_path / "shards", rank=0, world_size=1, shuffle_shards=False)
    got = {s["__key__"]: s for s in stream}
    assert sorted(got) == keys
    for key, sample in zip(keys, samples):
        out = got[key]
        assert out["messages"] == qa_messages(sample, "png")
        assert out["meta"] == {"kind": sample.kind, "choices": list(sample.choices)}
        image = Image.open(io.BytesIO(out["media"]["png"]))
        assert image.mode == "RGB" and image.tobytes() == sample.image.tobytes()
    with pytest.raises(FileExistsError):
        write_image_qa_folder(samples, tmp_path / "folder")


# --------------------------------------------------------------------------- text


_WORDS = re.compile(r"[a-z]+|\d")


def test_text_corpus():
    docs = make_text_corpus(400, seed=0)
    assert docs == make_text_corpus(400, seed=0) and docs != make_text_corpus(400, seed=1)
    assert all(isinstance(d, str) and 20 <= len(d) <= 1000 for d in docs)
    tok = ByteTokenizer()
    assert all(tok.decode(tok.encode(d)) == d for d in docs[:50])
    words = set(_WORDS.findall(" ".join(docs).lower()))
    vocab = {w for kind in CHOICES for answer in CHOICES[kind] for w in answer.split()}
    assert vocab <= words, vocab - words
    assert {"colour", "shape", "many", "where", "move", "first", "middle"} <= words
    # every answer appears right after a question, as in the question-answer data
    lines = [line for d in docs for line in d.split("\n") if "?" in line]
    answers = {line.rsplit("? ", 1)[1] for line in lines if "? " in line}
    assert {a for kind in CHOICES for a in CHOICES[kind]} <= answers


def _template_regex(template: str) -> re.Pattern:
    parts = re.split(r"\{\w+\}", template)
    return re.compile("(?i)" + r".+?".join(map(re.escape, parts)))


def test_heldout_text_uses_heldout_templates_only_there():
    train = "\n".join(make_text_corpus(600, seed=0))
    held = heldout_text(300, 0)
    assert held == heldout_text(300, seed=0) and not set(held) & set(make_text_corpus(300, seed=0))
    held_text = "\n".join(held)
    heldout_templates = [t for group in _TEXT.values() for t in group.heldout]
    heldout_templates += [q for kind in QUESTIONS for q in QUESTIONS[kind].heldout]
    found = 0
    for template in heldout_templates:
        pattern = _template_regex(template)
        assert not pattern.search(train), template
        found += bool(pattern.search(held_text))
    assert found >= 0.9 * len(heldout_templates)


# --------------------------------------------------------------------------- videos


def test_videos_are_deterministic_balanced_and_split():
    a = make_video_qa(48, split="train", seed=0)
    b = make_video_qa(48, split="train", seed=0)
    assert [(s.question, s.answer, s.scenes) for s in a] == [(s.question, s.answer, s.scenes) for s in b]
    assert all(x.tobytes() == y.tobytes() for s, t in zip(a, b) for x, y in zip(s.frames, t.frames))
    for kind in VIDEO_KINDS:
        answers = Counter(s.answer for s in a if s.kind == kind)
        assert answers == dict.fromkeys(CHOICES[kind], 4), (kind, answers)
    for s in a:
        assert len(s.frames) == len(s.scenes) == 16 and s.frames[0].size == (56, 56)
        assert not any(is_novel(scene, positions=False) for scene in s.scenes)
    evals = make_video_qa(48, split="eval", seed=0)
    assert all(is_novel(s.scenes[-1], positions=False) for s in evals)
    held = {(p.colour, p.shape) for s in evals for p in s.scenes[-1].shapes}
    assert held >= HELDOUT_COLOUR_SHAPE
    assert check_messages(video_qa_messages(a[0], "0.mp4")) == [("video", "0.mp4")]


def _roundtrip(sample, tmp_path, num_frames):
    path = write_mp4(sample.frames, tmp_path / "clip.mp4", fps=8)
    clip = load_video(path, config=VideoConfig(num_frames=num_frames))
    assert len(clip.frames) == num_frames and clip.frames[0].size == sample.frames[0].size
    return clip.frames


def test_direction_survives_mp4(tmp_path):
    for s in make_video_qa(8, split="train", seed=1, kinds=["direction"]):
        frames = _roundtrip(s, tmp_path, 8)
        centroids = np.array([_centroid(f) for f in frames])
        dx, dy = centroids[-1] - centroids[0]
        moved = {"right": dx, "left": -dx, "down": dy, "up": -dy}
        assert moved[s.answer] > 0.25 and max(abs(dx), abs(dy)) == abs(moved[s.answer]), (s.answer, dx, dy)
        # the motion is steady: every sampled frame moves the same way
        steps = np.diff(centroids, axis=0)
        axis = 0 if s.answer in ("left", "right") else 1
        sign = 1 if s.answer in ("right", "down") else -1
        assert (sign * steps[:, axis] > 0).all()


def test_crossings_survive_mp4(tmp_path):
    for s in make_video_qa(8, split="eval", seed=2, kinds=["crossing"]):
        frames = _roundtrip(s, tmp_path, 8)
        crossed = 0
        for lane in range(3):  # one shape per horizontal third
            band = slice(lane * 56 // 3, (lane + 1) * 56 // 3)
            first, last = (_mask(f)[band] for f in (frames[0], frames[-1]))
            start, end = (np.nonzero(m)[1].mean() / 56 for m in (first, last))
            crossed += (start < 0.5) != (end < 0.5)
        assert crossed == int(s.answer), s.scenes[0]


def test_first_colour_survives_mp4(tmp_path):
    for s in make_video_qa(8, split="train", seed=3, kinds=["first"]):
        frames = _roundtrip(s, tmp_path, 16)
        appeared = []
        for frame in frames:
            pixels = np.asarray(frame)[_mask(frame, 80)]
            counts = Counter(_colour_of(pixels))
            for colour, n in counts.items():
                if n >= 20 and colour not in appeared:
                    appeared.append(colour)
        assert appeared[0] == s.answer and len(appeared) == len(s.scenes[-1].shapes) >= 2, (
            appeared,
            s.answer,
        )


def test_video_folder_packs_and_streams_back(tmp_path):
    samples = make_video_qa(3, split="train", seed=4, num_frames=8, size=28)
    keys = write_video_qa_folder(samples, tmp_path / "folder")
    pack(tmp_path / "folder", tmp_path / "shards")
    got = {s["__key__"]: s for s in ShardStream(tmp_path / "shards", rank=0, world_size=1)}
    for key, sample in zip(keys, samples):
        assert got[key]["messages"] == video_qa_messages(sample, "mp4")
        clip = load_video(got[key]["media"]["mp4"], config=VideoConfig(num_frames=8))
        assert len(clip.frames) == 8 and clip.frames[0].size == (28, 28)


def test_write_mp4_rejects_bad_frames(tmp_path):
    with pytest.raises(ValueError, match="even"):
        write_mp4([Image.new("RGB", (27, 28))], tmp_path / "a.mp4")
    with pytest.raises(ValueError, match="same size"):
        write_mp4([Image.new("RGB", (28, 28)), Image.new("RGB", (30, 28))], tmp_path / "a.mp4")
    with pytest.raises(ValueError, match="at least one"):
        write_mp4([], tmp_path / "a.mp4")
    with pytest.raises(ValueError, match="even"):
        make_video_qa(1, split="train", seed=0, size=27)


def test_mp4_is_h264_yuv420p(tmp_path):
    import av

    (s,) = make_video_qa(1, split="train", seed=5, kinds=["direction"])
    path = write_mp4(s.frames, tmp_path / "c.mp4", fps=8)
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264" and stream.codec_context.pix_fmt == "yuv420p"
        assert stream.frames in (0, 16) and float(stream.average_rate) == 8
    # the same frames give the same bytes, so packing generated clips twice gives identical shards
    again = write_mp4(s.frames, tmp_path / "d.mp4", fps=8)
    assert path.read_bytes() == again.read_bytes()
