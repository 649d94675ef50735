"""Quest-style sparse decode, framework-free: settings, the per-layer page index, one decode step.

Framework adapters (vLLM, SGLang) call four things:
  ``SparseSettings.from_config(config)`` and ``.validate_layer(...)`` at start-up (clear errors);
  ``QuestPageIndex.update(key_cache, slot_mapping)`` after every KV write of a sparse layer;
  ``SelectionReuse.plan(block_table, seq_lens)`` once per decode step, before the layers run (one object per
  KV-cache group, shared by its sparse layers; only when ``settings.reuse_steps > 1``);
  ``sparse_decode(..., reuse=...)`` for the decode queries of a sparse layer.
On CUDA the Triton kernels of ``longseq.kernels.sparse_decode`` run; elsewhere (CPU engine) their batched
PyTorch versions (``torch_ops.py``, tested against the references), so CPU CI exercises the same selection.

Tensor parallelism: every rank holds its own KV heads, so each rank's page index covers only its heads and
selection is per KV head; nothing is exchanged between ranks.
"""

from __future__ import annotations

import dataclasses

import torch

from longseq.attention_backends.core.layers import layer_index
from longseq.config import LongSeqConfig, LongSeqConfigError
from longseq.kernels.score_mods import NO_MODS, ScoreMods


@dataclasses.dataclass(frozen=True)
class SparseSettings:
    """Sparse-mode knobs (see :class:`LongSeqConfig` for the environment names).

    Attributes:
        budget_tokens: KV tokens attended per decode query and KV head (a multiple of ``page_size``).
        page_size: tokens per scored page.
        dense_layers: layers ``0 .. dense_layers-1`` stay dense.
        sink_pages, recent_pages: always-kept first / last pages.
        summary: page-summary dtype choice: ``fp8``, ``cache`` or ``auto`` (fp8 on CUDA devices that support
            it; the cache dtype elsewhere, where the PyTorch references run).
        topk_split_rows: GPU top-k split threshold in rows (None: the kernel's default; 0: never).
        group_max: score pages by the largest query head's Quest bound, not the group's sum.
        reuse_steps: a decode row selects every this many steps (:class:`SelectionReuse`; 1: every step).
        topk_impl: the GPU page top-k, ``"auto"`` (ours) or ``"flashinfer"`` (``select_topk_pages``'s ``topk_impl``).
    """

    budget_tokens: int
    page_size: int
    dense_layers: int
    sink_pages: int
    recent_pages: int
    summary: str = "auto"
    topk_split_rows: int | None = None
    group_max: bool = False
    reuse_steps: int = 1
    topk_impl: str = "auto"

    @classmethod
    def from_config(cls, config: LongSeqConfig) -> "SparseSettings":
        return cls(config.sparse_budget, config.sparse_page_size, config.sparse_dense_layers,
                   config.sparse_sink_pages, config.sparse_recent_pages, config.sparse_summary,
                   config.sparse_topk_split_rows, config.sparse_group_score == "max", config.sparse_reuse_steps,
                   config.sparse_topk)

    def summary_dtype(self, cache_dtype: torch.dtype, device: torch.device) -> torch.dtype:
        """The page summaries' dtype for a cache of ``cache_dtype`` on ``device``."""
        from longseq.kernels.sparse_decode.page_summary import FP8, fp8_summaries_supported

        if self.summary == "fp8":
            if device.type == "cuda" and not fp8_summaries_supported(device):
                raise LongSeqConfigError("LONGSEQ_SPARSE_SUMMARY=fp8 needs a GPU with fp8 support (compute "
                                         "capability 8.9+); use LONGSEQ_SPARSE_SUMMARY=cache")
            return FP8
        if self.summary == "auto" and device.type == "cuda" and fp8_summaries_supported(device):
            return FP8
        return cache_dtype

    @property
    def num_select(self) -> int:
        """Pages kept per (request, KV head)."""
        return self.budget_tokens // self.page_size

    def validate_layer(self, *, block_size: int, head_size: int, backend: str) -> None:
        """Raise :class:`LongSeqConfigError` when this layer's cache cannot be paged as configured."""
        if block_size % self.page_size:
            raise LongSeqConfigError(
                f"{backend}: LONGSEQ_SPARSE_PAGE_SIZE={self.page_size} does not divide the KV block size "
                f"{block_size}; use a page size that divides it (e.g. {block_size}) or change --block-size")
        if head_size > 256:
            raise LongSeqConfigError(f"{backend}: sparse mode supports head sizes up to 256, not {head_size}")
        if self.topk_impl == "flashinfer":
            from longseq.kernels.sparse_decode.library_topk import flashinfer_topk_available

            if not flashinfer_topk_available():
                raise LongSeqConfigError(f"{backend}: LONGSEQ_SPARSE_TOPK=flashinfer needs a CUDA GPU and "
                                         "FlashInfer's top-k (flashinfer.topk, shipped with vLLM's CUDA wheels); "
                                         "unset it to use ours")

    def is_sparse_layer(self, layer_name: str) -> bool:
        """Layers are numbered by their ``layers.<i>.`` path component; unnumbered layers stay dense."""
        i = layer_index(layer_name)
        return i is not None and i >= self.dense_layers


