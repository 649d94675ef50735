"""Intra-chunk part of the chunked KDA prefill: one program per (64-row chunk, head), all chunks in parallel.

Within a chunk, with G_t = exp(gc_t) the per-channel decay since the chunk start (gc: chunk-local cumsum of
the gate) and S0 the state entering the chunk, the delta rule's corrected values U = [u_t] solve

    (I + A) U = diag(b) V - diag(b) (K*G) S0,     A[i, j] = b_i sum_c k_i[c] k_j[c] exp(gc_i[c] - gc_j[c])  (j < i)

so with T = (I + A)^-1 (WY representation):  U = u - w S0,  u = T diag(b) V,  w = T diag(b) (K*G).
The output is  o = (scale q*G) S0 + Aqk U  with  Aqk[i, j] = scale sum_c q_i[c] k_j[c] exp(gc_i[c] - gc_j[c])
(j <= i), and the state leaving the chunk  S = exp(gc_last) * S0 + (K * exp(gc_last - gc))^T U.

This kernel writes u, w, qg = scale q*G, kd = K*exp(gc_last - gc) and Aqk; ``chunk.py``'s sequential kernel
then carries S across chunks. Rows go in 16-row blocks: within a block the decay is computed exactly per channel
(no factorization, so no overflow for any gate value); against the earlier rows of the chunk it factorizes
around the row just before the block (both factors <= 1), one [16, K] x [K, 64] dot per block. T's rows follow
by block forward substitution, T_i = (I + A_ii)^-1 (E_i - A_i,<i T_<i), the earlier rows of T passing through
a scratch buffer (``tbuf``) of this program.

Known weak point: at K=V=128 on sm_90 this kernel spills (ptxas -res-usage: 255 registers and ~2 KB of stack
per thread with 4 warps; an earlier 16x16-block formulation spilled as much), and compiles in about a minute.
If the bench shows it as the bottleneck, the next step is splitting it (A/Aqk, then solve + WY) as fla does.
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
def kda_chunk_intra_kernel(
    q, k, v, gc, beta, w, u, qg, kd, aqk, tbuf, cu_seqlens, chunk_indices, scale, T,
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
    o_t = tl.arange(0, BT)
    o_c = tl.arange(0, BC)
    o_k = tl.arange(0, BK)
    valid_t = (r0 + o_t) < eos
    rk_all = _rnorm(k, r0, eos, i_h, H, K, BK, BT, L2NORM)
    b_all = _beta(beta, r0, eos, i_h, H, BT, BETA_SIGMOID)
    lower = o_c[:, None] > o_c[None, :]
    # Row block by row block (16 rows): the A and Aqk rows, then T's rows from the rows before (through tbuf,
    # this program's scratch rows of T), then the w and u rows.
    #   (I + A) T = I  =>  T_i = (I + A_ii)^-1 (E_i - A_i,<i T_<i)
    for bi in tl.static_range(0, BT // BC):
        row_i = r0 + bi * BC
        valid_i = (row_i + o_c) < eos
        rq_i = _rnorm(q, row_i, eos, i_h, H, K, BK, BC, L2NORM)
        rk_i = _rnorm(k, row_i, eos, i_h, H, K, BK, BC, L2NORM)
        b_i = _beta(beta, row_i, eos, i_h, H, BC, BETA_SIGMOID)
        a_ii, s_ii = _diag_block(q, k, gc, row_i, eos, i_h, rq_i, rk_i, H, K, BK, BC)
        _store_aqk(aqk, s_ii * scale, row_i, bi * BC, eos, i_h, H, BT, BC)
        rhs = ((o_c[:, None] + bi * BC) == o_t[None, :]).to(tl.float32)  # E_i: rows of the identity
        if bi > 0:
            # columns j < 16*bi: decay factorized around row_i - 1, both factors <= 1
            ref_ok = row_i - 1 + 0 * o_k < eos
            g_ref = tl.load(gc + (row_i - 1) * (H * K) + i_h * K + o_k, mask=(o_k < K) & ref_ok, other=0.0)
            d_i = _rows(gc, row_i, eos, i_h, H, K, BK, BC) - g_ref[None, :]
            f_i = tl.where(valid_i[:, None], tl.exp(tl.where(valid_i[:, None], d_i, 0.0)), 0.0)
            k_l = _rows(k, row_i, eos, i_h, H, K, BK, BC) * rk_i[:, None] * f_i
            q_l = _rows(q, row_i, eos, i_h, H, K, BK, BC) * rq_i[:, None] * f_i
            keep_j = (o_t < bi * BC) & valid_t & (row_i - 1 + 0 * o_t < eos)
            d_j = g_ref[None, :] - _rows(gc, r0, eos, i_h, H, K, BK, BT)
            f_j = tl.where(keep_j[:, None], tl.exp(tl.where(keep_j[:, None], d_j, 0.0)), 0.0)
            k_r = _rows(k, r0, eos, i_h, H, K, BK, BT) * rk_all[:, None] * f_j
            a_off = tl.dot(k_l, tl.trans(k_r), input_precision=DOT_PREC)  # [BC, BT], zero for j >= 16*bi
            s_off = tl.dot(q_l, tl.trans(k_r), input_precision=DOT_PREC)
            tl.store(aqk + (row_i + o_c)[:, None] * (H * BT) + i_h * BT + o_t[None, :], s_off * scale,
                     mask=valid_i[:, None] & (o_t[None, :] < bi * BC))
            t_prev = tl.load(tbuf + (r0 + o_t)[:, None] * (H * BT) + i_h * BT + o_t[None, :],
                             mask=(valid_t & (o_t < bi * BC))[:, None], other=0.0)
            rhs = rhs - tl.dot(a_off * b_i[:, None], t_prev, input_precision=DOT_PREC)
        t_i = tl.dot(_invert_unit_lower(tl.where(lower, a_ii * b_i[:, None], 0.0), BC), rhs,
                     input_precision=DOT_PREC)  # [BC, BT] rows of T
        if bi < BT // BC - 1:
            tl.store(tbuf + (row_i + o_c)[:, None] * (H * BT) + i_h * BT + o_t[None, :], t_i,
                     mask=valid_i[:, None])
            tl.debug_barrier()  # the next row block reads these rows (other threads of this program)
        # w = T diag(b) (K*G), u = T diag(b) V
        x_all, y_all = _wy_rhs(k, v, gc, b_all, rk_all, r0, eos, i_h, H, K, V, BK, BVF, BT)
        _store_rows(w, tl.dot(t_i, x_all, input_precision=DOT_PREC), row_i, eos, i_h, H, K, BK, BC)
        _store_rows(u, tl.dot(t_i, y_all, input_precision=DOT_PREC), row_i, eos, i_h, H, V, BVF, BC)

    # qg = scale q exp(gc), kd = k exp(gc_last - gc), gc_last = gc of the chunk's last valid row
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
