"""Top-k page selection split over several programs per score row (long rows, few rows).

The one-program top-k of ``select.py`` runs one program per (request, KV head) row: at batch 1 with 8 KV heads
that is 8 programs on a 132-SM GPU for a 8192-page row (128K tokens), and it was the largest cost of a sparse
decode step in the engine at long context (docs/benchmarks/sparse.md). Here the row is cut into segments of
``SEG`` pages:

1. ``_topk_segment_kernel``, grid ``(B * Hkv, NSEG)``: each program selects its segment's top ``k`` pages
   (``radix_topk.topk_row``: exact radix select, ties to the lower page) into a scratch row of ``BLOCK_K`` local
   page ids, ascending, ``-1`` padded. Segments past the request's live pages only write ``-1``.
2. ``_topk_merge_kernel``, grid ``(B * Hkv,)``: gathers the ``NSEG * BLOCK_K`` candidates (global page ids and
   their scores) and keeps the top ``k`` of them (``radix_topk.take_top``), in ascending page order. With
   ``fused_merge`` the last segment program of each row to finish does this instead (a per-row counter,
   reset by that program), saving the second launch.

Exactness: a page in the row's top ``k`` (ties to the lower page) is in its segment's top ``k`` under the same
rule, and the candidates are laid out in page order, so the merge picks exactly the pages the one-program
select picks, ties included. Fixed grid and shapes: CUDA-graph safe, no host synchronization.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .radix_topk import INT_MIN, MAX_ROW, float_key, take_top, topk_config, topk_row
from .workspace import counters

#: Pages per segment (0: never split). Rows of more than ``2 * SEGMENT_PAGES`` pages are split by default when
#: there are fewer than ``SPLIT_MAX_ROWS`` rows: the split wins on long live rows at few rows, its second launch
#: loses on shorter ones, and with 64 rows the one-program select already fills half the SMs
#: (docs/benchmarks/sparse.md).
SEGMENT_PAGES = 1024
SPLIT_MAX_ROWS = 64
#: The merge done by each row's last segment program (one launch) instead of a second launch: off, it gains
#: little at the default segment size and loses at smaller ones (docs/benchmarks/sparse.md).
FUSED_MERGE = False


@triton.jit
def _merge_row(s_row, seg_row, out_row, n_pages, num_select,
               NSEG: tl.constexpr, SEG: tl.constexpr, BLOCK_K: tl.constexpr, N: tl.constexpr):
    """Top ``min(n_pages, num_select)`` of a row's ``NSEG * BLOCK_K`` segment winners -> ``out_row``."""
    k = tl.minimum(n_pages, num_select)
    i = tl.arange(0, N)
    seg = i // BLOCK_K
    slot = i % BLOCK_K
    # .cg: in the fused merge other programs wrote these; read them from L2, not a stale L1 line.
    lid = tl.load(seg_row + i, mask=(slot < num_select) & (seg < NSEG), other=-1, cache_modifier=".cg")
    ok = lid >= 0
    gid = seg * SEG + lid
    s = tl.load(s_row + gid, mask=ok, other=float("-inf"))
    key = tl.where(ok, float_key(s), INT_MIN)
    take_top(key, gid, k, out_row, N)
    o = tl.arange(0, BLOCK_K)
    tl.store(out_row + o, tl.full([BLOCK_K], -1, tl.int32), mask=(o >= k) & (o < num_select))
    return k


