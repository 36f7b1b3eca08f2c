"""What can be checked before a run does any work, each failure a :class:`RecipeError` naming the key.

:func:`check_before_work` runs before the first model is built:

* every ``${NAME}`` in a path was filled in (``mm train --var NAME=...``);
* the model's preset is known, and its backbone, tokenizer, image encoder or checkpoint exist;
* every stage's ``start`` path exists (unless an earlier stage of this run writes it), and a stage
  that starts from the previous one, run on its own, finds that one's model;
* every local shard exists (URLs are left to the reader);
* the output folders fit the request: a fresh run refuses a stage folder that holds checkpoints
  (``--resume`` continues them, ``--replace`` discards them), and a resume refuses a checkpoint that
  names no run or another one (other seed or stage settings; the starting model is compared once it
  is loaded, in :meth:`mm.training.trainer.Trainer.setup_stage`).

What needs the model (the ``trainable`` entries each matching a parameter) is checked in
:meth:`~mm.training.trainer.Trainer.setup_stage`, before the optimiser is built.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from mm.training.identity import RunIdentity, differences
from mm.training.recipe import Recipe, RecipeError, Stage
from mm.training.state import checkpoint_run, latest_checkpoint

if TYPE_CHECKING:
    from mm.model import MultimodalModel

__all__ = ["check_before_work", "check_fits_model", "check_resumable", "unfilled_variables"]

_VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def _paths(recipe: Recipe, wanted: Sequence[Stage], in_memory: Collection[str]) -> list[tuple[str, str]]:
    """``(key path, value)`` of every path the run will read, in recipe order."""
    out = []
    if _needs_initial_model(recipe, wanted):
        for name in ("backbone", "tokenizer", "image_encoder", "checkpoint"):
            value = getattr(recipe.model, name)
            if value is not None:
                out.append((f"model.{name}", value))
    for stage in wanted:
        i = _index(recipe, stage)
        if stage.start.path is not None:
            out.append((f"stages[{i}].start", stage.start.path))
        if stage.name not in in_memory:
            out.extend((f"stages[{i}].data[{j}].shards", s.shards) for j, s in enumerate(stage.data))
    return out


def unfilled_variables(recipe: Recipe, wanted: Sequence[Stage], in_memory: Collection[str] = ()) -> None:
    """Refuse a ``${NAME}`` left in a path the run reads, naming it and how to give it."""
    for key, value in _paths(recipe, wanted, in_memory):
        found = _VARIABLE.search(value)
        if found:
            name = found.group(1)
            raise RecipeError(
                f"{key}: ${{{name}}} was not filled in ({value!r}); give it with mm train --var {name}=..."
                f" (in Python: recipe.with_paths({name}=...))"
            )


def _index(recipe: Recipe, stage: Stage) -> int:
    return [s.name for s in recipe.stages].index(stage.name)


def _needs_initial_model(recipe: Recipe, wanted: Sequence[Stage]) -> bool:
    return any(_index(recipe, s) == 0 and s.start.kind == "previous" for s in wanted)


def _check_model(recipe: Recipe) -> None:
    from mm.model import ModelConfig

    spec = recipe.model
    if spec.preset is not None:
        try:
            ModelConfig.preset(spec.preset)
        except KeyError as e:
            raise RecipeError(f"model.preset: {e.args[0]}") from None
    wants = {
        "backbone": "folder",
        "checkpoint": "folder",
        "image_encoder": "file",
        "tokenizer": "file or folder",
    }
    for name, kind in wants.items():
        value = getattr(spec, name)
        if value is None or (name == "tokenizer" and value == "byte"):
            continue
        path = Path(value).expanduser()
        ok = path.is_dir() if kind == "folder" else path.is_file() if kind == "file" else path.exists()
        if not ok:
            raise RecipeError(f"model.{name}: no {kind} {value}")


def _check_starts(recipe: Recipe, wanted: Sequence[Stage], output_dir: Path) -> None:
    names = [s.name for s in wanted]
    for stage in wanted:
        i = _index(recipe, stage)
        if stage.start.path is not None:
            path = Path(stage.start.path).expanduser()
            # A path an earlier stage of this very run writes (its model folder) need not exist yet.
            made_here = any(
                _inside(path, output_dir / earlier) for earlier in names[: names.index(stage.name)]
            )
            if not made_here and not path.is_dir():
                raise RecipeError(f"stages[{i}].start: no folder {stage.start.path} ({stage.start.kind})")
        elif i > 0 and recipe.stages[i - 1].name not in names:
            prev = recipe.stages[i - 1]
            folder = output_dir / prev.name / "model"
            if not (folder / "config.json").is_file():
                raise RecipeError(
                    f"stages[{i}].start: stage {stage.name!r} starts from {prev.name!r}, which has not "
                    f"finished (no {folder}); run it first, or give stage {stage.name!r} a start"
                )


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
    except ValueError:
        return False
    return True


def _check_shards(recipe: Recipe, wanted: Sequence[Stage], in_memory: Collection[str]) -> None:
    from mm.datasets.webdata import expand_shards

    for stage in wanted:
        if stage.name in in_memory:
            continue
        i = _index(recipe, stage)
        for j, source in enumerate(stage.data):
            try:
                expand_shards(source.shards)
            except (FileNotFoundError, ValueError) as e:
                raise RecipeError(f"stages[{i}].data[{j}].shards: {e}") from None


def check_resumable(
    checkpoint: Path, recorded: dict | None, current: RunIdentity, *, compare_start: bool
) -> None:
    """Refuse to resume from ``checkpoint`` unless it names the run ``current`` is."""
    identity = RunIdentity.from_dict(recorded)
    if identity is None:
        raise RecipeError(
            f"cannot resume from {checkpoint}: it does not name the run it belongs to (written by an older "
            "mm), so resuming could continue another run; start over with --replace"
        )
    found = differences(identity, current, compare_start=compare_start)
    if found:
        raise RecipeError(
            f"cannot resume from {checkpoint}: it belongs to another run ({'; '.join(found)}); resume with "
            "the recipe and start it was written with, or start over with --replace"
        )


def _check_folders(
    recipe: Recipe,
    wanted: Sequence[Stage],
    output_dir: Path,
    in_memory: Collection[str],
    *,
    resume: bool,
    replace: bool,
) -> None:
    if replace:
        return
    for stage in wanted:
        checkpoints = output_dir / stage.name / "checkpoints"
        latest = latest_checkpoint(checkpoints)
        if latest is None:
            continue
        if not resume:
            raise RecipeError(
                f"{output_dir / stage.name} holds checkpoints of an earlier run (latest: {latest.name}); "
                "give --resume to continue that run, or --replace to discard them and start over"
            )
        current = RunIdentity.of(recipe, stage, adapter_digest=None, in_memory=stage.name in in_memory)
        check_resumable(latest, checkpoint_run(latest), current, compare_start=False)


def check_before_work(
    recipe: Recipe,
    wanted: Sequence[Stage],
    *,
    output_dir: Path,
    in_memory: Collection[str] = (),
    resume: bool = False,
    replace: bool = False,
) -> None:
    """Everything about a run of ``wanted`` (stages of ``recipe``) that can be checked before any
    work starts (see the module docstring); raises :class:`RecipeError` naming the key or folder."""
    if resume and replace:
        raise RecipeError(
            "--resume continues the runs in the output folder and --replace discards them: give one"
        )
    unfilled_variables(recipe, wanted, in_memory)
    if str(output_dir) and _VARIABLE.search(str(output_dir)):
        name = _VARIABLE.search(str(output_dir)).group(1)
        raise RecipeError(f"output_dir: ${{{name}}} was not filled in ({str(output_dir)!r})")
    if _needs_initial_model(recipe, wanted):
        _check_model(recipe)
    _check_starts(recipe, wanted, output_dir)
    _check_shards(recipe, wanted, in_memory)
    _check_folders(recipe, wanted, output_dir, in_memory, resume=resume, replace=replace)


def check_fits_model(key: str, stage: Stage, model: MultimodalModel) -> None:
    """Refuse a ``trainable`` entry that matches no parameter of ``model`` (a misspelt glob, or a
    component the model lacks: it would train nothing, or leave the optimiser nothing at all), and
    video settings the model's aggregator cannot merge. ``key`` is the stage's key path."""
    from mm.model.components import COMPONENTS, component_of, is_pattern

    names = [n for n, _ in model.named_parameters()]
    for entry in stage.trainable:
        if is_pattern(entry):
            hit = any(fnmatch.fnmatchcase(n, entry) and component_of(n) != "backbone" for n in names)
        else:
            hit = any(component_of(n) == entry for n in names)
        if not hit:
            counts = model.component_parameters()
            have = ", ".join(f"{c} ({counts[c]:,} parameters)" for c in COMPONENTS if c in counts)
            raise RecipeError(
                f"{key}.trainable: {entry!r} matches no parameter of this model; its components: {have} "
                "(globs match parameter names, e.g. 'image_blocks.*')"
            )
    if stage.video is not None and model.video_aggregator is not None:
        most = model.video_aggregator.group_size
        group = stage.video.group_size or most
        if group > most or stage.video.num_frames % group:
            raise RecipeError(
                f"{key}.video: {stage.video.num_frames} frames in groups of {group} do not fit this model "
                f"(groups of at most {most} frames, dividing num_frames)"
            )
