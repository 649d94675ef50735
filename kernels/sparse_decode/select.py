"""Quest page scoring and top-k page selection for one decode query per request.

Two launches, fixed shapes (CUDA-graph safe, no host synchronization):

1. ``_score_pages_kernel``: grid ``(page tiles, B * Hkv)``; reads each page's min/max once and writes the
   fp32 upper bound of ``q . k`` for the whole GQA group. Memory-bound: at 128K tokens, P=16, Hkv=8,
   D=128 it reads 2 x 16.8 MB of bf16 summaries, the bulk of the sparse path's bytes.
2. ``_topk_pages_kernel``: one program per (request, kv head) holds the row's scores in registers and
   finds the exact ``k``-th largest by a 4-pass radix select (8-bit digits, ``tl.histogram``), then
   compacts the winners with a prefix sum, which leaves them already in ascending page order. Rows longer
   than ``_MAX_TRITON_TOPK`` pages fall back to ``torch.topk`` + sort.

The GQA reduction is linear: ``max(q min, q max) = q max`` if ``q >= 0`` else ``q min``, so
``sum_g sum_i max(q_gi min_i, q_gi max_i) = sum_i (max_i * sum_g relu(q_gi) + min_i * sum_g min(q_gi, 0))``:
one ``[D]`` pair of vectors per kv head instead of a ``[G, pages, D]`` tile.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_MAX_TRITON_TOPK = 16384  # pages per row held in one program's registers


@triton.jit
def _score_pages_kernel(
    q, page_min, page_max, block_table, seq_lens, scores,
    max_pages, num_sink, num_recent,
    s_qb, s_qh, s_qd, s_pp, s_ph, s_pd, s_btb, s_btn, s_sb, s_sh,
    HKV: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE_SIZE: tl.constexpr,
    PAGES_PER_BLOCK: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    tile = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // HKV
    h = bh % HKV
    n_pages = (tl.load(seq_lens + b) + PAGE_SIZE - 1) // PAGE_SIZE
    j = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    valid = (j < n_pages) & (j < max_pages)
    d = tl.arange(0, BLOCK_D)
    d_mask = d < HEAD_DIM
    g = tl.arange(0, BLOCK_G)
    qg = tl.load(q + b * s_qb + (h * GROUP + g)[:, None] * s_qh + d[None, :] * s_qd,
                 mask=(g < GROUP)[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
    q_pos = tl.sum(tl.maximum(qg, 0.0), axis=0)  # weights of max_i
    q_neg = tl.sum(tl.minimum(qg, 0.0), axis=0)  # weights of min_i
    # Invalid pages are masked out of every load: block_table past the request's blocks may hold anything.
    blk = tl.load(block_table + b * s_btb + (j // PAGES_PER_BLOCK) * s_btn, mask=valid, other=0).to(tl.int64)
    gp = blk * PAGES_PER_BLOCK + j % PAGES_PER_BLOCK
    offs = gp[:, None] * s_pp + h * s_ph + d[None, :] * s_pd
    m = valid[:, None] & d_mask[None, :]
    mn = tl.load(page_min + offs, mask=m, other=0.0).to(tl.float32)
    mx = tl.load(page_max + offs, mask=m, other=0.0).to(tl.float32)
    s = tl.sum(mx * q_pos[None, :] + mn * q_neg[None, :], axis=1)
    s = tl.where(valid, s, float("-inf"))
    forced = valid & ((j < num_sink) | (j >= n_pages - num_recent))
    s = tl.where(forced, float("inf"), s)
    tl.store(scores + b * s_sb + h * s_sh + j, s, mask=j < max_pages)


@triton.jit
def _topk_pages_kernel(
    scores, seq_lens, page_ids, num_valid, max_pages, num_select,
    s_sb, s_sh, s_ob, s_oh,
    HKV: tl.constexpr, PAGE_SIZE: tl.constexpr, BLOCK: tl.constexpr, BLOCK_K: tl.constexpr,
):
    bh = tl.program_id(0)
    b = bh // HKV
    h = bh % HKV
    n_pages = tl.minimum((tl.load(seq_lens + b) + PAGE_SIZE - 1) // PAGE_SIZE, max_pages)
    k = tl.minimum(n_pages, num_select)
    j = tl.arange(0, BLOCK)
    valid = j < n_pages
    s = tl.load(scores + b * s_sb + h * s_sh + j, mask=valid, other=float("-inf"))
    # Order-preserving float -> int32 key: flipping the magnitude bits of negative floats makes signed
    # integer order equal float order (-inf lowest). Radix digits are taken in unsigned order, which for
    # the top byte means flipping its sign bit.
    bits = s.to(tl.int32, bitcast=True)
    key = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    bins = tl.arange(0, 256)
    kr = k  # how many still to take among the keys that match the prefix found so far
    prefix = tl.full((), 0, tl.int32)  # the k-th largest key's bytes found so far
    for i in tl.static_range(4):
        shift = 24 - 8 * i  # a compile-time constant (static_range)
        if i == 0:
            hist = tl.histogram(((key >> 24) & 255) ^ 128, 256)
        else:
            match = (key >> (shift + 8)) == (prefix >> (shift + 8))
            # Non-matching keys are counted in bin 0: take them back out.
            hist = tl.histogram(tl.where(match, (key >> shift) & 255, 0), 256)
            hist = hist - tl.where(bins == 0, BLOCK - tl.sum(match.to(tl.int32), axis=0), 0)
        ge = tl.sum(hist, axis=0) - tl.cumsum(hist, axis=0) + hist  # matching keys with digit >= bin
        sel_bin = tl.sum((ge >= kr).to(tl.int32), axis=0) - 1  # the largest bin still holding the k-th
        kr = kr - tl.sum(tl.where(bins > sel_bin, hist, 0), axis=0)
        if i == 0:
            prefix = (sel_bin ^ 128) << 24  # back to signed order (wraps to negative for low bins)
        else:
            prefix = prefix | (sel_bin << shift)
    # prefix is the k-th largest key; take every larger key and the first kr equal ones (lowest pages).
    eq = key == prefix
    sel = ((key > prefix) | (eq & (tl.cumsum(eq.to(tl.int32), axis=0) <= kr))) & valid
    pos = tl.cumsum(sel.to(tl.int32), axis=0) - 1  # ascending page order for free
    out = page_ids + b * s_ob + h * s_oh
    tl.store(out + pos, j.to(tl.int32), mask=sel)
    o = tl.arange(0, BLOCK_K)
    tl.store(out + o, tl.full([BLOCK_K], -1, tl.int32), mask=(o >= k) & (o < num_select))
    if h == 0:
        tl.store(num_valid + b, k.to(tl.int32))


def max_logical_pages(block_table: torch.Tensor, page_size: int, block_size: int) -> int:
    """Pages a request can have with this block table: the fixed width of the score tensor."""
    return block_table.shape[1] * block_size // page_size


def score_pages(q: torch.Tensor, page_min: torch.Tensor, page_max: torch.Tensor, block_table: torch.Tensor,
                seq_lens: torch.Tensor, page_size: int, block_size: int, num_sink_pages: int = 0,
                num_recent_pages: int = 0, out: torch.Tensor | None = None) -> torch.Tensor:
    """Quest upper bound of ``q . k`` for every logical page of every (request, kv head).

    Args:
        q: ``[B, Hq, D]`` fp16/bf16/fp32 decode queries; query heads ``h*G .. h*G+G-1`` share kv head ``h``.
        page_min, page_max: ``[num_pages_total, Hkv, D]`` page summaries (``update_page_summary``).
        block_table: ``[B, max_blocks]`` int32 physical block ids; seq_lens: ``[B]`` int32.
        page_size, block_size: tokens per page / per cache block (``page_size`` divides ``block_size``).
        num_sink_pages, num_recent_pages: first / last valid pages forced to ``+inf``.
        out: optional ``[B, Hkv, max_pages]`` fp32 to write into.

    Returns:
        ``[B, Hkv, max_blocks * block_size // page_size]`` fp32; ``-inf`` for pages at or past
        ``ceil(seq_len / page_size)``.
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
    block_n = 64 if d <= 128 else 32
    grid = (triton.cdiv(max_pages, block_n), bsz * hkv)
    _score_pages_kernel[grid](
        q, page_min, page_max, block_table, seq_lens, out,
        max_pages, num_sink_pages, num_recent_pages,
        *q.stride(), *page_min.stride(), *block_table.stride(), out.stride(0), out.stride(1),
        HKV=hkv, GROUP=hq // hkv, HEAD_DIM=d, PAGE_SIZE=page_size, PAGES_PER_BLOCK=block_size // page_size,
        BLOCK_G=triton.next_power_of_2(hq // hkv), BLOCK_D=triton.next_power_of_2(d), BLOCK_N=block_n,
        num_warps=8 if block_n * d >= 8192 else 4,  # two [BLOCK_N, D] fp32 tiles: keep them in registers
    )
    return out


def topk_pages(scores: torch.Tensor, seq_lens: torch.Tensor, page_size: int, num_select: int,
               impl: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Top ``num_select`` pages of each ``[B, Hkv, max_pages]`` score row, ascending, ``-1`` padded.

    ``impl``: ``"triton"`` (radix select, rows up to ``_MAX_TRITON_TOPK`` pages), ``"torch"``
    (``torch.topk`` + sort), or ``"auto"`` (triton when it fits). Equal scores go to the lower page in
    the triton path; the torch path breaks ties arbitrarily.
    """
    bsz, hkv, max_pages = scores.shape
    dev = scores.device
    if impl == "auto":
        impl = "triton" if max_pages <= _MAX_TRITON_TOPK else "torch"
    if impl == "triton" and bsz > 0:
        assert max_pages <= _MAX_TRITON_TOPK and scores.stride(2) == 1
        page_ids = torch.empty(bsz, hkv, num_select, dtype=torch.int32, device=dev)
        num_valid = torch.empty(bsz, dtype=torch.int32, device=dev)
        block = max(triton.next_power_of_2(max_pages), 256)
        _topk_pages_kernel[(bsz * hkv,)](
            scores, seq_lens, page_ids, num_valid, max_pages, num_select,
            scores.stride(0), scores.stride(1), page_ids.stride(0), page_ids.stride(1),
            HKV=hkv, PAGE_SIZE=page_size, BLOCK=block, BLOCK_K=triton.next_power_of_2(num_select),
            num_warps=max(4, min(16, block // 512)),
        )
        return page_ids, num_valid
    # torch path: invalid pages score -inf and lose to every valid one, so the first
    # min(k, n_pages) winners are exactly the valid selection.
    k = min(num_select, max_pages)
    vals, idx = scores.topk(k, dim=-1, sorted=False)
    idx = torch.where(vals == float("-inf"), max_pages, idx).sort(dim=-1).values
    page_ids = torch.where(idx == max_pages, -1, idx).to(torch.int32)
    if k < num_select:
        page_ids = torch.nn.functional.pad(page_ids, (0, num_select - k), value=-1)
    n_pages = (seq_lens.to(torch.int64) + page_size - 1) // page_size
    num_valid = n_pages.clamp(max=min(num_select, max_pages)).to(torch.int32)
    return page_ids, num_valid


def select_topk_pages(q: torch.Tensor, page_min: torch.Tensor, page_max: torch.Tensor,
                      block_table: torch.Tensor, seq_lens: torch.Tensor, page_size: int, block_size: int,
                      num_select: int, num_sink_pages: int = 0, num_recent_pages: int = 0,
                      topk_impl: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Quest page selection: score every page (``score_pages``) and keep the best ``num_select``.

    Args: as ``score_pages``; ``num_select``: pages kept per (request, kv head), at least
        ``num_sink_pages + num_recent_pages`` so that every forced page fits.

    Returns:
        page_ids: ``[B, Hkv, num_select]`` int32 logical pages, ascending, ``-1`` padded past
            ``num_valid``; every valid page when the request has at most ``num_select`` pages.
        num_valid: ``[B]`` int32 ``min(num_select, ceil(seq_len / page_size))``.
    """
    assert num_select >= 1 and num_sink_pages + num_recent_pages <= num_select, \
        "num_select must cover the sink and recent pages"
    scores = score_pages(q, page_min, page_max, block_table, seq_lens, page_size, block_size,
                         num_sink_pages, num_recent_pages)
    return topk_pages(scores, seq_lens, page_size, num_select, impl=topk_impl)
