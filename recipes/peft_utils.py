"""LoRA for every block type of a hybrid model, through `peft.get_peft_model`.

The targets come from the blocks themselves (`lora_targets` on each block class, `HybridMLP.lora_targets` for the
gated MLP). `import hybridzoo` also registers their union as PEFT's default for `model_type="hybridzoo"`
(`register_peft_defaults`), so a plain `get_peft_model(model, LoraConfig(task_type="CAUSAL_LM"))` works as it does for
Llama. Depthwise short convolutions are never targeted (PEFT needs a rank divisible by the channel count there).

The LSTM block needs special care. PEFT's own answer for `nn.LSTM` (`target_parameters`) only applies LoRA inside
`nn.LSTM.forward`, but the block also reads `lstm.weight_ih_l0` directly for its step loop (padding, packed
documents), where PEFT's wrapper would be skipped or fail. So the LSTM gets a small custom LoRA layer instead:
`LoraLSTM` adapts the joint matrix `[W_ih | W_hh]` (gate pre-activations are `W_ih x + W_hh h`) with one low-rank
update, and exposes the adapted weights under the same attribute names, so both code paths of the block see them.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from torch import nn

from hybridzoo.modeling.blocks import REGISTRY_LISTENERS, lora_target_suffixes
from hybridzoo.modeling.configuration_hybrid import HybridConfig
from hybridzoo.modeling.layers import HybridMLP


def block_lora_targets(block: type) -> list[str]:
    """Sub-modules of a decoder layer that LoRA adapts for `block` (its `lora_targets` and `lora_custom_targets`)."""
    return [f"mixer.{name}" for name in (*block.lora_targets, *block.lora_custom_targets)]


def register_peft_defaults(_changed_block: type | None = None) -> None:
    """PEFT's default LoRA targets for `model_type="hybridzoo"`: every registered block's `lora_targets` plus the MLP.

    Modules that need hybridzoo's own LoRA layer (`lora_custom_targets`, the LSTM cell) are left out: a plain
    `LoraConfig` cannot know that layer; `lora_config()` below adds them. Called by `import hybridzoo`; it stays up to
    date on every later block (un)registration.
    """
    TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING[HybridConfig.model_type] = lora_target_suffixes()
    if register_peft_defaults not in REGISTRY_LISTENERS:
        REGISTRY_LISTENERS.append(register_peft_defaults)


class LoraLSTM(nn.Module, LoraLayer):
    """LoRA on a single-layer `nn.LSTM`: `[W_ih | W_hh] + B @ A * scaling`, one adapter matrix pair per adapter name."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: LoraConfig, r: int = 0,
                 lora_alpha: int = 1, **kwargs) -> None:
        super().__init__()
        LoraLayer.__init__(self, base_layer)
        lstm = self.get_base_layer()
        if lstm.num_layers != 1 or lstm.bidirectional or lstm.proj_size:
            raise ValueError("LoraLSTM supports single-layer, unidirectional nn.LSTM without projections only.")
        self.fan_in_fan_out = False
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config)

    def _get_in_out_features(self, lstm: nn.Module) -> tuple[int, int]:
        return lstm.input_size + lstm.hidden_size, 4 * lstm.hidden_size  # the joint matrix [W_ih | W_hh]

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        return self.lora_B[adapter].weight @ self.lora_A[adapter].weight * self.scaling[adapter]

    def _delta(self) -> torch.Tensor | None:
        """The summed update of the active, unmerged adapters (None when the base weights are already right)."""
        if self.disable_adapters or self.merged:
            return None
        deltas = [self.get_delta_weight(name) for name in self.active_adapters if name in self.lora_A]
        return sum(deltas) if deltas else None

    def _adapted(self, name: str) -> torch.Tensor:
        lstm = self.get_base_layer()
        weight, delta = getattr(lstm, name), self._delta()
        if delta is None:
            return weight
        columns = slice(0, lstm.input_size) if name == "weight_ih_l0" else slice(lstm.input_size, None)
        return weight + delta[:, columns].to(weight.dtype)

    # the block's step loop reads these attributes: give it the adapted weights
    @property
    def weight_ih_l0(self) -> torch.Tensor:
        return self._adapted("weight_ih_l0")

    @property
    def weight_hh_l0(self) -> torch.Tensor:
        return self._adapted("weight_hh_l0")

    @property
    def bias_ih_l0(self) -> torch.Tensor:
        return self.get_base_layer().bias_ih_l0

    @property
    def bias_hh_l0(self) -> torch.Tensor:
        return self.get_base_layer().bias_hh_l0

    def forward(self, x: torch.Tensor, *args, **kwargs):
        lstm = self.get_base_layer()
        if self._delta() is None:
            return lstm(x, *args, **kwargs)
        weights = {"weight_ih_l0": self.weight_ih_l0, "weight_hh_l0": self.weight_hh_l0}
        return torch.func.functional_call(lstm, weights, (x, *args), kwargs)

    def _apply_delta(self, adapter: str, sign: float) -> None:
        lstm = self.get_base_layer()
        delta = sign * self.get_delta_weight(adapter).detach()
        lstm.weight_ih_l0.data += delta[:, : lstm.input_size].to(lstm.weight_ih_l0.dtype)
        lstm.weight_hh_l0.data += delta[:, lstm.input_size :].to(lstm.weight_hh_l0.dtype)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        for adapter in adapter_names or self.active_adapters:
            if adapter in self.lora_A and adapter not in self.merged_adapters:
                self._apply_delta(adapter, 1.0)
                self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        while self.merged_adapters:
            self._apply_delta(self.merged_adapters.pop(), -1.0)

    def __repr__(self) -> str:
        return "lora." + super().__repr__()


