"""Everything between a conversation and the model's input tensors, saved with the model.

Shapes: b batch, s tokens, n images per sample, t tiles per image, v videos per sample, f frames,
p tokens per tile, d model width, a audio clips in the batch, F log-mel frames.

A :class:`Preprocessor` bundles the tokenizer, the image processor (tile size, tiles, normalisation),
video sampling (frames per clip), audio features (sample rate, log-mel), the cross-attention mask
policy and the length limit. Training collation, ``model.chat``, ``mm ask`` and ``mm serve`` all use
the one saved with the model, so training and serving never disagree.

Conversations are Llama 3 chat messages whose media parts carry the media themselves:
``{"type": "image", "image": <PIL image | path | bytes>}``, ``{"type": "video", "video": <path |
bytes | list of PIL frames | tensor [f, t, p, d]>}``, ``{"type": "audio", "audio": <path | bytes |
waveform tensor>}``. A video given as a tensor holds its frames' tokens as the frozen image encoder
and projector computed them (``mm data cache-features``, Llama 3 section 7.4's video stage keeps the
encoder frozen): batches of such videos carry ``video_features`` instead of pixels.
An audio part becomes as many ``<|audio|>`` placeholders as the speech adapter emits for it
(Llama 3 section 8); images and videos keep one placeholder each and are reached by cross-attention.
"""

from __future__ import annotations

import dataclasses
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mm._strict import check_fields
from mm._values import ConfigValueError, as_choice, as_int, as_int_tuple, check_values, describe, nested
from mm.datasets.cross_attention_mask import MASK_MODES, batch_cross_attention_mask
from mm.datasets.image_processing import ImageProcessor
from mm.datasets.images import load_image
from mm.datasets.inputs import AudioInputs, VideoInputs
from mm.text_backbone.chat_format import IGNORE_INDEX, format_chat, labels_from
from mm.text_backbone.tokenizer import Tokenizer, load_tokenizer

__all__ = [
    "AudioTokens",
    "EncodedPreference",
    "EncodedSample",
    "Preprocessor",
    "SampleTooLong",
    "stage_preprocessor",
]


class SampleTooLong(ValueError):
    """A sample has more tokens than ``max_seq_len`` (it is skipped, never cut through an image)."""


