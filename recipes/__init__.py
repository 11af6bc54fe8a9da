"""Training recipes: declarative YAML files run with `hybridzoo train`, on one process or many with accelerate.

    from hybridzoo.recipes import train
    train("pretrain_stdlib", overrides=["train.max_steps=50", "output_dir=outputs/try"])

The training loop (torch, accelerate) is imported only when `train` is called.
"""

from __future__ import annotations

from pathlib import Path

from hybridzoo.recipes.recipe import Recipe, RecipeError, load_recipe


def train(recipe: str | Path | dict | Recipe, overrides: list[str] | dict | None = None, resume: bool = False) -> dict:
    """Run a recipe (a YAML path, a shipped recipe name, a dict or a `Recipe`) with optional `key=value` overrides."""
    from hybridzoo.recipes.trainer import train as run

    return run(recipe, overrides=overrides, resume=resume)


__all__ = ["Recipe", "RecipeError", "load_recipe", "train"]
