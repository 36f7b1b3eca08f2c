"""Shard writer (`mm.datasets.shards.pack`) and streaming reader (`mm.datasets.webdata.ShardStream`)."""

from __future__ import annotations

import collections
import io
import json
import os
import pickle
import sys
import tarfile
import warnings
import zlib
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch.utils.data
from PIL import Image

from mm.datasets import shards
from mm.datasets.shards import PackError, pack, parse_size
from mm.datasets.webdata import DataCounters, DataError, ShardStream, expand_shards, normalize_sample

PROMPT = "Describe the image."


def _png(seed: int, side: int = 24) -> bytes:
    """A noise PNG (noise does not compress, so sizes are predictable)."""
    pixels = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _caption_folder(root: Path, n: int, *, tag: str = "s", side: int = 24) -> dict[str, tuple[list, dict]]:
    """n caption pairs as ``KEY.png`` + ``KEY.txt``; returns key -> (expected messages, media)."""
    root.mkdir(parents=True, exist_ok=True)
    expected = {}
    for i in range(n):
        key = f"{tag}{i:03d}"
        data = _png(zlib.crc32(key.encode()), side)
        (root / f"{key}.png").write_bytes(data)
        (root / f"{key}.txt").write_text(f"caption {tag} {i}\n")
        messages = [
            {
                "role": "user",
                "content": [{"type": "image", "image": "png"}, {"type": "text", "text": PROMPT}],
            },
            {"role": "assistant", "content": f"caption {tag} {i}"},
        ]
        expected[key] = (messages, {"png": data})
    return expected


def _interleaved_folder_sample(root: Path, key: str) -> tuple[list, dict]:
    """``KEY.0.png KEY.1.png KEY.json`` whose messages name the files (rewritten to fields on pack)."""
    first, second = _png(101), _png(102)
    (root / f"{key}.0.png").write_bytes(first)
    (root / f"{key}.1.png").write_bytes(second)

    def messages(a: str, b: str) -> list:
        return [
            {"role": "system", "content": "Be brief."},
            {
                "role": "user",
                "content": [
                    {"type": "image", "image": a},
                    {"type": "text", "text": "Which one is brighter,"},
                    {"type": "image", "image": b},
                    {"type": "text", "text": "or this one?"},
                ],
            },
            {"role": "assistant", "content": "The second."},
        ]

    (root / f"{key}.json").write_text(json.dumps({"messages": messages(f"{key}.0.png", "1.png")}))
    return messages("0.png", "1.png"), {"0.png": first, "1.png": second}


def _read_all(urls, **options) -> list[dict]:
    options.setdefault("shuffle_shards", False)
    return list(ShardStream(urls, rank=0, world_size=1, **options))


def _write_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _caption_json(i: int) -> bytes:
    return json.dumps({"caption": f"c{i}"}).encode()


def _tar_keys(path: Path) -> list[str]:
    with tarfile.open(path) as tar:
        return sorted({name.split(".", 1)[0] for name in tar.getnames()})


# --------------------------------------------------------------------------- pack


def test_pack_folder_round_trip_with_size_limit(tmp_path):
    src = tmp_path / "src"
    expected = _caption_folder(src, 12)
    expected["mix"] = _interleaved_folder_sample(src, "mix")
    limit = 24_000
    result = pack(src, tmp_path / "out", shard_bytes=limit)

    assert result.samples == 13
    assert len(result.shards) >= 3
    assert [p.name for p in sorted((tmp_path / "out").glob("*.tar"))] == list(result.shards)
    for name in result.shards:
        keys = _tar_keys(tmp_path / "out" / name)
        if len(keys) > 1:  # only a lone oversized sample may exceed the target
            assert (tmp_path / "out" / name).stat().st_size <= limit
    assert result.bytes == sum((tmp_path / "out" / n).stat().st_size for n in result.shards)

    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert [s["name"] for s in manifest["shards"]] == list(result.shards)
    assert [s["samples"] for s in manifest["shards"]] == [
        len(_tar_keys(tmp_path / "out" / n)) for n in result.shards
    ]
    assert manifest["samples"] == 13 and manifest["settings"]["shard_bytes"] == limit

    samples = _read_all(tmp_path / "out")
    assert sorted(s["__key__"] for s in samples) == sorted(expected)
    for sample in samples:
        messages, media = expected[sample["__key__"]]
        assert sample["messages"] == messages
        assert sample["media"] == media


