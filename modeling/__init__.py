"""hybridzoo's model code. This flat folder is also the remote code saved next to every model's weights."""

from .cache_hybrid import CACHE_NAME, HybridCache
from .configuration_hybrid import HybridConfig
from .modeling_hybrid import HybridForCausalLM, HybridForSequenceClassification, HybridModel, HybridPreTrainedModel

__all__ = [
    "CACHE_NAME",
    "HybridCache",
    "HybridConfig",
    "HybridForCausalLM",
    "HybridForSequenceClassification",
    "HybridModel",
    "HybridPreTrainedModel",
]
