"""Small building blocks shared by every block type: norms, the gated MLP, rotary position embeddings and the short
convolutions' initialisation."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch
import transformers.initialization as init
from torch import nn
from torch.nn import functional as F
from transformers.activations import ACT2FN
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, dynamic_rope_update

from .ops_norm import gated_rms_norm, scaled_unit_rows

Derived = TypeVar("Derived")

# Without autograd, modules with at most this many weights in a fused product run it on a kept, transposed copy of
# their weights (`derived_from_weights`): decoding a small model is bound by per-op overhead, which fusing removes.
# Larger weights decode at the speed of reading them, where a copy would gain nothing and double their memory.
FUSED_MAX_WEIGHTS = 1 << 21


def plain_linears(modules: Sequence[nn.Module]) -> bool:
    """True when every module is a plain `nn.Linear` whose weight may be applied directly: not a wrapper (PEFT's LoRA
    layers are other types), no forward hooks, no replaced `forward` (accelerate's offloading hooks)."""
    return all(
        type(m) is nn.Linear and not (m._forward_hooks or m._forward_pre_hooks or "forward" in m.__dict__)
        for m in modules
    )


def derived_from_weights(
    owner: nn.Module,
    weights: Sequence[torch.Tensor],
    build: Callable[[tuple[torch.Tensor, ...]], Derived],
    settings: tuple = (),
) -> Derived:
    """`build(weights)` (the weights detached), computed once and kept on `owner` until any of the weights or of the
    `settings` (plain values `build` also reads, such as an epsilon) changes.

    For inference paths that want the weights in another form (concatenated, transposed, folded together): decoding
    a small model is bound by per-op overhead, and re-deriving per token would cost more than it saves. Keyed by each
    weight's storage address (`module.to()` and `.data` swaps change it) and in-place version counter (optimizer
    steps, `load_state_dict`); the weights are held with the result, so no other tensor can take their addresses.
    """
    if torch.compiler.is_compiling():
        # a compiled graph derives them in every call, fused with the rest, and traces no data pointers
        return build(tuple(w.detach() for w in weights))
    key = [(w.data_ptr(), w._version) for w in weights]
    key.append(settings)
    kept = owner.__dict__.get("_derived_from_weights")
    if kept is None or kept[0] != key:
        detached = tuple(w.detach() for w in weights)
        kept = (key, detached, build(detached))
        owner.__dict__["_derived_from_weights"] = kept
    return kept[2]


def init_short_conv_(conv: nn.Conv1d) -> None:
    """PyTorch's own Conv1d initialisation, uniform(+-1/sqrt(fan_in)), as Mamba, fla and Zoology leave it.

    transformers' generic `_init_weights` draws conv weights from normal(0, 0.02), which makes a 4-tap depthwise conv
    ~15x weaker than this; measured on MQAR (T=64, kv=8, d=64), gated DeltaNet then stays at chance for 1500 steps,
    while with this init it learns the task.
    """
    fan_in = conv.weight.shape[1] * conv.weight.shape[2]  # in_channels / groups * kernel size
    bound = 1.0 / math.sqrt(fan_in)
    init.uniform_(conv.weight, -bound, bound)
    if conv.bias is not None:
        init.uniform_(conv.bias, -bound, bound)


class HybridRMSNorm(nn.Module):
    """RMSNorm computed in float32, in one of two stored forms.

    * default (Llama): `weight * x / rms(x)`, the product taken in the input dtype, weight initialised to 1;
    * `zero_centered=True` (Gemma, RecurrentGemma, Qwen3-Next, Qwen3.5): `(1 + weight) * x / rms(x)`, the product
      taken in float32 and then cast, weight initialised to 0. Keeping the stored `w` instead of converting it to
      `1 + w` is what makes bf16 checkpoints load losslessly: near 1 bf16 keeps steps of 2^-7, so `1 + w` would round
      away most of a small `w`.

    `bias=True` adds a learnable bias after the weight (xLSTM's `use_bias`).
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6, zero_centered: bool = False, bias: bool = False) -> None:
        super().__init__()
        self.zero_centered = zero_centered
        self.weight = nn.Parameter(torch.zeros(hidden_size) if zero_centered else torch.ones(hidden_size))
        self.register_parameter("bias", nn.Parameter(torch.zeros(hidden_size)) if bias else None)
        self.variance_epsilon = eps

    @torch.no_grad()
    def init_custom_parameters(self) -> None:
        # transformers' generic init sets every `*RMSNorm` weight to 1, which is wrong for the zero-centred form
        if self.zero_centered:
            init.zeros_(self.weight)
        if self.bias is not None:
            init.zeros_(self.bias)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        weight = self._parameters["weight"]
        if hidden_states.dtype == weight.dtype == torch.float32:
            if torch.is_grad_enabled():
                # the same ops in the same order as below, dispatched from C++: bitwise the same values and gradients
                # in fewer Python steps
                scale = (1.0 + weight) if self.zero_centered else weight
                hidden_states = F.rms_norm(hidden_states, scale.shape, scale, self.variance_epsilon)
            else:
                # inference: three ops on a kept `(1 +) weight * sqrt(D)` (decoding a small model is bound by per-op
                # overhead; equal to the above within fp32 rounding)
                settings = (self.zero_centered, self.variance_epsilon)
                scale, eps_root = derived_from_weights(self, (weight,), self._inference_scale, settings)
                hidden_states = scaled_unit_rows(hidden_states, scale, eps_root)
            bias = self._parameters["bias"]
            return hidden_states if bias is None else hidden_states + bias
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)  # float32 even for float64 inputs, as transformers' norms
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        if self.zero_centered:
            hidden_states = (hidden_states * (1.0 + self.weight.float())).to(input_dtype)
        else:
            hidden_states = self.weight * hidden_states.to(input_dtype)
        return hidden_states if self.bias is None else hidden_states + self.bias

    def _inference_scale(self, weights: tuple[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """`scaled_unit_rows`'s `scale` and `eps_root` for this norm."""
        (weight,) = weights
        width = weight.shape[-1]
        scale = ((1.0 + weight) if self.zero_centered else weight) * math.sqrt(width)
        return scale, weight.new_tensor(math.sqrt(width * self.variance_epsilon))

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}, zero_centered={self.zero_centered}"


