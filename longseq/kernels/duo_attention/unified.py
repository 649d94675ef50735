"""DuoAttention over a paged KV cache in one Triton launch: prefill, chunked prefill, decode and mixed batches.

Semantics are those of :mod:`longseq.kernels.duo_attention.naive`: a query at position ``p`` sees keys
``j <= p``; on a streaming KV head only those with ``j < sink_size`` or ``j > p - recent_size``.

Layout of the work (after vLLM's Triton unified attention, ``vllm/v1/attention/ops/triton_unified_attention.py``,
Apache-2.0, whose q-block numbering and GQA row packing this follows): a program handles ``BLOCK_Q`` consecutive
query tokens of one request times the ``G`` query heads of one KV head (``BLOCK_M >= BLOCK_Q * G`` rows, one
``tl.dot`` tile), for one of ``num_splits`` slices of the key tiles it has to visit.

Tile skipping (where the speed comes from): a retrieval head visits key tiles ``0 .. p_hi`` (``p_hi`` = the
block's last query position); a streaming head visits only the tiles holding the sink (``j < sink_size``) and
those of its window (``p_lo - recent_size < j <= p_hi``), i.e. ``O(sink + recent + BLOCK_Q)`` keys whatever the
context length. The two ranges are concatenated into one virtual tile list that the splits cut evenly.

The grid's KV-head axis walks a list of KV heads (``kv_heads``): all heads (one launch for both kinds, streaming
and retrieval programs side by side), or a subset, e.g. only the streaming heads when FlashAttention computes
the retrieval heads (see ``longseq.attention_backends.vllm.flash``). Grid and buffers depend on shapes only
(``T``, ``B``, heads, ``num_splits``), never on ``seq_lens``: safe to capture in a CUDA graph.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from longseq.kernels.score_mods import NO_MODS, ScoreMods, kernel_args
from longseq.kernels.triton_score_mods import capped_scores, sink_factor

from .naive import retrieval_head_runs  # noqa: F401 - re-exported: host-side helper of this kernel's callers

#: Programs per SM that :func:`default_num_splits` aims at for the heads that do long work.
SPLIT_PROGRAMS_PER_SM = 4
MAX_SPLITS = 128  # batch 1 at 126K with 4 long heads on 132 SMs wants 132 (64 left SMs half full)
#: Decode-layout tuning (one query token per program): keys per tile, warps, software-pipeline stages (``None``:
#: Triton's default). One place to apply what ``benchmarks/bench_duo_kernels.py --variants`` measures best
#: (variant ``duo_t{tile_n}_w{num_warps}_st{num_stages}``).
#: ``use_dot=False``: scores and P.V as multiply-and-sum in registers over ``G`` rows (variant ``duo_fma_*``)
#: instead of tensor-core dots over 16 rows, which stage K and V through shared memory.
#: ``prefetch=True``: each program requests tile ``v+1`` before tile ``v``'s math (explicit double buffering in
#: registers, independent of Triton's software pipelining; variants ``*_pf``).
#: The defaults are the fastest variant of the tuning run (2 pipeline stages; more stages, 8 warps, tile 128,
#: prefetch and FMA were slower): docs/benchmarks/duo.md.
DECODE_TUNING: dict[str, int | bool | None] = {"tile_n": 64, "num_warps": 4, "num_stages": 2, "use_dot": True,
                                               "prefetch": False}


@triton.jit
def _find_seq(query_start_loc, qb, num_seqs, BLOCK_Q: tl.constexpr):
    """The request owning q block ``qb``: request ``s``'s blocks start at ``query_start_loc[s] // BLOCK_Q + s``
    (an upper bound of the blocks before it, so no request's blocks overlap the next one's)."""
    lo = 0
    hi = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        start = tl.load(query_start_loc + mid) // BLOCK_Q + mid
        if start <= qb:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit
def _load_tile(key_cache, value_cache, bt_row, v, v_hi, n_a, b_lo, n_keys, h, n, d, d_mask,
               s_kb, s_ko, s_kh, s_kd, s_vb, s_vo, s_vh, s_vd, s_btn,
               BLOCK_SIZE: tl.constexpr, TILE_N: tl.constexpr):
    """Virtual key tile ``v`` (tiles ``[0, n_a)`` then from ``b_lo``; nothing at or past ``v_hi``) of KV head
    ``h``: ``(j, key_ok, k, vt)`` = ``[TILE_N]`` key positions, which exist, ``[TILE_N, BLOCK_D]`` keys, values."""
    tile = tl.where(v < n_a, v, b_lo + v - n_a)
    j = tile * TILE_N + n
    key_ok = j < tl.where(v < v_hi, n_keys, 0)  # a tile past v_hi (the prefetch after the last) loads nothing
    blk = tl.load(bt_row + (j // BLOCK_SIZE) * s_btn, mask=key_ok, other=0).to(tl.int64)
    off = j % BLOCK_SIZE
    kv_mask = key_ok[:, None] & d_mask[None, :]
    k = tl.load(key_cache + (blk * s_kb + off * s_ko + h * s_kh)[:, None] + d[None, :] * s_kd, mask=kv_mask,
                other=0.0)
    vt = tl.load(value_cache + (blk * s_vb + off * s_vo + h * s_vh)[:, None] + d[None, :] * s_vd, mask=kv_mask,
                 other=0.0)
    return j, key_ok, k, vt


@triton.jit
def _attend_tile(qt, j, key_ok, k, vt, pos, retrieval, m_i, l_i, acc, qk_scale, cap_log2, sink_size, recent_size,
                 DOT_PRECISION: tl.constexpr, DOT_FP32: tl.constexpr, USE_DOT: tl.constexpr, SOFTCAP: tl.constexpr):
    """Online-softmax step of ``[BLOCK_M]`` query rows at positions ``pos`` over one key tile: ``(m_i, l_i, acc)``
    updated (running max and sum in log2 units, unnormalized output)."""
    p_dtype = vt.dtype
    if DOT_FP32:
        k, vt = k.to(tl.float32), vt.to(tl.float32)
    if USE_DOT:
        qk = tl.dot(qt, tl.trans(k), input_precision=DOT_PRECISION)  # [M, N]
    else:  # decode with BLOCK_M = G rows: multiply-and-sum in registers, K never staged in shared memory
        qk = tl.sum(qt.to(tl.float32)[:, None, :] * k.to(tl.float32)[None, :, :], axis=2)
    s = capped_scores(qk, qk_scale, cap_log2, SOFTCAP)  # log2 units
    jj = j[None, :]
    visible = key_ok[None, :] & (jj <= pos[:, None]) & (
        retrieval | (jj < sink_size) | (jj > pos[:, None] - recent_size))
    s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # no visible key yet: no NaNs
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    # P rounded to the cache dtype, as in flash attention: the second dot runs on the tensor cores too.
    if USE_DOT:
        acc = acc * alpha[:, None] + tl.dot(p.to(p_dtype).to(vt.dtype), vt, input_precision=DOT_PRECISION)
    else:
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * vt.to(tl.float32)[None, :, :], axis=1)
    return m_new, l_i, acc


@triton.jit
def _duo_attention_kernel(
    q, key_cache, value_cache, block_table, seq_lens, query_start_loc, kv_heads, is_streaming,
    out, part_o, part_lse, sinks,
    qk_scale, cap_log2, sink_size, recent_size, num_seqs, num_splits,
    s_qt, s_qh, s_qd, s_kb, s_ko, s_kh, s_kd, s_vb, s_vo, s_vh, s_vd, s_btb, s_btn, s_ot, s_oh, s_od,
    HQ: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, TILE_N: tl.constexpr,
    SPLIT: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_FP32: tl.constexpr, USE_DOT: tl.constexpr,
    PREFETCH: tl.constexpr, SOFTCAP: tl.constexpr, HAS_SINKS: tl.constexpr,
):
    qb = tl.program_id(0)
    h = tl.load(kv_heads + tl.program_id(1))
    split = tl.program_id(2)
    seq = _find_seq(query_start_loc, qb, num_seqs, BLOCK_Q)
    q_start = tl.load(query_start_loc + seq)
    q_len = tl.load(query_start_loc + seq + 1) - q_start
    q0 = (qb - (q_start // BLOCK_Q + seq)) * BLOCK_Q  # first query of this block, within the request
    if q0 >= q_len:  # past this request's last block (the grid is an upper bound)
        return
    seq_len = tl.load(seq_lens + seq)
    ctx = seq_len - q_len  # cached tokens before this step's queries
    retrieval = tl.load(is_streaming + h) == 0

    m = tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    d_mask = d < HEAD_DIM
    tok = q0 + m // GROUP
    row_mask = (m < BLOCK_Q * GROUP) & (tok < q_len)
    heads = h * GROUP + m % GROUP
    pos = ctx + tok  # [BLOCK_M] absolute query positions
    qt = tl.load(q + (q_start + tok)[:, None] * s_qt + heads[:, None] * s_qh + d[None, :] * s_qd,
                 mask=row_mask[:, None] & d_mask[None, :], other=0.0).to(key_cache.dtype.element_ty)
    if DOT_FP32:  # Triton's interpreter multiplies bf16 tiles as raw integers: do it in fp32 there
        qt = qt.to(tl.float32)

    # Key tiles to visit: [0, n_a) then [b_lo, b_hi). Retrieval: everything up to the last query.
    p_lo = ctx + q0
    n_keys = ctx + tl.minimum(q0 + BLOCK_Q, q_len)  # keys 0 .. p_hi
    all_tiles = tl.cdiv(n_keys, TILE_N)
    n_a = tl.where(retrieval, all_tiles, tl.cdiv(tl.minimum(sink_size, n_keys), TILE_N))
    b_lo = tl.maximum(tl.maximum(p_lo - recent_size + 1, 0) // TILE_N, n_a)
    n_tiles = n_a + tl.maximum(all_tiles - b_lo, 0)
    per_split = tl.cdiv(n_tiles, num_splits)
    v_lo = split * per_split
    v_hi = tl.minimum(v_lo + per_split, n_tiles)

    bt_row = block_table + seq.to(tl.int64) * s_btb
    n = tl.arange(0, TILE_N)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    if PREFETCH:  # tile v+1's keys/values are requested before tile v's math: two tiles in flight per program
        j, key_ok, k, vt = _load_tile(key_cache, value_cache, bt_row, v_lo, v_hi, n_a, b_lo, n_keys, h, n, d, d_mask,
                                      s_kb, s_ko, s_kh, s_kd, s_vb, s_vo, s_vh, s_vd, s_btn, BLOCK_SIZE, TILE_N)
        for v in range(v_lo, v_hi):
            j2, key_ok2, k2, vt2 = _load_tile(key_cache, value_cache, bt_row, v + 1, v_hi, n_a, b_lo, n_keys, h, n,
                                              d, d_mask, s_kb, s_ko, s_kh, s_kd, s_vb, s_vo, s_vh, s_vd, s_btn,
                                              BLOCK_SIZE, TILE_N)
            m_i, l_i, acc = _attend_tile(qt, j, key_ok, k, vt, pos, retrieval, m_i, l_i, acc, qk_scale, cap_log2,
                                         sink_size, recent_size, DOT_PRECISION, DOT_FP32, USE_DOT, SOFTCAP)
            j, key_ok, k, vt = j2, key_ok2, k2, vt2
    else:
        for v in range(v_lo, v_hi):
            j, key_ok, k, vt = _load_tile(key_cache, value_cache, bt_row, v, v_hi, n_a, b_lo, n_keys, h, n, d,
                                          d_mask, s_kb, s_ko, s_kh, s_kd, s_vb, s_vo, s_vh, s_vd, s_btn,
                                          BLOCK_SIZE, TILE_N)
            m_i, l_i, acc = _attend_tile(qt, j, key_ok, k, vt, pos, retrieval, m_i, l_i, acc, qk_scale, cap_log2,
                                         sink_size, recent_size, DOT_PRECISION, DOT_FP32, USE_DOT, SOFTCAP)
    o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    rows = q_start + tok
    mask = row_mask[:, None] & d_mask[None, :]
    if SPLIT:
        part = (rows.to(tl.int64) * HQ + heads) * num_splits + split  # part_o is [T, Hq, num_splits, D]
        tl.store(part_o + part[:, None] * HEAD_DIM + d[None, :], o, mask=mask)
        lse = tl.where(l_i > 0, m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
        tl.store(part_lse + part, lse, mask=row_mask)
    else:
        if HAS_SINKS:
            lse = tl.where(l_i > 0, m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
            o = o * sink_factor(lse, tl.load(sinks + heads))[:, None]
        tl.store(out + rows[:, None] * s_ot + heads[:, None] * s_oh + d[None, :] * s_od,
                 o.to(out.dtype.element_ty), mask=mask)


@triton.jit
def _merge_splits_kernel(part_o, part_lse, out, sinks, query_start_loc, num_seqs, num_splits, s_ot, s_oh, s_od,
                         HQ: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
                         HAS_SINKS: tl.constexpr):
    """``out[t, hq] = sum_s w_s * part_o[t, hq, s]`` with ``w`` the softmax of the splits' log2-sum-exps (empty
    splits weigh 0). Rows past the batch's last query (CUDA-graph padding, never written by the split
    kernel) get zeros, not whatever the uninitialized partials held."""
    row = tl.program_id(0)  # t * HQ + query head
    t = row // HQ
    hq = row % HQ
    d = tl.arange(0, BLOCK_D)
    d_mask = d < HEAD_DIM
    dst = out + t * s_ot + hq * s_oh + d * s_od
    if t >= tl.load(query_start_loc + num_seqs):
        tl.store(dst, tl.zeros([BLOCK_D], tl.float32).to(out.dtype.element_ty), mask=d_mask)
        return
    s = tl.arange(0, BLOCK_S)
    s_mask = s < num_splits
    base = row.to(tl.int64) * num_splits
    lse = tl.load(part_lse + base + s, mask=s_mask, other=float("-inf"))
    m = tl.max(lse, axis=0)
    w = tl.exp2(lse - tl.where(m == float("-inf"), 0.0, m))
    o = tl.load(part_o + (base + s)[:, None] * HEAD_DIM + d[None, :], mask=s_mask[:, None] & d_mask[None, :],
                other=0.0)
    w_sum = tl.sum(w, axis=0)
    res = tl.sum(w[:, None] * o, axis=0) / tl.where(w_sum > 0, w_sum, 1.0)
    if HAS_SINKS:
        lse_all = tl.where(w_sum > 0, m + tl.log2(tl.where(w_sum > 0, w_sum, 1.0)), float("-inf"))
        res = res * sink_factor(lse_all, tl.load(sinks + hq))
    tl.store(dst, res.to(out.dtype.element_ty), mask=d_mask)


def _num_sms(device: torch.device) -> int:
    from longseq.kernels.sparse_decode.decode import _num_sms as cached

    if device.type != "cuda":
        return 4
    return cached(device.index if device.index is not None else torch.cuda.current_device())


def default_num_splits(batch: int, num_long_heads: int, device: torch.device,
                       programs_per_sm: float = SPLIT_PROGRAMS_PER_SM) -> int:
    """Splits for a decode launch: about ``programs_per_sm`` programs per SM over the ``batch x num_long_heads``
    (request, retrieval KV head) pairs that read the whole context (streaming heads need one split; their
    other splits return at once). From shapes only, so a captured CUDA graph stays valid."""
    sms = _num_sms(device)
    return max(1, min(MAX_SPLITS, triton.cdiv(int(programs_per_sm * sms), max(batch * num_long_heads, 1))))


def block_shape(group: int, max_query_len: int, head_size: int) -> tuple[int, int, int]:
    """``(BLOCK_Q, BLOCK_M, TILE_N)``: one query token per program for decode-only launches, else as many as
    fit 64 rows (GQA heads packed); 64-key tiles (32 for head size 256)."""
    if max_query_len <= 1:
        block_q = 1
        block_m = max(16, triton.next_power_of_2(group))
    else:
        block_m = max(64, triton.next_power_of_2(group))
        block_q = block_m // group
    return block_q, block_m, 64 if head_size <= 128 else 32


def duo_paged_attention(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                        block_table: torch.Tensor, query_start_loc: torch.Tensor, seq_lens: torch.Tensor,
                        is_streaming: torch.Tensor, sink_size: int, recent_size: int, scale: float,
                        max_query_len: int, out: torch.Tensor | None = None, kv_heads: torch.Tensor | None = None,
                        num_splits: int | None = None, num_warps: int | None = None,
                        num_stages: int | None = None, tile_n: int | None = None,
                        use_dot: bool | None = None, prefetch: bool | None = None,
                        mods: ScoreMods = NO_MODS) -> torch.Tensor:
    """DuoAttention for a batch of requests (prefill chunks and decodes, any mix) over a paged KV cache.

    Args:
        query: ``[T, Hq, D]`` fp16/bf16/fp32 (any strides); request ``b``'s queries are rows
            ``query_start_loc[b] .. query_start_loc[b+1]-1``, at the last positions of its ``seq_lens[b]`` tokens.
        key_cache, value_cache: ``[num_blocks, block_size, Hkv, D]``, any strides, holding this step's keys.
        block_table: ``[B, max_blocks]`` int32; query_start_loc: ``[B+1]`` int32; seq_lens: ``[B]`` int32 (all on
            the query's device).
        is_streaming: ``[Hkv]`` bool/int8, the layer's streaming KV heads (this rank's).
        sink_size, recent_size: streaming sizes (positive); scale: softmax scale.
        max_query_len: an upper bound of the requests' query lengths (host int): ``1`` selects the decode
            layout (one token per program, split-K), anything larger the prefill layout.
        out: optional ``[T, Hq, D]`` output (any strides); rows of KV heads not in ``kv_heads`` are left as they
            are; rows past ``query_start_loc[B]`` (padding) too, or zeroed when ``num_splits > 1``.
        kv_heads: ``[n]`` int32 KV heads to compute (default: all).
        num_splits: split-K factor (default: 1 for prefill layouts, :func:`default_num_splits` over the
            retrieval heads for decode); needs ``kv_heads`` = all heads when > 1.
        num_warps, num_stages, tile_n (keys per tile, a power of two >= 16), use_dot (decode layout only:
            ``False`` = register multiply-and-sum instead of tensor-core dots), prefetch (request the next key
            tile before the current one's math): tuning, defaults from
            :data:`DECODE_TUNING` for decode.
        mods: the layer's soft-cap and sinks (``longseq/kernels/score_mods.py``).

    Returns:
        ``out`` (allocated like ``query`` when not given).
    """
    t, hq, d = query.shape
    num_blocks, block_size, hkv, dk = key_cache.shape
    if dk != d or value_cache.shape != key_cache.shape or hq % hkv:
        raise ValueError(f"shapes do not fit: query {tuple(query.shape)}, key_cache {tuple(key_cache.shape)}, "
                         f"value_cache {tuple(value_cache.shape)}")
    if tuple(is_streaming.shape) != (hkv,):
        raise ValueError(f"is_streaming must be [Hkv]=[{hkv}], got {tuple(is_streaming.shape)}")
    out = torch.empty_like(query) if out is None else out
    num_seqs = seq_lens.shape[0]
    if t == 0 or num_seqs == 0:
        return out
    group = hq // hkv
    if kv_heads is None:
        kv_heads = torch.arange(hkv, dtype=torch.int32, device=query.device)
    block_q, block_m, default_tile = block_shape(group, max_query_len, d)
    if max_query_len <= 1:
        tile_n = tile_n or (DECODE_TUNING["tile_n"] if d <= 128 else None)
        num_warps = num_warps or DECODE_TUNING["num_warps"]
        num_stages = num_stages or DECODE_TUNING["num_stages"]
        use_dot = DECODE_TUNING["use_dot"] if use_dot is None else use_dot
        prefetch = DECODE_TUNING["prefetch"] if prefetch is None else prefetch
        if not use_dot:
            block_m = max(2, triton.next_power_of_2(group))
    elif use_dot is False:
        raise ValueError("use_dot=False is for the decode layout (max_query_len <= 1) only")
    tile_n = tile_n or default_tile
    if num_splits is None:
        num_splits = 1 if max_query_len > 1 else default_num_splits(num_seqs, hkv, query.device)
    split = num_splits > 1
    if split and kv_heads.shape[0] != hkv:
        raise ValueError("split-K needs every KV head in kv_heads (the merge writes all heads)")
    if split:
        part_o = torch.empty(t, hq, num_splits, d, dtype=torch.float32, device=query.device)
        part_lse = torch.empty(t, hq, num_splits, dtype=torch.float32, device=query.device)
    else:
        part_o = part_lse = out  # unused
    interp_bf16 = key_cache.dtype == torch.bfloat16 and not key_cache.is_cuda  # CPU tensors: interpreter
    extra = {} if num_stages is None else {"num_stages": num_stages}
    grid = (t // block_q + num_seqs, kv_heads.shape[0], num_splits)
    qk_scale, cap_log2, sinks = kernel_args(scale, mods, query.device, hq, out)  # sinks: log2 units
    _duo_attention_kernel[grid](
        query, key_cache, value_cache, block_table, seq_lens, query_start_loc, kv_heads,
        is_streaming.to(torch.int8) if is_streaming.dtype == torch.bool else is_streaming,
        out, part_o, part_lse, sinks,
        qk_scale, cap_log2, int(sink_size), int(recent_size), num_seqs, num_splits,
        *query.stride(), *key_cache.stride(), *value_cache.stride(), *block_table.stride(), *out.stride(),
        HQ=hq, GROUP=group, HEAD_DIM=d, BLOCK_D=max(16, triton.next_power_of_2(d)), BLOCK_SIZE=block_size,
        BLOCK_Q=block_q, BLOCK_M=block_m, TILE_N=tile_n, SPLIT=split, USE_DOT=use_dot is not False,
        PREFETCH=bool(prefetch), SOFTCAP=mods.softcap is not None, HAS_SINKS=mods.sinks is not None,
        DOT_PRECISION="ieee" if key_cache.dtype == torch.float32 or interp_bf16 else None,
        DOT_FP32=interp_bf16, num_warps=num_warps or 4, **extra,
    )
    if split:
        _merge_splits_kernel[(t * hq,)](
            part_o, part_lse, out, sinks, query_start_loc, num_seqs, num_splits, *out.stride(),
            HQ=hq, HEAD_DIM=d, BLOCK_S=triton.next_power_of_2(num_splits),
            BLOCK_D=triton.next_power_of_2(d), HAS_SINKS=mods.sinks is not None,
            num_warps=8 if num_splits > 32 else 4,
        )
    return out
