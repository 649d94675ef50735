"""``longseq_sparse``: Quest-style sparse decode for SGLang (``--attention-backend longseq_sparse --page-size 16``).

The backend name selects the technique; its knobs are the ``LONGSEQ_SPARSE_*`` settings. Prefill/extend and
every layer that stays dense run the wrapped dense SGLang backend exactly as ``longseq_dense`` does
(``torch_native`` on CPU, ``triton`` on GPU, or ``LONGSEQ_SGLANG_DENSE``), and every write of a sparse layer
refreshes that layer's Quest page index. Decode of a sparse layer writes the step's K/V, refreshes the index
and attends each query to its top pages only, through ``longseq.attention_backends.core.sparse`` (Triton
kernels on CUDA, the PyTorch references on CPU).

Paging: SGLang's pool keeps per layer ``k_buffer`` ``[num_slots, Hkv, D]``. With ``--page-size P`` every
request owns whole pages and slot ``s`` is row ``s % P`` of page ``s // P``, so ``k_buffer.view(-1, P, Hkv, D)``
is a paged cache with block size ``P`` and a request's block table is ``req_to_token[req, ::P] // P`` (the
slot of each page's first token, divided by ``P``). ``LONGSEQ_SPARSE_PAGE_SIZE`` must divide ``P``.

CUDA graphs: graph hooks go to the inner backend; the block table is gathered inside the graph
(``init_forward_metadata_in_graph``) into a buffer made in ``init_cuda_graph_state``, and the sparse step's
shapes depend only on the batch size, so decode graphs replay the sparse path. The page indexes are
allocated at the first write of each layer (eager: SGLang's warmup runs precede every capture).

Not covered: KV that reaches the pool without passing through this backend (HiCache load-back,
PD-disaggregation transfers) is not summarized, so such pages are selected from stale summaries. The page
index (``LONGSEQ_SPARSE_SUMMARY``) adds up to ``2 / LONGSEQ_SPARSE_PAGE_SIZE`` of the key cache per sparse layer,
outside SGLang's memory plan (lower ``--mem-fraction-static`` a little if it does not fit).
"""

from __future__ import annotations

import weakref

import torch

from longseq.attention_backends.core.sparse import QuestPageIndex, SelectionReuse, SparseSettings, sparse_decode
from longseq.attention_backends.sglang.dense import (
    BackendTrace,
    LongSeqTechniqueBackend,
    check_runner_kv_pool,
    plain_causal_attention,
)
from longseq.attention_backends.sglang.paged import PagedPool
from longseq.config import LongSeqConfig, LongSeqConfigError

BACKEND_NAME = "longseq_sparse"
TRACE = BackendTrace(BACKEND_NAME, extra_counts=("sparse_decode_calls", "index_updates"), technique="sparse")

# Page indexes per KV pool (then per layer id), shared by every backend built on that pool: SGLang builds
# several backends per runner (two-batch overlap, PD multiplexing), and each must see all pages' summaries.
_INDEXES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def check_runner(model_runner, settings: SparseSettings) -> int:
    """Validate what the sparse path needs from the model runner; return SGLang's page size ``P``.

    Raises:
        LongSeqConfigError: the page size, head size, KV dtype, KV layout, summary dtype or model kind is
            unsupported.
    """
    where = f"--attention-backend {BACKEND_NAME}"
    page_size = int(model_runner.page_size or 1)
    if page_size % settings.page_size:
        raise LongSeqConfigError(
            f"{where}: SGLang's --page-size {page_size} is not a multiple of LONGSEQ_SPARSE_PAGE_SIZE="
            f"{settings.page_size}; pass --page-size {settings.page_size} (or a multiple of it), or set "
            f"LONGSEQ_SPARSE_PAGE_SIZE to a power of two dividing {page_size}")
    check_runner_kv_pool(model_runner, where)
    settings.validate_layer(block_size=page_size, head_size=model_runner.model_config.head_dim,
                            backend=where)  # head size <= 256
    settings.summary_dtype(model_runner.dtype, torch.device(model_runner.device))  # LONGSEQ_SPARSE_SUMMARY=fp8
    return page_size


