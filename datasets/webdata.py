"""Streaming mm samples from webdataset shards: split by rank and worker, resample, count what is bad.

:class:`ShardStream` (built by :func:`stream_samples`) is a ``torch.utils.data.IterableDataset``
over shards written by :func:`mm.datasets.shards.pack` (or any webdataset shards that follow the
schema documented there). Shards come from local paths, brace patterns
(``shard-{000000..000009}.tar``), folders (every ``*.tar`` inside) or any URL webdataset opens
(``pipe:``, ``http(s):``, ``gs:`` ...).

Each sample comes out as::

    {"__key__": str, "__url__": str, "__worker__": int, "__position__": int, "__epoch__": int,
     "messages": [...],            # Llama 3 chat messages; caption pairs already turned into messages
     "media": {field: bytes},      # raw member bytes, e.g. {"0.png": b"\\x89PNG..."}
     "meta": {...}}

or as whatever the ``decode`` callable returns for it: decoding media is left to that callable so
image, video and audio decoders plug in (the paper's pipelines, "The Llama 3 Herd of Models",
sections 7.5 and 8.1, are all fed from such samples).

Shards written by img2dataset (``--output_format webdataset``: ``00000.tar`` holding
``000000000.jpg`` + ``.txt`` and / or ``.json`` with ``caption``, the ``.parquet`` and
``_stats.json`` beside them ignored) are read as they are, as caption pairs: the caption from the
``txt`` (or the json's ``caption``), the json's other keys (``url``, ``status``, sizes ...) as
``meta``, the prompt :data:`~mm.datasets.shards.DEFAULT_CAPTION_PROMPTS`' for the kind. A sample
with an empty caption is unusable and counted (``"bad caption pair"``).

Safety and robustness:

* Only ``json``, ``txt``, media members (see :data:`mm.datasets.shards.MEDIA_KINDS`) and
  features members of videos (``0.mp4.safetensors``, cached frame tokens) are read.
  Pickle members (``.pyd .pkl .pickle .pt .pth``) are dropped unread and counted; webdataset's
  default decoder, which unpickles them, is never used. Other members are dropped and counted.
* A sample with bad JSON, broken messages, a missing media member, or on which ``decode`` raises
  is skipped and counted in :class:`DataCounters`; so is the sample cut short by a truncated or
  corrupt shard, after which the stream moves on to the next shard. Once ``seen`` reaches
  ``min_samples_before_check`` (and at the end of a finite stream, whatever the count) a bad
  fraction above ``max_bad_fraction`` raises :class:`DataError` naming the fraction, the limit
  and the most common reasons. Counters live in the process that reads: with DataLoader workers
  each worker has its own copy (the check runs there; DataLoader re-raises its error).

Splitting and position (for exact resume):

* Shards are shuffled per epoch with ``(seed, epoch)`` (the same order on every rank), then split
  ``order[rank::world_size][worker::num_workers]``, so ranks and workers read disjoint shards and
  together every shard once per epoch.
* With fewer shards than ``world_size * num_workers`` some readers would get nothing and ranks
  would wait on each other forever; instead the stream warns and *resamples*: each reader draws
  shards with replacement from its own ``(seed, epoch, rank, worker)`` generator, without end.
* A reader's stream is deterministic given the shards, ``seed``, ``epoch``, ``rank``,
  ``world_size``, ``worker`` and ``num_workers``. ``__position__`` numbers its samples (after the
  shuffle buffer, before ``decode``). Resume by passing ``start_sample`` = one past the last
  position consumed: an int for every reader, or one entry per DataLoader worker.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import tarfile
import warnings
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

import torch.utils.data
from webdataset.gopen import gopen
from webdataset.shardlists import expand_urls

from mm.datasets._schema import PREFERENCE_ANSWERS
from mm.datasets.shards import (
    DEFAULT_CAPTION_PROMPTS,
    FEATURES_EXTENSION,
    MEDIA_KINDS,
    PICKLE_EXTENSIONS,
    TEXT_FIELDS,
    SampleError,
    caption_messages,
    check_messages,
    media_kind,
    rewrite_media,
    split_member_name,
)

__all__ = [
    "DataCounters",
    "DataError",
    "ShardStream",
    "expand_shards",
    "normalize_sample",
    "read_shard",
    "stream_samples",
]

logger = logging.getLogger(__name__)

_READ_ERRORS = (tarfile.TarError, OSError, EOFError, zlib.error, ValueError)
_URL_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:")  # a scheme of two or more letters (not "C:")
_ALLOWED_EXTENSIONS = TEXT_FIELDS.union(*MEDIA_KINDS.values(), {FEATURES_EXTENSION})


class DataError(ValueError):
    """The data are too broken to train on (bad fraction over the limit, no readable samples)."""


@dataclass
class DataCounters:
    """What a stream has read and skipped; pass one in to watch it (shared by reference).

    Attributes:
        seen: samples read from shards (good and bad).
        bad: samples skipped as corrupt; ``bad_by_reason`` splits them by reason.
        bad_by_reason: reason -> count, e.g. ``{"bad json": 2, "decode failed (OSError)": 1}``.
        examples: reason -> the first occurrence (shard, key and error), for messages.
        skipped_pickle: pickle members dropped without being read.
        skipped_other: other members outside the allow-list dropped without being read.
        bad_shards: shards that could not be opened or ended early (truncated, corrupt); the
            first is described in ``examples["unreadable shard"]``.
        filtered: samples the ``decode`` callable dropped on purpose by returning None.
    """

    seen: int = 0
    bad: int = 0
    bad_by_reason: dict[str, int] = field(default_factory=dict)
    examples: dict[str, str] = field(default_factory=dict)
    skipped_pickle: int = 0
    skipped_other: int = 0
    bad_shards: int = 0
    filtered: int = 0

    @property
    def bad_fraction(self) -> float:
        """``bad / seen`` (0 before anything was seen)."""
        return self.bad / self.seen if self.seen else 0.0

    def add_bad(self, reason: str, example: str) -> None:
        """Count one skipped sample under ``reason``."""
        self.bad += 1
        self.bad_by_reason[reason] = self.bad_by_reason.get(reason, 0) + 1
        if reason not in self.examples:
            self.examples[reason] = example
            logger.warning("skipping a bad sample (%s): %s", reason, example)

    def add_bad_shard(self, url: str, error: BaseException) -> None:
        """Count one shard that could not be opened or ended early."""
        self.bad_shards += 1
        if "unreadable shard" not in self.examples:
            self.examples["unreadable shard"] = f"{url}: {type(error).__name__}: {error}"
        logger.warning("shard %s is unreadable or cut short: %s: %s", url, type(error).__name__, error)

    def summary(self, top: int = 3) -> str:
        """The most common reasons, each with its first example."""
        common = sorted(self.bad_by_reason.items(), key=lambda kv: (-kv[1], kv[0]))[:top]
        return "; ".join(
            f"{reason} x{count} (first: {self.examples.get(reason, '?')})" for reason, count in common
        )


def _check_fraction(counters: DataCounters, limit: float, min_seen: int, where: str) -> None:
    if counters.seen >= min_seen and counters.bad > limit * counters.seen:
        raise DataError(
            f"{counters.bad} of {counters.seen} samples ({counters.bad_fraction:.2%}) were unreadable, above "
            f"max_bad_fraction={limit:.2%} ({where}). Most common: {counters.summary()}. "
            "Repair or re-pack the data, or raise max_bad_fraction."
        )


def expand_shards(urls: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> list[str]:
    """Expand shard specs into a list of URLs / paths.

    Args:
        urls: a path, folder (all ``*.tar`` inside, sorted), glob, brace pattern
            (``a-{000..009}.tar``; ``::`` joins several, as in webdataset), URL, or a list of those.

    Raises:
        FileNotFoundError: a local shard or folder does not exist (all missing ones are named).
        ValueError: nothing to read.
    """
    items = [urls] if isinstance(urls, (str, os.PathLike)) else list(urls)
    out: list[str] = []
    missing: list[str] = []
    for item in items:
        for url in expand_urls(os.fspath(item)):
            if _URL_RE.match(url):
                out.append(url)
                continue
            path = Path(url).expanduser()
            if path.is_dir():
                tars = sorted(path.glob("*.tar"))
                if not tars:
                    raise FileNotFoundError(f"no .tar shards in folder {path}")
                out.extend(str(t) for t in tars)
            elif any(c in url for c in "*?["):
                found = sorted(str(p) for p in path.parent.glob(path.name))
                if not found:
                    missing.append(url)
                out.extend(found)
            elif path.is_file():
                out.append(str(path))
            else:
                missing.append(url)
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise FileNotFoundError(f"{len(missing)} shard(s) not found: {', '.join(missing[:3])}{more}")
    if not out:
        raise ValueError(f"no shards to read in {urls!r}")
    return out


def normalize_sample(
    fields: Mapping[str, bytes], *, caption_prompts: Mapping[str, str] = DEFAULT_CAPTION_PROMPTS
) -> tuple[list[dict[str, Any]], dict[str, bytes], dict[str, Any]]:
    """Turn one sample's members into ``(messages, media, meta)``.

    Args:
        fields: member field -> bytes (fields lower-cased, e.g. ``{"json": ..., "0.png": ...}``).
        caption_prompts: user prompt per media kind for caption pairs (``{"caption": ...}`` json,
            or a ``txt`` caption beside a json of metadata).

    Raises:
        SampleError: with ``reason`` ``"bad json"``, ``"bad messages"``, ``"missing media"``,
            ``"no messages"`` or ``"bad caption pair"``.
    """
    media = {f: data for f, data in fields.items() if media_kind(f) is not None}
    obj: Any = {}
    if "json" in fields:
        try:
            obj = json.loads(fields["json"].decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise SampleError("bad json", str(exc)) from exc
        if not isinstance(obj, dict):
            raise SampleError("bad json", f"expected an object, got {type(obj).__name__}")
    if "messages" in obj:
        mapping: dict[str, str] = {}
        for kind, ref in check_messages(obj["messages"]):
            name = ref.lower()
            if name not in media:
                raise SampleError("missing media", f"{kind} {ref!r} is not a member (have {sorted(media)})")
            if media_kind(name) != kind:
                raise SampleError("bad messages", f"{ref!r} is not a {kind}")
            mapping[ref] = name
        messages = obj["messages"]
        if any(k != v for k, v in mapping.items()):
            messages = rewrite_media(messages, mapping)
    else:
        # mm's caption pairs hold the caption in the json; img2dataset's shards in the txt, with a
        # json of metadata whose "caption" is the same text, or null when no caption column was read.
        if "caption" in obj and (obj["caption"] is not None or "txt" not in fields):
            caption = obj["caption"]
        elif "txt" in fields:
            try:
                caption = fields["txt"].decode("utf-8").strip()
            except UnicodeDecodeError as exc:
                raise SampleError("bad caption pair", f"txt is not UTF-8 ({exc})") from exc
        else:
            raise SampleError("no messages", "needs a json with 'messages' or 'caption', or a txt caption")
        if not isinstance(caption, str):
            raise SampleError("bad caption pair", "'caption' must be a string")
        if not caption.strip():
            raise SampleError("bad caption pair", "the caption is empty")
        if len(media) != 1:
            raise SampleError(
                "bad caption pair", f"a caption needs exactly one media member, found {sorted(media)}"
            )
        (name,) = media
        kind = media_kind(name) or ""
        prompt = obj.get("prompt")
        if not isinstance(prompt, str):
            prompt = caption_prompts[kind]
        messages = caption_messages(kind, name, caption, prompt)
    if "meta" in obj:
        meta = obj["meta"]
        answers = {k: obj[k] for k in PREFERENCE_ANSWERS if k in obj}
        if answers and isinstance(meta, dict):  # a preference sample's ranked answers stay with it
            meta = {**meta, **answers}
    else:
        meta = {k: v for k, v in obj.items() if k not in ("messages", "caption", "prompt")}
    return messages, media, meta


def _mix(*parts: object) -> int:
    """A 64-bit seed from the parts, the same in every process (unlike ``hash``)."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little")


