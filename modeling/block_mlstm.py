"""mLSTM block: xLSTM's matrix-memory LSTM (Beck et al., 2024) laid out as the xLSTM-7B / "xLSTM Large" layer.

x -> q, k, v projections (`qk_dim = hidden * mlstm_qk_dim_factor`, `v_dim = hidden * mlstm_v_dim_factor`, split into
heads) and per-head input / forget gate pre-activations (with bias, soft-capped `cap * tanh(x / cap)`) -> mLSTM cell
(`ops_mlstm.mlstm`) -> per-head LayerNorm -> times the output gate `sigmoid(ogate_proj(x))` -> o_proj.
No convolution, no skip connection: the model's pre-norm, residual and MLP around the block complete the xLSTM-7B
block (`x + mLSTM(RMSNorm(x))`, `x + SwiGLU(RMSNorm(x))`).

State per sequence: the matrix memory C `[H, Dk, Dv]`, the normaliser n `[H, Dk]` and the max-state m `[H]`, float32.

Loading xLSTM-7B (transformers `xLSTMForCausalLM`, `weight_mode="single"`) weights is a renaming; per block i:

    backbone.blocks.{i}.mlstm_layer.q                -> model.layers.{i}.mixer.q_proj
    backbone.blocks.{i}.mlstm_layer.k                -> model.layers.{i}.mixer.k_proj
    backbone.blocks.{i}.mlstm_layer.v                -> model.layers.{i}.mixer.v_proj
    backbone.blocks.{i}.mlstm_layer.ogate_preact     -> model.layers.{i}.mixer.ogate_proj
    backbone.blocks.{i}.mlstm_layer.igate_preact     -> model.layers.{i}.mixer.igate_proj   (weight and bias)
    backbone.blocks.{i}.mlstm_layer.fgate_preact     -> model.layers.{i}.mixer.fgate_proj   (weight and bias)
    backbone.blocks.{i}.mlstm_layer.multihead_norm   -> model.layers.{i}.mixer.norm
    backbone.blocks.{i}.mlstm_layer.out_proj         -> model.layers.{i}.mixer.o_proj
    backbone.blocks.{i}.norm_mlstm                   -> model.layers.{i}.input_layernorm
    backbone.blocks.{i}.norm_ffn                     -> model.layers.{i}.post_mixer_layernorm
    backbone.blocks.{i}.ffn.proj_up_gate / proj_up / proj_down -> model.layers.{i}.mlp.gate_proj / up_proj / down_proj
    backbone.embeddings / backbone.out_norm / lm_head -> model.embed_tokens / model.norm / lm_head

with `block_pattern="M"`, `mlstm_input_gate="exp"`, `mlstm_num_heads=num_heads`, the same dim factors and soft cap,
`rms_norm_eps=norm_eps`, `mlstm_eps=eps`, `mlstm_use_bias=use_bias` and `intermediate_size` = the ffn's rounded width.
The whole-model map (logit soft-cap, norm and MLP biases, the fused weight layout) is data in
`configs/checkpoint_maps.py`, applied by `hybridzoo convert`.
"""

from __future__ import annotations

import torch
import transformers.initialization as init
from torch import nn

from .block_base import BlockField, HybridBlock, is_bool, is_int_or_none, is_positive_int, is_positive_number, one_of
from .ops_mlstm import mlstm


class HybridMultiHeadLayerNorm(nn.Module):
    """LayerNorm over each head's features of `[B, T, H, D]`, one weight (and optional bias) over all `H * D`."""

    def __init__(self, num_heads: int, head_dim: int, eps: float = 1e-6, bias: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_heads * head_dim))
        self.bias = nn.Parameter(torch.zeros(num_heads * head_dim)) if bias else None
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """`[B, T, H, D]` -> normalised and weighted `[B, T, H * D]`, in the input dtype (statistics in float32)."""
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.promote_types(input_dtype, torch.float32))
        centered = hidden_states - hidden_states.mean(-1, keepdim=True)
        variance = centered.pow(2).mean(-1, keepdim=True)
        hidden_states = (centered * torch.rsqrt(variance + self.variance_epsilon)).flatten(-2)
        hidden_states = self.weight * hidden_states.to(input_dtype)
        return hidden_states if self.bias is None else hidden_states + self.bias


