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

from typing import NamedTuple

import torch
import transformers.initialization as init
from torch import nn
from torch.nn import functional as F

from .block_base import BlockField, HybridBlock, is_bool, is_int_or_none, is_positive_int, is_positive_number, one_of
from .layers import FUSED_MAX_WEIGHTS, derived_from_weights, plain_linears
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
        if self.is_decode_step(hidden_states, state, mask, reset):
            kept = self._kept_tensors()
            if kept is not None:
                return self._decode_step(hidden_states, state, kept)
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

    @torch.no_grad()
    def _decode_step(
        self, hidden_states: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor, torch.Tensor], kept: _KeptTensors
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """One float32 token `[B, 1, hidden]` from a cached (C, n, m), without autograd: the step of
        `ops_mlstm.recurrent_mlstm` with the six input projections as one GEMM on a kept, transposed weight (q's
        `Dk ** -0.5` folded in), both gates soft-capped as one tensor, the head norm as `F.layer_norm` and its weight
        folded into the kept o_proj (decoding a small model is bound by per-op overhead)."""
        batch = hidden_states.shape[0]
        heads, dk, dv = self.num_heads, self.head_qk_dim, self.head_v_dim
        c, n, m = state
        projected = torch.addmm(kept.bias, hidden_states.view(batch, -1), kept.projection)
        widths = [self.qk_dim, self.qk_dim, self.v_dim, self.v_dim, 2 * heads]
        query, key, value, ogate, gates = projected.split(widths, dim=-1)
        gates = soft_cap(gates, self.gate_soft_cap)
        log_i, log_f = gates[:, :heads], F.logsigmoid(gates[:, heads:])  # [B, H]
        if self.input_gate == "exp":
            m_new = torch.maximum(log_f + m, log_i)  # the max-state stabiliser
        else:
            log_i, m, m_new = F.logsigmoid(log_i), torch.zeros_like(m), torch.zeros_like(m)
        f_act = torch.exp(log_f + m - m_new).view(batch, heads, 1)
        i_act = torch.exp(log_i - m_new).view(batch, heads, 1)
        query, key = query.view(batch, heads, dk), key.view(batch, heads, dk)
        scaled_key = key * i_act
        c = torch.addcmul(c * f_act.unsqueeze(-1), scaled_key.unsqueeze(-1), value.view(batch, heads, 1, dv))
        n = torch.addcmul(n * f_act, key, i_act)
        numerator = torch.matmul(query.unsqueeze(-2), c)  # [B, H, 1, Dv]
        denominator = torch.maximum(torch.linalg.vecdot(query, n).abs(), torch.exp(-m_new)) + self.eps
        output = numerator.view(batch, heads, dv) / denominator.unsqueeze(-1)
        # head LayerNorm, output gate, o_proj (the norm's weight folded into o_proj when it has no bias)
        output = F.layer_norm(output, (dv,), None, None, kept.norm_eps).view(batch, -1)
        if kept.norm_weight is not None:
            output = torch.addcmul(kept.norm_bias, output, kept.norm_weight)
        output = output.mul_(torch.sigmoid(ogate))
        if kept.output_bias is None:
            output = torch.matmul(output, kept.output_projection)
        else:
            output = torch.addmm(kept.output_bias, output, kept.output_projection)
        return output.view(batch, 1, -1), (c, n, m_new)

    def _kept_tensors(self) -> _KeptTensors | None:
        """What `_decode_step` derives from the weights (`derived_from_weights`: kept between calls, rebuilt when a
        weight changes), or None where it must not run: wrapped or hooked projections or norm (PEFT, accelerate),
        weights other than float32, or projections over `FUSED_MAX_WEIGHTS`."""
        modules = self._modules
        projections = tuple(modules[name] for name in _INPUT_PROJECTIONS)
        o_proj, norm = modules["o_proj"], modules["norm"]
        if (
            not plain_linears((*projections, o_proj))
            or type(norm) is not HybridMultiHeadLayerNorm
            or norm._forward_hooks
            or norm._forward_pre_hooks
            or sum(p.weight.numel() for p in projections) > FUSED_MAX_WEIGHTS
            or o_proj.weight.numel() > FUSED_MAX_WEIGHTS
        ):
            return None
        tensors = [module.weight for module in (*projections, o_proj, norm)]
        tensors += [module.bias for module in (*projections, o_proj, norm) if module.bias is not None]
        if any(t.dtype != torch.float32 for t in tensors):
            return None
        eps = norm.variance_epsilon
        return derived_from_weights(self, tensors, lambda detached: self._derive(eps), (eps,))

    def _derive(self, eps: float) -> _KeptTensors:
        projections = [self._modules[name] for name in _INPUT_PROJECTIONS]
        scales = [self.head_qk_dim**-0.5, 1.0, 1.0, 1.0, 1.0, 1.0]  # q's attention-style scale, folded in
        weight = torch.cat([p.weight * scale for p, scale in zip(projections, scales, strict=True)])
        bias = torch.cat(
            [p.bias * scale if p.bias is not None else p.weight.new_zeros(p.out_features)
             for p, scale in zip(projections, scales, strict=True)]
        )
        norm, o_proj = self.norm, self.o_proj
        fold = norm.bias is None  # (LN(h) w) * sigmoid(og) = (LN(h) * sigmoid(og)) w: w goes into o_proj's columns
        output_projection = (o_proj.weight * norm.weight if fold else o_proj.weight).t().contiguous()
        return _KeptTensors(
            projection=weight.t().contiguous(),
            bias=bias,
            norm_eps=eps,
            norm_weight=None if fold else norm.weight.clone(),
            norm_bias=None if fold else norm.bias.clone(),
            output_projection=output_projection,
            output_bias=None if o_proj.bias is None else o_proj.bias.clone(),
        )

    def state_shapes(self) -> dict[str, tuple[int, ...]]:
        """Per-sequence shapes of the carried state (without the batch dim); all float32."""
        return {
            "C": (self.num_heads, self.head_qk_dim, self.head_v_dim),
            "n": (self.num_heads, self.head_qk_dim),
            "m": (self.num_heads,),
        }


# q, k, v, the output gate, then the input and forget gates side by side (soft-capped as one tensor in the step)
_INPUT_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "ogate_proj", "igate_proj", "fgate_proj")


class _KeptTensors(NamedTuple):
    projection: torch.Tensor  # [hidden, 2 qk_dim + 2 v_dim + 2 H]: the six input projections, q scaled by Dk^-1/2
    bias: torch.Tensor  # their biases (zeros where a projection has none)
    norm_eps: float
    norm_weight: torch.Tensor | None  # the head norm's weight and bias when it has a bias (else folded into o_proj)
    norm_bias: torch.Tensor | None
    output_projection: torch.Tensor  # [v_dim, hidden]: o_proj's weight (times the norm's), transposed
    output_bias: torch.Tensor | None
