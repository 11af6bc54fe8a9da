"""hybridzoo's model code. This flat folder is also the remote code saved next to every model's weights."""

from .block_base import BlockField, HybridBlock
from .blocks import register_block
from .cache_hybrid import CACHE_NAME, HybridCache
from .configuration_hybrid import HybridConfig
from .modeling_hybrid import HybridForCausalLM, HybridForSequenceClassification, HybridModel, HybridPreTrainedModel

__all__ = [
    "CACHE_NAME",
    "BlockField",
    "HybridBlock",
    "register_block",
    "HybridCache",
    "HybridConfig",
    "HybridForCausalLM",
    "HybridForSequenceClassification",
    "HybridModel",
    "HybridPreTrainedModel",
]
