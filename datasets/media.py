"""Media in chat requests: one place that turns every accepted form of a media part into mm's form.

Llama 3 chat messages reach the model with media parts that carry the decoded media themselves
(``{"type": "image", "image": <PIL image>}``; see :mod:`mm.datasets.preprocessing`). Callers write them in
several ways, and this module normalises all of them, applying one :class:`MediaPolicy`:

* mm's own part ``{"type": "image", "image": PIL | path | bytes}`` (the Python API; a path is read
  only when ``allow_paths``, which the server turns off);
* OpenAI's part ``{"type": "image_url", "image_url": {"url": ...}}`` with

  - ``data:`` URIs (base64): always accepted;
  - ``http(s)`` URLs: only when the host is named exactly in ``allowed_domains``. The name is
    resolved once, **every** address it resolves to must be public (no private, loopback,
    link-local, multicast, reserved or otherwise non-global address, IPv4-mapped IPv6 included),
    and the connection goes to that checked address (the ``Host`` header and TLS server name stay
    the host's), so a DNS answer that changes between check and use (rebinding) cannot redirect
    it. Redirects are followed only to the same host, each hop checked again; the body is read in
    chunks and abandoned at ``max_bytes``; every socket operation has ``timeout_s`` and the whole
    download a deadline of the same length per hop. Residual risk: name resolution itself uses
    the system resolver, which has no timeout of its own.
  - ``file:`` and every other scheme: never.

Images are decoded here with :func:`mm.datasets.images.load_image` (pixel limit checked from the
header before decoding), so a bad image fails its own request with a message naming the part.
Bytes from a request (data URIs, downloads) must be one of :data:`REQUEST_IMAGE_FORMATS`, so PIL
never hands them to a plugin that runs an external program (EPS and Ghostscript).

Videos come the same ways: mm's part ``{"type": "video", "video": path | bytes | frames | tensor}``
and ``{"type": "video_url", "video_url": {"url": ...}}`` (same URL rules and ``max_bytes`` as
images; the data URI's media type, when given, must be ``video/*``). When the policy names
``video`` settings (:func:`mm.model.chat.encode_conversation` fills in the model's), clips are decoded
here with :func:`mm.datasets.video.load_video` under its caps (duration, frame size, bytes,
container allow-list), so a bad clip fails its own request with a message naming the part; frames
and cached frame tokens given directly pass through to the preprocessor, which checks them.

Speech comes as mm's part ``{"type": "audio", "audio": path | bytes | waveform}`` or OpenAI's
``{"type": "input_audio", "input_audio": {"data": <base64>, "format": "wav" | "mp3"}}`` (the
base64 is held to the same ``max_bytes`` as images; data URIs are accepted in mm's part too).
When the policy names ``audio`` settings (:func:`mm.model.chat.encode_conversation` fills in the
model's), audio is decoded here with :func:`mm.datasets.audio.load_audio` under its caps
(duration, bytes), so a bad clip fails its own request with a message naming the part; waveforms
given directly pass through.

Other media plug in through :data:`PART_TYPES`: a handler per part type, each returning parts in
mm's form.
"""

from __future__ import annotations

import base64
import binascii
import http.client
import io
import ipaddress
import re
import socket
import ssl
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urljoin, urlsplit

from PIL import Image

from mm.datasets.images import ImageError, load_image

__all__ = [
    "PART_TYPES",
    "REQUEST_IMAGE_FORMATS",
    "MediaError",
    "MediaPolicy",
    "blocked_address_reason",
    "decode_data_uri",
    "fetch_url",
    "normalize_messages",
    "system_resolver",
]

DEFAULT_MAX_MEDIA_BYTES = 10 * 1024 * 1024
"""Largest encoded media file (a download, or a data URI's decoded bytes): 10 MiB."""

REQUEST_IMAGE_FORMATS = ("PNG", "JPEG", "GIF", "WEBP", "BMP", "TIFF")
"""Image formats accepted from data URIs and URLs (PIL format names)."""

