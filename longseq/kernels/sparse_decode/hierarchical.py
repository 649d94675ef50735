"""Hierarchical Quest page selection: score cache blocks first, then only the pages of the best blocks (issue 18).

With pages of ``P`` tokens in cache blocks of ``block_size`` (``ppb = block_size // P`` pages each), a block
summary ``block_min``/``block_max`` ``[num_blocks, Hkv, D]`` (the min/max of its pages' summaries, same dtype)
gives a Quest bound of the whole block that bounds each of its pages' bounds (``naive_hierarchical.py``). So:

1. ``score_pages`` over blocks (``page_size = block_size``): ``ppb`` times fewer rows to read and rank.
2. ``topk_pages`` keeps the best ``num_blocks_select`` blocks per (request, kv head), ascending.
3. One program per (request, kv head) (``_select_fine_kernel``) scores the ``num_blocks_select * ppb`` pages of
   those blocks from the page summaries and radix-selects the best ``num_select`` in registers
   (``radix_topk.take_top``); they come out in ascending page order because the blocks do.

The selection is exact when every block is kept; with fewer it can miss a page whose block's bound is beaten by
other blocks (the recall the benchmark measures). The first/last live pages are forced in at both levels
(``coarse_forced_blocks``). ``update_block_summary`` keeps the block summaries current after
``update_page_summary``. Fixed shapes, no host synchronization: CUDA-graph safe.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from longseq.kernels.sparse_decode.naive_hierarchical import coarse_forced_blocks
from longseq.kernels.sparse_decode.page_summary import FP8, _fp8e4m3_directed_bits, load_summary_f32
from longseq.kernels.sparse_decode.radix_topk import INT_MIN, float_key, take_top
from longseq.kernels.sparse_decode.select import score_pages, topk_pages


# --------------------------------------------------------------------------------------------- block summaries
@triton.jit(do_not_specialize=["T"])  # T changes every step: one compiled variant for all
def _update_block_summary_kernel(
    page_min, page_max, block_min, block_max, slot_mapping, T,
    s_pp, s_ph, s_pd, s_bb, s_bh, s_bd,
    HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, PAGE_SIZE: tl.constexpr, PPB: tl.constexpr,
    BLOCK_PPB: tl.constexpr, HD: tl.constexpr, BLOCK_HD: tl.constexpr, FP8_IO: tl.constexpr,
):
    t = tl.program_id(0)
    slot = tl.load(slot_mapping + t).to(tl.int64)
    nxt = tl.load(slot_mapping + t + 1, mask=t + 1 < T, other=-1).to(tl.int64)
    blk = slot // BLOCK_SIZE
    # The block's last token written this step does the work (a 128K prefill reads each block's pages once).
    continues = (nxt == slot + 1) & ((nxt // BLOCK_SIZE) == blk)
    if (slot < 0) | continues:
        return
    n_pages = (slot % BLOCK_SIZE) // PAGE_SIZE + 1  # pages past the last written one may be a previous owner's
    hd = tl.program_id(1) * BLOCK_HD + tl.arange(0, BLOCK_HD)
    hd_mask = hd < HD
    h = hd // HEAD_DIM
    d = hd % HEAD_DIM
    r = tl.arange(0, BLOCK_PPB)
    m = (r < n_pages)[:, None] & hd_mask[None, :]
    offs = (blk * PPB + r)[:, None] * s_pp + (h * s_ph + d * s_pd)[None, :]
    mn = load_summary_f32(page_min, offs, m, FP8_IO)  # FP8_IO: uint8 views of the fp8 tensors
    mx = load_summary_f32(page_max, offs, m, FP8_IO)
    # A NaN page summary (fp8 out of range) must make the block's NaN too: min/max reductions may drop NaNs.
    nan_mn = tl.max((m & (mn != mn)).to(tl.int32), axis=0) > 0
    nan_mx = tl.max((m & (mx != mx)).to(tl.int32), axis=0) > 0
    bmn = tl.min(tl.where(m & (mn == mn), mn, float("inf")), axis=0)
    bmx = tl.max(tl.where(m & (mx == mx), mx, float("-inf")), axis=0)
    out = blk * s_bb + h * s_bh + d * s_bd
    if FP8_IO:  # min/max of fp8 values are fp8 values: the directed conversion is exact here
        tl.store(block_min + out, tl.where(nan_mn, 0x7F, _fp8e4m3_directed_bits(bmn, False)).to(tl.uint8),
                 mask=hd_mask)
        tl.store(block_max + out, tl.where(nan_mx, 0x7F, _fp8e4m3_directed_bits(bmx, True)).to(tl.uint8),
                 mask=hd_mask)
    else:
        tl.store(block_min + out, tl.where(nan_mn, float("nan"), bmn).to(block_min.dtype.element_ty), mask=hd_mask)
        tl.store(block_max + out, tl.where(nan_mx, float("nan"), bmx).to(block_max.dtype.element_ty), mask=hd_mask)


def allocate_block_summary(num_blocks: int, num_kv_heads: int, head_size: int, dtype: torch.dtype,
                           device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """Empty ``(block_min, block_max)``, each ``[num_blocks, Hkv, D]`` of ``dtype`` (the page summaries'):
    views of one ``[num_blocks, Hkv, 2, D]`` buffer, as ``allocate_page_summary`` lays out pages, so the block
    scorer reads a block's min and max of one kv head as one run of memory."""
    buf = torch.empty((num_blocks, num_kv_heads, 2, head_size), dtype=dtype, device=device)
    return buf[:, :, 0], buf[:, :, 1]


def update_block_summary(page_min: torch.Tensor, page_max: torch.Tensor, block_min: torch.Tensor,
                         block_max: torch.Tensor, slot_mapping: torch.Tensor, block_size: int,
                         page_size: int, block_hd: int | None = None, num_warps: int | None = None) -> None:
    """Recompute, in place, min/max of every block that a slot of ``slot_mapping`` was written to.

    Call after ``update_page_summary`` with the same ``slot_mapping``.

    Args:
        page_min, page_max: ``[num_blocks * block_size // page_size, Hkv, D]`` page summaries, any float
            dtype (``torch.float8_e4m3fn`` too), the same strides.
        block_min, block_max: ``[num_blocks, Hkv, D]`` of the same dtype, the same strides
            (``allocate_block_summary``).
        slot_mapping: ``[T]`` int32/int64 slots (``-1`` = padding); the slots of one block written in one
            step are consecutive entries (vLLM's layout).
        block_size, page_size: tokens per cache block / per page (``page_size`` divides ``block_size``).
        block_hd, num_warps: tuning (flat ``(head, dim)`` elements per program, warps).

    A block's summary covers its pages up to the one holding the block's last slot written this step (stale
    pages of a previous owner never leak in). Exactly one program per touched block reads its pages.
    """
    assert block_size % page_size == 0, "page_size must divide block_size"
    ppb = block_size // page_size
    _, hkv, d = page_min.shape
    num_blocks = page_min.shape[0] // ppb
    assert page_min.shape == page_max.shape and block_min.shape == block_max.shape == (num_blocks, hkv, d)
    assert page_min.stride() == page_max.stride() and block_min.stride() == block_max.stride()
    assert page_min.dtype == page_max.dtype == block_min.dtype == block_max.dtype
    t = slot_mapping.shape[0]
    if t == 0:
        return
    fp8 = page_min.dtype == FP8
    if fp8:
        page_min, page_max = page_min.view(torch.uint8), page_max.view(torch.uint8)
        block_min, block_max = block_min.view(torch.uint8), block_max.view(torch.uint8)
    hd = hkv * d
    block_ppb = triton.next_power_of_2(ppb)
    # Decode (few slots): small tiles over many programs, each a short load-reduce-store chain. Long launches
    # (prefill): nearly every program exits at once, so fewer, wider ones.
    block_hd = min(triton.next_power_of_2(hd), block_hd or (64 if t <= 64 else 128))
    num_warps = num_warps or (4 if t <= 64 else 2)
    grid = (t, triton.cdiv(hd, block_hd))
    _update_block_summary_kernel[grid](
        page_min, page_max, block_min, block_max, slot_mapping, t,
        *page_min.stride(), *block_min.stride(),
        HEAD_DIM=d, BLOCK_SIZE=block_size, PAGE_SIZE=page_size, PPB=ppb, BLOCK_PPB=block_ppb, HD=hd,
        BLOCK_HD=block_hd, FP8_IO=fp8, num_warps=num_warps,
    )


# --------------------------------------------------------------------------------------------- fine selection
@triton.jit
def _candidate_pages(block_ids_row, i, num_blocks_select, n_pages, PPB: tl.constexpr):
    """Logical page of candidate slot ``i`` (page ``i % ppb`` of the ``i // ppb``-th chosen block) and whether
    it is live (a chosen block, not ``-1`` padding, and below the request's page count)."""
    nth = i // PPB
    blk = tl.load(block_ids_row + nth, mask=nth < num_blocks_select, other=-1)
    j = blk * PPB + i % PPB
    return j, (blk >= 0) & (j < n_pages), blk


@triton.jit
def _select_fine_kernel(
    q, page_min, page_max, block_table, seq_lens, block_ids, page_ids, num_valid, scratch,
    num_select, num_blocks_select, num_sink, num_recent, max_pages,
    s_qb, s_qh, s_qd, s_pp, s_ph, s_pd, s_btb, s_btn, s_cb, s_ch, s_ob, s_oh,
    HKV: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE_SIZE: tl.constexpr,
    PPB: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, CAND: tl.constexpr,
    CHUNK: tl.constexpr, BLOCK_K: tl.constexpr, FP8_BITS: tl.constexpr,
):
    bh = tl.program_id(0)
    b = bh // HKV
    h = bh % HKV
    n_pages = tl.minimum((tl.load(seq_lens + b) + PAGE_SIZE - 1) // PAGE_SIZE, max_pages)
    out_row = page_ids + b * s_ob + h * s_oh
    o = tl.arange(0, BLOCK_K)
    if n_pages <= num_select:  # every live page, as the flat selection returns them
        tl.store(out_row + o, tl.where(o < n_pages, o, -1), mask=o < num_select)
    else:
        d = tl.arange(0, BLOCK_D)
        d_mask = d < HEAD_DIM
        # The GQA sum of bounds is linear (select.py): one [D] weight pair per kv head.
        g = tl.arange(0, BLOCK_G)
        qg = tl.load(q + b * s_qb + (h * GROUP + g)[:, None] * s_qh + d[None, :] * s_qd,
                     mask=(g < GROUP)[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
        q_pos = tl.sum(tl.maximum(qg, 0.0), axis=0)
        q_neg = tl.sum(tl.minimum(qg, 0.0), axis=0)
        ids_row = block_ids + b * s_cb + h * s_ch
        bt_row = block_table + b * s_btb
        key_row = scratch + bh * CAND
        for c0 in range(0, CAND, CHUNK):
            i = c0 + tl.arange(0, CHUNK)
            j, live, blk = _candidate_pages(ids_row, i, num_blocks_select, n_pages, PPB)
            phys = tl.load(bt_row + blk * s_btn, mask=live, other=0).to(tl.int64)
            gp = phys * PPB + i % PPB
            offs = gp[:, None] * s_pp + h * s_ph + d[None, :] * s_pd
            m = live[:, None] & d_mask[None, :]
            mn = load_summary_f32(page_min, offs, m, FP8_BITS)  # FP8_BITS: interpreter, uint8 views
            mx = load_summary_f32(page_max, offs, m, FP8_BITS)
            s = tl.sum(mx * q_pos[None, :] + mn * q_neg[None, :], axis=1)
            s = tl.where(s != s, float("inf"), s)  # an fp8 summary out of range: no finite bound
            s = tl.where((j < num_sink) | (j >= n_pages - num_recent), float("inf"), s)
            tl.store(key_row + i, tl.where(live, float_key(s), INT_MIN))
        tl.debug_barrier()  # the keys were written by other threads of this program
        i = tl.arange(0, CAND)
        j, live, _ = _candidate_pages(ids_row, i, num_blocks_select, n_pages, PPB)
        key = tl.load(key_row + i)
        k = tl.minimum(num_select, tl.sum(live.to(tl.int32), axis=0))
        take_top(key, j, k, out_row, CAND)  # candidate order is page order: the blocks come ascending
        tl.store(out_row + o, tl.full([BLOCK_K], -1, tl.int32), mask=(o >= k) & (o < num_select))
    if h == 0:
        tl.store(num_valid + b, tl.minimum(n_pages, num_select).to(tl.int32))


def _fine_config(num_blocks_select: int, ppb: int, d: int, chunk: int | None = None,
                 num_warps: int | None = None, num_stages: int | None = None) -> dict:
    """Candidate row width (a power of two, at least one element per thread for the radix histograms), pages
    scored per iteration, warps and pipeline stages."""
    cand = triton.next_power_of_2(num_blocks_select * ppb)
    block_d = triton.next_power_of_2(d)
    # Wide chunks: one program per row walks its candidates serially, so fewer, larger loads per row win.
    chunk = min(cand, chunk or max(16, 16384 // block_d))
    warps = num_warps or (8 if chunk * block_d >= 8192 else 4)  # two [CHUNK, D] fp32 tiles
    cfg = {"CAND": max(cand, 32 * warps, chunk), "CHUNK": chunk, "BLOCK_D": block_d, "num_warps": warps}
    return cfg if num_stages is None else {**cfg, "num_stages": num_stages}


def select_fine_pages(q: torch.Tensor, page_min: torch.Tensor, page_max: torch.Tensor, block_table: torch.Tensor,
                      seq_lens: torch.Tensor, block_ids: torch.Tensor, page_size: int, block_size: int,
                      num_select: int, num_sink_pages: int = 0, num_recent_pages: int = 0,
                      chunk: int | None = None, num_warps: int | None = None,
                      num_stages: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Top ``num_select`` pages among the pages of the blocks ``block_ids`` (step 3 of the module docstring).

    Args:
        block_ids: ``[B, Hkv, num_blocks_select]`` int32 logical blocks per (request, kv head), ascending,
            ``-1`` padded at the end (``topk_pages`` over block scores).
        chunk, num_warps, num_stages: tuning (pages scored per loop iteration, warps, pipeline stages).
        others: as ``select_topk_pages_hierarchical``.

    Returns:
        ``(page_ids [B, Hkv, num_select] int32, num_valid [B] int32)``, ``select_topk_pages_hierarchical``'s.
    """
    bsz, hq, d = q.shape
    hkv = page_min.shape[1]
    ppb = block_size // page_size
    nbs = block_ids.shape[2]
    assert block_ids.stride(2) == 1
    page_ids = torch.empty(bsz, hkv, num_select, dtype=torch.int32, device=q.device)
    num_valid = torch.empty(bsz, dtype=torch.int32, device=q.device)
    if bsz == 0:
        return page_ids, num_valid
    cfg = _fine_config(nbs, ppb, d, chunk, num_warps, num_stages)
    scratch = torch.empty(bsz * hkv * cfg["CAND"], dtype=torch.int32, device=q.device)
    fp8_bits = page_min.dtype == FP8 and not page_min.is_cuda
    if fp8_bits:
        page_min, page_max = page_min.view(torch.uint8), page_max.view(torch.uint8)
    _select_fine_kernel[(bsz * hkv,)](
        q, page_min, page_max, block_table, seq_lens, block_ids, page_ids, num_valid, scratch,
        num_select, nbs, num_sink_pages, num_recent_pages, block_table.shape[1] * ppb,
        *q.stride(), *page_min.stride(), *block_table.stride(), block_ids.stride(0), block_ids.stride(1),
        page_ids.stride(0), page_ids.stride(1),
        HKV=hkv, GROUP=hq // hkv, HEAD_DIM=d, PAGE_SIZE=page_size, PPB=ppb,
        BLOCK_G=triton.next_power_of_2(hq // hkv), BLOCK_K=triton.next_power_of_2(num_select),
        FP8_BITS=fp8_bits, **cfg,
    )
    return page_ids, num_valid


def select_topk_pages_hierarchical(q: torch.Tensor, page_min: torch.Tensor, page_max: torch.Tensor,
                                   block_min: torch.Tensor, block_max: torch.Tensor, block_table: torch.Tensor,
                                   seq_lens: torch.Tensor, page_size: int, block_size: int, num_select: int,
                                   num_blocks_select: int, num_sink_pages: int = 0, num_recent_pages: int = 0,
                                   coarse_topk_impl: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Quest page selection through the best blocks: ``select_topk_pages``'s contract, ``ppb`` times fewer rows
    to rank.

    Args:
        q: ``[B, Hq, D]`` fp16/bf16/fp32 decode queries (GQA groups as in ``score_pages``).
        page_min, page_max: ``[num_blocks * ppb, Hkv, D]`` page summaries (``update_page_summary``).
        block_min, block_max: ``[num_blocks, Hkv, D]`` block summaries (``update_block_summary``).
        block_table: ``[B, max_blocks]`` int32; seq_lens: ``[B]`` int32.
        num_select: pages kept per (request, kv head), at least ``num_sink_pages + num_recent_pages``.
        num_blocks_select: blocks whose pages compete, at least the forced blocks
            (``coarse_forced_blocks``) and ``num_select / ppb``.
        coarse_topk_impl: ``topk_pages``'s ``impl`` for the blocks: one that returns them ascending
            (``"auto"``, ``"triton"``, ``"torch"``).

    Returns:
        page_ids: ``[B, Hkv, num_select]`` int32 logical pages, ascending, ``-1`` padded; every live page when
            the request has at most ``num_select``. A row holds fewer than ``num_valid`` pages only when its
            chosen blocks hold fewer live pages: a partial last block among them with
            ``num_blocks_select * ppb < num_select + ppb - 1``.
        num_valid: ``[B]`` int32 ``min(num_select, ceil(seq_len / page_size))``.
    """
    assert block_size % page_size == 0
    ppb = block_size // page_size
    sink_b, recent_b = coarse_forced_blocks(num_sink_pages, num_recent_pages, ppb)
    assert num_sink_pages + num_recent_pages <= num_select, "num_select must cover the sink and recent pages"
    assert sink_b + recent_b <= num_blocks_select, "num_blocks_select must cover the sink and recent blocks"
    assert num_blocks_select * ppb >= num_select, "the chosen blocks must hold num_select pages"
    assert coarse_topk_impl != "flashinfer", "the fine kernel needs the blocks ascending"
    block_scores = score_pages(q, block_min, block_max, block_table, seq_lens, block_size, block_size,
                               sink_b, recent_b)
    block_ids, _ = topk_pages(block_scores, seq_lens, block_size, num_blocks_select, impl=coarse_topk_impl)
    return select_fine_pages(q, page_min, page_max, block_table, seq_lens, block_ids, page_size, block_size,
                             num_select, num_sink_pages, num_recent_pages)
