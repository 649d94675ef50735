"""Quest page scoring and top-k page selection for one decode query per request.

Fixed shapes, no host synchronization (CUDA-graph safe). By default ONE launch does both steps:

1. Scoring, grid ``(B * Hkv, page tiles)``: a program reads ``BLOCK_N`` pages' min/max of one kv head once
   and writes the fp32 upper bound of ``q . k`` for the whole GQA group. Memory-bound: at 128K tokens, P=16,
   Hkv=8, D=128 the summaries are 16.8 MB in fp8 (33.5 MB in bf16), the bulk of the sparse path's bytes.
   Programs of one row are adjacent in launch order, so the kv heads of a page are read together.
2. Top-k, by the last scoring program of each (request, kv head) row to finish (an atomic counter per row,
   reset by that program; ``fused=False`` runs it as a second kernel instead). It finds the exact
   ``k``-th largest score with a radix select (8-bit digits, ``tl.histogram``), but first shrinks the row:
   the ``k``-th largest of the maxima of ``GS``-page groups is a lower bound of the ``k``-th largest score,
   so only pages at or above it can win (at most ``k * GS``, kept <= ``CAP / 2`` so that runs of top pages
   fit too); they are compacted (prefix sum) into a ``CAP``-slot scratch row and the 4-pass select runs on
   those. A row with more candidates than ``CAP`` (heavy ties) falls back to the select over the whole row.
   The row width is the block table's (``max_model_len``); the top-k picks a half- or quarter-width
   compiled variant at run time when the request's live pages fit, and scoring skips dead tiles. Winners
   are compacted in ascending page order.
   Rows longer than ``_MAX_TRITON_TOPK`` pages use ``torch.topk`` + sort.

The GQA reduction is linear: ``max(q min, q max) = q max`` if ``q >= 0`` else ``q min``, so
``sum_g sum_i max(q_gi min_i, q_gi max_i) = sum_i (max_i * sum_g relu(q_gi) + min_i * sum_g min(q_gi, 0))``:
one ``[D]`` pair of vectors per kv head instead of a ``[G, pages, D]`` tile.

fp8 summaries (``page_summary``) hold NaN where a key was out of fp8 range; the NaN propagates into the
page's sum, which is then scored ``+inf`` (the page is always kept).

The fused launch and the fused split merge of ``decode.py`` use per-row counters in a workspace cached per
device, which every launch leaves zeroed: launches that share a device must not run concurrently on
different streams.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_MAX_TRITON_TOPK = 16384  # pages per row held in one program's registers
_INT_MIN = tl.constexpr(-2147483648)

# Defaults (H100 measurements in benchmarks/bench_sparse_kernels.py).
# Fused score + top-k launch: off. On an H200 (benchmarks/results/sparse_kernels.json, 2026-11-29) separate
# launches were as fast or faster in every case: 30.9 vs 40.5 us at 128K batch 1, 80.8 vs 175.8 us at batch 8
# (the fused kernel's score programs carry the top-k's 16-warp register budget).
FUSED_DEFAULT = False
CANDIDATE_CAP = 1024  # candidate slots of the filtered top-k (0: no filter)
GROUP_PASSES = 3  # radix passes for the group-max bound (3: within 2^-15 of the exact k-th group max)


# --------------------------------------------------------------------------------------------- workspace
_COUNTERS: dict[tuple[str, int | None], torch.Tensor] = {}
_RETIRED: list[torch.Tensor] = []  # replaced buffers stay allocated: captured graphs may still use them


def counters(device: torch.device, n: int) -> torch.Tensor:
    """``n`` int32 zeros that stay zero between launches (each user resets what it counted). Cached per device;
    a larger request replaces the buffer (allocated with its zeros inside a graph capture when first needed
    there, so the capture records that zeroing too)."""
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    key = (device.type, device.index)
    buf = _COUNTERS.get(key)
    if buf is None or buf.numel() < n:
        if buf is not None:
            _RETIRED.append(buf)
        buf = torch.zeros(max(4096, triton.next_power_of_2(n)), dtype=torch.int32, device=device)
        _COUNTERS[key] = buf
    return buf


# --------------------------------------------------------------------------------------------- top-k parts
@triton.jit
def _float_key(s):
    """Order-preserving fp32 -> int32: flipping the magnitude bits of negative floats makes signed integer
    order equal float order (-inf lowest)."""
    bits = s.to(tl.int32, bitcast=True)
    return tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


@triton.jit
def _kth_largest(key, k, N: tl.constexpr, PASSES: tl.constexpr):
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
def _take_top(key, idx, k, out_row, N: tl.constexpr):
    """Store ``idx`` of the ``k`` largest ``key`` (ties: the first ones) to ``out_row`` in their order."""
    thr, kr = _kth_largest(key, k, N, 4)
    eq = key == thr
    sel = (key > thr) | (eq & (tl.cumsum(eq.to(tl.int32), axis=0) <= kr))
    pos = tl.cumsum(sel.to(tl.int32), axis=0) - 1  # ascending order of idx for free
    tl.store(out_row + pos, idx, mask=sel)


@triton.jit
def _topk_row(s_row, n_pages, num_select, out_row, cand_row,
              BLOCK: tl.constexpr, BLOCK_K: tl.constexpr, GS: tl.constexpr, CAP: tl.constexpr,
              GPASSES: tl.constexpr, FILTER: tl.constexpr):
    """Top ``min(n_pages, num_select)`` of the score row ``s_row`` -> ascending page ids at ``out_row``,
    ``-1`` up to ``num_select``. ``cand_row``: ``2 * CAP`` int32 scratch (candidate keys, then pages)."""
    k = tl.minimum(n_pages, num_select)
    j = tl.arange(0, BLOCK)
    valid = j < n_pages
    # .cg: in the fused launch other programs wrote this row; read it from L2, not a stale L1 line.
    s = tl.load(s_row + j, mask=valid, other=float("-inf"), cache_modifier=".cg")
    key = tl.where(valid, _float_key(s), _INT_MIN)
    c = CAP + 1
    tied = tl.full((), 0, tl.int32)  # 1: the equal-scores path below already wrote the selection
    if FILTER:
        # Group maxima: at least k pages score >= the k-th largest group max `lo`, so the top k are among
        # the pages >= lo. `lo` with its low bits cleared (GPASSES < 4) is a lower bound too.
        gmax = tl.max(tl.reshape(key, [BLOCK // GS, GS]), axis=1)
        lo, _ = _kth_largest(gmax, k, BLOCK // GS, GPASSES)
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
            lo_x, _ = _kth_largest(gmax, k, BLOCK // GS, 4)
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
        ck = tl.load(cand_row + i, mask=i < c, other=_INT_MIN)
        cj = tl.load(cand_row + CAP + i, mask=i < c, other=0)
        _take_top(ck, cj, k, out_row, CAP)
    elif tied == 0:
        _take_top(key, j, k, out_row, BLOCK)
    o = tl.arange(0, BLOCK_K)
    tl.store(out_row + o, tl.full([BLOCK_K], -1, tl.int32), mask=(o >= k) & (o < num_select))


# --------------------------------------------------------------------------------------------- kernels
@triton.jit
def _score_pages_kernel(
    q, page_min, page_max, block_table, seq_lens, scores,
    max_pages, num_sink, num_recent,
    s_qb, s_qh, s_qd, s_pp, s_ph, s_pd, s_btb, s_btn, s_sb, s_sh,
    # fused top-k (FUSED): per-row counters, outputs, scratch
    row_counters, page_ids, num_valid, cand, num_select, s_ob, s_oh,
    HKV: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE_SIZE: tl.constexpr,
    PAGES_PER_BLOCK: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    FUSED: tl.constexpr, BLOCK: tl.constexpr, BLOCK_K: tl.constexpr, GS: tl.constexpr, CAP: tl.constexpr,
    GPASSES: tl.constexpr, FILTER: tl.constexpr, FP8_BITS: tl.constexpr, GROUP_MAX: tl.constexpr,
):
    bh = tl.program_id(0)
    tile = tl.program_id(1)
    b = bh // HKV
    h = bh % HKV
    n_pages = tl.minimum((tl.load(seq_lens + b) + PAGE_SIZE - 1) // PAGE_SIZE, max_pages)
    j = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    s_row = scores + b * s_sb + h * s_sh
    if tile * BLOCK_N >= n_pages:
        # Past the request's pages (the table is max_model_len wide): no loads, just the -inf row tail.
        tl.store(s_row + j, tl.full([BLOCK_N], float("-inf"), tl.float32), mask=j < max_pages)
    else:
        valid = j < n_pages
        d = tl.arange(0, BLOCK_D)
        d_mask = d < HEAD_DIM
        # Invalid pages are masked out of every load: block_table past the request's blocks may hold anything.
        blk = tl.load(block_table + b * s_btb + (j // PAGES_PER_BLOCK) * s_btn, mask=valid, other=0).to(tl.int64)
        gp = blk * PAGES_PER_BLOCK + j % PAGES_PER_BLOCK
        offs = gp[:, None] * s_pp + h * s_ph + d[None, :] * s_pd
        m = valid[:, None] & d_mask[None, :]
        if FP8_BITS:  # interpreter: uint8 views; its fp8 cast reads NaN (0x7F/0xFF) as +-480, the GPU's as NaN
            mn_b = tl.load(page_min + offs, mask=m, other=0)
            mx_b = tl.load(page_max + offs, mask=m, other=0)
            mn = tl.where((mn_b & 0x7F) == 0x7F, float("nan"), mn_b.to(tl.float8e4nv, bitcast=True).to(tl.float32))
            mx = tl.where((mx_b & 0x7F) == 0x7F, float("nan"), mx_b.to(tl.float8e4nv, bitcast=True).to(tl.float32))
        else:
            mn = tl.load(page_min + offs, mask=m, other=0.0).to(tl.float32)
            mx = tl.load(page_max + offs, mask=m, other=0.0).to(tl.float32)
        if GROUP_MAX:  # the largest query head's bound: a page one head of the group needs is kept
            s = tl.full([BLOCK_N], float("-inf"), tl.float32)
            for gi in tl.static_range(GROUP):
                qh = tl.load(q + b * s_qb + (h * GROUP + gi) * s_qh + d * s_qd, mask=d_mask, other=0.0)
                qh = qh.to(tl.float32)
                sg = tl.sum(mx * tl.maximum(qh, 0.0)[None, :] + mn * tl.minimum(qh, 0.0)[None, :], axis=1)
                s = tl.where((sg != sg) | (s != s), float("nan"), tl.maximum(s, sg))
        else:  # the group's bounds summed: one dot product per page
            g = tl.arange(0, BLOCK_G)
            qg = tl.load(q + b * s_qb + (h * GROUP + g)[:, None] * s_qh + d[None, :] * s_qd,
                         mask=(g < GROUP)[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
            q_pos = tl.sum(tl.maximum(qg, 0.0), axis=0)  # weights of max_i
            q_neg = tl.sum(tl.minimum(qg, 0.0), axis=0)  # weights of min_i
            s = tl.sum(mx * q_pos[None, :] + mn * q_neg[None, :], axis=1)
        s = tl.where(s != s, float("inf"), s)  # NaN: an fp8 summary out of range, no finite bound
        s = tl.where(valid, s, float("-inf"))
        forced = valid & ((j < num_sink) | (j >= n_pages - num_recent))
        s = tl.where(forced, float("inf"), s)
        tl.store(s_row + j, s, mask=j < max_pages)
    if FUSED:
        # Last program of this row to finish selects its top k. The barrier orders every thread's score
        # stores before the (single-thread, acq_rel) counter increment.
        tl.debug_barrier()
        done = tl.atomic_add(row_counters + bh, 1, sem="acq_rel", scope="gpu")
        if done == tl.num_programs(1) - 1:
            tl.store(row_counters + bh, 0)  # ready for the next launch
            _topk_row(s_row, n_pages, num_select, page_ids + b * s_ob + h * s_oh, cand + bh * (2 * CAP),
                      BLOCK, BLOCK_K, GS, CAP, GPASSES, FILTER)
            if h == 0:
                tl.store(num_valid + b, tl.minimum(n_pages, num_select).to(tl.int32))


@triton.jit
def _topk_pages_kernel(
    scores, seq_lens, page_ids, num_valid, cand, max_pages, num_select,
    s_sb, s_sh, s_ob, s_oh,
    HKV: tl.constexpr, PAGE_SIZE: tl.constexpr, BLOCK: tl.constexpr, BLOCK_K: tl.constexpr,
    GS: tl.constexpr, CAP: tl.constexpr, GPASSES: tl.constexpr, FILTER: tl.constexpr,
    CAND_STRIDE: tl.constexpr, NARROW: tl.constexpr,
    BLOCK_1: tl.constexpr, GS_1: tl.constexpr, CAP_1: tl.constexpr, FILTER_1: tl.constexpr,
    BLOCK_2: tl.constexpr, GS_2: tl.constexpr, CAP_2: tl.constexpr, FILTER_2: tl.constexpr,
):
    bh = tl.program_id(0)
    b = bh // HKV
    h = bh % HKV
    n_pages = tl.minimum((tl.load(seq_lens + b) + PAGE_SIZE - 1) // PAGE_SIZE, max_pages)
    s_row = scores + b * s_sb + h * s_sh
    out_row = page_ids + b * s_ob + h * s_oh
    cand_row = cand + bh * CAND_STRIDE
    # The row width is the block table's (max_model_len), fixed for CUDA graphs, but a request's live pages
    # may be far fewer: a runtime branch picks a narrower compiled variant so the select's work follows
    # the live length (all variants are compiled into this one kernel; no host sync, no recapture).
    if NARROW >= 2:
        if n_pages <= BLOCK_2:
            _topk_row(s_row, n_pages, num_select, out_row, cand_row, BLOCK_2, BLOCK_K, GS_2, CAP_2, GPASSES,
                      FILTER_2)
        elif n_pages <= BLOCK_1:
            _topk_row(s_row, n_pages, num_select, out_row, cand_row, BLOCK_1, BLOCK_K, GS_1, CAP_1, GPASSES,
                      FILTER_1)
        else:
            _topk_row(s_row, n_pages, num_select, out_row, cand_row, BLOCK, BLOCK_K, GS, CAP, GPASSES, FILTER)
    elif NARROW == 1:
        if n_pages <= BLOCK_1:
            _topk_row(s_row, n_pages, num_select, out_row, cand_row, BLOCK_1, BLOCK_K, GS_1, CAP_1, GPASSES,
                      FILTER_1)
        else:
            _topk_row(s_row, n_pages, num_select, out_row, cand_row, BLOCK, BLOCK_K, GS, CAP, GPASSES, FILTER)
    else:
        _topk_row(s_row, n_pages, num_select, out_row, cand_row, BLOCK, BLOCK_K, GS, CAP, GPASSES, FILTER)
    if h == 0:
        tl.store(num_valid + b, tl.minimum(n_pages, num_select).to(tl.int32))


# --------------------------------------------------------------------------------------------- host side
def max_logical_pages(block_table: torch.Tensor, page_size: int, block_size: int) -> int:
    """Pages a request can have with this block table: the fixed width of the score tensor."""
    return block_table.shape[1] * block_size // page_size


def _topk_config(max_pages: int, num_select: int, candidate_cap: int | None, num_warps: int | None) -> dict:
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
    # falls back to the whole-row select, ~3x slower (measured in the engine before this bound existed).
    k_pow2 = triton.next_power_of_2(num_select)
    n_groups = max(4 * k_pow2, threads, triton.next_power_of_2(-(-2 * block * k_pow2 // max(cap, 1))))
    n_groups = min(block // 2, n_groups)
    filt = 0 < cap < block and num_select <= n_groups and n_groups >= threads
    if not filt:
        cap, n_groups = 16, block  # unused scratch
    return dict(BLOCK=block, BLOCK_K=triton.next_power_of_2(num_select), GS=block // n_groups, CAP=cap,
                GPASSES=GROUP_PASSES, FILTER=filt, num_warps=num_warps)


NARROW_LEVELS = 2  # narrower top-k variants (each half the previous width) compiled into the kernel


def _narrow_topk_config(max_pages: int, num_select: int, candidate_cap: int | None, num_warps: int | None,
                        levels: int | None = None) -> dict:
    """``_topk_config`` of the full row plus up to ``levels`` half-width variants (``BLOCK_1``, ``BLOCK_2``)
    picked at run time by the live page count. A variant must keep one element per thread in every
    histogram (``>= 32 * num_warps``) and hold ``num_select`` winners."""
    cfg = _topk_config(max_pages, num_select, candidate_cap, num_warps)
    levels = NARROW_LEVELS if levels is None else levels
    threads = 32 * cfg["num_warps"]
    out = dict(cfg, CAND_STRIDE=2 * cfg["CAP"], NARROW=0)
    for lvl in (1, 2):
        block = cfg["BLOCK"] >> lvl
        sub = None
        if lvl <= levels and block >= max(threads, 256, triton.next_power_of_2(num_select)):
            sub = _topk_config(block, num_select, candidate_cap, cfg["num_warps"])
            if sub["num_warps"] != cfg["num_warps"]:
                sub = None
        if sub is None:
            sub = dict(BLOCK=cfg["BLOCK"], GS=cfg["GS"], CAP=cfg["CAP"], FILTER=cfg["FILTER"])  # unused
        else:
            out["NARROW"] = lvl
            out["CAND_STRIDE"] = max(out["CAND_STRIDE"], 2 * sub["CAP"])
        out.update({f"BLOCK_{lvl}": sub["BLOCK"], f"GS_{lvl}": sub["GS"], f"CAP_{lvl}": sub["CAP"],
                    f"FILTER_{lvl}": sub["FILTER"]})
    return out


def _score_config(d: int, block_n: int | None) -> tuple[int, int]:
    block_n = block_n or (64 if d <= 128 else 32)
    return block_n, (8 if block_n * d >= 8192 else 4)  # two [BLOCK_N, D] fp32 tiles: keep them in registers


def _launch_score(q, page_min, page_max, block_table, seq_lens, page_size, block_size, num_sink_pages,
                  num_recent_pages, out, block_n, num_warps=None, fused=None, group_max=False):
    """Score (and with ``fused = (page_ids, num_valid, num_select, topk_cfg)`` select) in one launch."""
    bsz, hq, d = q.shape
    hkv = page_min.shape[1]
    max_pages = out.shape[2]
    block_n, warps = _score_config(d, block_n)
    fp8_bits = page_min.dtype == torch.float8_e4m3fn and not page_min.is_cuda
    if fp8_bits:
        page_min, page_max = page_min.view(torch.uint8), page_max.view(torch.uint8)
    grid = (bsz * hkv, triton.cdiv(max_pages, block_n))
    if fused is None:
        page_ids = num_valid = cand = ctr = out  # unused
        num_select, s_ob, s_oh = 0, 0, 0
        cfg = dict(BLOCK=16, BLOCK_K=16, GS=1, CAP=16, GPASSES=1, FILTER=False)
    else:
        page_ids, num_valid, num_select, cfg = fused
        cfg = dict(cfg)
        warps = cfg.pop("num_warps")
        ctr = counters(q.device, bsz * hkv)
        cand = torch.empty(bsz * hkv * 2 * cfg["CAP"], dtype=torch.int32, device=q.device)
        s_ob, s_oh = page_ids.stride(0), page_ids.stride(1)
    _score_pages_kernel[grid](
        q, page_min, page_max, block_table, seq_lens, out,
        max_pages, num_sink_pages, num_recent_pages,
        *q.stride(), *page_min.stride(), *block_table.stride(), out.stride(0), out.stride(1),
        ctr, page_ids, num_valid, cand, num_select, s_ob, s_oh,
        HKV=hkv, GROUP=hq // hkv, HEAD_DIM=d, PAGE_SIZE=page_size, PAGES_PER_BLOCK=block_size // page_size,
        BLOCK_G=triton.next_power_of_2(hq // hkv), BLOCK_D=triton.next_power_of_2(d), BLOCK_N=block_n,
        FUSED=fused is not None, **cfg, FP8_BITS=fp8_bits, GROUP_MAX=group_max, num_warps=num_warps or warps,
    )


def score_pages(q: torch.Tensor, page_min: torch.Tensor, page_max: torch.Tensor, block_table: torch.Tensor,
                seq_lens: torch.Tensor, page_size: int, block_size: int, num_sink_pages: int = 0,
                num_recent_pages: int = 0, out: torch.Tensor | None = None,
                block_n: int | None = None, group_max: bool = False) -> torch.Tensor:
    """Quest upper bound of ``q . k`` for every logical page of every (request, kv head).

    Args:
        q: ``[B, Hq, D]`` fp16/bf16/fp32 decode queries; query heads ``h*G .. h*G+G-1`` share kv head ``h``.
        page_min, page_max: ``[num_pages_total, Hkv, D]`` page summaries (``update_page_summary``), any float
            dtype including ``torch.float8_e4m3fn``.
        block_table: ``[B, max_blocks]`` int32 physical block ids; seq_lens: ``[B]`` int32.
        page_size, block_size: tokens per page / per cache block (``page_size`` divides ``block_size``).
        num_sink_pages, num_recent_pages: first / last valid pages forced to ``+inf``.
        out: optional ``[B, Hkv, max_pages]`` fp32 to write into.
        block_n: pages per program (tuning; default 64 for D <= 128).
        group_max: the largest query head's bound instead of the group's sum (``score_pages_ref``).

    Returns:
        ``[B, Hkv, max_blocks * block_size // page_size]`` fp32; ``-inf`` for pages at or past
        ``ceil(seq_len / page_size)``; ``+inf`` for forced pages and for fp8 summaries out of range.
    """
    bsz, hq, d = q.shape
    hkv = page_min.shape[1]
    assert hq % hkv == 0 and block_size % page_size == 0
    max_pages = max_logical_pages(block_table, page_size, block_size)
    if out is None:
        out = torch.empty(bsz, hkv, max_pages, dtype=torch.float32, device=q.device)
    assert out.stride(2) == 1
    if bsz == 0 or max_pages == 0:
        return out
    _launch_score(q, page_min, page_max, block_table, seq_lens, page_size, block_size, num_sink_pages,
                  num_recent_pages, out, block_n, group_max=group_max)
    return out


def _resolve_impl(impl: str, max_pages: int) -> str:
    if impl == "auto":
        return "triton" if max_pages <= _MAX_TRITON_TOPK else "torch"
    assert impl in ("triton", "torch"), impl
    return impl


def topk_pages(scores: torch.Tensor, seq_lens: torch.Tensor, page_size: int, num_select: int,
               impl: str = "auto", candidate_cap: int | None = None, num_warps: int | None = None,
               narrow_levels: int | None = None, segment_pages: int | None = None,
               split_max_rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Top ``num_select`` pages of each ``[B, Hkv, max_pages]`` score row, ascending, ``-1`` padded.

    ``impl``: ``"triton"`` (radix select, rows up to ``_MAX_TRITON_TOPK`` pages), ``"torch"``
    (``torch.topk`` + sort), or ``"auto"`` (triton when it fits). Equal scores go to the lower page in
    the triton path; the torch path breaks ties arbitrarily. ``candidate_cap``: candidate slots of the
    group-max filter (default ``CANDIDATE_CAP``; ``0``: select over whole rows). ``num_warps``: tuning.
    ``narrow_levels``: half-width variants chosen per row by its live length (default ``NARROW_LEVELS``).
    ``segment_pages``: rows longer than two segments are split over several programs per row
    (``topk_split.py``, same selection; default ``topk_split.SEGMENT_PAGES``, ``0``: never), with the default
    size only when there are fewer than ``split_max_rows`` rows (default ``topk_split.SPLIT_MAX_ROWS``).
    """
    bsz, hkv, max_pages = scores.shape
    dev = scores.device
    impl = _resolve_impl(impl, max_pages)
    if impl == "triton" and bsz > 0:
        from longseq.kernels.sparse_decode.topk_split import split_applies, topk_pages_split

        if split_applies(max_pages, num_select, segment_pages, bsz * hkv, split_max_rows):
            return topk_pages_split(scores, seq_lens, page_size, num_select, segment_pages, candidate_cap,
                                    num_warps)
        assert max_pages <= _MAX_TRITON_TOPK and scores.stride(2) == 1
        page_ids = torch.empty(bsz, hkv, num_select, dtype=torch.int32, device=dev)
        num_valid = torch.empty(bsz, dtype=torch.int32, device=dev)
        cfg = _narrow_topk_config(max_pages, num_select, candidate_cap, num_warps, narrow_levels)
        cand = torch.empty(bsz * hkv * cfg["CAND_STRIDE"], dtype=torch.int32, device=dev)
        _topk_pages_kernel[(bsz * hkv,)](
            scores, seq_lens, page_ids, num_valid, cand, max_pages, num_select,
            scores.stride(0), scores.stride(1), page_ids.stride(0), page_ids.stride(1),
            HKV=hkv, PAGE_SIZE=page_size, **cfg,
        )
        return page_ids, num_valid
    from longseq.kernels.sparse_decode.torch_ops import topk_pages_torch

    return topk_pages_torch(scores, seq_lens, page_size, num_select)


def select_topk_pages(q: torch.Tensor, page_min: torch.Tensor, page_max: torch.Tensor,
                      block_table: torch.Tensor, seq_lens: torch.Tensor, page_size: int, block_size: int,
                      num_select: int, num_sink_pages: int = 0, num_recent_pages: int = 0,
                      topk_impl: str = "auto", fused: bool | None = None, candidate_cap: int | None = None,
                      score_block_n: int | None = None, topk_num_warps: int | None = None,
                      segment_pages: int | None = None, split_max_rows: int | None = None,
                      group_max: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Quest page selection: score every page (``score_pages``) and keep the best ``num_select``.

    Args: as ``score_pages``; ``num_select``: pages kept per (request, kv head), at least
        ``num_sink_pages + num_recent_pages`` so that every forced page fits. ``fused``: score and select in
        one launch (default ``FUSED_DEFAULT``; triton top-k only). ``candidate_cap``, ``score_block_n``,
        ``topk_num_warps``, ``segment_pages``, ``split_max_rows``: tuning (``topk_pages``, ``score_pages``).
        ``group_max``: score by the largest query head's bound (``score_pages``).

    Returns:
        page_ids: ``[B, Hkv, num_select]`` int32 logical pages, ascending, ``-1`` padded past
            ``num_valid``; every valid page when the request has at most ``num_select`` pages.
        num_valid: ``[B]`` int32 ``min(num_select, ceil(seq_len / page_size))``.
    """
    assert num_select >= 1 and num_sink_pages + num_recent_pages <= num_select, \
        "num_select must cover the sink and recent pages"
    bsz, hq, _ = q.shape
    hkv = page_min.shape[1]
    max_pages = max_logical_pages(block_table, page_size, block_size)
    impl = _resolve_impl(topk_impl, max_pages)
    fused = FUSED_DEFAULT if fused is None else fused
    if fused and impl == "triton" and bsz > 0 and max_pages > 0:
        scores = torch.empty(bsz, hkv, max_pages, dtype=torch.float32, device=q.device)
        page_ids = torch.empty(bsz, hkv, num_select, dtype=torch.int32, device=q.device)
        num_valid = torch.empty(bsz, dtype=torch.int32, device=q.device)
        cfg = _topk_config(max_pages, num_select, candidate_cap, topk_num_warps)
        _launch_score(q, page_min, page_max, block_table, seq_lens, page_size, block_size, num_sink_pages,
                      num_recent_pages, scores, score_block_n, fused=(page_ids, num_valid, num_select, cfg),
                      group_max=group_max)
        return page_ids, num_valid
    scores = score_pages(q, page_min, page_max, block_table, seq_lens, page_size, block_size,
                         num_sink_pages, num_recent_pages, block_n=score_block_n, group_max=group_max)
    return topk_pages(scores, seq_lens, page_size, num_select, impl=impl, candidate_cap=candidate_cap,
                      num_warps=topk_num_warps, segment_pages=segment_pages, split_max_rows=split_max_rows)
