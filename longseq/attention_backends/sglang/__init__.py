"""SGLang adapters: one ``AttentionBackend`` per technique, selected by ``--attention-backend <name>``.

``dense.py`` wraps one of SGLang's own backends (``longseq_dense``) and is the base of the technique backends
(``sparse.py``: ``longseq_sparse``, ``duo.py``: ``longseq_duo``), which serve their layers through
``../core`` and leave every other layer to the wrapped backend. ``kda.py`` swaps KDA kernels into SGLang's
own linear-attention backend (a hook, not a backend name).

This package file stays import-free: the plugin reads :data:`BACKEND_CLASSES` at registration, in every
SGLang process, and imports a backend module only when its factory runs.
"""

#: ``--attention-backend`` name -> the class serving it, as ``module:Class``.
BACKEND_CLASSES = {
    "longseq_dense": "longseq.attention_backends.sglang.dense:LongSeqDenseBackend",
    "longseq_sparse": "longseq.attention_backends.sglang.sparse:LongSeqSparseBackend",
    "longseq_duo": "longseq.attention_backends.sglang.duo:LongSeqDuoBackend",
}
