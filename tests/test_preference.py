"""Preference samples (Llama 3 section 7.5): packing, stage data, the reward model and its stage."""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest
import torch
from mm_testing import COLOURS
from PIL import Image

from mm import ModelConfig, MultimodalModel
from mm.datasets import pack
from mm.datasets.image_processing import ImageProcessor
from mm.datasets.preprocessing import Preprocessor
from mm.datasets.shards import PackError
from mm.datasets.webdata import DataError
from mm.model.components import set_trainable
from mm.model.reward import attach_reward_head
from mm.text_backbone import ByteTokenizer
from mm.training.data import StageData
from mm.training.metrics import read_metrics
from mm.training.recipe import parse_recipe
from mm.training.reward import Reward, RewardSettings, pairwise_loss, ranking_accuracy
from mm.training.trainer import Trainer

NAMES = list(COLOURS)


def _png(name: str, width: int = 30) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, 28), COLOURS[name]).save(buf, format="PNG")
    return buf.getvalue()


def preference_records(n: int, seed: int = 0, edited_every: int = 2) -> list[dict]:
    """In-memory preference samples: a coloured image, the right colour chosen, a wrong one rejected,
    and on every ``edited_every``-th sample an edited answer ("It is <colour>.")."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        right = NAMES[int(rng.integers(len(NAMES)))]
        wrong = NAMES[(NAMES.index(right) + 1 + int(rng.integers(len(NAMES) - 1))) % len(NAMES)]
        image = Image.new("RGB", (28 + int(rng.integers(0, 20)), 28), COLOURS[right])
        record = {
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "image", "image": image}, {"type": "text", "text": "Colour?"}],
                }
            ],
            "chosen": right,
            "rejected": wrong,
        }
        if edited_every and i % edited_every == 0:
            record["edited"] = f"It is {right}."
        out.append(record)
    return out


def write_preference_manifest(folder, n: int, seed: int = 0) -> tuple:
    """The records as a JSONL manifest with PNG files beside it."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, record in enumerate(preference_records(n, seed)):
        (folder / f"{i}.png").write_bytes(_png(record["chosen"]))
        record["messages"][0]["content"][0]["image"] = f"{i}.png"
        lines.append(json.dumps({"key": f"p{i:04d}", **record}))
    manifest = folder / "prefs.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


def _preprocessor() -> Preprocessor:
    return Preprocessor(ByteTokenizer(), ImageProcessor(tile_size=28, max_tiles=4))


def _tiny_model(seed: int = 0) -> MultimodalModel:
    torch.manual_seed(seed)
    model = MultimodalModel(ModelConfig.preset("tiny"))
    for name, p in model.named_parameters():  # every gate open, random: nothing hides behind a zero
        if name.endswith("_gate"):
            torch.nn.init.uniform_(p, -0.8, 0.8)
    model.preprocessor = _preprocessor()
    return model


def _shard_records(shards) -> list[dict]:
    from mm.datasets.webdata import read_shard

    out = []
    for tar in sorted(shards.glob("*.tar")):
        for _key, fields, _ in read_shard(str(tar), None):
            out.append(json.loads(fields["json"]))
    return out


# ---------------------------------------------------------------------- packing
def test_pack_preference_manifest_and_folder_keep_the_answers(tmp_path):
    manifest = write_preference_manifest(tmp_path / "m", 4)
    pack(manifest, tmp_path / "out_m")
    got = _shard_records(tmp_path / "out_m")
    want = [json.loads(line) for line in manifest.read_text().splitlines()]
    assert [(g["chosen"], g["rejected"], g.get("edited")) for g in got] == [
        (w["chosen"], w["rejected"], w.get("edited")) for w in want
    ]
    assert got[0]["messages"][0]["content"][0] == {"type": "image", "image": "0.png"}

    folder = tmp_path / "f"
    folder.mkdir()
    (folder / "a.png").write_bytes(_png("red"))
    msg = [
        {
            "role": "user",
            "content": [{"type": "image", "image": "a.png"}, {"type": "text", "text": "Colour?"}],
        }
    ]
    (folder / "a.json").write_text(
        json.dumps({"messages": msg, "chosen": "red", "rejected": "blue", "edited": "Red."})
    )
    pack(folder, tmp_path / "out_f")
    (rec,) = _shard_records(tmp_path / "out_f")
    assert (rec["chosen"], rec["rejected"], rec["edited"]) == ("red", "blue", "Red.")