def test_pack_manifest_round_trip_and_url_stream(tmp_path):
    media = tmp_path / "data" / "media"
    media.mkdir(parents=True)
    cat, dog = _png(1), _png(2)
    (media / "cat.png").write_bytes(cat)
    (media / "dog.jpg").write_bytes(dog)  # extensions are not checked against content: bytes are stored raw
    rows = [
        {"image": "media/cat.png", "caption": "a cat"},
        {
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "image", "image": "media/dog.jpg"}, {"type": "text", "text": "?"}],
                },
                {"role": "assistant", "content": [{"type": "text", "text": "a dog"}]},
            ],
            "key": "dog",
            "meta": {"source": "test"},
        },
        {"image": str(media / "cat.png"), "caption": "again", "prompt": "Caption it."},
    ]
    manifest = tmp_path / "data" / "train.jsonl"
    manifest.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    with pytest.raises(PackError, match="line 3: .* is an absolute path"):
        pack(manifest, tmp_path / "out", shard_bytes="1MB")
    result = pack(manifest, tmp_path / "out", shard_bytes="1MB", allow_outside_source=True)
    assert result.samples == 3 and len(result.shards) == 1

    shard = tmp_path / "out" / result.shards[0]
    for urls in (str(shard), f"pipe:cat {shard}", [f"file://{shard}"]):
        samples = {s["__key__"]: s for s in _read_all(urls)}
        assert set(samples) == {"000000001", "dog", "000000003"}
        first = samples["000000001"]
        assert first["messages"][0]["content"] == [
            {"type": "image", "image": "png"},
            {"type": "text", "text": PROMPT},
        ]
        assert first["messages"][1] == {"role": "assistant", "content": "a cat"}
        assert first["media"] == {"png": cat}
        assert samples["dog"]["messages"][0]["content"][0] == {"type": "image", "image": "0.jpg"}
        assert samples["dog"]["messages"][1] == rows[1]["messages"][1]
        assert samples["dog"]["media"] == {"0.jpg": dog}
        assert samples["dog"]["meta"] == {"source": "test"}
        assert samples["000000003"]["messages"][0]["content"][1]["text"] == "Caption it."


