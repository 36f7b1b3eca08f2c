"""``mm data pack`` on hostile input: it reads only inside its source, never blocks, leaves no partial
shard, and packs only what a reader can use (media that decode, bounded text, keys and JSON).

Each group reproduces the case a probe found and adds variants of the same class.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import unicodedata
import zlib
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile
from PIL import Image

from mm.datasets.shards import (
    MAX_JSON_DEPTH,
    MAX_TEXT_BYTES,
    PackError,
    media_kind,
    pack,
)
from mm.datasets.webdata import ShardStream

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- helpers


def _png(seed: int, side: int = 16) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _mp4(frames: int = 12) -> bytes:
    """A small h264 mp4 with its index first (``faststart``), so a cut-off copy still opens."""
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "clip.mp4")
        with av.open(path, "w", options={"movflags": "faststart"}) as container:
            stream = container.add_stream("h264", rate=10)
            stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
            for _ in range(frames):
                frame = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
            container.mux(stream.encode())
        with open(path, "rb") as file:
            return file.read()


def _wav(seconds: float = 0.2, rate: int = 16000) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    buf = io.BytesIO()
    soundfile.write(buf, 0.1 * np.sin(2 * np.pi * 440 * t), rate, format="WAV")
    return buf.getvalue()


def _folder(root: Path, n: int = 2, tag: str = "s") -> Path:
    """``n`` good caption pairs ``KEY.png`` + ``KEY.txt``."""
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (root / f"{tag}{i:03d}.png").write_bytes(_png(zlib.crc32(f"{tag}{i}".encode())))
        (root / f"{tag}{i:03d}.txt").write_text(f"caption {i}")
    return root


def _manifest(folder: Path, rows: list, name: str = "m.jsonl") -> Path:
    """A manifest in ``folder`` with a good first line (``media/good.png``), then ``rows``."""
    (folder / "media").mkdir(parents=True, exist_ok=True)
    (folder / "media" / "good.png").write_bytes(_png(1))
    lines = [json.dumps({"image": "media/good.png", "caption": "fine"})]
    lines += [r if isinstance(r, str) else json.dumps(r) for r in rows]
    path = folder / name
    path.write_text("\n".join(lines) + "\n")
    return path


def _keys(out: Path) -> list[str]:
    samples = ShardStream(out, rank=0, world_size=1, shuffle_shards=False)
    return sorted(s["__key__"] for s in samples)


def _leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if p.name.startswith(".mm-pack")) if out.exists() else []


def _pack_within(seconds: float, *args, **kwargs):
    """``pack(*args, **kwargs)``, failing (not hanging) when it does not return within ``seconds``.

    A pack that blocks on a FIFO is unblocked afterwards by opening every FIFO it could be
    waiting on for writing, so the test run itself goes on.
    """
    result: dict = {}

    def target() -> None:
        try:
            result["value"] = pack(*args, **kwargs)
        except BaseException as exc:  # handed to the test thread
            result["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        src = Path(args[0])
        for fifo in (src.parent if src.is_file() else src).rglob("*"):
            if stat.S_ISFIFO(os.lstat(fifo).st_mode):
                with contextlib.suppress(OSError):
                    os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail(f"pack did not return within {seconds} s (it blocked)")
    if "error" in result:
        raise result["error"]
    return result["value"]


def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mm.cli", "data", "pack", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


# --------------------------------------------------------------------------- 5. reads outside its source


def test_symlink_to_etc_passwd_is_refused(tmp_path):
    """The original case: ``000010.png -> /etc/passwd`` was packed (exit 0)."""
    src = _folder(tmp_path / "src")
    (src / "000010.png").symlink_to("/etc/passwd")
    (src / "000010.txt").write_text("a caption")
    with pytest.raises(PackError, match=r"000010\.png.*/etc/passwd.*outside the source"):
        pack(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()

    run = _cli(str(src), str(tmp_path / "out"))
    assert run.returncode == 2
    assert run.stderr.startswith("mm data pack: ") and "000010.png" in run.stderr
    assert "/etc/passwd" in run.stderr and "root:" not in run.stderr
    assert not (tmp_path / "out").exists()


def test_manifest_parent_escape_is_refused(tmp_path):
    """The original case: a manifest line naming ``../outside/secret.png``."""
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret.png").write_bytes(_png(9))
    data = tmp_path / "data"
    data.mkdir()
    manifest = _manifest(data, [{"image": "../outside/secret.png", "caption": "x"}])
    with pytest.raises(PackError, match=r"m\.jsonl line 2: .*'\.\./outside/secret\.png'.*outside"):
        pack(manifest, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_manifest_absolute_path_is_refused(tmp_path):
    """The original case: an absolute path in a manifest (here even one inside its folder)."""
    (tmp_path / "outside").mkdir()
    secret = tmp_path / "outside" / "secret.png"
    secret.write_bytes(_png(9))
    data = tmp_path / "data"
    data.mkdir()
    for value in (str(secret), str(data / "media" / "good.png")):
        manifest = _manifest(data, [{"image": value, "caption": "x"}])
        with pytest.raises(PackError, match=r"m\.jsonl line 2: .*absolute path"):
            pack(manifest, tmp_path / "out")
    # and in a messages row
    row = {"messages": [{"role": "user", "content": [{"type": "image", "image": str(secret)}]}]}
    with pytest.raises(PackError, match=r"m\.jsonl line 2: .*absolute path"):
        pack(_manifest(data, [row]), tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "value",
    [
        "media/../../outside/secret.png",  # `..` hidden in a deeper path
        "media/./../media/../../outside/secret.png",
        "link/secret.png",  # a symlinked directory that leaves the folder
        "media/alias.png",  # a file symlink that leaves the folder
    ],
)
def test_manifest_variants_leaving_the_folder_are_refused(tmp_path, value):
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret.png").write_bytes(_png(9))
    data = tmp_path / "data"
    manifest = _manifest(data, [{"image": value, "caption": "x"}])
    (data / "link").symlink_to(tmp_path / "outside")
    (data / "media" / "alias.png").symlink_to(tmp_path / "outside" / "secret.png")
    with pytest.raises(PackError, match=r"m\.jsonl line 2: .*outside"):
        pack(manifest, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_symlinked_directory_leaving_the_source_is_refused(tmp_path):
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "x.png").write_bytes(_png(3))
    (tmp_path / "outside" / "x.txt").write_text("from outside")
    src = _folder(tmp_path / "src")
    (src / "more").symlink_to(tmp_path / "outside")
    with pytest.raises(PackError, match=r"more.*outside.*outside the source"):
        pack(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_symlinks_inside_the_source_are_fine(tmp_path):
    src = _folder(tmp_path / "src", 1)
    (src / "real").mkdir()
    (src / "real" / "r.png").write_bytes(_png(5))
    (src / "real" / "r.txt").write_text("real")
    (src / "alias.png").symlink_to("s000.png")  # a file link inside
    (src / "alias.txt").write_text("alias")
    (src / "linked").symlink_to("real")  # a directory link inside
    (src / "loop").symlink_to(".")  # a loop back to the source: not walked twice
    out = tmp_path / "out"
    result = pack(src, out)
    assert result.samples == 4
    assert _keys(out) == ["alias", "linked/r", "real/r", "s000"]
    with tarfile.open(out / result.shards[0]) as tar:
        assert tar.extractfile("alias.png").read() == (src / "s000.png").read_bytes()


def test_manifest_dotdot_that_stays_inside_is_fine(tmp_path):
    data = tmp_path / "data"
    manifest = _manifest(data, [{"image": "media/../media/good.png", "caption": "x"}])
    assert pack(manifest, tmp_path / "out").samples == 2


def test_allow_outside_source_flag(tmp_path):
    (tmp_path / "outside").mkdir()
    secret = tmp_path / "outside" / "secret.png"
    secret.write_bytes(_png(9))
    data = tmp_path / "data"
    manifest = _manifest(
        data,
        [
            {"image": "../outside/secret.png", "caption": "relative"},
            {"image": str(secret), "caption": "absolute"},
        ],
    )
    result = pack(manifest, tmp_path / "out", allow_outside_source=True)
    assert result.samples == 3

    src = _folder(tmp_path / "src", 1)
    (src / "ext.png").symlink_to(secret)
    (src / "ext.txt").write_text("via a link")
    run = _cli(str(src), str(tmp_path / "out2"), "--allow-outside-source")
    assert run.returncode == 0, run.stderr
    assert _keys(tmp_path / "out2") == ["ext", "s000"]
    # still never a special file, wherever it is
    (src / "null.png").symlink_to("/dev/null")
    (src / "null.txt").write_text("x")
    with pytest.raises(PackError, match=r"null\.png.*not a regular file \(character device\)"):
        pack(src, tmp_path / "out3", allow_outside_source=True)


# --------------------------------------------------------------------------- special files


def test_fifo_named_png_is_refused_without_blocking(tmp_path):
    """The original case: a FIFO named ``x.png`` blocked forever and left a partial shard."""
    src = _folder(tmp_path / "src")
    os.mkfifo(src / "x.png")
    (src / "x.txt").write_text("a caption")
    out = tmp_path / "out"
    with pytest.raises(PackError, match=r"x\.png.*not a regular file \(FIFO\)"):
        _pack_within(20, src, out)
    assert not out.exists()

    try:
        run = _cli(str(src), str(out), timeout=60)
    except subprocess.TimeoutExpired:
        with open(os.open(src / "x.png", os.O_WRONLY | os.O_NONBLOCK), "wb"):
            pass
        pytest.fail("mm data pack blocked on a FIFO")
    assert run.returncode == 2 and "x.png" in run.stderr and "FIFO" in run.stderr
    assert not out.exists()


def test_special_files_in_a_manifest_are_refused(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    os.mkfifo(data / "pipe.mp4")
    (data / "dir.png").mkdir()
    sock = socket.socket(socket.AF_UNIX)
    try:
        sock.bind(str(data / "s.wav"))
    except OSError:  # path too long for a socket here
        sock.close()
        sock = None
    cases = [("video", "pipe.mp4", "FIFO"), ("image", "dir.png", "directory")]
    if sock is not None:
        cases.append(("audio", "s.wav", "socket"))
    try:
        for kind, name, what in cases:
            manifest = _manifest(data, [{kind: name, "caption": "x"}])
            with pytest.raises(PackError, match=rf"m\.jsonl line 2: .*{name}.*not a regular file \({what}\)"):
                _pack_within(20, manifest, tmp_path / "out")
            assert not (tmp_path / "out").exists()
    finally:
        if sock is not None:
            sock.close()


def test_folder_named_like_media_is_refused(tmp_path):
    src = _folder(tmp_path / "src")
    (src / "d.png").mkdir()
    (src / "d.txt").write_text("caption of a directory")
    with pytest.raises(PackError, match=r"d\.png.*directory"):
        pack(src, tmp_path / "out")


# --------------------------------------------------------------------------- 6. partial shards


def _slow_source(root: Path, n: int = 400, side: int = 160) -> Path:
    """Enough noise images that writing them takes a moment."""
    root.mkdir(parents=True)
    for i in range(n):
        pixels = np.random.default_rng(i).integers(0, 256, (side, side, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / f"k{i:04d}.png", compress_level=0)
        (root / f"k{i:04d}.txt").write_text(f"caption {i}")
    return root


def _kill_mid_pack(src: Path, out: Path, *extra: str) -> None:
    """Start ``mm data pack`` and SIGKILL it once its hidden folder holds a (partial) shard."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "mm.cli", "data", "pack", str(src), str(out), "--shard-size", "300KB", *extra],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if out.exists() and any(
                p.name.endswith(".tar") for d in out.glob(".mm-pack-*") if d.is_dir() for p in d.iterdir()
            ):
                break
            time.sleep(0.001)
        assert proc.poll() is None, "pack ended before it could be killed: make the source bigger"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert _leftovers(out), "the killed pack left no hidden folder: the kill came too late"


