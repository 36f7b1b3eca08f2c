"""The ``mm`` command.

Subcommands are registered by small functions below; each imports what it needs only when run, so
``mm --help`` and ``mm info`` start fast.
"""

from __future__ import annotations

import argparse
import json
import sys

__all__ = ["main"]


def _cmd_info(args: argparse.Namespace) -> int:
    from mm.model.info import describe, format_table

    try:
        info = describe(args.preset)
    except KeyError as e:
        print(f"mm info: {e.args[0]}", file=sys.stderr)
        return 2
    if args.json:
        out = {
            "preset": info["preset"],
            "total_params": info["total_params"],
            "components": [{k: c[k] for k in ("name", "params", "frozen")} for c in info["components"]],
        }
        print(json.dumps(out))
    else:
        print(format_table(info))
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
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


def _cmd_data_pack(args: argparse.Namespace) -> int:
    from mm.datasets.shards import PackError, pack, parse_size

    try:
        result = pack(args.src, args.out, shard_bytes=parse_size(args.shard_size), overwrite=args.overwrite)
    except (PackError, FileExistsError, ValueError) as e:
        print(f"mm data pack: {e}", file=sys.stderr)
        return 2
    print(
        f"wrote {result.samples} samples into {len(result.shards)} shards ({result.bytes / 1e6:.1f} MB) in {result.out_dir}"
    )
    return 0


def _cmd_average(args: argparse.Namespace) -> int:
    from mm.checkpoint.average import average_models
    from mm.text_backbone.checkpoint import CheckpointError

    try:
        average_models(args.models, args.out)
    except (CheckpointError, ValueError) as e:
        print(f"mm average: {e}", file=sys.stderr)
        return 2
    print(f"averaged {len(args.models)} models into {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mm",
        description="Give a frozen Llama 3 text model new senses without changing a single weight of it.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    from mm.demo.run import add_demo_parser
    from mm.serving.app import add_serve_parser
    from mm.serving.ask import add_ask_parser

    add_demo_parser(sub)
    add_ask_parser(sub)
    add_serve_parser(sub)

    from mm.bench.run import add_bench_parser

    add_bench_parser(sub)

    p = sub.add_parser("info", help="components of a preset with parameter counts and memory")
    p.add_argument("--preset", required=True, help="e.g. llama3.1-8b, llama3.2-11b-vision, llama3-405b, tiny")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("train", help="run the stages of a recipe (YAML file or shipped name)")
    p.add_argument("recipe", help="a recipe YAML file, or the name of a shipped one (e.g. tiny-demo)")
    p.add_argument("--stage", action="append", default=[], help="run only this stage (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue from each stage's latest checkpoint")
    p.add_argument("--output-dir", help="where stages write (default: the recipe's output_dir)")
    p.add_argument(
        "--var", action="append", default=[], metavar="NAME=VALUE", help="replace ${NAME} in recipe paths"
    )
    p.add_argument("--fsdp", action="store_true", help="shard with FSDP2 instead of DDP on several processes")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("data", help="data tools")
    data_sub = p.add_subparsers(dest="data_command", required=True, metavar="DATA_COMMAND")
    q = data_sub.add_parser("pack", help="write webdataset shards from a folder or a JSONL manifest")
    q.add_argument("src", help="a folder of files, or a .jsonl manifest")
    q.add_argument("out", help="output folder for shard-NNNNNN.tar and manifest.json")
    q.add_argument("--shard-size", default="64MB", help="target shard size (e.g. 64MB, 1GiB)")
    q.add_argument("--overwrite", action="store_true", help="replace an earlier pack in OUT")
    q.set_defaults(func=_cmd_data_pack)
    from mm.training.cache_features import add_cache_features_parser

    add_cache_features_parser(data_sub)

    p = sub.add_parser("average", help="average the weights of trained models (model soup)")
    p.add_argument("models", nargs="+", help="mm model folders on the same backbone")
    p.add_argument("--out", required=True, help="folder for the averaged model")
    p.set_defaults(func=_cmd_average)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