_REDIRECTS = (301, 302, 303, 307, 308)
_MAX_REDIRECTS = 3
_CHUNK = 64 * 1024
_DATA_URI = re.compile(
    r"data:(?P<type>[^,;]*)(?P<params>(?:;[^,;]*)*),(?P<data>.*)", re.DOTALL | re.IGNORECASE
)


class MediaError(ValueError):
    """A media part that cannot be used: malformed, refused by the policy, undecodable or too large.

    Attributes:
        param: where in the request (``"messages[0].content[1]"``), when known.
        code: a short machine-readable reason (``"media_host_not_allowed"``, ``"too_many_images"``...).
    """

    def __init__(self, message: str, *, param: str | None = None, code: str = "invalid_media") -> None:
        super().__init__(message)
        self.param = param
        self.code = code


def system_resolver(host: str, port: int) -> list[str]:
    """Every IP address ``host`` resolves to, through the system resolver (TCP addresses)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(info[4][0] for info in infos))


def blocked_address_reason(address: str) -> str | None:
    """Why ``address`` may not be fetched from (``"a loopback address"``...), or ``None`` if it is public."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])  # drop an IPv6 zone id
    except ValueError:
        return "not an IP address"
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    for test, reason in (
        (ip.is_unspecified, "an unspecified address"),
        (ip.is_loopback, "a loopback address"),
        (ip.is_link_local, "a link-local address"),
        (ip.is_multicast, "a multicast address"),
        (ip.is_private, "a private address"),
        (ip.is_reserved, "a reserved address"),
        (not ip.is_global, "not a public address"),
    ):
        if test:
            return reason
    return None