def test_pack_is_deterministic_and_prompt_can_be_baked_in(tmp_path):
    src = tmp_path / "src"
    _caption_folder(src, 5)
    _interleaved_folder_sample(src, "mix")
    a = pack(src, tmp_path / "a", shard_bytes=12_000)
    for i, path in enumerate(sorted(src.iterdir())):  # file times must not leak into the shards
        os.utime(path, (1_000_000 + i, 2_000_000 + 7 * i))
    b = pack(src, tmp_path / "b", shard_bytes=12_000)
    assert a.shards == b.shards and len(a.shards) > 1
    for name in a.shards:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
        with tarfile.open(tmp_path / "a" / name) as tar:  # nor the clock: one fixed member time
            assert {m.mtime for m in tar.getmembers()} == {0}

    baked = pack(src, tmp_path / "c", caption_prompt="What is shown?")
    with tarfile.open(tmp_path / "c" / baked.shards[0]) as tar:
        stored = json.loads(tar.extractfile("s000.json").read())
    assert stored["messages"][0]["content"][1] == {"type": "text", "text": "What is shown?"}
    assert stored["messages"][1] == {"role": "assistant", "content": "caption s 0"}


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"image": "media/a.png", "caption": ', "line 3: invalid JSON"),
        (
            '{"image": "media/missing.png", "caption": "x"}',
            "line 3: image file 'media/missing.png' not found",
        ),
        ('{"image": "media/a.bmp", "caption": "x"}', "line 3: image 'media/a.bmp' does not end in one of"),
        ('{"caption": "no media"}', "line 3: expected 'messages'"),
        ('{"messages": []}', "line 3: bad messages"),
        (
            '{"messages": [{"role": "robot", "content": "hi"}]}',
            "line 3: bad messages: message 0 has role 'robot'",
        ),
        ('{"image": "media/a.png", "caption": "x", "colour": "red"}', "line 3: unknown keys ['colour']"),
    ],
)
def test_bad_manifest_line_aborts_and_writes_nothing(tmp_path, line, message):
    (tmp_path / "media").mkdir()
    (tmp_path / "media" / "a.png").write_bytes(_png(0))
    (tmp_path / "media" / "a.bmp").write_bytes(b"BM")
    good = json.dumps({"image": "media/a.png", "caption": "fine"})
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("\n".join([good, good, line, good]) + "\n")
    out = tmp_path / "out"
    with pytest.raises(PackError, match=rf"m\.jsonl {message}".replace("[", r"\[").replace("]", r"\]")):
        pack(manifest, out, shard_bytes=1)
    assert not out.exists()


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({"a.png": None}, "a.*: media without a.json or a.txt"),
        ({"a.png": None, "a.txt": "x", "b.gif": None}, "b.gif: unknown extension '.gif'"),
        ({"a.png": None, "a.pkl": b"x", "a.txt": "x"}, "a.pkl: unknown extension '.pkl'"),
        (
            {"a.0.png": None, "a.1.png": None, "a.txt": "x"},
            "a.txt: a caption needs exactly one media file, found 2",
        ),
        ({"a.png": None, "a.json": "{oops"}, "a.json: invalid JSON"),
        ({"a.png": None, "a.json": '{"title": "x"}'}, "a.json: needs 'messages' or 'caption'"),
        (
            {
                "a.0.png": None,
                "a.1.png": None,
                "a.json": json.dumps(
                    {"messages": [{"role": "user", "content": [{"type": "image", "image": "0.png"}]}]}
                ),
            },
            r"a.json: media \['a.1.png'\] not used by any message",
        ),
        (
            {
                "a.png": None,
                "a.json": json.dumps(
                    {"messages": [{"role": "user", "content": [{"type": "image", "image": "b.png"}]}]}
                ),
            },
            "a.json: image 'b.png' is not a file of sample 'a'",
        ),
    ],
)
def test_bad_folder_sample_aborts(tmp_path, files, message):
    src = tmp_path / "src"
    src.mkdir()
    for name, content in files.items():
        path = src / name
        if content is None:
            path.write_bytes(_png(0))
        elif isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
    with pytest.raises(PackError, match=message):
        pack(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_failure_while_writing_leaves_no_shard(tmp_path, monkeypatch):
    """A file that changes after it was checked fails only in the write phase, after earlier shards
    were written: none of them may be left behind, nor the staging folder."""
    src = tmp_path / "src"
    _caption_folder(src, 4)
    (src / "zz.png").write_bytes(_png(7))
    (src / "zz.txt").write_text("last")
    plan_source = shards.plan_source

    def plan_then_change(*args, **kwargs):
        plans = plan_source(*args, **kwargs)
        data = bytearray((src / "zz.png").read_bytes())
        data[-20] ^= 0xFF  # same size, other bytes
        (src / "zz.png").write_bytes(bytes(data))
        return plans

    monkeypatch.setattr(shards, "plan_source", plan_then_change)
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.md").write_text("keep me")
    with pytest.raises(PackError, match="zz.txt: zz.png changed while packing"):
        pack(src, out, shard_bytes=1)
    assert [p.name for p in out.iterdir()] == ["notes.md"]
    (src / "zz.png").write_bytes(_png(7))
    with pytest.raises(PackError, match="changed while packing"):
        pack(src, tmp_path / "new", shard_bytes=1)
    assert not (tmp_path / "new").exists()


def test_existing_pack_needs_overwrite(tmp_path):
    src = tmp_path / "src"
    _caption_folder(src, 6)
    first = pack(src, tmp_path / "out", shard_bytes=1)
    assert len(first.shards) == 6
    with pytest.raises(FileExistsError, match="overwrite=True"):
        pack(src, tmp_path / "out")
    second = pack(src, tmp_path / "out", overwrite=True)
    assert len(second.shards) == 1
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["manifest.json", "shard-000000.tar"]


def test_parse_size():
    assert parse_size("64MB") == 64_000_000
    assert parse_size("64MiB") == parse_size("64M") == 64 * 2**20
    assert parse_size("1.5 GB") == 1_500_000_000
    assert parse_size("4096") == parse_size(4096) == 4096
    assert parse_size("2kib") == 2048
    for bad in ("", "MB", "-1MB", "12XB", "0", "3iB"):
        with pytest.raises(ValueError, match="size"):
            parse_size(bad)


# --------------------------------------------------------------------------- reader: schema


def test_normalize_caption_forms():
    png = _png(3)
    messages, media, meta = normalize_sample({"json": _caption_json(0), "jpg": png})
    assert messages[0]["content"] == [{"type": "image", "image": "jpg"}, {"type": "text", "text": PROMPT}]
    assert messages[1]["content"] == "c0" and media == {"jpg": png} and meta == {}
    # webdataset-style caption data: txt caption beside a json of metadata
    messages, _, meta = normalize_sample(
        {"txt": b"a wav", "json": b'{"sr": 16000}', "flac": b"fLaC"}, caption_prompts={"audio": "Repeat."}
    )
    assert messages[0]["content"][0] == {"type": "audio", "audio": "flac"}
    assert messages[0]["content"][1]["text"] == "Repeat." and meta == {"sr": 16000}


# --------------------------------------------------------------------------- reader: splitting


def _eight_shards(tmp_path: Path) -> tuple[list[str], set[str]]:
    urls, keys = [], set()
    for i in range(8):
        expected = _caption_folder(tmp_path / f"src{i}", 3, tag=f"p{i}_", side=8)
        result = pack(tmp_path / f"src{i}", tmp_path / f"out{i}")
        urls += [str(tmp_path / f"out{i}" / name) for name in result.shards]
        keys |= set(expected)
    return urls, keys


def _identity(x):
    return x


def test_ranks_and_workers_cover_every_sample_once(tmp_path):
    urls, keys = _eight_shards(tmp_path)
    assert len(urls) == 8
    got: list[str] = []
    shards_by_reader: dict[tuple[int, int], set[str]] = collections.defaultdict(set)
    for rank in range(2):
        stream = ShardStream(urls, rank=rank, world_size=2, seed=7, shuffle_buffer=3)
        loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=2, collate_fn=_identity)
        for sample in loader:
            got.append(sample["__key__"])
            shards_by_reader[(rank, sample["__worker__"])].add(sample["__url__"])
    assert collections.Counter(got) == collections.Counter(keys)  # every sample exactly once
    assert set(shards_by_reader) == {(0, 0), (0, 1), (1, 0), (1, 1)}
    assert all(len(s) == 2 for s in shards_by_reader.values())