class HybridRMSNormGated(nn.Module):
    """RMSNorm over the last dim followed by a SiLU output gate: `norm(x) * silu(gate)` (Gated DeltaNet's output)."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        if hidden_states.dtype == gate.dtype == self.weight.dtype == torch.float32:
            # the function below, blocked in cache forward and backward (ops_norm)
            return gated_rms_norm(hidden_states, gate, self.weight, self.variance_epsilon)
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))
        return (hidden_states * nn.functional.silu(gate.to(torch.float32))).to(input_dtype)


class HybridMLP(nn.Module):
    """The gated MLP after every mixer (SwiGLU with the default `hidden_act="silu"`), Llama's parameter names.

    `config.mlp_bias` adds biases to the three projections (Llama's `mlp_bias`, RecurrentGemma, xLSTM `use_bias`).
    """

    lora_targets = ("gate_proj", "up_proj", "down_proj")
    # Without autograd (and up to `FUSED_MAX_WEIGHTS`), gate and up run as one GEMM on kept, transposed copies
    # (`[in, out]`, MKL's faster layout for one token): 27 -> 18 us per decoded token at the quickstart's width,
    # 78 -> 67 us at the zoo's small one (1 thread, 2-core AMD EPYC).
    fused_max_weights = FUSED_MAX_WEIGHTS

    def __init__(self, config) -> None:
        super().__init__()
        bias = config.mlp_bias
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=bias)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=bias)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        fused = None if torch.is_grad_enabled() else self._fused_weights()
        if fused is not None:
            gate_up, down = fused
            gate, up = torch.matmul(hidden_states, gate_up).chunk(2, dim=-1)
            return torch.matmul(self.act_fn(gate).mul_(up), down)
        return self.down_proj(self.act_fn(self.gate_proj(hidden_states)) * self.up_proj(hidden_states))

    def _fused_weights(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The kept `[hidden, 2 intermediate]` (gate | up) and `[intermediate, hidden]` down matrices, or None where
        the fused path must not run: too large, biases, or wrapped / hooked projections. (Dict lookups instead of
        module attributes: at decode sizes `nn.Module.__getattr__` costs as much as a small op.)"""
        modules = self._modules
        projections = (modules["gate_proj"], modules["up_proj"], modules["down_proj"])
        if not plain_linears(projections) or projections[0]._parameters["bias"] is not None:
            return None
        weights = [p._parameters["weight"] for p in projections]
        if 3 * weights[0].numel() > self.fused_max_weights:
            return None
        return derived_from_weights(self, weights, _transposed_gated_mlp)


def _transposed_gated_mlp(weights: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """(gate | up) as one `[hidden, 2 intermediate]` matrix and down as `[intermediate, hidden]`."""
    gate, up, down = weights
    return torch.cat([gate, up]).t().contiguous(), down.t().contiguous()


class HybridRotaryEmbedding(nn.Module):
    """RoPE cos/sin tables from `config.rope_parameters` (any rope type transformers knows).

    With `partial_rotary_factor` < 1 the tables cover only the first `int(head_dim * factor)` channels of each head
    (Qwen3-Next: 0.25); the rest pass through unrotated (`apply_rotary_pos_emb`).
    """

    inv_freq: torch.Tensor

    def __init__(self, config) -> None:
        super().__init__()
        self.max_seq_len_cached = config.max_position_embeddings
        self.original_max_seq_len = config.max_position_embeddings
        self.config = config
        self.rope_type = config.rope_parameters["rope_type"]
        rope_init_fn: Callable = self.compute_default_rope_parameters
        if self.rope_type != "default":
            rope_init_fn = ROPE_INIT_FUNCTIONS[self.rope_type]
        inv_freq, self.attention_scaling = rope_init_fn(config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.register_buffer("original_inv_freq", inv_freq.clone(), persistent=False)

    @staticmethod
    def compute_default_rope_parameters(config, **kwargs) -> tuple[torch.Tensor, float]:
        base = config.rope_parameters["rope_theta"]
        dim = int(config.head_dim * config.rope_parameters.get("partial_rotary_factor", 1.0))
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
        return inv_freq, 1.0

    @torch.no_grad()
    @dynamic_rope_update
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = emb.cos() * self.attention_scaling
        sin = emb.sin() * self.attention_scaling
        return cos.to(dtype=x.dtype), sin.to(dtype=x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on the first R <= D channels of `x` `[..., D]` by `cos`, `sin` `[..., R]` (broadcast against `x`'s
    leading dims); the other channels pass through (partial rotary)."""
    rotary_dim = cos.shape[-1]
    if rotary_dim == x.shape[-1]:
        return x * cos + rotate_half(x) * sin
    x_rot, x_pass = x[..., :rotary_dim], x[..., rotary_dim:]
    return torch.cat([x_rot * cos + rotate_half(x_rot) * sin, x_pass], dim=-1)


def apply_rotary_pos_emb(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate `q`, `k` `[B, H, T, D]` by the `[B, T, R]` tables: the first R <= D channels (partial rotary)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return rotate(q, cos, sin), rotate(k, cos, sin)
