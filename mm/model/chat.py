"""Question answering over Llama 3 chat messages: ``model.chat``, its streaming form, batches, ``mm ask``.

Messages are Llama 3 chat messages whose content is a string or a list of parts: ``{"type":
"text", "text": ...}``, mm's ``{"type": "image", "image": PIL | path | bytes}`` or OpenAI's
``{"type": "image_url", "image_url": {"url": "data:..."}}``, and videos likewise (``{"type":
"video", "video": path | bytes | frames}``, ``{"type": "video_url", ...}``; see :mod:`mm.datasets.media`,
the one place parts are normalised). Every prompt is built by the preprocessor saved with the model
(``model.preprocessor``), so training and serving never disagree on tiles, masks or templates.

Decoding (Llama 3 paper, section 7: vision keys/values are computed once per request, at prefill,
by :meth:`mm.MultimodalModel.stream`):

* Token ids become text with :class:`~mm.text_backbone.tokenizer.StreamDecoder`, which never splits
  a UTF-8 character; special tokens are not part of the answer.
* Stop strings end the answer before the stop string. While streaming, text that could be the
  start of a stop string is held back until it is known not to be one, so a stream never shows a
  stop string or anything after it, and the streamed pieces always join to the non-streamed answer.
* A batch holds conversations of any lengths, media and sampling settings (continuous batching,
  :mod:`mm.model.batching`); each row has its own token limit, stop strings, temperature, top-p
  and seeded generator, and leaves the batch the step it is done.

Heavy modules (torch, the tokenizer) are imported on first use, so ``mm --help`` stays fast.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mm.datasets.media import MediaPolicy
    from mm.datasets.preprocessing import EncodedSample
    from mm.model.multimodal import MultimodalModel

__all__ = [
    "Completion",
    "Delta",
    "GenerationOptions",
    "chat",
    "chat_batch",
    "chat_stream",
    "complete",
    "complete_batch",
    "decode_queue",
    "encode_conversation",
    "generate_deltas",
    "JoinError",
    "start_rows",
]

Messages = Sequence[Mapping[str, Any]]


@dataclass(frozen=True, kw_only=True)
class GenerationOptions:
    """How one answer is generated.

    Args:
        max_new_tokens: at most this many tokens (fewer when the model's context ends first).
        temperature: 0 is greedy decoding; above 0 samples.
        top_p: nucleus sampling mass, in ``(0, 1]``.
        seed: makes sampling repeatable (for the same batch); ignored when greedy.
        stop: strings that end the answer; the answer stops before the first one.
    """

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        object.__setattr__(self, "stop", stop)
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int):
            raise ValueError(f"max_new_tokens must be an int, got {self.max_new_tokens!r}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ValueError(f"seed must be an int, got {self.seed!r}")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise ValueError(f"seed must be in [0, 2**63), got {self.seed}")
        if not all(isinstance(s, str) and s for s in stop):
            raise ValueError(f"stop strings must be non-empty strings, got {stop!r}")


@dataclass(frozen=True)
class Delta:
    """What one decoding step added to one answer.

    Attributes:
        text: new text (may be empty, e.g. while a character or a possible stop string is pending).
        finish_reason: ``None`` while generating; ``"stop"`` (a stop token or stop string) or
            ``"length"`` (the token limit or the model's context) on the answer's last delta.
        completion_tokens: tokens generated for this answer so far.
    """

    text: str
    finish_reason: str | None
    completion_tokens: int


@dataclass(frozen=True)
class Completion:
    """A whole answer: its text, why it ended, and the token counts (OpenAI's ``usage``)."""

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


class _StopFilter:
    """Hold back text that might begin a stop string; cut the text at the first stop string."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(stops)
        self.held = ""

    def push(self, text: str) -> tuple[str, bool]:
        """``(text safe to emit, whether a stop string was found)``."""
        buf = self.held + text
        if not self.stops:
            self.held = ""
            return buf, False
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.held = ""
            return buf[: min(hits)], True
        keep = 0
        for s in self.stops:  # the longest tail of buf that is a proper prefix of a stop string
            for k in range(min(len(s) - 1, len(buf)), keep, -1):
                if buf.endswith(s[:k]):
                    keep = k
                    break
        self.held = buf[len(buf) - keep :]
        return buf[: len(buf) - keep], False

    def flush(self) -> str:
        out, self.held = self.held, ""
        return out


class _Row:
    """One answer being decoded: detokenizer, stop strings, token count and limit."""

    def __init__(self, tokenizer, options: GenerationOptions, limit: int, stop_ids: frozenset[int]) -> None:
        from mm.text_backbone.tokenizer import StreamDecoder

        self.decoder = StreamDecoder(tokenizer, skip_special=True)
        self.filter = _StopFilter(options.stop)
        self.limit = limit
        self.stop_ids = stop_ids
        self.count = 0
        self.done = False

    def push(self, token_id: int) -> Delta:
        self.count += 1
        if token_id in self.stop_ids:
            return self._finish("stop")
        text, stopped = self.filter.push(self.decoder.push(token_id))
        if stopped:
            self.done = True
            return Delta(text, "stop", self.count)
        if self.count >= self.limit:
            return self._finish("length", text)
        return Delta(text, None, self.count)

    def _finish(self, reason: str, text: str = "") -> Delta:
        tail, stopped = self.filter.push(self.decoder.flush())  # bytes of an unfinished character
        if stopped:
            reason = "stop"
        else:
            tail += self.filter.flush()  # what was held back is no stop string after all
        self.done = True
        return Delta(text + tail, reason, self.count)


def _stop_ids(model) -> frozenset[int]:
    return frozenset(int(i) for i in model.stop_token_ids)


def _preprocessor(model):
    pre = getattr(model, "preprocessor", None)
    if pre is None:
        raise ValueError(
            "this model has no preprocessor (tokenizer and image settings); set model.preprocessor "
            "or load a folder saved with one"
        )
    return pre


def encode_conversation(
    model: MultimodalModel, messages: Messages, *, media_policy: MediaPolicy | None = None
) -> EncodedSample:
    """Normalise ``messages`` (see :mod:`mm.datasets.media`) and tokenise them with ``model.preprocessor``,
    ending with the assistant's generation prompt.

    Raises:
        ValueError: malformed messages, a refused or undecodable medium, or a prompt too long.
    """
    from mm.datasets.media import MediaPolicy, normalize_messages

    pre = _preprocessor(model)
    if media_policy is None:
        media_policy = MediaPolicy()
    if media_policy.video is None and pre.video is not None:  # decode clips under the model's caps
        media_policy = dataclasses.replace(media_policy, video=pre.video)
    if media_policy.audio is None and getattr(pre, "audio", None) is not None:  # speech: the same
        media_policy = dataclasses.replace(media_policy, audio=pre.audio)
    sample = pre.encode(normalize_messages(messages, media_policy), add_generation_prompt=True)
    context = model.config.text.max_seq_len
    if len(sample.ids) >= context:
        raise ValueError(
            f"the prompt has {len(sample.ids)} tokens and fills the model's context of {context}"
        )
    return sample


def start_rows(model, batch, keys, samples, options) -> tuple[list[_Row], list[int]]:
    """Prefill ``samples`` and add them to ``batch`` (a :class:`mm.model.batching.DecodeBatch`) under
    ``keys``; returns each one's text state and first token.

    Raises:
        ValueError: a prompt fills the model's context.
    """
    from mm.model.batching import Sampling

    pre = _preprocessor(model)
    context = model.config.text.max_seq_len
    stop_ids = _stop_ids(model)
    rows = [
        _Row(pre.tokenizer, o, min(o.max_new_tokens, context - len(s.ids)), stop_ids)
        for s, o in zip(samples, options)
    ]
    if any(r.limit < 1 for r in rows):
        raise ValueError(f"a prompt fills the model's context of {context} tokens")
    prompts = pre.collate(list(samples), padding_side="left")
    prompts.pop("labels")
    prompts = {k: v.to(model.device) for k, v in prompts.items()}
    sampling = [Sampling(o.temperature, o.top_p, o.seed) for o in options]
    return rows, batch.join(keys, prompts, sampling)


class JoinError(ValueError):
    """:func:`decode_queue` could not start the rows of ``keys`` (a prompt fills the context)."""

    def __init__(self, message: str, keys: list) -> None:
        super().__init__(message)
        self.keys = keys


def decode_queue(
    model,
    keys: Sequence[Hashable],
    *,
    batch_size: int,
    sample_for: Callable[[Hashable], EncodedSample],
    options_for: Callable[[Hashable], GenerationOptions],
) -> Iterator[list[tuple[Hashable, str]]]:
    """Decode an answer for every key, up to ``batch_size`` rows together, in the order of ``keys``.

    A key's prompt is asked for (``sample_for``, then ``options_for``) when a row frees for it; a row
    that finishes leaves at once and the next keys join before the next step. Yields, after each
    prefill and each step, the ``(key, answer)`` of the rows that finished there.

    Raises:
        JoinError: the rows joining could not start (its ``keys`` are theirs).
    """
    from mm.model.batching import DecodeBatch

    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    keys = list(keys)
    texts: dict[Hashable, list[str]] = {}
    rows: dict[Hashable, _Row] = {}
    batch = DecodeBatch(model)
    waiting = 0  # index of the next key to start

    def push(step_keys, tokens) -> list[tuple[Hashable, str]]:
        done = []
        for key, token in zip(step_keys, tokens):
            delta = rows[key].push(token)
            texts[key].append(delta.text)
            if delta.finish_reason is not None:
                done.append(key)
        batch.leave(done)
        for key in done:
            del rows[key]
        return [(key, "".join(texts.pop(key))) for key in done]

    while waiting < len(keys) or len(batch):
        if len(batch):
            finished = push(list(batch.keys), batch.step())
            if finished:
                yield finished
        free = batch_size - len(batch)
        if free > 0 and waiting < len(keys):
            joining = keys[waiting : waiting + free]
            waiting += len(joining)
            samples = [sample_for(k) for k in joining]
            options = [options_for(k) for k in joining]
            for key in joining:
                texts[key] = []
            try:
                new_rows, first = start_rows(model, batch, joining, samples, options)
            except ValueError as e:
                raise JoinError(str(e), joining) from None
            rows.update(zip(joining, new_rows))
            finished = push(joining, first)
            if finished:
                yield finished


def generate_deltas(
    model: MultimodalModel,
    samples: Sequence[EncodedSample],
    options: Sequence[GenerationOptions],
    *,
    is_cancelled: Callable[[int], bool] | None = None,
) -> Iterator[list[tuple[int, Delta]]]:
    """Decode a batch of encoded conversations together, one step at a time.

    Rows decode together (:class:`mm.model.batching.DecodeBatch`), each with its own sampling
    settings; a row leaves the batch the step it finishes.

    Args:
        model: the model; its preprocessor pads the batch (left) and builds the media tensors.
        samples: prompts from :func:`encode_conversation`.
        options: one per sample.
        is_cancelled: ``row -> bool``, checked every step; a cancelled row gets no more deltas.

    Yields:
        Per decoding step, ``(row, delta)`` for each row still generating. Every row's last delta
        has a ``finish_reason``. Decoding ends as soon as every row is finished or cancelled.
    """
    from mm.model.batching import DecodeBatch

    if len(samples) != len(options) or not samples:
        raise ValueError(f"need one options per sample, got {len(samples)} samples and {len(options)}")
    batch = DecodeBatch(model)
    rows, tokens = start_rows(model, batch, list(range(len(samples))), samples, options)
    keys = list(batch.keys)
    while keys:
        out = []
        for i, token in zip(keys, tokens):
            if is_cancelled is not None and is_cancelled(i):
                rows[i].done = True
                continue
            out.append((i, rows[i].push(token)))
        if out:
            yield out
        batch.leave([i for i in keys if rows[i].done])
        keys = list(batch.keys)
        if keys:
            tokens = batch.step()


def _options(model, options: GenerationOptions | None, kwargs: dict[str, Any]) -> GenerationOptions:
    """The caller's options; those left out come from the model's generation defaults, if it has any."""
    if options is not None:
        if kwargs:
            raise TypeError("pass either options= or keyword options, not both")
        return options
    defaults = getattr(model, "generation_defaults", None)
    if defaults is not None:
        saved = {"temperature": defaults.temperature, "top_p": defaults.top_p}
        if defaults.max_new_tokens is not None:
            saved["max_new_tokens"] = defaults.max_new_tokens
        kwargs = {**saved, **kwargs}
    return GenerationOptions(**kwargs)


def complete_batch(
    model: MultimodalModel,
    conversations: Sequence[Messages],
    *,
    media_policy: MediaPolicy | None = None,
    options: GenerationOptions | None = None,
    **kwargs: Any,
) -> list[Completion]:
    """Answer several conversations in one batch; each answer with its finish reason and token counts.

    Keyword options are those of :class:`GenerationOptions` (``max_new_tokens``, ``temperature``,
    ``top_p``, ``seed``, ``stop``). With greedy decoding every answer equals the one the
    conversation gets alone.
    """
    opts = _options(model, options, kwargs)
    samples = [encode_conversation(model, c, media_policy=media_policy) for c in conversations]
    if not samples:
        return []
    texts = [[] for _ in samples]
    ends: list[Delta | None] = [None] * len(samples)
    for step in generate_deltas(model, samples, [opts] * len(samples)):
        for row, delta in step:
            texts[row].append(delta.text)
            if delta.finish_reason is not None:
                ends[row] = delta
    return [
        Completion("".join(t), end.finish_reason, len(s.ids), end.completion_tokens)
        for t, end, s in zip(texts, ends, samples)
    ]


def complete(model: MultimodalModel, messages: Messages, **kwargs: Any) -> Completion:
    """:func:`complete_batch` for one conversation."""
    return complete_batch(model, [messages], **kwargs)[0]


def chat(model: MultimodalModel, messages: Messages, **kwargs: Any) -> str:
    """The model's answer to a conversation that ends with a user turn.

    Args:
        model: a :class:`~mm.MultimodalModel` with a ``preprocessor``.
        messages: Llama 3 chat messages (see the module docstring for the parts).
        **kwargs: ``max_new_tokens=256``, ``temperature=0.0``, ``top_p=1.0``, ``seed=None``,
            ``stop=None`` (a string or a list of strings), ``media_policy`` (:class:`mm.datasets.media.MediaPolicy`,
            for fetching ``http(s)`` image URLs), or ``options=`` a :class:`GenerationOptions`.
            Options left out take the model's saved generation defaults where it has them (an
            imported folder's ``generation_config.json``), else the defaults above.

    Example:
        >>> model.chat([{"role": "user", "content": [{"type": "image", "image": "cat.png"},
        ...                                          {"type": "text", "text": "What is this?"}]}])
    """
    return complete(model, messages, **kwargs).text


def chat_batch(model: MultimodalModel, conversations: Sequence[Messages], **kwargs: Any) -> list[str]:
    """Answers to several conversations, decoded together (options as :func:`chat`)."""
    return [c.text for c in complete_batch(model, conversations, **kwargs)]


def chat_stream(
    model: MultimodalModel,
    messages: Messages,
    *,
    media_policy: MediaPolicy | None = None,
    options: GenerationOptions | None = None,
    **kwargs: Any,
) -> Iterator[str]:
    """Yield the answer's text in pieces as it is decoded (options as :func:`chat`).

    The pieces join to exactly what :func:`chat` returns. Inputs are checked before the first
    piece: a bad message raises when the generator is first advanced.
    """
    opts = _options(model, options, kwargs)
    sample = encode_conversation(model, messages, media_policy=media_policy)
    for step in generate_deltas(model, [sample], [opts]):
        for _, delta in step:
            if delta.text:
                yield delta.text
