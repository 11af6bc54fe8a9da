"""The `hybridzoo` command line. Every subcommand is a thin wrapper over a Python function."""

from __future__ import annotations

import argparse
from dataclasses import fields


def _add_quickstart(subparsers) -> None:
    from hybridzoo.quickstart import QuickstartSettings

    parser = subparsers.add_parser(
        "quickstart", help="train a small zoo hybrid on this machine's Python sources, save, reload and sample"
    )
    for setting in fields(QuickstartSettings):
        parser.add_argument(f"--{setting.name.replace('_', '-')}", type=type(setting.default), default=setting.default)
    parser.set_defaults(handler=_run_quickstart)


def _run_quickstart(args: argparse.Namespace) -> None:
    from hybridzoo.quickstart import QuickstartSettings, run_quickstart

    run_quickstart(QuickstartSettings(**{f.name: getattr(args, f.name) for f in fields(QuickstartSettings)}))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hybridzoo", description="Hybrid language models for transformers.")
    subparsers = parser.add_subparsers(dest="command", required=True)
    _add_quickstart(subparsers)
    args = parser.parse_args(argv)
    args.handler(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
