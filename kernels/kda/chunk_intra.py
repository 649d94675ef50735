"""Intra-chunk part of the chunked KDA prefill: one program per (64-row chunk, head), all chunks in parallel.

Within a chunk, with G_t = exp(gc_t) the per-channel decay since the chunk start (gc: chunk-local cumsum of
the gate) and S0 the state entering the chunk, the delta rule's corrected values U = [u_t] solve

    (I + A) U = diag(b) V - diag(b) (K*G) S0,     A[i, j] = b_i sum_c k_i[c] k_j[c] exp(gc_i[c] - gc_j[c])  (j < i)

so with T = (I + A)^-1 (WY representation):  U = u - w S0,  u = T diag(b) V,  w = T diag(b) (K*G).
The output is  o = (scale q*G) S0 + Aqk U  with  Aqk[i, j] = scale sum_c q_i[c] k_j[c] exp(gc_i[c] - gc_j[c])
(j <= i), and the state leaving the chunk  S = exp(gc_last) * S0 + (K * exp(gc_last - gc))^T U.

This kernel writes u, w, qg = scale q*G, kd = K*exp(gc_last - gc) and Aqk; ``chunk.py``'s sequential kernel
then carries S across chunks. A and Aqk are built from 16-row sub-chunks: across sub-chunks the decay
factorizes around the row just before the later sub-chunk (both factors <= 1, no overflow for any gate
value); within a sub-chunk it is computed exactly per channel (no factorization, so no overflow either).
T comes from forward substitution on the 16x16 diagonal blocks and block merges for the rest.

Known weak point: at K=V=128 on sm_90 this kernel spills (ptxas: 255 registers, ~2.2 KB stack per thread with
8 warps, ~1.1 KB of it from the A/Aqk blocks alone), and compiles in about a minute. Next step if the bench
shows it as the bottleneck: one [16, K] x [K, 64] dot per row block instead of six 16x16 blocks, or the
A/Aqk part and the solve/WY part as two launches (as fla does).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .utils import chunk_bounds

BC = 16  # sub-chunk rows


@triton.jit
def _rows(ptr, row0, eos, i_h, H: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, BC: tl.constexpr):
    """Rows [row0, row0 + BC) of a [tokens, H, D] tensor, head i_h, as fp32 [BC, BD]; rows >= eos are 0."""
    o_r = row0 + tl.arange(0, BC)
    o_d = tl.arange(0, BD)
    mask = (o_r[:, None] < eos) & (o_d[None, :] < D)
    return tl.load(ptr + o_r[:, None] * (H * D) + i_h * D + o_d[None, :], mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _store_rows(ptr, x, row0, eos, i_h, H: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, BC: tl.constexpr):
    o_r = row0 + tl.arange(0, BC)
    o_d = tl.arange(0, BD)
    mask = (o_r[:, None] < eos) & (o_d[None, :] < D)
    tl.store(ptr + o_r[:, None] * (H * D) + i_h * D + o_d[None, :], x.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rnorm(ptr, row0, eos, i_h, H: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, BC: tl.constexpr,
           L2NORM: tl.constexpr):
    """Per-row factor that L2-normalizes (1 when not L2NORM), [BC]."""
    if L2NORM:
        x = _rows(ptr, row0, eos, i_h, H, D, BD, BC)
        return 1.0 / tl.sqrt(tl.sum(x * x, axis=1) + 1e-6)
    else:
        return tl.full([BC], 1.0, tl.float32)


@triton.jit
def _beta(beta, row0, eos, i_h, H: tl.constexpr, BC: tl.constexpr, BETA_SIGMOID: tl.constexpr):
    o_r = row0 + tl.arange(0, BC)
    b = tl.load(beta + o_r * H + i_h, mask=o_r < eos, other=0.0).to(tl.float32)
    if BETA_SIGMOID:
        b = tl.where(o_r < eos, tl.sigmoid(b), 0.0)
    return b


@triton.jit
def _offdiag_block(q, k, gc, row_i, row_j, eos, i_h, rq_i, rk_i, rk_j, H: tl.constexpr, K: tl.constexpr,
                   BK: tl.constexpr, BC: tl.constexpr, DOT_PREC: tl.constexpr):
    """(sum_c k_i k_j decay, sum_c q_i k_j decay) for rows i of a later sub-chunk and j of an earlier one.

    decay = exp(gc_i - gc_r) * exp(gc_r - gc_j) with r = row_i - 1: gc only decreases, so both are <= 1.
    """
    o_k = tl.arange(0, BK)
    o_c = tl.arange(0, BC)
    # if row_i - 1 is past the end, so is the whole later sub-chunk: zero both factors (vector compares:
    # the interpreter refuses scalar masks)
    g_ref = tl.load(gc + (row_i - 1) * (H * K) + i_h * K + o_k, mask=(o_k < K) & (row_i - 1 + 0 * o_k < eos),
                    other=0.0)
    valid_i = (row_i + o_c) < eos
    valid_j = ((row_j + o_c) < eos) & (row_i - 1 + 0 * o_c < eos)
    # where() inside exp(): rows past the end must not overflow either (inf * 0 would be NaN)
    f_i = tl.where(valid_i[:, None],
                   tl.exp(tl.where(valid_i[:, None], _rows(gc, row_i, eos, i_h, H, K, BK, BC) - g_ref[None, :], 0.0)),
                   0.0)
    f_j = tl.where(valid_j[:, None],
                   tl.exp(tl.where(valid_j[:, None], g_ref[None, :] - _rows(gc, row_j, eos, i_h, H, K, BK, BC), 0.0)),
                   0.0)
    k_j = _rows(k, row_j, eos, i_h, H, K, BK, BC) * rk_j[:, None] * f_j
    k_i = _rows(k, row_i, eos, i_h, H, K, BK, BC) * rk_i[:, None] * f_i
    q_i = _rows(q, row_i, eos, i_h, H, K, BK, BC) * rq_i[:, None] * f_i
    a_kk = tl.dot(k_i, tl.trans(k_j), input_precision=DOT_PREC)
    a_qk = tl.dot(q_i, tl.trans(k_j), input_precision=DOT_PREC)
    return a_kk, a_qk


@triton.jit
def _diag_block(q, k, gc, row0, eos, i_h, rq, rk, H: tl.constexpr, K: tl.constexpr, BK: tl.constexpr,
                BC: tl.constexpr):
    """Same as _offdiag_block within one sub-chunk, decay exp(gc_i - gc_j) per channel (exact), j <= i.

    One row i per iteration against the sub-chunk's [BC, K] tiles (a [BC, BC, K] broadcast would not fit in
    registers); a runtime loop, not unrolled, so the compiler does not hoist every row's loads at once.
    """
    o_c = tl.arange(0, BC)
    o_k = tl.arange(0, BK)
    valid = (row0 + o_c) < eos
    g_j = _rows(gc, row0, eos, i_h, H, K, BK, BC)
    k_j = _rows(k, row0, eos, i_h, H, K, BK, BC) * rk[:, None]
    a_kk = tl.zeros([BC, BC], dtype=tl.float32)
    a_qk = tl.zeros([BC, BC], dtype=tl.float32)
    for i in tl.range(0, BC, loop_unroll_factor=1):
        row = row0 + i
        m_k = (o_k < K) & (row + 0 * o_k < eos)
        offs = row * (H * K) + i_h * K + o_k
        g_i = tl.load(gc + offs, mask=m_k, other=0.0)
        k_i = tl.load(k + offs, mask=m_k, other=0.0).to(tl.float32) * tl.sum(tl.where(o_c == i, rk, 0.0))
        q_i = tl.load(q + offs, mask=m_k, other=0.0).to(tl.float32) * tl.sum(tl.where(o_c == i, rq, 0.0))
        keep = (o_c <= i) & valid & (row + 0 * o_c < eos)  # columns j <= i, both rows inside the sequence
        kj_e = k_j * tl.exp(tl.where(keep[:, None], g_i[None, :] - g_j, float("-inf")))
        a_kk = tl.where(o_c[:, None] == i, tl.sum(kj_e * k_i[None, :], axis=1)[None, :], a_kk)
        a_qk = tl.where(o_c[:, None] == i, tl.sum(kj_e * q_i[None, :], axis=1)[None, :], a_qk)
    return a_kk, a_qk


@triton.jit
def _invert_unit_lower(a, BC: tl.constexpr):
    """(I + a)^-1 for a strictly lower-triangular [BC, BC] a, by forward substitution (row i = e_i - a_i T)."""
    o = tl.arange(0, BC)
    t = (o[:, None] == o[None, :]).to(tl.float32)
    for i in tl.static_range(1, BC):
        a_i = tl.sum(tl.where(o[:, None] == i, a, 0.0), axis=0)  # row i of a, indexed by column j
        row = tl.sum(a_i[:, None] * t, axis=0)  # sum_j a[i, j] T[j, :]
        t = tl.where(o[:, None] == i, t - row[None, :], t)
    return t


@triton.jit
def _store_aqk(aqk, x, row_i, col0, eos, i_h, H: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr):
    o_r = row_i + tl.arange(0, BC)
    tl.store(aqk + o_r[:, None] * (H * BT) + i_h * BT + col0 + tl.arange(0, BC)[None, :], x,
             mask=o_r[:, None] < eos)


@triton.jit
def _wy_rhs(k, v, gc, beta_j, rk_j, row_j, eos, i_h, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
            BK: tl.constexpr, BVF: tl.constexpr, BC: tl.constexpr):
    """(b_j k_j exp(gc_j), b_j v_j) for one sub-chunk: the right-hand sides of w and u."""
    x = _rows(k, row_j, eos, i_h, H, K, BK, BC) * (rk_j * beta_j)[:, None] \
        * tl.exp(_rows(gc, row_j, eos, i_h, H, K, BK, BC))
    y = _rows(v, row_j, eos, i_h, H, V, BVF, BC) * beta_j[:, None]
    return x, y


@triton.jit
def _wy_block(w, u, k, v, gc, t_0, t_1, t_2, t_3, b_0, b_1, b_2, b_3, rk_0, rk_1, rk_2, rk_3, row_0, row_1, row_2,
              row_3, row_out, eos, i_h, NB: tl.constexpr, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
              BK: tl.constexpr, BVF: tl.constexpr, BC: tl.constexpr, DOT_PREC: tl.constexpr):
    """Rows ``row_out`` of w and u: sum over the first NB sub-chunks j of T[out, j] @ (rhs of sub-chunk j)."""
    x, y = _wy_rhs(k, v, gc, b_0, rk_0, row_0, eos, i_h, H, K, V, BK, BVF, BC)
    acc_w = tl.dot(t_0, x, input_precision=DOT_PREC)
    acc_u = tl.dot(t_0, y, input_precision=DOT_PREC)
    if NB > 1:
        x, y = _wy_rhs(k, v, gc, b_1, rk_1, row_1, eos, i_h, H, K, V, BK, BVF, BC)
        acc_w = tl.dot(t_1, x, acc=acc_w, input_precision=DOT_PREC)
        acc_u = tl.dot(t_1, y, acc=acc_u, input_precision=DOT_PREC)
    if NB > 2:
        x, y = _wy_rhs(k, v, gc, b_2, rk_2, row_2, eos, i_h, H, K, V, BK, BVF, BC)
        acc_w = tl.dot(t_2, x, acc=acc_w, input_precision=DOT_PREC)
        acc_u = tl.dot(t_2, y, acc=acc_u, input_precision=DOT_PREC)
    if NB > 3:
        x, y = _wy_rhs(k, v, gc, b_3, rk_3, row_3, eos, i_h, H, K, V, BK, BVF, BC)
        acc_w = tl.dot(t_3, x, acc=acc_w, input_precision=DOT_PREC)
        acc_u = tl.dot(t_3, y, acc=acc_u, input_precision=DOT_PREC)
    _store_rows(w, acc_w, row_out, eos, i_h, H, K, BK, BC)
    _store_rows(u, acc_u, row_out, eos, i_h, H, V, BVF, BC)


@triton.jit
def kda_chunk_intra_kernel(
    q, k, v, gc, beta, w, u, qg, kd, aqk, cu_seqlens, chunk_indices, scale, T,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BVF: tl.constexpr, BT: tl.constexpr,
    BC: tl.constexpr, L2NORM: tl.constexpr, BETA_SIGMOID: tl.constexpr,
    IS_VARLEN: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """q, k, gc, w, qg, kd: [tokens, H, K]; v, u: [tokens, H, V]; beta: [tokens, H]; aqk: [tokens, H, BT] fp32
    (row t holds its chunk's columns; only j <= t is written). gc is fp32, chunk-local cumsum of the gate."""
    i_c, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    bos, eos, i_c = chunk_bounds(cu_seqlens, chunk_indices, i_c, i_b, T, IS_VARLEN)
    r0 = bos + i_c * BT
    r1, r2, r3 = r0 + BC, r0 + 2 * BC, r0 + 3 * BC
    rq0 = _rnorm(q, r0, eos, i_h, H, K, BK, BC, L2NORM)
    rq1 = _rnorm(q, r1, eos, i_h, H, K, BK, BC, L2NORM)
    rq2 = _rnorm(q, r2, eos, i_h, H, K, BK, BC, L2NORM)
    rq3 = _rnorm(q, r3, eos, i_h, H, K, BK, BC, L2NORM)
    rk0 = _rnorm(k, r0, eos, i_h, H, K, BK, BC, L2NORM)
    rk1 = _rnorm(k, r1, eos, i_h, H, K, BK, BC, L2NORM)
    rk2 = _rnorm(k, r2, eos, i_h, H, K, BK, BC, L2NORM)
    rk3 = _rnorm(k, r3, eos, i_h, H, K, BK, BC, L2NORM)
    b0 = _beta(beta, r0, eos, i_h, H, BC, BETA_SIGMOID)
    b1 = _beta(beta, r1, eos, i_h, H, BC, BETA_SIGMOID)
    b2 = _beta(beta, r2, eos, i_h, H, BC, BETA_SIGMOID)
    b3 = _beta(beta, r3, eos, i_h, H, BC, BETA_SIGMOID)

    # A (scaled by beta of its row, strictly lower) and Aqk (scaled, lower incl. diagonal), block by block
    lower = tl.arange(0, BC)[:, None] > tl.arange(0, BC)[None, :]
    a00, s00 = _diag_block(q, k, gc, r0, eos, i_h, rq0, rk0, H, K, BK, BC)
    a11, s11 = _diag_block(q, k, gc, r1, eos, i_h, rq1, rk1, H, K, BK, BC)
    a22, s22 = _diag_block(q, k, gc, r2, eos, i_h, rq2, rk2, H, K, BK, BC)
    a33, s33 = _diag_block(q, k, gc, r3, eos, i_h, rq3, rk3, H, K, BK, BC)
    a10, s10 = _offdiag_block(q, k, gc, r1, r0, eos, i_h, rq1, rk1, rk0, H, K, BK, BC, DOT_PREC)
    a20, s20 = _offdiag_block(q, k, gc, r2, r0, eos, i_h, rq2, rk2, rk0, H, K, BK, BC, DOT_PREC)
    a21, s21 = _offdiag_block(q, k, gc, r2, r1, eos, i_h, rq2, rk2, rk1, H, K, BK, BC, DOT_PREC)
    a30, s30 = _offdiag_block(q, k, gc, r3, r0, eos, i_h, rq3, rk3, rk0, H, K, BK, BC, DOT_PREC)
    a31, s31 = _offdiag_block(q, k, gc, r3, r1, eos, i_h, rq3, rk3, rk1, H, K, BK, BC, DOT_PREC)
    a32, s32 = _offdiag_block(q, k, gc, r3, r2, eos, i_h, rq3, rk3, rk2, H, K, BK, BC, DOT_PREC)
    _store_aqk(aqk, s00 * scale, r0, 0, eos, i_h, H, BT, BC)
    _store_aqk(aqk, s10 * scale, r1, 0, eos, i_h, H, BT, BC)
    _store_aqk(aqk, s11 * scale, r1, BC, eos, i_h, H, BT, BC)
    _store_aqk(aqk, s20 * scale, r2, 0, eos, i_h, H, BT, BC)
    _store_aqk(aqk, s21 * scale, r2, BC, eos, i_h, H, BT, BC)
    _store_aqk(aqk, s22 * scale, r2, 2 * BC, eos, i_h, H, BT, BC)
    _store_aqk(aqk, s30 * scale, r3, 0, eos, i_h, H, BT, BC)
    _store_aqk(aqk, s31 * scale, r3, BC, eos, i_h, H, BT, BC)
    _store_aqk(aqk, s32 * scale, r3, 2 * BC, eos, i_h, H, BT, BC)
    _store_aqk(aqk, s33 * scale, r3, 3 * BC, eos, i_h, H, BT, BC)

    # T = (I + A)^-1: diagonal blocks by substitution, then T_ij = -T_ii sum_{j<=m<i} A_im T_mj
    t00 = _invert_unit_lower(tl.where(lower, a00 * b0[:, None], 0.0), BC)
    t11 = _invert_unit_lower(tl.where(lower, a11 * b1[:, None], 0.0), BC)
    t22 = _invert_unit_lower(tl.where(lower, a22 * b2[:, None], 0.0), BC)
    t33 = _invert_unit_lower(tl.where(lower, a33 * b3[:, None], 0.0), BC)
    a10 = a10 * b1[:, None]
    a20 = a20 * b2[:, None]
    a21 = a21 * b2[:, None]
    a30 = a30 * b3[:, None]
    a31 = a31 * b3[:, None]
    a32 = a32 * b3[:, None]
    t10 = -tl.dot(t11, tl.dot(a10, t00, input_precision=DOT_PREC), input_precision=DOT_PREC)
    t21 = -tl.dot(t22, tl.dot(a21, t11, input_precision=DOT_PREC), input_precision=DOT_PREC)
    t32 = -tl.dot(t33, tl.dot(a32, t22, input_precision=DOT_PREC), input_precision=DOT_PREC)
    t20 = -tl.dot(t22, tl.dot(a20, t00, input_precision=DOT_PREC) + tl.dot(a21, t10, input_precision=DOT_PREC),
                  input_precision=DOT_PREC)
    t31 = -tl.dot(t33, tl.dot(a31, t11, input_precision=DOT_PREC) + tl.dot(a32, t21, input_precision=DOT_PREC),
                  input_precision=DOT_PREC)
    t30 = -tl.dot(t33, tl.dot(a30, t00, input_precision=DOT_PREC) + tl.dot(a31, t10, input_precision=DOT_PREC)
                  + tl.dot(a32, t20, input_precision=DOT_PREC), input_precision=DOT_PREC)

    # w = T diag(b) (K*G), u = T diag(b) V, row block by row block; the right-hand sides are rebuilt from
    # (cached) memory at each use rather than kept: eight [16, K] fp32 tiles live at once would spill
    _wy_block(w, u, k, v, gc, t00, t00, t00, t00, b0, b0, b0, b0, rk0, rk0, rk0, rk0, r0, r0, r0, r0, r0, eos,
              i_h, 1, H, K, V, BK, BVF, BC, DOT_PREC)
    _wy_block(w, u, k, v, gc, t10, t11, t11, t11, b0, b1, b1, b1, rk0, rk1, rk1, rk1, r0, r1, r1, r1, r1, eos,
              i_h, 2, H, K, V, BK, BVF, BC, DOT_PREC)
    _wy_block(w, u, k, v, gc, t20, t21, t22, t22, b0, b1, b2, b2, rk0, rk1, rk2, rk2, r0, r1, r2, r2, r2, eos,
              i_h, 3, H, K, V, BK, BVF, BC, DOT_PREC)
    _wy_block(w, u, k, v, gc, t30, t31, t32, t33, b0, b1, b2, b3, rk0, rk1, rk2, rk3, r0, r1, r2, r3, r3, eos,
              i_h, 4, H, K, V, BK, BVF, BC, DOT_PREC)

    # qg = scale q exp(gc), kd = k exp(gc_last - gc), gc_last = gc of the chunk's last valid row
    o_k = tl.arange(0, BK)
    last = tl.minimum(r0 + BT, eos) - 1
    g_last = tl.load(gc + last * (H * K) + i_h * K + o_k, mask=o_k < K, other=0.0)
    for sub in tl.static_range(0, BT // BC):
        rs = r0 + sub * BC
        b_g = _rows(gc, rs, eos, i_h, H, K, BK, BC)
        valid = (rs + tl.arange(0, BC)) < eos
        b_q = _rows(q, rs, eos, i_h, H, K, BK, BC) * _rnorm(q, rs, eos, i_h, H, K, BK, BC, L2NORM)[:, None]
        b_k = _rows(k, rs, eos, i_h, H, K, BK, BC) * _rnorm(k, rs, eos, i_h, H, K, BK, BC, L2NORM)[:, None]
        _store_rows(qg, b_q * tl.exp(b_g) * scale, rs, eos, i_h, H, K, BK, BC)
        b_decay = tl.where(valid[:, None], tl.exp(tl.where(valid[:, None], g_last[None, :] - b_g, 0.0)), 0.0)
        _store_rows(kd, b_k * b_decay, rs, eos, i_h, H, K, BK, BC)
