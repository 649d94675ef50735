"""Kimi Delta Attention kernels (recurrent decode, gate) with a naive reference.

Public API, named and shaped like vLLM 0.26's vendored fla (``ops/kda.py``) and vLLM 0.32's packed decode, so
the frameworks' KDA layers can call these as drop-ins. States are fp32 ``[..., H, V, K]`` (V first).
Prefill (the chunked kernel) stays the framework's own: vLLM's vendored fla ``chunk_kda``, SGLang's extend kernel.
"""

from .fused_recurrent import fused_recurrent_kda, fused_recurrent_kda_packed_decode
from .gate import fused_kda_gate, kda_gate_chunk_cumsum
from .naive import naive_kda_gate, naive_recurrent_kda
from .utils import CHUNK_SIZE, MAX_HEAD_DIM

__all__ = [
    "CHUNK_SIZE", "MAX_HEAD_DIM", "fused_kda_gate", "fused_recurrent_kda", "fused_recurrent_kda_packed_decode",
    "kda_gate_chunk_cumsum", "naive_kda_gate", "naive_recurrent_kda",
]
