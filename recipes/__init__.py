"""Training recipes: declarative YAML files run with `hybridzoo train`, on one process or many with accelerate.

    from hybridzoo.recipes import distill, train
    train("pretrain_stdlib", overrides=["train.max_steps=50", "output_dir=outputs/try"])

    distill("distill_stdlib")  # a pretrained transformer into a Gated DeltaNet (or Mamba-2) hybrid (recipes/distill.py)

The training loop (torch, accelerate) is imported only when `train` or `distill` is called.
"""

from __future__ import annotations

from pathlib import Path

from hybridzoo.recipes.recipe import Recipe, RecipeError, load_recipe


def train(recipe: str | Path | dict | Recipe, overrides: list[str] | dict | None = None, resume: bool = False) -> dict:
    """Run a recipe (a YAML path, a shipped recipe name, a dict or a `Recipe`) with optional `key=value` overrides."""
    from hybridzoo.recipes.trainer import train as run

    return run(recipe, overrides=overrides, resume=resume)


def distill(recipe: str | Path | dict | Recipe, overrides: list[str] | dict | None = None,
            resume: bool = False) -> dict:
    """Run a `kind: distill` recipe: a student hybrid from the teacher `model.from_pretrained`, both stages, the
    from-scratch baseline and the report (see recipes/distill.py)."""
    from hybridzoo.recipes.distill import distill as run

    return run(recipe, overrides=overrides, resume=resume)


__all__ = ["Recipe", "RecipeError", "distill", "load_recipe", "train"]
