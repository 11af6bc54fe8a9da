"""hybridzoo: hybrid language models (softmax attention + Gated DeltaNet + recurrent blocks) for transformers.

Importing the package registers the model classes with transformers' Auto classes, so
`AutoModelForCausalLM.from_config(HybridConfig(...))` and `from_pretrained(folder)` work without remote code, and
registers the blocks' LoRA targets as PEFT's defaults for `model_type="hybridzoo"`, so
`get_peft_model(model, LoraConfig(task_type="CAUSAL_LM"))` needs no `target_modules`.
"""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
)

from hybridzoo.modeling import (
    HybridCache,
    HybridConfig,
    HybridForCausalLM,
    HybridForSequenceClassification,
    HybridModel,
    HybridPreTrainedModel,
)
from hybridzoo.modeling.blocks import register_block
from hybridzoo.recipes.peft_utils import register_peft_defaults

__version__ = "0.1.0"

AutoConfig.register(HybridConfig.model_type, HybridConfig, exist_ok=True)
AutoModel.register(HybridConfig, HybridModel, exist_ok=True)
AutoModelForCausalLM.register(HybridConfig, HybridForCausalLM, exist_ok=True)
AutoModelForSequenceClassification.register(HybridConfig, HybridForSequenceClassification, exist_ok=True)
register_peft_defaults()

__all__ = [
    "HybridCache",
    "HybridConfig",
    "HybridForCausalLM",
    "HybridForSequenceClassification",
    "HybridModel",
    "HybridPreTrainedModel",
    "__version__",
    "register_block",
]
