"""``mm train`` and ``mm data pack``: the training commands (arguments: :mod:`mm.cli`)."""

from __future__ import annotations

import argparse
import sys

__all__ = ["run_pack", "run_train"]


def run_train(args: argparse.Namespace) -> int:
    """``mm train``: the stages of a recipe, each from where the last ended."""
    from mm.training.recipe import RecipeError, load_recipe
    from mm.training.trainer import BackboneChanged, Trainer, summary_table

    try:
        recipe = load_recipe(args.recipe)
        variables = dict(v.split("=", 1) for v in args.var)
        recipe = recipe.with_paths(**variables)
        trainer = Trainer(recipe, output_dir=args.output_dir, fsdp=args.fsdp)
        results = trainer.run(stages=args.stage or None, resume=args.resume)
    except (RecipeError, BackboneChanged) as e:
        print(f"mm train: {e}", file=sys.stderr)
        return 2
    if trainer.accelerator.is_main_process:
        print(summary_table(results))
    return 0


def run_pack(args: argparse.Namespace) -> int:
    """``mm data pack``: webdataset shards from a folder or a JSONL manifest."""
    from mm.datasets.shards import PackError, pack, parse_size

    try:
        result = pack(args.src, args.out, shard_bytes=parse_size(args.shard_size), overwrite=args.overwrite)
    except (PackError, FileExistsError, ValueError) as e:
        print(f"mm data pack: {e}", file=sys.stderr)
        return 2
    print(
        f"wrote {result.samples} samples into {len(result.shards)} shards ({result.bytes / 1e6:.1f} MB) "
        f"in {result.out_dir}"
    )
    return 0
