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

Before any of that, :meth:`Trainer.run` checks what can be checked without a model
(:mod:`mm.training.preflight`: variables filled in, paths and shards present, output folders free or
resumable) and prepares the stage folders (``replace`` discards an earlier run's outputs; temporary
entries of killed writes are removed). Every checkpoint and ``summary.json`` name the run they
belong to (:mod:`mm.training.identity`); a resume refuses a checkpoint of another run. A write the
disk refuses is a :class:`~mm.training.state.WriteError` naming the file.

Under FSDP2 (``fsdp=True`` on several processes; :mod:`mm.training.fsdp`) the backbone digest,
checkpoints and the final model gather whole tensors on every rank (collectives) and rank 0 writes
the same files a single process writes; resuming cuts them back into shards. A sharded stage ends by
gathering the whole model into a plain copy on the CPU of every rank, which it returns (and the next
stage shards again).

A stage reads top to bottom: :meth:`Trainer.setup_stage` (model, objective, optimiser, resume,
data), :meth:`Trainer.train_loop` (one :meth:`Trainer.train_step` per optimiser step, logging and
checkpoints), :meth:`Trainer.finish_stage` (last checkpoint, the model folder, the summary).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from mm._io import atomic_write_json
from mm.datasets.preprocessing import Preprocessor, stage_preprocessor
from mm.encoders import ImageEncoder, resize_image_encoder
from mm.model import ModelConfig, MultimodalModel
from mm.model.components import set_trainable
from mm.text_backbone import ByteTokenizer, TextBackbone, load_tokenizer
from mm.text_backbone.digest import state_digest
from mm.training.cache_features import features_fingerprint
from mm.training.data import StageData
from mm.training.fsdp import align_media, quiet_fsdp_views, shard_step, unsharded_copy
from mm.training.identity import RunIdentity
from mm.training.metrics import MetricsLog
from mm.training.objectives import TrainStep, build_objective
from mm.training.optim import lr_factor, param_groups
from mm.training.preflight import check_before_work, check_fits_model, check_resumable
from mm.training.recipe import Recipe, RecipeError, Stage
from mm.training.state import (
    checkpoint_run,
    discard_stage_outputs,
    full_optimizer_state,
    full_tensors,
    latest_checkpoint,
    load_optimizer_state,
    load_train_state,
    prune_checkpoints,
    remove_leftovers,
    save_train_state,
    shard_like,
    writing,
)

__all__ = ["BackboneChanged", "StageResult", "StageRun", "Trainer", "summary_table"]

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

    run: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "steps": self.steps,
            "seconds": round(self.seconds, 2),
            "final_loss": self.final_loss,
            "model_dir": self.model_dir,
            "backbone_digest": self.backbone_digest,
            "run": self.run,
        }


@dataclass
class StageRun:
    """Everything one stage holds while it trains (built by :meth:`Trainer.setup_stage`).

    Attributes:
        model: the model being trained (unwrapped; under FSDP its parameters are shards).
        step_module: what the optimiser's loss comes from: the :class:`TrainStep` of the model and
            the objective, wrapped by DDP or sharded by FSDP where several processes run.
        train_step: the same :class:`TrainStep`, unwrapped.
        params: the parameters that learn, in the optimiser's order.
        identity: the run this stage's checkpoints belong to.
    """

    stage: Stage
    folder: Path
    seed: int
    digest: str
    identity: RunIdentity
    model: MultimodalModel
    step_module: torch.nn.Module
    train_step: TrainStep
    sharded: bool
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    preprocessor: Preprocessor
    data: StageData | None = None
    log: MetricsLog | None = None
    start_step: int = 0
    resumed: dict[str, Any] | None = None
    losses: list[float] = field(default_factory=list)
    last: dict[str, float] = field(default_factory=dict)
    tokens_seen: int = 0
    seconds: float = 0.0

    @property
    def checkpoints(self) -> Path:
        return self.folder / "checkpoints"

    def lr(self, step: int) -> float:
        """The learning-rate factor of ``step`` (warm-up, then cosine decay)."""
        return lr_factor(
            step,
            steps=self.stage.steps,
            warmup=self.stage.schedule.warmup_steps,
            min_ratio=self.stage.schedule.min_lr_ratio,
        )


