"""Media named by a path: what is not a usable file is refused with the file and the reason named
(issue: `mm ask --video zero.mp4` answered "[Errno 22] Invalid argument"), before anything opens it."""

from __future__ import annotations

import os
import threading

import pytest

from mm.datasets.audio import AudioError, load_audio
from mm.datasets.images import ImageError, load_image
from mm.datasets.video import VideoError, load_video

LOADERS = {
    "image": (load_image, ImageError),
    "video": (load_video, VideoError),
    "audio": (load_audio, AudioError),
}


def _bad_files(tmp_path):
    empty = tmp_path / "zero.bin"
    empty.write_bytes(b"")
    folder = tmp_path / "folder.bin"
    folder.mkdir()
    fifo = tmp_path / "fifo.bin"
    os.mkfifo(fifo)
    return {
        "empty": (empty, "empty file (0 bytes)"),
        "folder": (folder, "is a folder, not a file"),
        "fifo": (fifo, "not a regular file"),
    }


def _call_with_deadline(fn, *args, seconds=20):
    """Run ``fn`` in a thread: a FIFO opened for reading would block forever."""
    box = {}

    def target():
        try:
            box["value"] = fn(*args)
        except BaseException as err:  # handed back to the test
            box["error"] = err

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"{fn.__name__} blocked on {args}"
    return box


@pytest.mark.parametrize("kind", sorted(LOADERS))
@pytest.mark.parametrize("case", ["empty", "folder", "fifo"])
def test_a_path_that_is_no_media_file_is_named(tmp_path, kind, case):
    load, error = LOADERS[kind]
    path, reason = _bad_files(tmp_path)[case]
    box = _call_with_deadline(load, path)
    assert isinstance(box.get("error"), error), box
    message = str(box["error"])
    assert f"{kind} file {str(path)!r}" in message and reason in message
    assert "Errno" not in message


@pytest.mark.parametrize("kind", sorted(LOADERS))
def test_a_missing_file_is_named(tmp_path, kind):
    load, _ = LOADERS[kind]
    with pytest.raises((FileNotFoundError, ImageError), match=f"{kind} file .*missing.bin.*: no such file"):
        load(tmp_path / "missing.bin")


def test_random_bytes_named_mp4_name_the_file_and_no_errno(tmp_path):
    clip = tmp_path / "noise.mp4"
    clip.write_bytes(os.urandom(300))
    with pytest.raises(VideoError) as caught:
        load_video(clip)
    message = str(caught.value)
    assert str(clip) in message and "not a readable video" in message and "Invalid argument" not in message


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from serving_testing import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("ask-model") / "model")


@pytest.mark.parametrize("flag", ["--video", "--image", "--audio"])
def test_mm_ask_names_an_empty_media_file_in_one_line(model_dir, tmp_path, capsys, flag):
    """The issue's case (`mm ask --video zero.mp4`) and the same for images and audio."""
    from mm.cli import main

    zero = tmp_path / "zero.mp4"
    zero.write_bytes(b"")
    assert main(["ask", "--model", str(model_dir), flag, str(zero), "What is this?"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(zero) in err and "empty file (0 bytes)" in err, err
    assert "Errno" not in err


def test_mm_ask_does_not_block_on_a_fifo(model_dir, tmp_path, capsys):
    from mm.cli import main

    fifo = tmp_path / "clip.mp4"
    os.mkfifo(fifo)
    box = _call_with_deadline(main, ["ask", "--model", str(model_dir), "--video", str(fifo), "Which way?"])
    assert box.get("value") == 2, box
    assert "not a regular file" in capsys.readouterr().err
