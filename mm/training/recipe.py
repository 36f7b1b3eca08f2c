"""Training recipes: stages as data (YAML), each stating exactly what may learn.

A recipe names the model to start from and a list of stages (Llama 3 paper, sections 7.4 and 8.2:
image adapter pre-training, annealing, video adapter, supervised fine-tuning with a hot-swapped
instruct backbone, speech stages). Every stage states its objective, data mix, the components that
learn (everything else is frozen), optimiser and schedule, batch and accumulation, resolution,
steps, and where it starts. Unknown keys anywhere are errors, so a typo never silently changes a run.

Shipped recipes live in ``mm/recipes/`` and are found by name (``mm train tiny-demo``).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from mm._strict import build
from mm.model.components import check_trainable
from mm.training.objectives import BestRqSettings

__all__ = [
    "DataSource",
    "ModelSpec",
    "OptimizerConfig",
    "Recipe",
    "RecipeError",
    "ScheduleConfig",
    "Stage",
    "StartFrom",
    "load_recipe",
    "shipped_recipes",
]

OBJECTIVES = ("lm", "best_rq")
PRECISIONS = ("fp32", "bf16")


class RecipeError(ValueError):
    """A recipe that cannot be run as written."""


def _build(cls, data: Any, where: str):
    """Construct dataclass ``cls`` from a mapping, refusing unknown keys and missing required ones."""
    return build(cls, data, where, error=RecipeError)


@dataclass(frozen=True, kw_only=True)
class DataSource:
    """One source of a stage's data mix.

    Args:
        shards: webdataset shards: a path, a brace pattern, a folder, or any URL webdataset reads.
        weight: relative sampling weight in the mix.
        max_bad_fraction: corrupt samples tolerated before the run stops with a clear message.
        shuffle_buffer: samples held for shuffling (0: shard order only).
    """

    shards: str
    weight: float = 1.0
    max_bad_fraction: float = 0.01
    shuffle_buffer: int = 0

    def __post_init__(self) -> None:
        if self.weight <= 0:
            raise ValueError(f"weight must be positive, got {self.weight}")
        if not 0 <= self.max_bad_fraction <= 1:
            raise ValueError(f"max_bad_fraction must lie in [0, 1], got {self.max_bad_fraction}")


@dataclass(frozen=True, kw_only=True)
class OptimizerConfig:
    """AdamW. Weight decay applies to matrices only (not to norms, biases, gates or embeddings rows).

    ``lr_scale`` multiplies the learning rate of parameters whose names match a glob pattern, e.g.
    ``{"*_gate": 10}`` lets zero-initialised tanh gates open faster on short runs. (It never freezes:
    factors must be positive; freezing is the ``trainable`` list's job.)
    """

    lr: float
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    lr_scale: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if any(float(v) <= 0 for v in self.lr_scale.values()):
            raise ValueError(f"lr_scale factors must be positive, got {self.lr_scale}")


@dataclass(frozen=True, kw_only=True)
class ScheduleConfig:
    """Linear warm-up to the peak learning rate, then cosine decay to ``min_lr_ratio`` of it."""

    warmup_steps: int = 0
    min_lr_ratio: float = 0.0


@dataclass(frozen=True, kw_only=True)
class StartFrom:
    """Where a stage's model comes from.

    ``previous`` (the last stage's result; for the first stage, the recipe's model), ``checkpoint``
    (an mm model folder) or ``hot_swap`` (the previous result with its backbone replaced by the text
    checkpoint at ``path`` — the paper swaps in the instruct model for SFT).
    """

    kind: str = "previous"
    path: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("previous", "checkpoint", "hot_swap"):
            raise ValueError(
                f"start must be 'previous', {{checkpoint: PATH}} or {{hot_swap: PATH}}, got {self.kind!r}"
            )
        if (self.path is None) != (self.kind == "previous"):
            raise ValueError(f"start {self.kind!r} {'needs' if self.path is None else 'takes no'} path")

    @classmethod
    def parse(cls, value: Any, where: str) -> StartFrom:
        if value in (None, "previous"):
            return cls()
        if isinstance(value, Mapping) and len(value) == 1:
            ((kind, path),) = value.items()
            return _build(cls, {"kind": kind, "path": str(path)}, where)
        raise RecipeError(
            f"{where} must be 'previous', {{checkpoint: PATH}} or {{hot_swap: PATH}}; got {value!r}"
        )


@dataclass(frozen=True, kw_only=True)
class ImageSettings:
    """Resolution of a stage: tile side in pixels and the most tiles per image."""

    tile_size: int
    max_tiles: int = 4


@dataclass(frozen=True, kw_only=True)
class VideoSettings:
    """Frames sampled per clip and frames the aggregator merges into one (paper: 16 -> 1 in
    pre-training, 64 -> 2 in SFT). ``group_size`` defaults to the model's."""

    num_frames: int = 16
    group_size: int | None = None


@dataclass(frozen=True, kw_only=True)
class Stage:
    """One training stage. See the module docstring; every field is a YAML key."""

    name: str
    trainable: tuple[str, ...]
    data: tuple[DataSource, ...]
    optimizer: OptimizerConfig
    steps: int
    batch_size: int
    objective: str = "lm"
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    grad_accum: int = 1
    max_grad_norm: float | None = 1.0
    precision: str = "fp32"
    image: ImageSettings | None = None
    video: VideoSettings | None = None
    best_rq: BestRqSettings | None = None
    max_seq_len: int = 2048
    start: StartFrom = field(default_factory=StartFrom)
    activation_checkpointing: bool = False
    save_every: int = 0
    keep_last: int = 2
    log_every: int = 10
    num_workers: int = 0
    seed: int | None = None

    def __post_init__(self) -> None:
        trainable = tuple(self.trainable)
        object.__setattr__(self, "trainable", trainable)
        check_trainable(trainable)
        if not trainable:
            raise ValueError("a stage must make at least one component trainable")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"unknown objective {self.objective!r}; known: {list(OBJECTIVES)}")
        if self.best_rq is not None and self.objective != "best_rq":
            raise ValueError("best_rq settings belong to a stage whose objective is best_rq")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        for name in ("steps", "batch_size", "grad_accum", "max_seq_len", "keep_last", "log_every"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not self.data:
            raise ValueError("a stage needs at least one data source")

    @classmethod
    def parse(cls, data: Any, where: str) -> Stage:
        if not isinstance(data, Mapping):
            raise RecipeError(f"{where} must be a mapping")
        d = dict(data)
        name = d.get("name", "?")
        here = f"{where} ({name})"
        if "data" in d:
            sources = d["data"] if isinstance(d["data"], list) else [d["data"]]
            d["data"] = tuple(_build(DataSource, s, f"{here}.data[{i}]") for i, s in enumerate(sources))
        if "optimizer" in d:
            d["optimizer"] = _build(OptimizerConfig, d["optimizer"], f"{here}.optimizer")
        if "schedule" in d:
            d["schedule"] = _build(ScheduleConfig, d["schedule"], f"{here}.schedule")
        if d.get("image") is not None:
            d["image"] = _build(ImageSettings, d["image"], f"{here}.image")
        if d.get("video") is not None:
            d["video"] = _build(VideoSettings, d["video"], f"{here}.video")
        if d.get("best_rq") is not None:
            d["best_rq"] = _build(BestRqSettings, d["best_rq"], f"{here}.best_rq")
        if "start" in d:
            d["start"] = StartFrom.parse(d["start"], f"{here}.start")
        if "trainable" in d and isinstance(d["trainable"], str):
            d["trainable"] = [d["trainable"]]
        return _build(cls, d, here)


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    """The model the first stage starts from.

    Args:
        preset: a model preset (``mm info`` lists them) giving encoder and adapter sizes.
        backbone: a text checkpoint folder (Hugging Face or Meta layout); its sizes replace the
            preset's text sizes. Without it the preset's backbone is used as built (tests only).
        tokenizer: a tokenizer file or folder, or ``"byte"`` for the byte-level tokenizer; by
            default the backbone folder's.
        image_encoder: a safetensors file of pre-trained image encoder weights (mm's names) to
            start from — the paper starts from a contrastively pre-trained ViT.
        checkpoint: start from a saved mm model folder instead.
    """

    preset: str | None = None
    backbone: str | None = None
    tokenizer: str | None = None
    image_encoder: str | None = None
    checkpoint: str | None = None

    def __post_init__(self) -> None:
        if (self.preset is None) == (self.checkpoint is None):
            raise ValueError("model needs exactly one of preset (with a backbone) and checkpoint")


@dataclass(frozen=True, kw_only=True)
class Recipe:
    """A named list of stages and the model the first one starts from."""

    name: str
    model: ModelSpec
    stages: tuple[Stage, ...]
    seed: int = 0
    output_dir: str | None = None
    description: str = ""

    def __post_init__(self) -> None:
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise ValueError(f"stage names must be unique, got {names}")
        if not names:
            raise ValueError("a recipe needs at least one stage")

    def stage(self, name: str) -> Stage:
        for s in self.stages:
            if s.name == name:
                return s
        raise RecipeError(
            f"recipe {self.name!r} has no stage {name!r}; stages: {[s.name for s in self.stages]}"
        )

    def with_paths(self, **substitutions: str) -> Recipe:
        """Replace ``${NAME}`` in every path-like string (shards, checkpoints, backbone)."""

        def sub(value: Any) -> Any:
            if isinstance(value, str):
                for k, v in substitutions.items():
                    value = value.replace("${" + k + "}", str(v))
                return value
            if dataclasses.is_dataclass(value) and not isinstance(value, type):
                return dataclasses.replace(
                    value, **{f.name: sub(getattr(value, f.name)) for f in dataclasses.fields(value)}
                )
            if isinstance(value, tuple):
                return tuple(sub(v) for v in value)
            return value

        return sub(self)


def parse_recipe(data: Any, where: str = "recipe") -> Recipe:
    if not isinstance(data, Mapping):
        raise RecipeError(f"{where} must be a mapping at the top level")
    d = dict(data)
    if "model" in d:
        d["model"] = _build(ModelSpec, d["model"], f"{where}.model")
    if "stages" in d:
        if not isinstance(d["stages"], list):
            raise RecipeError(f"{where}.stages must be a list")
        d["stages"] = tuple(Stage.parse(s, f"{where}.stages[{i}]") for i, s in enumerate(d["stages"]))
    return _build(Recipe, d, where)


def shipped_recipes() -> dict[str, Path]:
    """Recipes that come with mm, by name."""
    folder = resources.files("mm") / "recipes"
    return {Path(p.name).stem: Path(str(p)) for p in folder.iterdir() if p.name.endswith(".yaml")}


def load_recipe(path_or_name: str | os.PathLike) -> Recipe:
    """Read a recipe from a YAML file, or a shipped recipe by name."""
    path = Path(path_or_name)
    if not path.is_file():
        shipped = shipped_recipes()
        if str(path_or_name) not in shipped:
            raise RecipeError(
                f"no recipe file {str(path)!r} and no shipped recipe of that name ({sorted(shipped)})"
            )
        path = shipped[str(path_or_name)]
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise RecipeError(f"{path} is not valid YAML: {e}") from None
    return parse_recipe(data, where=path.name)
