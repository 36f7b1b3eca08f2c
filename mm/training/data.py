"""The stream of micro-batches one rank trains on, and its exact position for resuming.

Two kinds of data:

* **Shards** (the normal case): each :class:`~mm.training.recipe.DataSource` is a
  :class:`~mm.datasets.ShardStream` split over ranks and DataLoader workers; each micro-batch comes
  from one source, drawn by weight with a seeded generator (less padding than mixing within it); samples are decoded and tokenised by the stage's
  :class:`~mm.datasets.preprocessing.Preprocessor` inside the workers (a corrupt sample is skipped and counted
  there; a too-long one is dropped and counted). A video whose member is a features member
  (``0.mp4.safetensors``, written by ``mm data cache-features``) arrives as its frame tokens,
  after its fingerprint was checked against the preprocessor's
  (:class:`~mm.training.cache_features.StaleFeaturesError` stops the stage when they differ).
* **In memory** (a list of conversations, for the Python API and tests): every rank walks the same
  seeded permutation and takes its slice of each global batch, so ``N`` ranks see exactly the global
  batches one rank would.

:meth:`StageData.state_dict` records what was *consumed* (not what workers prefetched): per source
the epoch and, per worker, one past the last sample position used; plus the mixing generator. A
resumed run therefore continues with exactly the samples an uninterrupted one would have used.

It also records the counts of bad, filtered and too-long samples, so that a resumed stage reports
the counts of an uninterrupted one (``summary.json``). A resumed shard stream reads its epoch again
from the start, skipping the samples already used: what it counts while *reading* (samples seen,
bad JSON, truncated shards, dropped members) it counts again, identically, while what it counts
while *decoding* (``decode failed (...)``, ``filtered``) it does not, as skipped samples are not
decoded. The restored counters are therefore those of the epoch's start plus what decoding counted
since (:func:`_resumed_counters`). (With DataLoader workers the counts live in the workers and
``summary.json`` shows only what the main process saw: see :mod:`mm.datasets.webdata`.)
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from mm.datasets._schema import PREFERENCE_ANSWERS
from mm.datasets.preprocessing import EncodedPreference, EncodedSample, Preprocessor, SampleTooLong
from mm.datasets.shards import is_features
from mm.datasets.webdata import DataCounters, DataError, ShardStream
from mm.training.packing import collate_packed, pack_samples
from mm.training.recipe import DataSource

__all__ = ["ModelInputs", "StageData", "collate_preferences"]

logger = logging.getLogger(__name__)


def _resolve_media(
    sample: Mapping[str, Any], preprocessor: Preprocessor | None = None
) -> list[dict[str, Any]]:
    """Messages of a shard sample with media field names replaced by the members' bytes, or for a
    features member by its frame tokens ``[f, t, p, d]`` once their fingerprint is checked against
    ``preprocessor.video_features_fingerprint``."""
    media = sample["media"]
    out = []
    for message in sample["messages"]:
        content = message.get("content")
        if isinstance(content, list):
            parts = []
            for part in content:
                kind = part.get("type")
                if kind in ("image", "video", "audio") and isinstance(part.get(kind), str):
                    name = part[kind].lower()
                    value = media[name]
                    if is_features(name):
                        value = _checked_features(value, preprocessor, sample, name)
                    part = {**part, kind: value}
                parts.append(part)
            message = {**message, "content": parts}
        out.append(message)
    return out


def _checked_features(
    data: bytes, preprocessor: Preprocessor | None, sample: Mapping[str, Any], name: str
) -> torch.Tensor:
    from mm.training.cache_features import check_fingerprint, read_features

    tokens, fingerprint = read_features(data)
    where = f"{sample.get('__url__', '?')} key {sample.get('__key__', '?')} ({name})"
    check_fingerprint(
        fingerprint, None if preprocessor is None else preprocessor.video_features_fingerprint, where
    )
    return tokens


def _identity(item: Any) -> Any:
    return item


#: Reasons :class:`~mm.datasets.webdata.ShardStream` counts when its ``decode`` callable raises.
_DECODE_REASON = "decode failed ("


def _resumed_counters(saved: Mapping[str, Any], epoch_start: Mapping[str, Any]) -> DataCounters:
    """The counters of a shard source resumed from a checkpoint that recorded ``saved`` counters,
    which were ``epoch_start`` when its epoch began: what reading counts is counted again as the
    epoch is read again; what decoding counted since the epoch began is not, so it is kept."""
    reasons = {r: n for r, n in epoch_start["bad_by_reason"].items() if not r.startswith(_DECODE_REASON)}
    reasons.update({r: n for r, n in saved["bad_by_reason"].items() if r.startswith(_DECODE_REASON)})
    examples = {
        k: v
        for k, v in saved["examples"].items()
        if k in reasons or (k == "unreadable shard" and epoch_start["bad_shards"])
    }
    return DataCounters(
        seen=epoch_start["seen"],
        bad=sum(reasons.values()),
        bad_by_reason=reasons,
        examples=examples,
        skipped_pickle=epoch_start["skipped_pickle"],
        skipped_other=epoch_start["skipped_other"],
        bad_shards=epoch_start["bad_shards"],
        filtered=saved["filtered"],
    )


class ModelInputs(dict):
    """A dict of what ``model(**inputs)`` takes, movable as a whole (``inputs.to(device)``), so a
    preference micro-batch (a dict of these) moves like a plain one."""

    def to(self, device: Any) -> ModelInputs:
        return ModelInputs({k: v.to(device) for k, v in self.items()})


def _answers(sample: Mapping[str, Any]) -> dict[str, str] | None:
    """The ranked answers of a shard sample or an in-memory preference record, or None.

    Shard readers that keep them put them under ``answers``; readers that do not leave them in the
    sample's ``meta`` (a sample without its own ``meta`` keeps its other JSON keys there)."""
    if isinstance(sample.get("answers"), Mapping):
        found = sample["answers"]
    elif any(k in sample for k in PREFERENCE_ANSWERS):
        found = sample
    elif isinstance(sample.get("meta"), Mapping):
        found = sample["meta"]
    else:
        return None
    answers = {k: found[k] for k in PREFERENCE_ANSWERS if isinstance(found.get(k), str)}
    return answers or None


