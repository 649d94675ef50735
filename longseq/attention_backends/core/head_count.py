"""How many KV heads stream at a given DuoAttention sparsity. Standard library only: ``longseq duo capacity``
prices a model from its ``config.json`` without importing torch."""

from __future__ import annotations

import math


def streaming_head_count(sparsity: float, heads: int) -> int:
    """``floor(sparsity * heads + 1/2)`` of ``heads`` KV heads, at most ``heads``; the epsilon keeps an exact half
    (0.5 x an odd count) from rounding down on float error."""
    return min(heads, int(math.floor(float(sparsity) * heads + 0.5 + 1e-9)))
