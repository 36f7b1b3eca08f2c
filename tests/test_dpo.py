"""The ``dpo`` objective (mm.training.dpo): the loss against TRL's formula and hand-computed values,
answer log-probabilities against a manual gather, masking, the EMA and frozen references, gradients,
memory, and a DPO stage through the trainer that resumes exactly (tiny models, CPU)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from mm_testing import random_images

from mm import ModelConfig, MultimodalModel
from mm._values import ConfigValueError
from mm.datasets import ImageProcessor
from mm.datasets.preprocessing import Preprocessor
from mm.model.components import set_trainable
from mm.text_backbone import ByteTokenizer
from mm.training.data import collate_preferences
from mm.training.dpo import Dpo, DpoSettings, answer_logps, dpo_losses, special_token_ids

ANSWERS = [("a red square", "blue"), ("green", "it is a yellow circle"), ("two", "none at all")]


def tiny_model(seed=0):
    """The tiny preset with every cross-attention gate random (images change the answers)."""
    torch.manual_seed(seed)
    model = MultimodalModel(ModelConfig.preset("tiny"))
    with torch.no_grad():
        for block in model.image_blocks:
            block.attn_gate.uniform_(-1, 1)
            block.mlp_gate.uniform_(-1, 1)
    model.preprocessor = Preprocessor(ByteTokenizer(), ImageProcessor(tile_size=28, max_tiles=4))
    set_trainable(model, ["image_adapter"])
    return model


def records(n=3, seed=0):
    images = random_images([(28 + 3 * i, 28 + 5 * (i % 2)) for i in range(n)], seed=seed)
    out = []
    for i, image in enumerate(images):
        chosen, rejected = ANSWERS[i % len(ANSWERS)]
        prompt = [
            {
                "role": "user",
                "content": [{"type": "image", "image": image}, {"type": "text", "text": "What?"}],
            }
        ]
        out.append({"messages": prompt, "chosen": chosen, "rejected": rejected})
    return out


def preference_batch(model, n=3, seed=0):
    pre = model.preprocessor
    samples = [pre.encode_preference(r["messages"], r) for r in records(n, seed)]
    return collate_preferences(pre, samples)


def perturb_trainable(model, scale=0.05, seed=1):
    """Move the learning parameters as training would (the policy leaves its reference)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * scale)


def manual_logps(model, inputs, special=()):
    """:func:`gather_logps` of ``model``'s full logits for ``inputs``."""
    kwargs = {k: v for k, v in inputs.items() if k != "labels"}
    with torch.no_grad():
        logp = torch.log_softmax(model(**kwargs).logits.float(), dim=-1)
    return gather_logps(logp, inputs["labels"], special)


def gather_logps(logp, labels, special=()):
    """Summed log-probabilities of the labelled tokens, row by row, in Python: (all labelled tokens,
    labelled tokens not in ``special``, count); position ``t - 1`` predicts ``labels[t]``."""
    total, kept, count = [], [], []
    for row in range(labels.shape[0]):
        t_sum = k_sum = 0.0
        n = 0
        for t in range(1, labels.shape[1]):
            target = int(labels[row, t])
            if target == -100:
                continue
            value = float(logp[row, t - 1, target])
            t_sum += value
            n += 1
            if target not in special:
                k_sum += value
        total.append(t_sum)
        kept.append(k_sum)
        count.append(n)
    return torch.tensor(total), torch.tensor(kept), torch.tensor(count, dtype=torch.float32)


def trl_dpo_loss(
    policy_chosen, policy_rejected, reference_chosen, reference_rejected, beta, label_smoothing=0.0
):
    """TRL's ``DPOTrainer.dpo_loss`` for ``loss_type="sigmoid"``, written out
    (trl/trainer/dpo_trainer.py: ``logits = (chosen_logratios - rejected_logratios)``;
    ``losses = -F.logsigmoid(beta * logits) * (1 - label_smoothing) - F.logsigmoid(-beta * logits) *
    label_smoothing``; ``chosen_rewards = beta * (chosen_logps - ref_chosen_logps).detach()``)."""
    chosen_logratios = policy_chosen - reference_chosen
    rejected_logratios = policy_rejected - reference_rejected
    logits = chosen_logratios - rejected_logratios
    losses = (
        -F.logsigmoid(beta * logits) * (1 - label_smoothing) - F.logsigmoid(-beta * logits) * label_smoothing
    )
    return losses, beta * chosen_logratios, beta * rejected_logratios


