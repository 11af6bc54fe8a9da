"""hybridzoo: hybrid language models (softmax attention + Gated DeltaNet + recurrent blocks) for transformers.

Importing the package registers the model classes with transformers' Auto classes, so
`AutoModelForCausalLM.from_config(HybridConfig(...))` and `from_pretrained(folder)` work without remote code, and
registers the blocks' LoRA targets as PEFT's defaults for `model_type="hybridzoo"`, so
`get_peft_model(model, LoraConfig(task_type="CAUSAL_LM"))` needs no `target_modules`.

The `hybridzoo` command starts from the top-level `hybridzoo_cli` module, which defers that registration (and with it
torch and transformers) until a subcommand runs, so `hybridzoo --help` answers at once.
"""

from __future__ import annotations

import importlib
import os
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# public name -> module it lives in (imported on first use, see `__getattr__`)
_EXPORTS = {
    "HybridCache": "hybridzoo.modeling",
    "HybridConfig": "hybridzoo.modeling",
    "HybridForCausalLM": "hybridzoo.modeling",
    "HybridForSequenceClassification": "hybridzoo.modeling",
    "HybridModel": "hybridzoo.modeling",
    "HybridPreTrainedModel": "hybridzoo.modeling",
    "register_block": "hybridzoo.modeling.blocks",
}
DEFER_REGISTRATION_VARIABLE = "HYBRIDZOO_DEFER_REGISTRATION"  # set by `hybridzoo_cli`, read once here

if TYPE_CHECKING:
    from hybridzoo.modeling import (
        HybridCache,
        HybridConfig,
        HybridForCausalLM,
        HybridForSequenceClassification,
        HybridModel,
        HybridPreTrainedModel,
    )
    from hybridzoo.modeling.blocks import register_block


def register() -> None:
    """Register the model classes with transformers' Auto classes and the LoRA defaults with PEFT (idempotent).

    Runs on `import hybridzoo`; the command line calls it when a subcommand starts. Its imports are here, not at the
    top, because they are what `hybridzoo --help` must not pay for.
    """
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

    from hybridzoo import modeling
    from hybridzoo.recipes.peft_utils import register_peft_defaults

    AutoConfig.register(modeling.HybridConfig.model_type, modeling.HybridConfig, exist_ok=True)
    AutoModel.register(modeling.HybridConfig, modeling.HybridModel, exist_ok=True)
    AutoModelForCausalLM.register(modeling.HybridConfig, modeling.HybridForCausalLM, exist_ok=True)
    AutoModelForSequenceClassification.register(
        modeling.HybridConfig, modeling.HybridForSequenceClassification, exist_ok=True
    )
    register_peft_defaults()
    for name, module in _EXPORTS.items():
        globals()[name] = getattr(importlib.import_module(module), name)


def __getattr__(name: str):
    """The model classes, loaded (and registered) on first use when the command line deferred the registration."""
    if name in _EXPORTS:
        register()
        return globals()[name]
    raise AttributeError(f"module 'hybridzoo' has no attribute {name!r}")


if os.environ.pop(DEFER_REGISTRATION_VARIABLE, "") != "1":  # popped: child processes import the normal way
    register()

__all__ = [
    "HybridCache",
    "HybridConfig",
    "HybridForCausalLM",
    "HybridForSequenceClassification",
    "HybridModel",
    "HybridPreTrainedModel",
    "__version__",
    "register",
    "register_block",
]