def _show_warnings_on_stderr(worker_id: int) -> None:
    """pytest records warnings in a list, which a forked worker keeps to itself: print them instead."""
    warnings.showwarning = lambda message, category, filename, lineno, file=None, line=None: print(
        warnings.formatwarning(message, category, filename, lineno, line), file=sys.stderr
    )


def test_too_few_shards_warn_and_resample(tmp_path, capfd):
    src = tmp_path / "src"
    keys = set(_caption_folder(src, 4, side=8))
    result = pack(src, tmp_path / "out", shard_bytes=1)
    urls = [str(tmp_path / "out" / n) for n in result.shards[:2]]  # 2 shards, 2 samples in all

    # in-process: 4 ranks, 1 worker each
    with pytest.warns(UserWarning, match=r"only 2 shard\(s\) for 4 rank\(s\) x 1 worker\(s\)"):
        taken = list(islice(iter(ShardStream(urls, rank=3, world_size=4, seed=1)), 10))
    assert len(taken) == 10  # more than the 2 samples there are: shards were drawn again
    assert {s["__key__"] for s in taken} <= keys

    with pytest.raises(DataError, match="resample=False"):
        next(iter(ShardStream(urls, rank=0, world_size=4, resample=False)))

    # real DataLoader workers: 2 ranks x 2 workers = 4 readers for 2 shards
    for rank in range(2):
        stream = ShardStream(urls, rank=rank, world_size=2, seed=1)
        loader = torch.utils.data.DataLoader(
            stream,
            batch_size=None,
            num_workers=2,
            collate_fn=_identity,
            worker_init_fn=_show_warnings_on_stderr,
        )
        workers = {sample["__worker__"] for sample in islice(loader, 8)}
        assert workers == {0, 1}
    err = capfd.readouterr().err
    assert err.count("only 2 shard(s) for 2 rank(s) x 2 worker(s) = 4 readers: resampling shards") == 2


