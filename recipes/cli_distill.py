"""`hybridzoo distill RECIPE [key=value ...] [--resume]`: a thin wrapper over `hybridzoo.recipes.distill`."""

from __future__ import annotations

import argparse
import sys


def run(args: argparse.Namespace) -> int:
    from hybridzoo.recipes import RecipeError, distill

    try:
        distill(args.recipe, overrides=args.overrides, resume=args.resume)
    except RecipeError as error:
        print(f"recipe error: {error}", file=sys.stderr)
        return 2
    return 0


def add_arguments(parser) -> None:
    parser.add_argument("recipe", help="a distill recipe YAML file, or a shipped one such as distill_stdlib")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. distill.align_steps=50")
    parser.add_argument("--resume", action="store_true", help="continue every stage from its newest checkpoint")
    parser.set_defaults(handler=run)
