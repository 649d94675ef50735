"""Page summaries for Quest: channel-wise min/max of the keys of every ``page_size``-token page.

Called after the step's keys were written into the cache (same ``slot_mapping``). Only pages touched in
this step are recomputed, and each by exactly one program (its "last writer" token), so the kernel needs
no atomics, is deterministic, and has a fixed grid (``T`` programs): safe to capture in a CUDA graph.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit(do_not_specialize=["T"])  # T changes every step: one compiled variant for all
def _update_page_summary_kernel(
    key_cache, slot_mapping, page_min, page_max, T,
    s_kb, s_ko, s_kh, s_kd,  # key_cache strides: block, offset, head, dim
    s_pp, s_ph, s_pd,  # page_min/page_max strides: page, head, dim
    HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, PAGE_SIZE: tl.constexpr,
    HD: tl.constexpr, BLOCK_HD: tl.constexpr, BLOCK_R: tl.constexpr,
):
    t = tl.program_id(0)
    slot = tl.load(slot_mapping + t).to(tl.int64)
    nxt = tl.load(slot_mapping + t + 1, mask=t + 1 < T, other=-1).to(tl.int64)
    page = slot // PAGE_SIZE
    # The page's last token written this step does the work: the next token (if any) continues it only
    # when it is the very next slot of the same page. Padding (-1) never does.
    continues = (nxt == slot + 1) & ((nxt // PAGE_SIZE) == page)
    if (slot < 0) | continues:
        return
    n_rows = slot % PAGE_SIZE + 1  # rows 0..offset hold this request's keys; rows past may be stale
    s0 = page * PAGE_SIZE
    base = key_cache + (s0 // BLOCK_SIZE) * s_kb + (s0 % BLOCK_SIZE) * s_ko
    # One flat (head, dim) axis: a token's keys for all heads are one tile row, whatever the strides.
    hd = tl.program_id(1) * BLOCK_HD + tl.arange(0, BLOCK_HD)
    hd_mask = hd < HD
    h = hd // HEAD_DIM
    d = hd % HEAD_DIM
    col = h * s_kh + d * s_kd
    r = tl.arange(0, BLOCK_R)
    mn = tl.full([BLOCK_HD], float("inf"), tl.float32)
    mx = tl.full([BLOCK_HD], float("-inf"), tl.float32)
    for r0 in range(0, n_rows, BLOCK_R):
        rows = r0 + r
        m = (rows < n_rows)[:, None] & hd_mask[None, :]
        k = tl.load(base + rows[:, None] * s_ko + col[None, :], mask=m, other=0.0).to(tl.float32)
        mn = tl.minimum(mn, tl.min(tl.where(m, k, float("inf")), axis=0))
        mx = tl.maximum(mx, tl.max(tl.where(m, k, float("-inf")), axis=0))
    out = page * s_pp + h * s_ph + d * s_pd
    tl.store(page_min + out, mn.to(page_min.dtype.element_ty), mask=hd_mask)
    tl.store(page_max + out, mx.to(page_max.dtype.element_ty), mask=hd_mask)


def allocate_page_summary(num_blocks: int, block_size: int, num_kv_heads: int, head_size: int,
                          page_size: int, dtype: torch.dtype,
                          device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """Empty ``(page_min, page_max)``, each ``[num_blocks * block_size // page_size, Hkv, D]``.

    Contents are garbage until a page is written: a page's summary is only read for logical pages below
    ``ceil(seq_len / P)``, all of which were written (and so summarized) by their request.
    """
    assert block_size % page_size == 0, "page_size must divide block_size"
    shape = (num_blocks * block_size // page_size, num_kv_heads, head_size)
    return (torch.empty(shape, dtype=dtype, device=device), torch.empty(shape, dtype=dtype, device=device))


def update_page_summary(key_cache: torch.Tensor, slot_mapping: torch.Tensor, page_min: torch.Tensor,
                        page_max: torch.Tensor, page_size: int) -> None:
    """Recompute, in place, min/max of every page that a token of ``slot_mapping`` was written to.

    Args:
        key_cache: ``[num_blocks, block_size, Hkv, D]`` fp16/bf16/fp32, any strides, already holding the
            step's keys.
        slot_mapping: ``[T]`` int32/int64 slots written this step (``-1`` = padding). A page's tokens in
            one step must be consecutive entries (as vLLM lays out each request's tokens).
        page_min, page_max: ``[num_blocks * block_size // page_size, Hkv, D]``, any strides.
        page_size: tokens per page ``P``; divides ``block_size``.

    The summary covers the page's rows ``0..o`` (``o`` = the largest in-page offset written this step),
    so stale keys of a block's previous owner at later offsets never leak in. No host synchronization.
    """
    num_blocks, block_size, hkv, d = key_cache.shape
    assert block_size % page_size == 0, "page_size must divide block_size"
    assert page_min.shape == page_max.shape == (num_blocks * block_size // page_size, hkv, d)
    assert page_min.stride() == page_max.stride()
    t = slot_mapping.shape[0]
    if t == 0:
        return
    hd = hkv * d
    block_hd = min(triton.next_power_of_2(hd), 512)
    block_r = min(triton.next_power_of_2(page_size), 16)
    grid = (t, triton.cdiv(hd, block_hd))
    _update_page_summary_kernel[grid](
        key_cache, slot_mapping, page_min, page_max, t,
        *key_cache.stride(), *page_min.stride(),
        HEAD_DIM=d, BLOCK_SIZE=block_size, PAGE_SIZE=page_size, HD=hd, BLOCK_HD=block_hd, BLOCK_R=block_r,
        num_warps=4,
    )