def test_sigkill_mid_pack_then_repack_leaves_no_trace(tmp_path):
    """The original case: after a SIGKILL, the hidden partial shard survived the next good pack."""
    src, out = _slow_source(tmp_path / "src"), tmp_path / "out"
    _kill_mid_pack(src, out)
    assert not (out / "manifest.json").exists() and not list(out.glob("*.tar"))

    result = pack(src, out, shard_bytes="300KB")
    assert _leftovers(out) == []
    assert sorted(p.name for p in out.iterdir()) == sorted([*result.shards, "manifest.json"])
    assert result.samples == 400 and _keys(out) == [f"k{i:04d}" for i in range(400)]


def test_sigkill_during_overwrite_keeps_the_old_pack_then_repack_cleans_up(tmp_path):
    src, out = _slow_source(tmp_path / "src"), tmp_path / "out"
    first = pack(_folder(tmp_path / "small", 3), out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    (out / ".mm-pack-notes").write_text("a user's file that only looks like ours")
    (out / ".mm-pack-mine").mkdir()

    _kill_mid_pack(src, out, "--overwrite")
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.name in before} == before
    assert first.samples == 3

    result = pack(src, out, shard_bytes="300KB", overwrite=True)
    assert _leftovers(out) == [".mm-pack-mine", ".mm-pack-notes"]  # only our own folders go
    assert result.samples == 400 and len(_keys(out)) == 400


