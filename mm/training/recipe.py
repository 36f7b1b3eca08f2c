"""Training recipes: stages as data (YAML), each stating exactly what may learn.

A recipe names the model to start from and a list of stages (Llama 3 paper, sections 7.4 and 8.2:
image adapter pre-training, annealing, video adapter, supervised fine-tuning with a hot-swapped
instruct backbone, speech stages). Every stage states its objective, data mix, the components that
learn (everything else is frozen), optimiser and schedule, batch and accumulation, resolution,
steps, and where it starts. Unknown keys anywhere are errors, so a typo never silently changes a run;
every value is checked for its type (:func:`mm._strict.build`) and its range (each dataclass's
``__post_init__``) before any work starts, and an error names the key path
(``stages[0].optimizer.lr``). The ranges:

=========================================  ===========================================================
``seed`` (recipe), ``stages[].seed``       an int >= 0 (a stage's may be null: the recipe's)
``steps``, ``batch_size``, ``grad_accum``  ints >= 1
``max_seq_len``, ``keep_last``,            ints >= 1
``log_every``
``pack``                                   a bool: pack each micro-batch's samples into rows of
                                           ``max_seq_len`` tokens (objective ``lm`` only)
``save_every``, ``num_workers``            ints >= 0 (``save_every: 0``: only the final checkpoint)
``max_grad_norm``                          a number > 0, or null (no clipping); a negative one
                                           would flip the gradients
``optimizer.lr``                           in (0, 1)
``optimizer.betas``                        two numbers in [0, 1)
``optimizer.eps``                          > 0
``optimizer.weight_decay``                 >= 0
``optimizer.lr_scale``                     factors > 0 (freezing is ``trainable``'s job)
``schedule.warmup_steps``                  an int >= 0, and less than ``steps`` (as written in YAML)
``schedule.min_lr_ratio``                  in [0, 1]
``image.tile_size``, ``image.max_tiles``   ints >= 1 (the tile also a multiple of the patch size)
``video.num_frames``, ``video.group_size``  ints >= 1, the frames a multiple of the group
``data[].weight``                          > 0
``data[].max_bad_fraction``                in [0, 1]
``data[].shuffle_buffer``                  an int >= 0
``best_rq``                                ``codebook_size`` >= 2, ``proj_dim``, ``num_codebooks``,
                                           ``span`` >= 1, ``mask_prob`` in (0, 1],
                                           ``noise_std`` >= 0, ``seed`` >= 0
``reward`` (objective ``reward``)          ``square_weight`` >= 0, ``heldout`` shards or null,
                                           ``heldout_batch_size``, ``max_heldout`` >= 1
``dpo`` (objective ``dpo``)                :class:`mm.training.dpo.DpoSettings`' own checks
``name`` (stage)                           a folder name: letters, digits, ``.``, ``_``, ``-``
paths and names                            non-empty strings
=========================================  ===========================================================

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
from mm._values import ConfigValueError, as_bool, as_int, check_values, optional
from mm.model.components import check_trainable
from mm.training._ranges import fraction, nullable, number, pair, scales, text, texts
from mm.training.dpo import DpoSettings
from mm.training.objectives import BestRqSettings
from mm.training.reward import RewardSettings

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

OBJECTIVES = ("lm", "best_rq", "reward", "dpo")
#: The settings block each objective may have (``reward:`` belongs to a reward stage, ...).
_SETTINGS_BLOCKS = ("best_rq", "reward", "dpo")
PRECISIONS = ("fp32", "bf16")


class RecipeError(ValueError):
    """A recipe that cannot be run as written."""


def _build(cls, data: Any, where: str, path: str | None = None):
    """Construct dataclass ``cls`` from a mapping, refusing unknown keys, missing required ones, and
    values of the wrong type or out of range (errors name the key path)."""
    return build(cls, data, where, error=RecipeError, path=path)


#: A stage's name is its output folder's.
_STAGE_NAME = text(r"[A-Za-z0-9][A-Za-z0-9._-]*", "a folder name (letters, digits, '.', '_', '-')")


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
        check_values(
            self,
            {
                "shards": text(),
                "weight": number(low=0, low_open=True),
                "max_bad_fraction": fraction(),
                "shuffle_buffer": as_int(minimum=0),
            },
        )


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
        check_values(
            self,
            {
                "lr": number(low=0, high=1, low_open=True, high_open=True, why="AdamW diverges at 1"),
                "weight_decay": number(low=0),
                "betas": pair(number(low=0, high=1, high_open=True)),
                "eps": number(low=0, low_open=True),
                "lr_scale": scales(number(low=0, low_open=True, why="freezing is the trainable list's job")),
            },
        )


@dataclass(frozen=True, kw_only=True)
class ScheduleConfig:
    """Linear warm-up to the peak learning rate, then cosine decay to ``min_lr_ratio`` of it."""

    warmup_steps: int = 0
    min_lr_ratio: float = 0.0

    def __post_init__(self) -> None:
        check_values(self, {"warmup_steps": as_int(minimum=0), "min_lr_ratio": fraction()})


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
        check_values(self, {"path": optional(text())})
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
            if kind in ("checkpoint", "hot_swap") and not isinstance(path, str):
                raise RecipeError(f"{where}.{kind}: expected a path (a string), got {path!r}")
            return _build(cls, {"kind": kind, "path": path}, where)
        raise RecipeError(
            f"{where} must be 'previous', {{checkpoint: PATH}} or {{hot_swap: PATH}}; got {value!r}"
        )


@dataclass(frozen=True, kw_only=True)
class ImageSettings:
    """Resolution of a stage: tile side in pixels and the most tiles per image."""

    tile_size: int
    max_tiles: int = 4

    def __post_init__(self) -> None:
        check_values(self, {"tile_size": as_int(minimum=1), "max_tiles": as_int(minimum=1)})


@dataclass(frozen=True, kw_only=True)
class VideoSettings:
    """Frames sampled per clip and frames the aggregator merges into one (paper: 16 -> 1 in
    pre-training, 64 -> 2 in SFT). ``group_size`` defaults to the model's."""

    num_frames: int = 16
    group_size: int | None = None

    def __post_init__(self) -> None:
        check_values(self, {"num_frames": as_int(minimum=1), "group_size": optional(as_int(minimum=1))})
        if self.group_size is not None and self.num_frames % self.group_size:
            raise ConfigValueError(
                f"must divide num_frames ({self.num_frames}), got {self.group_size}", key="group_size"
            )


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
    reward: RewardSettings | None = None
    dpo: DpoSettings | None = None
    max_seq_len: int = 2048
    pack: bool = False
    start: StartFrom = field(default_factory=StartFrom)
    activation_checkpointing: bool = False
    save_every: int = 0
    keep_last: int = 2
    log_every: int = 10
    num_workers: int = 0
    seed: int | None = None

    def __post_init__(self) -> None:
        positive, counts = as_int(minimum=1), as_int(minimum=0)
        check_values(
            self,
            {
                "name": _STAGE_NAME,
                "trainable": texts(),
                "steps": positive,
                "batch_size": positive,
                "grad_accum": positive,
                "max_grad_norm": nullable(
                    number(low=0, low_open=True, why="a negative norm flips the gradients"), "no clipping"
                ),
                "max_seq_len": positive,
                "pack": as_bool(),
                "activation_checkpointing": as_bool(),
                "save_every": counts,
                "keep_last": positive,
                "log_every": positive,
                "num_workers": counts,
                "seed": optional(as_int(minimum=0)),
            },
        )
        object.__setattr__(self, "data", tuple(self.data))
        try:
            check_trainable(self.trainable)
        except ValueError as e:
            raise ConfigValueError(str(e), key="trainable") from None
        if not self.trainable:
            raise ConfigValueError("must name at least one component", key="trainable")
        if self.objective not in OBJECTIVES:
            raise ConfigValueError(
                f"unknown objective {self.objective!r}; known: {list(OBJECTIVES)}", key="objective"
            )
        for block in _SETTINGS_BLOCKS:
            if getattr(self, block) is not None and self.objective != block:
                raise ConfigValueError(f"belongs to a stage whose objective is {block}", key=block)
        if self.pack and self.objective != "lm":
            raise ConfigValueError(
                f"packs samples into rows for the lm objective only, not {self.objective}", key="pack"
            )
        if self.precision not in PRECISIONS:
            raise ConfigValueError(
                f"must be one of {list(PRECISIONS)}, got {self.precision!r}", key="precision"
            )
        if not self.data:
            raise ConfigValueError("a stage needs at least one data source", key="data")

    @classmethod
    def parse(cls, data: Any, where: str) -> Stage:
        """A stage as written in YAML (``where`` is its key path, ``stages[0]``). Beyond the
        fields' own checks, a recipe as written must warm up for fewer steps than it has."""
        if not isinstance(data, Mapping):
            raise RecipeError(f"{where}: expected a mapping, got {type(data).__name__}")
        d = dict(data)
        if "data" in d and not isinstance(d["data"], list):
            d["data"] = [d["data"]]  # one source may be written without the list
        if "start" in d:
            d["start"] = StartFrom.parse(d["start"], f"{where}.start")
        if "trainable" in d and isinstance(d["trainable"], str):
            d["trainable"] = [d["trainable"]]
        stage = _build(cls, d, where)
        warmup = stage.schedule.warmup_steps
        if warmup and warmup >= stage.steps:
            raise RecipeError(
                f"{where}.schedule.warmup_steps: must be less than steps ({stage.steps}), got {warmup}"
            )
        return stage


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
        check_values(self, {f.name: optional(text()) for f in dataclasses.fields(self)})
        if (self.preset is None) == (self.checkpoint is None):
            raise ValueError("needs exactly one of preset (with a backbone) and checkpoint")
        if self.checkpoint is not None:
            extra = [n for n in ("backbone", "tokenizer", "image_encoder") if getattr(self, n) is not None]
            if extra:
                raise ValueError(
                    f"a checkpoint brings its own backbone, tokenizer and encoders; remove {extra}"
                )


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
        check_values(self, {"name": text(), "seed": as_int(minimum=0), "output_dir": optional(text())})
        object.__setattr__(self, "stages", tuple(self.stages))
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
    """A recipe from what YAML read. Errors name the key path from the top (``stages[0].steps``,
    ``model.backbone``, ``seed``); ``where`` names the whole in messages about its keys."""
    if not isinstance(data, Mapping):
        raise RecipeError(f"{where} must be a mapping at the top level")
    d = dict(data)
    if "stages" in d:
        if not isinstance(d["stages"], list):
            raise RecipeError(f"stages: expected a list, got {type(d['stages']).__name__}")
        d["stages"] = tuple(Stage.parse(s, f"stages[{i}]") for i, s in enumerate(d["stages"]))
    return _build(Recipe, d, where, path="")


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
    try:
        return parse_recipe(data, where="recipe")
    except RecipeError as e:
        raise RecipeError(f"{path.name}: {e}") from None
