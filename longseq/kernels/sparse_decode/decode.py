"""Sparse paged decode attention: each query attends only to the selected pages of its kv head.

Flash-decoding: the selected pages of one (request, kv head), seen as a flat list of ``S * P`` token
slots, are cut into ``num_splits`` contiguous ranges; a program per (request, kv head, split) runs an
online softmax over its range for all ``G`` query heads of the group at once (one ``[G_pad, D] x [D, N]``
``tl.dot``; ``G`` padded to 16, the smallest dot tile), and a second kernel merges the splits by their
log-sum-exp. With one split the first kernel writes the output directly and the second is skipped. By
default the merge runs inside the first kernel instead: the last split program of each (request, kv head) to
finish (an atomic counter, reset by that program; see ``workspace.py``) merges
that group's splits, which saves a launch.
Shapes depend only on ``(B, Hq, D, S)``, never on ``seq_lens``: safe to capture in a CUDA graph.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from longseq.kernels.score_mods import NO_MODS, ScoreMods, kernel_args
from longseq.kernels.triton_score_mods import capped_scores, sink_factor
from longseq.kernels.sparse_decode.workspace import counters

FUSE_MERGE_DEFAULT = True


@triton.jit
def _attend_list(
    src_row, t_lo, t_hi, qg, m_i, l_i, acc, seq_len, bt_row, key_cache, value_cache, h, qk_scale, cap_log2,
    s_btn, s_kb, s_ko, s_kh, s_kd, s_vb, s_vo, s_vh, s_vd,
    BLOCK_SIZE: tl.constexpr, PAGE_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HEAD_DIM: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_FP32: tl.constexpr, SOFTCAP: tl.constexpr,
):
    """Online softmax of one GQA group over token slots ``[t_lo, t_hi)`` of a page list (``src_row``: logical
    pages); returns the updated ``(m_i, l_i, acc)``."""
    n = tl.arange(0, BLOCK_N)
    d = tl.arange(0, BLOCK_D)
    d_mask = d < HEAD_DIM
    for t0 in range(t_lo, t_hi, BLOCK_N):
        # Token slot t of the list = offset t % P of the (t // P)-th listed page.
        t = t0 + n
        page = tl.load(src_row + t // PAGE_SIZE, mask=t < t_hi, other=-1).to(tl.int64)
        pos = page * PAGE_SIZE + t % PAGE_SIZE  # position in the request's sequence
        valid = (page >= 0) & (pos < seq_len)  # -1 entries and the partial last page's tail are masked
        blk = tl.load(bt_row + (pos // BLOCK_SIZE) * s_btn, mask=valid, other=0).to(tl.int64)
        off = pos % BLOCK_SIZE
        kv_mask = valid[:, None] & d_mask[None, :]
        k = tl.load(key_cache + (blk * s_kb + off * s_ko + h * s_kh)[:, None] + d[None, :] * s_kd,
                    mask=kv_mask, other=0.0)
        v = tl.load(value_cache + (blk * s_vb + off * s_vo + h * s_vh)[:, None] + d[None, :] * s_vd,
                    mask=kv_mask, other=0.0)
        p_dtype = v.dtype
        if DOT_FP32:
            k, v = k.to(tl.float32), v.to(tl.float32)
        s = capped_scores(tl.dot(qg, tl.trans(k), input_precision=DOT_PRECISION), qk_scale, cap_log2,
                          SOFTCAP)  # [G, N], log2 units
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a range with no token yet: no NaNs
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        # P rounded to the cache dtype, as in flash attention: the second dot runs on the tensor cores too.
        acc = acc * alpha[:, None] + tl.dot(p.to(p_dtype).to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    return m_i, l_i, acc


@triton.jit
def _sparse_decode_kernel(
    q, key_cache, value_cache, block_table, seq_lens, page_ids, extra_pages, out, part_o, part_lse, row_counters,
    sinks, qk_scale, cap_log2, list_tokens, tokens_per_split, num_splits, extra_tokens,
    s_qb, s_qh, s_qd, s_kb, s_ko, s_kh, s_kd, s_vb, s_vo, s_vh, s_vd,
    s_btb, s_btn, s_pb, s_ph, s_eb, s_ob, s_oh, s_od,
    HKV: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    PAGE_SIZE: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    SPLIT: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_FP32: tl.constexpr,
    FUSE_MERGE: tl.constexpr, BLOCK_S: tl.constexpr, MERGE_G: tl.constexpr, EXTRA: tl.constexpr,
    SOFTCAP: tl.constexpr, HAS_SINKS: tl.constexpr,
):
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b = bh // HKV
    h = bh % HKV
    seq_len = tl.load(seq_lens + b)
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    g_mask = g < GROUP
    d_mask = d < HEAD_DIM
    heads = h * GROUP + g
    qg = tl.load(q + b * s_qb + heads[:, None] * s_qh + d[None, :] * s_qd,
                 mask=g_mask[:, None] & d_mask[None, :], other=0.0).to(key_cache.dtype.element_ty)
    if DOT_FP32:  # Triton's interpreter multiplies bf16 tiles as raw integers: do it in fp32 there
        qg = qg.to(tl.float32)
    pid_row = page_ids + b * s_pb + h * s_ph
    bt_row = block_table + b * s_btb
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    t_start = split * tokens_per_split
    t_end = tl.minimum(t_start + tokens_per_split, list_tokens)
    m_i, l_i, acc = _attend_list(
        pid_row, t_start, t_end, qg, m_i, l_i, acc, seq_len, bt_row, key_cache, value_cache, h, qk_scale, cap_log2,
        s_btn, s_kb, s_ko, s_kh, s_kd, s_vb, s_vo, s_vh, s_vd,
        BLOCK_SIZE, PAGE_SIZE, BLOCK_N, BLOCK_D, HEAD_DIM, DOT_PRECISION, DOT_FP32, SOFTCAP)
    if EXTRA:
        # The pages written since a reused selection (reuse.py): one more short range for the last split, so the
        # split count (and the merge) stays that of the selected list.
        if split == num_splits - 1:
            m_i, l_i, acc = _attend_list(
                extra_pages + b * s_eb, 0, extra_tokens, qg, m_i, l_i, acc, seq_len, bt_row, key_cache,
                value_cache, h, qk_scale, cap_log2, s_btn, s_kb, s_ko, s_kh, s_kd, s_vb, s_vo, s_vh, s_vd,
                BLOCK_SIZE, PAGE_SIZE, BLOCK_N, BLOCK_D, HEAD_DIM, DOT_PRECISION, DOT_FP32, SOFTCAP)
    o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # a head that saw no token outputs zeros
    if SPLIT:
        row = (b * (HKV * GROUP) + heads) * num_splits + split  # part_o is [B, Hq, num_splits, D]
        tl.store(part_o + row[:, None] * HEAD_DIM + d[None, :], o, mask=g_mask[:, None] & d_mask[None, :])
        lse = tl.where(l_i > 0, m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
        tl.store(part_lse + row, lse, mask=g_mask)
        if FUSE_MERGE:
            # The last split of this (request, kv head) to finish merges the group's splits. The barrier
            # orders every thread's partial stores before the (single-thread, acq_rel) increment.
            tl.debug_barrier()
            done = tl.atomic_add(row_counters + bh, 1, sem="acq_rel", scope="gpu")
            if done == num_splits - 1:
                tl.store(row_counters + bh, 0)  # ready for the next launch
                for g0 in range(0, GROUP, MERGE_G):
                    _merge_group(part_o, part_lse, out, sinks, b, h * GROUP + g0, GROUP - g0, num_splits,
                                 s_ob, s_oh, s_od, HKV * GROUP, HEAD_DIM, BLOCK_S, BLOCK_D, MERGE_G, HAS_SINKS)
    else:
        if HAS_SINKS:
            lse = tl.where(l_i > 0, m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
            o = o * sink_factor(lse, tl.load(sinks + heads, mask=g_mask, other=0.0))[:, None]
        tl.store(out + b * s_ob + heads[:, None] * s_oh + d[None, :] * s_od, o.to(out.dtype.element_ty),
                 mask=g_mask[:, None] & d_mask[None, :])


@triton.jit
def _merge_group(part_o, part_lse, out, sinks, b, hq0, n_heads, num_splits, s_ob, s_oh, s_od,
                 HQ: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
                 MERGE_G: tl.constexpr, HAS_SINKS: tl.constexpr):
    """Merge the splits of query heads ``hq0 .. hq0 + min(n_heads, MERGE_G) - 1`` of request ``b`` (.cg loads:
    other programs wrote the partials)."""
    g = tl.arange(0, MERGE_G)
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    gm = g < n_heads
    sm = gm[:, None] & (s < num_splits)[None, :]
    row = (b * HQ + hq0 + g)[:, None] * num_splits + s[None, :]  # [G, S]
    lse = tl.load(part_lse + row, mask=sm, other=float("-inf"), cache_modifier=".cg")
    m = tl.max(lse, axis=1)
    w = tl.exp2(lse - tl.where(m == float("-inf"), 0.0, m)[:, None])  # empty splits weigh 0
    o = tl.load(part_o + row[:, :, None] * HEAD_DIM + d[None, None, :],
                mask=sm[:, :, None] & (d < HEAD_DIM)[None, None, :], other=0.0, cache_modifier=".cg")
    w_sum = tl.sum(w, axis=1)
    res = tl.sum(w[:, :, None] * o, axis=1) / tl.where(w_sum > 0, w_sum, 1.0)[:, None]
    if HAS_SINKS:
        lse_all = tl.where(w_sum > 0, m + tl.log2(tl.where(w_sum > 0, w_sum, 1.0)), float("-inf"))
        res = res * sink_factor(lse_all, tl.load(sinks + hq0 + g, mask=gm, other=0.0))[:, None]
    tl.store(out + b * s_ob + (hq0 + g)[:, None] * s_oh + d[None, :] * s_od, res.to(out.dtype.element_ty),
             mask=gm[:, None] & (d < HEAD_DIM)[None, :])


@triton.jit
def _merge_splits_kernel(
    part_o, part_lse, out, sinks, num_splits, s_ob, s_oh, s_od,
    HQ: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, HAS_SINKS: tl.constexpr,
):
    row = tl.program_id(0)  # b * Hq + query head
    b = row // HQ
    hq = row % HQ
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    s_mask = s < num_splits
    lse = tl.load(part_lse + row * num_splits + s, mask=s_mask, other=float("-inf"))
    m = tl.max(lse, axis=0)
    w = tl.exp2(lse - tl.where(m == float("-inf"), 0.0, m))  # empty splits weigh 0
    o = tl.load(part_o + (row * num_splits + s)[:, None] * HEAD_DIM + d[None, :],
                mask=s_mask[:, None] & (d < HEAD_DIM)[None, :], other=0.0)
    w_sum = tl.sum(w, axis=0)
    res = tl.sum(w[:, None] * o, axis=0) / tl.where(w_sum > 0, w_sum, 1.0)
    if HAS_SINKS:
        lse_all = tl.where(w_sum > 0, m + tl.log2(tl.where(w_sum > 0, w_sum, 1.0)), float("-inf"))
        res = res * sink_factor(lse_all, tl.load(sinks + hq))
    tl.store(out + b * s_ob + hq * s_oh + d * s_od, res.to(out.dtype.element_ty), mask=d < HEAD_DIM)


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


SPLIT_PROGRAMS_PER_SM = 2  # default_num_splits aims at this many programs per SM


def default_num_splits(batch: int, num_kv_heads: int, num_select: int, page_size: int, head_size: int,
                       device: torch.device, programs_per_sm: float | None = None) -> int:
    """Splits so that about ``programs_per_sm`` (default ``SPLIT_PROGRAMS_PER_SM``) programs per SM run, but
    no split gets less than one ``BLOCK_N`` tile.

    Depends on shapes only (not on ``seq_lens``), so a captured graph stays valid.
    """
    block_n = _block_n(head_size)
    max_splits = triton.cdiv(num_select * page_size, block_n)
    sms = _num_sms(device.index if device.index is not None else torch.cuda.current_device()) \
        if device.type == "cuda" else 4
    per_sm = SPLIT_PROGRAMS_PER_SM if programs_per_sm is None else programs_per_sm
    return max(1, min(max_splits, triton.cdiv(int(per_sm * sms), max(batch * num_kv_heads, 1)), 64))


def _block_n(head_size: int) -> int:
    return 64 if head_size <= 128 else 32


def dense_page_ids(block_table: torch.Tensor, seq_lens: torch.Tensor, page_size: int, block_size: int,
                   num_kv_heads: int) -> torch.Tensor:
    """``[B, Hkv, max_pages]`` int32 selection of every valid page (``-1`` past the last): with it,
    ``sparse_paged_decode`` is ordinary paged decode attention."""
    max_pages = block_table.shape[1] * block_size // page_size
    j = torch.arange(max_pages, device=block_table.device, dtype=torch.int32)
    n = (seq_lens.to(torch.int32) + page_size - 1) // page_size
    ids = torch.where(j[None, :] < n[:, None], j[None, :], -1)
    return ids[:, None, :].expand(-1, num_kv_heads, -1).contiguous()


def sparse_paged_decode(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                        block_table: torch.Tensor, seq_lens: torch.Tensor, page_ids: torch.Tensor,
                        page_size: int, scale: float, out: torch.Tensor | None = None,
                        num_splits: int | None = None, fuse_merge: bool | None = None,
                        num_warps: int | None = None, num_stages: int | None = None,
                        extra_pages: torch.Tensor | None = None, mods: ScoreMods = NO_MODS) -> torch.Tensor:
    """Decode attention over the selected pages only.

    Args:
        q: ``[B, Hq, D]`` fp16/bf16/fp32, one query per request; query heads ``h*G .. h*G+G-1`` use kv
            head ``h``. D up to 256 (any size: padded to a power of two and masked).
        key_cache, value_cache: ``[num_blocks, block_size, Hkv, D]``, any strides.
        block_table: ``[B, max_blocks]`` int32; seq_lens: ``[B]`` int32 (tokens at ``>= seq_len`` masked).
        page_ids: ``[B, Hkv, S]`` int32 logical pages (``select_topk_pages``; any order, ``-1`` skipped).
        page_size: tokens per page; divides ``block_size``.
        scale: softmax scale.
        out: optional ``[B, Hq, D]`` output (any strides, any float dtype).
        num_splits: split-K factor (default: ``default_num_splits``, from shapes only).
        fuse_merge: merge the splits in the split kernel (default ``FUSE_MERGE_DEFAULT``) instead of a second
            launch. num_warps, num_stages: tuning.
        extra_pages: optional ``[B, E]`` int32 logical pages attended by every KV head after ``page_ids``
            (``-1`` skipped): the pages written since a reused selection (``reuse.py``).
        mods: the layer's soft-cap and sinks (``score_mods.py``).

    Returns:
        ``[B, Hq, D]`` in ``q.dtype`` (or ``out``'s); zeros for a request that sees no token.
    """
    bsz, hq, d = q.shape
    num_blocks, block_size, hkv, dk = key_cache.shape
    assert dk == d and value_cache.shape == key_cache.shape and hq % hkv == 0
    assert block_size % page_size == 0 and page_ids.shape[:2] == (bsz, hkv) and page_ids.stride(2) == 1
    if out is None:
        out = torch.empty_like(q)
    num_select = page_ids.shape[2]
    num_extra = 0 if extra_pages is None else extra_pages.shape[1]
    assert extra_pages is None or (extra_pages.shape[0] == bsz and extra_pages.stride(1) == 1)
    if bsz == 0:
        return out
    block_n = _block_n(d)
    if num_splits is None:
        num_splits = default_num_splits(bsz, hkv, num_select, page_size, d, q.device)
    list_tokens = num_select * page_size
    tokens_per_split = triton.cdiv(triton.cdiv(list_tokens, num_splits), block_n) * block_n
    split = num_splits > 1
    fuse = split and (FUSE_MERGE_DEFAULT if fuse_merge is None else fuse_merge)
    if split:
        part_o = torch.empty(bsz, hq, num_splits, d, dtype=torch.float32, device=q.device)
        part_lse = torch.empty(bsz, hq, num_splits, dtype=torch.float32, device=q.device)
    else:
        part_o = part_lse = out  # unused
    ctr = counters(q.device, bsz * hkv) if fuse else part_lse
    group = hq // hkv
    block_s = triton.next_power_of_2(num_splits)
    block_d = triton.next_power_of_2(d)
    # heads merged at once: keep the [G, S, D] fp32 tile near 8K elements
    merge_g = min(triton.next_power_of_2(group), max(1, 8192 // (block_s * block_d)))
    interp_bf16 = key_cache.dtype == torch.bfloat16 and not key_cache.is_cuda  # CPU tensors: interpreter
    extra = {} if num_stages is None else {"num_stages": num_stages}
    qk_scale, cap_log2, sinks = kernel_args(scale, mods, q.device, hq, out)  # sinks: log2 units
    _sparse_decode_kernel[(bsz * hkv, num_splits)](
        q, key_cache, value_cache, block_table, seq_lens, page_ids, page_ids if extra_pages is None else extra_pages,
        out, part_o, part_lse, ctr, sinks, qk_scale, cap_log2, list_tokens, tokens_per_split, num_splits,
        num_extra * page_size,
        *q.stride(), *key_cache.stride(), *value_cache.stride(), *block_table.stride(),
        page_ids.stride(0), page_ids.stride(1), 0 if extra_pages is None else extra_pages.stride(0), *out.stride(),
        HKV=hkv, GROUP=group, HEAD_DIM=d, BLOCK_SIZE=block_size, PAGE_SIZE=page_size,
        BLOCK_G=max(16, triton.next_power_of_2(group)), BLOCK_D=max(16, triton.next_power_of_2(d)),
        BLOCK_N=block_n, SPLIT=split, DOT_PRECISION="ieee" if key_cache.dtype == torch.float32 or interp_bf16 else None,
        DOT_FP32=interp_bf16, FUSE_MERGE=fuse, BLOCK_S=block_s, MERGE_G=merge_g, EXTRA=num_extra > 0,
        SOFTCAP=mods.softcap is not None, HAS_SINKS=mods.sinks is not None, num_warps=num_warps or 4, **extra,
    )
    if split and not fuse:
        _merge_splits_kernel[(bsz * hq,)](
            part_o, part_lse, out, sinks, num_splits, *out.stride(),
            HQ=hq, HEAD_DIM=d, BLOCK_S=triton.next_power_of_2(num_splits),
            BLOCK_D=triton.next_power_of_2(d), HAS_SINKS=mods.sinks is not None, num_warps=4,
        )
    return out
