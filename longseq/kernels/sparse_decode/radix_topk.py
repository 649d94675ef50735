"""Exact top-k of one fp32 score row by radix select, in one Triton program (``topk_row``), with its parts.

Used by the one-program top-k of ``select.py`` and by the per-segment select and merge of ``topk_split.py``.
It finds the exact ``k``-th largest score with a radix select (8-bit digits, ``tl.histogram``) over
order-preserving int32 keys, but first shrinks the row: the ``k``-th largest of the maxima of ``GS``-page groups
is a lower bound of the ``k``-th largest score, so only pages at or above it can win (at most ``k * GS``, kept
<= ``CAP / 2`` so that runs of top pages fit too); they are compacted (prefix sum) into a ``CAP``-slot scratch
row and the 4-pass select runs on those. A row with more candidates than ``CAP`` (heavy ties) falls back to the
select over the whole row. Ties go to the lower page; winners are stored in ascending page order.
:func:`topk_config` picks the compile-time shape (row block, group size, candidate cap, warps).
"""

from __future__ import annotations

import triton
import triton.language as tl

INT_MIN = tl.constexpr(-2147483648)
CANDIDATE_CAP = 1024  # candidate slots of the filtered top-k (0: no filter)
MAX_ROW = 16384  # elements one top-k program holds in its registers (a select's row, a merge's candidates)
GROUP_PASSES = 3  # radix passes for the group-max bound (3: within 2^-15 of the exact k-th group max)


@triton.jit
def float_key(s):
    """Order-preserving fp32 -> int32: flipping the magnitude bits of negative floats makes signed integer
    order equal float order (-inf lowest)."""
    bits = s.to(tl.int32, bitcast=True)
    return tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


@triton.jit
def kth_largest(key, k, N: tl.constexpr, PASSES: tl.constexpr):
    """Radix select over int32 ``key`` ``[N]`` (``0 <= k <= N``), 8 bits per pass from the top.

    Returns ``(prefix, kr)``. After 4 passes ``prefix`` is the ``k``-th largest key and ``kr`` how many keys
    equal to it belong to the top ``k`` (the rest being larger); after fewer passes ``prefix`` is the
    ``k``-th largest key with its low bits cleared: a lower bound of it. Radix digits are taken in unsigned
    order, which for the top byte means flipping its sign bit.
    """
    bins = tl.arange(0, 256)
    kr = k  # how many still to take among the keys that match the prefix found so far
    prefix = tl.full((), 0, tl.int32)  # the k-th largest key's bytes found so far
    n_match = N
    for i in tl.static_range(PASSES):
        shift = 24 - 8 * i  # a compile-time constant (static_range)
        if i == 0:
            hist = tl.histogram(((key >> 24) & 255) ^ 128, 256)
        else:
            match = (key >> (shift + 8)) == (prefix >> (shift + 8))
            # Non-matching keys are counted in bin 0: take them back out.
            hist = tl.histogram(tl.where(match, (key >> shift) & 255, 0), 256)
            hist = hist - tl.where(bins == 0, N - n_match, 0)
        ge = n_match - tl.cumsum(hist, axis=0) + hist  # matching keys with digit >= bin
        sel_bin = tl.sum((ge >= kr).to(tl.int32), axis=0) - 1  # the largest bin still holding the k-th
        above = tl.where(bins > sel_bin, hist, 0)
        kr = kr - tl.sum(above, axis=0)
        n_match = tl.sum(tl.where(bins == sel_bin, hist, 0), axis=0)
        if i == 0:
            prefix = (sel_bin ^ 128) << 24  # back to signed order (wraps to negative for low bins)
        else:
            prefix = prefix | (sel_bin << shift)
    return prefix, kr


@triton.jit
def take_top(key, idx, k, out_row, N: tl.constexpr):
    """Store ``idx`` of the ``k`` largest ``key`` (ties: the first ones) to ``out_row`` in their order."""
    thr, kr = kth_largest(key, k, N, 4)
    eq = key == thr
    sel = (key > thr) | (eq & (tl.cumsum(eq.to(tl.int32), axis=0) <= kr))
    pos = tl.cumsum(sel.to(tl.int32), axis=0) - 1  # ascending order of idx for free
    tl.store(out_row + pos, idx, mask=sel)