class LongSeqSparseBackend(PagedPool, LongSeqTechniqueBackend):
    """``longseq_dense``'s proxy around the inner SGLang backend, plus Quest sparse decode.

    Tensor contract (SGLang's): ``q`` ``[T, Hq * D]`` (or ``[T, Hq, D]``), ``k``/``v`` ``[T, Hkv, D]``;
    output ``[T, Hq * D]`` in ``q``'s dtype. Own state: ``indexes`` (layer id -> :class:`QuestPageIndex`
    over ``[num_slots // P_q, Hkv, D]``, shared per KV pool) and ``block_table`` ``[B, pages]`` int32 for the
    current decode batch.
    """

    _OWN = LongSeqTechniqueBackend._OWN | PagedPool._PAGED_OWN | {"settings", "indexes", "reuse"}
    trace = TRACE

    def __init__(self, model_runner, config: LongSeqConfig):
        settings = SparseSettings.from_config(config)
        page_size = check_runner(model_runner, settings)  # before building the inner backend: fail fast
        super().__init__(model_runner, config)
        self.settings = settings
        self._init_paged(page_size)
        self.indexes: dict[int, QuestPageIndex] = _INDEXES.setdefault(self.pool, {})
        # One reuse plan per decode step for all sparse layers (rows: the batch's requests, in batch order).
        self.reuse = None if settings.reuse_steps <= 1 else SelectionReuse(
            settings, page_size, self.req_to_token.shape[0], self.req_to_token.device)

    def __repr__(self) -> str:
        return f"LongSeqSparseBackend(inner={self.inner_name}, {self.settings})"

    # ---- metadata: the decode batch's block table, once per step (not per layer) ----
    def init_forward_metadata(self, forward_batch):
        self.inner.init_forward_metadata(forward_batch)
        self.block_table = None
        if forward_batch.forward_mode.is_decode():
            self.block_table = self._eager_block_table(forward_batch)
            self._plan_reuse(forward_batch)

    def _table_ready(self, forward_batch) -> None:
        self._plan_reuse(forward_batch)

    def _plan_reuse(self, forward_batch) -> None:
        if self.reuse is not None:
            self.reuse.plan(self.block_table, forward_batch.seq_lens.to(torch.int32))

    # ---- forward ----
    def is_sparse_layer(self, layer, kwargs) -> bool:
        """Plain causal self-attention past the first ``dense_layers``; anything the sparse kernels do not
        implement (sliding window, cross-attention, logit soft-cap, learned sinks or other extras) stays dense."""
        return layer.layer_id >= self.settings.dense_layers and plain_causal_attention(layer, kwargs)

    def _update_index(self, layer, key_cache: torch.Tensor, forward_batch) -> QuestPageIndex:
        index = self.indexes.get(layer.layer_id)
        if index is None:
            index = self.indexes[layer.layer_id] = QuestPageIndex(self.settings.page_size,
                                                                  self.settings.summary_dtype)
        # Only this step's slots: pages are physical, so prefix-cache hits were summarized when first written.
        index.update(key_cache, forward_batch.out_cache_loc)
        self.trace.counts["index_updates"] += 1
        return index

    def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs):
        self.trace.record("decode_calls")
        if not self.is_sparse_layer(layer, kwargs):
            return self.inner.forward_decode(q, k, v, layer, forward_batch, save_kv_cache, **kwargs)
        # Write K/V ourselves: the inner forward_decode would also run dense attention over the whole context.
        self._write_kv(k, v, layer, forward_batch, save_kv_cache)
        key_cache, value_cache = self._paged_kv(layer)
        index = self._update_index(layer, key_cache, forward_batch)
        hq, d = layer.tp_q_head_num, layer.qk_head_dim
        q = q.reshape(-1, hq, d)
        table = self.block_table
        reuse = self.reuse
        if table is None or table.shape[0] != q.shape[0]:  # batch not prepared by init_forward_metadata
            table, reuse = self._gather_block_table(forward_batch), None
        out = q.new_empty(q.shape[0], hq * d)
        sparse_decode(q, key_cache, value_cache, table, forward_batch.seq_lens.to(torch.int32), index,
                      self.settings, layer.scaling, out.view(-1, hq, d), reuse=reuse)
        self.trace.counts["sparse_decode_calls"] += 1
        return out

    def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs):
        self.trace.record("extend_calls")
        out = self.inner.forward_extend(q, k, v, layer, forward_batch, save_kv_cache, **kwargs)
        if self.is_sparse_layer(layer, kwargs):  # the inner backend wrote this step's keys: summarize them
            self._update_index(layer, self._paged_kv(layer)[0], forward_batch)
        return out

    def forward_mixed(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs):
        self.trace.record("extend_calls")  # SGLang sends only NPU batches here: dense, index kept current
        out = self.inner.forward_mixed(q, k, v, layer, forward_batch, save_kv_cache, **kwargs)
        if self.is_sparse_layer(layer, kwargs):
            self._update_index(layer, self._paged_kv(layer)[0], forward_batch)
        return out
