"""Model cards for saved hybridzoo models and PEFT adapters, built from what the training and eval runs left behind.

`build_model_card(folder, repo_id=...)` reads the folder (see `hybridzoo.hub` for the layout) and returns a
`huggingface_hub.ModelCard`: Hub metadata (library, pipeline tag, licence, block-type tags, base model, datasets and a
`model-index` from `eval/results.jsonl`) and a body with the layer pattern, sizes, the training recipe, the eval table
and plots, usage snippets and limitations. Only config.json + weights are required; every other section is written
when its source file exists.
"""

from __future__ import annotations

import json
import math
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

import yaml
from huggingface_hub import EvalResult, ModelCard, ModelCardData

PROJECT_URL = "https://github.com/hybridzoo/hybridzoo"
DEFAULT_LICENSE = "apache-2.0"
EVAL_RESULTS = "eval/results.jsonl"
EVAL_KEYS = ("architecture", "task", "length", "depth", "metric", "value")
# a Hub repo id (owner/name); anything else (a local folder, a bare name) cannot be a card's `base_model`
REPO_ID_PATTERN = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

# licence ids the real Hub accepts, enough to check a card before upload (the Hub's list is longer)
KNOWN_LICENSES = {
    "apache-2.0", "mit", "bsd-3-clause", "bsd-2-clause", "cc-by-4.0", "cc-by-sa-4.0", "cc-by-nc-4.0", "cc0-1.0",
    "gpl-3.0", "lgpl-3.0", "agpl-3.0", "mpl-2.0", "openrail", "creativeml-openrail-m", "bigscience-openrail-m",
    "llama2", "llama3", "gemma", "unlicense", "other",
}


class ModelCardError(ValueError):
    """The folder's files cannot be turned into a valid card (the message says which file and what to fix)."""


def is_hub_repo_id(name: str | None) -> bool:
    return bool(name) and REPO_ID_PATTERN.match(name) is not None and not Path(name).exists()


def validate_card_metadata(content: str) -> list[str]:
    """Errors the Hub would report for a README.md's metadata (a subset of its checks), via huggingface_hub's parser."""
    try:
        card = ModelCard(content)  # parses YAML and `model-index` exactly as huggingface_hub does
    except (ValueError, TypeError) as error:
        return [str(error)]
    data = card.data.to_dict()
    errors = []
    if "license" in data and data["license"] not in KNOWN_LICENSES:
        errors.append(f'"license" must be one of the Hub\'s licence ids, got {data["license"]!r}')
    for key in ("tags", "datasets", "metrics", "base_model", "language"):
        value = data.get(key)
        if value is not None and not (isinstance(value, str) or
                                      (isinstance(value, list) and all(isinstance(v, str) for v in value))):
            errors.append(f'"{key}" must be a string or a list of strings')
    for key in ("library_name", "pipeline_tag"):
        if key in data and not isinstance(data[key], str):
            errors.append(f'"{key}" must be a string')
    return errors


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ModelCardError(f"Cannot read {path}: {error}") from error


def read_recipe(folder: Path) -> dict:
    """The resolved training recipe (`recipe.yaml`), or {} when the model was not trained by a recipe."""
    path = folder / "recipe.yaml"
    if not path.exists():
        return {}
    recipe = yaml.safe_load(path.read_text()) or {}
    if not isinstance(recipe, dict):
        raise ModelCardError(f"{path} is not a YAML mapping.")
    return recipe


def read_eval_results(folder: Path) -> list[dict]:
    """The eval harness's long-format rows (`eval/results.jsonl`); a malformed line is an error naming the line."""
    path = folder / EVAL_RESULTS
    if not path.exists():
        return []
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise ModelCardError(f"{path}:{number} is not JSON ({error}).") from error
        missing = [key for key in EVAL_KEYS if key not in row]
        if missing:
            raise ModelCardError(f"{path}:{number} lacks {missing}; the eval harness writes {list(EVAL_KEYS)}.")
        rows.append(row)
    return rows


def rows_of_model(rows: list[dict], model_name: str) -> list[dict]:
    """This model's rows of an eval file that may compare several models: those whose `model` field is its name
    (the folder name, as `hybridzoo eval` writes it). Files without that field are returned whole."""
    if len({row.get("model") for row in rows}) > 1 and any(row.get("model") == model_name for row in rows):
        return [row for row in rows if row.get("model") == model_name]
    return rows