class QuestPageIndex:
    """Channel-wise key min/max per page of one layer's paged cache, addressed by global page id.

    ``page_min``/``page_max``: ``[num_blocks * block_size // page_size, Hkv, D]`` in ``summary_dtype`` (default: the
    cache dtype; fp8 e4m3 is rounded outward so the bound holds), allocated on the first update (the engine allocates its KV cache after our backend is built). Global page ids are
    physical (block id based), so the index stays right under prefix caching and block reuse: a page's summary
    is recomputed from the cache whenever one of its tokens is written.
    """

    def __init__(self, page_size: int, summary_dtype=None):
        """``summary_dtype``: a dtype, or a callable ``(cache_dtype, device) -> dtype``, or None (cache dtype)."""
        self.page_size = page_size
        self.summary_dtype = summary_dtype
        self.page_min: torch.Tensor | None = None
        self.page_max: torch.Tensor | None = None
        self._cache_ptr: int | None = None
        self._kept: torch.Tensor | None = None  # [rows, Hkv, num_select] int32: selections kept for reuse

    def kept_pages(self, capacity: int, num_kv_heads: int, num_select: int,
                   device: torch.device) -> torch.Tensor:
        """``[capacity, Hkv, num_select]`` int32 persistent buffer of this layer's selected pages per decode row
        (selection reuse; ``capacity``: :attr:`SelectionReuse.capacity`). Its contents matter only where
        :class:`SelectionReuse` says a row reuses, which a reallocated plan never does."""
        k, device = self._kept, torch.device(device)
        same_device = k is not None and k.device.type == device.type and device.index in (None, k.device.index)
        if not same_device or k.shape != (capacity, num_kv_heads, num_select):
            self._kept = torch.full((capacity, num_kv_heads, num_select), -1, dtype=torch.int32, device=device)
        return self._kept

    def _ensure(self, key_cache: torch.Tensor) -> None:
        num_blocks, block_size, hkv, d = key_cache.shape
        if self.page_min is not None and self._cache_ptr == key_cache.data_ptr():
            return
        from longseq.kernels.sparse_decode import allocate_page_summary

        shape = (num_blocks * block_size // self.page_size, hkv, d)
        sdt = self.summary_dtype
        sdt = sdt(key_cache.dtype, key_cache.device) if callable(sdt) else (sdt or key_cache.dtype)
        try:
            self.page_min, self.page_max = allocate_page_summary(num_blocks, block_size, hkv, d, self.page_size,
                                                                 key_cache.dtype, key_cache.device, summary_dtype=sdt)
        except torch.OutOfMemoryError as e:  # the framework's memory planner does not count this side cache
            need = 2 * self.page_min_bytes(shape, sdt) / 2**30
            raise LongSeqConfigError(
                f"longseq sparse: no memory for the page index ({need:.2f} GiB per layer, 1/{self.page_size} of "
                "the key cache); leave it room (vLLM: lower --gpu-memory-utilization a little; SGLang: lower "
                "--mem-fraction-static) or raise LONGSEQ_SPARSE_PAGE_SIZE") from e
        self._cache_ptr = key_cache.data_ptr()

    @staticmethod
    def page_min_bytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
        n = 1
        for s in shape:
            n *= s
        return n * torch.empty((), dtype=dtype).element_size()

    def update(self, key_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        """Refresh the summaries of every page written this step.

        Args:
            key_cache: ``[num_blocks, block_size, Hkv, D]`` view (any strides) already holding the new keys.
            slot_mapping: ``[T]`` int slots written this step (``-1`` = padding).
        """
        self._ensure(key_cache)
        if key_cache.is_cuda:
            from longseq.kernels.sparse_decode import update_page_summary
        else:
            from longseq.kernels.sparse_decode import update_page_summary_ref as update_page_summary
        update_page_summary(key_cache, slot_mapping, self.page_min, self.page_max, self.page_size)


class SelectionReuse:
    """Which decode rows select their pages this step (LServe's reusable page selector), for every sparse layer
    of one KV-cache group. The decision is per request: a row selects every ``settings.reuse_steps`` steps and
    in between attends to the pages it kept plus the pages written since. A row is trusted to hold the same
    request as at its last selection only while its length grew by fewer than ``reuse_steps`` tokens and the
    block that held its last token then is still in place (``kernels/sparse_decode/reuse.py``); anything else
    (a new request in the row, batch reordering, preemption) selects again.

    State: int32 ``[capacity]`` tensors allocated once (``max_rows``: the most decode rows a step can have);
    a step with more rows reallocates it (eager steps only: a captured graph never sees more rows than it was
    captured with), and every row then selects.

    Attributes (after :meth:`plan`):
        refresh: ``[rows]`` int32, 1 where the row selects this step.
        extra: ``[rows, E]`` int32 pages written since the row's selection, ``-1`` padded
            (``E = ceil((reuse_steps - 1) / page_size)``).
    """

    def __init__(self, settings: SparseSettings, block_size: int, max_rows: int, device: torch.device):
        from longseq.kernels.sparse_decode.reuse import extra_page_slots

        self.every, self.page_size, self.block_size = settings.reuse_steps, settings.page_size, block_size
        self.num_extra = extra_page_slots(self.every, self.page_size)
        self.device = torch.device(device)
        self.rows = 0
        self._allocate(max(max_rows, 1))

    def _allocate(self, capacity: int) -> None:
        def full(shape, value):
            return torch.full(shape, value, dtype=torch.int32, device=self.device)

        self.sel_len, self.sel_tag = full((capacity,), 0), full((capacity,), -1)
        self._refresh, self._extra = full((capacity,), 1), full((capacity, self.num_extra), -1)

    @property
    def capacity(self) -> int:
        return self.sel_len.shape[0]

    @property
    def refresh(self) -> torch.Tensor:
        return self._refresh[: self.rows]

    @property
    def extra(self) -> torch.Tensor:
        return self._extra[: self.rows]

    def plan(self, block_table: torch.Tensor, seq_lens: torch.Tensor, kernel: str | None = None) -> None:
        """This step's decision for the decode rows: ``block_table`` ``[B, max_blocks]`` int32 and ``seq_lens``
        ``[B]`` int32 (with the query token), rows in the order the layers will see them. ``kernel``:
        ``triton`` or ``torch`` (default: triton on CUDA tensors; tests force triton under the interpreter)."""
        rows = seq_lens.shape[0]
        if rows > self.capacity:
            self._allocate(rows)
        self.rows = rows
        if rows == 0:
            return
        args = (block_table, seq_lens, self.sel_len, self.sel_tag, self._refresh, self._extra, self.every,
                self.page_size, self.block_size)
        if _triton(kernel, block_table):
            from longseq.kernels.sparse_decode.reuse import plan_selection_reuse

            plan_selection_reuse(*args)
        else:
            from longseq.kernels.sparse_decode.naive import plan_selection_reuse_ref

            plan_selection_reuse_ref(*args)


def _triton(kernel: str | None, tensor: torch.Tensor) -> bool:
    """``kernel`` (``triton`` / ``torch``) or, when None, the Triton kernels on CUDA tensors."""
    return (kernel or ("triton" if tensor.is_cuda else "torch")) == "triton"


def sparse_decode(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor, block_table: torch.Tensor,
                  seq_lens: torch.Tensor, index: QuestPageIndex, settings: SparseSettings, scale: float,
                  out: torch.Tensor, reuse: SelectionReuse | None = None, kernel: str | None = None,
                  mods: ScoreMods = NO_MODS) -> torch.Tensor:
    """One decode query per request attends to its top pages only.

    Args:
        q: ``[B, Hq, D]``; key_cache, value_cache: ``[num_blocks, block_size, Hkv, D]`` views (any strides).
        block_table: ``[B, max_blocks]`` int32; seq_lens: ``[B]`` int32 (including the query token).
        index: the layer's page index (current: the query's own key is already written and summarized).
        out: ``[B, Hq, D]`` written in place.
        reuse: the step's :class:`SelectionReuse` (planned for these ``B`` rows), or None (select every row).
        kernel: ``triton`` (the GPU kernels) or ``torch`` (their batched PyTorch versions); default: triton on
            CUDA tensors. Both select the same pages (up to float rounding of equal bounds).
        mods: the layer's soft-cap and sinks, applied by the attention over the kept pages (the Quest bound ranks
            pages by the raw score, which soft-capping does not reorder).

    A request with at most ``settings.num_select`` pages attends to all of them (dense-equivalent; between two
    selections also to the up to ``E`` pages written since, which come on top of the budget). Shapes depend only
    on ``B`` and the block table width, so the step can be captured in a CUDA graph.
    """
    block_size = key_cache.shape[1]
    bsz = q.shape[0]
    refresh = kept = extra = None
    if reuse is not None and reuse.every > 1:
        assert reuse.rows == bsz, f"the reuse plan is for {reuse.rows} rows, the step has {bsz}"
        kept = index.kept_pages(reuse.capacity, index.page_min.shape[1], settings.num_select, q.device)[:bsz]
        refresh, extra = reuse.refresh, reuse.extra
    args = (q, index.page_min, index.page_max, block_table, seq_lens, settings.page_size, block_size,
            settings.num_select, settings.sink_pages, settings.recent_pages)
    if _triton(kernel, q):
        from longseq.kernels.sparse_decode import select_topk_pages, sparse_paged_decode

        page_ids, _ = select_topk_pages(*args, split_max_rows=settings.topk_split_rows,
                                        group_max=settings.group_max, refresh=refresh, page_ids=kept,
                                        topk_impl=settings.topk_impl)
        sparse_paged_decode(q, key_cache, value_cache, block_table, seq_lens, page_ids, settings.page_size, scale,
                            out=out, extra_pages=extra, mods=mods)
        return out
    from longseq.kernels.sparse_decode.torch_ops import select_topk_pages_torch, sparse_paged_decode_torch

    if kept is None:
        page_ids, _ = select_topk_pages_torch(*args, group_max=settings.group_max)
    else:  # only the rows that select this step are scored and ranked (the others keep their pages)
        rows = refresh.bool()
        if bool(rows.any()):
            kept[rows] = select_topk_pages_torch(q[rows], *args[1:3], block_table[rows], seq_lens[rows], *args[5:],
                                                 group_max=settings.group_max)[0]
        page_ids = kept
    out.copy_(sparse_paged_decode_torch(q, key_cache, value_cache, block_table, seq_lens, page_ids,
                                        settings.page_size, scale, extra_pages=extra, mods=mods))
    return out
