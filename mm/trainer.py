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
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import json
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from mm._io import atomic_write_json
from mm.components import set_trainable
from mm.config import ModelConfig
from mm.encoders import ImageEncoder, resize_image_encoder
from mm.metrics import MetricsLog
from mm.model import MultimodalModel
from mm.preprocessing import Preprocessor
from mm.recipe import Recipe, RecipeError, Stage
from mm.text_backbone import ByteTokenizer, TextBackbone, load_tokenizer
from mm.train_data import StageData
from mm.train_state import latest_checkpoint, load_train_state, prune_checkpoints, save_train_state

__all__ = ["BackboneChanged", "StageResult", "Trainer"]

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


class Trainer:
    """Runs the stages of a recipe.

    Args:
        recipe: the stages and the model to start from.
        output_dir: where every stage writes ``STAGE/`` (default: the recipe's ``output_dir``).
        data: in-memory conversations per stage name, used instead of the stage's shards (Python API,
            tests).
        fsdp: shard with FSDP2 instead of DDP when running on several processes.
        progress: show a progress bar on the main process.
        callbacks: called as ``callback(model, step, metrics)`` after every optimiser step.
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
        from mm.datasets.image_processing import ImageProcessor
        from mm.encoders import ImageEncoderConfig

        pre = model.preprocessor
        if pre is None:
            raise RecipeError("the model has no preprocessor (tokenizer and preprocessing settings)")
        image = pre.image_processor
        if stage.image is not None:
            enc_size = getattr(model.image_encoder, "image_size", stage.image.tile_size)
            if stage.image.tile_size != enc_size:
                raise RecipeError(
                    f"stage {stage.name!r} asks for {stage.image.tile_size} px tiles; the image encoder takes {enc_size}"
                )
            base = image.to_dict() if image is not None else {}
            image = ImageProcessor.from_dict(
                {**base, "tile_size": stage.image.tile_size, "max_tiles": stage.image.max_tiles}
            )
        enc = model.config.image_encoder
        tiles = None
        if isinstance(enc, ImageEncoderConfig) and image is not None and image.max_tiles != enc.max_num_tiles:
            tiles = (enc.max_num_tiles, enc.supported_aspect_ratios)
        return Preprocessor(
            pre.tokenizer,
            image,
            mask_mode=pre.mask_mode,
            max_seq_len=stage.max_seq_len,
            max_images=pre.max_images,
            encoder_tiles=tiles,
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
        set_trainable(model, stage.trainable)
        model.activation_checkpointing = stage.activation_checkpointing
        model.train()

        start_step, data_state, losses = 0, None, []
        resume_from = latest_checkpoint(ckpt_dir) if resume else None
        state = None
        model = model.to(acc.device)
        wrapped = acc.prepare_model(model) if acc.num_processes > 1 or self.fsdp else model
        inner: MultimodalModel = acc.unwrap_model(wrapped)
        optimizer = torch.optim.AdamW(
            _param_groups(inner, stage.optimizer.weight_decay, stage.optimizer.lr, stage.optimizer.lr_scale),
            lr=stage.optimizer.lr,
            betas=stage.optimizer.betas,
            eps=stage.optimizer.eps,
        )
        if resume_from is not None:
            state = load_train_state(resume_from, optimizer)
            if state["backbone_digest"] != digest:
                raise BackboneChanged(
                    f"{resume_from} was written for another backbone; cannot resume on this one"
                )
            missing, unexpected = inner.load_state_dict(state["adapters"], strict=False)
            if unexpected or any(not k.startswith("backbone.") for k in missing):
                raise RecipeError(
                    f"{resume_from} does not fit this model: missing {missing[:3]}, unexpected {unexpected[:3]}"
                )
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
            counts = [int((mb["labels"][:, 1:] != -100).sum()) for mb in micro]
            total = int(acc.reduce(torch.tensor(sum(counts), device=acc.device), reduction="sum"))
            loss_sum = torch.zeros((), device=acc.device)
            for i, mb in enumerate(micro):
                sync = i == len(micro) - 1
                ctx = contextlib.nullcontext() if sync or wrapped is inner else acc.no_sync(wrapped)
                with ctx:
                    with autocast():
                        out = wrapped(**mb, return_logits=False)
                    summed = out.loss.float() * out.num_label_tokens
                    # Mean over the labelled tokens of the whole global batch; DDP averages over
                    # processes, hence the world-size factor.
                    acc.backward(summed * acc.num_processes / max(1, total))
                    loss_sum += summed.detach()
            grad_norm = None
            if stage.max_grad_norm is not None:
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
        self._check_backbone(inner, digest, stage)
        self._save_checkpoint(inner, optimizer, stage.steps, data, digest, stage, ckpt_dir, last)
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

    def _save_checkpoint(self, model, optimizer, step, data, digest, stage, folder, metrics) -> None:
        self._check_backbone(model, digest, stage)
        # Each rank reads its own shards: keep every rank's data position.
        ranks = [data.state_dict()]
        if self.accelerator.num_processes > 1:
            ranks = [None] * self.accelerator.num_processes
            torch.distributed.all_gather_object(ranks, data.state_dict())
        if self.accelerator.is_main_process:
            save_train_state(
                folder,
                step=step,
                adapters=model.adapter_state_dict(),
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
