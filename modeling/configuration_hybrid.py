"""`HybridConfig`: a decoder-only language model whose layers mix softmax attention and recurrent blocks.

Layers are chosen one by one with `block_types` (names from `blocks.BLOCK_CLASSES`), or with the compact
`block_pattern` shorthand repeated over the depth: `"GGGA"` over 8 layers is 3 Gated DeltaNet layers then 1 attention
layer, twice (Qwen3-Next's 3:1 layout). Letters: A attention, S sliding-window attention, G gated DeltaNet, L LSTM,
M mLSTM, X sLSTM, R RG-LRU, D Mamba-2 (see `blocks.BLOCK_LETTERS`). Field names follow transformers (Llama for the
shared fields, Qwen3-Next for the `linear_*` Gated DeltaNet fields) so peft, accelerate and other tools read the
config without help.

The fields shared by every model are declared here; each block declares its own (`config_fields` on the block class,
e.g. `mlstm_chunk_size`): the config takes them as keyword arguments, fills their defaults, checks them and saves them
in config.json like any other field. A block registered later (`blocks.register_block`) adds its fields the same way.
"""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers.configuration_utils import PreTrainedConfig
from transformers.modeling_rope_utils import RopeParameters

from .block_base import HybridBlock
from .blocks import BLOCK_CLASSES, BLOCK_LETTERS, RESERVED_FIELD_NAMES, block_fields, ship_external_blocks

DEFAULT_BLOCK_PATTERN = "GGGA"
AUTO_MAP = {
    "AutoConfig": "configuration_hybrid.HybridConfig",
    "AutoModel": "modeling_hybrid.HybridModel",
    "AutoModelForCausalLM": "modeling_hybrid.HybridForCausalLM",
    "AutoModelForSequenceClassification": "modeling_hybrid.HybridForSequenceClassification",
}