def summarize_eval(rows: list[dict]) -> list[dict]:
    """One entry per (architecture, task, length, depth, metric): the mean over seeds, its CI when given, n seeds."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        groups[tuple(row[key] for key in EVAL_KEYS[:5])].append(row)
    summary = []
    for key, group in groups.items():
        entry = dict(zip(EVAL_KEYS[:5], key, strict=True))
        entry["value"] = sum(float(row["value"]) for row in group) / len(group)
        entry["seeds"] = len({row.get("seed") for row in group})
        if all(row.get("ci_low") is not None and row.get("ci_high") is not None for row in group):
            # per-seed intervals: report their mean (the harness writes one row per seed)
            entry["ci_low"] = sum(float(row["ci_low"]) for row in group) / len(group)
            entry["ci_high"] = sum(float(row["ci_high"]) for row in group) / len(group)
        summary.append(entry)
    return sorted(summary, key=lambda e: (str(e["architecture"]), str(e["task"]), str(e["metric"]),
                                          float(e["length"] or 0), float(e["depth"] or 0)))


def eval_results_for_index(summary: list[dict], model_name: str, architecture: str | None) -> list[EvalResult]:
    """`model-index` entries: this model's rows only (results.jsonl may compare several architectures)."""
    names = {entry["architecture"] for entry in summary}
    if len(names) > 1:
        summary = [entry for entry in summary if entry["architecture"] == architecture]
    results = []
    for entry in summary:
        if not isinstance(entry["value"], float) or math.isnan(entry["value"]):
            continue
        where = f"length={entry['length']},depth={entry['depth']}"
        results.append(EvalResult(
            task_type="text-generation",
            task_name=str(entry["task"]),
            dataset_type=str(entry["task"]),
            dataset_name=f"{entry['task']} (synthetic, {where})",
            dataset_config=where,  # distinguishes the lengths/depths of one task in the index
            metric_type=str(entry["metric"]),
            metric_value=round(entry["value"], 4),
            source_name="hybridzoo eval harness",
            source_url=PROJECT_URL,
        ))
    return results


def safetensors_parameter_count(files: list[Path]) -> int:
    """Parameters stored in safetensors files, read from their headers only (no tensor is loaded)."""
    from safetensors import safe_open

    total = 0
    for path in files:
        with safe_open(str(path), framework="pt") as weights:
            for name in weights.keys():
                total += math.prod(weights.get_slice(name).get_shape())
    return total


def _block_tag(block: str) -> str:
    return block.replace("_", "-")


def _human(count: float, unit: str = "") -> str:
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if count >= scale:
            return f"{count / scale:.2f}{suffix}{unit}"
    return f"{int(count)}{' ' + unit if unit else ''}"


def _recipe_section(recipe: dict, folder: Path) -> list[str]:
    lines = ["## Training", ""]
    if recipe:
        model, data, train = recipe.get("model") or {}, recipe.get("data") or {}, recipe.get("train") or {}
        if recipe.get("description"):
            lines += [str(recipe["description"]), ""]
        start = (f"zoo architecture `{model['zoo']}` ({model.get('size', '?')})" if model.get("zoo")
                 else f"`{model.get('from_pretrained')}`")
        source = data.get("dataset") or data.get("task") or data.get("source", "?")
        context = data.get("context_length", "?")
        rows = [("start", start), ("data", f"`{source}` ({data.get('source', '?')}), context {context}")]
        for key in ("max_steps", "micro_batch_size", "grad_accum", "lr", "precision", "seed"):
            if key in train:
                rows.append((key, f"`{train[key]}`"))
        if (recipe.get("peft") or {}).get("enabled"):
            peft = recipe["peft"]
            rows.append(("LoRA", f"r={peft.get('r')}, alpha={peft.get('alpha')}"))
        lines += ["| setting | value |", "|---|---|", *(f"| {key} | {value} |" for key, value in rows), ""]
        lines += ["The full resolved recipe is in [`recipe.yaml`](recipe.yaml).", ""]
    metrics_path = folder / "metrics.jsonl"
    if metrics_path.exists():
        records = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
        if records:
            last = {k: v for k, v in records[-1].items() if isinstance(v, (int, float))}
            shown = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in last.items())
            lines += [f"Last logged metrics ([`metrics.jsonl`](metrics.jsonl)): {shown}.", ""]
    if (folder / "loss_curve.png").exists():
        lines += ["![loss curve](loss_curve.png)", ""]
    if len(lines) == 2:
        lines += ["No training recipe or metrics were saved with this model.", ""]
    return lines


def _distillation_section(folder: Path) -> list[str]:
    """The report `hybridzoo distill` writes (`eval/distillation.md`); its plot is shown with the eval plots."""
    path = folder / "eval" / "distillation.md"
    if not path.exists():
        return []
    return [line for line in path.read_text().splitlines() if not line.startswith("![")] + [""]


