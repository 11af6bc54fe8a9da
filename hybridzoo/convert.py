"""`hybridzoo convert SOURCE OUT_DIR`: a transformers checkpoint (local folder or Hub repo id) as a hybridzoo model
folder, and `hybridzoo export`: the way back, for hybrids whose config fits a native transformers class.

The maps themselves are data in `hybridzoo.configs.checkpoint_maps`. The conversion:

1. reads the source `config.json` with transformers' own config class and maps it to a `HybridConfig` (anything
   hybridzoo cannot reproduce exactly raises `UnsupportedCheckpoint` naming it);
2. plans every key from the safetensors headers alone: each source key must match exactly one rule, each model weight
   must be filled exactly once with the right shape; otherwise it stops with the lists, before writing anything;
3. streams the tensors shard by shard (`safe_open`), writing one output shard per source shard, so peak memory is about
   one shard, not the model;
4. writes config, generation config, remote code, tokenizer files and a model card into a temporary folder next to
   OUT_DIR and renames it into place: OUT_DIR is either complete or absent.

Only safetensors are read: pickled `.bin` checkpoints are refused (they can run code when loaded).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoConfig, GenerationConfig

from hybridzoo.configs.checkpoint_maps import CHECKPOINT_MAPS, CheckpointMap, UnsupportedCheckpoint
from hybridzoo.configs.conversion import (
    SPLIT_OPS,
    ConversionError,
    PlannedKey,
    convert_state_dict,
    convert_tensor,
    expected_shapes,
    hybrid_config_for,
    plan_keys,
)
from hybridzoo.configs.settings import add_command, setting, takes_settings
from hybridzoo.modeling import HybridConfig, HybridForCausalLM

__all__ = [
    "ConversionError", "UnsupportedCheckpoint", "convert_checkpoint", "convert_state_dict", "export_checkpoint",
]

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "tokenizer.model",
    "vocab.json", "merges.txt", "vocab.txt", "chat_template.jinja", "chat_template.json",
)
HUB_PATTERNS = ["*.safetensors", "*.safetensors.index.json", "config.json", "generation_config.json", *TOKENIZER_FILES]




# ------------------------------------------------------------------------------------------------ split ops












# ------------------------------------------------------------------------------------------------ key matching






def _header_entries(files: list[Path]) -> list[tuple[str, list[int], Path]]:
    """(key, shape, file) of every tensor, read from the safetensors headers only."""
    entries = []
    for file in files:
        with safe_open(file, framework="pt") as handle:
            entries += [(key, handle.get_slice(key).get_shape(), file) for key in handle.keys()]
    return entries




# ------------------------------------------------------------------------------------------------ sources
def _resolve_source(source: str | os.PathLike, revision: str | None) -> tuple[Path, str]:
    """A local folder, or a Hub repo id downloaded (safetensors, configs and tokenizer files only)."""
    path = Path(source)
    if path.is_dir():
        return path, str(path.resolve())
    if path.exists():
        raise ValueError(f"SOURCE {source!r} is a file; give the checkpoint's folder or a Hub repo id.")
    from huggingface_hub import snapshot_download

    endpoint = os.environ.get("HF_ENDPOINT") or None  # read now: huggingface_hub reads it only at its import
    folder = snapshot_download(repo_id=str(source), revision=revision, allow_patterns=HUB_PATTERNS, endpoint=endpoint)
    return Path(folder), str(source)


def _weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [folder / name for name in dict.fromkeys(weight_map.values())]
    files = sorted(folder.glob("*.safetensors"))
    if files:
        return files
    pickled = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt"))
    hint = f" It has {pickled}: pickled weights are never loaded (they can run code); convert them to safetensors " \
        "with transformers in a trusted environment first." if pickled else ""
    raise ValueError(f"No *.safetensors weights in {folder}.{hint}")








# ------------------------------------------------------------------------------------------------ writing
class _Progress:
    """Prints tensors and bytes done, rate and ETA after each shard (long conversions show where they are)."""

    def __init__(self, total_bytes: int, shards: int, quiet: bool) -> None:
        self.total, self.shards, self.quiet = total_bytes, shards, quiet
        self.done, self.start = 0, time.monotonic()

    def shard_done(self, index: int, nbytes: int) -> None:
        self.done += nbytes
        if self.quiet:
            return
        elapsed = max(time.monotonic() - self.start, 1e-9)
        rate = self.done / elapsed
        eta = (self.total - self.done) / rate if rate > 0 else 0.0
        print(
            f"shard {index}/{self.shards}: {self.done / 2**20:.1f}/{self.total / 2**20:.1f} MiB, "
            f"{rate / 2**20:.1f} MiB/s, ETA {eta:.0f} s",
            flush=True,
        )






def _stream(planned: list[PlannedKey], files: list[Path], expected, config, out: Path, quiet: bool) -> None:
    by_file: dict[Path, list[PlannedKey]] = {}
    for item in planned:
        by_file.setdefault(item.file, []).append(item)
    shards = [f for f in files if f in by_file]
    total = sum(f.stat().st_size for f in shards)
    progress = _Progress(total, len(shards), quiet)
    weight_map, total_size = {}, 0
    names = (
        ["model.safetensors"] if len(shards) == 1
        else [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
    )
    for index, (file, name) in enumerate(zip(shards, names, strict=True), start=1):
        tensors: dict[str, torch.Tensor] = {}
        with safe_open(file, framework="pt") as handle:
            for item in by_file[file]:
                tensors.update(convert_tensor(item, handle.get_tensor(item.source), expected, config))
        save_file(tensors, out / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
        total_size += sum(t.numel() * t.element_size() for t in tensors.values())
        del tensors
        progress.shard_done(index, file.stat().st_size)
    if len(names) > 1:
        index_json = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
        (out / "model.safetensors.index.json").write_text(json.dumps(index_json, indent=2) + "\n")


def _write_code_and_config(config: HybridConfig, out: Path) -> None:
    from transformers.dynamic_module_utils import custom_object_save

    config.save_pretrained(out)
    with torch.device("meta"):
        model = HybridForCausalLM(config)
    custom_object_save(model, out, config=config)  # the modeling folder: loads without hybridzoo installed


def _write_generation_config(folder: Path, config, out: Path) -> None:
    if (folder / "generation_config.json").exists():
        generation = GenerationConfig.from_pretrained(folder)
    else:
        generation = GenerationConfig.from_model_config(config)
    generation.save_pretrained(out)


def _copy_tokenizer(folder: Path, out: Path) -> list[str]:
    copied = []
    for name in TOKENIZER_FILES:
        if (folder / name).is_file():
            shutil.copyfile(folder / name, out / name)
            copied.append(name)
    return copied


def _listed(keys: list[str], limit: int = 5) -> str:
    if not keys:
        return ""
    return " (" + ", ".join(f"`{k}`" for k in keys[:limit]) + (", ..." if len(keys) > limit else "") + ")"


def _model_card(source_id: str, is_hub: bool, checkpoint_map: CheckpointMap, config: HybridConfig,
                dropped: list[str], tokenizer: list[str]) -> str:
    from hybridzoo import __version__

    blocks = ", ".join(f"{name} x{config.block_types.count(name)}" for name in dict.fromkeys(config.block_types))
    metadata = ["library_name: transformers", "pipeline_tag: text-generation", "tags:", "- hybridzoo",
                "- converted"]
    if is_hub:
        metadata.append(f"base_model: {source_id}")
    lines = ["---", *metadata, "---", "", f"# {Path(source_id).name} (hybridzoo)", "",
             f"Converted from `{source_id}` (`{checkpoint_map.architecture}`) with `hybridzoo convert` "
             f"(hybridzoo {__version__}). Every weight is the source's, renamed or split exactly; no weight was "
             "initialised.", "",
             f"- layers: {blocks}",
             f"- what maps: {checkpoint_map.notes}",
             f"- source keys dropped: {len(dropped)}" + _listed(sorted(dropped)),
             f"- tokenizer: {'copied from the source' if tokenizer else 'none in the source'}", "",
             "```python", "from transformers import AutoModelForCausalLM",
             "model = AutoModelForCausalLM.from_pretrained(FOLDER_OR_REPO, trust_remote_code=True)"
             "  # no trust_remote_code needed with hybridzoo installed",
             "```", ""]
    return "\n".join(lines)


def _publish(tmp: Path, out: Path, overwrite: bool) -> None:
    """Move the finished temporary folder into place; an existing OUT_DIR is replaced only with `overwrite`."""
    if out.exists():
        if not overwrite:
            raise FileExistsError(f"{out} exists; pass overwrite=True (--overwrite) to replace it.")
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old)
    else:
        os.replace(tmp, out)


@dataclass
class ConvertSettings:
    """What `hybridzoo convert` and `convert_checkpoint` take."""

    source: str | os.PathLike = setting(help="local checkpoint folder or Hub repo id", positional=True)
    out_dir: str | os.PathLike = setting(help="output folder (written atomically)", positional=True)
    revision: str | None = setting(None, "Hub revision: branch, tag or commit (default: main)")
    overwrite: bool = setting(False, "replace an existing OUT_DIR")
    quiet: bool = setting(False, "no progress bar")


@takes_settings(ConvertSettings)
def convert_checkpoint(settings: ConvertSettings) -> Path:
    """Convert a transformers checkpoint (local folder or Hub repo id) into a hybridzoo model folder at `out_dir`.

    Raises `UnsupportedCheckpoint` for configs hybridzoo cannot reproduce exactly and `ConversionError` listing every
    unmapped, missing or misshapen key; in both cases nothing is written. Returns the output folder.
    """
    source, overwrite = settings.source, settings.overwrite
    out = Path(settings.out_dir)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass overwrite=True (--overwrite) to replace it.")
    folder, source_id = _resolve_source(source, settings.revision)
    source_config = AutoConfig.from_pretrained(folder)
    checkpoint_map, config = hybrid_config_for(source_config)
    files = _weight_files(folder)
    expected = expected_shapes(config)
    planned, dropped = plan_keys(checkpoint_map, _header_entries(files), expected, config)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        _stream(planned, files, expected, config, tmp, settings.quiet)
        _write_code_and_config(config, tmp)
        _write_generation_config(folder, config, tmp)
        tokenizer = _copy_tokenizer(folder, tmp)
        is_hub = not Path(source).is_dir()
        card = _model_card(source_id, is_hub, checkpoint_map, config, dropped, tokenizer)
        (tmp / "README.md").write_text(card)
        _publish(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


# ------------------------------------------------------------------------------------------------ export
EXPORT_TARGETS = {"llama": "LlamaForCausalLM", "qwen3_next": "Qwen3NextForCausalLM"}


def _iter_export(checkpoint_map: CheckpointMap, state: dict[str, torch.Tensor], config: HybridConfig
                 ) -> Iterator[tuple[str, torch.Tensor, list[str]]]:
    """(source key, tensor, the hybrid keys it consumed) for every rule that applies to this model."""
    layer_indices = [str(i) for i in range(config.num_hidden_layers)]
    for rule in checkpoint_map.weights:
        if rule.target is None:
            continue
        names = (rule.target,) if isinstance(rule.target, str) else rule.target
        indices = layer_indices if "{i}" in rule.source else [None]
        for index in indices:
            if rule.block is not None and config.block_types[int(index)] != rule.block:
                continue
            keys = [n.replace("{i}", index) if index is not None else n for n in names]
            if not all(k in state for k in keys):
                continue
            source_key = rule.source.replace("{i}", index) if index is not None else rule.source
            if rule.op == "copy":
                yield source_key, state[keys[0]], keys
            else:
                _, join = SPLIT_OPS[rule.op]
                yield source_key, join([state[k] for k in keys], config), keys


@dataclass
class ExportSettings:
    """What `hybridzoo export` and `export_checkpoint` take."""

    model_dir: str | os.PathLike = setting(help="a hybridzoo model folder", positional=True)
    out_dir: str | os.PathLike = setting(help="output folder (written atomically)", positional=True)
    target: str = setting("llama", "the transformers architecture written", choices=sorted(EXPORT_TARGETS))
    overwrite: bool = setting(False, "replace an existing OUT_DIR")


@takes_settings(ExportSettings)
def export_checkpoint(settings: ExportSettings) -> Path:
    """Write a hybridzoo model folder as a native transformers checkpoint (`target`: "llama" or "qwen3_next").

    Raises `UnsupportedCheckpoint` naming every config field that does not fit the target class. The export is the
    conversion's inverse: converting the result back gives bit-identical weights.
    """
    overwrite = settings.overwrite
    checkpoint_map = CHECKPOINT_MAPS[EXPORT_TARGETS[settings.target]]
    folder, out = Path(settings.model_dir), Path(settings.out_dir)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass overwrite=True (--overwrite) to replace it.")
    config = HybridConfig.from_pretrained(folder)
    target_fields = checkpoint_map.export_config(config)
    import transformers

    target_config = getattr(transformers, checkpoint_map.export_class)(**target_fields)

    state: dict[str, torch.Tensor] = {}
    for file in _weight_files(folder):
        with safe_open(file, framework="pt") as handle:
            state.update({key: handle.get_tensor(key) for key in handle.keys()})
    exported, used = {}, set()
    for source_key, tensor, keys in _iter_export(checkpoint_map, state, config):
        exported[source_key] = tensor.contiguous()
        used.update(keys)
    left = sorted(set(state) - used)
    if left:
        raise ConversionError(f"{len(left)} weights have no place in {checkpoint_map.architecture}: {left}")

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        save_file(exported, tmp / "model.safetensors", metadata={"format": "pt"})
        target_config.save_pretrained(tmp)
        _write_generation_config(folder, target_config, tmp)
        _copy_tokenizer(folder, tmp)
        _publish(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


# ------------------------------------------------------------------------------------------------ CLI
def add_arguments(parser) -> None:
    """`hybridzoo convert SOURCE OUT_DIR [--revision R] [--overwrite]`: the options are `ConvertSettings`' fields."""
    parser.description = convert_checkpoint.__doc__

    def run(settings: ConvertSettings) -> int:
        out = convert_checkpoint(settings)
        print(f"converted {settings.source} -> {out}")
        return 0

    add_command(parser, ConvertSettings, run)


def add_export_arguments(parser) -> None:
    """`hybridzoo export MODEL_DIR OUT_DIR [--target T] [--overwrite]`: the options are `ExportSettings`' fields."""
    parser.description = export_checkpoint.__doc__

    def run(settings: ExportSettings) -> int:
        out = export_checkpoint(settings)
        print(f"exported {settings.model_dir} -> {out} ({EXPORT_TARGETS[settings.target]})")
        return 0

    add_command(parser, ExportSettings, run)
