"""``mm data pack --from FORMAT``: each published layout, written here tiny and exactly as published,
packed, read back with the training reader and compared sample by sample; a bad record of each is
refused by file and line with nothing left in OUT; img2dataset shards are also read directly."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import av
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf
from PIL import Image

from mm.datasets.importers import IMPORTERS, import_records, pack_from
from mm.datasets.importers.hf import hf_datasets
from mm.datasets.shards import PackError
from mm.datasets.webdata import ShardStream


def _png(seed: int, side: int = 16) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _jpg(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(
        buffer, "JPEG"
    )
    return buffer.getvalue()


def _audio(seed: int, fmt: str = "FLAC") -> bytes:
    wave = np.random.default_rng(seed).uniform(-0.5, 0.5, 1600).astype(np.float32)
    buffer = io.BytesIO()
    sf.write(buffer, wave, 16000, format=fmt)
    return buffer.getvalue()


def _mp4(seed: int) -> bytes:
    buffer = io.BytesIO()
    rng = np.random.default_rng(seed)
    with av.open(buffer, "w", format="mp4") as container:
        stream = container.add_stream("h264", rate=5)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for _ in range(3):
            frame = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return buffer.getvalue()


def _write(path: Path, data: bytes | str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)


def _read_back(out: Path) -> list[dict]:
    samples = list(ShardStream(out, rank=0, world_size=1, shuffle_shards=False))
    return sorted(samples, key=lambda s: s["__key__"])


def _pack(fmt: str, src: Path, out: Path, **options) -> list[dict]:
    result = pack_from(fmt, src, out, options=options, shard_bytes="20KB")
    samples = _read_back(out)
    assert result.samples == len(samples)
    assert json.loads((out / "manifest.json").read_text())["samples"] == len(samples)
    return samples


def _user(*parts) -> dict:
    return {"role": "user", "content": list(parts)}


def _image(field: str) -> dict:
    return {"type": "image", "image": field}


def _text(text: str) -> dict:
    return {"type": "text", "text": text}


def _refused(fmt: str, src: Path, out: Path, pattern: str, **options) -> None:
    with pytest.raises(PackError, match=pattern):
        pack_from(fmt, src, out, options=options)
    assert not out.exists() or not list(out.iterdir())


# --------------------------------------------------------------------------- llava, sharegpt


def _llava_fixture(root: Path) -> tuple[Path, dict[str, bytes]]:
    images = {"coco/train2017/000000033471.jpg": _jpg(1), "ocr/a.png": _png(2), "ocr/b.png": _png(3)}
    for path, data in images.items():
        _write(root / "images" / path, data)
    records = [
        {
            "id": "000000033471",
            "image": "coco/train2017/000000033471.jpg",
            "conversations": [
                {"from": "human", "value": "<image>\nWhat are the colors of the bus in the image?"},
                {"from": "gpt", "value": "The bus in the image is white and red."},
                {"from": "human", "value": "What feature can be seen on the back of the bus?"},
                {"from": "gpt", "value": "The back of the bus features an advertisement."},
            ],
        },
        {
            "id": "multi-1",
            "image": ["ocr/a.png", "ocr/b.png"],
            "conversations": [
                {"from": "system", "value": "Answer briefly."},
                {"from": "human", "value": "Compare <image> with\n<image>\nplease."},
                {"from": "gpt", "value": "Both are noise."},
            ],
        },
        {"id": "no-marker", "image": "ocr/a.png", "conversations": [
            {"from": "human", "value": "What is shown?"}, {"from": "gpt", "value": "Noise."}]},
        {"id": "text-only", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
    ]  # fmt: skip
    path = root / "llava_v1_5_mix665k.json"
    _write(path, json.dumps(records, indent=1))
    return path, images


def test_llava(tmp_path):
    path, images = _llava_fixture(tmp_path)
    samples = _pack("llava", path, tmp_path / "out", media_root=tmp_path / "images")
    assert [s["meta"] for s in samples] == [
        {"id": i} for i in ("000000033471", "multi-1", "no-marker", "text-only")
    ]
    assert samples[0]["messages"] == [
        _user(_image("0.jpg"), _text("What are the colors of the bus in the image?")),
        {"role": "assistant", "content": "The bus in the image is white and red."},
        {"role": "user", "content": "What feature can be seen on the back of the bus?"},
        {"role": "assistant", "content": "The back of the bus features an advertisement."},
    ]
    assert samples[0]["media"] == {"0.jpg": images["coco/train2017/000000033471.jpg"]}
    assert samples[1]["messages"] == [
        {"role": "system", "content": "Answer briefly."},
        _user(_text("Compare"), _image("0.png"), _text("with"), _image("1.png"), _text("please.")),
        {"role": "assistant", "content": "Both are noise."},
    ]
    assert samples[1]["media"] == {"0.png": images["ocr/a.png"], "1.png": images["ocr/b.png"]}
    assert samples[2]["messages"][0] == _user(_image("0.png"), _text("What is shown?"))
    assert samples[3]["messages"] == [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
    ]
    assert samples[3]["media"] == {}


@pytest.mark.parametrize(
    ("record", "pattern"),
    [
        ({"id": "x", "image": "ocr/a.png", "conversations": [{"from": "bot", "value": "<image>"}]}, "from 'bot'"),
        ({"id": "x", "image": "ocr/missing.png", "conversations": [{"from": "human", "value": "<image> q"},
          {"from": "gpt", "value": "a"}]}, "not found"),
        ({"id": "x", "image": "ocr/a.png", "conversations": [{"from": "human", "value": "<image> <image> q"},
          {"from": "gpt", "value": "a"}]}, "more <image> markers"),
        ({"id": "x", "image": "../outside.png", "conversations": [{"from": "human", "value": "q"},
          {"from": "gpt", "value": "a"}]}, "outside"),
        ({"id": "x", "image": "ocr/a.png", "conversations": [{"from": "human", "value": "<image>q"},
          {"from": "gpt", "value": "  "}]}, "empty|whitespace"),
    ],
)  # fmt: skip
def test_llava_refuses_bad_record_by_index(tmp_path, record, pattern):
    path, _ = _llava_fixture(tmp_path)
    _write(tmp_path / "outside.png", _png(9))  # a real image, but outside the image folder
    records = json.loads(path.read_text())
    records.insert(2, record)
    path.write_text(json.dumps(records))
    _refused("llava", path, tmp_path / "out", rf"llava_v1_5_mix665k\.json: record 2: .*({pattern})",
             media_root=tmp_path / "images")  # fmt: skip


def test_sharegpt(tmp_path):
    img, clip = _png(5), _audio(6)
    _write(tmp_path / "mllm_demo_data/1.png", img)
    _write(tmp_path / "mllm_demo_data/1.flac", clip)
    rows = [
        {"messages": [{"role": "user", "content": "<image>Who are they?<audio>"},
                      {"role": "assistant", "content": "They're Kane and Gretzka."}],
         "images": ["mllm_demo_data/1.png"], "audios": ["mllm_demo_data/1.flac"]},
        {"messages": [{"role": "system", "content": "Be nice."}, {"role": "user", "content": "Describe."},
                      {"role": "assistant", "content": "A picture."}], "images": ["mllm_demo_data/1.png"]},
        {"messages": [{"role": "user", "content": "<image><image>Two?"}, {"role": "assistant", "content": "No."}],
         "images": ["mllm_demo_data/1.png"]},
    ]  # fmt: skip
    path = tmp_path / "mllm_demo.jsonl"
    _write(path, "\n".join(json.dumps(r) for r in rows[:2]) + "\n")
    samples = _pack("sharegpt", path, tmp_path / "out")
    assert samples[0]["messages"] == [
        _user(_image("0.png"), _text("Who are they?"), {"type": "audio", "audio": "1.flac"}),
        {"role": "assistant", "content": "They're Kane and Gretzka."},
    ]
    assert samples[0]["media"] == {"0.png": img, "1.flac": clip}
    assert samples[1]["messages"][1] == _user(_image("0.png"), _text("Describe."))
    assert samples[1]["messages"][0] == {"role": "system", "content": "Be nice."}
    _write(path, "\n".join(json.dumps(r) for r in rows) + "\n")
    _refused(
        "sharegpt", path, tmp_path / "out2", r"mllm_demo\.jsonl line 3: .*more <image> markers than images"
    )


# --------------------------------------------------------------------------- video QA


def test_video_qa(tmp_path):
    clips = {"academic/v_1.mp4": _mp4(1), "v_2.mp4": _mp4(2)}
    for path, data in clips.items():
        _write(tmp_path / "videos" / path, data)
    llava_video = [
        {
            "id": "v_1",
            "video": "academic/v_1.mp4",
            "conversations": [
                {"from": "human", "value": "<image>\nWhat happens?"},
                {"from": "gpt", "value": "Noise flickers."},
            ],
        }
    ]
    chatgpt = [{"video_id": "v_2", "q": "What colour?", "a": "Many."}]  # fmt: skip
    _write(tmp_path / "llava_video.json", json.dumps(llava_video))
    _write(tmp_path / "video_chatgpt_qa.json", json.dumps(chatgpt))
    first = _pack("video-qa", tmp_path / "llava_video.json", tmp_path / "o1", media_root=tmp_path / "videos")
    second = _pack(
        "video-qa", tmp_path / "video_chatgpt_qa.json", tmp_path / "o2", media_root=tmp_path / "videos"
    )
    video = {"type": "video", "video": "0.mp4"}
    assert first[0]["messages"] == [
        _user(video, _text("What happens?")),
        {"role": "assistant", "content": "Noise flickers."},
    ]
    assert first[0]["media"] == {"0.mp4": clips["academic/v_1.mp4"]}
    assert second[0]["messages"] == [
        _user(video, _text("What colour?")),
        {"role": "assistant", "content": "Many."},
    ]
    assert second[0]["media"] == {"0.mp4": clips["v_2.mp4"]} and second[0]["meta"] == {"video_id": "v_2"}
    _write(tmp_path / "videos/broken.mp4", clips["v_2.mp4"][: len(clips["v_2.mp4"]) // 2])
    _write(tmp_path / "bad.json", json.dumps(chatgpt + [{"video_id": "broken", "q": "?", "a": "!"}]))
    _refused("video-qa", tmp_path / "bad.json", tmp_path / "o3", r"bad\.json: record 1: video 'broken\.mp4'",
             media_root=tmp_path / "videos")  # fmt: skip


# --------------------------------------------------------------------------- speech


def test_librispeech(tmp_path):
    root = tmp_path / "LibriSpeech"
    chapter = root / "dev-clean/84/121123"
    clips = {f"84-121123-{i:04d}": _audio(i) for i in range(3)}
    for utt, data in clips.items():
        _write(chapter / f"{utt}.flac", data)
    lines = [
        "84-121123-0000 GO DO YOU HEAR",
        "84-121123-0001 BUT IN LESS THAN FIVE MINUTES",
        "84-121123-0002 AT THIS",
    ]
    _write(chapter / "84-121123.trans.txt", "\n".join(lines) + "\n")
    samples = _pack("librispeech", root, tmp_path / "out")
    for sample, line in zip(samples, lines, strict=True):
        utt, text = line.split(" ", 1)
        assert sample["messages"] == [
            _user({"type": "audio", "audio": "0.flac"}, _text("Repeat after me in English.")),
            {"role": "assistant", "content": text},
        ]
        assert sample["media"] == {"0.flac": clips[utt]} and sample["meta"] == {"id": utt}
    _write(chapter / "84-121123.trans.txt", "\n".join([*lines, "84-121123-0009 NO SUCH FILE"]) + "\n")
    _refused(
        "librispeech", root, tmp_path / "o2", r"dev-clean/84/121123/84-121123\.trans\.txt line 4: .*not found"
    )


def _tsv(path: Path, header: list[str], rows: list[list[str]]) -> None:
    """Tab-separated, no quoting (texts keep their quotes), as Common Voice and CoVoST publish."""
    _write(path, "".join("\t".join(row) + "\n" for row in [header, *rows]))


def test_commonvoice(tmp_path):
    root = tmp_path / "cv-corpus-17.0-2024-03-15/en"
    header = ["client_id", "path", "sentence_id", "sentence", "sentence_domain", "up_votes", "down_votes", "age",
              "gender", "accents", "variant", "locale", "segment"]  # fmt: skip
    clips = {f"common_voice_en_{i}.mp3": _audio(10 + i, "MP3") for i in range(2)}
    for name, data in clips.items():
        _write(root / "clips" / name, data)
    sentences = ['He said "hello" twice.', "Second clip."]
    rows = [
        ["c1", name, "s", s, "", "2", "0", "", "", "", "", "en", ""]
        for name, s in zip(clips, sentences, strict=True)
    ]
    _tsv(root / "dev.tsv", header, rows)
    samples = _pack("commonvoice", root, tmp_path / "out", split="dev")
    for sample, (name, data), sentence in zip(samples, clips.items(), sentences, strict=True):
        assert sample["messages"] == [
            _user({"type": "audio", "audio": "0.mp3"}, _text("Repeat after me in English.")),
            {"role": "assistant", "content": sentence},
        ]
        assert sample["media"] == {"0.mp3": data}
        assert sample["meta"] == {"id": name, "client_id": "c1", "locale": "en"}
    _write(root / "clips/bad.mp3", b"ID3 not really audio")
    _tsv(root / "dev.tsv", header, [*rows, ["c2", "bad.mp3", "s", "x", "", "", "", "", "", "", "", "en", ""]])
    _refused("commonvoice", root, tmp_path / "o2", r"dev\.tsv line 4: audio 'bad\.mp3'", split="dev")


def test_covost(tmp_path):
    clips = {"common_voice_fr_1.mp3": _audio(20, "MP3"), "common_voice_fr_2.mp3": _audio(21, "MP3")}
    for name, data in clips.items():
        _write(tmp_path / "fr/clips" / name, data)
    rows = [[n, f"phrase {i}", f"sentence {i}", "c"] for i, n in enumerate(clips)]
    tsv = tmp_path / "covost_v2.fr_en.dev.tsv"
    _tsv(tsv, ["path", "sentence", "translation", "client_id"], rows)
    samples = _pack("covost", tsv, tmp_path / "out", media_root=tmp_path / "fr/clips")
    for i, (sample, data) in enumerate(zip(samples, clips.values(), strict=True)):
        assert sample["messages"] == [
            _user(
                {"type": "audio", "audio": "0.mp3"}, _text("Translate the following sentence into English.")
            ),
            {"role": "assistant", "content": f"sentence {i}"},
        ]
        assert sample["media"] == {"0.mp3": data}
    de = tmp_path / "covost_v2.en_de.dev.tsv"
    _tsv(de, ["path", "sentence", "translation", "client_id"], rows[:1])
    (first,) = _pack("covost", de, tmp_path / "out_de", media_root=tmp_path / "fr/clips")
    assert first["messages"][0]["content"][1] == _text("Translate the following sentence into German.")
    _tsv(
        tsv,
        ["path", "sentence", "translation", "client_id"],
        [*rows, ["common_voice_fr_1.mp3", "x", "", "c"]],
    )
    _refused(
        "covost",
        tsv,
        tmp_path / "o2",
        r"covost_v2\.fr_en\.dev\.tsv line 4: .*empty",
        media_root=tmp_path / "fr/clips",
    )


# --------------------------------------------------------------------------- Hugging Face datasets


def _hf_parquet(path: Path, table: pa.Table, features: dict) -> None:
    """A parquet file as the Hub publishes it: the ``datasets`` features in the schema's metadata."""
    meta = {b"huggingface": json.dumps({"info": {"features": features}}).encode()}
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table.replace_schema_metadata(meta), path)


