"""vLLM adapters: Backend / MetadataBuilder / Impl classes, each small.

``flash.py`` (GPU) subclasses vLLM's FlashAttention backend and delegates the dense math to it;
``cpu.py`` replaces ``CPU_ATTN`` with a PyTorch path over the same paged cache. Both share
``common.py`` (the per-step info, the KV-write hook, validation, tracing) and ``techniques.py`` (one layer's
sparse/duo state, the builders' start-up checks); the technique logic itself is in ``../core``.
Nothing here is imported at plugin registration; vLLM imports these classes by path.
"""