USER = {"role": "user", "content": "Which colour?"}


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"messages": [USER], "chosen": "red"}, "needs 'rejected'"),
        ({"messages": [USER], "chosen": "red", "rejected": "red"}, "'chosen' and 'rejected' are the same"),
        ({"messages": [USER], "chosen": "red", "rejected": "blue", "edited": "red"}, "are the same answer"),
        ({"messages": [USER], "chosen": " ", "rejected": "blue"}, "'chosen' must be a non-empty string"),
        ({"messages": [USER], "chosen": 3, "rejected": "blue"}, "'chosen' must be a non-empty string"),
        (
            {"messages": [USER, {"role": "assistant", "content": "x"}], "chosen": "a", "rejected": "b"},
            "must end with a user turn",
        ),
        ({"chosen": "a", "rejected": "b"}, "needs 'messages'"),
        ({"messages": [USER], "chosen": "a", "rejected": "b", "best": "c"}, "unknown keys ['best']"),
    ],
)
def test_bad_preference_records_are_refused_naming_file_and_line(tmp_path, record, message):
    good = {"messages": [USER], "chosen": "red", "rejected": "blue"}
    manifest = tmp_path / "prefs.jsonl"
    manifest.write_text(json.dumps(good) + "\n" + json.dumps(record) + "\n")
    with pytest.raises(PackError, match="prefs.jsonl line 2") as info:
        pack(manifest, tmp_path / "out")
    assert message in str(info.value)
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").glob("*.tar"))
    # The same record as a folder sample names the file.
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "b.json").write_text(json.dumps({k: v for k, v in record.items() if k != "key"}))
    with pytest.raises(PackError, match=r"b\.json") as info:
        pack(folder, tmp_path / "out2")
    assert message in str(info.value)


# ---------------------------------------------------------------------- stage data
def _decode(ids):
    return bytes(i for i in ids if i < 256).decode("utf-8", "replace")


def test_collated_batch_labels_only_the_answers_and_rows_align():
    pre = _preprocessor()
    records = preference_records(3, seed=1, edited_every=2)  # samples 0 and 2 have an edited answer
    for i, record in enumerate(records):  # answers that name their sample
        for name in ("chosen", "rejected", "edited"):
            if name in record:
                record[name] = f"{record[name]} #{i}"
    records[1]["messages"] = [
        {"role": "user", "content": "Say a colour."},
        {"role": "assistant", "content": "green"},  # an earlier turn: context, never labelled
        records[1]["messages"][0],
    ]
    batch = StageData(records, pre, batch_size=3, seed=0, preference=True).next_batch()
    assert set(batch) == {"chosen", "rejected", "edited", "edited_mask"}
    eot = "<|eot_id|>"
    seen = set()
    for i in range(3):
        c = batch["chosen"]
        answer = pre.tokenizer.decode(c["input_ids"][i][c["labels"][i] != -100].tolist())
        k = int(answer.split("#")[1].split(eot)[0])  # the sample this row holds
        seen.add(k)
        record = records[k]
        assert bool(batch["edited_mask"][i]) == ("edited" in record)
        for name in ("chosen", "rejected", "edited"):
            inputs = batch[name]
            ids, labels, mask = inputs["input_ids"][i], inputs["labels"][i], inputs["attention_mask"][i]
            labelled = labels != -100
            assert torch.equal(labels[labelled], ids[labelled])
            # The labelled tokens are the answer and its end-of-turn token: the row's last real tokens.
            assert int(labelled.nonzero().max()) == int(mask.sum()) - 1
            assert int(labelled.sum()) == len(pre.tokenizer.encode(record.get(name, record["chosen"]))) + 1
            expected = record[name] if name in record else record["chosen"]  # no edited: chosen's copy
            assert pre.tokenizer.decode(ids[labelled].tolist()) == expected + eot, name
        # The same prompt and image in every dict of the row.
        start = int((c["labels"][i] != -100).nonzero().min())
        for name in ("rejected", "edited"):
            assert torch.equal(c["input_ids"][i][:start], batch[name]["input_ids"][i][:start])
            assert torch.equal(c["pixel_values"][i], batch[name]["pixel_values"][i])
            assert torch.equal(
                c["cross_attention_mask"][i][:start], batch[name]["cross_attention_mask"][i][:start]
            )
    assert seen == {0, 1, 2}


