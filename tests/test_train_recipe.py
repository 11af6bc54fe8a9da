"""Recipe validation: every shipped recipe loads; mistakes stop with the key's name and the fix."""

from pathlib import Path

import pytest

from hybridzoo.recipes import RecipeError, load_recipe
from hybridzoo.recipes.recipe import RECIPE_DIR

SHIPPED = sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))


def test_the_four_kinds_of_recipe_ship():
    assert {"pretrain_stdlib", "retrieval_mqar", "lora_stdlib", "classify_shuffled_lines"} <= set(SHIPPED)


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_recipes_validate(name, tmp_path):
    overrides = [f"output_dir={tmp_path}/out"]
    if "from_pretrained" in (RECIPE_DIR / f"{name}.yaml").read_text():
        overrides.append(f"model.from_pretrained={tmp_path}")  # any existing folder passes validation
    recipe = load_recipe(name, overrides)
    assert recipe.output_dir == f"{tmp_path}/out"


def test_overrides_are_parsed_as_yaml(tmp_path):
    recipe = load_recipe("pretrain_stdlib", ["train.lr=3e-4", "train.betas=[0.8, 0.9]", "model.zoo=lstm",
                                             f"output_dir={tmp_path}", "model.overrides.hidden_size=32"])
    assert recipe.train.lr == 3e-4 and recipe.train.betas == [0.8, 0.9]
    assert recipe.model.zoo == "lstm" and recipe.model.overrides == {"hidden_size": 32}


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("train.learning_rate=1e-3", "train.learning_rate: unknown key; did you mean `train.lr`?"),
        ("trian.lr=1e-3", "trian: unknown key; did you mean `train`?"),
        ("train.max_steps=ten", "train.max_steps: expected int, got 'ten'"),
        ("train.gradient_checkpointing=1", "train.gradient_checkpointing: expected bool"),
        ("train.lr=-1", "train.lr: the learning rate must be positive"),
        ("train.warmup_steps=5000", "train.warmup_steps: warm-up must be shorter than train.max_steps (1000)"),
        ("train.precision=fp16", "train.precision: use fp32 or bf16"),
        ("model.zoo=gpt", "model.zoo: unknown architecture 'gpt'"),
        ("model.size=huge", "model.size: unknown size 'huge'"),
        ("data.source=web", "data.source: choose one of"),
        ("peft.enabled=true", "peft.enabled: LoRA fine-tunes a saved model"),
        ("model.head=sequence_classification", "data.source: a classifier needs labelled data"),
    ],
)
def test_mistakes_name_the_key_and_the_fix(override, expected, tmp_path):
    with pytest.raises(RecipeError) as error:
        load_recipe("pretrain_stdlib", [override, f"output_dir={tmp_path}"])
    assert expected in str(error.value)


def test_both_or_neither_model_source_is_an_error(tmp_path):
    with pytest.raises(RecipeError, match="model.zoo: set exactly one of"):
        load_recipe("pretrain_stdlib", [f"model.from_pretrained={tmp_path}", f"output_dir={tmp_path}"])


def test_missing_output_dir_and_missing_files(tmp_path):
    with pytest.raises(RecipeError, match="output_dir: required key is missing"):
        load_recipe({"model": {"zoo": "lstm"}})
    with pytest.raises(RecipeError, match="data.paths: .*does not exist"):
        load_recipe({"output_dir": str(tmp_path), "model": {"zoo": "lstm"},
                     "data": {"source": "files", "paths": [str(Path(tmp_path) / "nope.txt")]}})
