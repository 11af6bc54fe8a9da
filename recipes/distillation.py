"""Turn a pretrained transformer into a hybrid: `hybridzoo distill RECIPE [key=value ...] [--resume]`.

The recipe's `model.from_pretrained` is the teacher, any causal LM hybridzoo loads (a hybridzoo model, e.g. the
stdlib-pretrained `transformer`, or a checkpoint `hybridzoo convert` reads, such as a `LlamaForCausalLM` folder).
The student has the teacher's depth; the chosen attention layers become Gated DeltaNet or Mamba-2 layers, everything
else is copied. Then, each stage a run of the recipes' one training loop (recipes/trainer.py) with its own objective, so
checkpoints, `--resume`, progress bars, metrics.jsonl and loss plots come from there:

1. align  (`AlignmentLoss`): every new mixer sees the teacher's own input to that layer and learns to reproduce the
   teacher attention's output (MSE, normalised per layer by the target's mean square); only new mixers train.
   (LoLCATs' attention transfer; RADLADS' and fla-org/hybrid-distillation's stage 1.)
2. kl     (`LogitDistillationLoss`): the whole student learns the teacher's next-token distributions,
   KL(teacher || student) at a temperature (+ optionally the hard-label loss); full or LoRA (`peft.enabled`).
3. scratch: the same hybrid from a fresh initialisation, trained on as many tokens as 1 + 2 (the report's baseline).

Weight transfer into a new Gated DeltaNet layer (Mamba-in-the-Llama's C, B, X <- Q, K, V, done per head):
the GDN layer gets one q/k head and one v head per attention *query* head (Hk = Hv = H, Dk = Dv = head_dim);
`q_proj` and `o_proj` are the attention's, `k_proj` / `v_proj` repeat each KV head for the query heads it serves
(query head h reads KV head h // (H / Hkv), as `repeat_kv` has it), so head h of the GDN layer reads exactly the
q, k, v that head h of the attention read, and writes through the same `o_proj` columns. RoPE is dropped (the
recurrence orders tokens). Fresh: `z_proj` (output gate), `b_proj` (beta), `a_proj`, `A_log`, `dt_bias` (decay) and the
output norm, as the block initialises them. The short conv starts as the identity (`distill.conv_init: identity`: the
last tap 1, the others 0, so the transferred q/k/v pass through unchanged at the start) or as the block's own
initialisation (`fresh`).

Weight transfer into a new Mamba-2 layer (Mamba in the Llama, arXiv 2408.15237: C <- Q, B <- K, x <- V, out_proj <- O):
one Mamba-2 head per attention query head, head dim P = state size N = the attention's `head_dim`, and
`mamba_n_groups` = the number of query heads. Mamba-2 shares B and C within a group, and C plays the query, which GQA
does not share, so a group per query head is the only exact layout of a standard Mamba-2 block (MambaInLlama instead
changes the block so that x and B have KV width); B and x then repeat each KV head for the query heads it serves, as
for Gated DeltaNet. `in_proj`'s rows are Mamba-2's `[z | x | B | C | dt]` (x, B, C being the conv's channels), each
of x, B, C head after head / group after group: z and dt rows fresh, x <- `expand_kv_heads(v_proj)`,
B <- `expand_kv_heads(k_proj)`, C <- `q_proj`; `out_proj` <- `o_proj`; q/k/v/o biases, if the teacher has them, go
to the same rows of `in_proj.bias` / to `out_proj.bias` (`mamba_proj_bias`), z and dt biases 0. Fresh: `dt_bias`,
`A_log`, `D` (Mamba-2's init); the gated RMSNorm's weight is 1; the conv as for Gated DeltaNet (identity: last tap 1,
bias 0). What differs from the teacher's attention at the start: no RoPE and no softmax (the state is
`sum_s dt_s B_s x_s^T` under the decay exp(dt A)), x, B, C go through the conv and SiLU, `D x` is added and the output
is gated by silu(z) and normalised per head. With the decay at 1 (A = 0), dt = 1, D = 0 and the identity conv the
mixer is causal linear attention over silu(q), silu(k), silu(v) before that norm (the tests check this).

Which layers: `distill.student_pattern` (HybridConfig's letters, repeated over the depth: A keeps the teacher's
attention, G replaces it by Gated DeltaNet, D by Mamba-2; e.g. GGGA, DDDA, or mixed GDGA), `distill.replace_layers`,
or `distill.select: kl` (with these two, `distill.student_block` names the new block: gated_deltanet, the default, or
mamba2): stage 1 aligns every attention layer, then for each layer the teacher is run with only that
layer swapped for its aligned replacement, and the `keep_attention` layers whose swap raises KL(teacher || swapped)
the most stay attention (fla-org/hybrid-distillation ranks kept layers by a KL criterion too). The measured KL per
layer is written to `selection.json` and the report.

Output folder: the final student (loads with `AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`),
`recipe.yaml`, `metrics.jsonl` (both stages, with a `stage` field), `loss_curve.png`, `summary.json`, the report in
`eval/` (recipes/distill_report.py), and `runs/` with each stage's own run folder and checkpoints.
"""

from __future__ import annotations

import itertools
import json
import os
import resource
import shutil
import time
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file
from torch.nn import functional as F