def _eval_section(summary: list[dict], folder: Path) -> list[str]:
    if not summary:
        return []
    several = len({entry["architecture"] for entry in summary}) > 1
    head = "| " + ("architecture | " if several else "") + "task | length | depth | metric | value | 95% CI | seeds |"
    lines = ["## Evaluation", "", "From the hybridzoo eval harness (`eval/results.jsonl`, mean over seeds):", "",
             head, "|" + "---|" * (head.count("|") - 1)]
    for entry in summary:
        ci = f"[{entry['ci_low']:.3f}, {entry['ci_high']:.3f}]" if "ci_low" in entry else "–"
        lines.append("| " + (f"{entry['architecture']} | " if several else "") +
                     f"{entry['task']} | {entry['length']} | {entry['depth']} | {entry['metric']} | "
                     f"{entry['value']:.4f} | {ci} | {entry['seeds']} |")
    lines.append("")
    for plot in sorted((folder / "eval").glob("*.png")):
        lines += [f"![{plot.stem}](eval/{plot.name})", ""]
    if (folder / "eval" / "results.md").exists():
        lines += ["Details: [`eval/results.md`](eval/results.md).", ""]
    return lines


LIMITATIONS = [
    "This is a research model from a model zoo, trained at small scale: it is not instruction-tuned, has no safety "
    "training, and its outputs should not be relied on.",
    "The recurrent layers (Gated DeltaNet, LSTM, ...) keep a fixed-size state, so exact recall of long contexts "
    "degrades compared with softmax attention as contexts grow.",
    "`trust_remote_code=True` runs the modeling code stored in this repo on your machine: read it first, and pin a "
    "commit with `revision=` so the code cannot change under you.",
    "The optional GPU kernels (`pip install \"hybridzoo[fla]\"`) are used only for CUDA tensors; on CPU the pure "
    "PyTorch path runs.",
]


def _usage_section(repo_id: str, pipeline_tag: str) -> list[str]:
    auto_class = "AutoModelForSequenceClassification" if pipeline_tag == "text-classification" else \
        "AutoModelForCausalLM"
    return [
        "## Usage", "",
        "With transformers alone (the model code ships in this repo):", "",
        "```python",
        f"from transformers import {auto_class}",
        "",
        f'model = {auto_class}.from_pretrained("{repo_id}", trust_remote_code=True)',
        "```", "",
        "Or with the hybridzoo package installed, which registers the same classes with transformers:", "",
        "```bash",
        "pip install hybridzoo",
        "```", "",
        "```python",
        "import hybridzoo  # noqa: F401  (registers the model classes)",
        f"from transformers import {auto_class}",
        "",
        f'model = {auto_class}.from_pretrained("{repo_id}")',
        "```", "",
    ]


def _architecture_section(folder: Path, weight_files: list[Path]) -> list[str]:
    from hybridzoo.configs.zoo import describe
    from hybridzoo.modeling.blocks import BLOCK_CLASSES
    from hybridzoo.modeling.configuration_hybrid import HybridConfig

    hybrid = HybridConfig.from_pretrained(folder)
    info = describe(hybrid)
    lines = ["## Architecture", "", f"Layer pattern `{' '.join(info['pattern'])}` (first layer first):", "",
             "| layer | block | letter | state per sequence |", "|---:|---|---|---|"]
    for index, block in enumerate(hybrid.block_types):
        block_class = BLOCK_CLASSES[block]
        state = block_class.state_formula if block_class.is_recurrent else block_class.kv_formula
        lines.append(f"| {index} | `{block}` | {block_class.pattern_letter} | {state} |")
    kv = info["kv_bytes_per_token"]
    sizes = [
        ("parameters", f"{_human(safetensors_parameter_count(weight_files))} (stored)"),
        ("hidden size", hybrid.hidden_size),
        ("layers", hybrid.num_hidden_layers),
        ("vocabulary", hybrid.vocab_size),
        ("max positions", hybrid.max_position_embeddings),
        ("recurrent state per sequence (fp32)", f"{info['recurrent_state_bytes']:,} bytes"),
        ("KV cache per token (fp32)", f"{kv:,} bytes" if kv else "none (no attention layers)"),
    ]
    if info["sliding_window"]:
        sizes.append(("sliding window", info["sliding_window"]))
    lines += ["", "| size | value |", "|---|---|", *(f"| {key} | {value} |" for key, value in sizes), ""]
    return lines