def read_shard(url: str, counters: DataCounters) -> Iterator[tuple[str, dict[str, bytes], str | None]]:
    """Yield ``(key, {field: bytes}, problem)`` per sample of one shard; a broken shard ends it, counted.

    Fields are lower-cased; only allowed members are read (see the module docstring); ``problem``
    names a member that occurs twice, else is None.
    """
    key: str | None = None
    fields: dict[str, bytes] = {}
    problem: str | None = None
    stream = None
    try:
        stream = gopen(url, "rb")
        with tarfile.open(fileobj=stream, mode="r|*") as tar:
            for info in tar:
                if not info.isreg():
                    continue
                member_key, name = split_member_name(info.name)
                if (
                    member_key is None
                    or name is None
                    or (member_key.startswith("__") and name.endswith("__"))
                ):
                    continue
                name = name.lower()
                ext = name.rsplit(".", 1)[-1]
                if ext in PICKLE_EXTENSIONS:  # never read, let alone unpickled
                    counters.skipped_pickle += 1
                    continue
                if ext not in _ALLOWED_EXTENSIONS:
                    counters.skipped_other += 1
                    continue
                if member_key != key:
                    if key is not None:
                        yield key, fields, problem
                    key, fields, problem = member_key, {}, None
                extracted = tar.extractfile(info)
                assert extracted is not None  # regular member
                data = extracted.read()
                if name in fields:
                    problem = f"member {info.name!r} occurs twice"
                fields[name] = data
                tar.members = []  # streaming: keep no index of what was read
        if key is not None:
            yield key, fields, problem
    except _READ_ERRORS as exc:
        counters.add_bad_shard(url, exc)
        if key is not None:  # the sample being read when the shard broke
            counters.seen += 1
            counters.add_bad("truncated shard", f"{url} at key {key}: {type(exc).__name__}: {exc}")
    finally:
        if stream is not None:
            try:
                stream.close()
            except Exception as exc:  # a pipe's exit status is checked on close
                logger.warning("closing shard %s: %s", url, exc)


