"""The staged trainer (Llama 3 paper, sections 7.4 and 8.2), on ``accelerate``.

One process, or many under ``torchrun`` / ``accelerate launch`` with DDP (default) or FSDP2. Each
stage:

1. takes its model (the previous stage's, a checkpoint, or a backbone hot-swap) and records the
   backbone's digest;
2. sets ``requires_grad`` from the stage's ``trainable`` components (one function, every
   parameter) — frozen parameters get no gradients and no optimiser state;
3. trains with AdamW, warm-up + cosine, gradient accumulation and clipping, fp32 or bf16 autocast,
   optional activation checkpointing of backbone layers; the loss is normalised by the number of
   labelled tokens of the whole global batch, so N processes give the losses one process gives;
4. before writing anything, recomputes the backbone digest: if it changed, the stage fails loudly
   and writes no checkpoint;
5. writes checkpoints that resume exactly, metrics (JSONL, TensorBoard, ``loss.png``) and the final
   model folder (adapters only; the backbone is referred to by path and digest).

FSDP2 (``fsdp=True`` on several processes) shards with ``torch.distributed.fsdp.fully_shard``, one
unit per

* backbone decoder layer — frozen, but the bulk of the memory: each rank keeps ``1/N`` of it and
  gathers one layer at a time, in the forward and again in the backward (gradients flow *through*
  the frozen layers to earlier adapters);
* image-encoder layer (local and global), and the image encoder itself (patch and position
  embeddings, norms);
* image cross-attention block; its ``project_kv`` runs outside its ``forward`` (vision keys/values
  are computed once, before the layer loop) and is registered as an FSDP forward method;
* and the root: everything left — token embeddings, final norm and output head (``prepare`` and
  ``head`` are called on the backbone, outside any unit but inside the root's forward), placeholder
  embeddings and the projector.

Gradients are reduce-scattered as averages, as DDP all-reduces them, so the same loss scaling gives
the same update; clipping takes the global norm over the sharded gradients. Each rank must call the
same units in the same order: for a micro-batch in which some rank has images, ranks without any run
the image path on a row that sees no image (see ``MultimodalModel.run_media_path``). The backbone
digest, checkpoints and the final model gather whole tensors on every rank (collectives) and rank 0
writes the same files a single process writes; resuming cuts them back into shards. A sharded stage
ends by gathering the whole model into a plain copy on the CPU of every rank, which it returns (and
the next stage shards again).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import json
import logging
import math
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from mm._io import atomic_write_json
from mm.datasets.preprocessing import AudioTokens, Preprocessor
from mm.encoders import ImageEncoder, resize_image_encoder
from mm.model.components import set_trainable
from mm.model.config import ModelConfig
from mm.model.multimodal import MultimodalModel
from mm.text_backbone import ByteTokenizer, TextBackbone, load_tokenizer
from mm.training.data import StageData
from mm.training.metrics import MetricsLog
from mm.training.objectives import attach_objective, batch_weight, detach_objective, objective_loss_sum
from mm.training.recipe import Recipe, RecipeError, Stage
from mm.training.state import (
    full_optimizer_state,
    full_tensors,
    latest_checkpoint,
    load_optimizer_state,
    load_train_state,
    prune_checkpoints,
    save_train_state,
    shard_like,
)

__all__ = ["BackboneChanged", "StageResult", "Trainer", "shard_model", "stage_preprocessor"]

logger = logging.getLogger(__name__)


class BackboneChanged(RuntimeError):
    """The backbone's weights changed during a stage: mm's promise is broken, nothing is written."""


@dataclass
class StageResult:
    """What a finished stage reports (also written to ``STAGE/summary.json``)."""

    name: str
    steps: int
    seconds: float
    final_loss: float | None
    model_dir: str
    backbone_digest: str
    losses: list[float] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "steps": self.steps,
            "seconds": round(self.seconds, 2),
            "final_loss": self.final_loss,
            "model_dir": self.model_dir,
            "backbone_digest": self.backbone_digest,
        }


def lr_factor(step: int, *, steps: int, warmup: int, min_ratio: float) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to ``min_ratio`` at ``steps``."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _param_groups(model: torch.nn.Module, weight_decay: float, lr: float, lr_scale: Mapping[str, float]):
    """AdamW groups: matrices decay, norms/biases/gates/embedding rows do not; ``lr_scale`` by glob."""
    groups: dict[tuple[float, float], list[torch.nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = weight_decay if p.ndim >= 2 and "embed" not in name else 0.0
        scale = next((float(f) for pat, f in lr_scale.items() if fnmatch.fnmatch(name, pat)), 1.0)
        groups.setdefault((decay, lr * scale), []).append(p)
    return [{"params": ps, "weight_decay": d, "lr": g_lr} for (d, g_lr), ps in sorted(groups.items())]


def shard_model(model: MultimodalModel, device: torch.device, world_size: int) -> MultimodalModel:
    """Shard ``model`` in place with FSDP2 over ``world_size`` processes (layout: module docstring).

    Call after freezing and any resizing, before building the optimizer: parameters become DTensors.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    mesh = init_device_mesh(device.type, (world_size,))
    for layer in model.backbone.layers:
        fully_shard(layer, mesh=mesh)
    enc = model.image_encoder
    if enc is not None:
        if isinstance(enc, ImageEncoder):
            for layer in [*enc.layers, *enc.global_layers]:
                fully_shard(layer, mesh=mesh)
        fully_shard(enc, mesh=mesh)
    for block in model.image_blocks:
        fully_shard(block, mesh=mesh)
        register_fsdp_forward_method(block, "project_kv")
    fully_shard(model, mesh=mesh)
    return model