def soft_cap(x: torch.Tensor, cap: float | None) -> torch.Tensor:
    """`cap * tanh(x / cap)`: bounds the gate pre-activations smoothly (None: no cap)."""
    return x if cap is None else cap * torch.tanh(x / cap)


class HybridMLSTM(HybridBlock):
    block_type = "mlstm"
    pattern_letter = "M"
    config_fields = (
        BlockField("mlstm_num_heads", None, "heads (default: `num_attention_heads`)",
                   is_int_or_none, "must be an integer or None", default_from="num_attention_heads"),
        BlockField("mlstm_qk_dim_factor", 0.5, "q/k width as a fraction of `hidden_size` (xLSTM-7B: 0.5)",
                   is_positive_number, "must be > 0"),
        BlockField("mlstm_v_dim_factor", 1.0, "v width as a fraction of `hidden_size` (xLSTM-7B: 1.0)",
                   is_positive_number, "must be > 0"),
        BlockField("mlstm_input_gate", "exp", "'exp' (xLSTM, stabilised; loads xLSTM-7B) or 'sigmoid' (mLSTMsig)",
                   one_of("exp", "sigmoid"), "must be 'exp' or 'sigmoid'"),
        BlockField("mlstm_chunk_size", 64, "chunk length of the chunkwise-parallel form", is_positive_int,
                   "must be a positive integer"),
        BlockField("mlstm_gate_soft_cap", 15.0, "gate pre-activations capped as `cap * tanh(x / cap)` (None: off)",
                   lambda value: value is None or is_positive_number(value), "must be > 0 or None (no cap)"),
        BlockField("mlstm_eps", 1e-6, "added to the normaliser's denominator (xLSTM's `eps`)", is_positive_number,
                   "must be a positive number"),
        BlockField("mlstm_use_bias", False, "biases on the q/k/v, output-gate and out projections and the head norm "
                   "(xLSTM's `use_bias`; the gate pre-activations always have one)", is_bool, "must be True or False"),
    )
    lora_targets = ("q_proj", "k_proj", "v_proj", "ogate_proj", "o_proj")

    @classmethod
    def validate_config(cls, config) -> None:
        heads = config.mlstm_num_heads
        if not is_positive_int(heads):
            raise ValueError(f"`mlstm_num_heads` must be a positive integer for mlstm blocks, got {heads!r}.")
        for name in ["mlstm_qk_dim_factor", "mlstm_v_dim_factor"]:
            width = int(config.hidden_size * getattr(config, name))
            if width <= 0 or width % heads != 0:
                raise ValueError(
                    f"`hidden_size * {name}` = {width} must be a positive multiple of `mlstm_num_heads` ({heads}): "
                    "the mlstm q/k and v widths split evenly into heads."
                )

    def __init__(self, config, layer_idx: int = 0) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.hidden_size = config.hidden_size
        self.num_heads = config.mlstm_num_heads
        self.qk_dim = int(config.hidden_size * config.mlstm_qk_dim_factor)
        self.v_dim = int(config.hidden_size * config.mlstm_v_dim_factor)
        self.head_qk_dim = self.qk_dim // self.num_heads
        self.head_v_dim = self.v_dim // self.num_heads
        self.input_gate = config.mlstm_input_gate
        self.chunk_size = config.mlstm_chunk_size
        self.gate_soft_cap = config.mlstm_gate_soft_cap

        self.eps = config.mlstm_eps
        bias = config.mlstm_use_bias  # xLSTM's `use_bias`: q, k, v, output gate, out projection and the head norm
        self.q_proj = nn.Linear(self.hidden_size, self.qk_dim, bias=bias)
        self.k_proj = nn.Linear(self.hidden_size, self.qk_dim, bias=bias)
        self.v_proj = nn.Linear(self.hidden_size, self.v_dim, bias=bias)
        self.ogate_proj = nn.Linear(self.hidden_size, self.v_dim, bias=bias)  # output gate
        self.igate_proj = nn.Linear(self.hidden_size, self.num_heads, bias=True)  # input gate, one per head
        self.fgate_proj = nn.Linear(self.hidden_size, self.num_heads, bias=True)  # forget gate, one per head
        self.norm = HybridMultiHeadLayerNorm(self.num_heads, self.head_v_dim, eps=config.rms_norm_eps, bias=bias)
        self.o_proj = nn.Linear(self.v_dim, self.hidden_size, bias=bias)
        self.init_custom_parameters()  # usable on its own; from_pretrained overwrites these anyway

    state_formula = "4·H·(Dqk·Dv + Dqk + 1) (fp32 C, n, m)"

    @staticmethod
    def _dims(config) -> tuple[int, int, int]:
        heads = config.mlstm_num_heads
        head_qk = int(config.hidden_size * config.mlstm_qk_dim_factor) // heads
        head_v = int(config.hidden_size * config.mlstm_v_dim_factor) // heads
        return heads, head_qk, head_v

    @staticmethod
    def state_bytes(config, dtype_bytes: int) -> int:
        """Bytes of recurrent state per sequence: the float32 matrix memory C, normaliser n and stabiliser m."""
        heads, head_qk, head_v = HybridMLSTM._dims(config)
        return 4 * heads * (head_qk * head_v + head_qk + 1)

    @staticmethod
    def parameter_count(config) -> int:
        """Closed form of this block's parameters (checked against the instantiated module in tests)."""
        hidden = config.hidden_size
        qk_dim = int(hidden * config.mlstm_qk_dim_factor)
        v_dim = int(hidden * config.mlstm_v_dim_factor)
        heads, _, head_v = HybridMLSTM._dims(config)
        count = 2 * hidden * qk_dim + 2 * hidden * v_dim + 2 * (hidden + 1) * heads + heads * head_v + v_dim * hidden
        if config.mlstm_use_bias:
            count += 2 * qk_dim + 2 * v_dim + heads * head_v + hidden
        return count

    @torch.no_grad()
    def init_custom_parameters(self) -> None:
        """xLSTM-7B gate biases: input -10 (write little at first), forget linspace(3, 6) over heads (long memory)."""
        init.constant_(self.igate_proj.bias, -10.0)
        init.copy_(self.fgate_proj.bias, torch.linspace(3.0, 6.0, self.num_heads))

    def forward(
        self,
        hidden_states: torch.Tensor,
        state: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
        mask: torch.Tensor | None = None,
        reset: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Run the block over `[B, T, hidden]` from `state` = (C, n, m) (None = fresh); returns `(y, new_state)`.

        `mask` `[B, T]` (False at padding) makes padded steps identity transitions; `reset` `[B, T]` clears the state
        where a new document starts.
        """
        batch, length, _ = hidden_states.shape
        query = self.q_proj(hidden_states).view(batch, length, self.num_heads, self.head_qk_dim)
        key = self.k_proj(hidden_states).view(batch, length, self.num_heads, self.head_qk_dim)
        value = self.v_proj(hidden_states).view(batch, length, self.num_heads, self.head_v_dim)
        gate_dtype = torch.promote_types(hidden_states.dtype, torch.float32)  # cap and gates in (at least) float32
        igate_preact = soft_cap(self.igate_proj(hidden_states).to(gate_dtype), self.gate_soft_cap)  # [B, T, H]
        fgate_preact = soft_cap(self.fgate_proj(hidden_states).to(gate_dtype), self.gate_soft_cap)

        output, state = mlstm(
            query,
            key,
            value,
            igate_preact,
            fgate_preact,
            initial_state=state,
            mask=mask,
            reset=reset,
            input_gate=self.input_gate,
            eps=self.eps,
            chunk_size=self.chunk_size,
        )
        output = self.norm(output) * torch.sigmoid(self.ogate_proj(hidden_states))
        return self.o_proj(output), state

    def state_shapes(self) -> dict[str, tuple[int, ...]]:
        """Per-sequence shapes of the carried state (without the batch dim); all float32."""
        return {
            "C": (self.num_heads, self.head_qk_dim, self.head_v_dim),
            "n": (self.num_heads, self.head_qk_dim),
            "m": (self.num_heads,),
        }