def test_stream_is_deterministic_and_resumes_exactly(tmp_path):
    urls, _ = _eight_shards(tmp_path)
    options = dict(rank=1, world_size=2, seed=5, epoch=2, shuffle_buffer=4)
    full = [(s["__key__"], s["__position__"]) for s in ShardStream(urls, **options)]
    assert [p for _, p in full] == list(range(len(full)))
    assert full == [(s["__key__"], s["__position__"]) for s in ShardStream(urls, **options)]
    resumed = [(s["__key__"], s["__position__"]) for s in ShardStream(urls, start_sample=5, **options)]
    assert resumed == full[5:]
    other_epoch = [s["__key__"] for s in ShardStream(urls, **{**options, "epoch": 3})]
    assert other_epoch != [k for k, _ in full]


def test_expand_shards(tmp_path):
    for i in range(3):
        _write_tar(tmp_path / f"shard-{i:06d}.tar", [])
    by_braces = expand_shards(str(tmp_path / "shard-{000000..000002}.tar"))
    assert by_braces == expand_shards(tmp_path) == sorted(str(p) for p in tmp_path.glob("*.tar"))
    assert expand_shards(["pipe:cat x.tar", "https://host/a-{0..1}.tar"]) == [
        "pipe:cat x.tar",
        "https://host/a-0.tar",
        "https://host/a-1.tar",
    ]
    with pytest.raises(FileNotFoundError, match=r"1 shard\(s\) not found: .*shard-000003.tar"):
        expand_shards(str(tmp_path / "shard-{000000..000003}.tar"))


# --------------------------------------------------------------------------- reader: bad data


def _decode_image(sample: dict) -> dict:
    images = [Image.open(io.BytesIO(data)) for data in sample["media"].values()]
    for image in images:
        image.load()
    return {**sample, "images": images}


def test_corrupt_member_is_skipped_and_counted(tmp_path):
    members = []
    for i in range(6):
        members += [(f"k{i}.json", _caption_json(i)), (f"k{i}.png", _png(i, 8))]
    members[2] = ("k1.json", b'{"caption": "unterminated')  # invalid json
    members[7] = ("k3.png", b"\x89PNG\r\n\x1a\n not really a png")  # fails the decode callable
    _write_tar(tmp_path / "bad.tar", members)

    counters = DataCounters()
    out = _read_all(tmp_path / "bad.tar", decode=_decode_image, counters=counters, max_bad_fraction=0.5)
    assert [s["__key__"] for s in out] == ["k0", "k2", "k4", "k5"]
    assert all(s["images"][0].size == (8, 8) for s in out)
    assert counters.seen == 6 and counters.bad == 2
    assert counters.bad_by_reason == {"bad json": 1, "decode failed (UnidentifiedImageError)": 1}
    assert "k1" in counters.examples["bad json"]