@triton.jit
def topk_row(s_row, n_pages, num_select, out_row, cand_row,
             BLOCK: tl.constexpr, BLOCK_K: tl.constexpr, GS: tl.constexpr, CAP: tl.constexpr,
             GPASSES: tl.constexpr, FILTER: tl.constexpr):
    """Top ``min(n_pages, num_select)`` of the score row ``s_row`` -> ascending page ids at ``out_row``,
    ``-1`` up to ``num_select``. ``cand_row``: ``2 * CAP`` int32 scratch (candidate keys, then pages)."""
    k = tl.minimum(n_pages, num_select)
    j = tl.arange(0, BLOCK)
    valid = j < n_pages
    # .cg: in the fused launch other programs wrote this row; read it from L2, not a stale L1 line.
    s = tl.load(s_row + j, mask=valid, other=float("-inf"), cache_modifier=".cg")
    key = tl.where(valid, float_key(s), INT_MIN)
    c = CAP + 1
    tied = tl.full((), 0, tl.int32)  # 1: the equal-scores path below already wrote the selection
    if FILTER:
        # Group maxima: at least k pages score >= the k-th largest group max `lo`, so the top k are among
        # the pages >= lo. `lo` with its low bits cleared (GPASSES < 4) is a lower bound too.
        gmax = tl.max(tl.reshape(key, [BLOCK // GS, GS]), axis=1)
        lo, _ = kth_largest(gmax, k, BLOCK // GS, GPASSES)
        cand = valid & (key >= lo)
        ci = cand.to(tl.int32)
        pos = tl.cumsum(ci, axis=0) - 1
        c = tl.sum(ci, axis=0)
        if c <= CAP:
            tl.store(cand_row + pos, key, mask=cand)
            tl.store(cand_row + CAP + pos, j, mask=cand)
        else:
            # The exact k-th group max (all 4 radix passes) is a lower bound of the k-th largest score too.
            # If fewer than k pages are above it, the k-th largest IS it: the top k are the pages above plus
            # the first k - c_gt pages equal to it. Many equal scores (e.g. summaries rounded to the same fp8
            # values) take this path instead of the slow whole-row select.
            lo_x, _ = kth_largest(gmax, k, BLOCK // GS, 4)
            gt = valid & (key > lo_x)
            c_gt = tl.sum(gt.to(tl.int32), axis=0)
            if c_gt < k:
                eq = valid & (key == lo_x)
                sel = gt | (eq & (tl.cumsum(eq.to(tl.int32), axis=0) <= k - c_gt))
                pos_sel = tl.cumsum(sel.to(tl.int32), axis=0) - 1
                tl.store(out_row + pos_sel, j, mask=sel)
                tied = tl.full((), 1, tl.int32)
    if c <= CAP:
        tl.debug_barrier()  # the scratch row was written by other threads of this program
        i = tl.arange(0, CAP)
        ck = tl.load(cand_row + i, mask=i < c, other=INT_MIN)
        cj = tl.load(cand_row + CAP + i, mask=i < c, other=0)
        take_top(ck, cj, k, out_row, CAP)
    elif tied == 0:
        take_top(key, j, k, out_row, BLOCK)
    o = tl.arange(0, BLOCK_K)
    tl.store(out_row + o, tl.full([BLOCK_K], -1, tl.int32), mask=(o >= k) & (o < num_select))


def topk_config(max_pages: int, num_select: int, candidate_cap: int | None, num_warps: int | None) -> dict:
    """Compile-time shape of the top-k: row block, group size and candidate cap (filter off when it cannot
    pay: rows that fit the cap, or too few groups for ``num_select``)."""
    block = max(triton.next_power_of_2(max_pages), 256)
    if num_warps is None:
        num_warps = 16 if block >= 4096 else max(4, block // 256)
    num_warps = min(num_warps, block // 32)
    threads = 32 * num_warps  # every tl.histogram input holds at least one element per thread
    cap = CANDIDATE_CAP if candidate_cap is None else candidate_cap
    cap = max(triton.next_power_of_2(cap), threads) if cap > 0 else 0
    # Groups small enough that even fully clustered rows (the top pages filling whole groups: scores that vary
    # smoothly with position, as RoPE makes them in real and dummy-weight models) fit the cap: at most
    # k * GS candidates, kept <= cap / 2. With 4k groups iid rows pass ~k/4 of the maxima. A row over the cap
    # falls back to the whole-row select, several times slower.
    k_pow2 = triton.next_power_of_2(num_select)
    n_groups = max(4 * k_pow2, threads, triton.next_power_of_2(-(-2 * block * k_pow2 // max(cap, 1))))
    n_groups = min(block // 2, n_groups)
    filt = 0 < cap < block and num_select <= n_groups and n_groups >= threads
    if not filt:
        cap, n_groups = 16, block  # unused scratch
    return dict(BLOCK=block, BLOCK_K=triton.next_power_of_2(num_select), GS=block // n_groups, CAP=cap,
                GPASSES=GROUP_PASSES, FILTER=filt, num_warps=num_warps)