@dataclass(frozen=True, kw_only=True)
class AudioTokens:
    """How the speech encoder and adapter shorten audio: stacked frames, then a strided convolution."""

    stack: int = 4
    conv_kernel: int = 3
    conv_stride: int = 2

    def __post_init__(self) -> None:
        positive = as_int(minimum=1)
        check_values(self, {"stack": positive, "conv_kernel": positive, "conv_stride": positive})

    def count(self, feature_frames: int) -> int:
        """``<|audio|>`` placeholders for ``feature_frames`` log-mel frames."""
        encoder = feature_frames // self.stack
        if encoder < 1:
            raise ValueError(f"audio of {feature_frames} feature frames is shorter than one encoder frame")
        return (encoder + 2 * (self.conv_kernel // 2) - self.conv_kernel) // self.conv_stride + 1


@dataclass
class EncodedSample:
    """One tokenised conversation: ids, labels (``-100`` where nothing is learned) and its media."""

    ids: list[int]
    labels: list[int]
    images: list[Any] = field(default_factory=list)
    videos: list[list[Any]] = field(default_factory=list)
    audios: list[torch.Tensor] = field(default_factory=list)


@dataclass
class EncodedPreference:
    """One tokenised preference sample (Llama 3 section 7.5): the prompt with each ranked answer.

    Each of ``chosen``, ``rejected`` and ``edited`` (``None`` when the sample has none) is the
    prompt plus that answer as the assistant's turn, labelled only on the answer's tokens and the
    ``<|eot_id|>`` that ends it; all three carry the same media.
    """

    chosen: EncodedSample
    rejected: EncodedSample
    edited: EncodedSample | None = None


def _media(messages: Sequence[Mapping[str, Any]], kind: str) -> list[Any]:
    out = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, list):
            out.extend(
                part.get(kind) for part in content if isinstance(part, Mapping) and part.get("type") == kind
            )
    return out


class Preprocessor:
    """Tokenizer + image/video/audio settings + mask policy + length limit.

    Args:
        tokenizer: any mm tokenizer; its ``image_id`` must be the model's ``<|image|>`` id.
        image_processor: tiling and normalisation of images and video frames (``None``: no vision).
        mask_mode: ``"all_previous"`` (a token sees every earlier image) or ``"most_recent"``.
        max_seq_len: longer samples are refused with :class:`SampleTooLong`.
        max_images: images allowed in one sample (videos and audio clips: the same limit).
        encoder_tiles: ``(max_tiles, aspect_ratios)`` of the image encoder when it differs from the
            processor's (a stage at lower resolution): batches are padded to the encoder's tile count
            and aspect-ratio ids renumbered into the encoder's list.
        video: frame sampling and caps for videos (``mm.datasets.VideoConfig``), or ``None``.
        audio: decoding and log-mel settings for audio (``mm.datasets.AudioConfig``), or ``None``.
        audio_tokens: how many placeholders an audio clip becomes (from the model's speech config).

    Attributes:
        video_features_fingerprint: what cached frame features read from shards must have been made
            with (the model's encoder digest and these frame settings; see
            :func:`mm.training.cache_features.features_fingerprint`). The trainer sets it from the model;
            while it is ``None``, features members in shards are refused. Not saved.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        image_processor: ImageProcessor | None = None,
        *,
        mask_mode: str = "all_previous",
        max_seq_len: int = 2048,
        max_images: int = 16,
        encoder_tiles: tuple[int, Sequence[Sequence[int]]] | None = None,
        video=None,
        audio=None,
        audio_tokens: AudioTokens | None = None,
    ) -> None:
        positive = as_int(minimum=1)
        self.mask_mode = as_choice(MASK_MODES)("mask_mode", mask_mode)
        self.max_seq_len = positive("max_seq_len", max_seq_len)
        self.max_images = positive("max_images", max_images)
        if (audio is None) != (audio_tokens is None):
            raise ConfigValueError("audio settings and audio_tokens go together")
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.encoder_tiles = None
        if encoder_tiles is not None:
            if isinstance(encoder_tiles, str | bytes | Mapping) or not (
                isinstance(encoder_tiles, Sequence) and len(encoder_tiles) == 2
            ):
                raise ConfigValueError(
                    f"must be [max_tiles, [[rows, cols], ...]], got {describe(encoder_tiles)}",
                    key="encoder_tiles",
                )
            self.encoder_tiles = (
                positive("encoder_tiles[0]", encoder_tiles[0]),
                nested(as_int_tuple(positive, size=2))("encoder_tiles[1]", encoder_tiles[1]),
            )
        self.video = video
        self.audio = audio
        self.audio_tokens = audio_tokens
        self.video_features_fingerprint: dict[str, Any] | None = None
        self.skipped: Counter[str] = Counter()

    # ------------------------------------------------------------------ settings
    def settings(self) -> dict[str, Any]:
        return {
            "image": None if self.image_processor is None else self.image_processor.to_dict(),
            "mask_mode": self.mask_mode,
            "max_seq_len": self.max_seq_len,
            "max_images": self.max_images,
            "encoder_tiles": None
            if self.encoder_tiles is None
            else [self.encoder_tiles[0], [list(r) for r in self.encoder_tiles[1]]],
            "video": None if self.video is None else _plain(dataclasses.asdict(self.video)),
            "audio": None if self.audio is None else dataclasses.asdict(self.audio),
            "audio_tokens": None if self.audio_tokens is None else dataclasses.asdict(self.audio_tokens),
        }

    def with_settings(self, **changes: Any) -> Preprocessor:
        """A copy with other settings (a stage's resolution, frames or length), sharing the tokenizer."""
        return Preprocessor._from_settings(self.tokenizer, {**self.settings(), **changes})

    def save(self, directory: str | os.PathLike) -> dict[str, Any]:
        """Write the tokenizer's files into ``directory``; return the settings for ``config.json``."""
        self.tokenizer.save(directory)
        return self.settings()

    @classmethod
    def load(cls, directory: str | os.PathLike, settings: Mapping[str, Any]) -> Preprocessor:
        """The preprocessor saved by :meth:`save` (strict: unknown settings are errors).

        Raises:
            ConfigValueError: a malformed setting, named by its key (``preprocessing.max_images
                must be a positive int, got 0``).
            OSError, ValueError: the tokenizer file is missing or unreadable (the file is named).
        """
        return cls._from_settings(load_tokenizer(Path(directory)), settings)

    @staticmethod
    def _check_settings(settings: Any) -> Mapping[str, Any]:
        if not isinstance(settings, Mapping):
            raise ConfigValueError(f"must be a mapping, got {describe(settings)}", key="preprocessing")
        known = {
            "image",
            "mask_mode",
            "max_seq_len",
            "max_images",
            "encoder_tiles",
            "video",
            "audio",
            "audio_tokens",
        }
        unknown = sorted(set(settings) - known)
        if unknown:
            raise ConfigValueError(f"unknown preprocessing settings {unknown}", where=("preprocessing",))
        return settings

    @classmethod
    def _from_settings(cls, tokenizer: Tokenizer, settings: Mapping[str, Any]) -> Preprocessor:
        """Errors are :class:`ConfigValueError` naming the key under ``preprocessing``."""
        settings = cls._check_settings(settings)
        try:
            return cls._build(tokenizer, settings)
        except ConfigValueError as e:
            raise e.within("preprocessing") from None

    @classmethod
    def _build(cls, tokenizer: Tokenizer, settings: Mapping[str, Any]) -> Preprocessor:
        def video(data: Mapping[str, Any]):
            from mm.datasets.video import VideoConfig

            data = check_fields(VideoConfig, data, "video settings", error=ConfigValueError)
            return VideoConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})

        def audio(data: Mapping[str, Any]):
            from mm.datasets.audio import AudioConfig

            return AudioConfig(**check_fields(AudioConfig, data, "audio settings", error=ConfigValueError))

        def audio_tokens(data: Mapping[str, Any]):
            return AudioTokens(
                **check_fields(AudioTokens, data, "audio_tokens settings", error=ConfigValueError)
            )

        return cls(
            tokenizer,
            _setting(settings, "image", ImageProcessor.from_dict),
            mask_mode=settings.get("mask_mode", "all_previous"),
            max_seq_len=settings.get("max_seq_len", 2048),
            max_images=settings.get("max_images", 16),
            encoder_tiles=settings.get("encoder_tiles"),
            video=_setting(settings, "video", video),
            audio=_setting(settings, "audio", audio),
            audio_tokens=_setting(settings, "audio_tokens", audio_tokens),
        )

    # ------------------------------------------------------------------ one sample
    def encode(
        self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = False
    ) -> EncodedSample:
        """Tokenise a conversation; media are decoded here so a bad one fails this sample only.

        Raises:
            SampleTooLong: more than ``max_seq_len`` tokens.
            ValueError: malformed messages, too many or unsupported media, undecodable media.
        """
        chat = format_chat(self.tokenizer, messages, add_generation_prompt=add_generation_prompt)
        counts = Counter(chat.media)
        for kind, n in counts.items():
            if n > self.max_images:
                raise ValueError(f"{n} {kind} parts in one sample; the limit is {self.max_images}")
        if counts["image"] and self.image_processor is None:
            raise ValueError("this model takes no images")
        if counts["video"] and (self.video is None or self.image_processor is None):
            raise ValueError("this model takes no video")
        if counts["audio"] and self.audio is None:
            raise ValueError("this model takes no audio")
        if len(chat.ids) > self.max_seq_len:  # before decoding anything: placeholders only grow it
            raise SampleTooLong(f"{len(chat.ids)} tokens > max_seq_len {self.max_seq_len}")
        images = [
            load_image(im, max_pixels=self.image_processor.max_image_pixels)
            for im in _media(messages, "image")
        ]
        videos = [self._frames(v) for v in _media(messages, "video")]
        audios = [self._features(a) for a in _media(messages, "audio")]
        ids, labels = chat.ids, labels_from(chat)
        if audios:
            ids, labels = self._expand_audio(
                ids, labels, [self.audio_tokens.count(f.shape[0]) for f in audios]
            )
        if len(ids) > self.max_seq_len:
            raise SampleTooLong(f"{len(ids)} tokens > max_seq_len {self.max_seq_len}")
        return EncodedSample(ids=ids, labels=labels, images=images, videos=videos, audios=audios)

    def _frames(self, video: Any) -> list[Any] | torch.Tensor:
        from mm.datasets.video import load_video

        if torch.is_tensor(video):  # cached frame tokens [f, t, p, d]
            if video.ndim != 4 or not video.is_floating_point():
                raise ValueError(
                    f"a video given as a tensor holds frame tokens [f, t, p, d], got {video.dtype} "
                    f"{tuple(video.shape)}"
                )
            if video.shape[0] != self.video.num_frames:
                raise ValueError(
                    f"cached video features hold {video.shape[0]} frames; this preprocessor samples "
                    f"{self.video.num_frames}"
                )
            return video
        if isinstance(video, list | tuple):  # frames given directly
            if len(video) != self.video.num_frames:
                raise ValueError(
                    f"a video given as frames needs {self.video.num_frames} of them, got {len(video)}"
                )
            return [load_image(f, max_pixels=self.image_processor.max_image_pixels) for f in video]
        return load_video(video, config=self.video).frames

    def _features(self, audio: Any) -> torch.Tensor:
        from mm.datasets.audio import load_audio, log_mel

        wave = audio if torch.is_tensor(audio) else load_audio(audio, config=self.audio)
        return log_mel(wave.float(), self.audio)  # [F, 80]

    def _expand_audio(
        self, ids: list[int], labels: list[int], lengths: list[int]
    ) -> tuple[list[int], list[int]]:
        """Repeat the k-th ``<|audio|>`` placeholder ``lengths[k]`` times (labels -100 there)."""
        audio_id = self.tokenizer.audio_id
        out_ids, out_labels, k = [], [], 0
        for i, (tok, lab) in enumerate(zip(ids, labels)):
            if tok == audio_id:
                if i and ids[i - 1] == audio_id:
                    raise ValueError("two audio parts touch: put some text between them")
                out_ids += [audio_id] * lengths[k]
                out_labels += [IGNORE_INDEX] * lengths[k]
                k += 1
            else:
                out_ids.append(tok)
                out_labels.append(lab)
        return out_ids, out_labels

    def encode_preference(
        self, messages: Sequence[Mapping[str, Any]], answers: Mapping[str, str]
    ) -> EncodedPreference:
        """Tokenise a preference sample: the prompt ``messages`` (ending with a user turn) followed
        by each answer of ``answers`` (``chosen``, ``rejected``, optional ``edited``).

        The prompt is encoded once per answer; media are decoded once and shared.

        Raises:
            SampleTooLong: the prompt with some answer has more than ``max_seq_len`` tokens.
            ValueError: malformed messages or answers, or media as in :meth:`encode`.
        """
        if not messages or messages[-1].get("role") != "user":
            raise ValueError("the prompt of a preference sample must end with a user turn")
        missing = [n for n in ("chosen", "rejected") if not isinstance(answers.get(n), str)]
        if missing:
            raise ValueError(f"a preference sample needs the answers {missing}")
        encoded: dict[str, EncodedSample] = {}
        first: EncodedSample | None = None
        for name in ("chosen", "rejected", "edited"):
            if answers.get(name) is None:
                continue
            conversation = [*messages, {"role": "assistant", "content": answers[name]}]
            if first is None:
                first = encoded[name] = self.encode(conversation)
                continue
            # The same prompt: tokens only (media placeholders are in the ids), media shared.
            chat = format_chat(self.tokenizer, conversation, add_generation_prompt=False)
            ids, labels = chat.ids, labels_from(chat)
            if first.audios:
                ids, labels = self._expand_audio(
                    ids, labels, [self.audio_tokens.count(f.shape[0]) for f in first.audios]
                )
            if len(ids) > self.max_seq_len:
                raise SampleTooLong(f"{len(ids)} tokens > max_seq_len {self.max_seq_len}")
            encoded[name] = EncodedSample(
                ids=ids, labels=labels, images=first.images, videos=first.videos, audios=first.audios
            )
        for sample in encoded.values():  # earlier assistant turns of the prompt are context only
            sample.labels = _last_run_only(sample.labels)
        return EncodedPreference(**encoded)

    def encode_or_skip(self, messages: Sequence[Mapping[str, Any]]) -> EncodedSample | None:
        """:meth:`encode` for training streams: a too-long sample is counted in ``skipped`` and dropped."""
        try:
            return self.encode(messages)
        except SampleTooLong:
            self.skipped["too long"] += 1
            return None

    # ------------------------------------------------------------------ batches
    def collate(self, samples: Sequence[EncodedSample], *, padding_side: str = "right") -> dict[str, Any]:
        """Pad a batch: ``input_ids``, ``attention_mask``, ``labels`` ``[b, s]``; when any sample has
        images ``pixel_values [b, n, t, 3, H, W]``, ``aspect_ratio_ids``, ``aspect_ratio_mask`` and
        ``cross_attention_mask [b, s, n, t]``; videos as ``video`` (:class:`VideoInputs`: pixels
        ``[b, v, f, t, 3, H, W]`` or cached frame tokens, and the ``[b, s, v]`` mask); audio as
        ``audio`` (:class:`AudioInputs`: features ``[a, F, 80]`` and lengths ``[a]`` in reading
        order). Any number of media per sample, including none."""
        if not samples:
            raise ValueError("cannot collate an empty batch")
        width = max(len(s.ids) for s in samples)
        pad = self.tokenizer.pad_id
        ids = torch.full((len(samples), width), pad, dtype=torch.long)
        labels = torch.full((len(samples), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros(len(samples), width, dtype=torch.long)
        for i, s in enumerate(samples):
            sl = slice(0, len(s.ids)) if padding_side == "right" else slice(width - len(s.ids), width)
            ids[i, sl] = torch.tensor(s.ids)
            labels[i, sl] = torch.tensor(s.labels)
            mask[i, sl] = 1
        batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
        token_ids = [s.ids for s in samples]
        if any(s.images for s in samples):
            proc = self.image_processor([s.images for s in samples])
            pixels, ratio_ids, ratio_mask = proc.pixel_values, proc.aspect_ratio_ids, proc.aspect_ratio_mask
            tiles = self.image_processor.max_tiles
            if self.encoder_tiles is not None:
                tiles, ratio_ids, pixels, ratio_mask = self._to_encoder_tiles(ratio_ids, pixels, ratio_mask)
            batch.update(
                pixel_values=pixels,
                aspect_ratio_ids=ratio_ids,
                aspect_ratio_mask=ratio_mask,
                cross_attention_mask=batch_cross_attention_mask(
                    token_ids,
                    proc.num_tiles,
                    media_token_id=self.tokenizer.image_id,
                    max_tiles=tiles,
                    length=width,
                    padding_side=padding_side,
                    mode=self.mask_mode,
                ),
            )
        if any(s.videos for s in samples):
            batch["video"] = self._collate_videos(samples, token_ids, width, padding_side)
        audios = [a for s in samples for a in s.audios]
        if audios:
            from mm.datasets.audio import pad_features

            batch["audio"] = AudioInputs(*pad_features(audios))
        return batch

    def video_pixel_values(self, videos: Sequence[Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Decode and sample videos, and prepare their frames exactly as training batches carry them.

        Args:
            videos: per video, a path, the file's bytes, or a list of frames.

        Returns:
            ``pixel_values [N, f, t, 3, H, W]``, ``aspect_ratio_ids [N]``, ``aspect_ratio_mask [N, t]``
            (tiles padded and ids renumbered to the encoder's when ``encoder_tiles`` is set).

        Raises:
            VideoError: a video cannot be decoded or breaks a limit of the video settings.
        """
        if self.video is None or self.image_processor is None:
            raise ValueError("this model takes no video")
        frames = [self._frames(video) for video in videos]
        if any(torch.is_tensor(f) for f in frames):
            raise ValueError("videos given as cached features have no pixels")
        return self._video_pixels(frames)

    def _video_pixels(self, frames: Sequence[list[Any]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``[N, f, t, 3, H, W]`` pixels, ``[N]`` ratio ids and ``[N, t]`` tile masks of decoded frames."""
        proc = self.image_processor(list(frames))  # every video a "sample" whose images are its frames
        pixels = proc.pixel_values  # [N, f, t, 3, H, W]
        ratio_ids, ratio_mask = proc.aspect_ratio_ids[:, 0], proc.aspect_ratio_mask[:, 0]  # [N], [N, t]
        if self.encoder_tiles is not None:
            _, ratio_ids, pixels, ratio_mask = self._to_encoder_tiles(ratio_ids, pixels, ratio_mask)
        return pixels, ratio_ids, ratio_mask

    def _collate_videos(self, samples, token_ids, width, padding_side) -> VideoInputs:
        b, v = len(samples), max(len(s.videos) for s in samples)
        videos = [video for s in samples for video in s.videos]
        cached = [torch.is_tensor(video) for video in videos]
        xmask = batch_cross_attention_mask(
            token_ids,
            [[1] * len(s.videos) for s in samples],
            media_token_id=self.tokenizer.video_id,
            max_tiles=1,
            length=width,
            padding_side=padding_side,
            mode=self.mask_mode,
        )[..., 0]  # [b, s, v]
        if all(cached):
            shapes = {tuple(video.shape) for video in videos}
            if len(shapes) > 1:
                raise ValueError(f"cached video features of one batch differ in shape: {sorted(shapes)}")
            features = videos[0].new_zeros(b, v, *videos[0].shape)  # [b, v, f, t, p, d]
            k = 0
            for i, s in enumerate(samples):
                for j in range(len(s.videos)):
                    features[i, j] = videos[k]
                    k += 1
            return VideoInputs(cross_attention_mask=xmask, features=features)
        if any(cached):
            raise ValueError(
                "a batch mixes videos given as cached features with videos given as pixels; "
                "keep cached and raw video shards in separate data sources"
            )
        flat, flat_ids, flat_mask = self._video_pixels(videos)  # [N, f, t, 3, H, W]
        pixels = flat.new_zeros(b, v, *flat.shape[1:])  # [b, v, f, t, 3, H, W]
        ratio_ids = torch.zeros(b, v, dtype=torch.long)
        ratio_mask = torch.zeros(b, v, flat_mask.shape[-1], dtype=torch.long)
        k = 0
        for i, s in enumerate(samples):
            for j in range(len(s.videos)):
                pixels[i, j], ratio_ids[i, j], ratio_mask[i, j] = flat[k], flat_ids[k], flat_mask[k]
                k += 1
        return VideoInputs(
            cross_attention_mask=xmask,
            pixel_values=pixels,
            aspect_ratio_ids=ratio_ids,
            aspect_ratio_mask=ratio_mask,
        )

    def _to_encoder_tiles(self, ratio_ids, pixels, ratio_mask):
        """Pad ``[b, n, t, ...]`` to the encoder's tiles and renumber aspect-ratio ids into its list."""
        max_tiles, ratios = self.encoder_tiles
        own = self.image_processor.supported_aspect_ratios
        lookup = torch.zeros(len(own) + 1, dtype=torch.long)
        for i, r in enumerate(own):
            if tuple(r) not in ratios:
                raise ValueError(f"tile grid {tuple(r)} is not supported by the image encoder ({ratios})")
            lookup[i + 1] = ratios.index(tuple(r)) + 1
        extra = max_tiles - pixels.shape[2]
        if extra < 0:
            raise ValueError(
                f"{pixels.shape[2]} tiles per image; the image encoder takes at most {max_tiles}"
            )
        if extra:
            pixels = torch.nn.functional.pad(pixels, (0, 0, 0, 0, 0, 0, 0, extra))
            ratio_mask = torch.nn.functional.pad(ratio_mask, (0, extra))
        return max_tiles, lookup[ratio_ids], pixels, ratio_mask

    def prompts(self, conversations: Sequence[Sequence[Mapping[str, Any]]]) -> dict[str, torch.Tensor]:
        """Left-padded generation inputs for conversations that end with a user turn."""
        samples = [self.encode(c, add_generation_prompt=True) for c in conversations]
        batch = self.collate(samples, padding_side="left")
        batch.pop("labels")
        return batch


def _last_run_only(labels: list[int]) -> list[int]:
    """``labels`` with only their last run of labelled positions kept (the final answer), -100 before."""
    end = len(labels)
    while end and labels[end - 1] == IGNORE_INDEX:
        end -= 1
    start = end
    while start and labels[start - 1] != IGNORE_INDEX:
        start -= 1
    return [IGNORE_INDEX] * start + labels[start:]


def _setting(settings: Mapping[str, Any], key: str, build) -> Any:
    """``build(settings[key])`` for a mapping, ``None`` for null or absent; errors name ``key``."""
    value = settings.get(key)
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise ConfigValueError(f"must be a mapping or null, got {describe(value)}", key=key)
    try:
        return build(value)
    except ConfigValueError as e:
        raise e.within(key) from None
    except (TypeError, ValueError) as e:
        raise ConfigValueError(str(e), where=(key,)) from None


def _plain(d: dict[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def stage_preprocessor(
    model,
    *,
    max_seq_len: int,
    image: Any = None,
    num_frames: int | None = None,
    stage_name: str = "",
) -> Preprocessor:
    """The preprocessor a training stage decodes and tokenises its samples with.

    The model's saved settings, with the stage's tile settings (``image``: ``tile_size`` and
    ``max_tiles``) and frames per clip when given, tiles padded to the image encoder's when their
    counts differ, and audio features for a model with a speech encoder. ``mm data cache-features``
    builds its clips' preprocessor here too, so cached features match what the stage would decode.

    Args:
        model: a :class:`~mm.model.MultimodalModel` (its ``preprocessor``, ``image_encoder`` and
            ``config`` are read).

    Raises:
        ValueError: the model has no preprocessor, or the stage's tiles do not fit its encoder.
    """
    pre = model.preprocessor
    if pre is None:
        raise ValueError("the model has no preprocessor (tokenizer and preprocessing settings)")
    processor = pre.image_processor
    if image is not None:
        enc_size = getattr(model.image_encoder, "image_size", image.tile_size)
        if image.tile_size != enc_size:
            raise ValueError(
                f"stage {stage_name!r} asks for {image.tile_size} px tiles; the image encoder takes {enc_size}"
            )
        base = processor.to_dict() if processor is not None else {}
        processor = ImageProcessor.from_dict(
            {**base, "tile_size": image.tile_size, "max_tiles": image.max_tiles}
        )
    enc = model.config.image_encoder  # a Llama 3 encoder's config, or an open_clip/timm spec (a dict)
    tiles = None
    max_num_tiles = getattr(enc, "max_num_tiles", None)
    if max_num_tiles is not None and processor is not None and processor.max_tiles != max_num_tiles:
        tiles = (max_num_tiles, enc.supported_aspect_ratios)
    video = pre.video
    if num_frames is not None:
        from mm.datasets.video import VideoConfig

        video = dataclasses.replace(pre.video or VideoConfig(), num_frames=num_frames)
    audio, audio_tokens = pre.audio, pre.audio_tokens
    speech = model.config.speech
    if speech is not None and audio is None:
        from mm.datasets.audio import AudioConfig

        audio = AudioConfig(n_mels=speech.encoder.input_dim)
        audio_tokens = AudioTokens(
            stack=speech.encoder.stack,
            conv_kernel=speech.adapter.conv_kernel,
            conv_stride=speech.adapter.conv_stride,
        )
    return Preprocessor(
        pre.tokenizer,
        processor,
        mask_mode=pre.mask_mode,
        max_seq_len=max_seq_len,
        max_images=pre.max_images,
        encoder_tiles=tiles,
        video=video,
        audio=audio,
        audio_tokens=audio_tokens,
    )