def _features_fingerprint(model: MultimodalModel, preprocessor: Preprocessor) -> dict[str, Any] | None:
    """What cached frame features (``mm data cache-features``) must have been made with to be read
    in a stage of ``model``; None where there are none to read: the model takes no video, or the
    stage trains the image encoder or projector, whose frame tokens then change at every step."""
    from mm.training.cache_features import features_fingerprint

    if (
        model.video_aggregator is None
        or model.image_encoder is None
        or model.projector is None
        or preprocessor.video is None
        or preprocessor.image_processor is None
    ):
        return None
    frame_path = (*model.image_encoder.parameters(), *model.projector.parameters())
    if any(p.requires_grad for p in frame_path):
        return None
    return features_fingerprint(model, preprocessor)


def _unsharded_copy(model: MultimodalModel, weights: Mapping[str, torch.Tensor]) -> MultimodalModel:
    """A plain (unsharded) model of ``model``'s configuration holding ``weights`` (its whole state)."""
    with torch.device("meta"):
        plain = MultimodalModel(model.config, backbone=TextBackbone(model.config.text))
    plain.load_state_dict(weights, strict=True, assign=True)
    plain.backbone.source = model.backbone.source
    plain.preprocessor = model.preprocessor
    plain.activation_checkpointing = model.activation_checkpointing
    return plain


_MEDIA_KEYS = ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask", "cross_attention_mask")


