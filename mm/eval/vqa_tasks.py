"""Readers of the short-answer image benchmarks, each in its published layout: VQAv2, TextVQA, DocVQA, ChartQA.

Every question becomes one user turn: the image, then the question and the task's instruction on a new
line (the prompts lmms-eval uses for these benchmarks; ``--prompt`` replaces the instruction):

* VQAv2, TextVQA, DocVQA: "Answer the question using a single word or phrase." (VQAv2: ``--prompt ""``
  asks the question alone, as ``mm demo`` trains its model to be asked)
* ChartQA: "Answer the question with a single word."

Layouts (``DATA`` is what ``mm eval`` is given):

* **VQAv2** (Goyal et al. 2017; visualqa.org): the questions file
  ``v2_OpenEnded_mscoco_{split}_questions.json`` (``{"data_subtype", "questions": [{"question_id",
  "image_id", "question"}]}``) and the annotations file ``v2_mscoco_{split}_annotations.json``
  (``{"annotations": [{"question_id", "answers": [{"answer", "answer_confidence", "answer_id"}],
  "multiple_choice_answer", ...}]}``); images ``COCO_{split}_{image_id:012d}.jpg``. ``DATA`` is the
  questions file (annotations: ``--answers``, else the standard name beside it or in ``../Annotations``)
  or a folder holding both files (directly or in ``Questions/`` and ``Annotations/``; ``--split``, default
  ``val2014``). Images: ``--media``, else ``{split}/`` or ``Images/mscoco/{split}/`` beside the files.
* **TextVQA** (Singh et al. 2019): ``TextVQA_0.5.1_val.json``, ``{"data": [{"question_id", "question",
  "image_id", "answers": [10 strings]}]}``; images ``{image_id}.jpg`` in ``--media``, else
  ``train_images/`` (where the val images ship), ``test_images/`` or ``images/`` beside the file.
* **DocVQA** (Mathew et al. 2021): ``val_v1.0.json``, ``{"data": [{"questionId", "question", "image":
  "documents/xxx.png", "answers": [...]}]}``; image paths are relative to the file's folder (or
  ``--media``).
* **ChartQA** (Masry et al. 2022): ``test_human.json`` / ``test_augmented.json``, ``[{"imgname", "query",
  "label"}]``; images in ``png/`` beside the file (or ``--media``). Ids are ``"<file stem>-<index>"``.

Scoring (:mod:`mm.eval.tasks`): VQA accuracy (VQAv2's and TextVQA's normalisers), ANLS, relaxed accuracy.
"""

from __future__ import annotations

from pathlib import Path

from mm.eval.samples import (
    EvalDataError,
    EvalSample,
    TaskData,
    TaskOptions,
    check_file,
    find_media_root,
    load_json,
    load_records,
    user_turn,
)

__all__ = [
    "CHARTQA_PROMPT",
    "VQA_PROMPT",
    "read_chartqa",
    "read_docvqa",
    "read_textvqa",
    "read_vqav2",
]

VQA_PROMPT = "Answer the question using a single word or phrase."
CHARTQA_PROMPT = "Answer the question with a single word."
VQAV2_DEFAULT_SPLIT = "val2014"


def _ask(image: str, question: str, instruction: str) -> list[dict]:
    text = f"{question.strip()}\n{instruction}" if instruction else question.strip()  # "": the question alone
    return user_turn([{"type": "image", "image": image}], text)


# ---------------------------------------------------------------------------------------- VQAv2
def _vqav2_files(data: Path, options: TaskOptions) -> tuple[Path, Path]:
    """The questions and annotations files of a VQAv2 split."""
    split = options.split or VQAV2_DEFAULT_SPLIT
    questions_name = f"v2_OpenEnded_mscoco_{split}_questions.json"
    annotations_name = f"v2_mscoco_{split}_annotations.json"
    if data.is_dir():
        found = [p for p in (data / questions_name, data / "Questions" / questions_name) if p.is_file()]
        if not found:
            raise EvalDataError(f"{data}: no {questions_name} (directly or in Questions/)")
        questions = found[0]
        search = (data, data / "Annotations")
    elif data.is_file():
        questions = data
        search = (data.parent, data.parent.parent / "Annotations")
        if options.split is None:  # the split a standard file name states
            stem = data.name.removeprefix("v2_OpenEnded_mscoco_").removesuffix("_questions.json")
            if stem != data.name and stem:
                annotations_name = f"v2_mscoco_{stem}_annotations.json"
    else:
        raise EvalDataError(f"{data}: no such file or folder")
    if options.answers is not None:
        annotations = Path(options.answers)
        if not annotations.is_file():
            raise EvalDataError(f"--answers {annotations}: no such file")
        return questions, annotations
    for folder in search:
        if (folder / annotations_name).is_file():
            return questions, folder / annotations_name
    raise EvalDataError(
        f"{questions}: VQAv2 needs the annotations ({annotations_name}, not found beside it or in "
        "../Annotations); name the file with --answers"
    )


