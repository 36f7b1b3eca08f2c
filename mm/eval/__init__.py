"""Official metrics of the benchmarks ``mm eval`` runs: pure functions, strings in, floats out.

Each follows its benchmark's own scorer; the module docstrings name the file and function, and list every
place mm departs from it and why.

* :mod:`mm.eval.vqa` — VQAv2 and TextVQA accuracy (ten human answers, leave-one-out) and their normalisers;
  exact match after the VQAv2 normaliser (open-ended video and spoken QA).
* :mod:`mm.eval.anls` — DocVQA ANLS.
* :mod:`mm.eval.chartqa` — ChartQA relaxed accuracy.
* :mod:`mm.eval.choice` — option-letter extraction (MMMU rules; Video-MME prefixes) and its score.
* :mod:`mm.eval.speech` — WER with Whisper's English normaliser, and sacreBLEU.
* :mod:`mm.eval.aggregate` — dataset score = mean of per-sample scores.

``mm eval`` on top of them:

* :mod:`mm.eval.tasks` — the tasks (reader, metric, aggregation); :mod:`mm.eval.samples` — what a reader
  returns; the readers of the published layouts: :mod:`mm.eval.vqa_tasks`, :mod:`mm.eval.choice_tasks`,
  :mod:`mm.eval.open_qa_tasks`,
  :mod:`mm.eval.speech_tasks`, :mod:`mm.eval.text` (which also checks the backbone's promise).
* :mod:`mm.eval.run` — :func:`evaluate` (answer and score), ``eval.json`` / ``eval.md``, the command.

Conventions: the prediction comes first, the gold answer(s) second; per-sample scores lie in [0, 1], WER is
a fraction and BLEU is on 0-100. Importing this package loads neither torch nor the speech libraries
(``jiwer``, ``sacrebleu`` and ``whisper_normalizer`` are imported on first use; so are torch, pandas and
tqdm by ``mm eval``'s modules).
"""

from __future__ import annotations

from mm.eval.aggregate import mean_score
from mm.eval.anls import ANLS_THRESHOLD, anls, levenshtein_distance
from mm.eval.chartqa import MAX_RELATIVE_CHANGE, relaxed_correctness
from mm.eval.choice import (
    VIDEO_ANSWER_PREFIXES,
    choice_accuracy,
    extract_choice,
    extract_video_choice,
    extract_videomme_official,
    option_letters,
)
from mm.eval.run import EvalResult, SampleResult, evaluate, write_result
from mm.eval.samples import EvalDataError, EvalSample, TaskData, TaskOptions
from mm.eval.speech import (
    corpus_bleu,
    corpus_wer,
    normalize_transcript,
    sample_wer,
    sentence_bleu,
    word_errors,
)
from mm.eval.tasks import TASK_NAMES, TASKS, Task, get_task, read_task, score_predictions
from mm.eval.vqa import (
    normalize_textvqa_answer,
    normalize_vqa_answer,
    normalized_exact_match,
    textvqa_accuracy,
    vqa_accuracy,
    vqa_soft_accuracy,
)

__all__ = [
    "ANLS_THRESHOLD",
    "MAX_RELATIVE_CHANGE",
    "TASKS",
    "TASK_NAMES",
    "VIDEO_ANSWER_PREFIXES",
    "EvalDataError",
    "EvalResult",
    "EvalSample",
    "SampleResult",
    "Task",
    "TaskData",
    "TaskOptions",
    "anls",
    "choice_accuracy",
    "corpus_bleu",
    "corpus_wer",
    "evaluate",
    "extract_choice",
    "extract_video_choice",
    "extract_videomme_official",
    "get_task",
    "levenshtein_distance",
    "mean_score",
    "normalize_textvqa_answer",
    "normalize_transcript",
    "normalize_vqa_answer",
    "normalized_exact_match",
    "option_letters",
    "read_task",
    "relaxed_correctness",
    "sample_wer",
    "score_predictions",
    "sentence_bleu",
    "textvqa_accuracy",
    "vqa_accuracy",
    "vqa_soft_accuracy",
    "word_errors",
    "write_result",
]