@strict
class HybridConfig(PreTrainedConfig):
    r"""
    Args:
        vocab_size, hidden_size, intermediate_size, num_hidden_layers, hidden_act, max_position_embeddings,
        initializer_range, rms_norm_eps, use_cache, pad_token_id, bos_token_id, eos_token_id, tie_word_embeddings:
            as in `LlamaConfig`. `intermediate_size=0` drops the MLP after each mixer (Zoology's MQAR models).
        block_types (`list[str]`, *optional*): one block name per layer, from `blocks.BLOCK_CLASSES`.
        block_pattern (`str`, *optional*): shorthand for `block_types`, one letter per layer, repeated to fill
            `num_hidden_layers` (which must be a multiple of its length). Defaults to `"GGGA"` when neither is given.
        num_attention_heads, num_key_value_heads, head_dim, rope_parameters, attention_bias, attention_dropout:
            softmax attention, as in `LlamaConfig`.
        rms_norm_zero_centered (`bool`): every RMSNorm of the model except the gated DeltaNet output norm stores
            `w` and multiplies by `1 + w` (Gemma, RecurrentGemma, Qwen3-Next, Qwen3.5); see `layers.HybridRMSNorm`.
        rms_norm_bias (`bool`): a learnable bias in the two RMSNorms of every decoder layer (xLSTM's `use_bias`; the
            final norm has none there either).
        mlp_bias (`bool`): biases in the MLP's three projections, as in `LlamaConfig` (RecurrentGemma: True).
        embedding_scale (`float`): token embeddings are multiplied by this before the first layer (1.0: off).
            Gemma-family models use sqrt(hidden_size); RecurrentGemma stores it rounded to bfloat16, and the converter
            writes that rounded value.
        final_logit_softcapping (`float`, *optional*): logits become `cap * tanh(logits / cap)` (RecurrentGemma and
            xLSTM-7B: 30; None: off).
        sliding_window (`int`, *optional*): window of the `sliding_attention` blocks (required when there are any).
        block fields: every registered block's `config_fields`, listed with their defaults under "Block fields" below
            (attention `attention_output_gate` / `attention_qk_norm` / `attention_out_bias`, Gated DeltaNet
            `linear_*`, `lstm_*`, `mlstm_*`, `rglru_*`, `slstm_*`).

    Example:
        >>> from hybridzoo import HybridConfig, HybridForCausalLM
        >>> config = HybridConfig(hidden_size=64, num_hidden_layers=4, block_pattern="GGGA", num_attention_heads=4)
        >>> model = HybridForCausalLM(config)
    """

    model_type = "hybridzoo"
    keys_to_ignore_at_inference = ["cache", "past_key_values"]  # the cache's name since / before transformers 5.24
    base_model_pp_plan = {
        "embed_tokens": (["input_ids"], ["inputs_embeds"]),
        "layers": (["hidden_states", "attention_mask"], ["hidden_states"]),
        "norm": (["hidden_states"], ["hidden_states"]),
    }

    vocab_size: int = 32000
    hidden_size: int = 512
    intermediate_size: int = 1408
    num_hidden_layers: int = 8
    block_types: list[str] | None = None
    block_pattern: str | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 4096
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    tie_word_embeddings: bool = False
    # softmax attention
    num_attention_heads: int = 8
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    rope_parameters: RopeParameters | dict | None = None
    attention_bias: bool = False
    attention_dropout: float | int = 0.0
    sliding_window: int | None = None
    # norms, MLP, embeddings and logits (options other checkpoints need; the defaults are Llama's)
    rms_norm_zero_centered: bool = False
    rms_norm_bias: bool = False
    mlp_bias: bool = False
    embedding_scale: float | int = 1.0
    final_logit_softcapping: float | int | None = None

    def __post_init__(self, **kwargs):
        self._resolve_block_types()
        # `layer_types` is derived from the blocks; a saved or user-given copy must agree with them
        given_layer_types = kwargs.pop("layer_types", None)
        if given_layer_types is not None and list(given_layer_types) != self.layer_types:
            raise ValueError(
                f"`layer_types` {list(given_layer_types)} disagrees with `block_types` {self.block_types}, which "
                f"imply {self.layer_types}. Set `block_types` (or `block_pattern`) only; `layer_types` is derived."
            )
        if self.head_dim is None and self.num_attention_heads > 0:
            if self.hidden_size % self.num_attention_heads != 0:
                raise ValueError(
                    f"`hidden_size` ({self.hidden_size}) must be divisible by `num_attention_heads` "
                    f"({self.num_attention_heads}), or set `head_dim` explicitly."
                )
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        for field in block_fields().values():  # every registered block's fields: given, or the default
            value = kwargs.pop(field.name, field.default)
            if value is None and field.default_from is not None:
                value = getattr(self, field.default_from)
            setattr(self, field.name, value)
        if self.rope_parameters is None:
            kwargs.setdefault("rope_theta", 10000.0)
        super().__post_init__(**kwargs)
        if getattr(self, "auto_map", None) is None:
            # every head, not only the saved one, so a saved folder serves all Auto classes as remote code
            self.auto_map = dict(AUTO_MAP)

    def _resolve_block_types(self) -> None:
        """Fill `block_types` from `block_pattern` (or the default) and check that the two agree."""
        if not isinstance(self.num_hidden_layers, int) or self.num_hidden_layers <= 0:
            raise ValueError(f"`num_hidden_layers` must be a positive integer, got {self.num_hidden_layers!r}.")
        pattern = self.block_pattern
        if pattern is None and self.block_types is None:
            pattern = DEFAULT_BLOCK_PATTERN
        if pattern is not None:
            unknown = sorted(set(pattern) - set(BLOCK_LETTERS))
            if not pattern or unknown:
                raise ValueError(
                    f"`block_pattern` {pattern!r} has unknown letters {unknown}; allowed letters: "
                    + ", ".join(f"{letter} ({name})" for letter, name in BLOCK_LETTERS.items())
                )
            if self.num_hidden_layers % len(pattern) != 0:
                raise ValueError(
                    f"`num_hidden_layers` ({self.num_hidden_layers}) must be a multiple of the length of "
                    f"`block_pattern` {pattern!r} ({len(pattern)}): the pattern is repeated over the depth."
                )
            from_pattern = [BLOCK_LETTERS[letter] for letter in pattern * (self.num_hidden_layers // len(pattern))]
            if self.block_types is not None and list(self.block_types) != from_pattern:
                raise ValueError(
                    f"`block_types` {list(self.block_types)} disagrees with `block_pattern` {pattern!r}; give one."
                )
            self.block_types = from_pattern
        self.block_types = list(self.block_types)
        unknown = [name for name in self.block_types if name not in BLOCK_CLASSES]
        if unknown:
            raise ValueError(f"`block_types` has unknown blocks {unknown}; allowed: {sorted(BLOCK_CLASSES)}.")
        if len(self.block_types) != self.num_hidden_layers:
            raise ValueError(
                f"`block_types` has {len(self.block_types)} entries but `num_hidden_layers` is "
                f"{self.num_hidden_layers}; give one block per layer (or a `block_pattern`)."
            )

    @property
    def block_classes(self) -> list[type[HybridBlock]]:
        """The block class of each layer, from the registry."""
        return [BLOCK_CLASSES[name] for name in self.block_types]

    @property
    def layer_types(self) -> list[str]:
        """transformers' per-layer type names, derived from the blocks (read-only)."""
        return [block.layer_type for block in self.block_classes]

    def save_pretrained(self, save_directory, push_to_hub: bool = False, **kwargs) -> None:
        super().save_pretrained(save_directory, push_to_hub=push_to_hub, **kwargs)
        if self._auto_class is not None:  # the folder carries the model code: add blocks registered from outside
            ship_external_blocks(save_directory, self.block_types)

    def validate_architecture(self):
        """Called by transformers at init and at save: every size must be positive and every head split exact."""
        positive = ["vocab_size", "hidden_size", "num_hidden_layers", "max_position_embeddings"]
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
        if self.intermediate_size < 0:
            raise ValueError(f"`intermediate_size` must be >= 0 (0 disables the MLP), got {self.intermediate_size}.")
        if self.rms_norm_eps <= 0:
            raise ValueError(f"`rms_norm_eps` must be > 0, got {self.rms_norm_eps}.")
        self._validate_model_options()
        for field in block_fields().values():  # value checks always, so a bad value is refused even when unused
            field.validate(getattr(self, field.name, field.default))
        for block in dict.fromkeys(self.block_classes):  # checks across fields only for the blocks the model has
            block.validate_config(self)

    def _validate_model_options(self) -> None:
        """The switches other checkpoints need: booleans are booleans, scales are positive and finite."""
        flags = ["rms_norm_zero_centered", "rms_norm_bias", "mlp_bias"]
        for name in flags:
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"`{name}` must be True or False, got {getattr(self, name)!r}.")
        scale = self.embedding_scale
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 < scale < float("inf"):
            raise ValueError(f"`embedding_scale` must be a positive finite number (1.0: off), got {scale!r}.")
        cap = self.final_logit_softcapping
        bad_cap = isinstance(cap, bool) or not isinstance(cap, (int, float)) or not 0 < cap < float("inf")
        if cap is not None and bad_cap:
            raise ValueError(f"`final_logit_softcapping` must be a positive number or None (off), got {cap!r}.")


RESERVED_FIELD_NAMES.update(HybridConfig.__dataclass_fields__)
_clashes = RESERVED_FIELD_NAMES & set(block_fields())
if _clashes:
    raise ValueError(f"Block config fields {sorted(_clashes)} clash with HybridConfig's own fields.")
HybridConfig.__doc__ += "\n    Block fields (name = default: meaning):\n" + "".join(
    f"        {field.name} = {field.default!r}: {field.doc}\n" for field in block_fields().values()
)

__all__ = ["HybridConfig"]