def _encode(
    preprocessor: Preprocessor, messages: Sequence[Mapping[str, Any]], answers: Mapping[str, str] | None
) -> EncodedSample | EncodedPreference | None:
    """A conversation or a preference sample encoded; a too-long one is counted and dropped."""
    if answers is None:
        return preprocessor.encode_or_skip(messages)
    try:
        return preprocessor.encode_preference(messages, answers)
    except SampleTooLong:
        preprocessor.skipped["too long"] += 1
        return None


class _Decode:
    """Picklable decode callable for DataLoader workers: shard sample -> (encoded, worker, position,
    where), ``encoded`` an :class:`EncodedSample` or, for a preference sample, an
    :class:`EncodedPreference`; ``where`` names the shard and key for errors."""

    def __init__(self, preprocessor: Preprocessor) -> None:
        self.preprocessor = preprocessor

    def __call__(self, sample: dict[str, Any]) -> tuple[Any, int, int, str] | None:
        messages = _resolve_media(sample, self.preprocessor)
        encoded = _encode(self.preprocessor, messages, _answers(sample))
        if encoded is None:
            return None
        where = f"{sample.get('__url__', '?')} key {sample.get('__key__', '?')}"
        return encoded, sample["__worker__"], sample["__position__"], where


class _ShardSource:
    def __init__(
        self,
        source: DataSource,
        preprocessor: Preprocessor,
        *,
        rank: int,
        world: int,
        seed: int,
        num_workers: int,
        state: Mapping[str, Any] | None,
    ) -> None:
        self.source, self.preprocessor = source, preprocessor
        self.rank, self.world, self.seed, self.num_workers = rank, world, seed, num_workers
        self.counters = DataCounters()
        self.epoch = int(state["epoch"]) if state else 0
        self.next_position = {int(k): int(v) for k, v in (state["next_position"] if state else {}).items()}
        if state and "counters" in state:  # checkpoints of older mm versions have none
            self.counters = _resumed_counters(state["counters"], state["epoch_start"])
        self.epoch_start = dataclasses.asdict(self.counters)  # the counters when this epoch began
        self._iter: Iterator | None = None

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "next_position": {str(k): v for k, v in self.next_position.items()},
            "counters": dataclasses.asdict(self.counters),
            "epoch_start": self.epoch_start,
        }

    def _open(self) -> Iterator:
        workers = max(1, self.num_workers)
        stream = ShardStream(
            self.source.shards,
            rank=self.rank,
            world_size=self.world,
            seed=self.seed,
            epoch=self.epoch,
            shuffle_buffer=self.source.shuffle_buffer,
            max_bad_fraction=self.source.max_bad_fraction,
            decode=_Decode(self.preprocessor),
            counters=self.counters,
            start_sample=[self.next_position.get(w, 0) for w in range(workers)],
        )
        loader = torch.utils.data.DataLoader(
            stream, batch_size=None, num_workers=self.num_workers, collate_fn=_identity
        )
        return iter(loader)

    def next(self) -> tuple[EncodedSample | EncodedPreference, str]:
        for _ in range(2):
            if self._iter is None:
                self._iter = self._open()
            try:
                encoded, worker, position, where = next(self._iter)
            except StopIteration:
                # One pass over this rank's shards is done: the next epoch reshuffles.
                self.epoch += 1
                self.next_position = {}
                self.epoch_start = dataclasses.asdict(self.counters)
                self._iter = None
                continue
            self.next_position[worker] = position + 1
            return encoded, where
        raise DataError(
            f"data source {self.source.shards!r} yielded no usable sample in a whole epoch "
            f"({self.counters.summary() or 'every sample was filtered or too long'})"
        )


