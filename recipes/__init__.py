"""Training recipes: declarative YAML files run with `hybridzoo train`, on one process or many with accelerate.

    from hybridzoo.recipes import distill, train
    train("pretrain_stdlib", overrides=["train.max_steps=50", "output_dir=outputs/try"])

    distill("distill_stdlib")  # a transformer into a Gated DeltaNet (or Mamba-2) hybrid (recipes/distillation.py)

The training loop (torch, accelerate) is imported only when `train` or `distill` is called.
"""

from __future__ import annotations

from hybridzoo.configs.settings import takes_settings
from hybridzoo.recipes.recipe import Recipe, RecipeError, RecipeRun, load_recipe


@takes_settings(RecipeRun)
def train(settings: RecipeRun) -> dict:
    """Run a recipe (a YAML path, a shipped recipe name, a dict or a `Recipe`) with optional `key=value` overrides:
    `train(recipe, overrides=None, resume=False)`, or `train(RecipeRun(...))`."""
    from hybridzoo.recipes.trainer import train as run

    return run(settings.recipe, overrides=settings.overrides, resume=settings.resume)


@takes_settings(RecipeRun)
def distill(settings: RecipeRun) -> dict:
    """Run a `kind: distill` recipe: a student hybrid from the teacher `model.from_pretrained`, both stages, the
    from-scratch baseline and the report (see recipes/distillation.py). Takes what `train` takes."""
    from hybridzoo.recipes.distillation import distill as run

    return run(settings.recipe, overrides=settings.overrides, resume=settings.resume)


__all__ = ["Recipe", "RecipeError", "RecipeRun", "distill", "load_recipe", "train"]
