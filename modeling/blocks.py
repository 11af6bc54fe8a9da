"""The block registry: `block_types` names -> mixer classes. A new block type is one file plus one line here.

Every block class carries `layer_type` (transformers' `layer_types` vocabulary: it selects the attention mask and the
cache layer), `pattern_letter` (for the compact `block_pattern` shorthand) and `is_recurrent`. Recurrent blocks are
called `block(x, state, mask=, reset=) -> (y, state)`; attention blocks take the KV cache and position embeddings.
"""

from __future__ import annotations

from .block_attention import HybridAttention, HybridSlidingWindowAttention
from .block_gated_deltanet import HybridGatedDeltaNet
from .block_lstm import HybridLSTM
from .block_mamba2 import HybridMamba2
from .block_mlstm import HybridMLSTM
from .block_rglru import HybridRGLRU
from .block_slstm import HybridSLSTM

BLOCK_CLASSES = {
    "attention": HybridAttention,
    "sliding_attention": HybridSlidingWindowAttention,
    "gated_deltanet": HybridGatedDeltaNet,
    "lstm": HybridLSTM,
    "mamba2": HybridMamba2,
    "mlstm": HybridMLSTM,
    "rglru": HybridRGLRU,
    "slstm": HybridSLSTM,
}

BLOCK_LETTERS = {cls.pattern_letter: name for name, cls in BLOCK_CLASSES.items()}
