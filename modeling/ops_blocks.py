"""Cache-sized blocks along a long axis (pure index arithmetic).

The CPU paths of the short conv, the per-head norms and the chunked gated delta rule walk the time (or chunk) axis
block by block, applying all their small ops to one block while its operands are still in cache, instead of
streaming whole tensors from memory once per op. Each caller keeps its own measured element budget.
"""

from __future__ import annotations


def cache_blocks(length: int, elements_per_step: int, budget: int) -> list[tuple[int, int]]:
    """`[start, end)` ranges covering `range(length)`, each of about `budget` elements (at least one step), where
    one step of the axis holds `elements_per_step` elements."""
    steps = max(1, budget // max(1, elements_per_step))
    return [(start, min(length, start + steps)) for start in range(0, length, steps)]
