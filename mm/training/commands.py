"""``mm train`` and ``mm data pack``: the training commands (arguments: :mod:`mm.cli`)."""

from __future__ import annotations

import argparse
import sys

__all__ = ["run_pack", "run_train"]


def run_train(args: argparse.Namespace) -> int:
    """``mm train``: the stages of a recipe, each from where the last ended.

    A user's error — the recipe (a key, a value, a path, an output folder holding another run), the
    data (a truncated shard), a checkpoint or backbone folder, a disk refusing a write, a backbone
    that changed — is one line on stderr naming the key or the file, and exit code 2. Anything else
    is a bug in mm and raises.
    """
    from mm.datasets.webdata import DataError
    from mm.text_backbone.checkpoint import CheckpointError
    from mm.training.recipe import RecipeError, load_recipe
    from mm.training.state import WriteError
    from mm.training.trainer import BackboneChanged, Trainer, summary_table

    try:
        recipe = load_recipe(args.recipe)
        bad = [v for v in args.var if "=" not in v or not v.split("=", 1)[0]]
        if bad:
            raise RecipeError(f"--var {bad[0]!r}: expected NAME=VALUE")
        recipe = recipe.with_paths(**dict(v.split("=", 1) for v in args.var))
        trainer = Trainer(recipe, output_dir=args.output_dir, fsdp=args.fsdp)
        results = trainer.run(stages=args.stage or None, resume=args.resume, replace=args.replace)
    except (RecipeError, BackboneChanged, DataError, CheckpointError, WriteError) as e:
        print(f"mm train: {_one_line(e)}", file=sys.stderr)
        return 2
    if trainer.accelerator.is_main_process:
        print(summary_table(results))
    return 0


def _one_line(error: BaseException) -> str:
    """An error's message on one line. An error raised in a DataLoader worker arrives with the
    worker's traceback in its message: only its last line, the error itself, is kept."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if any(line.startswith("Original Traceback") for line in lines):
        last = lines[-1]
        name = type(error).__name__
        return last.split(f"{name}: ", 1)[1] if f"{name}: " in last else last
    return " ".join(lines) or type(error).__name__


def run_pack(args: argparse.Namespace) -> int:
    """``mm data pack``: webdataset shards from a folder, a JSONL manifest, or (``--from FORMAT``) a
    published dataset layout read by :mod:`mm.datasets.importers`."""
    from mm.datasets.shards import PackError, pack, parse_size

    fmt = getattr(args, "from_format", None)
    try:
        if fmt is None:
            given = [
                f"--{n.replace('_', '-')}"
                for n in ("media_root", "split", "prompt")
                if getattr(args, n, None)
            ]
            if given or getattr(args, "column", []):
                raise ValueError(f"{(given or ['--column'])[0]} needs --from FORMAT")
            result = pack(
                args.src,
                args.out,
                shard_bytes=parse_size(args.shard_size),
                overwrite=args.overwrite,
                allow_outside_source=args.allow_outside_source,
            )
        else:
            from mm.datasets.importers import pack_from

            options = {
                k: getattr(args, k) for k in ("media_root", "split", "prompt") if getattr(args, k) is not None
            }
            if args.column:
                bad = [c for c in args.column if "=" not in c or not c.split("=", 1)[0]]
                if bad:
                    raise ValueError(f"--column {bad[0]!r}: expected ROLE=COLUMN")
                options["columns"] = dict(c.split("=", 1) for c in args.column)
            result = pack_from(
                fmt,
                args.src,
                args.out,
                options=options,
                shard_bytes=parse_size(args.shard_size),
                overwrite=args.overwrite,
                allow_outside_source=args.allow_outside_source,
            )
    except (PackError, OSError, ValueError) as e:  # OSError: FileExistsError, or OUT not writable
        print(f"mm data pack: {e}", file=sys.stderr)
        return 2
    print(
        f"wrote {result.samples} samples into {len(result.shards)} shards ({result.bytes / 1e6:.1f} MB) "
        f"in {result.out_dir}"
    )
    return 0