def _shuffled(items: Iterator[Any], size: int, rng: random.Random) -> Iterator[Any]:
    """Shuffle a stream through a buffer of ``size`` items."""
    buffer: list[Any] = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        i = rng.randrange(size)
        yield buffer[i]
        buffer[i] = item
    rng.shuffle(buffer)
    yield from buffer


class ShardStream(torch.utils.data.IterableDataset):
    """mm samples streamed from webdataset shards, split over ranks and DataLoader workers.

    See the module docstring for the sample layout, splitting, resampling and error accounting.

    Args:
        urls: shard spec(s) for :func:`expand_shards`.
        rank: this process's rank in ``[0, world_size)``.
        world_size: number of ranks (data-parallel processes).
        seed: base seed for shard order, resampling and the shuffle buffer.
        epoch: epoch number mixed into the seeds (also :meth:`set_epoch`).
        shuffle_shards: shuffle the shard order per epoch (off: the order given).
        shuffle_buffer: shuffle samples through a buffer of this many (0 or 1: off).
        resample: None decides by shard count (resample, with a warning, when there are fewer
            shards than ``world_size * num_workers``); True always draws shards with replacement
            without end; False never does, and too few shards is an error.
        max_bad_fraction: the fraction of bad samples above which reading stops with :class:`DataError`.
        min_samples_before_check: samples to read before the fraction is first checked.
        decode: called on each sample dict; its return value is what the stream yields. Raising
            skips the sample (counted as ``"decode failed (ExceptionType)"``); returning None drops
            it on purpose (counted in ``filtered``).
        counters: a :class:`DataCounters` to update (a new one is made otherwise; see ``counters``).
        start_sample: skip this reader's first samples (by ``__position__``): an int for every
            reader, or one int per DataLoader worker.
        caption_prompts: user prompt per media kind for caption pairs.
    """

    def __init__(
        self,
        urls: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
        *,
        rank: int,
        world_size: int,
        seed: int = 0,
        epoch: int = 0,
        shuffle_shards: bool = True,
        shuffle_buffer: int = 0,
        resample: bool | None = None,
        max_bad_fraction: float = 0.01,
        min_samples_before_check: int = 100,
        decode: Callable[[dict[str, Any]], Any] | None = None,
        counters: DataCounters | None = None,
        start_sample: int | Sequence[int] = 0,
        caption_prompts: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__()
        if not (
            isinstance(world_size, int)
            and world_size >= 1
            and isinstance(rank, int)
            and 0 <= rank < world_size
        ):
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank!r}, world_size={world_size!r}")
        if not 0.0 <= max_bad_fraction <= 1.0:
            raise ValueError(f"max_bad_fraction must be in [0, 1], got {max_bad_fraction}")
        if shuffle_buffer < 0 or min_samples_before_check < 0:
            raise ValueError("shuffle_buffer and min_samples_before_check must be >= 0")
        starts = [start_sample] if isinstance(start_sample, int) else list(start_sample)
        if any(not isinstance(s, int) or s < 0 for s in starts):
            raise ValueError(
                f"start_sample must be a non-negative int or a list of them, got {start_sample!r}"
            )
        prompts = dict(DEFAULT_CAPTION_PROMPTS)
        if caption_prompts is not None:
            unknown = set(caption_prompts) - set(MEDIA_KINDS)
            if unknown:
                raise ValueError(
                    f"caption_prompts has unknown kinds {sorted(unknown)}; use {sorted(MEDIA_KINDS)}"
                )
            prompts.update(caption_prompts)
        self.shards = expand_shards(urls)
        self.rank, self.world_size, self.seed, self.epoch = rank, world_size, seed, epoch
        self.shuffle_shards, self.shuffle_buffer, self.resample = shuffle_shards, shuffle_buffer, resample
        self.max_bad_fraction, self.min_samples_before_check = max_bad_fraction, min_samples_before_check
        self.decode, self.start_sample, self.caption_prompts = decode, start_sample, prompts
        self.counters = counters if counters is not None else DataCounters()

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle for ``epoch`` (takes effect in workers started afterwards, i.e. not with
        ``persistent_workers=True``)."""
        self.epoch = epoch

    # ------------------------------------------------------------------ per reader

    def _shard_urls(self, worker: int, num_workers: int, resample: bool) -> Iterator[str]:
        if resample:
            rng = random.Random(
                _mix("resample", self.seed, self.epoch, self.rank, self.world_size, worker, num_workers)
            )
            while True:
                yield rng.choice(self.shards)
        order = list(self.shards)
        if self.shuffle_shards:
            random.Random(_mix("shards", self.seed, self.epoch)).shuffle(order)
        yield from order[self.rank :: self.world_size][worker::num_workers]

    def _samples(self, urls: Iterator[str], where: str, resample: bool) -> Iterator[dict[str, Any]]:
        counters, good, empty_run = self.counters, 0, 0
        for url in urls:
            before = good
            for key, fields, problem in read_shard(url, counters):
                counters.seen += 1
                try:
                    if problem is not None:
                        raise SampleError("duplicate member", problem)
                    messages, media, meta = normalize_sample(fields, caption_prompts=self.caption_prompts)
                except SampleError as exc:
                    counters.add_bad(exc.reason, f"{url} key {key}: {exc}")
                else:
                    good += 1
                    yield {"__key__": key, "__url__": url, "messages": messages, "media": media, "meta": meta}
                _check_fraction(counters, self.max_bad_fraction, self.min_samples_before_check, where)
            empty_run = empty_run + 1 if good == before else 0
            if resample and empty_run >= 3 * len(self.shards) + 10:
                raise DataError(
                    f"{empty_run} shards in a row gave no usable sample ({where}): {counters.summary()}"
                )
        if good == 0:
            shards = f"{counters.bad_shards} unreadable shard(s)"
            if "unreadable shard" in counters.examples:
                shards += f" (first: {counters.examples['unreadable shard']})"
            raise DataError(
                f"no usable sample in this reader's shards ({where}): {shards}, {counters.bad} bad "
                f"sample(s){': ' + counters.summary() if counters.bad else ''}"
            )

    def __iter__(self) -> Iterator[Any]:
        info = torch.utils.data.get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        readers, count = self.world_size * num_workers, len(self.shards)
        where = f"rank {self.rank}/{self.world_size}, worker {worker}/{num_workers}"
        resample = self.resample
        if resample is None:
            resample = count < readers
            if resample and worker == 0:
                warnings.warn(
                    f"only {count} shard(s) for {self.world_size} rank(s) x {num_workers} worker(s) = {readers} "
                    "readers: resampling shards with replacement (an endless stream, no epochs) so every reader "
                    "gets data. Pack more, smaller shards for exact epochs.",
                    stacklevel=2,
                )
        elif not resample and count < readers:
            raise DataError(
                f"only {count} shard(s) for {readers} readers ({self.world_size} rank(s) x {num_workers} "
                "worker(s)) and resample=False: some readers would get no data. Pack more shards, use fewer "
                "workers, or allow resampling."
            )
        if isinstance(self.start_sample, int):
            start = self.start_sample
        elif len(self.start_sample) == num_workers:
            start = self.start_sample[worker]
        else:
            raise ValueError(f"start_sample has {len(self.start_sample)} entries for {num_workers} worker(s)")
        samples = self._samples(self._shard_urls(worker, num_workers, resample), where, resample)
        if self.shuffle_buffer > 1:
            rng = random.Random(
                _mix("buffer", self.seed, self.epoch, self.rank, self.world_size, worker, num_workers)
            )
            samples = _shuffled(samples, self.shuffle_buffer, rng)
        for position, sample in enumerate(islice(samples, start, None), start=start):
            sample.update(__worker__=worker, __position__=position, __epoch__=self.epoch)
            if self.decode is None:
                yield sample
                continue
            try:
                out = self.decode(sample)
            except DataError:
                raise
            except Exception as exc:
                self.counters.add_bad(
                    f"decode failed ({type(exc).__name__})",
                    f"{sample['__url__']} key {sample['__key__']}: {exc}",
                )
                _check_fraction(self.counters, self.max_bad_fraction, self.min_samples_before_check, where)
                continue
            if out is None:
                self.counters.filtered += 1
                continue
            yield out
        # A finite stream has been read whole: its fraction is final, however few samples it had.
        _check_fraction(self.counters, self.max_bad_fraction, 0, where)


def stream_samples(
    urls: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    *,
    rank: int,
    world_size: int,
    **options: Any,
) -> ShardStream:
    """Build a :class:`ShardStream`; ``options`` are its keyword arguments."""
    return ShardStream(urls, rank=rank, world_size=world_size, **options)