# ---------------------------------------------------------------------- the loss
def test_loss_matches_trl_sigmoid_formula_on_random_logps():
    g = torch.Generator().manual_seed(3)
    pc, pr, rc, rr = (-50 * torch.rand(64, generator=g, dtype=torch.float64) for _ in range(4))
    for beta in (0.1, 0.5, 2.0):
        ours = dpo_losses(pc, pr, rc, rr, beta)
        theirs = trl_dpo_loss(pc, pr, rc, rr, beta)
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_loss_hand_computed():
    # logit = 0.1 * ((-3 - -4) - (-5 - -4.5)) = 0.1 * 1.5 = 0.15; loss = ln(1 + e^-0.15).
    loss, chosen, rejected = dpo_losses(
        torch.tensor([-3.0]), torch.tensor([-5.0]), torch.tensor([-4.0]), torch.tensor([-4.5]), 0.1
    )
    assert loss.item() == pytest.approx(0.6209570477895321, abs=1e-6)
    assert chosen.item() == pytest.approx(0.1) and rejected.item() == pytest.approx(-0.05)
    # Policy equal to its reference: the logit is 0 and the loss is ln 2 for every pair.
    same = torch.tensor([-7.0, -1.0])
    assert dpo_losses(same, same * 3, same, same * 3, 0.1)[0].tolist() == pytest.approx([math.log(2)] * 2)


def test_settings_are_checked_and_defaults_are_the_papers():
    s = DpoSettings()
    assert (s.beta, s.nll_weight, s.mask_special_tokens, s.reference) == (0.1, 0.2, True, "ema")
    for bad, key in [
        ({"beta": 0}, "beta"),
        ({"reference": "moving"}, "reference"),
        ({"ema_decay": 1.5}, "ema_decay"),
        ({"ema_every": 0}, "ema_every"),
        ({"nll_weight": -0.1}, "nll_weight"),
        ({"mask_special_tokens": 1}, "mask_special_tokens"),
    ]:
        with pytest.raises(ConfigValueError, match=key):
            DpoSettings(**bad)