def test_a_preference_stage_takes_only_preference_samples():
    pre = _preprocessor()
    mixed = [*preference_records(1), [USER, {"role": "assistant", "content": "red"}]]
    data = StageData(mixed, pre, batch_size=2, seed=0, preference=True)
    with pytest.raises(DataError, match="takes only preference samples"):
        data.next_batch()
    data = StageData(preference_records(2), pre, batch_size=2, seed=0, preference=False)
    with pytest.raises(DataError, match="preference sample in a stage"):
        data.next_batch()


# ---------------------------------------------------------------------- the loss
def test_pairwise_loss_equals_the_hand_computed_value():
    rewards = {
        "chosen": torch.tensor([1.0, 0.5]),
        "rejected": torch.tensor([-1.0, 1.5]),
        "edited": torch.tensor([2.0, 9.0]),  # row 1 has no edited answer: ignored
    }
    mask = torch.tensor([True, False])

    def nls(x):  # -log sigmoid(x)
        return math.log1p(math.exp(-x))

    row0 = (nls(1.0 - -1.0) + nls(2.0 - 1.0) + nls(2.0 - -1.0)) / 3 + 0.1 * (1 + 1 + 4) / 3
    row1 = nls(0.5 - 1.5) + 0.1 * (0.25 + 2.25) / 2
    got = pairwise_loss(rewards, mask, square_weight=0.1)
    assert torch.allclose(got, torch.tensor([row0, row1]), atol=1e-6)
    assert ranking_accuracy(rewards, mask) == (3, 4)
    no_edit = pairwise_loss({"chosen": torch.tensor([0.0]), "rejected": torch.tensor([0.0])})
    assert torch.allclose(no_edit, torch.tensor([math.log(2.0)]))


def test_reward_gradients_reach_only_trainable_parameters_and_text_logits_stay_exact():
    model = _tiny_model()
    ids = torch.randint(0, 256, (2, 11))
    with torch.no_grad():
        before = model.backbone(ids)
    objective = Reward(model, RewardSettings(square_weight=0.01))
    assert model.reward_head is not None and model.config.reward_head
    set_trainable(model, ["image_adapter", "reward_head"])
    batch = StageData(
        preference_records(4), model.preprocessor, batch_size=4, seed=0, preference=True
    ).next_batch()
    loss = objective.loss_sum(model, batch, seed=0)
    loss.backward()
    for name, p in model.named_parameters():
        trainable = name.startswith(("projector", "image_blocks", "extra_embeddings", "reward_head"))
        assert p.requires_grad == trainable, name
        if not trainable:
            assert p.grad is None, name
    assert model.reward_head.weight.grad.abs().sum() > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.image_blocks.parameters())
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)
        assert torch.equal(model(ids).logits, model.backbone(ids))
    # The objective's loss is the hand formula on the rewards the model gives.
    with torch.no_grad():
        r = objective.rewards(model, batch)
        expected = pairwise_loss(r, batch["edited_mask"], 0.01).sum()
        assert torch.allclose(objective.loss_sum(model, batch, seed=0), expected)


def test_score_equals_score_batch_and_the_head_is_saved(tmp_path):
    model = _tiny_model(seed=2)
    attach_reward_head(model)
    torch.nn.init.normal_(model.reward_head.weight)
    records = preference_records(3, seed=4)
    convs = [r["messages"] + [{"role": "assistant", "content": r["chosen"]}] for r in records]
    convs.append([USER, {"role": "assistant", "content": "a much longer answer than the others"}])
    batched = model.score_batch(convs)
    single = [model.score(c) for c in convs]
    assert np.allclose(batched, single, atol=1e-5), (batched, single)
    assert len(set(round(s, 4) for s in single)) > 1
    model.save_pretrained(tmp_path / "rm", copy_backbone=True)
    loaded = MultimodalModel.from_pretrained(tmp_path / "rm")
    assert loaded.config.reward_head
    assert torch.equal(loaded.reward_head.weight, model.reward_head.weight)
    assert np.allclose(loaded.score_batch(convs), batched, atol=1e-6)
    with pytest.raises(ValueError, match="must end with the assistant answer"):
        model.score([USER])
    # Without a head a model cannot score, and its config never mentions one.
    plain = _tiny_model()
    assert "reward_head" not in plain.config.to_dict()
    with pytest.raises(ValueError, match="no reward head"):
        plain.score(convs[0])