@contextlib.contextmanager
def _quiet_fsdp_views():
    """Silence FSDP2's warning that a unit returned a view (the image encoder's ``[..., :p]``
    slice, ``project_kv``'s transposed values): the model never changes those outputs in place,
    which is the only case the warning is about."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
        yield


class Trainer:
    """Runs the stages of a recipe.

    Args:
        recipe: the stages and the model to start from.
        output_dir: where every stage writes ``STAGE/`` (default: the recipe's ``output_dir``).
        data: in-memory conversations per stage name, used instead of the stage's shards (Python API,
            tests).
        fsdp: shard with FSDP2 instead of DDP when running on several processes.
        progress: show a progress bar on the main process.
        callbacks: called as ``callback(model, step, metrics)`` after every optimiser step (on every
            rank; under FSDP the model's parameters are the rank's shards, DTensors).
    """

    def __init__(
        self,
        recipe: Recipe,
        *,
        output_dir: str | Path | None = None,
        data: Mapping[str, Sequence[Any]] | None = None,
        fsdp: bool = False,
        progress: bool = True,
        callbacks: Sequence[Callable[[MultimodalModel, int, dict], None]] = (),
    ) -> None:
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs

        self.recipe = recipe
        out = output_dir or recipe.output_dir
        if out is None:
            raise RecipeError("no output_dir: give one in the recipe or to the trainer")
        self.output_dir = Path(out)
        self.data = dict(data or {})
        self.fsdp = fsdp
        self.progress = progress
        self.callbacks = list(callbacks)
        # Rows without images leave image blocks unused in some batches: DDP must allow that. Without a
        # GPU, accelerate forms a (gloo) process group under torchrun only when told cpu=True.
        self.accelerator = Accelerator(
            cpu=not torch.cuda.is_available(),
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
        )
        self.results: list[StageResult] = []

    # ------------------------------------------------------------------ models
    def initial_model(self) -> MultimodalModel:
        """The model the recipe's first stage starts from, with its preprocessor."""
        spec = self.recipe.model
        torch.manual_seed(
            self.recipe.seed
        )  # fresh adapters (and a preset's random backbone) are reproducible
        if spec.checkpoint is not None:
            model = MultimodalModel.from_pretrained(spec.checkpoint)
            if model.preprocessor is None:
                raise RecipeError(
                    f"{spec.checkpoint} was saved without a tokenizer and preprocessing settings"
                )
            return model
        if spec.backbone is not None:
            model = MultimodalModel.from_backbone(spec.backbone, spec.preset)
        else:
            model = MultimodalModel(ModelConfig.preset(spec.preset))
        if spec.image_encoder is not None:
            self._load_image_encoder(model, Path(spec.image_encoder))
        tok = spec.tokenizer or spec.backbone
        if tok is None:
            raise RecipeError(
                "model.tokenizer is needed when there is no model.backbone folder to read it from"
            )
        tokenizer = ByteTokenizer() if tok == "byte" else load_tokenizer(tok)
        model.preprocessor = Preprocessor(tokenizer)
        return model

    @staticmethod
    def _load_image_encoder(model: MultimodalModel, path: Path) -> None:
        from mm.text_backbone.checkpoint import collect_strict, iter_safetensors

        if model.image_encoder is None:
            raise RecipeError("model.image_encoder weights were given, but the preset has no image encoder")
        expected = model.image_encoder.state_dict()
        weights = collect_strict(expected, iter_safetensors([path]), dtype=None, device="cpu", source=path)
        model.image_encoder.load_state_dict(weights, strict=True)

    def _stage_dir(self, stage: Stage) -> Path:
        return self.output_dir / stage.name

    def _start_model(self, index: int, stage: Stage, previous: MultimodalModel | None) -> MultimodalModel:
        start = stage.start
        if start.kind == "checkpoint":
            return MultimodalModel.from_pretrained(start.path)
        if previous is None:
            if index == 0:
                previous = self.initial_model()
            else:
                prev = self.recipe.stages[index - 1]
                folder = self._stage_dir(prev) / "model"
                if not (folder / "config.json").is_file():
                    raise RecipeError(
                        f"stage {stage.name!r} starts from {prev.name!r}, which has not finished"
                    )
                previous = MultimodalModel.from_pretrained(folder)
        if start.kind == "hot_swap":
            previous.swap_backbone(TextBackbone.from_pretrained(start.path))
        return previous

    def _preprocessor(self, model: MultimodalModel, stage: Stage) -> Preprocessor:
        return stage_preprocessor(
            model,
            max_seq_len=stage.max_seq_len,
            image=stage.image,
            num_frames=None if stage.video is None else stage.video.num_frames,
            stage_name=stage.name,
        )

    # ------------------------------------------------------------------ the loop
    def run(self, *, stages: Sequence[str] | None = None, resume: bool = False) -> list[StageResult]:
        """Run the recipe's stages in order (or only ``stages``), each from where the last ended."""
        wanted = list(stages) if stages else [s.name for s in self.recipe.stages]
        for name in wanted:
            self.recipe.stage(name)  # unknown names are an error before anything runs
        model = None
        for index, stage in enumerate(self.recipe.stages):
            if stage.name not in wanted:
                model = None
                continue
            model = self._start_model(index, stage, model)
            model, result = self.run_stage(stage, model, resume=resume)
            self.results.append(result)
        return self.results

    def _check_backbone(self, model: MultimodalModel, digest: str, stage: Stage) -> None:
        now = model.backbone.digest()
        if now != digest:
            raise BackboneChanged(
                f"stage {stage.name!r} changed the backbone (digest {digest[:16]}… became {now[:16]}…); "
                "no checkpoint was written"
            )

    def run_stage(
        self, stage: Stage, model: MultimodalModel, *, resume: bool = False
    ) -> tuple[MultimodalModel, StageResult]:
        acc = self.accelerator
        folder = self._stage_dir(stage)
        ckpt_dir = folder / "checkpoints"
        seed = self.recipe.seed if stage.seed is None else stage.seed
        torch.manual_seed(seed)
        digest = model.backbone.digest()
        enc = model.image_encoder
        if (
            stage.image is not None
            and isinstance(enc, ImageEncoder)
            and stage.image.tile_size != enc.image_size
        ):
            # A stage at another resolution (the paper anneals at a higher one): resample the
            # position tables to the new tile size before the optimiser sees the parameters.
            resize_image_encoder(enc, stage.image.tile_size)
            model.config = model.config.replace(image_encoder=enc.config)
        preprocessor = self._preprocessor(model, stage)
        model.preprocessor = preprocessor
        attach_objective(model, stage.objective, stage.best_rq)
        set_trainable(model, stage.trainable)
        preprocessor.video_features_fingerprint = _features_fingerprint(model, preprocessor)
        model.activation_checkpointing = stage.activation_checkpointing
        model.train()

        start_step, data_state, losses = 0, None, []
        resume_from = latest_checkpoint(ckpt_dir) if resume else None
        state = None
        model = model.to(acc.device)
        sharded = self.fsdp and acc.num_processes > 1
        if sharded:
            wrapped = inner = shard_model(model, acc.device, acc.num_processes)
        else:
            wrapped = acc.prepare_model(model) if acc.num_processes > 1 or self.fsdp else model
            inner: MultimodalModel = acc.unwrap_model(wrapped)
        optimizer = torch.optim.AdamW(
            _param_groups(inner, stage.optimizer.weight_decay, stage.optimizer.lr, stage.optimizer.lr_scale),
            lr=stage.optimizer.lr,
            betas=stage.optimizer.betas,
            eps=stage.optimizer.eps,
        )
        if resume_from is not None:
            state = load_train_state(resume_from, None if sharded else optimizer)
            if state["backbone_digest"] != digest:
                raise BackboneChanged(
                    f"{resume_from} was written for another backbone; cannot resume on this one"
                )
            adapters = state["adapters"]
            if sharded:  # every rank read the whole tensors: each keeps its shards
                own = inner.state_dict()
                adapters = {k: shard_like(v, own[k]) if k in own else v for k, v in adapters.items()}
            missing, unexpected = inner.load_state_dict(adapters, strict=False)
            if unexpected or any(not k.startswith("backbone.") for k in missing):
                raise RecipeError(
                    f"{resume_from} does not fit this model: missing {missing[:3]}, unexpected {unexpected[:3]}"
                )
            if sharded:
                load_optimizer_state(optimizer, state.pop("optimizer"))
            start_step = int(state["step"])
            data_state = state["data"]["ranks"][acc.process_index]
            logger.info("resuming stage %s from %s (step %d)", stage.name, resume_from, start_step)

        def schedule(s: int) -> float:
            return lr_factor(
                s,
                steps=stage.steps,
                warmup=stage.schedule.warmup_steps,
                min_ratio=stage.schedule.min_lr_ratio,
            )

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        for _ in range(start_step):
            scheduler.step()
        data = StageData(
            self.data.get(stage.name, stage.data),
            preprocessor,
            batch_size=stage.batch_size,
            rank=acc.process_index,
            world_size=acc.num_processes,
            seed=seed,
            num_workers=stage.num_workers,
            state=data_state,
        )
        log = MetricsLog(folder, enabled=acc.is_main_process, resume_step=start_step if resume_from else None)
        params = [p for p in inner.parameters() if p.requires_grad]
        bar = tqdm(
            total=stage.steps,
            initial=start_step,
            desc=stage.name,
            unit="step",
            disable=not (self.progress and acc.is_main_process),
            dynamic_ncols=True,
        )
        autocast = (
            acc.autocast
            if stage.precision == "fp32"
            else (lambda: torch.autocast(device_type=acc.device.type, dtype=torch.bfloat16))
        )
        t0 = time.perf_counter()
        tokens_seen, last = 0, {}
        for step in range(start_step, stage.steps):
            micro = [
                {k: v.to(acc.device) for k, v in data.next_batch().items()} for _ in range(stage.grad_accum)
            ]
            for i, mb in enumerate(micro):
                if stage.video is not None and stage.video.group_size is not None:
                    mb["video_group_size"] = stage.video.group_size
                if stage.objective != "lm":
                    # Masks of a step are fixed by (seed, step, micro-batch, rank): a resume repeats them.
                    mb["objective"] = stage.objective
                    mb["objective_seed"] = ((seed * 1_000_003 + step) * 64 + i) * 4096 + acc.process_index
            counts = [batch_weight(stage.objective, mb) for mb in micro]
            total = int(acc.reduce(torch.tensor(sum(counts), device=acc.device), reduction="sum"))
            media = self._align_media(micro, inner) if sharded else [False] * len(micro)
            loss_sum = torch.zeros((), device=acc.device)
            for i, mb in enumerate(micro):
                sync = i == len(micro) - 1
                ctx = contextlib.nullcontext() if sync or wrapped is inner else acc.no_sync(wrapped)
                if sharded:
                    # FSDP2's no_sync: keep this micro-batch's gradients unreduced until the last one.
                    inner.set_requires_gradient_sync(sync)
                    inner.run_media_path = media[i]
                with ctx, _quiet_fsdp_views() if sharded else contextlib.nullcontext():
                    with autocast():
                        out = wrapped(**mb, return_logits=False)
                    summed = objective_loss_sum(out, stage.objective, counts[i])
                    if not summed.requires_grad and not sharded:
                        # Nothing this micro-batch saw depends on what learns (text-only rows while
                        # image parts train): anchor the loss so every rank still runs a backward
                        # pass, giving exact zero gradients.
                        summed = summed + sum(p.reshape(-1)[0] for p in params) * 0.0
                    # Mean over the labelled tokens of the whole global batch; DDP averages over
                    # processes, hence the world-size factor.
                    acc.backward(summed * acc.num_processes / max(1, total))
                    loss_sum += summed.detach()
            inner.run_media_path = False
            grad_norm = None
            if stage.max_grad_norm is not None:
                if sharded:
                    # torch's own clipping takes the global norm over DTensor gradients (returning a
                    # DTensor); accelerate's helper does the same unless it was configured for its
                    # own FSDP, which this trainer does not use.
                    norm = torch.nn.utils.clip_grad_norm_(params, stage.max_grad_norm)
                    grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
                else:
                    grad_norm = float(acc.clip_grad_norm_(params, stage.max_grad_norm))
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            loss = float(acc.reduce(loss_sum, reduction="sum")) / max(1, total)
            losses.append(loss)
            tokens_seen += int(
                acc.reduce(
                    torch.tensor(sum(int(mb["attention_mask"].sum()) for mb in micro), device=acc.device),
                    reduction="sum",
                )
            )
            elapsed = time.perf_counter() - t0
            last = {
                "loss": loss,
                "lr": stage.optimizer.lr * schedule(step),
                "tokens_per_s": tokens_seen / max(elapsed, 1e-9),
                "label_tokens": total,
            }
            if grad_norm is not None:
                last["grad_norm"] = grad_norm
            done = step + 1
            if done % stage.log_every == 0 or done == stage.steps:
                log.log(done, last)
            bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{last['tokens_per_s']:.0f}")
            bar.update(1)
            for callback in self.callbacks:
                callback(inner, done, last)
            if stage.save_every and done % stage.save_every == 0 and done < stage.steps:
                self._save_checkpoint(inner, optimizer, done, data, digest, stage, ckpt_dir, last)
        bar.close()
        seconds = time.perf_counter() - t0
        self._save_checkpoint(inner, optimizer, stage.steps, data, digest, stage, ckpt_dir, last)
        if sharded:
            # Every rank gathers the whole model (its shards are of no use past this stage) and
            # carries on with a plain copy; rank 0 writes the folder from it.
            del optimizer, scheduler, params  # free the moments before gathering
            own = {k: v for k, v in inner.state_dict().items() if not k.startswith("best_rq_")}
            inner = _unsharded_copy(inner, full_tensors(own))
        detach_objective(inner)  # the BEST-RQ classifiers served this stage only
        inner.eval()
        set_trainable(inner, ())
        model_dir = folder / "model"
        if acc.is_main_process:
            inner.save_pretrained(model_dir, copy_backbone=inner.backbone.source is None)
        plot = log.close(stage.name)
        skipped = {k: v for k, v in preprocessor.skipped.items()}
        counters = [dataclasses.asdict(c) for c in data.counters]
        result = StageResult(
            name=stage.name,
            steps=stage.steps,
            seconds=seconds,
            final_loss=losses[-1] if losses else (state or {}).get("metrics", {}).get("loss"),
            model_dir=str(model_dir),
            backbone_digest=digest,
            losses=losses,
        )
        if acc.is_main_process:
            atomic_write_json(
                folder / "summary.json",
                {
                    **result.to_dict(),
                    "skipped": skipped,
                    "data": counters,
                    "loss_plot": str(plot) if plot else None,
                },
            )
        acc.wait_for_everyone()
        return inner, result

    def _align_media(self, micro: list[dict[str, torch.Tensor]], model: MultimodalModel) -> list[bool]:
        """Under FSDP, make every rank call the same sharded modules for each micro-batch.

        One all-reduce tells each rank whether any rank's micro-batch has placeholder tokens or
        images that some row can see (and the tile shape ``[t, 3, H, W]``). Where some rank has
        images, a rank without any gets an image input that no row can see; where none has, image
        inputs are dropped (no row could see them). Returns, per micro-batch, whether the media
        paths must run (:attr:`MultimodalModel.run_media_path`).
        """
        acc = self.accelerator
        vocab = model.config.text.vocab_size
        info = torch.zeros(len(micro), 6, dtype=torch.long)
        for i, mb in enumerate(micro):
            if "cross_attention_mask" in mb and bool(mb["cross_attention_mask"].any()):
                info[i, 0] = 1
                info[i, 2:] = torch.tensor(mb["pixel_values"].shape[2:])  # [t, 3, H, W]
            info[i, 1] = int(bool((mb["input_ids"] >= vocab).any()))
        info = info.to(acc.device)
        torch.distributed.all_reduce(info, op=torch.distributed.ReduceOp.MAX)
        info = info.cpu()
        flags = []
        for i, mb in enumerate(micro):
            if not info[i, 0]:
                for key in _MEDIA_KEYS:
                    mb.pop(key, None)
            elif "pixel_values" not in mb:
                b, s = mb["input_ids"].shape
                t, c, h, w = (int(x) for x in info[i, 2:])
                dev = mb["input_ids"].device
                # Only one row is ever encoded: one tile set of zeros, broadcast (no copy) over rows.
                mb["pixel_values"] = torch.zeros(1, 1, t, c, h, w, device=dev).expand(b, 1, t, c, h, w)
                mb["aspect_ratio_ids"] = torch.zeros(b, 1, dtype=torch.long, device=dev)
                mb["aspect_ratio_mask"] = torch.zeros(b, 1, t, dtype=torch.long, device=dev)
                mb["cross_attention_mask"] = torch.zeros(b, s, 1, t, dtype=torch.long, device=dev)
            flags.append(bool(info[i, :2].any()))
        return flags

    def _save_checkpoint(self, model, optimizer, step, data, digest, stage, folder, metrics) -> None:
        self._check_backbone(model, digest, stage)
        # Each rank reads its own shards: keep every rank's data position.
        ranks = [data.state_dict()]
        if self.accelerator.num_processes > 1:
            ranks = [None] * self.accelerator.num_processes
            torch.distributed.all_gather_object(ranks, data.state_dict())
        main = self.accelerator.is_main_process
        if self.fsdp and self.accelerator.num_processes > 1:
            # Sharded weights and moments: every rank takes part in gathering them whole.
            adapters = full_tensors(model.adapter_state_dict(), keep=main)
            optimizer = full_optimizer_state(optimizer, keep=main)
        elif main:
            adapters = model.adapter_state_dict()
        if main:
            save_train_state(
                folder,
                step=step,
                adapters=adapters,
                optimizer=optimizer,
                scheduler_step=step,
                data_state={"ranks": ranks},
                backbone_digest=digest,
                metrics=metrics,
            )
            prune_checkpoints(folder, stage.keep_last)
        self.accelerator.wait_for_everyone()


