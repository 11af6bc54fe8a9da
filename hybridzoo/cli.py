"""The `hybridzoo` command line. Every subcommand is a thin wrapper over a Python function users can call.

Each module listed in `SUBCOMMAND_MODULES` defines `add_subcommand(subparsers)`, which adds its parser and sets
`handler` (a function taking the parsed arguments). Modules are imported only when the command line is built.
"""

from __future__ import annotations

import argparse
import importlib

SUBCOMMAND_MODULES = [
    "hybridzoo.quickstart",
    "hybridzoo.configs.zoo",
    "hybridzoo.recipes.cli",
    "hybridzoo.hub",
    "hybridzoo.convert",
    "hybridzoo.evaluation.harness",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hybridzoo", description="Hybrid language models for transformers.")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for module_name in SUBCOMMAND_MODULES:
        importlib.import_module(module_name).add_subcommand(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result = args.handler(args)
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    raise SystemExit(main())
