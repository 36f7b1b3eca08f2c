"""Importers of the field's published dataset layouts into mm samples (``mm data pack --from FORMAT``).

Each importer reads one layout and yields :class:`ImportedSample` s (Llama 3 chat messages with
media parts, and their media as source files or bytes); :func:`pack_from` packs them through
:func:`mm.datasets.shards.pack_samples`, which runs every check of ``mm data pack`` and writes
shards atomically (on any error nothing is left in the output folder).

=============== ====================================================================== ==========
format          reads                                                                  module
=============== ====================================================================== ==========
``llava``       LLaVA conversation JSON / JSONL (``image`` path or list, ``<image>``)   conversations
``sharegpt``    ShareGPT-style ``messages`` + ``images`` / ``videos`` / ``audios``        conversations
``hf``          Hugging Face ``datasets`` saved locally (save_to_disk, parquet, arrow)  hf
``video-qa``    LLaVA-Video conversations with ``video``; Video-ChatGPT ``q`` / ``a``    video_qa
``librispeech`` LibriSpeech folders (``*.trans.txt`` + ``.flac``)                        speech
``commonvoice`` Common Voice ``SPLIT.tsv`` + ``clips/``                                  speech
``covost``      CoVoST 2 ``covost_v2.SRC_TGT.SPLIT.tsv`` over Common Voice clips          speech
``wds``         img2dataset webdataset shards (``jpg`` + ``txt`` / ``json``)              wds
=============== ====================================================================== ==========
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

from mm.datasets.importers._records import ImportedSample, MediaFile
from mm.datasets.importers.conversations import read_llava, read_sharegpt
from mm.datasets.importers.hf import read_hf
from mm.datasets.importers.speech import read_commonvoice, read_covost, read_librispeech
from mm.datasets.importers.video_qa import read_video_qa
from mm.datasets.importers.wds import read_wds

__all__ = ["IMPORTERS", "ImportedSample", "MediaFile", "import_records", "pack_from"]

IMPORTERS: dict[str, Callable[..., Iterator[ImportedSample]]] = {
    "llava": read_llava,
    "sharegpt": read_sharegpt,
    "hf": read_hf,
    "video-qa": read_video_qa,
    "librispeech": read_librispeech,
    "commonvoice": read_commonvoice,
    "covost": read_covost,
    "wds": read_wds,
}


def import_records(fmt: str, src: str | os.PathLike[str], **options: Any) -> Iterator[ImportedSample]:
    """The samples of ``src`` read as format ``fmt`` (a key of :data:`IMPORTERS`).

    Args:
        fmt: the format name.
        src: the file or folder in that format.
        **options: the importer's keyword arguments (``media_root``, ``split``, ``columns``,
            ``prompt`` ...; see each importer).

    Raises:
        ValueError: an unknown format or an option that importer does not take.
        PackError: (while iterating) a record that does not follow the format, named by file and
            record / line / row.
    """
    if fmt not in IMPORTERS:
        raise ValueError(f"unknown format {fmt!r}; known: {', '.join(IMPORTERS)}")
    reader = IMPORTERS[fmt]
    allowed = set(reader.__kwdefaults__ or {})
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise ValueError(f"--from {fmt} takes no option(s) {unknown}; it takes {sorted(allowed)}")
    return reader(src, **options)


def pack_from(
    fmt: str,
    src: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    options: dict[str, Any] | None = None,
    **pack_options: Any,
) -> Any:
    """Import ``src`` as ``fmt`` and pack it into ``out_dir`` with the checks of ``mm data pack``.

    Args:
        fmt, src: as :func:`import_records`; ``options`` are its options.
        out_dir: the output folder.
        **pack_options: :func:`mm.datasets.shards.pack_samples`'s options (``shard_bytes``,
            ``prefix``, ``overwrite``, ``allow_outside_source``).

    Returns:
        :class:`mm.datasets.shards.PackResult`.
    """
    from mm.datasets.shards import pack_samples

    samples = import_records(fmt, src, **(options or {}))
    return pack_samples(samples, out_dir, source=f"{fmt}:{src}", **pack_options)
