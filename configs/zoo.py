"""The zoo: named hybrid architectures, each in the sizes tiny (tests), small (~20M), base (~125M), large (~1B).

An architecture is a repeating block pattern plus the fields that differ from the shared size table; a size is the
shared width/depth. `zoo_config("qwen3-next-style", "small", vocab_size=8000)` gives a `HybridConfig`; any
`HybridConfig` field can be overridden. Parameter counts and per-sequence state sizes are computed from the config
(`describe`), and the tests check them against an instantiated model and a filled cache.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hybridzoo.configs.settings import SettingsError, add_command, setting
from hybridzoo.modeling.blocks import BLOCK_CLASSES, BLOCK_LETTERS
from hybridzoo.modeling.configuration_hybrid import HybridConfig


@dataclass(frozen=True)
class Architecture:
    """A named layout. `pattern` (block letters, see HybridConfig's docstring) is repeated a whole number of times
    over the depth; only a source that itself cycles its pattern over any depth (RecurrentGemma) sets `cycle`, and an
    architecture whose pattern does not divide a shared size's depth says its own depth in `sizes`."""

    pattern: str
    summary: str
    source: str
    fields: dict = field(default_factory=dict)  # HybridConfig fields this architecture sets on top of the size
    cycle: bool = False  # the source cycles the pattern and cuts it off at any depth
    sizes: dict = field(default_factory=dict)  # size name -> fields that differ for this architecture (its depth)


ARCHITECTURES: dict[str, Architecture] = {
    "transformer": Architecture(
        "A", "all softmax attention: the Llama-style baseline", "Touvron et al. 2023, LLaMA (arXiv 2302.13971)"
    ),
    "gated-deltanet": Architecture(
        "G", "all Gated DeltaNet", "Yang, Kautz & Hatamizadeh, ICLR 2025 (arXiv 2412.06464)"
    ),
    "lstm": Architecture("L", "all classic LSTM", "Hochreiter & Schmidhuber 1997, Neural Computation 9(8)"),
    "qwen3-next-style": Architecture(
        "GGGA",
        "3 Gated DeltaNet : 1 full attention, GVA value heads",
        "Qwen3-Next (Qwen team 2025; transformers' Qwen3NextConfig layer layout)",
        {"linear_value_heads_factor": 2},
    ),
    "lstm-attention": Architecture(
        "LLLA", "LSTM layers with full attention every 4th layer", "the LSTM analogue of the 3:1 hybrids above"
    ),
    "griffin-style": Architecture(
        "RRS",
        "2 RG-LRU : 1 sliding-window attention, cycled over the depth",
        "De et al. 2024, Griffin (arXiv 2402.19427); RecurrentGemma (cycles (R, R, A) over its 26 layers)",
        {"sliding_window": 2048},
        cycle=True,
    ),
    "xlstm": Architecture(
        "MMMMMMMX",
        "mLSTM with sLSTM at 7:1",
        "Beck et al. 2024, xLSTM (arXiv 2405.04517), the xLSTM[7:1] model",
        sizes={"base": {"num_hidden_layers": 16}},  # 7:1 needs a multiple of 8 layers
    ),
    "mamba2": Architecture(
        "D",
        "all Mamba-2 (SSD), no MLP, tied embeddings; twice the depth of the shared sizes, as Mamba's papers match "
        "Transformer sizes",
        "Dao & Gu 2024, Mamba-2 (arXiv 2405.21060); transformers' Mamba2Config (head_dim 64, d_state 128, G = 1); "
        "base = Mamba-2 130M (24 x 768), large = Mamba-2 1.3B (48 x 2048)",
        {"intermediate_size": 0, "tie_word_embeddings": True},
        sizes={
            "tiny": {"num_hidden_layers": 16},
            "small": {"num_hidden_layers": 16},
            "base": {"num_hidden_layers": 24},
            "large": {"num_hidden_layers": 48},
        },
    ),
    "bamba-style": Architecture(
        "DDDDDDDDDADDDDDDDDADDDDDDDDADDDD",
        "Mamba-2 with full attention at layers 9, 18, 27 of 32, SwiGLU MLP after every mixer, half-rotary attention",
        "IBM Bamba-9B (ibm-ai-platform/Bamba-9B: 32 layers, attn_layer_indices [9, 18, 27]); transformers' "
        "BambaConfig (partial rotary 0.5, d_state 256, head_dim 64); widths scaled to each size, depth kept at 32",
        {"partial_rotary_factor": 0.5, "mamba_d_state": 256},
        sizes={
            "tiny": {"num_hidden_layers": 32},
            "small": {"num_hidden_layers": 32, "hidden_size": 192, "intermediate_size": 512},
            "base": {
                "num_hidden_layers": 32,
                "hidden_size": 512,
                "intermediate_size": 1408,
                "num_attention_heads": 8,
                "num_key_value_heads": 2,
            },
            "large": {"num_hidden_layers": 32, "hidden_size": 1536, "intermediate_size": 4096},
        },
    ),
    "paragru": Architecture(
        "U",
        "all ParaGRU (GRU with diagonal recurrence), trained by Newton's method",
        "Danieli et al. 2025, ParaRNN (arXiv 2510.21450), the ParaGRU model",
    ),
    "paralstm": Architecture(
        "P",
        "all ParaLSTM (CIFG LSTM, diagonal recurrence, peepholes), trained by Newton's method",
        "Danieli et al. 2025, ParaRNN (arXiv 2510.21450), the ParaLSTM model",
    ),
    "paralstm-attention": Architecture(
        "PPPA",
        "3 ParaLSTM : 1 full attention",
        "the ParaLSTM analogue of the 3:1 hybrids above (ParaRNN's cell, Qwen3-Next's ratio)",
    ),
}

# shared widths and depths; `num_attention_heads` also sets the recurrent blocks' head counts by default
SIZES: dict[str, dict] = {
    "tiny": dict(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=8,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        sliding_window_cap=64,
    ),
    "small": dict(
        vocab_size=32000,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=8,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
    ),
    "base": dict(
        vocab_size=32000,
        hidden_size=768,
        intermediate_size=2048,
        num_hidden_layers=12,
        num_attention_heads=12,
        num_key_value_heads=4,
        max_position_embeddings=8192,
    ),
    "large": dict(
        vocab_size=32000,
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=16,
        num_attention_heads=16,
        num_key_value_heads=4,
        max_position_embeddings=8192,
    ),
}


def _unknown(kind: str, name: str, known) -> ValueError:
    return ValueError(f"Unknown zoo {kind} {name!r}; choose one of: {', '.join(known)}.")


def zoo_config(name: str, size: str = "small", **overrides) -> HybridConfig:
    """The `HybridConfig` of zoo architecture `name` at `size`, with any config field overridden."""
    if name not in ARCHITECTURES:
        raise _unknown("architecture", name, ARCHITECTURES)
    if size not in SIZES:
        raise _unknown("size", size, SIZES)
    architecture = ARCHITECTURES[name]
    fields = dict(SIZES[size]) | architecture.sizes.get(size, {})
    window_cap = fields.pop("sliding_window_cap", None)
    extra = dict(architecture.fields)
    value_heads_factor = extra.pop("linear_value_heads_factor", 1)
    fields.update(extra)
    if window_cap is not None and "sliding_window" in fields:
        fields["sliding_window"] = min(fields["sliding_window"], window_cap)
    fields.update(overrides)
    if "linear_num_value_heads" not in overrides:
        key_heads = fields.get("linear_num_key_heads") or fields["num_attention_heads"]
        fields["linear_num_value_heads"] = key_heads * value_heads_factor
    if "block_types" not in overrides and "block_pattern" not in overrides:
        fields["block_types"] = layout(name, fields["num_hidden_layers"])
    return HybridConfig(**fields)


def two_layer_pattern(name: str) -> str:
    """Architecture `name` at Zoology's 2 layers (MQAR): a single-block architecture twice, a hybrid one layer of each
    of its kinds (its pattern's first and last letters), so a 2-layer "qwen3-next-style" keeps its attention layer."""
    pattern = ARCHITECTURES[name].pattern if name in ARCHITECTURES else None
    if pattern is None:
        raise _unknown("architecture", name, ARCHITECTURES)
    return pattern[0] + pattern[-1]


def task_model_fields(architecture: str, d_model: int, vocab_size: int, num_heads: int = 2, num_layers: int = 2,
                      longest: int = 2048, **overrides) -> dict:
    """Zoology's model for synthetic tasks as `HybridConfig` fields over the "tiny" size of `architecture` (what a
    recipe's `model.overrides` holds): `num_layers` layers at width `d_model`, no MLP, `num_heads` heads (Zoology's
    trade-off sweep: 2), positions up to `longest`; `overrides` are further fields (e.g.
    `linear_allow_neg_eigval=True`, or `block_pattern="X"` for an all-sLSTM model)."""
    fields = dict(vocab_size=vocab_size, hidden_size=d_model, num_hidden_layers=num_layers, intermediate_size=0,
                  num_attention_heads=num_heads, num_key_value_heads=num_heads,
                  max_position_embeddings=max(2048, longest))
    if num_layers == 2 and "block_pattern" not in overrides and "block_types" not in overrides:
        fields["block_pattern"] = two_layer_pattern(architecture)  # a hybrid keeps one layer of each of its kinds
    return {**fields, **overrides}


def layout(name: str, depth: int) -> list[str]:
    """The block of each of `depth` layers of architecture `name`: its pattern repeated (or cycled, if its source
    cycles it); a depth that would cut a repeating pattern short is an error."""
    architecture = ARCHITECTURES[name]
    pattern = architecture.pattern
    if not architecture.cycle and depth % len(pattern) != 0:
        raise ValueError(
            f"`num_hidden_layers` = {depth} is not a multiple of {name}'s pattern {pattern!r} ({len(pattern)} layers): "
            f"its source repeats the pattern whole. Choose a multiple of {len(pattern)}."
        )
    return [BLOCK_LETTERS[pattern[i % len(pattern)]] for i in range(depth)]


def describe(config: HybridConfig, dtype_bytes: int = 4) -> dict:
    """Closed-form sizes of a config: parameters, recurrent-state bytes per sequence, KV-cache bytes per token.

    Each block class states its own formulas (`parameter_count`, `state_bytes`/`state_formula`,
    `kv_bytes_per_token`/`kv_formula`); the tests check them against an instantiated model and a filled cache.
    """
    hidden = config.hidden_size
    parameters = config.vocab_size * hidden + hidden  # embeddings + final norm
    if not config.tie_word_embeddings:
        parameters += config.vocab_size * hidden
    state_bytes = kv_bytes_per_token = 0
    formulas = {}
    for name in config.block_types:
        block = BLOCK_CLASSES[name]
        parameters += hidden + block.parameter_count(config)  # input norm + mixer
        if config.intermediate_size > 0:
            parameters += hidden + 3 * hidden * config.intermediate_size  # norm + gated MLP
        if block.is_recurrent:
            state_bytes += block.state_bytes(config, dtype_bytes)
            formulas[name] = block.state_formula
        else:
            kv_bytes_per_token += block.kv_bytes_per_token(config, dtype_bytes)
            formulas[name] = block.kv_formula
    pattern = "".join(BLOCK_CLASSES[name].pattern_letter for name in config.block_types)
    return {
        "parameters": parameters,
        "pattern": pattern,
        "recurrent_state_bytes": state_bytes,
        "kv_bytes_per_token": kv_bytes_per_token,
        "sliding_window": config.sliding_window if "sliding_attention" in config.block_types else None,
        "formulas": formulas,
    }


def block_config(block_type: str, size: str = "small", **overrides) -> HybridConfig:
    """A model of `size` made of `block_type` layers only (with each field at its default): the block's sizes alone."""
    if block_type not in BLOCK_CLASSES:
        raise _unknown("block", block_type, BLOCK_CLASSES)
    if size not in SIZES:
        raise _unknown("size", size, SIZES)
    fields = dict(SIZES[size])
    fields["sliding_window"] = min(2048, fields.pop("sliding_window_cap", 2048))
    fields.update(overrides)
    return HybridConfig(**fields, block_types=[block_type] * fields["num_hidden_layers"])


def zoo_table(size: str = "small") -> str:
    """Markdown tables of every architecture and every registered block at `size` (float32 state)."""
    lines = [
        f"| architecture | params ({size}) | layer pattern | recurrent state / sequence | KV cache / token | source |",
        "|---|---:|---|---:|---:|---|",
    ]
    for name, architecture in ARCHITECTURES.items():
        info = describe(zoo_config(name, size))
        kv = f"{info['kv_bytes_per_token']:,} B" if info["kv_bytes_per_token"] else "0"
        if info["sliding_window"]:
            kv += f" (window {info['sliding_window']})"
        lines.append(
            f"| {name} | {info['parameters'] / 1e6:,.1f}M | {info['pattern']} | "
            f"{info['recurrent_state_bytes']:,} B | {kv} | {architecture.source} |"
        )
    lines += [
        "",
        f"Blocks (one layer at size {size}; b = bytes per element of the model dtype; state matrices are float32):",
        "",
        "| letter | block | params / layer | state / sequence | KV cache / token | formula | LoRA targets |",
        "|---|---|---:|---:|---:|---|---|",
    ]
    for name, block in BLOCK_CLASSES.items():
        config = block_config(name, size)
        state = f"{block.state_bytes(config, 4):,} B" if block.is_recurrent else "0"
        kv = "0" if block.is_recurrent else f"{block.kv_bytes_per_token(config, 4):,} B"
        formula = block.state_formula if block.is_recurrent else block.kv_formula
        targets = ", ".join((*block.lora_targets, *block.lora_custom_targets)) or "none"
        lines.append(
            f"| {block.pattern_letter} | {name} | {block.parameter_count(config):,} | {state} | {kv} | {formula} | "
            f"{targets} |"
        )
    return "\n".join(lines)


@dataclass
class ZooSettings:
    """What `hybridzoo zoo` takes."""

    action: str = setting("list", "list the zoo, or show one architecture's full config", choices=("list", "show"),
                          positional=True)
    name: str | None = setting(None, "architecture name (for `show`)", positional=True)
    size: str = setting("small", "size of the listed / shown configs", choices=tuple(SIZES))


def add_arguments(parser) -> None:
    """`hybridzoo zoo [--size S]` lists the zoo; `hybridzoo zoo show NAME [--size S]` prints one full config."""
    def run(settings: ZooSettings) -> int:
        if settings.action == "list":
            print(zoo_table(settings.size))
            return 0
        if settings.name is None:
            raise SettingsError(f"name: `zoo show` needs an architecture name: one of {', '.join(ARCHITECTURES)}")
        print(zoo_config(settings.name, settings.size).to_json_string(use_diff=False))
        return 0

    add_command(parser, ZooSettings, run)
