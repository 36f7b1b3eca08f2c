"""Test helpers for `mm eval`: tiny benchmark files in each benchmark's published layout, and tiny models.

Every writer produces the files (names, folders, JSON keys, parquet columns, TSV header) the benchmark
publishes, with a few records; media are small generated images, clips and tones.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
from PIL import Image


# ---------------------------------------------------------------------------------------- media
def picture(seed: int, size=(40, 30)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def tone(seconds: float = 0.5, hz: float = 440.0, rate: int = 16000) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return (0.3 * np.sin(2 * math.pi * hz * t)).astype(np.float32)


def _write_json(path: Path, obj) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))
    return path


# ---------------------------------------------------------------------------------------- VQAv2
def write_vqav2(root: Path, questions, split: str = "val2014") -> Path:
    """The official layout: ``Questions/``, ``Annotations/``, ``Images/mscoco/{split}/COCO_...jpg``.

    ``questions``: ``(question_id, image_id, question, [ten answers])``. Returns the questions file.
    """
    images = root / "Images" / "mscoco" / split
    images.mkdir(parents=True, exist_ok=True)
    for _, image_id, _, _ in questions:
        picture(image_id).save(images / f"COCO_{split}_{image_id:012d}.jpg", quality=95)
    header = {
        "info": {"description": "This is v2.0 of the VQA dataset."},
        "license": {"name": "Creative Commons Attribution 4.0 International License"},
        "data_subtype": split,
    }
    q = {
        **header,
        "task_type": "Open-Ended",
        "data_type": "mscoco",
        "questions": [
            {"image_id": image_id, "question": text, "question_id": qid}
            for qid, image_id, text, _ in questions
        ],
    }
    a = {
        **header,
        "data_type": "mscoco",
        "annotations": [
            {
                "question_type": "what",
                "multiple_choice_answer": answers[0],
                "answers": [
                    {"answer": ans, "answer_confidence": "yes", "answer_id": k + 1}
                    for k, ans in enumerate(answers)
                ],
                "image_id": image_id,
                "answer_type": "other",
                "question_id": qid,
            }
            for qid, image_id, _, answers in questions
        ],
    }
    _write_json(root / "Annotations" / f"v2_mscoco_{split}_annotations.json", a)
    return _write_json(root / "Questions" / f"v2_OpenEnded_mscoco_{split}_questions.json", q)


# ---------------------------------------------------------------------------------------- TextVQA
def write_textvqa(root: Path, questions) -> Path:
    """``TextVQA_0.5.1_val.json`` and ``train_images/{image_id}.jpg``; ``questions``: ``(qid, image_id,
    question, [ten answers])``."""
    (root / "train_images").mkdir(parents=True, exist_ok=True)
    data = []
    for k, (qid, image_id, question, answers) in enumerate(questions):
        picture(100 + k).save(root / "train_images" / f"{image_id}.jpg", quality=95)
        data.append(
            {
                "question": question,
                "image_id": image_id,
                "image_classes": ["Poster"],
                "flickr_original_url": "https://example.invalid/o.jpg",
                "flickr_300k_url": "https://example.invalid/300k.jpg",
                "image_width": 40,
                "image_height": 30,
                "answers": answers,
                "question_tokens": question.lower().rstrip("?").split(),
                "question_id": qid,
                "set_name": "val",
            }
        )
    doc = {"dataset_type": "val", "dataset_name": "textvqa", "dataset_version": "0.5.1", "data": data}
    return _write_json(root / "TextVQA_0.5.1_val.json", doc)


# ---------------------------------------------------------------------------------------- DocVQA
def write_docvqa(root: Path, questions) -> Path:
    """``val/val_v1.0.json`` and ``val/documents/*.png``; ``questions``: ``(questionId, question,
    [answers])``."""
    folder = root / "val"
    (folder / "documents").mkdir(parents=True, exist_ok=True)
    data = []
    for k, (qid, question, answers) in enumerate(questions):
        name = f"documents/doc{k:04d}_{k}.png"
        picture(200 + k, (60, 80)).save(folder / name)
        data.append(
            {
                "questionId": qid,
                "question": question,
                "question_types": ["form"],
                "image": name,
                "docId": 1000 + k,
                "ucsf_document_id": f"doc{k:04d}",
                "ucsf_document_page_no": "1",
                "answers": answers,
                "data_split": "val",
            }
        )
    doc = {"dataset_name": "docvqa", "dataset_split": "val", "dataset_version": "1.0", "data": data}
    return _write_json(folder / "val_v1.0.json", doc)


# ---------------------------------------------------------------------------------------- ChartQA
def write_chartqa(root: Path, questions, name: str = "test_human") -> Path:
    """``test/{name}.json`` (``[{"imgname", "query", "label"}]``) and ``test/png/``."""
    folder = root / "test"
    (folder / "png").mkdir(parents=True, exist_ok=True)
    records = []
    for k, (query, label) in enumerate(questions):
        imgname = f"{1000 + k}.png"
        picture(300 + k, (50, 40)).save(folder / "png" / imgname)
        records.append({"imgname": imgname, "query": query, "label": label})
    return _write_json(folder / f"{name}.json", records)


# ---------------------------------------------------------------------------------------- MMMU / AI2D
def _image_type():
    import pyarrow as pa

    return pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def write_mmmu(root: Path, subject: str, rows) -> Path:
    """``{subject}/validation-00000-of-00001.parquet`` with MMMU's columns; ``rows``: dicts with ``id``,
    ``question``, ``options`` (a list, written as its Python string), ``answer``, ``question_type`` and
    ``images`` (``{n: PIL image}`` for ``image_n``)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    image = _image_type()
    columns = {
        "id": pa.array([r["id"] for r in rows], pa.string()),
        "question": pa.array([r["question"] for r in rows], pa.string()),
        "options": pa.array([str(r["options"]) for r in rows], pa.string()),
        "explanation": pa.array(["" for _ in rows], pa.string()),
    }
    for n in range(1, 8):
        values = [
            {"bytes": png_bytes(r["images"][n]), "path": f"{r['id']}_{n}.png"}
            if n in r.get("images", {})
            else None
            for r in rows
        ]
        columns[f"image_{n}"] = pa.array(values, image)
    columns["img_type"] = pa.array(["['Diagrams']" for _ in rows], pa.string())
    columns["answer"] = pa.array([r["answer"] for r in rows], pa.string())
    columns["topic_difficulty"] = pa.array(["Medium" for _ in rows], pa.string())
    columns["question_type"] = pa.array(
        [r.get("question_type", "multiple-choice") for r in rows], pa.string()
    )
    columns["subfield"] = pa.array([subject for _ in rows], pa.string())
    path = root / subject / "validation-00000-of-00001.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path)
    return path


def write_ai2d(root: Path, rows) -> Path:
    """lmms-lab/ai2d's ``data/test-00000-of-00001.parquet``: ``question``, ``options`` (a list column),
    ``answer`` (the index as a string), ``image``; ``rows``: ``(question, options, answer_index, image)``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table(
        {
            "question": pa.array([r[0] for r in rows], pa.string()),
            "options": pa.array([r[1] for r in rows], pa.list_(pa.string())),
            "answer": pa.array([str(r[2]) for r in rows], pa.string()),
            "image": pa.array([{"bytes": png_bytes(r[3]), "path": None} for r in rows], _image_type()),
        }
    )
    path = root / "data" / "test-00000-of-00001.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return path


# ---------------------------------------------------------------------------------------- video
def write_clip(path: Path, seed: int, frames: int = 8, size: int = 32) -> Path:
    from mm.demo.data import write_mp4

    path.parent.mkdir(parents=True, exist_ok=True)
    return write_mp4([picture(seed * 100 + k, (size, size)) for k in range(frames)], path)


def write_videomme(root: Path, records) -> Path:
    """Video-MME's records as a JSON list (``videoID``, ``question_id``, ``question``, ``options`` as
    ``"A. text"``, ``answer`` letter) with the clips in ``data/{videoID}.mp4``; ``records``: ``(videoID,
    question_id, question, [option texts], letter)``."""
    out = []
    for k, (video_id, qid, question, options, answer) in enumerate(records):
        if not (root / "data" / f"{video_id}.mp4").exists():
            write_clip(root / "data" / f"{video_id}.mp4", seed=k)
        out.append(
            {
                "video_id": f"{k + 1:03d}",
                "duration": "short",
                "domain": "Knowledge",
                "sub_category": "Humanity & History",
                "url": f"https://www.youtube.com/watch?v={video_id}",
                "videoID": video_id,
                "question_id": qid,
                "task_type": "Counting Problem",
                "question": question,
                "options": [f"{letter}. {text}" for letter, text in zip("ABCD", options)],
                "answer": answer,
            }
        )
    return _write_json(root / "videomme.json", out)


def write_perception_test(root: Path, videos) -> Path:
    """PerceptionTest's ``mc_question_valid.json``: ``{video_id: {"metadata", "mc_question": [...]}}`` and
    ``videos/{video_id}.mp4``; ``videos``: ``{video_id: [(id, question, [options], answer_id)]}``."""
    doc = {}
    for k, (video_id, questions) in enumerate(videos.items()):
        write_clip(root / "videos" / f"{video_id}.mp4", seed=50 + k)
        doc[video_id] = {
            "metadata": {"video_id": video_id, "num_frames": 8, "resolution": [32, 32], "split": "valid"},
            "mc_question": [
                {
                    "id": qid,
                    "question": q,
                    "options": opts,
                    "answer_id": ans,
                    "area": "memory",
                    "reasoning": "",
                    "tag": [],
                }
                for qid, q, opts, ans in questions
            ],
        }
    return _write_json(root / "mc_question_valid.json", doc)


# ---------------------------------------------------------------------------------------- speech
def write_librispeech(root: Path, utterances, split: str = "test-clean") -> Path:
    """``LibriSpeech/{split}/SPEAKER/CHAPTER/SPEAKER-CHAPTER.trans.txt`` + ``.flac``; ``utterances``:
    ``(speaker, chapter, index, transcript)``. Returns the split folder."""
    import soundfile as sf

    folder = root / "LibriSpeech" / split
    chapters: dict[tuple[int, int], list[str]] = {}
    for k, (speaker, chapter, index, text) in enumerate(utterances):
        where = folder / str(speaker) / str(chapter)
        where.mkdir(parents=True, exist_ok=True)
        uid = f"{speaker}-{chapter}-{index:04d}"
        sf.write(where / f"{uid}.flac", tone(0.4 + 0.1 * k, 300 + 50 * k), 16000)
        chapters.setdefault((speaker, chapter), []).append(f"{uid} {text}")
    for (speaker, chapter), lines in chapters.items():
        (folder / str(speaker) / str(chapter) / f"{speaker}-{chapter}.trans.txt").write_text(
            "\n".join(lines) + "\n"
        )
    return folder


def write_covost(root: Path, rows, name: str = "covost_v2.fr_en.test.tsv") -> Path:
    """``get_covost_splits.py``'s TSV (``path sentence translation client_id``) and Common Voice's
    ``clips/*.mp3``; ``rows``: ``(clip name, sentence, translation)``."""
    import soundfile as sf

    (root / "clips").mkdir(parents=True, exist_ok=True)
    lines = ["path\tsentence\ttranslation\tclient_id"]
    for k, (clip, sentence, translation) in enumerate(rows):
        sf.write(root / "clips" / clip, tone(0.5, 350 + 40 * k), 16000, format="MP3")
        lines.append(f"{clip}\t{sentence}\t{translation}\tclient{k}")
    path = root / name
    path.write_text("\n".join(lines) + "\n")
    return path


# ---------------------------------------------------------------------------------------- text
def write_text_mc(path: Path, records) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


# ---------------------------------------------------------------------------------------- models
STOPS = (257, 264, 265)


def tiny_model(seed: int = 0, *, av: bool = False):
    """A tiny random model (``tiny``, or ``tiny-av`` with video and speech) whose media gates are open and
    that never stops by itself (its stop-token rows are zero), so every answer runs to the token limit."""
    import torch

    from mm import ModelConfig, MultimodalModel
    from mm.datasets import AudioConfig, ImageProcessor, VideoConfig
    from mm.datasets.preprocessing import AudioTokens, Preprocessor
    from mm.text_backbone import ByteTokenizer

    torch.manual_seed(seed)
    model = MultimodalModel(ModelConfig.preset("tiny-av" if av else "tiny")).eval()
    with torch.no_grad():
        model.backbone.lm_head.weight[list(STOPS)] = 0.0
        for block in [*model.image_blocks, *model.video_blocks]:
            block.attn_gate.fill_(1.0)
            block.mlp_gate.fill_(1.0)
    extra = {}
    if av:
        extra = dict(
            video=VideoConfig(num_frames=4),
            audio=AudioConfig(max_seconds=5.0),
            audio_tokens=AudioTokens(stack=4, conv_kernel=3, conv_stride=2),
        )
    model.preprocessor = Preprocessor(
        ByteTokenizer(), ImageProcessor(tile_size=28, max_tiles=4), max_images=8, **extra
    )
    return model
