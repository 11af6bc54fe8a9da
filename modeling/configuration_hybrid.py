"""`HybridConfig`: a decoder-only language model whose layers mix softmax attention and recurrent blocks.

Layers are chosen one by one with `block_types` (names from `blocks.BLOCK_CLASSES`), or with the compact
`block_pattern` shorthand repeated over the depth: `"GGGA"` over 8 layers is 3 Gated DeltaNet layers then 1 attention
layer, twice (Qwen3-Next's 3:1 layout). Letters: A attention, S sliding-window attention, G gated DeltaNet, L LSTM,
M mLSTM, X sLSTM, R RG-LRU
(see `blocks.BLOCK_LETTERS`). Field names follow transformers (Llama for the shared fields, Qwen3-Next for the
`linear_*` Gated DeltaNet fields) so peft, accelerate and other tools read the config without help.
"""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers.configuration_utils import PreTrainedConfig
from transformers.modeling_rope_utils import RopeParameters

from .blocks import BLOCK_CLASSES, BLOCK_LETTERS

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
        sliding_window (`int`, *optional*): window of the `sliding_attention` blocks (required when there are any).
        linear_num_key_heads, linear_num_value_heads, linear_key_head_dim, linear_value_head_dim,
        linear_conv_kernel_dim: Gated DeltaNet shapes, as in `Qwen3NextConfig` (defaults: the attention heads).
        linear_chunk_size (`int`, *optional*): chunk length of the parallel form (None: 32 on CPU, 64 on GPU).
        linear_allow_neg_eigval (`bool`): beta in (0, 2) instead of (0, 1), allowing negative eigenvalues.
        lstm_hidden_size (`int`, *optional*): width of the `lstm` blocks' cell (defaults to `hidden_size`).
        mlstm_num_heads (`int`, *optional*): heads of the `mlstm` blocks (defaults to `num_attention_heads`).
        mlstm_qk_dim_factor, mlstm_v_dim_factor (`float`): q/k and v widths of the `mlstm` blocks as fractions of
            `hidden_size` (xLSTM-7B: 0.5 and 1.0); each width must split evenly into `mlstm_num_heads` heads.
        mlstm_input_gate (`str`): `"exp"` (xLSTM's exponential input gate with max-state stabilisation; loads
            xLSTM-7B weights) or `"sigmoid"` (mLSTMsig).
        mlstm_chunk_size (`int`): chunk length of the `mlstm` blocks' chunkwise-parallel form.
        mlstm_gate_soft_cap (`float`, *optional*): gate pre-activations are capped as `cap * tanh(x / cap)` (None: off).
        rglru_width (`int`, *optional*): width of the `rglru` blocks' recurrence (defaults to `hidden_size`).
        rglru_num_heads (`int`, *optional*): heads of the block-diagonal RG-LRU gates (defaults to
            `num_attention_heads`); must divide `rglru_width`.
        rglru_conv_kernel_dim (`int`): width of the `rglru` blocks' causal conv (Griffin: 4), >= 1.
        rglru_chunk_size (`int`, *optional*): None runs the RG-LRU recurrence as a time loop (fastest on CPU); an int
            selects the chunked form with that chunk length (for accelerators).
        slstm_num_heads (`int`, *optional*): heads of the `slstm` blocks' block-diagonal recurrent matrix (defaults to
            `num_attention_heads`); must divide `hidden_size`.
        slstm_conv_kernel_dim (`int`): width of the causal conv feeding the `slstm` input and forget gates (xLSTM: 4);
            0 turns the conv off.
        slstm_forget_gate (`str`): `"sigmoid"` or `"exp"`, the `slstm` forget gate activation.

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
    # gated DeltaNet
    linear_num_key_heads: int | None = None
    linear_num_value_heads: int | None = None
    linear_key_head_dim: int | None = None
    linear_value_head_dim: int | None = None
    linear_conv_kernel_dim: int = 4
    linear_chunk_size: int | None = None
    linear_allow_neg_eigval: bool = False
    # LSTM
    lstm_hidden_size: int | None = None
    # mLSTM
    mlstm_num_heads: int | None = None
    mlstm_qk_dim_factor: float | int = 0.5
    mlstm_v_dim_factor: float | int = 1.0
    mlstm_input_gate: str = "exp"
    mlstm_chunk_size: int = 64
    mlstm_gate_soft_cap: float | int | None = 15.0
    # RG-LRU
    rglru_width: int | None = None
    rglru_num_heads: int | None = None
    rglru_conv_kernel_dim: int = 4
    rglru_chunk_size: int | None = None
    # sLSTM
    slstm_num_heads: int | None = None
    slstm_conv_kernel_dim: int = 4
    slstm_forget_gate: str = "sigmoid"

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
        if self.linear_num_key_heads is None:
            self.linear_num_key_heads = self.num_attention_heads
        if self.linear_num_value_heads is None:
            self.linear_num_value_heads = self.linear_num_key_heads
        if self.linear_key_head_dim is None:
            self.linear_key_head_dim = self.head_dim
        if self.linear_value_head_dim is None:
            self.linear_value_head_dim = self.linear_key_head_dim
        if self.lstm_hidden_size is None:
            self.lstm_hidden_size = self.hidden_size
        if self.mlstm_num_heads is None:
            self.mlstm_num_heads = self.num_attention_heads
        if self.rglru_width is None:
            self.rglru_width = self.hidden_size
        if self.rglru_num_heads is None:
            self.rglru_num_heads = self.num_attention_heads
        if self.slstm_num_heads is None:
            self.slstm_num_heads = self.num_attention_heads
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
    def layer_types(self) -> list[str]:
        """transformers' per-layer type names, derived from the blocks (read-only)."""
        return [BLOCK_CLASSES[name].layer_type for name in self.block_types]

    def validate_architecture(self):
        """Called by transformers at init and at save: every size must be positive and every head split exact."""
        positive = ["vocab_size", "hidden_size", "num_hidden_layers", "max_position_embeddings"]
        positive += ["linear_conv_kernel_dim", "lstm_hidden_size"]
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
        if self.intermediate_size < 0:
            raise ValueError(f"`intermediate_size` must be >= 0 (0 disables the MLP), got {self.intermediate_size}.")
        if self.rms_norm_eps <= 0:
            raise ValueError(f"`rms_norm_eps` must be > 0, got {self.rms_norm_eps}.")
        if self.linear_chunk_size is not None and self.linear_chunk_size <= 0:
            raise ValueError(f"`linear_chunk_size` must be a positive integer or None, got {self.linear_chunk_size}.")
        blocks = set(self.block_types)
        if blocks & {"attention", "sliding_attention"}:
            for name in ["num_attention_heads", "num_key_value_heads", "head_dim"]:
                value = getattr(self, name)
                if not isinstance(value, int) or value <= 0:
                    raise ValueError(f"`{name}` must be a positive integer for attention blocks, got {value!r}.")
            if self.num_attention_heads % self.num_key_value_heads != 0:
                raise ValueError(
                    f"`num_attention_heads` ({self.num_attention_heads}) must be a multiple of "
                    f"`num_key_value_heads` ({self.num_key_value_heads}): each KV head serves a whole group."
                )
            factor = self.rope_parameters.get("partial_rotary_factor", 1.0)
            if not 0 < factor <= 1 or int(self.head_dim * factor) % 2 != 0 or int(self.head_dim * factor) == 0:
                raise ValueError(
                    f"`partial_rotary_factor` ({factor}) must be in (0, 1] and rotate an even, non-zero number of "
                    f"the `head_dim` ({self.head_dim}) channels: int(head_dim * factor) = "
                    f"{int(self.head_dim * factor)}."
                )
        if "sliding_attention" in blocks and (not isinstance(self.sliding_window, int) or self.sliding_window <= 0):
            raise ValueError(
                f"`sliding_window` must be a positive integer when `block_types` has sliding_attention blocks, "
                f"got {self.sliding_window!r}."
            )
        if "gated_deltanet" in blocks:
            for name in ["linear_num_key_heads", "linear_num_value_heads", "linear_key_head_dim"]:
                value = getattr(self, name)
                if not isinstance(value, int) or value <= 0:
                    raise ValueError(f"`{name}` must be a positive integer for gated_deltanet blocks, got {value!r}.")
            if not isinstance(self.linear_value_head_dim, int) or self.linear_value_head_dim <= 0:
                raise ValueError(
                    f"`linear_value_head_dim` must be a positive integer, got {self.linear_value_head_dim!r}."
                )
            if self.linear_num_value_heads % self.linear_num_key_heads != 0:
                raise ValueError(
                    f"`linear_num_value_heads` ({self.linear_num_value_heads}) must be a multiple of "
                    f"`linear_num_key_heads` ({self.linear_num_key_heads}): value heads share q/k heads in groups."
                )
        self._validate_mlstm("mlstm" in blocks)
        self._validate_rglru_slstm(blocks)

    def _validate_mlstm(self, has_blocks: bool) -> None:
        """mLSTM fields: option values always, the head split only when the model has `mlstm` blocks."""
        if self.mlstm_input_gate not in ("exp", "sigmoid"):
            raise ValueError(f"`mlstm_input_gate` must be 'exp' or 'sigmoid', got {self.mlstm_input_gate!r}.")
        if not isinstance(self.mlstm_chunk_size, int) or self.mlstm_chunk_size <= 0:
            raise ValueError(f"`mlstm_chunk_size` must be a positive integer, got {self.mlstm_chunk_size!r}.")
        if self.mlstm_gate_soft_cap is not None and self.mlstm_gate_soft_cap <= 0:
            raise ValueError(f"`mlstm_gate_soft_cap` must be > 0 or None (no cap), got {self.mlstm_gate_soft_cap}.")
        for name in ["mlstm_qk_dim_factor", "mlstm_v_dim_factor"]:
            if getattr(self, name) <= 0:
                raise ValueError(f"`{name}` must be > 0, got {getattr(self, name)}.")
        if not has_blocks:
            return
        heads = self.mlstm_num_heads
        if not isinstance(heads, int) or heads <= 0:
            raise ValueError(f"`mlstm_num_heads` must be a positive integer for mlstm blocks, got {heads!r}.")
        for name in ["mlstm_qk_dim_factor", "mlstm_v_dim_factor"]:
            width = int(self.hidden_size * getattr(self, name))
            if width <= 0 or width % heads != 0:
                raise ValueError(
                    f"`hidden_size * {name}` = {width} must be a positive multiple of `mlstm_num_heads` ({heads}): "
                    "the mlstm q/k and v widths split evenly into heads."
                )

    def _validate_rglru_slstm(self, blocks: set[str]) -> None:
        """RG-LRU and sLSTM fields: option values always, the head splits only when the model has such blocks."""
        if not isinstance(self.rglru_conv_kernel_dim, int) or self.rglru_conv_kernel_dim < 1:
            raise ValueError(f"`rglru_conv_kernel_dim` must be an integer >= 1, got {self.rglru_conv_kernel_dim!r}.")
        chunk = self.rglru_chunk_size
        if chunk is not None and (not isinstance(chunk, int) or chunk < 1):
            raise ValueError(
                f"`rglru_chunk_size` must be None (time loop) or a positive integer, got {self.rglru_chunk_size!r}."
            )
        if not isinstance(self.slstm_conv_kernel_dim, int) or self.slstm_conv_kernel_dim < 0:
            raise ValueError(
                f"`slstm_conv_kernel_dim` must be an integer >= 0 (0: no conv), got {self.slstm_conv_kernel_dim!r}."
            )
        if self.slstm_forget_gate not in ("sigmoid", "exp"):
            raise ValueError(f"`slstm_forget_gate` must be 'sigmoid' or 'exp', got {self.slstm_forget_gate!r}.")
        splits = []
        if "rglru" in blocks:
            splits.append(("rglru_width", "rglru_num_heads"))
        if "slstm" in blocks:
            splits.append(("hidden_size", "slstm_num_heads"))
        for width_name, heads_name in splits:
            width, heads = getattr(self, width_name), getattr(self, heads_name)
            for name, value in ((width_name, width), (heads_name, heads)):
                if not isinstance(value, int) or value <= 0:
                    raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
            if width % heads != 0:
                raise ValueError(
                    f"`{width_name}` ({width}) must be divisible by `{heads_name}` ({heads}): the block-diagonal "
                    "weights split it into equal heads."
                )


__all__ = ["HybridConfig"]
