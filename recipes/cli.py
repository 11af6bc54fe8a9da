"""`hybridzoo train RECIPE [key=value ...] [--resume]`: a thin wrapper over `hybridzoo.recipes.train`.

Several processes: `accelerate launch [--multi_gpu --num_processes N] -m hybridzoo.cli train RECIPE ...`
(on CPU prefix `ACCELERATE_USE_CPU=1` to get gloo DDP).
"""

from __future__ import annotations

import argparse
import sys


def run(args: argparse.Namespace) -> int:
    from hybridzoo.recipes import RecipeError, train

    try:
        train(args.recipe, overrides=args.overrides, resume=args.resume)
    except RecipeError as error:
        print(f"recipe error: {error}", file=sys.stderr)
        return 2
    return 0


def add_arguments(parser) -> None:
    parser.add_argument("recipe", help="a recipe YAML file, or a shipped recipe name such as pretrain_stdlib")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.max_steps=100")
    parser.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
    parser.set_defaults(handler=run)