def build_model_card(
    model_dir: str | Path,
    repo_id: str | None = None,
    *,
    base_model: str | None = None,
    license: str = DEFAULT_LICENSE,  # noqa: A002 - the Hub's metadata key
) -> ModelCard:
    """The model card of a saved model or PEFT adapter folder, ready to upload as README.md.

    `repo_id` is used in the usage snippets (default: `your-name/<folder name>`). `base_model` (a Hub repo id)
    overrides the one found in `adapter_config.json` or in the recipe's `model.from_pretrained`; local paths are
    never written as a base model, since the Hub and other machines cannot resolve them.
    """
    folder = Path(model_dir)
    repo_id = repo_id or f"your-name/{folder.resolve().name}"
    recipe = read_recipe(folder)
    is_adapter = (folder / "adapter_config.json").exists()
    summary = summarize_eval(rows_of_model(read_eval_results(folder), folder.resolve().name))
    architecture = (recipe.get("model") or {}).get("zoo")
    model_name = repo_id.split("/")[-1]
    eval_results = eval_results_for_index(summary, model_name, architecture) or None
    data = recipe.get("data") or {}
    datasets = [data["dataset"]] if data.get("source") == "dataset" and is_hub_repo_id(data.get("dataset")) else None
    language = "code" if str(data.get("source", "")).startswith("stdlib") else None
    tags = ["hybridzoo", "hybrid"]

    if is_adapter:
        adapter = read_json(folder / "adapter_config.json")
        base_model = base_model or adapter.get("base_model_name_or_path")
        if not is_hub_repo_id(base_model):
            raise ModelCardError(
                f"The adapter's base model {base_model!r} is not a Hub repo id (owner/name). Push the base model "
                "first and pass its repo id as the base model (`--base-model OWNER/NAME`)."
            )
        pipeline_tag = "text-classification" if adapter.get("task_type") == "SEQ_CLS" else "text-generation"
        tags += ["peft", str(adapter.get("peft_type", "lora")).lower(), f"base_model:adapter:{base_model}"]
        library_name = "peft"
    else:
        config = read_json(folder / "config.json")
        architectures = config.get("architectures") or []
        pipeline_tag = "text-classification" if any("SequenceClassification" in a for a in architectures) else \
            "text-generation"
        tags += ["custom_code", *dict.fromkeys(_block_tag(block) for block in config.get("block_types") or [])]
        library_name = "transformers"
        from_pretrained = (recipe.get("model") or {}).get("from_pretrained")
        base_model = base_model or (from_pretrained if is_hub_repo_id(from_pretrained) else None)

    card_data = ModelCardData(
        library_name=library_name,
        pipeline_tag=pipeline_tag,
        license=license,
        tags=tags,
        base_model=base_model,
        datasets=datasets,
        language=language,
        model_name=model_name if eval_results else None,
        eval_results=eval_results,
    )
    body = [f"# {model_name}", ""]
    if is_adapter:
        body += _adapter_sections(adapter, base_model, repo_id)
    else:
        kinds = ", ".join(f"`{tag}`" for tag in tags if tag not in ("hybridzoo", "hybrid", "custom_code"))
        body += [f"A hybrid language model from [hybridzoo]({PROJECT_URL}): its layers mix {kinds} blocks."
                 + (f" Fine-tuned from `{base_model}`." if base_model else ""), ""]
        weights = sorted(folder.glob("*.safetensors"))
        body += _architecture_section(folder, weights)
        body += _usage_section(repo_id, pipeline_tag)
    body += _recipe_section(recipe, folder)
    body += _distillation_section(folder)
    body += _eval_section(summary, folder)
    body += ["## Limitations", "", *(f"- {item}" for item in LIMITATIONS), ""]
    card = ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n" + "\n".join(body))
    errors = validate_card_metadata(str(card))
    if errors:
        raise ModelCardError("The generated model card has invalid metadata:\n- " + "\n- ".join(errors))
    return card


def _adapter_sections(adapter: dict[str, Any], base_model: str, repo_id: str) -> list[str]:
    targets = adapter.get("target_modules") or []
    if isinstance(targets, str):
        targets = [targets]
    targets = list(targets) + list(adapter.get("target_parameters") or [])
    rows = [("method", adapter.get("peft_type")), ("base model", f"`{base_model}`"),
            ("rank r", adapter.get("r")), ("alpha", adapter.get("lora_alpha")),
            ("targets", ", ".join(f"`{t}`" for t in sorted(targets)) or "–")]
    return [
        f"A PEFT adapter for the hybridzoo model `{base_model}`.", "",
        "| adapter | value |", "|---|---|", *(f"| {key} | {value} |" for key, value in rows), "",
        "## Usage", "",
        "```python",
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM",
        "",
        f'base = AutoModelForCausalLM.from_pretrained("{base_model}", trust_remote_code=True)',
        f'model = PeftModel.from_pretrained(base, "{repo_id}")',
        "```", "",
        "With `pip install hybridzoo` and `import hybridzoo` first, `trust_remote_code` is not needed.", "",
    ]
