"""`hybridzoo train RECIPE [key=value ...] [--resume]` and `hybridzoo distill ...`: thin wrappers over
`hybridzoo.recipes.train` and `hybridzoo.recipes.distill`, which take the same recipe, overrides and `--resume`.

Several processes: `accelerate launch [--multi_gpu --num_processes N] -m hybridzoo.cli train RECIPE ...`
(on CPU prefix `ACCELERATE_USE_CPU=1` to get gloo DDP).
"""

from __future__ import annotations

import argparse
import sys


def run(args: argparse.Namespace) -> int:
    import hybridzoo.recipes as recipes

    try:
        getattr(recipes, args.recipe_function)(args.recipe, overrides=args.overrides, resume=args.resume)
    except recipes.RecipeError as error:
        print(f"recipe error: {error}", file=sys.stderr)
        return 2
    return 0


def add_arguments(parser, recipe_function: str = "train", example: str = "train.max_steps=100") -> None:
    parser.add_argument("recipe", help=f"a recipe YAML file, or a shipped recipe name (hybridzoo {recipe_function})")
    parser.add_argument("overrides", nargs="*", help=f"dotted key=value overrides, e.g. {example}")
    parser.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
    parser.set_defaults(handler=run, recipe_function=recipe_function)


def add_distill_arguments(parser) -> None:
    add_arguments(parser, "distill", "distill.align_steps=50")
