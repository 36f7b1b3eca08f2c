"""Video question answering JSON (``--from video-qa``): LLaVA-Video and Video-ChatGPT styles.

LLaVA-Video (LLaVA-Video-178K, LLaVA-NeXT-Video) records are LLaVA conversations with a ``video``
path; the video's marker in the first human turn is ``<image>`` (as those sets write it) or
``<video>``::

    {"id": "v_123", "video": "academic/v_123.mp4",
     "conversations": [{"from": "human", "value": "<image>\\nWhat happens?"}, {"from": "gpt", "value": "..."}]}

Video-ChatGPT's QA files hold one question and answer per record, the video named by ``video`` (a
path) or ``video_id`` (a file ``VIDEO_ID.mp4`` / ``.mkv`` / ``.webm`` / ``.mov`` in the video
folder)::

    {"video_id": "v_123", "q": "What happens?", "a": "A man juggles."}   # or "question" / "answer"

Both become a user turn [video, question] (or the conversation, the marker replaced by the video
part at its place) and the answer. Paths are relative to ``media_root`` (default: the file's
folder) and must lie inside it; errors name ``FILE: record i`` (from 0) or ``FILE line n``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mm.datasets._schema import VIDEO_EXTENSIONS, PackError
from mm.datasets.importers._records import (
    ImportedSample,
    MediaFile,
    MediaList,
    read_json_records,
    turns_to_messages,
)

__all__ = ["read_video_qa"]


def _video_path(record: dict[str, Any], root: Path, origin: str) -> str:
    if isinstance(record.get("video"), str) and record["video"]:
        return record["video"]
    video_id = record.get("video_id", record.get("video_name"))
    if not isinstance(video_id, str) or not video_id:
        raise PackError(f"{origin}: needs 'video' (a path) or 'video_id'")
    for ext in sorted(VIDEO_EXTENSIONS):
        if (root / f"{video_id}.{ext}").is_file():
            return f"{video_id}.{ext}"
    raise PackError(f"{origin}: no video file {video_id}.{{{','.join(sorted(VIDEO_EXTENSIONS))}}} in {root}")


def _pick(record: dict[str, Any], names: tuple[str, ...], origin: str) -> str:
    for name in names:
        if name in record:
            if not isinstance(record[name], str):
                raise PackError(f"{origin}: {name!r} must be a string")
            return record[name]
    raise PackError(f"{origin}: needs one of {list(names)}")


def read_video_qa(
    src: str | os.PathLike[str], *, media_root: str | os.PathLike[str] | None = None
) -> Iterator[ImportedSample]:
    """Samples of a video QA file (see the module docstring).

    Args:
        src: the ``.json`` (a list of records) or ``.jsonl`` file.
        media_root: the video folder (default: ``src``'s folder).
    """
    src = Path(src)
    if not src.is_file():
        raise PackError(f"{src}: expected a .json or .jsonl file")
    root = Path(media_root) if media_root is not None else src.parent
    for origin, record in read_json_records(src):
        if not isinstance(record, dict):
            raise PackError(f"{origin}: expected a JSON object")
        media = MediaList()
        path = _video_path(record, root, origin)
        video = media.add("video", MediaFile(root, path), path, origin)
        if "conversations" in record:
            first = record["conversations"][0] if isinstance(record["conversations"], list) else None
            text = first.get("value", "") if isinstance(first, dict) else ""
            marker = "<video>" if isinstance(text, str) and "<video>" in text else "<image>"
            messages = turns_to_messages(
                record["conversations"], {"video": [video]}, origin, markers={"video": marker}
            )
        else:
            question = _pick(record, ("q", "question"), origin)
            answer = _pick(record, ("a", "answer"), origin)
            messages = [
                {
                    "role": "user",
                    "content": [{"type": "video", "video": video}, {"type": "text", "text": question}],
                },
                {"role": "assistant", "content": answer},
            ]
        meta = {k: record[k] for k in ("id", "video_id") if isinstance(record.get(k), (str, int))}
        yield ImportedSample(messages, media.items, origin, meta or None)
