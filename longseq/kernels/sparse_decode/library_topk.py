"""Page top-k through FlashInfer's radix ``top_k`` instead of our Triton select (``LONGSEQ_SPARSE_TOPK=flashinfer``).

FlashInfer's ``flashinfer.topk.top_k`` is faster than ``select.topk_pages`` on the engine's score rows and captures
in CUDA graphs (docs/benchmarks/sparse.md, "Library top-k"; ``benchmarks/bench_topk_library.py``). This wraps it
in ``topk_pages``'s contract, with one difference: the selected pages of a row come in ANY order, with the ``-1``
entries anywhere in it (not ascending, not ``-1`` padded at the end). No caller needs the order: the sparse decode
kernel and its PyTorch version read a page list in any order and skip ``-1`` (``decode.sparse_paged_decode``),
selection reuse keeps the list as it is (``reuse.py``), and the core drops ``num_valid``
(``attention_backends/core/sparse.py``). Sorting would cost one more launch per step.

The library ranks the whole ``[B * Hkv, max_pages]`` row, so, as for ``topk_pages(impl="torch")``, pages past a
request's live pages must score ``-inf`` (``score_pages`` writes them so) and live pages above ``-inf``
(``score_pages`` maps NaN to ``+inf``; only an fp32 overflow of a bound could give ``-inf``). A selected page at or
past ``ceil(seq_len / page_size)`` becomes ``-1``. Fixed shapes, no host synchronization: the post-processing is
a few elementwise ops writing into ``page_ids``, so the call captures in a CUDA graph as far as ``top_k`` does.

Imports nothing of FlashInfer until the first call (``flashinfer_topk_available`` tells whether it can run).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

#: ``(input [rows, d], k) -> (values [rows, k], indices [rows, k] int64)``: ``flashinfer.topk.top_k``'s signature.
TopK = Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]


@functools.cache
def _flashinfer_top_k() -> TopK:
    from flashinfer.topk import top_k

    return top_k


@functools.cache
def flashinfer_topk_available() -> bool:
    """Whether ``topk_pages_flashinfer`` can run with its default ``top_k``: FlashInfer imports and CUDA is up."""
    if not torch.cuda.is_available():
        return False
    try:
        _flashinfer_top_k()
    except Exception:  # noqa: BLE001 - not installed, or built for another torch/CUDA
        return False
    return True


def topk_pages_flashinfer(scores: torch.Tensor, seq_lens: torch.Tensor, page_size: int, num_select: int,
                          refresh: torch.Tensor | None = None, page_ids: torch.Tensor | None = None,
                          top_k: TopK | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Top ``num_select`` pages of each ``[B, Hkv, max_pages]`` score row, in any order, ``-1`` where a row has
    fewer live pages than ``num_select`` (module docstring).

    Args:
        scores: ``[B, Hkv, max_pages]`` fp32, ``-inf`` past each request's live pages (``score_pages``).
        seq_lens: ``[B]`` int32; the live pages are ``0 .. ceil(seq_len / page_size) - 1``.
        refresh, page_ids: as ``select.topk_pages``: with ``refresh`` (``[B]`` int32) only the rows where it is
            nonzero are selected, into ``page_ids`` (``[B, Hkv, num_select]`` int32); the others keep theirs
            exactly. Without ``refresh`` the selection is written into ``page_ids`` when given.
        top_k: ``(input [rows, d], k) -> (values, indices)``; default ``flashinfer.topk.top_k`` (imported now).

    Returns:
        page_ids: ``[B, Hkv, num_select]`` int32 logical pages, any order, ``-1`` for the unused slots.
        num_valid: ``[B]`` int32 ``min(num_select, ceil(seq_len / page_size), max_pages)``, every row (also the
            rows that keep their selection).
    """
    assert refresh is None or page_ids is not None, "refresh needs the page_ids to keep"
    bsz, hkv, max_pages = scores.shape
    if page_ids is None:
        page_ids = torch.empty(bsz, hkv, num_select, dtype=torch.int32, device=scores.device)
    assert page_ids.shape == (bsz, hkv, num_select) and page_ids.dtype == torch.int32
    k = min(num_select, max_pages)
    num_valid = torch.div(seq_lens + (page_size - 1), page_size, rounding_mode="floor").clamp(max=k).to(torch.int32)
    if bsz == 0:
        return page_ids, num_valid
    keep = None if refresh is None else (refresh != 0)[:, None, None]  # [B, 1, 1]: rows selected this step
    if k > 0:
        _, idx = (top_k or _flashinfer_top_k())(scores.reshape(bsz * hkv, max_pages), k)
        idx = idx.reshape(bsz, hkv, k)
        # A page is live iff page * P < seq_len; the winners past the live pages (-inf) become -1.
        new = torch.where(idx * page_size < seq_lens[:, None, None], idx, -1)
        if keep is not None:
            new = torch.where(keep, new, page_ids[:, :, :k])
        page_ids[:, :, :k].copy_(new)
    if k < num_select:  # rows narrower than the budget: the slots past the row width are unused
        if keep is None:
            page_ids[:, :, k:].fill_(-1)
        else:
            page_ids[:, :, k:].masked_fill_(keep, -1)
    return page_ids, num_valid
