"""The main job on built-in defaults: train, evaluate, publish and reload, in one command.

`hybridzoo quickstart` chains the documented subcommands' Python functions on data generated or found on this machine:

1. train a small qwen3-next-style hybrid and a transformer baseline of equal parameter count on the Python standard
   library's own sources (`hybridzoo train pretrain_stdlib`), and both on MQAR associative recall
   (`hybridzoo train retrieval_mqar`);
2. evaluate them: the retrieval suite on the MQAR models, the long-context suite (loss by position, decode cost) on
   the text models (`hybridzoo eval`), print the comparison table and write the plots;
3. give the hybrid a model card with its eval results and push it (`hybridzoo push`) to a local Hub-compatible
   server (started here, files on disk under the output folder) or to `--endpoint`;
4. reload the published model in a fresh Python process with `AutoModelForCausalLM.from_pretrained(repo_id,
   trust_remote_code=True)` and print a short generation;
5. print where everything was written.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from hybridzoo.configs.settings import add_command, at_least, setting, takes_settings
from hybridzoo.configs.zoo import ARCHITECTURES, SIZES, describe, two_layer_pattern, zoo_config


@dataclass
class QuickstartSettings:
    """What `hybridzoo quickstart` and `run_quickstart` take (the command's flags are generated from these fields)."""

    architecture: str = setting("qwen3-next-style", "the hybrid trained, evaluated and published",
                                choices=tuple(ARCHITECTURES))
    baseline: str = setting("transformer", "the baseline, widened to the hybrid's parameter count",
                            choices=tuple(ARCHITECTURES))
    size: str = setting("tiny", "zoo size of both models", choices=tuple(SIZES))
    text_steps: int = setting(500, "training steps on the Python stdlib sources", check=at_least(1))
    mqar_steps: int = setting(1000, "training steps on MQAR", check=at_least(1))
    eval_examples: int = setting(100, "eval examples per cell", check=at_least(1))
    output_dir: str = setting("outputs/quickstart", "where everything is written")
    repo_id: str = setting("local/hybridzoo-quickstart", "the Hub repo the hybrid is pushed to")
    endpoint: str = setting("", "a Hub endpoint to push to; empty: start a local Hub-compatible server")
    prompt: str = setting("def ", "prompt of the generation after reloading")
    new_tokens: int = setting(60, "tokens generated after reloading", check=at_least(1))
    seed: int = setting(0, "seed of the training runs and the eval")


def _banner(text: str) -> None:
    print(f"\n{'=' * 100}\n{text}\n{'=' * 100}", flush=True)


def matched_mlp_width(architecture: str, baseline: str, size: str, vocab_size: int) -> int:
    """The baseline's `intermediate_size` that gives it the architecture's parameter count (closed forms)."""
    target = describe(zoo_config(architecture, size, vocab_size=vocab_size))["parameters"]
    without_mlp = describe(zoo_config(baseline, size, vocab_size=vocab_size, intermediate_size=0))["parameters"]
    config = zoo_config(baseline, size, vocab_size=vocab_size)
    # each layer's MLP adds a norm (hidden) and 3 * hidden * width
    per_width = 3 * config.hidden_size * config.num_hidden_layers
    return max(1, round((target - without_mlp - config.hidden_size * config.num_hidden_layers) / per_width))


def train_models(settings: QuickstartSettings, out: Path) -> dict[str, dict[str, Path]]:
    """Four recipe runs: {text, mqar} x {architecture, baseline}. Returns their output folders."""
    from hybridzoo.recipes import train

    folders: dict[str, dict[str, Path]] = {"text": {}, "mqar": {}}
    tokenizer_vocab = 4096  # pretrain_stdlib's byte-level BPE
    width = matched_mlp_width(settings.architecture, settings.baseline, settings.size, tokenizer_vocab)
    for kind, recipe, steps in (
        ("text", "pretrain_stdlib", settings.text_steps),
        ("mqar", "retrieval_mqar", settings.mqar_steps),
    ):
        for name in (settings.architecture, settings.baseline):
            folder = out / "runs" / f"{kind}-{name}"
            overrides = [
                f"model.zoo={name}",
                f"model.size={settings.size}",
                f"train.max_steps={steps}",
                f"train.seed={settings.seed}",
                f"train.warmup_steps={max(1, steps // 10)}",
                f"output_dir={folder}",
                f"eval.every={max(steps // 4, 1)}",
                f"checkpoint.every={max(steps // 2, 1)}",
            ]
            if kind == "text" and name == settings.baseline:
                overrides.append(f"model.overrides.intermediate_size={width}")  # equal parameter count
            if kind == "text":
                overrides.append(f"tokenizer.vocab_size={tokenizer_vocab}")
            else:
                # Zoology's MQAR setting: 2 layers, 2 heads, no MLP; a hybrid keeps one layer of each of its kinds
                overrides += [
                    f"model.overrides.block_pattern={two_layer_pattern(name)}",
                    "model.overrides.num_attention_heads=2",
                    "model.overrides.num_key_value_heads=2",
                ]
            _banner(f"training {name} on {'Python stdlib sources' if kind == 'text' else 'MQAR'} ({steps} steps)")
            train(recipe, overrides=overrides)
            folders[kind][name] = folder
    return folders


def evaluate_models(settings: QuickstartSettings, folders: dict[str, dict[str, Path]], out: Path) -> dict:
    """Retrieval suite on the MQAR models, long-context suite on the text models (`hybridzoo eval`'s `eval_rows`);
    one combined set of outputs. Rows name each model by its folder (`text-qwen3-next-style`), which is how its model
    card finds them; each suite runs only what fits the model's training."""
    from hybridzoo.evaluation.harness import eval_rows, markdown_table, write_outputs

    common = dict(lengths=[64, 128], num_examples=settings.eval_examples, seed=settings.seed, train_length=256,
                  decode_lengths=[256, 1024, 4096], decode_tokens=16)
    _banner("evaluating the MQAR models on the retrieval suite")
    rows, curves = eval_rows([str(folder) for folder in folders["mqar"].values()], "retrieval", **common)
    # text models: loss by position on the held-out stdlib files in each model's own BPE, and decode cost (token
    # level: the text-level needle tasks are left to `hybridzoo eval`)
    _banner("evaluating the text models on the long-context suite")
    text_rows, text_curves = eval_rows([str(folder) for folder in folders["text"].values()], "long-context",
                                       text="stdlib", level="token", **common)
    rows += text_rows
    curves.update(text_curves)
    written = write_outputs(rows, curves, out / "eval", train_length=256, title="hybridzoo quickstart eval")
    headline = [r for r in rows if r["task"] in ("mqar", "text_loss", "decode_cost")]
    table = markdown_table(headline, metrics=("accuracy", "loss", "loss_beyond_train", "ms_per_token"))
    (out / "eval" / "headline.md").write_text(table + "\n")
    print("\n" + table, flush=True)
    return {"rows": rows, "written": written}


def publish(settings: QuickstartSettings, model_dir: Path, eval_dir: Path, out: Path) -> tuple[str, str, object]:
    """Put the eval results next to the model, push it with a model card; returns (endpoint, token, server).

    The comparison's files travel unchanged: every row names its model, and the card's `model-index` keeps the rows
    whose `model` is this folder's name.
    """
    from hybridzoo.hub import push_to_hub

    shutil.copytree(eval_dir, model_dir / "eval", dirs_exist_ok=True)
    server = None
    endpoint, token = settings.endpoint, os.environ.get("HF_TOKEN", "")
    if not endpoint:
        from hybridzoo.testing.local_hub import LocalHub

        server = LocalHub(out / "hub").start()
        endpoint, token = server.endpoint, token or "quickstart-local-token"
    _banner(f"pushing {model_dir} to {endpoint} as {settings.repo_id}")
    previous = os.environ.get("HF_ENDPOINT")
    os.environ["HF_ENDPOINT"] = endpoint
    try:
        result = push_to_hub(model_dir, settings.repo_id, token=token)
    finally:
        if previous is None:
            os.environ.pop("HF_ENDPOINT", None)
        else:
            os.environ["HF_ENDPOINT"] = previous
    print(f"commit {result.commit_oid}: {len(result.files)} files ({', '.join(sorted(result.files)[:8])}, ...)")
    return endpoint, token, server


RELOAD = textwrap.dedent(
    """
    import json
    import sys
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer
    repo_id, prompt, new_tokens, logits_file = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    model = AutoModelForCausalLM.from_pretrained(repo_id, trust_remote_code=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(repo_id)
    inputs = tokenizer(prompt, return_tensors="pt")
    save_file({"logits": model(**inputs).logits.detach(), "input_ids": inputs["input_ids"]}, logits_file)
    output = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=True, top_k=20, temperature=0.8,
                            pad_token_id=tokenizer.pad_token_id)
    result = {"class": type(model).__module__ + "." + type(model).__name__,
              "sample": tokenizer.decode(output[0], skip_special_tokens=True)}
    open(logits_file + ".json", "w").write(json.dumps(result))
    """
)


def reload_and_generate(settings: QuickstartSettings, endpoint: str, token: str, model_dir: Path, out: Path) -> dict:
    """A fresh process with an empty cache loads the published model through `from_pretrained(repo_id, ...)` and
    generates; its logits on the prompt are checked against the local model's, so what was published is what trained.
    """
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    _banner(f"reloading {settings.repo_id} from {endpoint} in a fresh process (trust_remote_code=True)")
    env = dict(os.environ, HF_ENDPOINT=endpoint, HF_TOKEN=token, HF_HOME=str(out / "reload_cache"))
    env.pop("HF_HUB_OFFLINE", None)
    logits_file = out / "reload_logits.safetensors"
    result = subprocess.run(
        [sys.executable, "-c", RELOAD, settings.repo_id, settings.prompt, str(settings.new_tokens), str(logits_file)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if result.returncode != 0:
        raise RuntimeError(f"reloading the published model failed:\n{result.stderr[-3000:]}")
    reloaded_by = json.loads(Path(f"{logits_file}.json").read_text())
    class_name, text = reloaded_by["class"], reloaded_by["sample"]
    reloaded = load_file(logits_file)
    local = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=True).eval()
    with torch.no_grad():
        difference = (local(reloaded["input_ids"]).logits - reloaded["logits"]).abs().max().item()
    if difference > 1e-4:
        raise RuntimeError(f"the published model's logits differ from the trained one's by {difference:.3g}")
    print(f"loaded as {class_name} (code from the repo); logits match the local model (max |diff| {difference:.1e})")
    print(f"{'-' * 60}\n{text.rstrip()}\n{'-' * 60}", flush=True)
    return {"class": class_name, "sample": text, "max_logit_difference": difference}


@takes_settings(QuickstartSettings)
def run_quickstart(settings: QuickstartSettings) -> dict:
    """The whole story; returns a summary (also written to `output_dir/summary.json`). Takes a `QuickstartSettings`
    or its fields as arguments (`run_quickstart(text_steps=50)`; none: the defaults)."""
    out = Path(settings.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    folders = train_models(settings, out)
    evaluation = evaluate_models(settings, folders, out)
    model_dir = folders["text"][settings.architecture]
    endpoint, token, server = publish(settings, model_dir, out / "eval", out)
    try:
        reload = reload_and_generate(settings, endpoint, token, model_dir, out)
    finally:
        if server is not None:
            server.stop()
    summary = {
        "settings": asdict(settings),
        "seconds": round(time.perf_counter() - started, 1),
        "trained": {kind: {name: str(path) for name, path in runs.items()} for kind, runs in folders.items()},
        "eval": {name: str(path) for name, path in evaluation["written"].items()},
        "published": {
            "endpoint": endpoint,
            "repo_id": settings.repo_id,
            "hub_folder": str(out / "hub") if server is not None else None,
        },
        "reloaded": reload,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    _banner("where everything is")
    for kind, runs in summary["trained"].items():
        for name, path in runs.items():
            print(f"  {kind:5s} {name:18s} {path}  (model, tokenizer, metrics.jsonl, loss_curve.png, checkpoints/)")
    print(f"  eval results: {out / 'eval'} (results.jsonl, results.md, *.png)")
    print(f"  published:    {settings.repo_id} at {endpoint}" + (f" (stored in {out / 'hub'})" if server else ""))
    print(f"  summary:      {out / 'summary.json'}   total {summary['seconds']:.0f} s")
    return summary


def add_arguments(parser) -> None:
    """`hybridzoo quickstart [--text-steps N ...]`: every `QuickstartSettings` field is a flag."""
    add_command(parser, QuickstartSettings, run_quickstart)