# ---------------------------------------------------------------------- log-probabilities and masking
def test_answer_logps_equal_a_manual_gather_and_masking_drops_exactly_the_special_tokens():
    model = tiny_model()
    batch = preference_batch(model)
    tok = model.preprocessor.tokenizer
    special = special_token_ids(tok)
    assert tok.eot_id in special.tolist() and tok.special_id("<|image|>") in special.tolist()
    assert all(tok.is_special(i) for i in special.tolist())
    for side in ("chosen", "rejected"):
        inputs = batch[side]
        labels = inputs["labels"]
        with torch.no_grad():
            out = model(**{k: v for k, v in inputs.items() if k != "labels"})
            got = answer_logps(out, labels, special)  # projects the labelled positions only
            plain = answer_logps(out, labels, None)
            logp = torch.log_softmax(out.logits.float(), -1)  # [b, s, V], the full projection
        total, kept, count = gather_logps(logp, labels, set(special.tolist()))
        torch.testing.assert_close(got.total, total, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(got.dpo, kept, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(got.count, count)
        torch.testing.assert_close(plain.dpo, plain.total)
        torch.testing.assert_close(plain.total, got.total)
        # Each answer ends with one <|eot_id|>, its only special token: masking removes exactly it.
        assert ((labels == tok.eot_id).sum(1) == 1).all()
        assert (got.dpo != got.total).all()
        for row in range(labels.shape[0]):
            t = int((labels[row] == tok.eot_id).nonzero()[0, 0])
            eot = float(logp[row, t - 1, tok.eot_id])
            assert float(got.total[row] - got.dpo[row]) == pytest.approx(eot, abs=1e-4)


def test_masking_needs_the_tokenizer():
    model = tiny_model()
    model.preprocessor = None
    with pytest.raises(ValueError, match="mask_special_tokens needs the model's tokenizer"):
        Dpo(model)
    Dpo(model, DpoSettings(mask_special_tokens=False))


@pytest.mark.parametrize("mask", [True, False])
def test_loss_sum_equals_dpo_with_an_explicit_second_model_plus_nll(mask):
    model = tiny_model()
    batch = preference_batch(model)
    s = DpoSettings(beta=0.3, nll_weight=0.2, mask_special_tokens=mask, reference="frozen")
    objective = Dpo(model, s)
    reference_model = copy.deepcopy(model)  # the policy at the start: the frozen reference
    objective.reference_tensors(model)
    perturb_trainable(model)  # the policy has learned since
    got = objective.loss_sum(model, batch, seed=0)
    special = set(special_token_ids(model.preprocessor.tokenizer).tolist()) if mask else set()
    pc_all, pc, count = manual_logps(model, batch["chosen"], special)
    _, pr, _ = manual_logps(model, batch["rejected"], special)
    _, rc, _ = manual_logps(reference_model, batch["chosen"], special)
    _, rr, _ = manual_logps(reference_model, batch["rejected"], special)
    logits = s.beta * ((pc - rc) - (pr - rr))
    assert (logits.abs() > 1e-3).all()  # the reference really differs from the policy
    expected = (-F.logsigmoid(logits) + s.nll_weight * (-pc_all / count)).sum()
    torch.testing.assert_close(got.detach(), expected, rtol=1e-5, atol=1e-4)
    assert objective.weight(batch) == 3
    metrics = objective.pop_metrics()
    assert metrics["reward_margin"] == pytest.approx(float((logits).mean()), abs=1e-4)
    assert metrics["reward_accuracy"] == pytest.approx(float((logits > 0).float().mean()))
    assert metrics["rewards_chosen"] == pytest.approx(float(s.beta * (pc - rc).mean()), abs=1e-4)
    assert objective.pop_metrics() == {}


# ---------------------------------------------------------------------- gradients and memory
def test_gradients_only_on_trainable_parameters_and_backbone_bit_exact():
    model = tiny_model()
    batch = preference_batch(model)
    objective = Dpo(model, DpoSettings(reference="ema", ema_every=1, ema_decay=0.5))
    backbone = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    ids = torch.tensor([[1, 5, 9, 33, 70, 101]])
    with torch.no_grad():
        text_before = model.backbone(ids).clone()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    for step in range(1, 3):
        loss = objective.loss_sum(model, batch, seed=0)
        loss.backward()
        for name, p in model.named_parameters():
            if p.requires_grad:
                assert p.grad is not None and torch.isfinite(p.grad).all(), name
            else:
                assert p.grad is None, name
        assert sum(int((p.grad != 0).sum()) for p in trainable) > 0.5 * sum(p.numel() for p in trainable)
        assert all(b.grad is None for b in objective.buffers())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        objective.after_step(model, step)
    for k, v in model.backbone.state_dict().items():
        assert torch.equal(v, backbone[k]), k
    with torch.no_grad():  # the promise: a text-only prompt gives the backbone's logits bit for bit
        assert torch.equal(model(input_ids=ids).logits, model.backbone(ids))
        assert torch.equal(model.backbone(ids), text_before)


def test_the_reference_holds_only_the_learning_parameters():
    model = tiny_model()
    objective = Dpo(model)
    objective.loss_sum(model, preference_batch(model, n=2), seed=0)
    reference = dict(objective.reference.named_buffers())
    learning = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert reference.keys() == learning.keys()
    assert not any(n.startswith(("backbone.", "image_encoder.")) for n in reference)
    assert sum(t.numel() for t in reference.values()) == sum(p.numel() for p in learning.values())
    assert list(objective.parameters()) == []
    saved = [k for k in objective.state_dict() if not k.startswith("reference.")]
    assert saved == []  # only the reference is checkpointed (the special ids are rebuilt)
    model_storage = {p.untyped_storage().data_ptr() for p in model.parameters()}
    assert not model_storage & {t.untyped_storage().data_ptr() for t in reference.values()}
    backbone_numel = sum(p.numel() for p in model.backbone.parameters())
    assert sum(t.numel() for t in objective.buffers()) < backbone_numel / 2


def test_a_stage_without_learning_parameters_is_refused():
    model = tiny_model()
    set_trainable(model, ())
    with pytest.raises(ValueError, match="needs parameters that learn"):
        Dpo(model).loss_sum(model, preference_batch(model, n=1), seed=0)


# ---------------------------------------------------------------------- the references
def test_ema_update_rule_every_k_steps():
    model = tiny_model()
    decay, every = 0.75, 3
    objective = Dpo(model, DpoSettings(reference="ema", ema_decay=decay, ema_every=every))
    learning = {n: p for n, p in model.named_parameters() if p.requires_grad}
    expected = {n: p.detach().double().clone() for n, p in learning.items()}
    objective.reference_tensors(model)
    g = torch.Generator().manual_seed(7)
    for step in range(1, 8):
        with torch.no_grad():
            for p in learning.values():
                p.copy_(torch.randn(p.shape, generator=g))
        before = {n: t.clone() for n, t in objective.reference.named_buffers()}
        objective.after_step(model, step)
        now = dict(objective.reference.named_buffers())
        if step % every:
            assert all(torch.equal(now[n], before[n]) for n in now), step  # nothing between refreshes
            continue
        for n, p in learning.items():
            expected[n] = decay * expected[n] + (1 - decay) * p.detach().double()
            torch.testing.assert_close(now[n].double(), expected[n], rtol=1e-6, atol=1e-6)
            assert not torch.equal(now[n], before[n])


def test_frozen_reference_never_changes_while_the_policy_learns():
    model = tiny_model()
    batch = preference_batch(model, n=2)
    objective = Dpo(model, DpoSettings(reference="frozen", ema_every=1))
    start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for step in range(1, 4):
        loss = objective.loss_sum(model, batch, seed=0)
        losses.append(loss.item())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        objective.after_step(model, step)
    reference = dict(objective.reference.named_buffers())
    assert reference.keys() == start.keys()
    assert all(torch.equal(reference[n], start[n]) for n in start)
    assert any(not torch.equal(p, start[n]) for n, p in model.named_parameters() if p.requires_grad)
    assert losses[-1] < losses[0]


def test_reference_round_trips_through_a_state_dict():
    model = tiny_model()
    settings = DpoSettings(reference="ema", ema_every=1, ema_decay=0.5)
    a = Dpo(model, settings)
    a.reference_tensors(model)
    perturb_trainable(model)
    a.after_step(model, 1)
    state = {k: v.clone() for k, v in a.state_dict().items()}
    b = Dpo(model, settings)
    missing, unexpected = b.load_state_dict(state, strict=True)
    assert not missing and not unexpected
    ref_a, ref_b = a.reference_tensors(model), b.reference_tensors(model)
    assert ref_a.keys() == ref_b.keys() and all(torch.equal(ref_a[n], ref_b[n]) for n in ref_a)
    set_trainable(model, ["image_adapter", "image_encoder"])  # another stage's learning set
    with pytest.raises(ValueError, match="does not fit the parameters that learn"):
        b.reference_tensors(model)


# ---------------------------------------------------------------------- through the trainer
def dpo_recipe(steps=3):
    from mm.training.recipe import parse_recipe

    stage = {
        "name": "dpo",
        "objective": "dpo",
        "dpo": {"beta": 0.5, "reference": "ema", "ema_decay": 0.5, "ema_every": 1},
        "trainable": ["image_adapter"],
        "data": {"shards": "in-memory"},
        "optimizer": {"lr": 1e-2, "weight_decay": 0.0},
        "schedule": {"warmup_steps": 1},
        "steps": steps,
        "batch_size": 1,
        "save_every": 1,
        "keep_last": 5,
        "image": {"tile_size": 28, "max_tiles": 4},
        "log_every": 1,
    }
    return parse_recipe({"name": "t", "model": {"preset": "tiny", "tokenizer": "byte"}, "stages": [stage]})


class Interrupted(Exception):
    pass


def test_dpo_stage_through_the_trainer_resumes_to_identical_adapters_and_reference(tmp_path):
    from mm.training.metrics import read_metrics
    from mm.training.state import latest_checkpoint, load_train_state
    from mm.training.trainer import Trainer

    data = {"dpo": records(4)}
    full = Trainer(dpo_recipe(), output_dir=tmp_path / "full", data=data, progress=False).run()[0]
    assert len(full.losses) == 3 and all(math.isfinite(x) for x in full.losses)

    def stop_after_two(model, step, metrics):
        if step == 2:  # before step 2's checkpoint: the resume starts from step 1's
            raise Interrupted

    killed = tmp_path / "killed"
    with pytest.raises(Interrupted):
        Trainer(dpo_recipe(), output_dir=killed, data=data, progress=False, callbacks=[stop_after_two]).run()
    assert not (killed / "dpo" / "model").exists()
    Trainer(dpo_recipe(), output_dir=killed, data=data, progress=False).run(resume=True)

    a = load_train_state(latest_checkpoint(tmp_path / "full" / "dpo" / "checkpoints"), None)["adapters"]
    b = load_train_state(latest_checkpoint(killed / "dpo" / "checkpoints"), None)["adapters"]
    reference = [k for k in a if k.startswith("objective.reference.")]
    learning = {k.removeprefix("objective.reference.") for k in reference}
    assert learning and all(k in a for k in learning) and a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # The EMA reference moved (decay 0.5 every step) but is not the policy.
    first = load_train_state(tmp_path / "full" / "dpo" / "checkpoints" / "step-00000001", None)["adapters"]
    assert any(not torch.equal(first[k], a[k]) for k in reference)
    assert any(not torch.equal(a["objective.reference." + k], a[k]) for k in learning)
    losses_full = [r["loss"] for r in read_metrics(tmp_path / "full" / "dpo" / "metrics.jsonl")]
    losses_resumed = [r["loss"] for r in read_metrics(killed / "dpo" / "metrics.jsonl")]
    assert losses_full == losses_resumed
