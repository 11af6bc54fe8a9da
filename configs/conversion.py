"""Checkpoint conversion in memory: a transformers model's config and tensors as a `HybridConfig` and hybridzoo
tensors, by the maps in `checkpoint_maps` (data). Pure functions over configs and tensors, no file access:
`hybridzoo convert` (hybridzoo/convert.py) streams files through them shard by shard, and distillation converts a
transformers teacher with `convert_state_dict`.

Every key is planned before anything is converted: each source key must match exactly one rule and each model weight
must be filled exactly once with the right shape; otherwise `ConversionError` lists every offending key.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from hybridzoo.configs.checkpoint_maps import CHECKPOINT_MAPS, CheckpointMap, UnsupportedCheckpoint, WeightRule
from hybridzoo.modeling import HybridConfig, HybridForCausalLM

__all__ = [
    "SPLIT_OPS", "ConversionError", "PlannedKey", "UnsupportedCheckpoint", "convert_state_dict", "hybrid_config_for",
    "join_key_head_groups", "join_rows", "plan_keys", "source_map", "split_key_head_groups", "split_rows",
]


class ConversionError(ValueError):
    """The checkpoint's keys or shapes do not match its map; the message lists every offending key."""


def _group_sizes(targets: list[torch.Size], groups: int) -> list[int]:
    sizes = [shape[0] // groups for shape in targets]
    if any(size * groups != shape[0] for size, shape in zip(sizes, targets, strict=True)):
        raise ConversionError(f"target rows {[s[0] for s in targets]} do not split into {groups} key-head groups")
    return sizes


def split_rows(tensor: torch.Tensor, targets: list[torch.Size], config: HybridConfig) -> list[torch.Tensor]:
    """The targets stacked along dim 0 (fused q/k/v, gate pairs)."""
    return [part.clone() for part in tensor.split([shape[0] for shape in targets], dim=0)]


def join_rows(parts: list[torch.Tensor], config: HybridConfig) -> torch.Tensor:
    return torch.cat(parts, dim=0)


def split_key_head_groups(tensor: torch.Tensor, targets: list[torch.Size], config: HybridConfig) -> list[torch.Tensor]:
    """Qwen3-Next's fused GDN projections: rows grouped per key head, each group `[q | k | v | z]` (or `[b | a]`)."""
    groups = config.linear_num_key_heads
    sizes = _group_sizes(targets, groups)
    grouped = tensor.reshape(groups, sum(sizes), *tensor.shape[1:])
    return [
        part.reshape(shape).clone() for part, shape in zip(grouped.split(sizes, dim=1), targets, strict=True)
    ]


def join_key_head_groups(parts: list[torch.Tensor], config: HybridConfig) -> torch.Tensor:
    groups = config.linear_num_key_heads
    grouped = [part.reshape(groups, part.shape[0] // groups, *part.shape[1:]) for part in parts]
    joined = torch.cat(grouped, dim=1)
    return joined.reshape(-1, *joined.shape[2:])


SPLIT_OPS: dict[str, tuple[Callable, Callable]] = {
    "rows": (split_rows, join_rows),
    "key_head_groups": (split_key_head_groups, join_key_head_groups),
}


def _pattern(template: str) -> re.Pattern:
    escaped = re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{\*\}", r".*")
    return re.compile(f"^{escaped}$")


def _targets(rule: WeightRule, match: re.Match) -> list[str]:
    names = (rule.target,) if isinstance(rule.target, str) else rule.target
    index = match.groupdict().get("i")
    return [name.replace("{i}", index) if index is not None else name for name in names]


@dataclass
class PlannedKey:
    """One source tensor's plan: its rule and the hybridzoo keys it fills (`file`: where it is stored, if a file)."""

    source: str
    file: Path | None
    rule: WeightRule
    targets: list[str]


def plan_keys(checkpoint_map: CheckpointMap, entries, expected: dict[str, torch.Size], config: HybridConfig):
    """Match every source key to one rule and check that the targets fill `expected` exactly (names and shapes)."""
    compiled = [(rule, _pattern(rule.source)) for rule in checkpoint_map.weights]
    tied = config.tie_word_embeddings
    planned, unknown, ambiguous, dropped = [], [], [], []
    filled: dict[str, str] = {}
    duplicates, unexpected, wrong_shapes, wrong_blocks = [], [], [], []
    for key, shape, file in entries:
        matches = [(rule, m) for rule, pattern in compiled if (m := pattern.match(key))]
        if not matches:
            unknown.append(key)
            continue
        if len(matches) > 1:
            ambiguous.append(key)
            continue
        rule, match = matches[0]
        if rule.target is None or (tied and rule.target == "lm_head.weight"):
            dropped.append(key)
            continue
        targets = _targets(rule, match)
        if rule.block is not None:
            layer = int(match.group("i"))
            block = config.block_types[layer] if layer < len(config.block_types) else None
            if block != rule.block:
                wrong_blocks.append(f"{key}: a {rule.block} weight, but layer {layer} is {block}")
                continue
        if rule.op == "copy" and targets[0] in expected and list(shape) != list(expected[targets[0]]):
            wrong_shapes.append(f"{key} {list(shape)} -> {targets[0]} {list(expected[targets[0]])}")
        for target in targets:
            if target not in expected:
                unexpected.append(f"{key} -> {target}")
            elif target in filled:
                duplicates.append(f"{target} (from {filled[target]} and {key})")
            filled[target] = key
        planned.append(PlannedKey(key, file, rule, targets))
    missing = sorted(set(expected) - set(filled))
    problems = []
    for title, keys in [
        ("source keys no rule maps (unknown)", unknown), ("source keys several rules match", ambiguous),
        ("targets the model does not have (the source config and weights disagree)", unexpected),
        ("model weights filled twice", duplicates), ("shape mismatches", wrong_shapes),
        ("weights of a block the config does not put in that layer", wrong_blocks),
        ("model weights the checkpoint does not fill (missing)", missing),
    ]:
        if keys:
            problems.append(f"{len(keys)} {title}:\n  " + "\n  ".join(sorted(keys)))
    if problems:
        raise ConversionError(
            f"{checkpoint_map.architecture} checkpoint does not map onto its HybridConfig; nothing was written.\n"
            + "\n".join(problems)
        )
    return planned, dropped


def source_map(source_config) -> CheckpointMap:
    architectures = list(getattr(source_config, "architectures", None) or [])
    for name in architectures:
        if name in CHECKPOINT_MAPS:
            return CHECKPOINT_MAPS[name]
    by_type = [m for m in CHECKPOINT_MAPS.values() if m.model_type == source_config.model_type]
    if len(by_type) == 1 and not architectures:
        return by_type[0]
    raise UnsupportedCheckpoint(
        f"No map for architectures {architectures} (model_type {source_config.model_type!r}); hybridzoo converts "
        f"{sorted(CHECKPOINT_MAPS)}."
    )


def hybrid_config_for(source_config) -> tuple[CheckpointMap, HybridConfig]:
    checkpoint_map = source_map(source_config)
    return checkpoint_map, HybridConfig(**checkpoint_map.config(source_config))


def expected_shapes(config: HybridConfig) -> dict[str, torch.Size]:
    with torch.device("meta"):
        model = HybridForCausalLM(config)
    shapes = {key: value.shape for key, value in model.state_dict().items()}
    if config.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    return shapes


def convert_tensor(item: PlannedKey, tensor: torch.Tensor, expected, config: HybridConfig) -> dict[str, torch.Tensor]:
    """One source tensor as its hybridzoo tensor(s)."""
    if item.rule.op == "copy":
        parts = [tensor]
    else:
        split, _ = SPLIT_OPS[item.rule.op]
        parts = split(tensor, [expected[t] for t in item.targets], config)
    converted = {}
    for target, part in zip(item.targets, parts, strict=True):
        if part.shape != expected[target]:
            raise ConversionError(
                f"{item.source} -> {target}: shape {list(part.shape)}, expected {list(expected[target])}"
            )
        converted[target] = part.contiguous()
    return converted


def convert_state_dict(source_config, state_dict: dict[str, torch.Tensor]) -> tuple[HybridConfig, dict]:
    """In memory: a transformers model's config and state dict (or any tensors keyed like it, e.g. gradients) as a
    `HybridConfig` and hybridzoo state dict, with the same checks as `convert_checkpoint`."""
    checkpoint_map, config = hybrid_config_for(source_config)
    expected = expected_shapes(config)
    entries = [(key, list(tensor.shape), None) for key, tensor in state_dict.items()]
    planned, _ = plan_keys(checkpoint_map, entries, expected, config)
    converted = {}
    for item in planned:
        converted.update(convert_tensor(item, state_dict[item.source], expected, config))
    return config, converted
