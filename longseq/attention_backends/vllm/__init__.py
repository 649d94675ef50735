"""vLLM adapters: Backend / MetadataBuilder / Impl classes, each small.

``flash.py`` (GPU) subclasses vLLM's FlashAttention backend and delegates the dense math to it;
``cpu.py`` replaces ``CPU_ATTN`` with a PyTorch path over the same paged cache. Both share
``common.py``: the per-step info later techniques need and the KV-write hook.
Nothing here is imported at plugin registration; vLLM imports these classes by path.
"""