from hybridzoo.configs.conversion import convert_state_dict
from hybridzoo.modeling import HybridConfig, HybridForCausalLM
from hybridzoo.modeling.modeling_hybrid import HybridModel
from hybridzoo.recipes import trainer
from hybridzoo.recipes.recipe import Recipe, RecipeError, load_recipe

GDN = "gated_deltanet"
MAMBA2 = "mamba2"
ATTENTION = "attention"
KEEP = "A"  # `student_pattern` letter of a layer that stays the teacher's attention
STUDENT_BLOCKS = {"G": GDN, "D": MAMBA2}  # the other letters: what attention becomes (HybridConfig's letters)
BLOCK_NAMES = {GDN: "Gated DeltaNet", MAMBA2: "Mamba-2"}
RUNS = "runs"
COPIED_FILES = ("config.json", "generation_config.json", "model.safetensors")


# ---------------------------------------------------------------------------------------------------------------------
# the teacher


def load_teacher(path: str | Path) -> HybridForCausalLM:
    """A hybridzoo model folder, or a transformers checkpoint `hybridzoo convert` knows (Llama, Qwen3-Next, ...)
    converted in memory by its checks (an unknown or missing tensor stops with the list; safetensors only)."""
    from transformers import AutoConfig

    folder = Path(path)
    config = json.loads((folder / "config.json").read_text())
    if config.get("model_type") == HybridConfig.model_type:
        teacher = HybridForCausalLM.from_pretrained(folder, dtype=torch.float32)
    else:
        weights = sorted(folder.glob("*.safetensors"))
        if not weights:
            raise ValueError(f"model.from_pretrained: {folder} has no *.safetensors weights (pickle files are never "
                             "loaded); re-save the teacher with save_pretrained.")
        state_dict = {}
        for file in weights:
            state_dict.update(load_file(file))
        hybrid_config, converted = convert_state_dict(AutoConfig.from_pretrained(folder), state_dict)
        teacher = HybridForCausalLM(hybrid_config)
        tied = hybrid_config.tie_word_embeddings  # the converter leaves out a tied lm_head
        teacher.load_state_dict({k: v.float() for k, v in converted.items()}, strict=not tied)
    teacher.eval().requires_grad_(False)
    return teacher


# ---------------------------------------------------------------------------------------------------------------------
# the student: which layers, its config, the weight transfer


def attention_layers(config: HybridConfig) -> list[int]:
    return [i for i, block in enumerate(config.block_types) if block == ATTENTION]


def chosen_layers(recipe: Recipe, teacher_config: HybridConfig) -> list[int] | None:
    """The layers to replace (None: chosen by `select` after stage 1); each must be an attention layer."""
    spec, depth = recipe.distill, teacher_config.num_hidden_layers
    if spec.select is not None:
        return None
    if spec.student_pattern is not None:
        pattern = spec.student_pattern
        if depth % len(pattern):
            raise RecipeError(f"distill.student_pattern: {pattern!r} ({len(pattern)} letters) does not tile the "
                              f"teacher's {depth} layers; use a length that divides {depth}.")
        layers = [i for i in range(depth) if pattern[i % len(pattern)] != KEEP]
    else:
        layers = sorted(set(spec.replace_layers))
        if layers and layers[-1] >= depth:
            raise RecipeError(f"distill.replace_layers: the teacher has layers 0..{depth - 1}, got {layers}.")
    not_attention = [i for i in layers if teacher_config.block_types[i] != ATTENTION]
    if not_attention:
        raise RecipeError(f"distill: layers {not_attention} of the teacher are not attention layers "
                          f"({[teacher_config.block_types[i] for i in not_attention]}); only attention is replaced.")
    if not layers:
        raise RecipeError("distill: no layer would be replaced; put at least one G or D in distill.student_pattern.")
    return layers


def student_blocks(recipe: Recipe, layers: list[int]) -> dict[int, str]:
    """The block each of `layers` becomes: its `student_pattern` letter, else `distill.student_block` (default
    Gated DeltaNet)."""
    spec = recipe.distill
    if spec.student_pattern is not None:
        pattern = spec.student_pattern
        return {i: STUDENT_BLOCKS[pattern[i % len(pattern)]] for i in layers}
    return {i: spec.student_block or GDN for i in layers}


def describe_blocks(blocks: str | dict[int, str]) -> str:
    """`Gated DeltaNet`, `Mamba-2`, or both, for messages and the report."""
    kinds = {blocks} if isinstance(blocks, str) else set(blocks.values())
    return " and ".join(BLOCK_NAMES.get(kind, kind) for kind in sorted(kinds))


def _block_of(blocks: str | dict[int, str], layer: int) -> str:
    return blocks if isinstance(blocks, str) else blocks[layer]


def check_transferable(config: HybridConfig, blocks: set[str]) -> None:
    """Stop with the teacher's config field when its attention has parts the weight transfer cannot place."""
    unsupported = {
        "attention_output_gate": "its q_proj also emits an output gate per head",
        "attention_qk_norm": "its queries and keys are RMS-normalised per head",
    }
    if GDN in blocks:  # Gated DeltaNet's projections have no biases; Mamba-2's in_proj / out_proj can take them
        unsupported.update(attention_bias="its q/k/v projections have biases",
                           attention_out_bias="its o_proj has a bias")
    for field, what in unsupported.items():
        if getattr(config, field, False):
            raise RecipeError(
                f"distill: the teacher's `{field}` is set ({what}); the weight transfer into "
                f"{' / '.join(BLOCK_NAMES[b] for b in sorted(blocks))} maps plain q/k/v/o only, so this teacher "
                "cannot be turned into that student" + (" (Mamba-2 students take q/k/v/o biases)." if "bias" in field
                                                        else "."))


