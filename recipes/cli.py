"""`hybridzoo train RECIPE [key=value ...] [--resume]` and `hybridzoo distill ...`: thin wrappers over
`hybridzoo.recipes.train` and `hybridzoo.recipes.distill`, which take the same recipe, overrides and `--resume`.
`--help` lists every recipe key with its type, default and help, read from the recipe schema (recipes/recipe.py).

Several processes: `accelerate launch [--multi_gpu --num_processes N] -m hybridzoo.cli train RECIPE ...`
(on CPU prefix `ACCELERATE_USE_CPU=1` to get gloo DDP).
"""

from __future__ import annotations

import argparse
import sys

import hybridzoo.recipes as recipes
from hybridzoo.configs.settings import add_command, describe
from hybridzoo.recipes.recipe import Recipe, RecipeRun


def add_arguments(parser: argparse.ArgumentParser, recipe_function: str = "train") -> None:
    def run(settings: RecipeRun) -> int:
        try:
            getattr(recipes, recipe_function)(settings)
        except recipes.RecipeError as error:
            print(f"recipe error: {error}", file=sys.stderr)
            return 2
        return 0

    add_command(parser, RecipeRun, run)
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = "recipe keys (in the YAML file, or overridden as key=value):\n" + "\n".join(
        f"  {line}" for line in describe(Recipe))


def add_distill_arguments(parser: argparse.ArgumentParser) -> None:
    add_arguments(parser, "distill")
