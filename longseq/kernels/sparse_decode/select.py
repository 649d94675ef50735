"""Quest page scoring and top-k page selection for one decode query per request.

Fixed shapes, no host synchronization (CUDA-graph safe). By default ONE launch does both steps:

1. Scoring, grid ``(B * Hkv, page tiles)``: a program reads ``BLOCK_N`` pages' min/max of one kv head once
   and writes the fp32 upper bound of ``q . k`` for the whole GQA group. Memory-bound: at 128K tokens, P=16,
   Hkv=8, D=128 the summaries are 16.8 MB in fp8 (33.5 MB in bf16), the bulk of the sparse path's bytes.
   Programs of one row are adjacent in launch order, so the kv heads of a page are read together.
2. Top-k, by the last scoring program of each (request, kv head) row to finish (an atomic counter per row,
   reset by that program; ``fused=False`` runs it as a second kernel instead): the exact radix select of
   ``radix_topk.py`` (``topk_row``). The row width is the block table's (``max_model_len``); the top-k picks a
   half- or quarter-width compiled variant at run time when the request's live pages fit, and scoring skips
   dead tiles. Winners are compacted in ascending page order.
   Rows longer than ``_MAX_TRITON_TOPK`` pages go through the segmented select of ``topk_split.py`` (SGLang's
   table is ``context + 4`` slots wide: 16,386 pages of 8 tokens at 128K), or ``torch.topk`` + sort when even
   its merge would not fit.

The GQA reduction is linear: ``max(q min, q max) = q max`` if ``q >= 0`` else ``q min``, so
``sum_g sum_i max(q_gi min_i, q_gi max_i) = sum_i (max_i * sum_g relu(q_gi) + min_i * sum_g min(q_gi, 0))``:
one ``[D]`` pair of vectors per kv head instead of a ``[G, pages, D]`` tile.

fp8 summaries (``page_summary``) hold NaN where a key was out of fp8 range; the NaN propagates into the
page's sum, which is then scored ``+inf`` (the page is always kept).

The fused launch and the fused split merge of ``decode.py`` use per-row counters (``workspace.counters``) cached
per device, which every launch leaves zeroed: launches that share a device must not run concurrently on
different streams.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from longseq.kernels.sparse_decode.library_topk import topk_pages_flashinfer
from longseq.kernels.sparse_decode.page_summary import load_summary_f32
from longseq.kernels.sparse_decode.radix_topk import MAX_ROW, topk_config, topk_row
from longseq.kernels.sparse_decode.topk_split import split_applies, split_fits, topk_pages_split
from longseq.kernels.sparse_decode.workspace import counters

_MAX_TRITON_TOPK = MAX_ROW  # pages per row held in one program's registers

# Fused score + top-k launch: off. Separate launches were as fast or faster everywhere (the fused kernel's score
# programs carry the top-k's 16-warp register budget): docs/benchmarks/sparse.md.
FUSED_DEFAULT = False


# --------------------------------------------------------------------------------------------- kernels
@triton.jit
def _score_pages_kernel(
    q, page_min, page_max, block_table, seq_lens, scores, refresh,
    max_pages, num_sink, num_recent,
    s_qb, s_qh, s_qd, s_pp, s_ph, s_pd, s_btb, s_btn, s_sb, s_sh,
    # fused top-k (FUSED): per-row counters, outputs, scratch
    row_counters, page_ids, num_valid, cand, num_select, s_ob, s_oh,
    HKV: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE_SIZE: tl.constexpr,
    PAGES_PER_BLOCK: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    FUSED: tl.constexpr, BLOCK: tl.constexpr, BLOCK_K: tl.constexpr, GS: tl.constexpr, CAP: tl.constexpr,
    GPASSES: tl.constexpr, FILTER: tl.constexpr, FP8_BITS: tl.constexpr, GROUP_MAX: tl.constexpr,
    REUSE: tl.constexpr,
):
    bh = tl.program_id(0)
    b = bh // HKV
    if REUSE:  # a row that reuses its last selection (reuse.py) is not scored
        go = tl.load(refresh + b) != 0
    else:
        go = b >= 0
    if go:
        tile = tl.program_id(1)
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
            mn = load_summary_f32(page_min, offs, m, FP8_BITS)
            mx = load_summary_f32(page_max, offs, m, FP8_BITS)
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
                topk_row(s_row, n_pages, num_select, page_ids + b * s_ob + h * s_oh, cand + bh * (2 * CAP),
                         BLOCK, BLOCK_K, GS, CAP, GPASSES, FILTER)
                if h == 0:
                    tl.store(num_valid + b, tl.minimum(n_pages, num_select).to(tl.int32))


@triton.jit
def _topk_pages_kernel(
    scores, seq_lens, page_ids, num_valid, cand, refresh, max_pages, num_select,
    s_sb, s_sh, s_ob, s_oh,
    HKV: tl.constexpr, PAGE_SIZE: tl.constexpr, BLOCK: tl.constexpr, BLOCK_K: tl.constexpr,
    GS: tl.constexpr, CAP: tl.constexpr, GPASSES: tl.constexpr, FILTER: tl.constexpr,
    CAND_STRIDE: tl.constexpr, NARROW: tl.constexpr,
    BLOCK_1: tl.constexpr, GS_1: tl.constexpr, CAP_1: tl.constexpr, FILTER_1: tl.constexpr,
    BLOCK_2: tl.constexpr, GS_2: tl.constexpr, CAP_2: tl.constexpr, FILTER_2: tl.constexpr,
    REUSE: tl.constexpr,
):
    bh = tl.program_id(0)
    b = bh // HKV
    h = bh % HKV
    n_pages = tl.minimum((tl.load(seq_lens + b) + PAGE_SIZE - 1) // PAGE_SIZE, max_pages)
    # A row that reuses its last selection (reuse.py) keeps its page_ids: nothing to rank.
    if REUSE:
        go = tl.load(refresh + b) != 0
    else:
        go = n_pages >= 0
    if go:
        s_row = scores + b * s_sb + h * s_sh
        out_row = page_ids + b * s_ob + h * s_oh
        cand_row = cand + bh * CAND_STRIDE
        # The row width is the block table's (max_model_len), fixed for CUDA graphs, but a request's live pages
        # may be far fewer: a runtime branch picks a narrower compiled variant so the select's work follows
        # the live length (all variants are compiled into this one kernel; no host sync, no recapture).
        if NARROW >= 2:
            if n_pages <= BLOCK_2:
                topk_row(s_row, n_pages, num_select, out_row, cand_row, BLOCK_2, BLOCK_K, GS_2, CAP_2, GPASSES,
                         FILTER_2)
            elif n_pages <= BLOCK_1:
                topk_row(s_row, n_pages, num_select, out_row, cand_row, BLOCK_1, BLOCK_K, GS_1, CAP_1, GPASSES,
                         FILTER_1)
            else:
                topk_row(s_row, n_pages, num_select, out_row, cand_row, BLOCK, BLOCK_K, GS, CAP, GPASSES, FILTER)
        elif NARROW == 1:
            if n_pages <= BLOCK_1:
                topk_row(s_row, n_pages, num_select, out_row, cand_row, BLOCK_1, BLOCK_K, GS_1, CAP_1, GPASSES,
                         FILTER_1)
            else:
                topk_row(s_row, n_pages, num_select, out_row, cand_row, BLOCK, BLOCK_K, GS, CAP, GPASSES, FILTER)
        else:
            topk_row(s_row, n_pages, num_select, out_row, cand_row, BLOCK, BLOCK_K, GS, CAP, GPASSES, FILTER)
        if h == 0:
            tl.store(num_valid + b, tl.minimum(n_pages, num_select).to(tl.int32))


# --------------------------------------------------------------------------------------------- host side
def max_logical_pages(block_table: torch.Tensor, page_size: int, block_size: int) -> int:
    """Pages a request can have with this block table: the fixed width of the score tensor."""
    return block_table.shape[1] * block_size // page_size


NARROW_LEVELS = 2  # narrower top-k variants (each half the previous width) compiled into the kernel


def _narrow_topk_config(max_pages: int, num_select: int, candidate_cap: int | None, num_warps: int | None,
                        levels: int | None = None) -> dict:
    """``topk_config`` of the full row plus up to ``levels`` half-width variants (``BLOCK_1``, ``BLOCK_2``)
    picked at run time by the live page count. A variant must keep one element per thread in every
    histogram (``>= 32 * num_warps``) and hold ``num_select`` winners."""
    cfg = topk_config(max_pages, num_select, candidate_cap, num_warps)
    levels = NARROW_LEVELS if levels is None else levels
    threads = 32 * cfg["num_warps"]
    out = dict(cfg, CAND_STRIDE=2 * cfg["CAP"], NARROW=0)
    for lvl in (1, 2):
        block = cfg["BLOCK"] >> lvl
        sub = None
        if lvl <= levels and block >= max(threads, 256, triton.next_power_of_2(num_select)):
            sub = topk_config(block, num_select, candidate_cap, cfg["num_warps"])
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
                  num_recent_pages, out, block_n, num_warps=None, fused=None, group_max=False, refresh=None):
    """Score (and with ``fused = (page_ids, num_valid, num_select, topk_cfg)`` select) in one launch; with
    ``refresh`` (``[B]`` int32) only the rows where it is nonzero."""
    assert refresh is None or fused is None, "selection reuse runs the separate score and top-k launches"
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
        q, page_min, page_max, block_table, seq_lens, out, out if refresh is None else refresh,
        max_pages, num_sink_pages, num_recent_pages,
        *q.stride(), *page_min.stride(), *block_table.stride(), out.stride(0), out.stride(1),
        ctr, page_ids, num_valid, cand, num_select, s_ob, s_oh,
        HKV=hkv, GROUP=hq // hkv, HEAD_DIM=d, PAGE_SIZE=page_size, PAGES_PER_BLOCK=block_size // page_size,
        BLOCK_G=triton.next_power_of_2(hq // hkv), BLOCK_D=triton.next_power_of_2(d), BLOCK_N=block_n,
        FUSED=fused is not None, **cfg, FP8_BITS=fp8_bits, GROUP_MAX=group_max, REUSE=refresh is not None,
        num_warps=num_warps or warps,
    )


def score_pages(q: torch.Tensor, page_min: torch.Tensor, page_max: torch.Tensor, block_table: torch.Tensor,
                seq_lens: torch.Tensor, page_size: int, block_size: int, num_sink_pages: int = 0,
                num_recent_pages: int = 0, out: torch.Tensor | None = None,
                block_n: int | None = None, group_max: bool = False,
                refresh: torch.Tensor | None = None) -> torch.Tensor:
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
        refresh: optional ``[B]`` int32; rows where it is 0 are not scored (their scores stay as they were).

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
                  num_recent_pages, out, block_n, group_max=group_max, refresh=refresh)
    return out


def _resolve_impl(impl: str, max_pages: int, num_select: int, segment_pages: int | None = None) -> str:
    if impl == "auto":
        if max_pages <= _MAX_TRITON_TOPK or split_fits(max_pages, num_select, segment_pages):
            return "triton"
        return "torch"
    assert impl in ("triton", "torch", "flashinfer"), impl
    return impl


def topk_pages(scores: torch.Tensor, seq_lens: torch.Tensor, page_size: int, num_select: int,
               impl: str = "auto", candidate_cap: int | None = None, num_warps: int | None = None,
               narrow_levels: int | None = None, segment_pages: int | None = None,
               split_max_rows: int | None = None, refresh: torch.Tensor | None = None,
               page_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Top ``num_select`` pages of each ``[B, Hkv, max_pages]`` score row, ascending, ``-1`` padded.

    ``impl``: ``"triton"`` (radix select; rows longer than ``_MAX_TRITON_TOPK`` pages always split over segments,
    as far as ``topk_split.split_fits``), ``"torch"``
    (``torch.topk`` + sort), ``"flashinfer"`` (FlashInfer's radix ``top_k``, ``library_topk.py``: the pages of a
    row in ANY order, ``-1`` anywhere; pages past the live ones must score ``-inf``, as for ``"torch"``), or
    ``"auto"`` (triton when it fits, else torch). Equal scores go to the lower page in the triton path; the
    torch and flashinfer paths break ties arbitrarily. ``candidate_cap``: candidate slots of the
    group-max filter (default ``CANDIDATE_CAP``; ``0``: select over whole rows). ``num_warps``: tuning.
    ``narrow_levels``: half-width variants chosen per row by its live length (default ``NARROW_LEVELS``).
    ``segment_pages``: rows longer than two segments are split over several programs per row
    (``topk_split.py``, same selection; default ``topk_split.SEGMENT_PAGES``, ``0``: never), with the default
    size only when there are fewer than ``split_max_rows`` rows (default ``topk_split.SPLIT_MAX_ROWS``).
    ``refresh`` (``[B]`` int32, needs ``page_ids``: ``[B, Hkv, num_select]`` int32, last dim contiguous): only
    rows where it is nonzero are selected; the others keep their ``page_ids`` (``num_valid`` is then unset).
    """
    assert refresh is None or page_ids is not None, "refresh needs the page_ids to keep"
    bsz, hkv, max_pages = scores.shape
    dev = scores.device
    impl = _resolve_impl(impl, max_pages, num_select, segment_pages)
    if impl == "flashinfer":
        return topk_pages_flashinfer(scores, seq_lens, page_size, num_select, refresh=refresh, page_ids=page_ids)
    if impl == "triton" and bsz > 0:
        # Rows too long for one program are always split (at any row count).
        if max_pages > _MAX_TRITON_TOPK and not split_fits(max_pages, num_select, segment_pages):
            raise ValueError(f"rows of {max_pages} pages with num_select={num_select} fit neither one program nor "
                             "the segmented select: use impl='torch' (or 'auto')")
        if max_pages > _MAX_TRITON_TOPK or split_applies(max_pages, num_select, segment_pages, bsz * hkv,
                                                         split_max_rows):
            return topk_pages_split(scores, seq_lens, page_size, num_select, segment_pages, candidate_cap,
                                    num_warps, refresh=refresh, page_ids=page_ids)
        assert max_pages <= _MAX_TRITON_TOPK and scores.stride(2) == 1
        if page_ids is None:
            page_ids = torch.empty(bsz, hkv, num_select, dtype=torch.int32, device=dev)
        assert page_ids.shape == (bsz, hkv, num_select) and page_ids.stride(2) == 1
        num_valid = torch.empty(bsz, dtype=torch.int32, device=dev)
        cfg = _narrow_topk_config(max_pages, num_select, candidate_cap, num_warps, narrow_levels)
        cand = torch.empty(bsz * hkv * cfg["CAND_STRIDE"], dtype=torch.int32, device=dev)
        _topk_pages_kernel[(bsz * hkv,)](
            scores, seq_lens, page_ids, num_valid, cand, num_valid if refresh is None else refresh, max_pages,
            num_select, scores.stride(0), scores.stride(1), page_ids.stride(0), page_ids.stride(1),
            HKV=hkv, PAGE_SIZE=page_size, **cfg, REUSE=refresh is not None,
        )
        return page_ids, num_valid
    from longseq.kernels.sparse_decode.torch_ops import topk_pages_torch

    ids, num_valid = topk_pages_torch(scores, seq_lens, page_size, num_select)
    if refresh is None:
        return ids, num_valid
    page_ids.copy_(torch.where(refresh.bool()[:, None, None], ids, page_ids))
    return page_ids, num_valid