def summary_table(results: Sequence[StageResult]) -> str:
    rows = [("stage", "steps", "seconds", "final loss")]
    rows += [
        (r.name, str(r.steps), f"{r.seconds:.1f}", "-" if r.final_loss is None else f"{r.final_loss:.4f}")
        for r in results
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows)


def write_results(results: Sequence[StageResult], path: str | Path) -> None:
    Path(path).write_text(json.dumps([r.to_dict() for r in results], indent=2) + "\n")


def stage_preprocessor(
    model: MultimodalModel,
    *,
    max_seq_len: int,
    image: Any = None,
    num_frames: int | None = None,
    stage_name: str = "",
) -> Preprocessor:
    """The preprocessor a stage decodes and tokenises its samples with: the model's saved settings,
    with the stage's tile settings (``image``, a recipe's image settings) and frames per clip when
    given, tiles padded to the image encoder's when their counts differ, and audio features for a
    model with a speech encoder. ``mm data cache-features`` builds its clips' preprocessor here too,
    so cached features match what the stage would decode.
    """
    from mm.datasets.image_processing import ImageProcessor
    from mm.encoders import ImageEncoderConfig

    pre = model.preprocessor
    if pre is None:
        raise RecipeError("the model has no preprocessor (tokenizer and preprocessing settings)")
    processor = pre.image_processor
    if image is not None:
        enc_size = getattr(model.image_encoder, "image_size", image.tile_size)
        if image.tile_size != enc_size:
            raise RecipeError(
                f"stage {stage_name!r} asks for {image.tile_size} px tiles; the image encoder takes {enc_size}"
            )
        base = processor.to_dict() if processor is not None else {}
        processor = ImageProcessor.from_dict(
            {**base, "tile_size": image.tile_size, "max_tiles": image.max_tiles}
        )
    enc = model.config.image_encoder
    tiles = None
    if (
        isinstance(enc, ImageEncoderConfig)
        and processor is not None
        and processor.max_tiles != enc.max_num_tiles
    ):
        tiles = (enc.max_num_tiles, enc.supported_aspect_ratios)
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
