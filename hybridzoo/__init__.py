"""hybridzoo: hybrid language models (softmax attention + Gated DeltaNet + recurrent blocks) for transformers.

Importing the package registers the model classes with transformers' Auto classes, so
`AutoModelForCausalLM.from_config(HybridConfig(...))` and `from_pretrained(folder)` work without remote code.
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

__version__ = "0.1.0"

AutoConfig.register(HybridConfig.model_type, HybridConfig, exist_ok=True)
AutoModel.register(HybridConfig, HybridModel, exist_ok=True)
AutoModelForCausalLM.register(HybridConfig, HybridForCausalLM, exist_ok=True)
AutoModelForSequenceClassification.register(HybridConfig, HybridForSequenceClassification, exist_ok=True)

__all__ = [
    "HybridCache",
    "HybridConfig",
    "HybridForCausalLM",
    "HybridForSequenceClassification",
    "HybridModel",
    "HybridPreTrainedModel",
    "__version__",
]