def _layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a causal-LM or classification model (or their bare `HybridModel`)."""
    inner = getattr(model, "model", model)
    return inner.layers


def default_lora_targets(model: nn.Module, include_mlp: bool = True) -> list[str]:
    """Full module names to adapt, from each block's `lora_targets`; a block that declares none is an error."""
    targets, unknown = [], {}
    module_names = {name for name, _ in model.named_modules()}
    prefix = "model.layers" if hasattr(model, "model") else "layers"
    mlp_targets = [f"mlp.{name}" for name in HybridMLP.lora_targets]
    for index, layer in enumerate(_layers(model)):
        block_type, block = layer.block_type, type(layer.mixer)
        if not block_lora_targets(block):
            linears = [n for n, m in layer.mixer.named_modules() if isinstance(m, nn.Linear)]
            unknown[block_type] = linears
            continue
        suffixes = block_lora_targets(block) + (mlp_targets if include_mlp and layer.mlp is not None else [])
        for suffix in suffixes:
            name = f"{prefix}.{index}.{suffix}"
            if name not in module_names:
                raise ValueError(f"LoRA default target {suffix!r} for block type {block_type!r} does not exist in "
                                 f"layer {index}; fix `lora_targets` on {block.__name__}.")
            targets.append(name)
    if unknown:
        hints = "; ".join(f"{bt}: {', '.join('mixer.' + n for n in names)}" for bt, names in unknown.items())
        raise ValueError(f"No default LoRA targets for block type(s) {sorted(unknown)}: declare `lora_targets` on the "
                         f"block class, or pass `peft.target_modules` explicitly (module name suffixes), e.g. from "
                         f"these linear layers: {hints}.")
    return targets


def resolve_targets(model: nn.Module, target_modules: list[str] | None, include_mlp: bool = True) -> list[str]:
    """Full module names for `target_modules` (name suffixes or regexes); every entry must match some module."""
    if not target_modules:
        return default_lora_targets(model, include_mlp)
    names = [name for name, _ in model.named_modules() if name]
    resolved = []
    for target in target_modules:
        pattern = re.compile(target)
        matched = [n for n in names if n == target or n.endswith("." + target) or pattern.fullmatch(n)]
        if not matched:
            examples = sorted({re.sub(r"^.*?layers\.\d+\.", "", n) for n in names if ".layers." in n})[:20]
            raise ValueError(f"peft.target_modules: {target!r} matches no module of this model, so LoRA would be a "
                             f"silent no-op. Use name suffixes such as: {', '.join(examples)}.")
        resolved += [n for n in matched if n not in resolved]
    return resolved


def lora_config(model: nn.Module, r: int = 8, alpha: int = 16, dropout: float = 0.0,
                target_modules: list[str] | None = None, include_mlp: bool = True,
                modules_to_save: list[str] | None = None, task_type: str | None = "CAUSAL_LM") -> LoraConfig:
    """A `LoraConfig` whose targets cover every block of `model` (defaults: the blocks' `lora_targets`)."""
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=resolve_targets(model, target_modules, include_mlp),
        modules_to_save=modules_to_save,
        task_type=task_type,
    )
    config._register_custom_module({nn.LSTM: LoraLSTM})
    return config


def apply_lora(model: nn.Module, config: LoraConfig) -> PeftModel:
    """`get_peft_model` plus a check that every requested module really got an adapter."""
    config._register_custom_module({nn.LSTM: LoraLSTM})
    # PEFT may shorten a long name list to suffixes, so remember what was asked for
    requested = set(config.target_modules) if isinstance(config.target_modules, (list, set)) else set()
    peft_model = get_peft_model(model, config)
    missing = requested - set(peft_model.targeted_module_names)
    if missing:
        raise ValueError(f"LoRA targets not adapted: {sorted(missing)}")
    return peft_model


def load_lora(base_model: nn.Module, adapter_dir: str | Path, is_trainable: bool = False) -> PeftModel:
    """Reload a saved adapter onto its base model (the LSTM layer type is registered again first)."""
    config = LoraConfig.from_pretrained(str(adapter_dir))
    config._register_custom_module({nn.LSTM: LoraLSTM})
    return PeftModel.from_pretrained(base_model, str(adapter_dir), config=config, is_trainable=is_trainable)
