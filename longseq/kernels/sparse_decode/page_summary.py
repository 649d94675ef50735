"""Page summaries for Quest: channel-wise min/max of the keys of every ``page_size``-token page.

Called after the step's keys were written into the cache (same ``slot_mapping``). Only pages touched in
this step are recomputed, and each by exactly one program (its "last writer" token), so the kernel needs
no atomics, is deterministic, and has a fixed grid (``T`` programs): safe to capture in a CUDA graph.

Summary dtypes: the cache dtype or fp32 (exact), or ``torch.float8_e4m3fn`` (the default of
``allocate_page_summary`` where the GPU converts fp8 natively): half the bytes of bf16 for the scoring pass,
which reads every page's summary each decode step. fp8 rounds the min down and the max up (directed
rounding), so the Quest score computed from them is still an upper bound of every key's ``q . k``; a value
outside +-448 in the unsafe direction is stored as NaN, which the scorer turns into a ``+inf`` page score.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

FP8 = torch.float8_e4m3fn


@triton.jit
def fp8e4m3_bits_to_f32(x):
    """uint8 e4m3fn bits -> fp32, NaN for 0x7F/0xFF (the interpreter's fp8 cast reads them as +-480, the GPU's
    as NaN)."""
    return tl.where((x & 0x7F) == 0x7F, float("nan"), x.to(tl.float8e4nv, bitcast=True).to(tl.float32))


@triton.jit
def load_summary_f32(ptr, offs, mask, FP8_BITS: tl.constexpr):
    """Page or block summary values at ``ptr + offs`` as fp32 (0 where masked). ``FP8_BITS``: ``ptr`` is a uint8
    view of e4m3fn summaries (the interpreter has no fp8 loads)."""
    if FP8_BITS:
        v = fp8e4m3_bits_to_f32(tl.load(ptr + offs, mask=mask, other=0))
    else:
        v = tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32)
    return v


@triton.jit
def _fp8e4m3_directed_bits(x, UP: tl.constexpr):
    """int32 bit pattern of the e4m3fn value next to fp32 ``x`` in one direction (``UP``: the smallest value
    ``>= x``, else the largest ``<= x``); 0x7F/0xFF (NaN) where that value would be past +-448.

    Integer arithmetic only (round toward zero, then one step away from zero when inexact and the direction
    asks for it), so the interpreter and every GPU give the same bits.
    """
    xb = x.to(tl.int32, bitcast=True)
    neg = xb < 0
    ab = xb & 0x7FFFFFFF
    e = (ab >> 23) - 127  # unbiased exponent of |x|
    normal = ((e + 7) << 3) | ((ab >> 20) & 7)  # e4m3 exponent bias 7, top 3 mantissa bits
    normal_exact = (ab & 0xFFFFF) == 0
    a512 = tl.minimum(ab.to(tl.float32, bitcast=True), 1.0) * 512.0  # subnormals: multiples of 2^-9
    sub = a512.to(tl.int32)
    sub_exact = sub.to(tl.float32) == a512
    is_sub = e < -6
    t = tl.where(is_sub, sub, normal)
    exact = tl.where(is_sub, sub_exact, normal_exact)
    big = (e > 8) | (t > 0x7E)  # |x| past 448 (0x7E): saturate, and never exact
    t = tl.where(big, 0x7E, t)
    exact = exact & ~big
    if UP:
        away = ~neg
    else:
        away = neg
    t = tl.where(away & ~exact, t + 1, t)  # 0x7E + 1 = 0x7F: NaN, "no bound here"
    return tl.where(neg, t | 0x80, t)


@triton.jit(do_not_specialize=["T"])  # T changes every step: one compiled variant for all
def _update_page_summary_kernel(
    key_cache, slot_mapping, page_min, page_max, T,
    s_kb, s_ko, s_kh, s_kd,  # key_cache strides: block, offset, head, dim
    s_pp, s_ph, s_pd,  # page_min/page_max strides: page, head, dim
    HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, PAGE_SIZE: tl.constexpr,
    HD: tl.constexpr, BLOCK_HD: tl.constexpr, BLOCK_R: tl.constexpr, FP8_OUT: tl.constexpr,
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
    if FP8_OUT:  # page_min/page_max are uint8 views of the fp8 tensors
        tl.store(page_min + out, _fp8e4m3_directed_bits(mn, False).to(tl.uint8), mask=hd_mask)
        tl.store(page_max + out, _fp8e4m3_directed_bits(mx, True).to(tl.uint8), mask=hd_mask)
    else:
        tl.store(page_min + out, mn.to(page_min.dtype.element_ty), mask=hd_mask)
        tl.store(page_max + out, mx.to(page_max.dtype.element_ty), mask=hd_mask)


def fp8_summaries_supported(device: torch.device | str) -> bool:
    """fp8 summaries need native e4m3 conversion on the GPU (compute capability 8.9+); the interpreter
    (CPU tensors) handles them too."""
    device = torch.device(device)
    if device.type != "cuda":
        return True
    return torch.cuda.get_device_capability(device) >= (8, 9)


def default_summary_dtype(cache_dtype: torch.dtype, device: torch.device | str) -> torch.dtype:
    """``float8_e4m3fn`` where supported (half the bytes to score), else the cache dtype."""
    return FP8 if fp8_summaries_supported(device) else cache_dtype


def allocate_page_summary(num_blocks: int, block_size: int, num_kv_heads: int, head_size: int,
                          page_size: int, dtype: torch.dtype, device: torch.device | str,
                          summary_dtype: torch.dtype | str | None = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Empty ``(page_min, page_max)``, each ``[num_blocks * block_size // page_size, Hkv, D]``.

    Args:
        dtype: the cache dtype.
        summary_dtype: the summaries' dtype: ``"auto"``/``None`` (``default_summary_dtype``: fp8 e4m3 where
            supported), or a dtype (``torch.float8_e4m3fn``, the cache dtype, ``torch.float32``...).

    Both are views of one ``[pages, Hkv, 2, D]`` buffer, so a page's min and max of one kv head are one
    contiguous run of memory for the scorer. Contents are garbage until a page is written: a page's
    summary is only read for logical pages below ``ceil(seq_len / P)``, all of which were written (and so
    summarized) by their request.
    """
    assert block_size % page_size == 0, "page_size must divide block_size"
    if summary_dtype is None or summary_dtype == "auto":
        summary_dtype = default_summary_dtype(dtype, device)
    buf = torch.empty((num_blocks * block_size // page_size, num_kv_heads, 2, head_size), dtype=summary_dtype,
                      device=device)
    return buf[:, :, 0], buf[:, :, 1]


def update_page_summary(key_cache: torch.Tensor, slot_mapping: torch.Tensor, page_min: torch.Tensor,
                        page_max: torch.Tensor, page_size: int) -> None:
    """Recompute, in place, min/max of every page that a token of ``slot_mapping`` was written to.

    Args:
        key_cache: ``[num_blocks, block_size, Hkv, D]`` fp16/bf16/fp32, any strides, already holding the
            step's keys.
        slot_mapping: ``[T]`` int32/int64 slots written this step (``-1`` = padding). A page's tokens in
            one step must be consecutive entries (as vLLM lays out each request's tokens).
        page_min, page_max: ``[num_blocks * block_size // page_size, Hkv, D]``, any strides (the same for
            both), any float dtype; ``torch.float8_e4m3fn`` is rounded outward (module docstring).
        page_size: tokens per page ``P``; divides ``block_size``.

    The summary covers the page's rows ``0..o`` (``o`` = the largest in-page offset written this step),
    so stale keys of a block's previous owner at later offsets never leak in. No host synchronization.
    """
    num_blocks, block_size, hkv, d = key_cache.shape
    assert block_size % page_size == 0, "page_size must divide block_size"
    assert page_min.shape == page_max.shape == (num_blocks * block_size // page_size, hkv, d)
    assert page_min.stride() == page_max.stride() and page_min.dtype == page_max.dtype
    t = slot_mapping.shape[0]
    if t == 0:
        return
    fp8 = page_min.dtype == FP8
    if fp8:
        page_min, page_max = page_min.view(torch.uint8), page_max.view(torch.uint8)
    hd = hkv * d
    block_hd = min(triton.next_power_of_2(hd), 512)
    block_r = min(triton.next_power_of_2(page_size), 16)
    grid = (t, triton.cdiv(hd, block_hd))
    _update_page_summary_kernel[grid](
        key_cache, slot_mapping, page_min, page_max, t,
        *key_cache.stride(), *page_min.stride(),
        HEAD_DIM=d, BLOCK_SIZE=block_size, PAGE_SIZE=page_size, HD=hd, BLOCK_HD=block_hd, BLOCK_R=block_r,
        FP8_OUT=fp8, num_warps=4,
    )