def read_vqav2(data: Path, options: TaskOptions) -> TaskData:
    """VQAv2: questions + annotations + COCO images (module docstring); references are the ten answers."""
    questions_path, annotations_path = _vqav2_files(data, options)
    header = load_json(questions_path)
    if not isinstance(header, dict):
        raise EvalDataError(f"{questions_path}: expected an object with a 'questions' list")
    subtype = header.get("data_subtype") or options.split or VQAV2_DEFAULT_SPLIT
    answers: dict[int, tuple[str, ...]] = {}
    for ann in load_records(annotations_path, "annotations"):
        qid = ann.get("question_id", kind=int)
        entries = ann.get("answers", kind=list)
        if not entries:
            raise ann.error("'answers' is empty")
        texts = []
        for k, entry in enumerate(entries):
            if not isinstance(entry, dict) or not isinstance(entry.get("answer"), str):
                raise ann.error(f"answers[{k}] must be an object with a string 'answer'")
            texts.append(entry["answer"])
        answers[qid] = tuple(texts)
    records = load_records(questions_path, "questions")
    images = None
    samples = []
    for rec in records:
        qid = rec.get("question_id", kind=int)
        image_id = rec.get("image_id", kind=int)
        question = rec.get("question")
        if qid not in answers:
            raise rec.error(f"question_id {qid} has no annotation in {annotations_path}")
        name = f"COCO_{subtype}_{image_id:012d}.jpg"
        if images is None:
            base = questions_path.parent
            images = find_media_root(
                options.media,
                (
                    base / subtype,
                    base.parent / subtype,
                    base / "Images" / "mscoco" / subtype,
                    base.parent / "Images" / "mscoco" / subtype,
                    base / "images",
                    base,
                ),
                name,
                "VQAv2 images",
            )
        image = check_file(rec, images / name)
        samples.append(
            EvalSample(
                id=qid,
                messages=_ask(image, question, VQA_PROMPT if options.prompt is None else options.prompt),
                references=answers[qid],
                source=rec.where,
            )
        )
    return TaskData(samples)


# ---------------------------------------------------------------------------------------- TextVQA
def read_textvqa(data: Path, options: TaskOptions) -> TaskData:
    """TextVQA: ``{"data": [...]}`` with ten answers per question, images ``{image_id}.jpg``."""
    options.refuse("textvqa", "answers", "split")
    records = load_records(data, "data")
    images = None
    samples = []
    for rec in records:
        qid = rec.get("question_id", kind=(int, str))
        question = rec.get("question")
        image_id = rec.get("image_id", kind=str)
        if not rec.has("answers"):
            raise rec.error("'answers' is missing (the test split is scored only by the EvalAI server)")
        refs = rec.strings("answers")
        name = f"{image_id}.jpg"
        if images is None:
            base = data.parent
            images = find_media_root(
                options.media,
                (base / "train_images", base / "test_images", base / "images", base),
                name,
                "TextVQA images",
            )
        image = check_file(rec, images / name)
        samples.append(
            EvalSample(
                id=qid,
                messages=_ask(image, question, options.prompt or VQA_PROMPT),
                references=tuple(refs),
                source=rec.where,
            )
        )
    return TaskData(samples)


# ---------------------------------------------------------------------------------------- DocVQA
def read_docvqa(data: Path, options: TaskOptions) -> TaskData:
    """DocVQA: ``{"data": [...]}``, image paths relative to the file's folder."""
    options.refuse("docvqa", "answers", "split")
    root = Path(options.media) if options.media is not None else data.parent
    if not root.is_dir():
        raise EvalDataError(f"--media {root}: no such folder")
    samples = []
    for rec in load_records(data, "data"):
        qid = rec.get("questionId", kind=(int, str))
        rec.where = f"{rec.where} (questionId {qid})"
        question = rec.get("question")
        image = check_file(rec, root / rec.get("image"))
        if not rec.has("answers"):
            raise rec.error("'answers' is missing (the test split is scored only by the RRC server)")
        samples.append(
            EvalSample(
                id=qid,
                messages=_ask(image, question, options.prompt or VQA_PROMPT),
                references=tuple(rec.strings("answers")),
                source=rec.where,
            )
        )
    return TaskData(samples)


# ---------------------------------------------------------------------------------------- ChartQA
def read_chartqa(data: Path, options: TaskOptions) -> TaskData:
    """ChartQA: ``[{"imgname", "query", "label"}]`` with the charts in ``png/``."""
    options.refuse("chartqa", "answers", "split")
    records = load_records(data)
    images = None
    samples = []
    for i, rec in enumerate(records):
        name = rec.get("imgname")
        query = rec.get("query")
        label = rec.get("label", kind=(str, int, float))
        if images is None:
            images = find_media_root(
                options.media, (data.parent / "png", data.parent), name, "ChartQA charts"
            )
        image = check_file(rec, images / name)
        samples.append(
            EvalSample(
                id=f"{data.stem}-{i}",
                messages=_ask(image, query, options.prompt or CHARTQA_PROMPT),
                references=(str(label),),
                source=rec.where,
            )
        )
    return TaskData(samples)