# ---------------------------------------------------------------------- the stage
def _reward_recipe(heldout, steps=4, save_every=2):
    stage = {
        "name": "rm",
        "objective": "reward",
        "reward": {"square_weight": 0.01, "heldout": str(heldout), "heldout_batch_size": 3},
        "trainable": ["image_adapter", "reward_head"],
        "data": {"shards": "in-memory"},
        "optimizer": {"lr": 3e-3},
        "steps": steps,
        "batch_size": 2,
        "image": {"tile_size": 28, "max_tiles": 2},
        "log_every": 1,
        "save_every": save_every,
    }
    return parse_recipe(
        {"name": "r", "seed": 1, "model": {"preset": "tiny", "tokenizer": "byte"}, "stages": [stage]}
    )


class _Interrupt(Exception):
    pass


def test_reward_stage_resumes_exactly_and_reports_heldout_accuracy(tmp_path):
    manifest = write_preference_manifest(tmp_path / "heldout_src", 5, seed=9)
    pack(manifest, tmp_path / "heldout")
    recipe = _reward_recipe(tmp_path / "heldout")
    data = {"rm": preference_records(8, seed=3)}
    (full,) = Trainer(recipe, output_dir=tmp_path / "full", data=data, progress=False).run()

    def stop(model, step, metrics):
        if step == 3:  # after the step-2 checkpoint: step 3's work is lost, as in a kill
            raise _Interrupt

    with pytest.raises(_Interrupt):
        Trainer(recipe, output_dir=tmp_path / "cut", data=data, progress=False, callbacks=[stop]).run()
    assert not (tmp_path / "cut" / "rm" / "model").exists()
    Trainer(recipe, output_dir=tmp_path / "cut", data=data, progress=False).run(resume=True)

    a = MultimodalModel.from_pretrained(tmp_path / "full" / "rm" / "model")
    b = MultimodalModel.from_pretrained(tmp_path / "cut" / "rm" / "model")
    sa, sb = a.adapter_state_dict(), b.adapter_state_dict()
    assert "reward_head.weight" in sa and sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    losses = [r["loss"] for r in read_metrics(tmp_path / "full" / "rm" / "metrics.jsonl")]
    assert losses == [r["loss"] for r in read_metrics(tmp_path / "cut" / "rm" / "metrics.jsonl")]
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses)

    summary = json.loads((tmp_path / "full" / "rm" / "summary.json").read_text())
    # 5 held-out samples: 5 chosen > rejected pairs and 2 pairs for each of the 3 edited answers.
    assert summary["eval"]["heldout_pairs"] == 11
    accuracy = summary["eval"]["heldout_accuracy"]
    records = _shard_records(tmp_path / "heldout")
    convs = {
        name: [r["messages"] for r in records]  # scored below with the trained model
        for name in ("chosen",)
    }
    assert convs
    # Recompute the accuracy by hand with score(): the reported figure is the model's.
    right = total = 0
    for i, r in enumerate(records):
        image = Image.open(tmp_path / "heldout_src" / f"{i}.png")
        prompt = [
            {
                "role": "user",
                "content": [{"type": "image", "image": image}, {"type": "text", "text": "Colour?"}],
            }
        ]
        s = {
            k: a.score([*prompt, {"role": "assistant", "content": r[k]}])
            for k in ("chosen", "rejected", "edited")
            if k in r
        }
        pairs = [("chosen", "rejected")] + (
            [("edited", "chosen"), ("edited", "rejected")] if "edited" in s else []
        )
        right += sum(s[x] > s[y] for x, y in pairs)
        total += len(pairs)
    assert total == 11 and accuracy == pytest.approx(right / total)
    # The backbone is untouched: text-only logits of the trained reward model are the backbone's.
    ids = torch.randint(0, 256, (2, 9))
    with torch.no_grad():
        assert torch.equal(a(ids).logits, a.backbone(ids))
