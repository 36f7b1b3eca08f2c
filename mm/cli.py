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
    from mm.info import describe, format_table

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mm",
        description="Give a frozen Llama 3 text model new senses without changing a single weight of it.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("info", help="components of a preset with parameter counts and memory")
    p.add_argument("--preset", required=True, help="e.g. llama3.1-8b, llama3.2-11b-vision, llama3-405b, tiny")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