def student_config(teacher_config: HybridConfig, replaced: list[int], blocks: str | dict[int, str] = GDN
                   ) -> HybridConfig:
    """The teacher's config with `replaced` layers as `blocks` (one block type, or one per layer), one recurrent head
    per attention query head: Gated DeltaNet with Hk = Hv = H, Dk = Dv = head_dim; Mamba-2 with H heads, head dim
    P = state size N = head_dim and one B/C group per head."""
    values = teacher_config.to_dict()
    for key in ("block_pattern", "layer_types", "architectures", "transformers_version", "auto_map", "model_type",
                "dtype", "torch_dtype"):
        values.pop(key, None)
    values["block_types"] = [_block_of(blocks, i) if i in replaced else block
                             for i, block in enumerate(teacher_config.block_types)]
    new = {values["block_types"][i] for i in replaced}
    unknown = sorted(new - set(BLOCK_NAMES))
    if unknown:
        raise RecipeError(f"distill.student_block: attention can become {' or '.join(BLOCK_NAMES)}, not {unknown}.")
    heads, head_dim = teacher_config.num_attention_heads, teacher_config.head_dim
    fields = {}
    if GDN in new:
        fields[GDN] = dict(linear_num_key_heads=heads, linear_num_value_heads=heads, linear_key_head_dim=head_dim,
                           linear_value_head_dim=head_dim)
    if MAMBA2 in new:
        has_bias = teacher_config.attention_bias or bool(teacher_config.attention_out_bias)
        fields[MAMBA2] = dict(mamba_num_heads=heads, mamba_head_dim=head_dim, mamba_d_state=head_dim,
                              mamba_n_groups=heads, mamba_proj_bias=has_bias)
    for block, needed in fields.items():
        # a teacher that already has such layers keeps them: their fields must be the ones the new layers need
        differing = {k: v for k, v in needed.items() if values[k] != v}
        if block in teacher_config.block_types and differing:
            raise RecipeError(
                f"distill: the teacher already has {BLOCK_NAMES[block]} layers with "
                f"{ {k: values[k] for k in differing} }, but new ones initialised from its attention need {differing}; "
                "one config holds one set of these fields, so replace its attention by the other block kind.")
        values.update(needed)
    return HybridConfig(**values)


def expand_kv_heads(weight: torch.Tensor, kv_heads: int, query_heads: int) -> torch.Tensor:
    """`[Hkv * D, ...]` -> `[H * D, ...]`: KV head j repeated for the query heads j * r .. j * r + r - 1 it serves."""
    head_dim = weight.shape[0] // kv_heads
    return weight.reshape(kv_heads, head_dim, -1).repeat_interleave(query_heads // kv_heads, dim=0).reshape(
        query_heads * head_dim, *weight.shape[1:])


def _copy(target: torch.Tensor, value: torch.Tensor, name: str, origin: str) -> None:
    if value.shape != target.shape:
        raise ValueError(f"distill: {name} {list(target.shape)} cannot take the teacher's {origin} "
                         f"{list(value.shape)}; this attention layout is not one the weight transfer maps yet.")
    target.copy_(value)


def _identity_conv(conv: torch.nn.Conv1d, prefix: str, mapping: dict[str, str]) -> None:
    conv.weight.zero_()
    conv.weight[:, :, -1] = 1.0  # the causal conv's newest tap: the current token passes through unchanged
    mapping[f"{prefix}conv1d.weight"] = "identity"
    if conv.bias is not None:
        conv.bias.zero_()
        mapping[f"{prefix}conv1d.bias"] = "identity"


def _into_gated_deltanet(mixer, source: dict, prefix: str, config: HybridConfig, conv_init: str
                         ) -> tuple[dict[str, str], set[str]]:
    """q_proj / o_proj copied, k_proj / v_proj with each KV head repeated for its query heads (see the docstring)."""
    mapping, used = {}, set()
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        key = f"{prefix}{name}.weight"
        value, origin = source[key], key
        if name in ("k_proj", "v_proj"):
            value = expand_kv_heads(value, config.num_key_value_heads, config.num_attention_heads)
            origin = f"expand_kv_heads({key})"
        _copy(getattr(mixer, name).weight, value, f"{prefix}{name}.weight", origin)
        mapping[f"{prefix}{name}.weight"] = origin
        used.add(key)
    if conv_init == "identity":
        _identity_conv(mixer.conv1d, prefix, mapping)
    return mapping, used