@dataclass(frozen=True, kw_only=True)
class MediaPolicy:
    """What media a request may bring and how far the server goes to get it.

    Args:
        allowed_domains: hosts whose ``http(s)`` URLs may be fetched, compared exactly (case and a
            trailing dot ignored); empty: no URL is ever fetched.
        max_bytes: largest encoded media file, downloaded or in a data URI.
        timeout_s: per socket operation, and the deadline of each download.
        max_image_pixels: images with more pixels (width x height, read from the header) are refused.
        max_images: images allowed in one conversation.
        video: decoding settings and caps of videos (``mm.datasets.VideoConfig``: frames sampled,
            longest duration, largest frame, bytes); ``None`` passes videos on undecoded.
        max_videos: videos allowed in one conversation.
        audio: decoding settings and caps of speech (``mm.datasets.AudioConfig``: sample rate,
            longest duration, bytes); ``None`` passes audio on undecoded.
        max_audios: audio clips allowed in one conversation.
        allow_paths: image parts may name local files (the Python API); the server turns this off.
        resolver: ``(host, port) -> [ip, ...]``; the system resolver unless a test injects one.
        address_check: ``ip -> reason or None``; :func:`blocked_address_reason` unless a test
            injects one to reach a server on 127.0.0.1.
    """

    allowed_domains: frozenset[str] = frozenset()
    max_bytes: int = DEFAULT_MAX_MEDIA_BYTES
    timeout_s: float = 10.0
    max_image_pixels: int | None = None
    max_images: int | None = None
    video: Any = None
    max_videos: int | None = None
    audio: Any = None
    max_audios: int | None = None
    allow_paths: bool = True
    resolver: Callable[[str, int], list[str]] = field(default=system_resolver, compare=False, repr=False)
    address_check: Callable[[str], str | None] = field(
        default=blocked_address_reason, compare=False, repr=False
    )

    def __post_init__(self) -> None:
        domains = frozenset(_canonical_host(d) for d in self.allowed_domains)
        if "" in domains:
            raise ValueError("allowed_domains holds an empty host name")
        object.__setattr__(self, "allowed_domains", domains)
        for name in ("max_bytes", "max_image_pixels", "max_images", "max_videos", "max_audios"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not self.timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {self.timeout_s!r}")


def _canonical_host(host: str) -> str:
    return host.strip().lower().rstrip(".")


# ---------------------------------------------------------------------------------------- data URIs
def decode_data_uri(uri: str, *, max_bytes: int = DEFAULT_MAX_MEDIA_BYTES, kind: str = "image") -> bytes:
    """The bytes of a base64 ``data:`` URI whose media type is ``{kind}/*`` (or not given).

    Raises:
        MediaError: not a base64 data URI, another media type, invalid base64, or over ``max_bytes``.
    """
    m = _DATA_URI.fullmatch(uri)
    if m is None:
        raise MediaError("malformed data URI: expected 'data:<type>;base64,<data>'", code="invalid_data_uri")
    mime = m["type"].strip().lower()
    if mime and not mime.startswith(f"{kind}/"):
        raise MediaError(f"data URI has media type {mime!r}; expected {kind}/*", code="invalid_data_uri")
    if "base64" not in {p.strip().lower() for p in m["params"].split(";")}:
        raise MediaError("data URI is not base64-encoded (add ';base64')", code="invalid_data_uri")
    data = m["data"]
    if len(data) * 3 // 4 > max_bytes + 3:  # decoded size, estimated before decoding anything
        raise MediaError(
            f"data URI holds about {len(data) * 3 // 4} bytes, more than the media size limit of "
            f"{max_bytes} bytes (max_media_bytes)",
            code="media_too_large",
        )
    data = re.sub(r"\s+", "", data).replace("-", "+").replace("_", "/")
    data += "=" * (-len(data) % 4)
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as e:
        raise MediaError(f"data URI holds invalid base64: {e}", code="invalid_data_uri") from None
    if len(raw) > max_bytes:
        raise MediaError(
            f"data URI holds {len(raw)} bytes, more than the media size limit of {max_bytes} bytes "
            "(max_media_bytes)",
            code="media_too_large",
        )
    return raw


# ---------------------------------------------------------------------------------------- URLs
class _PinnedHTTPConnection(http.client.HTTPConnection):
    """HTTP to a checked address, with the host name in the ``Host`` header."""

    def __init__(self, host: str, address: str, port: int, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self._address = address

    def connect(self) -> None:
        self.sock = socket.create_connection((self._address, self.port), self.timeout)


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    """HTTPS to a checked address; the certificate is verified against the host name (SNI too)."""

    def __init__(self, host: str, address: str, port: int, timeout: float) -> None:
        self._tls = ssl.create_default_context()
        super().__init__(host, port, timeout=timeout, context=self._tls)
        self._address = address

    def connect(self) -> None:
        sock = socket.create_connection((self._address, self.port), self.timeout)
        self.sock = self._tls.wrap_socket(sock, server_hostname=self.host)


def _checked_target(url: str, policy: MediaPolicy) -> tuple[str, str, int, str]:
    """``(scheme, host, port, path)`` of an allowed URL, or :class:`MediaError`."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise MediaError(f"malformed URL: {e}", code="invalid_url") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise MediaError(
            f"URL scheme {scheme + ':' if scheme else '(none)'} is not allowed; send the image as a "
            "data: URI, or an http(s) URL whose host the server allows",
            code="media_scheme_not_allowed",
        )
    if parts.username is not None or parts.password is not None:
        raise MediaError("URLs with user names or passwords are not fetched", code="invalid_url")
    host = _canonical_host(parts.hostname or "")
    if not host:
        raise MediaError("URL has no host", code="invalid_url")
    if host not in policy.allowed_domains:
        raise MediaError(
            f"media host {host!r} is not allowed; the server fetches only from hosts named with "
            "--allow-media-domain (allowed_domains), or take the image as a data: URI",
            code="media_host_not_allowed",
        )
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return scheme, host, port or (443 if scheme == "https" else 80), path


def _checked_address(host: str, port: int, policy: MediaPolicy) -> str:
    """Resolve once; every address must pass ``policy.address_check``; return the one to connect to."""
    try:
        addresses = list(policy.resolver(host, port))
    except OSError as e:
        raise MediaError(f"cannot resolve media host {host!r}: {e}", code="media_fetch_failed") from None
    if not addresses:
        raise MediaError(f"media host {host!r} resolves to no address", code="media_fetch_failed")
    for address in addresses:
        reason = policy.address_check(address)
        if reason is not None:
            raise MediaError(
                f"media host {host!r} resolves to {address}, {reason}; private, loopback, link-local "
                "and reserved addresses are never fetched",
                code="media_address_not_allowed",
            )
    return addresses[0]


def fetch_url(url: str, policy: MediaPolicy) -> bytes:
    """Download an allowed ``http(s)`` URL under ``policy`` (see the module docstring for the rules).

    Raises:
        MediaError: a refused scheme, host or address, a redirect to another host, an HTTP status
            other than 200, a timeout, a connection failure, or a body over ``policy.max_bytes``.
    """
    scheme, host, port, path = _checked_target(url, policy)
    for _ in range(_MAX_REDIRECTS + 1):
        address = _checked_address(host, port, policy)
        status, location, body = _get(scheme, host, address, port, path, policy)
        if status not in _REDIRECTS:
            if status != 200:
                raise MediaError(f"media URL answered HTTP {status}", code="media_fetch_failed")
            return body
        if not location:
            raise MediaError(
                f"media URL answered HTTP {status} without a Location", code="media_fetch_failed"
            )
        target = urljoin(f"{scheme}://{host}:{port}{path}", location)
        new_host = _canonical_host(urlsplit(target).hostname or "")
        if new_host != host:
            raise MediaError(
                f"media URL redirects to another host ({new_host!r}); redirects are followed only "
                "within the same host",
                code="media_redirect_not_allowed",
            )
        scheme, host, port, path = _checked_target(target, policy)
    raise MediaError(f"media URL redirects more than {_MAX_REDIRECTS} times", code="media_fetch_failed")


def _get(
    scheme: str, host: str, address: str, port: int, path: str, policy: MediaPolicy
) -> tuple[int, str | None, bytes]:
    """One GET to ``address``: ``(status, Location, body)``; the body read only for status 200."""
    cls = _PinnedHTTPSConnection if scheme == "https" else _PinnedHTTPConnection
    conn = cls(host, address, port, policy.timeout_s)
    deadline = time.monotonic() + policy.timeout_s
    try:
        conn.request(
            "GET",
            path,
            headers={"User-Agent": "mm-media-fetch", "Accept": "*/*", "Accept-Encoding": "identity"},
        )
        response = conn.getresponse()
        if response.status != 200:
            return response.status, response.getheader("Location"), b""
        length = response.getheader("Content-Length")
        if length is not None and length.strip().isdigit() and int(length) > policy.max_bytes:
            raise MediaError(
                f"media URL announces {int(length)} bytes, more than the media size limit of "
                f"{policy.max_bytes} bytes (max_media_bytes)",
                code="media_too_large",
            )
        chunks, size = [], 0
        while True:
            chunk = response.read(_CHUNK)
            if not chunk:
                break
            size += len(chunk)
            if size > policy.max_bytes:
                raise MediaError(
                    f"media URL sent more than the media size limit of {policy.max_bytes} bytes "
                    "(max_media_bytes); download abandoned",
                    code="media_too_large",
                )
            if time.monotonic() > deadline:
                raise MediaError(
                    f"media download took longer than {policy.timeout_s} s", code="media_fetch_failed"
                )
            chunks.append(chunk)
        return 200, None, b"".join(chunks)
    except MediaError:
        raise
    except TimeoutError:
        raise MediaError(
            f"media URL timed out after {policy.timeout_s} s", code="media_fetch_failed"
        ) from None
    except (OSError, http.client.HTTPException, ssl.SSLError) as e:
        raise MediaError(
            f"cannot fetch media URL: {type(e).__name__}: {e}", code="media_fetch_failed"
        ) from None
    finally:
        conn.close()


# ---------------------------------------------------------------------------------------- parts
Part = Mapping[str, Any]
PartHandler = Callable[[Part, MediaPolicy, str], dict[str, Any]]


def _text_part(part: Part, policy: MediaPolicy, where: str) -> dict[str, Any]:
    text = part.get("text")
    if not isinstance(text, str):
        raise MediaError(f"{where}: a text part needs 'text' as a string", param=where, code="invalid_part")
    return {"type": "text", "text": text}


def _decode_image(source: Any, policy: MediaPolicy, where: str) -> Image.Image:
    kwargs = {} if policy.max_image_pixels is None else {"max_pixels": policy.max_image_pixels}
    try:
        return load_image(source, **kwargs)
    except ImageError as e:
        too_big = "max_pixels" in str(e)
        message = str(e).replace("(max_pixels)", "(max_image_pixels)")
        raise MediaError(
            f"{where}: {message}", param=where, code="image_too_large" if too_big else "invalid_image"
        ) from None
    except TypeError as e:
        raise MediaError(f"{where}: {e}", param=where, code="invalid_part") from None


def _check_format(data: bytes, where: str) -> None:
    """Refuse bytes from a request that are not one of :data:`REQUEST_IMAGE_FORMATS` (header only).

    PIL would otherwise try every plugin it has, including ones that hand data to external
    programs (EPS to Ghostscript); other failures are left to ``load_image`` to describe.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            Image.open(io.BytesIO(data), formats=REQUEST_IMAGE_FORMATS).close()
    except Image.UnidentifiedImageError:
        raise MediaError(
            f"{where}: not an image, or not in an accepted format ({', '.join(REQUEST_IMAGE_FORMATS)})",
            param=where,
            code="invalid_image",
        ) from None
    except Exception:
        pass


def _named_source(part: Part, kind: str, article: str, policy: MediaPolicy, where: str) -> tuple[Any, bool]:
    """What mm's ``image`` / ``video`` part holds, and whether it was fetched from a URL string.

    A path (or URL string) is accepted only where ``policy.allow_paths``; a ``data:`` / ``http(s):``
    / ``file:`` string is fetched under the policy.
    """
    source = part.get(kind)
    if source is None:
        raise MediaError(f"{where}: {article} {kind} part needs '{kind}'", param=where, code="invalid_part")
    if isinstance(source, str) or hasattr(source, "__fspath__"):
        if not policy.allow_paths:
            raise MediaError(
                f"{where}: {kind} parts that name files are not accepted here; send "
                f"{article} '{kind}_url' part with a data: URI",
                param=where,
                code="invalid_part",
            )
        if isinstance(source, str) and source.startswith(("data:", "http:", "https:", "file:")):
            return _url_bytes(source, policy, where, kind=kind), True
    return source, False


def _part_url(part: Part, key: str, article: str, where: str) -> str:
    """The URL of OpenAI's ``image_url`` / ``video_url`` part (``{key: {"url": ...}}`` or a string)."""
    spec = part.get(key)
    url = spec.get("url") if isinstance(spec, Mapping) else spec
    if not isinstance(url, str) or not url:
        raise MediaError(
            f"{where}: {article} {key} part needs '{key}': {{'url': '...'}}", param=where, code="invalid_part"
        )
    return url.strip()


def _image_part(part: Part, policy: MediaPolicy, where: str) -> dict[str, Any]:
    source, fetched = _named_source(part, "image", "an", policy, where)
    if fetched:
        _check_format(source, where)
    return {"type": "image", "image": _decode_image(source, policy, where)}


def _url_bytes(url: str, policy: MediaPolicy, where: str, kind: str = "image") -> bytes:
    try:
        if url[:5].lower() == "data:":
            return decode_data_uri(url, max_bytes=policy.max_bytes, kind=kind)
        return fetch_url(url, policy)
    except MediaError as e:
        raise MediaError(f"{where}: {e}", param=where, code=e.code) from None


def _image_url_part(part: Part, policy: MediaPolicy, where: str) -> dict[str, Any]:
    data = _url_bytes(_part_url(part, "image_url", "an", where), policy, where)
    _check_format(data, where)
    return {"type": "image", "image": _decode_image(data, policy, where)}


_VIDEO_CAPS = ("max_seconds", "max_pixels_per_frame", "max_bytes", "max_stream_frames")


def _decode_video(source: Any, policy: MediaPolicy, where: str) -> Any:
    """Frames of a clip under ``policy.video``; frames, frame tokens or no settings: unchanged."""
    if policy.video is None or isinstance(source, (list, tuple)) or hasattr(source, "is_floating_point"):
        return source
    from mm.datasets.video import VideoError, load_video

    try:
        return load_video(source, config=policy.video).frames
    except VideoError as e:
        message = str(e)
        too_big = any(f"{cap}=" in message for cap in _VIDEO_CAPS)  # the caps name themselves
        raise MediaError(
            f"{where}: {message}", param=where, code="video_too_large" if too_big else "invalid_video"
        ) from None
    except (TypeError, OSError) as e:
        raise MediaError(f"{where}: {e}", param=where, code="invalid_part") from None


def _video_part(part: Part, policy: MediaPolicy, where: str) -> dict[str, Any]:
    source, _ = _named_source(part, "video", "a", policy, where)
    return {"type": "video", "video": _decode_video(source, policy, where)}


def _video_url_part(part: Part, policy: MediaPolicy, where: str) -> dict[str, Any]:
    data = _url_bytes(_part_url(part, "video_url", "a", where), policy, where, kind="video")
    return {"type": "video", "video": _decode_video(data, policy, where)}


INPUT_AUDIO_FORMATS = ("wav", "mp3")
"""``input_audio`` formats accepted (OpenAI's)."""


def _decode_audio(source: Any, policy: MediaPolicy, where: str) -> Any:
    """A waveform under ``policy.audio``; a waveform or no settings: unchanged."""
    if policy.audio is None or hasattr(source, "is_floating_point"):
        return source
    from mm.datasets.audio import AudioError, load_audio

    try:
        return load_audio(source, config=policy.audio)
    except AudioError as e:
        message = str(e)
        too_big = "max_seconds" in message or "max_bytes" in message
        raise MediaError(
            f"{where}: {message}", param=where, code="audio_too_large" if too_big else "invalid_audio"
        ) from None
    except (TypeError, OSError) as e:
        raise MediaError(f"{where}: {e}", param=where, code="invalid_part") from None


def _audio_part(part: Part, policy: MediaPolicy, where: str) -> dict[str, Any]:
    source = part.get("audio")
    if source is None:
        raise MediaError(f"{where}: an audio part needs 'audio'", param=where, code="invalid_part")
    if isinstance(source, str) or hasattr(source, "__fspath__"):
        if isinstance(source, str) and source[:5].lower() == "data:":
            source = _url_bytes(source, policy, where, kind="audio")
        elif not policy.allow_paths:
            raise MediaError(
                f"{where}: audio parts that name files are not accepted here; send an 'input_audio' "
                "part with base64 data",
                param=where,
                code="invalid_part",
            )
    return {"type": "audio", "audio": _decode_audio(source, policy, where)}


def _input_audio_part(part: Part, policy: MediaPolicy, where: str) -> dict[str, Any]:
    spec = part.get("input_audio")
    data = spec.get("data") if isinstance(spec, Mapping) else None
    fmt = spec.get("format") if isinstance(spec, Mapping) else None
    if not isinstance(data, str) or not data:
        raise MediaError(
            f"{where}: an input_audio part needs 'input_audio': {{'data': '<base64>', 'format': 'wav'}}",
            param=where,
            code="invalid_part",
        )
    if fmt not in INPUT_AUDIO_FORMATS:
        raise MediaError(
            f"{where}: input_audio format {fmt!r} is not supported; expected one of {list(INPUT_AUDIO_FORMATS)}",
            param=where,
            code="invalid_part",
        )
    raw = _url_bytes(f"data:audio/{fmt};base64,{data}", policy, where, kind="audio")
    return {"type": "audio", "audio": _decode_audio(raw, policy, where)}


PART_TYPES: dict[str, PartHandler] = {
    "text": _text_part,
    "image": _image_part,
    "image_url": _image_url_part,
    "video": _video_part,
    "video_url": _video_url_part,
    "audio": _audio_part,
    "input_audio": _input_audio_part,
}
"""Part type -> handler returning the part in mm's form."""


def normalize_messages(
    messages: Sequence[Mapping[str, Any]], policy: MediaPolicy | None = None
) -> list[dict[str, Any]]:
    """Messages with every part in mm's form (text, and media decoded), checked against ``policy``.

    Content that is a string stays a string; the role is kept as given (the chat format checks it).

    Raises:
        MediaError: no messages, a malformed or empty message (no text but white space and no media),
            an unknown part type, a refused or undecodable medium, or more images than
            ``policy.max_images``.
    """
    policy = policy or MediaPolicy()
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise MediaError("messages must be a list of messages", param="messages", code="invalid_messages")
    if not messages:
        raise MediaError("the conversation has no messages", param="messages", code="invalid_messages")
    counted = _count_images(messages)
    if policy.max_images is not None and counted > policy.max_images:
        raise MediaError(
            f"the conversation has {counted} images, more than the limit of {policy.max_images} images "
            "per request (max_images)",
            param="messages",
            code="too_many_images",
        )
    videos = _count_parts(messages, ("video", "video_url"))
    if policy.max_videos is not None and videos > policy.max_videos:
        raise MediaError(
            f"the conversation has {videos} videos, more than the limit of {policy.max_videos} videos "
            "per request (max_videos)",
            param="messages",
            code="too_many_videos",
        )
    audios = _count_parts(messages, ("audio", "input_audio"))
    if policy.max_audios is not None and audios > policy.max_audios:
        raise MediaError(
            f"the conversation has {audios} audio clips, more than the limit of {policy.max_audios} "
            "audio clips per request (max_audios)",
            param="messages",
            code="too_many_audios",
        )
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise MediaError(
                f"messages[{i}] must be an object", param=f"messages[{i}]", code="invalid_messages"
            )
        content = message.get("content")
        if isinstance(content, (list, tuple)):
            parts = []
            for k, part in enumerate(content):
                where = f"messages[{i}].content[{k}]"
                if not isinstance(part, Mapping):
                    raise MediaError(f"{where} must be an object", param=where, code="invalid_part")
                handler = PART_TYPES.get(part.get("type"))
                if handler is None:
                    raise MediaError(
                        f"{where} has unknown part type {part.get('type')!r}; expected one of "
                        f"{sorted(PART_TYPES)}",
                        param=where,
                        code="unknown_part_type",
                    )
                parts.append(handler(part, policy, where))
            content = parts
        if _is_empty(content):
            where = f"messages[{i}]"
            raise MediaError(
                f"{where} ({message.get('role')}) is empty: it needs text or a media part",
                param=f"{where}.content",
                code="empty_message",
            )
        out.append({**message, "content": content})
    return out


def _is_empty(content: Any) -> bool:
    """No text but white space, and no media part (a malformed content is left to the chat format)."""
    if isinstance(content, str):
        return not content.strip()
    if isinstance(content, list):
        return all(
            isinstance(p, Mapping) and p.get("type") == "text" and not str(p.get("text") or "").strip()
            for p in content
        )
    return False


def _count_images(messages: Sequence[Any]) -> int:
    return _count_parts(messages, ("image", "image_url"))


def _count_parts(messages: Sequence[Any], types: tuple[str, ...]) -> int:
    return sum(
        1
        for message in messages
        if isinstance(message, Mapping) and isinstance(message.get("content"), (list, tuple))
        for part in message["content"]
        if isinstance(part, Mapping) and part.get("type") in types
    )