def select_topk_pages(q: torch.Tensor, page_min: torch.Tensor, page_max: torch.Tensor,
                      block_table: torch.Tensor, seq_lens: torch.Tensor, page_size: int, block_size: int,
                      num_select: int, num_sink_pages: int = 0, num_recent_pages: int = 0,
                      topk_impl: str = "auto", fused: bool | None = None, candidate_cap: int | None = None,
                      score_block_n: int | None = None, topk_num_warps: int | None = None,
                      segment_pages: int | None = None, split_max_rows: int | None = None,
                      group_max: bool = False, refresh: torch.Tensor | None = None,
                      page_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Quest page selection: score every page (``score_pages``) and keep the best ``num_select``.

    Args: as ``score_pages``; ``num_select``: pages kept per (request, kv head), at least
        ``num_sink_pages + num_recent_pages`` so that every forced page fits. ``fused``: score and select in
        one launch (default ``FUSED_DEFAULT``; triton top-k only). ``candidate_cap``, ``score_block_n``,
        ``topk_num_warps``, ``segment_pages``, ``split_max_rows``: tuning (``topk_pages``, ``score_pages``).
        ``group_max``: score by the largest query head's bound (``score_pages``). ``topk_impl``: ``topk_pages``'s
        ``impl`` (``"flashinfer"``: the pages of a row in any order, ``-1`` anywhere in it).
        ``refresh``, ``page_ids``: select only the rows where ``refresh`` (``[B]`` int32) is nonzero, into
        ``page_ids``; the other rows keep theirs (selection reuse, ``reuse.py``; not with ``fused``).

    Returns:
        page_ids: ``[B, Hkv, num_select]`` int32 logical pages, ascending, ``-1`` padded past
            ``num_valid`` (any order with ``topk_impl="flashinfer"``); every valid page when the request has at
            most ``num_select`` pages.
        num_valid: ``[B]`` int32 ``min(num_select, ceil(seq_len / page_size))``.
    """
    assert num_select >= 1 and num_sink_pages + num_recent_pages <= num_select, \
        "num_select must cover the sink and recent pages"
    bsz, hq, _ = q.shape
    hkv = page_min.shape[1]
    max_pages = max_logical_pages(block_table, page_size, block_size)
    impl = _resolve_impl(topk_impl, max_pages, num_select, segment_pages)
    fused = (FUSED_DEFAULT if fused is None else fused) and refresh is None
    if fused and impl == "triton" and 0 < max_pages <= _MAX_TRITON_TOPK and bsz > 0:
        scores = torch.empty(bsz, hkv, max_pages, dtype=torch.float32, device=q.device)
        page_ids = torch.empty(bsz, hkv, num_select, dtype=torch.int32, device=q.device)
        num_valid = torch.empty(bsz, dtype=torch.int32, device=q.device)
        cfg = topk_config(max_pages, num_select, candidate_cap, topk_num_warps)
        _launch_score(q, page_min, page_max, block_table, seq_lens, page_size, block_size, num_sink_pages,
                      num_recent_pages, scores, score_block_n, fused=(page_ids, num_valid, num_select, cfg),
                      group_max=group_max)
        return page_ids, num_valid
    scores = score_pages(q, page_min, page_max, block_table, seq_lens, page_size, block_size,
                         num_sink_pages, num_recent_pages, block_n=score_block_n, group_max=group_max,
                         refresh=refresh)
    return topk_pages(scores, seq_lens, page_size, num_select, impl=impl, candidate_cap=candidate_cap,
                      num_warps=topk_num_warps, segment_pages=segment_pages, split_max_rows=split_max_rows,
                      refresh=refresh, page_ids=page_ids)