def test_hf_parquet_vqa_and_speech(tmp_path):
    images = [_png(30), _jpg(31)]
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    vqa = pa.table({
        "image": pa.array([{"bytes": images[0], "path": "a.png"}, {"bytes": images[1], "path": None}], image_type),
        "question": ["What is it?", "And this?"],
        "answer": ["Noise.", "More noise."],
    })  # fmt: skip
    features = {"image": {"_type": "Image"}, "question": {"dtype": "string", "_type": "Value"},
                "answer": {"dtype": "string", "_type": "Value"}}  # fmt: skip
    _hf_parquet(tmp_path / "vqa/data/train-00000-of-00001.parquet", vqa, features)
    _hf_parquet(tmp_path / "vqa/data/test-00000-of-00001.parquet", vqa.slice(0, 1), features)
    samples = _pack("hf", tmp_path / "vqa", tmp_path / "out")
    assert len(samples) == 2
    assert samples[0]["messages"] == [
        _user(_image("0.png"), _text("What is it?")),
        {"role": "assistant", "content": "Noise."},
    ]
    assert samples[1]["messages"][0] == _user(_image("0.jpg"), _text("And this?"))
    assert [s["media"] for s in samples] == [{"0.png": images[0]}, {"0.jpg": images[1]}]

    wave = np.random.default_rng(4).uniform(-0.5, 0.5, 800).astype(np.float32)
    speech = pa.table(
        {"audio": [{"array": wave.tolist(), "sampling_rate": 16000}], "sentence": ["hello there"]}
    )
    pq.write_table(speech, tmp_path / "speech.parquet")
    (sample,) = _pack("hf", tmp_path / "speech.parquet", tmp_path / "out2")
    assert sample["messages"] == [
        _user({"type": "audio", "audio": "0.wav"}, _text("Repeat after me in English.")),
        {"role": "assistant", "content": "hello there"},
    ]
    decoded, rate = sf.read(io.BytesIO(sample["media"]["0.wav"]), dtype="int16")
    assert rate == 16000 and sf.info(io.BytesIO(sample["media"]["0.wav"])).subtype == "PCM_16"
    assert np.abs(decoded / 32768.0 - wave).max() <= 1 / 32768  # the array, quantised to 16 bits

    bad = pa.table({"image": pa.array([{"bytes": images[0], "path": "a.png"}, {"bytes": b"junk", "path": "b.png"}],
                                      image_type), "question": ["q", "q"], "answer": ["a", "a"]})  # fmt: skip
    _hf_parquet(tmp_path / "bad/train-00000-of-00001.parquet", bad, features)
    _refused("hf", tmp_path / "bad", tmp_path / "o3", r"train-00000-of-00001\.parquet row 1: image 0\.png")