def _into_mamba2(mixer, source: dict, prefix: str, config: HybridConfig, conv_init: str
                 ) -> tuple[dict[str, str], set[str]]:
    """in_proj's rows `[z | x | B | C | dt]`: x <- V and B <- K (each KV head repeated for its query heads), C <- Q,
    z and dt fresh; out_proj <- o_proj; biases likewise; the gated norm's weight 1 (see the docstring)."""
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    inner, group_width = mixer.intermediate_size, mixer.n_groups * mixer.d_state
    ends = list(itertools.accumulate([inner, inner, group_width, group_width, heads]))
    rows = {part: slice(end - size, end) for part, size, end in
            zip(("z", "x", "B", "C", "dt"), (inner, inner, group_width, group_width, heads), ends, strict=True)}
    mapping, used = {}, set()
    origins = {"z": "fresh", "dt": "fresh"}
    if mixer.in_proj.bias is not None:
        mixer.in_proj.bias.zero_()  # z and dt (dt's offset is dt_bias), and x / B / C where the teacher has no bias
    for part, name in (("x", "v_proj"), ("B", "k_proj"), ("C", "q_proj")):
        for kind in ("weight", "bias"):
            key, target = f"{prefix}{name}.{kind}", getattr(mixer.in_proj, kind)
            if key not in source:
                continue
            value = source[key] if part == "C" else expand_kv_heads(source[key], kv_heads, heads)
            _copy(target[rows[part]], value, f"{prefix}in_proj.{kind}[{part} rows]", key)
            used.add(key)
        key = f"{prefix}{name}.weight"
        origins[part] = key if part == "C" else f"expand_kv_heads({key})"
    mapping[f"{prefix}in_proj.weight"] = "rows " + "; ".join(
        f"{rows[part].start}:{rows[part].stop} {part} <- {origins[part]}" for part in rows)
    if mixer.in_proj.bias is not None:
        mapping[f"{prefix}in_proj.bias"] = "the same rows of the q/k/v biases (0 where the teacher has none; z, dt: 0)"
    for kind in ("weight", "bias"):
        key, target = f"{prefix}o_proj.{kind}", getattr(mixer.out_proj, kind)
        if target is None:
            continue
        if key in source:
            _copy(target, source[key], f"{prefix}out_proj.{kind}", key)
            used.add(key)
        else:
            target.zero_()
        mapping[f"{prefix}out_proj.{kind}"] = key if key in source else "zeros"
    mixer.norm.weight.fill_(1.0)
    mapping[f"{prefix}norm.weight"] = "ones"
    if conv_init == "identity":
        _identity_conv(mixer.conv1d, prefix, mapping)
    return mapping, used


# how a teacher attention layer's weights enter each kind of new layer: (the new mixer, the teacher's state dict, the
# layer's `model.layers.i.mixer.` prefix, which names the attention in the teacher and the new mixer in the student,
# the teacher's config, conv_init) -> (student tensor -> where it came from, the teacher keys read)
TRANSFERS = {GDN: _into_gated_deltanet, MAMBA2: _into_mamba2}


@torch.no_grad()
def transfer_weights(teacher: HybridForCausalLM, student: HybridForCausalLM, replaced: list[int],
                     conv_init: str = "identity") -> dict[str, str]:
    """Copy the teacher into the student; returns, per student tensor, where it came from (a teacher key, or
    `expand_kv_heads(key)`, row ranges of Mamba-2's `in_proj`, `identity`, `ones`, `fresh`). Every teacher tensor lands
    somewhere; nothing else stays random except the fresh gate/decay parameters of the new layers."""
    source = teacher.state_dict()
    config = teacher.config
    check_transferable(config, {student.config.block_types[i] for i in replaced})
    mapping: dict[str, str] = {}
    used: set[str] = set()
    new_mixers = tuple(f"model.layers.{i}.mixer." for i in replaced)
    for name, tensor in student.state_dict().items():
        if name.startswith(new_mixers):
            mapping[name] = "fresh"  # unless the layer's transfer below says otherwise
            continue
        tensor.copy_(source[name])
        mapping[name] = name
        used.add(name)
    for i in replaced:
        prefix = f"model.layers.{i}.mixer."
        transfer = TRANSFERS[student.config.block_types[i]]
        placed, read = transfer(student.model.layers[i].mixer, source, prefix, config, conv_init)
        mapping.update(placed)
        used |= read
    dropped = sorted(set(source) - used)
    if dropped:  # check_transferable stops the known cases first; a new teacher layout must not lose weights silently
        raise RuntimeError(f"weight transfer left teacher tensors unused: {dropped}")
    return mapping


def build_student(teacher: HybridForCausalLM, replaced: list[int], conv_init: str, seed: int,
                  blocks: str | dict[int, str] = GDN) -> tuple[HybridForCausalLM, dict[str, str]]:
    """The student of `replaced` layers as `blocks`, initialised from the teacher (the fresh parts seeded by
    `seed`)."""
    torch.manual_seed(seed)
    student = HybridForCausalLM(student_config(teacher.config, replaced, blocks))
    mapping = transfer_weights(teacher, student, replaced, conv_init)
    return student.eval(), mapping


# ---------------------------------------------------------------------------------------------------------------------
# the stages' objectives (plugged into recipes/trainer.py's loop)


def _decoder_layers(model) -> torch.nn.ModuleList:
    """The decoder layers under any wrapper (accelerate/DDP, PEFT)."""
    while not isinstance(model, HybridModel):
        model = model.module if hasattr(model, "module") and not hasattr(model, "model") else model.model
    return model.layers