def test_pickle_member_is_never_unpickled(tmp_path):
    class Payload:
        def __init__(self, target: Path):
            self.target = target

        def __reduce__(self):
            return (os.mkdir, (str(self.target),))

    marker = tmp_path / "unpickled"
    control = tmp_path / "control"
    pickle.loads(pickle.dumps(Payload(control)))  # the payload is live: unpickling it has the side effect
    assert control.is_dir()

    payload = pickle.dumps(Payload(marker))
    _write_tar(
        tmp_path / "p.tar",
        [
            ("a.json", _caption_json(0)),
            ("a.png", _png(0, 8)),
            ("a.pyd", payload),
            ("a.pkl", payload),
            ("a.npy", b"\x93NUMPY"),
            ("b.pickle", payload),  # a sample made of nothing but a pickle
            ("c.json", _caption_json(2)),
            ("c.png", _png(2, 8)),
        ],
    )
    counters = DataCounters()
    out = _read_all(tmp_path / "p.tar", counters=counters)
    assert [s["__key__"] for s in out] == ["a", "c"]
    assert out[0]["media"] == {"png": _png(0, 8)}
    assert not marker.exists()
    assert counters.skipped_pickle == 3 and counters.skipped_other == 1
    assert counters.bad == 0 and counters.seen == 2


def test_bad_fraction_over_limit_raises(tmp_path):
    members = []
    for i in range(20):
        members += [
            (f"k{i:02d}.json", b"not json" if i % 3 == 0 else _caption_json(i)),
            (f"k{i:02d}.png", _png(i, 8)),
        ]
    _write_tar(tmp_path / "bad.tar", members)

    got = []
    with pytest.raises(
        DataError,
        match=r"of 10 samples \(40\.00%\) were unreadable, above max_bad_fraction=10\.00%.*bad json x4",
    ):
        for sample in ShardStream(
            tmp_path / "bad.tar", rank=0, world_size=1, max_bad_fraction=0.1, min_samples_before_check=10
        ):
            got.append(sample)
    assert len(got) == 6  # stopped after the 10th sample, not at the end

    # fewer samples than min_samples_before_check: the whole stream's fraction is checked at its end
    with pytest.raises(DataError, match=r"7 of 20 samples \(35\.00%\)"):
        _read_all(tmp_path / "bad.tar", max_bad_fraction=0.1)
    assert len(_read_all(tmp_path / "bad.tar", max_bad_fraction=0.4)) == 13


def test_truncated_shard_is_counted_and_reading_goes_on(tmp_path):
    src = tmp_path / "src"
    _caption_folder(src, 8, side=32)
    result = pack(src, tmp_path / "out", shard_bytes=45_000)
    assert len(result.shards) >= 2
    first, rest = tmp_path / "out" / result.shards[0], result.shards[1:]
    with tarfile.open(first) as tar:
        infos = tar.getmembers()
    keys_in_first = sorted({i.name.split(".")[0] for i in infos})
    assert len(keys_in_first) >= 3
    cut_in = next(i for i in infos if i.name == f"{keys_in_first[2]}.png")
    data = first.read_bytes()
    first.write_bytes(data[: cut_in.offset_data + cut_in.size // 2])  # cut inside the 3rd sample's image

    counters = DataCounters()
    out = _read_all(tmp_path / "out", counters=counters, max_bad_fraction=0.5)
    expected = set(keys_in_first[:2]) | {k for name in rest for k in _tar_keys(tmp_path / "out" / name)}
    assert {s["__key__"] for s in out} == expected
    assert counters.bad_shards == 1 and counters.bad_by_reason == {"truncated shard": 1}
    assert keys_in_first[2] in counters.examples["truncated shard"]


def test_unreadable_shards_only_is_an_error(tmp_path):
    (tmp_path / "junk.tar").write_bytes(b"this is not a tar archive" * 40)
    with pytest.raises(
        DataError, match=r"no usable sample .*: 1 unreadable shard\(s\) \(first: .*junk.tar: ReadError"
    ):
        _read_all(tmp_path / "junk.tar")
    _write_tar(tmp_path / "nojson.tar", [("a.json", b"{"), ("b.json", b"[")])
    with pytest.raises(
        DataError, match=r"no usable sample .*: 0 unreadable shard\(s\), 2 bad sample\(s\): bad json x2"
    ):
        _read_all(tmp_path / "nojson.tar")