def test_hf_save_to_disk_conversations(tmp_path):
    datasets = hf_datasets()  # the library, not this repository's datasets/ folder
    img = _png(40)
    ds = datasets.Dataset.from_dict({
        "conversations": [[{"from": "human", "value": "<image>\nColour?"}, {"from": "gpt", "value": "Grey."}],
                          [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": ""}]],
        "pictures": [[{"bytes": img, "path": None}], []],
    }, features=datasets.Features({
        "conversations": datasets.List({"from": datasets.Value("string"), "value": datasets.Value("string")}),
        "pictures": datasets.List(datasets.Image()),
    }))  # fmt: skip
    datasets.DatasetDict({"train": ds.select([0]), "validation": ds}).save_to_disk(tmp_path / "saved")
    (sample,) = _pack("hf", tmp_path / "saved", tmp_path / "out", columns={"images": "pictures"})
    assert sample["messages"] == [
        _user(_image("0.png"), _text("Colour?")),
        {"role": "assistant", "content": "Grey."},
    ]
    assert sample["media"] == {"0.png": img}
    _refused("hf", tmp_path / "saved", tmp_path / "o2", r"saved/validation row 1: .*empty", split="validation",
             columns={"images": "pictures"})  # fmt: skip


# --------------------------------------------------------------------------- webdataset (img2dataset)


def _img2dataset_output(folder: Path, captions: list[str | None]) -> list[bytes]:
    """``00000.tar`` as img2dataset writes it (jpg + txt + json per key) with its parquet and stats."""
    folder.mkdir(parents=True, exist_ok=True)
    images = []
    with tarfile.open(folder / "00000.tar", "w") as tar:
        for i, caption in enumerate(captions):
            key = f"{i:09d}"
            images.append(_jpg(50 + i))
            meta = {"url": f"http://x/{i}.jpg", "caption": caption, "key": key, "status": "success",
                    "error_message": None, "width": 16, "height": 16}  # fmt: skip
            for ext, data in (
                ("jpg", images[-1]),
                ("txt", (caption or "").encode()),
                ("json", json.dumps(meta).encode()),
            ):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    pq.write_table(pa.table({"key": [f"{i:09d}" for i in range(len(captions))]}), folder / "00000.parquet")
    (folder / "00000_stats.json").write_text(json.dumps({"count": len(captions)}))
    return images


def test_wds_repack_and_direct_read(tmp_path):
    captions = ["a red square", "two cats"]
    images = _img2dataset_output(tmp_path / "laion", captions)
    packed = _pack("wds", tmp_path / "laion", tmp_path / "out")
    direct = list(ShardStream(tmp_path / "laion", rank=0, world_size=1, shuffle_shards=False))
    assert len(packed) == len(direct) == 2
    for sample, caption, image in zip(packed, captions, images, strict=True):
        assert sample["messages"] == [_user(_image("0.jpg"), _text("Describe the image.")),
                                      {"role": "assistant", "content": caption}]  # fmt: skip
        assert sample["media"] == {"0.jpg": image} and sample["meta"]["status"] == "success"
    for sample, caption, image in zip(direct, captions, images, strict=True):
        assert sample["messages"] == [_user(_image("jpg"), _text("Describe the image.")),
                                      {"role": "assistant", "content": caption}]  # fmt: skip
        assert sample["media"] == {"jpg": image} and sample["meta"]["url"].endswith(".jpg")

    _img2dataset_output(tmp_path / "holes", ["ok", None, "fine"])
    stream = ShardStream(tmp_path / "holes", rank=0, world_size=1, shuffle_shards=False, max_bad_fraction=0.5)
    assert [s["messages"][1]["content"] for s in stream] == ["ok", "fine"]
    assert stream.counters.bad_by_reason == {"bad caption pair": 1} and stream.counters.seen == 3
    _refused("wds", tmp_path / "holes", tmp_path / "o2", r"00000\.tar key 000000001: no caption")


# --------------------------------------------------------------------------- API and CLI


def test_registry_and_options():
    assert set(IMPORTERS) == {
        "llava",
        "sharegpt",
        "hf",
        "video-qa",
        "librispeech",
        "commonvoice",
        "covost",
        "wds",
    }
    with pytest.raises(ValueError, match="unknown format 'coco'"):
        import_records("coco", "x")
    with pytest.raises(ValueError, match="takes no option"):
        import_records("llava", "x", split="dev")


def test_cli_pack_from_llava(tmp_path, capsys):
    from mm.cli import main

    path, images = _llava_fixture(tmp_path)
    out = tmp_path / "out"
    assert (
        main(
            ["data", "pack", "--from", "llava", str(path), str(out), "--media-root", str(tmp_path / "images")]
        )
        == 0
    )
    assert "wrote 4 samples" in capsys.readouterr().out
    samples = _read_back(out)
    assert samples[1]["media"] == {"0.png": images["ocr/a.png"], "1.png": images["ocr/b.png"]}
    path.write_text(json.dumps([{"id": 1, "conversations": "nope"}]))
    code = main(["data", "pack", "--from", "llava", str(path), str(tmp_path / "o2")])
    assert code == 2 and "record 0" in capsys.readouterr().err
    assert not (tmp_path / "o2").exists()
    assert main(["data", "pack", str(path), str(tmp_path / "o3"), "--split", "dev"]) == 2
    assert "needs --from" in capsys.readouterr().err
