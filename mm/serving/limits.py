"""The published limits of ``mm serve``: what a request may hold, how many requests may be in flight.

Kept free of heavy imports: ``mm serve --help`` prints these defaults without loading torch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

__all__ = ["ServerLimits"]

_MiB = 1024 * 1024


@dataclass(frozen=True, kw_only=True)
class ServerLimits:
    """The published limits of ``mm serve`` (each has a ``--flag`` of the same name).

    Args:
        max_image_pixels: pixels (width x height) per image, read from the header before decoding.
        max_images: images per request (the whole conversation); never above the model's own.
        max_videos: videos per request (each is decoded, sampled and encoded frame by frame).
        max_audios: audio clips per request (``input_audio`` parts; each as long as the model's
            audio settings allow, ``max_audio_seconds`` in ``/health``).
        max_request_bytes: bytes of one request body.
        max_media_bytes: bytes of one encoded image, video or audio clip (a data URI's or
            ``input_audio``'s payload, or a download).
        max_tokens: new tokens per request (also the default when a request names none).
        max_concurrent_requests: requests in flight (being prepared, waiting or decoding).
        max_batch_size: requests decoded together in one batch.
        media_timeout_s: per socket operation and per download of an image URL.
        request_timeout_s: time a client has to send a request's headers and body, from the
            connection (or the end of its previous request); past it the server answers 408 and
            closes the connection, so slow senders cannot hold connections.
        max_join_wait_s: how long a request that is ready to decode may be held back while others
            that arrived beside it are still being read or prepared, so that they are prefilled
            together (one prefill instead of several, each costing a pass of the whole model); 0
            never holds one. A request with nobody arriving or being prepared beside it is never
            held back.
    """

    max_image_pixels: int = 16_777_216
    max_images: int = 8
    max_videos: int = 1
    max_audios: int = 1
    max_request_bytes: int = 20 * _MiB
    max_media_bytes: int = 10 * _MiB
    max_tokens: int = 1024
    max_concurrent_requests: int = 16
    max_batch_size: int = 8
    media_timeout_s: float = 10.0
    request_timeout_s: float = 30.0
    max_join_wait_s: float = 0.01

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{name} must be a number, got {value!r}")
            if name == "max_join_wait_s":
                if not 0 <= value <= 1:
                    raise ValueError(f"{name} must be between 0 and 1 second, got {value!r}")
            elif not value > 0:
                raise ValueError(f"{name} must be a positive number, got {value!r}")