@torch.no_grad()
def teacher_mixer_io(teacher: HybridForCausalLM, batch: dict, layers: list[int]) -> dict[int, tuple]:
    """The (input, output) of each listed layer's attention mixer in one teacher forward."""
    captured: dict[int, tuple] = {}
    hooks = [
        _decoder_layers(teacher)[i].mixer.register_forward_hook(
            lambda module, args, output, i=i: captured.__setitem__(i, (args[0], output[0])))
        for i in layers
    ]
    try:
        # the bare decoder stack: the LM head is not needed here
        teacher.model(input_ids=batch["input_ids"], position_ids=batch.get("position_ids"), use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    return captured


class AlignmentLoss:
    """Stage 1: each new mixer reproduces the teacher attention's output from the teacher's own input to that layer.

    The loss is the mean over the aligned layers of MSE(student, teacher) / mean(teacher^2), a fraction of the
    target's energy, so every layer counts equally whatever its output scale. Only the aligned mixers train.
    """

    name = "align"

    def __init__(self, teacher: HybridForCausalLM, layers: list[int]) -> None:
        self.teacher, self.layers = teacher, layers

    def setup(self, model, accelerator) -> None:
        if accelerator.num_processes > 1:
            raise RecipeError("distill: the alignment stage calls the mixers directly, outside the DDP wrapper, so it "
                              "runs in one process.")
        self.teacher.to(accelerator.device)
        model.requires_grad_(False)
        for i in self.layers:
            _decoder_layers(model)[i].mixer.requires_grad_(True)

    def per_layer(self, model, batch: dict) -> dict[int, torch.Tensor]:
        captured = teacher_mixer_io(self.teacher, batch, self.layers)
        input_ids = batch["input_ids"]
        _, reset = HybridModel._recurrent_masks(None, batch.get("position_ids"), *input_ids.shape, 0)
        losses = {}
        for i in self.layers:
            inputs, target = captured[i]
            output, _ = _decoder_layers(model)[i].mixer(inputs, None, mask=None, reset=reset)
            losses[i] = (output.float() - target.float()).pow(2).mean() / target.float().pow(2).mean().clamp_min(1e-12)
        return losses

    def __call__(self, model, batch: dict, head: str):
        return torch.stack(list(self.per_layer(model, batch).values())).mean()


def _shifted(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits at the positions that predict a label, and those labels (transformers' labels == input_ids)."""
    logits, labels = logits[:, :-1], labels[:, 1:]
    keep = labels != -100
    return logits[keep].float(), labels[keep]


def distillation_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean over positions of T^2 * KL(softmax(teacher / T) || softmax(student / T)) (Hinton et al. 2015)."""
    teacher_log_probs = F.log_softmax(teacher_logits / temperature, dim=-1)
    student_log_probs = F.log_softmax(student_logits / temperature, dim=-1)
    kl = (teacher_log_probs.exp() * (teacher_log_probs - student_log_probs)).sum(-1)
    return kl.mean() * temperature**2


class LogitDistillationLoss:
    """Stage 2: the student's next-token distributions learn the teacher's (+ `ce_weight` * the hard-label loss)."""

    name = "kl"

    def __init__(self, teacher: HybridForCausalLM, temperature: float, ce_weight: float = 0.0,
                 freeze: tuple[str, ...] = ()) -> None:
        self.teacher, self.temperature, self.ce_weight, self.freeze = teacher, temperature, ce_weight, freeze

    def setup(self, model, accelerator) -> None:
        self.teacher.to(accelerator.device)
        for name, parameter in model.named_parameters():
            if frozen_part(name, _decoder_layers(model)) in self.freeze:
                parameter.requires_grad_(False)

    def __call__(self, model, batch: dict, head: str):
        ids, positions = batch["input_ids"], batch.get("position_ids")
        student = model(input_ids=ids, position_ids=positions, use_cache=False).logits
        with torch.no_grad():
            teacher = self.teacher(input_ids=ids, position_ids=positions, use_cache=False).logits
        student, labels = _shifted(student, batch["labels"])
        teacher, _ = _shifted(teacher, batch["labels"])
        loss = distillation_kl(student, teacher, self.temperature)
        if self.ce_weight:
            loss = loss + self.ce_weight * F.cross_entropy(student, labels)
        return loss


def frozen_part(name: str, layers) -> str | None:
    """Which `distill.freeze` part a parameter belongs to (embeddings, mlp, norms, attention), or None (new mixers)."""
    if "embed_tokens" in name or name.endswith("lm_head.weight"):
        return "embeddings"
    if ".mlp." in name:
        return "mlp"
    if "layernorm" in name or name.endswith("model.norm.weight"):
        return "norms"
    if ".mixer." in name:
        index = int(name.split("layers.")[1].split(".")[0])
        return "attention" if layers[index].block_type == ATTENTION else None
    return None


@torch.no_grad()
def swap_kl(teacher: HybridForCausalLM, aligned: HybridForCausalLM, layers: list[int], batches: list[dict],
            temperature: float = 1.0) -> dict[int, float]:
    """KL(teacher || teacher with only layer i's attention swapped for its aligned replacement), per layer."""
    references = [teacher(input_ids=b["input_ids"], position_ids=b.get("position_ids"), use_cache=False).logits
                  for b in batches]
    result = {}
    for i in layers:
        layer = teacher.model.layers[i]
        attention = layer.mixer
        layer.mixer = aligned.model.layers[i].mixer
        try:
            total = 0.0
            for batch, reference in zip(batches, references, strict=True):
                logits = teacher(input_ids=batch["input_ids"], position_ids=batch.get("position_ids"),
                                 use_cache=False).logits
                swapped, _ = _shifted(logits, batch["labels"])
                target, _ = _shifted(reference, batch["labels"])
                total += float(distillation_kl(swapped, target, temperature))
            result[i] = total / len(batches)
        finally:
            layer.mixer = attention
    return result


# ---------------------------------------------------------------------------------------------------------------------
# folders and stage recipes


def save_model_atomically(model: HybridForCausalLM, tokenizer, folder: Path) -> None:
    """`save_pretrained` into a temporary folder renamed into place: a kill never leaves half a model."""
    tmp = folder.with_name(f".tmp-{folder.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)


def write_json_atomically(path: Path, value) -> None:
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text(json.dumps(value, indent=2))
    os.replace(tmp, path)


def stage_recipe(recipe: Recipe, folder: Path, start: Path, tokenizer_path: str, steps: int, lr: float,
                 warmup: int, description: str, peft: bool = False) -> Recipe:
    """A plain training recipe for one stage: the distill recipe's data, batch, eval and checkpoint settings."""
    values = recipe.to_dict()
    values.pop("distill")
    values.update(kind="train", output_dir=str(folder), description=description)
    values["model"] = {"from_pretrained": str(start), "head": "causal_lm"}
    values["tokenizer"] = dict(values["tokenizer"], path=tokenizer_path)
    values["train"] = dict(values["train"], max_steps=steps, lr=lr, warmup_steps=warmup)
    values["peft"] = dict(values["peft"], enabled=peft and recipe.peft.enabled)
    return load_recipe(values)


def stage_done(folder: Path) -> bool:
    """`summary.json` is written last by the training loop: its presence marks a finished stage."""
    return (folder / "summary.json").exists()


def run_stage(stage: Recipe, resume: bool, objective=None) -> dict:
    folder = Path(stage.output_dir)
    if resume and stage_done(folder):
        print(f"{folder.name}: finished earlier, kept", flush=True)
        return json.loads((folder / "summary.json").read_text())
    return trainer.train(stage, resume=resume, objective=objective)


def combined_metrics(stages: list[tuple[str, Path]], output_dir: Path) -> list[dict]:
    """Both stages' metrics.jsonl as one, with a `stage` field and steps counted on from stage to stage."""
    records, offset = [], 0
    for stage, folder in stages:
        path = folder / "metrics.jsonl"
        if not path.exists():
            continue
        lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        for record in lines:
            records.append({**record, "stage": stage, "step": record["step"] + offset, "stage_step": record["step"]})
        offset += lines[-1]["step"] if lines else 0
    tmp = output_dir / ".metrics.jsonl.tmp"
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    os.replace(tmp, output_dir / "metrics.jsonl")
    return records


# ---------------------------------------------------------------------------------------------------------------------
# the whole run


class Laps:
    """Wall-clock and CPU seconds (this process, all threads) per part of the run. On a shared machine the wall time
    grows with the load; CPU seconds / cores is roughly what the run would take alone."""

    def __init__(self) -> None:
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}
        self.began = self._now()
        self.start()

    @staticmethod
    def _now() -> tuple[float, float]:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return time.perf_counter(), usage.ru_utime + usage.ru_stime

    def start(self) -> None:
        self.mark = self._now()

    def stop(self, name: str) -> None:
        wall, cpu = self._now()
        self.wall[name], self.cpu[name] = wall - self.mark[0], cpu - self.mark[1]

    def as_dict(self) -> dict:
        now = self._now()
        totals = {"seconds": now[0] - self.began[0], "cpu_seconds": now[1] - self.began[1]}
        return {kind: {**{k: round(v, 1) for k, v in laps.items()}, "total": round(totals[kind], 1)}
                for kind, laps in (("seconds", self.wall), ("cpu_seconds", self.cpu))}


def distill(recipe: str | Path | dict | Recipe, overrides: list[str] | dict | None = None,
            resume: bool = False) -> dict:
    """Run a `kind: distill` recipe: student, stage 1, (selection), stage 2, scratch baseline, report."""
    from transformers import AutoTokenizer

    recipe = load_recipe(recipe, overrides)
    if recipe.kind != "distill":
        raise RecipeError("kind: `hybridzoo distill` runs recipes with `kind: distill` (see "
                          "recipes/distill_stdlib.yaml); train other recipes with `hybridzoo train`.")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise RecipeError("hybridzoo distill runs in one process (the alignment stage calls the new mixers outside a "
                          "DDP wrapper); start it without accelerate launch.")
    spec, seed = recipe.distill, recipe.train.seed
    output_dir = Path(recipe.output_dir)
    runs = output_dir / RUNS
    runs.mkdir(parents=True, exist_ok=True)
    tmp = output_dir / ".recipe.yaml.tmp"
    tmp.write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False))
    os.replace(tmp, output_dir / "recipe.yaml")
    laps, load_before = Laps(), os.getloadavg()

    teacher_dir = Path(recipe.model.from_pretrained)
    tokenizer_path = recipe.tokenizer.path or str(teacher_dir)
    if not recipe.tokenizer.path and not (teacher_dir / "tokenizer_config.json").exists():
        raise RecipeError(f"tokenizer.path: the teacher {teacher_dir} has no tokenizer files; set tokenizer.path to "
                          "the tokenizer it was trained with (a new one would not match its vocabulary).")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    teacher = load_teacher(teacher_dir)
    replaced = chosen_layers(recipe, teacher.config)
    candidates = replaced if replaced is not None else attention_layers(teacher.config)
    blocks = student_blocks(recipe, candidates)
    if replaced is None and spec.keep_attention >= len(candidates):
        raise RecipeError(f"distill.keep_attention: the teacher has {len(candidates)} attention layers; keep fewer "
                          "so that some are replaced.")
    print(f"teacher: {teacher_dir} ({teacher.config.num_hidden_layers} layers, "
          f"{sum(p.numel() for p in teacher.parameters()) / 1e6:.2f}M parameters); "
          + (f"replacing layers {replaced} by {describe_blocks(blocks)}" if replaced is not None else
             f"aligning {describe_blocks(blocks)} in all {len(candidates)} attention layers, then keeping "
             f"{spec.keep_attention} chosen by KL"),
          flush=True)

    # the stage-1 model: the candidates replaced, everything from the teacher
    laps.start()
    init_dir = runs / "student-init"
    if not (resume and (init_dir / "config.json").exists()):
        student, mapping = build_student(teacher, candidates, spec.conv_init, seed, blocks)
        save_model_atomically(student, tokenizer, init_dir)
        write_json_atomically(runs / "weight_transfer.json", mapping)

    # stage 1: alignment
    align_dir = runs / "stage1-align"
    if spec.align_steps:
        stage = stage_recipe(recipe, align_dir, init_dir, tokenizer_path, spec.align_steps, spec.align_lr,
                             spec.align_warmup_steps, "distill stage 1: per-layer alignment to the teacher attention")
        run_stage(stage, resume, AlignmentLoss(teacher, candidates))
        aligned_dir = align_dir
    else:
        aligned_dir = init_dir
    laps.stop("align")

    # selection and the student after stage 1
    laps.start()
    aligned = HybridForCausalLM.from_pretrained(aligned_dir, dtype=torch.float32).eval()
    selection = None
    if replaced is None:
        selection = select_by_kl(recipe, teacher, aligned, candidates, tokenizer_path)
        replaced = selection["replaced"]
        write_json_atomically(output_dir / "selection.json", selection)
    stage1_dir = runs / "student-stage1"
    student = assemble_student(teacher, aligned, replaced, spec.conv_init, seed, blocks)
    if not (resume and (stage1_dir / "config.json").exists()):
        save_model_atomically(student, tokenizer, stage1_dir)
    laps.stop("select")

    # stage 2: logit distillation
    laps.start()
    kl_dir = runs / "stage2-kl"
    t = recipe.train
    stage = stage_recipe(recipe, kl_dir, stage1_dir, tokenizer_path, t.max_steps, t.lr, t.warmup_steps,
                         "distill stage 2: logit distillation from the teacher", peft=True)
    kl_summary = run_stage(stage, resume, LogitDistillationLoss(teacher, spec.temperature, spec.ce_weight,
                                                                tuple(spec.freeze)))
    laps.stop("kl")

    # the same hybrid from scratch on as many tokens
    laps.start()
    scratch_dir = None
    if spec.scratch:
        scratch_init = runs / "scratch-init"
        if not (resume and (scratch_init / "config.json").exists()):
            torch.manual_seed(seed)
            save_model_atomically(HybridForCausalLM(student.config), tokenizer, scratch_init)
        scratch_dir = runs / "scratch"
        steps = spec.align_steps + t.max_steps
        # warm-up: a tenth of the steps, the quickstart's rule for pretraining from scratch
        stage = stage_recipe(recipe, scratch_dir, scratch_init, tokenizer_path, steps, spec.scratch_lr,
                             max(1, steps // 10), "the distilled student's architecture from scratch")
        run_stage(stage, resume)
    laps.stop("scratch")

    # the final student in the output folder
    for name in [*COPIED_FILES, *(p.name for p in kl_dir.glob("*.py")), *(p.name for p in kl_dir.glob("tokenizer*")),
                 "special_tokens_map.json"]:
        if (kl_dir / name).is_file():
            shutil.copy2(kl_dir / name, output_dir / name)
    if (kl_dir / "adapter").is_dir():
        shutil.copytree(kl_dir / "adapter", output_dir / "adapter", dirs_exist_ok=True)
    records = combined_metrics([("align", align_dir), ("kl", kl_dir)] if spec.align_steps else [("kl", kl_dir)],
                               output_dir)
    scratch_records = []
    if scratch_dir is not None:
        scratch_records = [json.loads(line) for line in (scratch_dir / "metrics.jsonl").read_text().splitlines()]
    plot_stages(records, scratch_records, output_dir / "loss_curve.png")

    summary = {"teacher": str(teacher_dir), "replaced_layers": replaced,
               "student_block_types": student.config.block_types, "stage2": kl_summary,
               "runs": {"student_init": str(init_dir), "stage1": str(stage1_dir), "stage2": str(kl_dir),
                        "scratch": str(scratch_dir) if scratch_dir else None},
               "selection": selection}
    if spec.report:
        from hybridzoo.recipes.distill_report import write_report

        laps.start()
        stage1, stage2, scratch = ("student after stage 1 (align)", "student after stage 2 (kl)",
                                   "same hybrid from scratch")
        folders = {"teacher": teacher_dir, "student (weight transfer only)": init_dir if spec.select is None else None,
                   stage1: stage1_dir, stage2: output_dir, scratch: scratch_dir}
        steps = {"student (weight transfer only)": 0, stage1: spec.align_steps, stage2: spec.align_steps + t.max_steps,
                 scratch: spec.align_steps + t.max_steps}
        tokens = {k: v * t.micro_batch_size * t.grad_accum * recipe.data.context_length for k, v in steps.items()}
        summary["report"] = write_report(recipe, teacher, {k: v for k, v in folders.items() if v is not None},
                                         tokens, output_dir, selection=selection,
                                         timing={**laps.as_dict(), "load_before": load_before})
        laps.stop("report")
    summary.update(laps.as_dict())
    summary["load_average"] = {"start": load_before, "end": os.getloadavg()}
    write_json_atomically(output_dir / "summary.json", summary)
    print(f"saved: {output_dir} (student, recipe.yaml, metrics.jsonl, loss_curve.png, eval/, runs/)", flush=True)
    return summary


@torch.no_grad()
def assemble_student(teacher: HybridForCausalLM, aligned: HybridForCausalLM, replaced: list[int], conv_init: str,
                     seed: int, blocks: str | dict[int, str] = GDN) -> HybridForCausalLM:
    """The student of `replaced` layers: their mixers from the aligned model, everything else from the teacher."""
    student, _ = build_student(teacher, replaced, conv_init, seed, blocks)
    aligned_state = aligned.state_dict()
    for name, tensor in student.state_dict().items():
        if any(name.startswith(f"model.layers.{i}.mixer.") for i in replaced):
            tensor.copy_(aligned_state[name])
    return student


def select_by_kl(recipe: Recipe, teacher: HybridForCausalLM, aligned: HybridForCausalLM, candidates: list[int],
                 tokenizer_path: str) -> dict:
    """Keep as attention the `keep_attention` layers whose swap for their aligned replacement costs the most KL,
    measured on the first `select_batches` training micro-batches."""
    from hybridzoo.recipes.data import prepare_data

    spec = recipe.distill
    probe = load_recipe({**recipe.to_dict(), "tokenizer": {**recipe.to_dict()["tokenizer"], "path": tokenizer_path}})
    data = prepare_data(probe, log=lambda message: None)
    size = recipe.train.micro_batch_size
    batches = [data.train.batch(i * size, size) for i in range(spec.select_batches)]
    kl = swap_kl(teacher, aligned, candidates, batches)
    kept = sorted(sorted(kl, key=kl.get, reverse=True)[: spec.keep_attention])
    replaced = [i for i in candidates if i not in kept]
    print("selection: KL(teacher || one layer swapped) " + ", ".join(f"layer {i}: {v:.4f}" for i, v in kl.items())
          + f"; keeping attention at {kept}", flush=True)
    return {"criterion": "kl", "kl_per_layer": {str(i): v for i, v in kl.items()}, "kept_attention": kept,
            "replaced": replaced, "batches": spec.select_batches}


def plot_stages(records: list[dict], scratch: list[dict], png_path: Path) -> None:
    """Training loss of both stages (alignment on its own axis) and held-out loss of the student and of scratch."""
    from hybridzoo.evaluation.plots import plt, save_png  # matplotlib on the Agg backend, imported only to plot

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    align = [(r["step"], r["loss"]) for r in records if r["stage"] == "align"]
    if align:
        left.plot(*zip(*align, strict=True), color="tab:purple")
    left.set_title("stage 1: alignment loss (MSE / mean square)")
    left.set_xlabel("optimizer step")
    left.set_yscale("log")
    for label, rows, style in (("student (held-out CE)", records, "o-"), ("from scratch (held-out CE)", scratch,
                                                                           "s--")):
        points = [(r["tokens"] if label.startswith("from") else _tokens(r, records), r["val_loss"])
                  for r in rows if "val_loss" in r]
        if points:
            right.plot(*zip(*points, strict=True), style, label=label)
    kl = [(_tokens(r, records), r["loss"]) for r in records if r["stage"] == "kl"]
    if kl:
        right.plot(*zip(*kl, strict=True), color="tab:gray", alpha=0.5, label="stage 2 KL (train)")
    right.set_xlabel("tokens")
    right.set_ylabel("nats/token")
    right.set_title("held-out loss: student vs the same hybrid from scratch")
    right.legend()
    save_png(figure, png_path)


def _tokens(record: dict, records: list[dict]) -> int:
    """Tokens seen by the student at a record: stage 2 counts on from the end of stage 1."""
    if record["stage"] == "align":
        return record["tokens"]
    align = [r["tokens"] for r in records if r["stage"] == "align"]
    return record["tokens"] + (align[-1] if align else 0)
