"""Dense attention over a paged KV cache (the layout vLLM and our backends use).

``naive.py`` is the PyTorch path: the reference for every sparse/streaming kernel that later reads the
same cache, and the CPU engine's kernel when longseq replaces vLLM's ``CPU_ATTN``.
"""

from longseq.kernels.paged_attention.naive import paged_attention_naive, write_paged_kv

__all__ = ["paged_attention_naive", "write_paged_kv"]