class _MemorySource:
    def __init__(
        self,
        conversations: Sequence[Sequence[Mapping[str, Any]]],
        preprocessor: Preprocessor,
        *,
        rank: int,
        world: int,
        seed: int,
        batch_size: int,
        state: Mapping[str, Any] | None,
    ) -> None:
        if not conversations:
            raise ValueError("the in-memory dataset is empty")
        self.items, self.preprocessor = conversations, preprocessor
        self.rank, self.world, self.seed, self.batch_size = rank, world, seed, batch_size
        self.cursor = int(state["cursor"]) if state else 0  # global sample index, same on every rank
        self.counters = DataCounters(**state["counters"]) if state and "counters" in state else DataCounters()

    def state_dict(self) -> dict[str, Any]:
        return {"cursor": self.cursor, "counters": dataclasses.asdict(self.counters)}

    def _item(self, index: int) -> Mapping:
        epoch, offset = divmod(index, len(self.items))
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.items))
        return self.items[int(order[offset])]

    def next_batch(self) -> list[tuple[EncodedSample | EncodedPreference, str]]:
        out = []
        while len(out) < self.batch_size:
            # Global batch = world * batch_size consecutive indices; this rank takes its slice.
            start = self.cursor + self.rank * self.batch_size
            for i in range(start, start + self.batch_size - len(out)):
                self.counters.seen += 1
                item = self._item(i)
                if isinstance(item, Mapping):  # a preference record {"messages", "chosen", ...}
                    encoded = _encode(self.preprocessor, item["messages"], _answers(item) or {})
                else:
                    encoded = _encode(self.preprocessor, item, None)
                if encoded is not None:
                    out.append((encoded, f"in-memory sample {i % len(self.items)}"))
            self.cursor += self.world * self.batch_size
        return out