def _features_fingerprint(model: MultimodalModel, preprocessor: Preprocessor) -> dict[str, Any] | None:
    """What cached frame features (``mm data cache-features``) must have been made with to be read
    in a stage of ``model``; None where there are none to read: the model takes no video, or the
    stage trains the image encoder or projector, whose frame tokens then change at every step."""
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
        try:
            tokenizer = ByteTokenizer() if tok == "byte" else load_tokenizer(tok)
        except (OSError, ValueError) as e:
            raise RecipeError(f"model.{'tokenizer' if spec.tokenizer else 'backbone'}: {e}") from None
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
            model = MultimodalModel.from_pretrained(start.path)
            if model.preprocessor is None:
                raise RecipeError(
                    f"stages[{index}].start: {start.path} was saved without a tokenizer and preprocessing settings"
                )
            return model
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
            backbone = TextBackbone.from_pretrained(start.path)
            try:
                previous.swap_backbone(backbone)
            except ValueError as e:  # a backbone of another architecture
                raise RecipeError(f"stages[{index}].start: {start.path}: {e}") from None
        return previous

    # ------------------------------------------------------------------ the stages
    def run(
        self, *, stages: Sequence[str] | None = None, resume: bool = False, replace: bool = False
    ) -> list[StageResult]:
        """Run the recipe's stages in order (or only ``stages``), each from where the last ended.

        Args:
            stages: names of the stages to run (default: all).
            resume: continue each stage from its latest checkpoint, which must belong to this run
                (same stage settings, seed and starting model).
            replace: discard what an earlier run left in the stages' folders first. Without it (or
                ``resume``) a stage folder holding checkpoints is an error.
        """
        wanted = list(stages) if stages else [s.name for s in self.recipe.stages]
        for name in wanted:
            self.recipe.stage(name)  # unknown names are an error before anything runs
        check_before_work(
            self.recipe,
            [s for s in self.recipe.stages if s.name in wanted],
            output_dir=self.output_dir,
            in_memory=set(self.data),
            resume=resume,
            replace=replace,
        )
        if self.accelerator.is_main_process:
            for name in wanted:
                folder = self._stage_dir(self.recipe.stage(name))
                if replace:
                    discard_stage_outputs(folder)
                remove_leftovers(folder)
        self.accelerator.wait_for_everyone()
        model = None
        for index, stage in enumerate(self.recipe.stages):
            if stage.name not in wanted:
                model = None
                continue
            model = self._start_model(index, stage, model)
            model, result = self.run_stage(stage, model, resume=resume)
            self.results.append(result)
        return self.results

    def run_stage(
        self, stage: Stage, model: MultimodalModel, *, resume: bool = False
    ) -> tuple[MultimodalModel, StageResult]:
        """Train one stage of ``model``; returns the trained (unwrapped, unsharded) model and the result."""
        run = self.setup_stage(stage, model, resume=resume)
        self.train_loop(run)
        return self.finish_stage(run)

    # ------------------------------------------------------------------ setup
    def setup_stage(self, stage: Stage, model: MultimodalModel, *, resume: bool = False) -> StageRun:
        """Everything before the first step: the model prepared for the stage, its objective, the
        (wrapped) training module, the optimiser and schedule, the state of a resumed run, the data."""
        seed = self.recipe.seed if stage.seed is None else stage.seed
        torch.manual_seed(seed)
        digest = model.backbone.digest()
        identity = RunIdentity.of(
            self.recipe,
            stage,
            adapter_digest=state_digest(model.adapter_state_dict()),
            in_memory=stage.name in self.data,
        )
        preprocessor = self._prepare_model(stage, model)
        try:
            objective = build_objective(
                stage.objective, model, stage.best_rq, reward=stage.reward, dpo=stage.dpo
            )
        except ValueError as e:
            raise RecipeError(f"{self._key(stage)}.objective: {e}") from None
        check_fits_model(self._key(stage), stage, model)
        set_trainable(model, stage.trainable)
        preprocessor.video_features_fingerprint = _features_fingerprint(model, preprocessor)
        model.activation_checkpointing = stage.activation_checkpointing
        model.train()
        acc = self.accelerator
        model.to(acc.device)
        train_step = TrainStep(model, objective)
        sharded = self.fsdp and acc.num_processes > 1
        if sharded:
            step_module = shard_step(train_step, acc.device, acc.num_processes)
        elif acc.num_processes > 1 or self.fsdp:
            step_module = acc.prepare_model(train_step)
        else:
            step_module = train_step
        named = [*model.named_parameters(), *(("objective." + n, p) for n, p in objective.named_parameters())]
        opt = stage.optimizer
        optimizer = torch.optim.AdamW(
            param_groups(named, opt.weight_decay, opt.lr, opt.lr_scale),
            lr=opt.lr,
            betas=opt.betas,
            eps=opt.eps,
        )
        run = StageRun(
            stage=stage,
            folder=self._stage_dir(stage),
            seed=seed,
            digest=digest,
            identity=identity,
            model=model,
            step_module=step_module,
            train_step=train_step,
            sharded=sharded,
            params=[p for _, p in named if p.requires_grad],
            optimizer=optimizer,
            scheduler=None,
            preprocessor=preprocessor,
        )
        run.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, run.lr)
        data_state = self._resume(run) if resume else None
        with warnings.catch_warnings():  # fast-forwarding the schedule steps it before the optimiser
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)`")
            for _ in range(run.start_step):
                run.scheduler.step()
        run.data = StageData(
            self.data.get(stage.name, stage.data),
            preprocessor,
            batch_size=stage.batch_size,
            rank=acc.process_index,
            world_size=acc.num_processes,
            seed=seed,
            num_workers=stage.num_workers,
            state=data_state,
            preference=objective.preference_data,
            pack_len=stage.max_seq_len if stage.pack else None,
        )
        with writing(run.folder / "metrics.jsonl", run.checkpoints):
            run.log = MetricsLog(
                run.folder, enabled=acc.is_main_process, resume_step=run.start_step if run.resumed else None
            )
        return run

    def _key(self, stage: Stage) -> str:
        """The stage's key path in the recipe (``stages[1]``), for messages."""
        names = [s.name for s in self.recipe.stages]
        return f"stages[{names.index(stage.name)}]" if stage.name in names else f"stage {stage.name!r}"

    def _prepare_model(self, stage: Stage, model: MultimodalModel) -> Preprocessor:
        """The stage's tile size and preprocessor on ``model`` (a stage at another resolution — the
        paper anneals at a higher one — resamples the position tables before the optimiser sees them)."""
        enc = model.image_encoder
        if (
            stage.image is not None
            and isinstance(enc, ImageEncoder)
            and stage.image.tile_size != enc.image_size
        ):
            try:
                resize_image_encoder(enc, stage.image.tile_size)
            except ValueError as e:
                raise RecipeError(f"{self._key(stage)}.image.tile_size: {e}") from None
            model.config = model.config.replace(image_encoder=enc.config)
        try:
            preprocessor = stage_preprocessor(
                model,
                max_seq_len=stage.max_seq_len,
                image=stage.image,
                num_frames=None if stage.video is None else stage.video.num_frames,
                stage_name=stage.name,
            )
        except ValueError as e:
            raise RecipeError(f"{self._key(stage)}: {e}") from None
        model.preprocessor = preprocessor
        return preprocessor

    def _resume(self, run: StageRun) -> dict[str, Any] | None:
        """Load the stage's latest checkpoint into ``run``; returns this rank's data position."""
        path = latest_checkpoint(run.checkpoints)
        if path is None:
            return None
        check_resumable(path, checkpoint_run(path), run.identity, compare_start=True)
        state = load_train_state(path, None if run.sharded else run.optimizer)
        if state["backbone_digest"] != run.digest:
            raise BackboneChanged(f"{path} was written for another backbone; cannot resume on this one")
        weights = {_step_key(k): v for k, v in state["adapters"].items()}
        if run.sharded:  # every rank read the whole tensors: each keeps its shards
            own = run.train_step.state_dict()
            weights = {k: shard_like(v, own[k]) if k in own else v for k, v in weights.items()}
        missing, unexpected = run.train_step.load_state_dict(weights, strict=False)
        if unexpected or any(not k.startswith("model.backbone.") for k in missing):
            raise RecipeError(
                f"{path} does not fit this model: missing {missing[:3]}, unexpected {unexpected[:3]}"
            )
        if run.sharded:
            load_optimizer_state(run.optimizer, state.pop("optimizer"))
        run.start_step = int(state["step"])
        run.resumed = state
        logger.info("resuming stage %s from %s (step %d)", run.stage.name, path, run.start_step)
        return state["data"]["ranks"][self.accelerator.process_index]

    # ------------------------------------------------------------------ the loop
    def train_loop(self, run: StageRun) -> None:
        """Every optimiser step of the stage, with metrics, callbacks and periodic checkpoints."""
        acc, stage = self.accelerator, run.stage
        bar = tqdm(
            total=stage.steps,
            initial=run.start_step,
            desc=stage.name,
            unit="step",
            disable=not (self.progress and acc.is_main_process),
            dynamic_ncols=True,
        )
        t0 = time.perf_counter()
        try:
            self._steps(run, bar, t0)
        finally:  # an error is then printed after the bar, not under it
            bar.close()
        run.seconds = time.perf_counter() - t0

    def _steps(self, run: StageRun, bar: tqdm, t0: float) -> None:
        stage = run.stage
        for step in range(run.start_step, stage.steps):
            loss, total, tokens, grad_norm = self.train_step(run, step)
            run.losses.append(loss)
            run.tokens_seen += tokens
            run.last = {
                "loss": loss,
                "lr": stage.optimizer.lr * run.lr(step),
                "tokens_per_s": run.tokens_seen / max(time.perf_counter() - t0, 1e-9),
                "label_tokens": total,
            }
            if grad_norm is not None:
                run.last["grad_norm"] = grad_norm
            figures = getattr(run.train_step.objective, "pop_metrics", None)
            if figures is not None:  # the objective's own figures (DPO's implicit rewards), this process's
                run.last.update(figures())
            done = step + 1
            if done % stage.log_every == 0 or done == stage.steps:
                with writing(run.log.path, run.checkpoints):
                    run.log.log(done, run.last)
            bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{run.last['tokens_per_s']:.0f}")
            bar.update(1)
            for callback in self.callbacks:
                callback(run.model, done, run.last)
            if stage.save_every and done % stage.save_every == 0 and done < stage.steps:
                self._save_checkpoint(run, done)

    def train_step(self, run: StageRun, step: int) -> tuple[float, int, int, float | None]:
        """One optimiser step over ``grad_accum`` micro-batches.

        Returns the step's loss (mean over the global batch's labelled tokens, or micro-batches), the
        global batch's weight, its real tokens and the gradient norm before clipping (or ``None``).
        """
        acc, stage = self.accelerator, run.stage
        micro = [
            {k: v.to(acc.device) for k, v in run.data.next_batch().items()} for _ in range(stage.grad_accum)
        ]
        for mb in micro:
            if stage.video is not None and stage.video.group_size is not None and "video" in mb:
                mb["video"] = mb["video"].replace(group_size=stage.video.group_size)
        objective = run.train_step.objective
        counts = [objective.weight(mb) for mb in micro]
        total = int(acc.reduce(torch.tensor(sum(counts), device=acc.device), reduction="sum"))
        if run.sharded:
            align_media(micro, run.model, acc.device)
        autocast = (
            acc.autocast
            if stage.precision == "fp32"
            else (lambda: torch.autocast(device_type=acc.device.type, dtype=torch.bfloat16))
        )
        loss_sum = torch.zeros((), device=acc.device)
        for i, mb in enumerate(micro):
            sync = i == len(micro) - 1
            wrapped = run.step_module is not run.train_step
            ctx = (
                contextlib.nullcontext()
                if sync or not wrapped or run.sharded
                else acc.no_sync(run.step_module)
            )
            if run.sharded:
                # FSDP2's no_sync: keep this micro-batch's gradients unreduced until the last one.
                run.step_module.set_requires_gradient_sync(sync)
            # Masks of a step are fixed by (seed, step, micro-batch, rank): a resume repeats them.
            seed = ((run.seed * 1_000_003 + step) * 64 + i) * 4096 + acc.process_index
            with ctx, quiet_fsdp_views() if run.sharded else contextlib.nullcontext():
                with autocast():
                    summed = run.step_module(mb, seed)
                if not summed.requires_grad and not run.sharded:
                    # Nothing this micro-batch saw depends on what learns (text-only rows while image
                    # parts train): anchor the loss so every rank still runs a backward pass, giving
                    # exact zero gradients.
                    summed = summed + sum(p.reshape(-1)[0] for p in run.params) * 0.0
                # Mean over the labelled tokens of the whole global batch; DDP averages over
                # processes, hence the world-size factor.
                acc.backward(summed * acc.num_processes / max(1, total))
                loss_sum += summed.detach()
        grad_norm = self._clip(run)
        run.optimizer.step()
        after_step = getattr(objective, "after_step", None)
        if after_step is not None:  # the objective's own update, given the optimiser steps done (DPO's EMA)
            after_step(run.model, step + 1)
        run.scheduler.step()
        run.optimizer.zero_grad(set_to_none=True)
        loss = float(acc.reduce(loss_sum, reduction="sum")) / max(1, total)
        real = torch.tensor(sum(_real_tokens(mb) for mb in micro), device=acc.device)
        return loss, total, int(acc.reduce(real, reduction="sum")), grad_norm

    def _clip(self, run: StageRun) -> float | None:
        """Clip the gradients to the stage's global norm; the norm before clipping."""
        limit = run.stage.max_grad_norm
        if limit is None:
            return None
        if run.sharded:
            # torch's own clipping takes the global norm over DTensor gradients (returning a DTensor);
            # accelerate's helper does the same unless it was configured for its own FSDP, which this
            # trainer does not use.
            norm = torch.nn.utils.clip_grad_norm_(run.params, limit)
            return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        return float(self.accelerator.clip_grad_norm_(run.params, limit))

    # ------------------------------------------------------------------ finish
    def finish_stage(self, run: StageRun) -> tuple[MultimodalModel, StageResult]:
        """The last checkpoint, the model folder (adapters, preprocessing, the backbone by reference)
        and ``summary.json``; returns the trained model, unwrapped and unsharded."""
        acc, stage = self.accelerator, run.stage
        self._save_checkpoint(run, stage.steps)
        model = run.model
        if run.sharded:
            # Every rank gathers the whole model (its shards are of no use past this stage) and
            # carries on with a plain copy; rank 0 writes the folder from it.
            del run.optimizer, run.scheduler, run.params  # free the moments before gathering
            model = unsharded_copy(model, full_tensors(model.state_dict()))
        model.eval()
        set_trainable(model, ())
        model_dir = run.folder / "model"
        if acc.is_main_process:
            with writing(model_dir, run.checkpoints):
                model.save_pretrained(model_dir, copy_backbone=model.backbone.source is None)
        evaluate = getattr(run.train_step.objective, "evaluate", None)
        evaluation = evaluate(model, run.preprocessor) if evaluate is not None else {}
        with writing(run.folder / "loss.png", run.checkpoints):
            plot = run.log.close(stage.name)
        result = StageResult(
            name=stage.name,
            steps=stage.steps,
            seconds=run.seconds,
            final_loss=run.losses[-1] if run.losses else (run.resumed or {}).get("metrics", {}).get("loss"),
            model_dir=str(model_dir),
            backbone_digest=run.digest,
            losses=run.losses,
            run=run.identity.to_dict(),
        )
        if acc.is_main_process:
            with writing(run.folder / "summary.json", run.checkpoints):
                atomic_write_json(
                    run.folder / "summary.json",
                    {
                        **result.to_dict(),
                        "skipped": dict(run.preprocessor.skipped),
                        "data": [dataclasses.asdict(c) for c in run.data.counters],
                        "loss_plot": str(plot) if plot else None,
                        "eval": evaluation,
                    },
                )
        acc.wait_for_everyone()
        return model, result

    # ------------------------------------------------------------------ checkpoints
    def _check_backbone(self, run: StageRun) -> None:
        now = run.model.backbone.digest()
        if now != run.digest:
            raise BackboneChanged(
                f"stage {run.stage.name!r} changed the backbone (digest {run.digest[:16]}… became "
                f"{now[:16]}…); no checkpoint was written"
            )

    def _save_checkpoint(self, run: StageRun, step: int) -> None:
        """Write ``step``'s checkpoint (the weights that learn or belong to the stage's objective, the
        optimiser, the schedule, every rank's data position); refuse if the backbone changed."""
        self._check_backbone(run)
        acc = self.accelerator
        ranks = [run.data.state_dict()]  # each rank reads its own shards: keep every rank's position
        if acc.num_processes > 1:
            ranks = [None] * acc.num_processes
            torch.distributed.all_gather_object(ranks, run.data.state_dict())
        main = acc.is_main_process
        weights = {
            **run.model.adapter_state_dict(),
            **{"objective." + k: v for k, v in run.train_step.objective.state_dict().items()},
        }
        optimizer = run.optimizer
        if run.sharded:
            # Sharded weights and moments: every rank takes part in gathering them whole.
            weights = full_tensors(weights, keep=main)
            optimizer = full_optimizer_state(optimizer, keep=main)
        if main:
            with writing(run.checkpoints / f"step-{step:08d}", run.checkpoints):
                save_train_state(
                    run.checkpoints,
                    step=step,
                    adapters=weights,
                    optimizer=optimizer,
                    scheduler_step=step,
                    data_state={"ranks": ranks},
                    backbone_digest=run.digest,
                    metrics=run.last,
                    run=run.identity.to_dict(),
                )
            prune_checkpoints(run.checkpoints, run.stage.keep_last)
        acc.wait_for_everyone()


def _real_tokens(batch: Mapping[str, Any]) -> int:
    """Real (unpadded) tokens of a micro-batch; a preference batch's are its answers' inputs'."""
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    if "sequence_ids" in batch:  # packed rows: padding has sequence id -1
        return int((batch["sequence_ids"] >= 0).sum())
    return sum(_real_tokens(v) for v in batch.values() if isinstance(v, Mapping))


def _step_key(name: str) -> str:
    """A checkpoint's weight name as the :class:`TrainStep` names it (``objective.`` kept, else ``model.``)."""
    return name if name.startswith("objective.") else "model." + name


def summary_table(results: Sequence[StageResult]) -> str:
    rows = [("stage", "steps", "seconds", "final loss")]
    rows += [
        (r.name, str(r.steps), f"{r.seconds:.1f}", "-" if r.final_loss is None else f"{r.final_loss:.4f}")
        for r in results
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows)