# --------------------------------------------------------------------------- 7. what no reader can use


@pytest.mark.parametrize(
    ("name", "data", "message"),
    [
        ("x.png", np.random.default_rng(0).bytes(4096), r"x\.png.*not an image"),  # the original cases
        ("x.png", b"", r"x\.png.*empty"),
        ("x.png", _png(4, side=64)[:300], r"x\.png.*(truncated|cannot decode)"),  # variants
        ("x.jpg", b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n", r"x\.jpg.*not an image"),
        ("x.mp4", _mp4()[: len(_mp4()) // 2], r"x\.mp4.*truncated video"),
        ("x.mp4", b"", r"x\.mp4.*empty"),
        ("x.wav", np.random.default_rng(1).bytes(2048), r"x\.wav.*(unsupported|unrecognised|corrupt)"),
        ("x.wav", _wav()[:-1000], r"x\.wav.*truncated"),
        ("x.mp4.safetensors", b"\xff" * 16, r"x\.mp4\.safetensors.*safetensors"),
    ],
    ids=[
        "random-png",
        "empty-png",
        "cut-png",
        "eps-as-jpg",
        "cut-mp4",
        "empty-mp4",
        "random-wav",
        "cut-wav",
        "bad-features",
    ],
)
def test_media_that_do_not_decode_are_refused(tmp_path, name, data, message):
    src = _folder(tmp_path / "src")
    (src / name).write_bytes(data)
    (src / "x.txt").write_text("a caption")
    with pytest.raises(PackError, match=message):
        pack(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    manifest = _manifest(tmp_path / "m", [{media_kind(name): f"../src/{name}", "caption": "x"}])
    with pytest.raises(PackError, match=rf"m\.jsonl line 2: .*{message}"):
        pack(manifest, tmp_path / "out", allow_outside_source=True)


def test_good_media_of_every_kind_pack(tmp_path):
    src = _folder(tmp_path / "src", 1)
    (src / "v.mp4").write_bytes(_mp4())
    (src / "v.txt").write_text("a video")
    (src / "a.wav").write_bytes(_wav())
    (src / "a.txt").write_text("speech")
    assert pack(src, tmp_path / "out").samples == 3


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"image": "media/good.png", "caption": ""}, "caption is empty"),  # the original case
        ({"image": "media/good.png", "caption": " \n\t "}, "caption is empty"),  # variants
        ({"image": "media/good.png", "caption": "x", "prompt": ""}, "prompt is empty"),
        (
            {"messages": [{"role": "user", "content": [{"type": "text", "text": "  "}]}]},
            "message 0, part 0: text is empty",
        ),
        ({"messages": [{"role": "assistant", "content": ""}]}, "message 0: text is empty"),
        ({"image": "media/good.png", "caption": "x" * (MAX_TEXT_BYTES + 1)}, "caption is over"),
        ({"image": "media/good.png", "caption": "é" * (MAX_TEXT_BYTES // 2 + 1)}, "caption is over"),
    ],
)
def test_bad_captions_are_refused(tmp_path, row, message):
    manifest = _manifest(tmp_path, [row])
    with pytest.raises(PackError, match=rf"m\.jsonl line 2: .*{message}"):
        pack(manifest, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_sixty_megabyte_caption_is_refused(tmp_path):
    """The original case: a 60 MB caption was packed."""
    manifest = _manifest(tmp_path, [{"image": "media/good.png", "caption": "x" * 60_000_000}])
    with pytest.raises(PackError, match=r"m\.jsonl line 2: .*(over|longer than)"):
        pack(manifest, tmp_path / "out")
    src = _folder(tmp_path / "src", 1)
    (src / "s000.txt").write_text("y" * 60_000_000)
    with pytest.raises(PackError, match=r"s000\.txt: .*(over|longer than)"):
        pack(src, tmp_path / "out")
    (src / "s000.txt").write_text("")  # and an empty one
    with pytest.raises(PackError, match=r"s000\.txt: caption is empty"):
        pack(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        (["a", "a\x00"], "control character"),  # the original case: two tar members named `a`
        (["a", "a "], "space"),  # variants
        (["a", "\x00"], "control character"),
        (["ok", "a\tb"], "control character"),
        (["ok", "a\u202eb"], "control character"),
        (["ok", ""], "non-empty"),
        (["ok", "a//b"], "empty part"),
        (["ok", "a/../b"], r"'\.\.'"),
        (["ok", "/abs"], "relative"),
        (["ok", "k" * 2000], "longer than"),
        ([unicodedata.normalize("NFC", "café"), unicodedata.normalize("NFD", "café")], "also used by"),
    ],
)
def test_bad_keys_are_refused(tmp_path, keys, message):
    rows = [{"image": "media/good.png", "caption": "x", "key": key} for key in keys]
    manifest = _manifest(tmp_path, rows)
    with pytest.raises(PackError, match=rf"m\.jsonl line 3: .*{message}"):
        pack(manifest, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_bad_file_names_in_a_folder_are_refused(tmp_path):
    src = _folder(tmp_path / "src")
    (src / "a\nb.png").write_bytes(_png(2))
    (src / "a\nb.txt").write_text("x")
    with pytest.raises(PackError, match="control character"):
        pack(src, tmp_path / "out")


def test_nul_in_a_manifest_path_and_control_characters_in_a_file_extension(tmp_path):
    manifest = _manifest(tmp_path, [{"image": "media/good\x00.png", "caption": "x"}])
    with pytest.raises(PackError, match=r"m\.jsonl line 2: image 'media/good\\x00\.png'"):
        pack(manifest, tmp_path / "out")
    src = _folder(tmp_path / "src")
    (src / "a.\x01.png").write_bytes(_png(2))
    (src / "a.txt").write_text("x")
    with pytest.raises(PackError, match="control character"):
        pack(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def _nested(depth: int) -> object:
    value: object = "leaf"
    for _ in range(depth):
        value = {"a": value}
    return value


def test_deeply_nested_meta_is_refused(tmp_path):
    """The original case: meta nested 5,000 deep raised a RecursionError."""
    line = '{"image": "media/good.png", "caption": "x", "meta": ' + "[" * 5000 + "]" * 5000 + "}"
    manifest = _manifest(tmp_path, [line])
    with pytest.raises(PackError, match=rf"m\.jsonl line 2: .*nested deeper than {MAX_JSON_DEPTH}"):
        pack(manifest, tmp_path / "out")
    src = _folder(tmp_path / "src", 1)
    (src / "s000.txt").unlink()
    (src / "s000.json").write_text('{"caption": "x", "meta": ' + "{" + '"a":{' * 4999 + "}" * 5000 + "}")
    with pytest.raises(PackError, match=rf"s000\.json: .*nested deeper than {MAX_JSON_DEPTH}"):
        pack(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"image": "media/good.png", "caption": "x", "meta": _nested(MAX_JSON_DEPTH)}, "nested deeper"),
        (
            {
                "messages": [
                    {"role": "user", "content": [{"type": "text", "text": "hi", "extra": _nested(40)}]}
                ]
            },
            "nested deeper",
        ),
        ({"image": "media/good.png", "caption": "x", "meta": {"blob": "z" * 2_000_000}}, "meta is over"),
    ],
)
def test_meta_variants_are_refused(tmp_path, row, message):
    manifest = _manifest(tmp_path, [row])
    with pytest.raises(PackError, match=rf"m\.jsonl line 2: .*{message}"):
        pack(manifest, tmp_path / "out")


def test_moderate_meta_is_kept(tmp_path):
    meta = {"source": "test", "deep": _nested(MAX_JSON_DEPTH - 4)}
    manifest = _manifest(tmp_path, [{"image": "media/good.png", "caption": "x", "meta": meta, "key": "k"}])
    out = tmp_path / "out"
    result = pack(manifest, out)
    with tarfile.open(out / result.shards[0]) as tar:
        assert json.loads(tar.extractfile("k.json").read())["meta"] == meta
