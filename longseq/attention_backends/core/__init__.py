"""Technique cores, framework-free: what to select, which heads stream, and one attention step per technique.

``sparse.py``: Quest page index and the sparse decode step; ``duo.py``: DuoAttention's streaming-head mask, per-layer
tensors and step, with ``duo_pattern.py`` (pattern files) and ``head_count.py`` (streaming heads per sparsity);
``layers.py``: layer numbers from module paths.
The adapters in ``../vllm`` and ``../sglang`` call them; nothing here imports a framework.
"""
