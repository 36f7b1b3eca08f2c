"""Staged training (Llama 3 paper, sections 7.4 and 8.2): recipes, the trainer, stage data, training
state, objectives, metrics and the frame-feature cache of video stages."""

from mm.training.recipe import Recipe, RecipeError, Stage, load_recipe
from mm.training.trainer import BackboneChanged, StageResult, Trainer

__all__ = ["BackboneChanged", "Recipe", "RecipeError", "Stage", "StageResult", "Trainer", "load_recipe"]