class StageData:
    """Micro-batches (collated tensors) for one rank.

    Args:
        data: the stage's data sources, or an in-memory list of conversations.
        preprocessor: the stage's preprocessor (tokenizer, resolution, length limit).
        batch_size: samples per micro-batch on this rank.
        rank, world_size: data-parallel position.
        seed: the stage's seed.
        num_workers: DataLoader workers per shard source.
        state: a :meth:`state_dict` to resume from.
        preference: the stage trains on preference samples (objectives ``reward`` and ``dpo``):
            micro-batches are :func:`collate_preferences`' and any other sample is an error; False:
            any preference sample is an error; None: the kind of the first sample, kept throughout.
        pack_len: pack each micro-batch's samples into rows of at most this many tokens
            (:mod:`mm.training.packing`: each sample attends, is masked to its images and is
            labelled as alone) instead of padding every sample to the longest.
    """

    def __init__(
        self,
        data: Sequence[DataSource] | Sequence[Sequence[Mapping[str, Any]]],
        preprocessor: Preprocessor,
        *,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        num_workers: int = 0,
        state: Mapping[str, Any] | None = None,
        preference: bool | None = None,
        pack_len: int | None = None,
    ) -> None:
        self.preprocessor = preprocessor
        self.pack_len = pack_len
        self.batch_size = batch_size
        self.preference = preference
        state = state or {}
        if "skipped" in state:  # too-long samples are counted as they are encoded, never twice
            preprocessor.skipped = Counter(state["skipped"])
        self.memory: _MemorySource | None = None
        self.shards: list[_ShardSource] = []
        if data and isinstance(data[0], DataSource):
            for i, src in enumerate(data):
                self.shards.append(
                    _ShardSource(
                        src,
                        preprocessor,
                        rank=rank,
                        world=world_size,
                        seed=seed + 1000 * i,
                        num_workers=num_workers,
                        state=(state.get("sources") or {}).get(str(i)),
                    )
                )
            weights = np.array([s.weight for s in data], dtype=float)
            self.weights = weights / weights.sum()
            self.mix = np.random.default_rng([seed, rank, 7])
            if "mix" in state:
                self.mix.bit_generator.state = state["mix"]
        else:
            self.memory = _MemorySource(
                data,
                preprocessor,
                rank=rank,
                world=world_size,
                seed=seed,
                batch_size=batch_size,
                state=state.get("memory"),
            )

    @property
    def counters(self) -> list[DataCounters]:
        return [self.memory.counters] if self.memory is not None else [s.counters for s in self.shards]

    def state_dict(self) -> dict[str, Any]:
        skipped = dict(self.preprocessor.skipped)
        if self.memory is not None:
            return {"memory": self.memory.state_dict(), "skipped": skipped}
        return {
            "sources": {str(i): s.state_dict() for i, s in enumerate(self.shards)},
            "mix": self.mix.bit_generator.state,
            "skipped": skipped,
        }

    def next_batch(self) -> dict[str, Any]:
        if self.memory is not None:
            items = self.memory.next_batch()
        else:
            # One source per micro-batch, drawn by weight: samples of a source have similar lengths,
            # so batches carry little padding (mixing within a batch pads short samples to long ones).
            source = self.shards[int(self.mix.choice(len(self.shards), p=self.weights))]
            items = [source.next() for _ in range(self.batch_size)]
        for encoded, where in items:
            kind = isinstance(encoded, EncodedPreference)
            if self.preference is None:
                self.preference = kind
            if kind != self.preference:
                raise DataError(
                    f"{where}: a preference stage (objective reward or dpo) takes only preference samples "
                    "(messages with 'chosen' and 'rejected' answers)"
                    if self.preference
                    else f"{where}: a preference sample in a stage whose objective does not take them"
                )
        samples = [encoded for encoded, _ in items]
        if self.preference:
            return collate_preferences(self.preprocessor, samples)
        if self.pack_len:
            rows = pack_samples([len(s.ids) for s in samples], self.pack_len)
            return collate_packed(self.preprocessor, samples, rows)
        return self.preprocessor.collate(samples)


def collate_preferences(preprocessor: Preprocessor, samples: Sequence[EncodedPreference]) -> dict[str, Any]:
    """The micro-batch of a preference stage (Llama 3 section 7.5).

    Returns:
        ``{"chosen": inputs, "rejected": inputs}`` plus, when some sample has an edited answer,
        ``"edited": inputs`` and ``"edited_mask"`` (bool ``[b]``; rows without one carry a copy of
        their chosen answer, to be ignored). Each ``inputs`` (:class:`ModelInputs`) is what
        ``model(**inputs)`` takes: the prompt with that answer, labels only on the answer's tokens
        and its closing ``<|eot_id|>``. Row ``i`` of each is sample ``i``.
    """
    batch: dict[str, Any] = {
        "chosen": ModelInputs(preprocessor.collate([s.chosen for s in samples])),
        "rejected": ModelInputs(preprocessor.collate([s.rejected for s in samples])),
    }
    has_edited = [s.edited is not None for s in samples]
    if any(has_edited):
        batch["edited"] = ModelInputs(
            preprocessor.collate([s.edited if s.edited is not None else s.chosen for s in samples])
        )
        batch["edited_mask"] = torch.tensor(has_edited, dtype=torch.bool)
    return batch
