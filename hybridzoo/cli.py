"""The `hybridzoo` command line: the one list of subcommands, each a thin wrapper over a Python function.

`SUBCOMMANDS` maps each name to the module that declares its options (`add_arguments(parser)`, or
`module:function` when one module declares two commands) and a one-line help. Each command's options are generated
from its settings dataclass (`hybridzoo.configs.settings.add_command`: flags, types, choices, defaults and help, and
the `handler` run with the parsed arguments); none is typed here or by hand. Only the module of the subcommand being
run is imported, so `hybridzoo --help` and `hybridzoo push --help` need neither torch nor transformers. A mistyped
flag gets "did you mean" (`SettingsParser`).
`python -m hybridzoo.cli ...` works too (it imports the package normally, so it starts slower).
"""

from __future__ import annotations

import argparse
import importlib
import sys

import hybridzoo
from hybridzoo.configs.settings import SettingsParser

SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "quickstart": ("hybridzoo.quickstart", "train, evaluate, publish and reload a small hybrid, end to end"),
    "zoo": ("hybridzoo.configs.zoo", "list the zoo's architectures, or show one config"),
    "train": ("hybridzoo.recipes.cli", "train a model from a YAML recipe (pretraining, tasks, LoRA, ...)"),
    "distill": (
        "hybridzoo.recipes.cli:add_distill_arguments",
        "turn a pretrained transformer into a Gated DeltaNet hybrid (align, then logit distillation)",
    ),
    "eval": ("hybridzoo.evaluation.harness", "run the retrieval / long-context eval suites on models"),
    "compare": ("hybridzoo.recipes.compare", "train zoo architectures on one synthetic task, side by side"),
    "push": ("hybridzoo.hub", "upload a saved model or adapter folder to the Hugging Face Hub"),
    "convert": (
        "hybridzoo.convert",
        "convert a transformers checkpoint (Llama, Qwen3-Next, Qwen3.5, RecurrentGemma, xLSTM) to hybridzoo",
    ),
    "export": (
        "hybridzoo.convert:add_export_arguments",
        "write a hybridzoo model folder as a native transformers checkpoint (llama, qwen3_next)",
    ),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser with every subcommand listed; only `command`'s module is imported to declare its options."""
    parser = SettingsParser(prog="hybridzoo", description="Hybrid language models for transformers.")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        subparser = subparsers.add_parser(name, help=help_text, description=help_text)
        if name == command:
            module_name, _, function_name = module_name.partition(":")
            getattr(importlib.import_module(module_name), function_name or "add_arguments")(subparser)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = argv[0] if argv and argv[0] in SUBCOMMANDS else None
    args = build_parser(command).parse_args(argv)
    hybridzoo.register()  # a command may load saved models through transformers' Auto classes
    result = args.handler(args)
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    raise SystemExit(main())