@triton.jit
def _topk_segment_kernel(
    scores, seq_lens, seg_ids, cand, max_pages, num_select, s_sb, s_sh,
    row_counters, page_ids, num_valid, s_ob, s_oh, refresh,
    HKV: tl.constexpr, PAGE_SIZE: tl.constexpr, NSEG: tl.constexpr, SEG: tl.constexpr, BLOCK: tl.constexpr,
    BLOCK_K: tl.constexpr, GS: tl.constexpr, CAP: tl.constexpr, GPASSES: tl.constexpr, FILTER: tl.constexpr,
    FUSED_MERGE: tl.constexpr, N: tl.constexpr, REUSE: tl.constexpr,
):
    bh = tl.program_id(0)
    seg = tl.program_id(1)
    b = bh // HKV
    h = bh % HKV
    n_pages = tl.minimum((tl.load(seq_lens + b) + PAGE_SIZE - 1) // PAGE_SIZE, max_pages)
    if REUSE:  # a row that reuses its last selection (reuse.py): its segments hold nothing (the merge skips it)
        n_pages = tl.where(tl.load(refresh + b) != 0, n_pages, 0)
    start = seg * SEG
    n_seg = tl.minimum(tl.maximum(n_pages - start, 0), SEG)
    out_row = seg_ids + (bh * NSEG + seg) * BLOCK_K
    if n_seg > 0:
        topk_row(scores + b * s_sb + h * s_sh + start, n_seg, num_select, out_row,
                 cand + (bh * NSEG + seg) * (2 * CAP), BLOCK, BLOCK_K, GS, CAP, GPASSES, FILTER)
    else:
        o = tl.arange(0, BLOCK_K)
        tl.store(out_row + o, tl.full([BLOCK_K], -1, tl.int32), mask=o < num_select)
    if FUSED_MERGE:
        # The last segment of this row to finish merges (no second launch). The barrier orders every thread's
        # stores before the (single-thread, acq_rel) counter increment.
        tl.debug_barrier()
        done = tl.atomic_add(row_counters + bh, 1, sem="acq_rel", scope="gpu")
        if done == NSEG - 1:
            tl.store(row_counters + bh, 0)  # ready for the next launch
            k = _merge_row(scores + b * s_sb + h * s_sh, seg_ids + bh * NSEG * BLOCK_K,
                           page_ids + b * s_ob + h * s_oh, n_pages, num_select, NSEG, SEG, BLOCK_K, N)
            if h == 0:
                tl.store(num_valid + b, k.to(tl.int32))


@triton.jit
def _topk_merge_kernel(
    scores, seq_lens, seg_ids, page_ids, num_valid, max_pages, num_select, s_sb, s_sh, s_ob, s_oh, refresh,
    HKV: tl.constexpr, PAGE_SIZE: tl.constexpr, NSEG: tl.constexpr, SEG: tl.constexpr, BLOCK_K: tl.constexpr,
    N: tl.constexpr, REUSE: tl.constexpr,
):
    bh = tl.program_id(0)
    b = bh // HKV
    h = bh % HKV
    n_pages = tl.minimum((tl.load(seq_lens + b) + PAGE_SIZE - 1) // PAGE_SIZE, max_pages)
    if REUSE:
        go = tl.load(refresh + b) != 0
    else:
        go = n_pages >= 0
    if go:  # a row that reuses its last selection (reuse.py) keeps its page_ids
        k = _merge_row(scores + b * s_sb + h * s_sh, seg_ids + bh * NSEG * BLOCK_K,
                       page_ids + b * s_ob + h * s_oh, n_pages, num_select, NSEG, SEG, BLOCK_K, N)
        if h == 0:
            tl.store(num_valid + b, k.to(tl.int32))


def split_applies(max_pages: int, num_select: int, segment_pages: int | None = None,
                  num_rows: int | None = None, max_rows: int | None = None) -> bool:
    """Whether ``topk_pages`` splits ``num_rows`` rows of ``max_pages`` pages: rows longer than two segments,
    a segment holding at least twice ``num_select``, and (with the default segment size only) fewer than
    ``max_rows`` rows (default ``SPLIT_MAX_ROWS``; ``LONGSEQ_SPARSE_TOPK_SPLIT_ROWS`` in the engine). An explicit
    ``segment_pages`` always splits when the shapes allow it."""
    seg = SEGMENT_PAGES if segment_pages is None else segment_pages
    max_rows = SPLIT_MAX_ROWS if max_rows is None else max_rows
    if segment_pages is None and num_rows is not None and num_rows >= max_rows:
        return False
    return seg > 0 and max_pages > 2 * seg and 2 * triton.next_power_of_2(num_select) <= seg


def _valid_segment(seg: int, block_k: int) -> bool:
    """A power of two holding at least twice the (power-of-two) winners per segment."""
    return seg > 0 and not seg & (seg - 1) and 2 * block_k <= seg


def split_fits(max_pages: int, num_select: int, segment_pages: int | None = None) -> bool:
    """Whether rows of ``max_pages`` pages can be split at all: a valid segment size and a merge whose
    ``NSEG * next_pow2(num_select)`` candidates fit one program (``radix_topk.MAX_ROW``; with the default segment:
    rows up to 64 segments at ``num_select`` <= 256)."""
    seg = SEGMENT_PAGES if segment_pages is None else segment_pages
    block_k = triton.next_power_of_2(num_select)
    return _valid_segment(seg, block_k) and triton.next_power_of_2(triton.cdiv(max_pages, seg) * block_k) <= MAX_ROW


def topk_pages_split(scores: torch.Tensor, seq_lens: torch.Tensor, page_size: int, num_select: int,
                     segment_pages: int | None = None, candidate_cap: int | None = None,
                     num_warps: int | None = None, fused_merge: bool | None = None,
                     refresh: torch.Tensor | None = None,
                     page_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as ``select.topk_pages`` (triton path, ties to the lower page), split over segments.

    Args:
        scores: ``[B, Hkv, max_pages]`` fp32 (last dim contiguous); seq_lens: ``[B]`` int32.
        segment_pages: pages per segment, a power of two >= 2 * next_pow2(num_select) (default
            ``SEGMENT_PAGES``). candidate_cap, num_warps: the per-segment select's tuning (``topk_config``).
        fused_merge: the last segment program of each row merges (one launch, per-row counters of
            ``workspace.counters``) instead of a second launch (default ``FUSED_MERGE``).
        refresh, page_ids: selection reuse (``select.topk_pages``): rows where ``refresh`` is 0 keep their
            ``page_ids`` (not with ``fused_merge``).

    Returns:
        page_ids ``[B, Hkv, num_select]`` int32 ascending, ``-1`` padded; num_valid ``[B]`` int32.
    """
    bsz, hkv, max_pages = scores.shape
    seg = SEGMENT_PAGES if segment_pages is None else segment_pages
    block_k = triton.next_power_of_2(num_select)
    if not _valid_segment(seg, block_k):
        raise ValueError(f"segment_pages must be a power of two >= 2 * {block_k}, got {seg}")
    assert scores.stride(2) == 1
    dev = scores.device
    if page_ids is None:
        page_ids = torch.empty(bsz, hkv, num_select, dtype=torch.int32, device=dev)
    assert page_ids.shape == (bsz, hkv, num_select) and page_ids.stride(2) == 1
    num_valid = torch.empty(bsz, dtype=torch.int32, device=dev)
    if bsz == 0:
        return page_ids, num_valid
    nseg = triton.cdiv(max_pages, seg)
    cfg = topk_config(seg, num_select, candidate_cap, num_warps)
    warps = cfg.pop("num_warps")  # cfg["BLOCK"] (>= 256) may exceed seg: the select masks pages >= n_seg
    seg_ids = torch.empty(bsz * hkv * nseg * block_k, dtype=torch.int32, device=dev)
    cand = torch.empty(bsz * hkv * nseg * 2 * cfg["CAP"], dtype=torch.int32, device=dev)
    fused = FUSED_MERGE if fused_merge is None else fused_merge
    assert refresh is None or not fused, "selection reuse runs the separate merge launch"
    reuse = dict(REUSE=refresh is not None)
    refresh = num_valid if refresh is None else refresh  # unused unless REUSE
    common = dict(HKV=hkv, PAGE_SIZE=page_size, NSEG=nseg, SEG=seg)
    n = triton.next_power_of_2(nseg * block_k)
    # >= 1 element per thread in every histogram of the merge (its warps: the segment kernel's when fused)
    n = max(n, 32 * warps) if fused else max(n, 128)
    ctr = counters(dev, bsz * hkv) if fused else seg_ids  # unused unless fused
    _topk_segment_kernel[(bsz * hkv, nseg)](
        scores, seq_lens, seg_ids, cand, max_pages, num_select, scores.stride(0), scores.stride(1),
        ctr, page_ids, num_valid, page_ids.stride(0), page_ids.stride(1), refresh,
        **common, **cfg, FUSED_MERGE=fused, N=n, **reuse, num_warps=warps,
    )
    if not fused:
        _topk_merge_kernel[(bsz * hkv,)](
            scores, seq_lens, seg_ids, page_ids, num_valid, max_pages, num_select, scores.stride(0),
            scores.stride(1), page_ids.stride(0), page_ids.stride(1), refresh, **common, BLOCK_K=block_k, N=n,
            **reuse,
            num_warps=min(16, max(4, n // 256)),
        )
    return page_ids, num_valid
