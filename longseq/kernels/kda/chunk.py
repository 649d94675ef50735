"""Chunked KDA prefill (chunk 64, varlen via cu_seqlens, initial and final fp32 state): three launches.

1. ``kda_gate_chunk_cumsum`` (gate.py): gate (optional) + chunk-local cumsum of the log decay -> gc, fp32.
2. ``kda_chunk_intra_kernel`` (chunk_intra.py), all chunks in parallel: L2 norm of q/k and sigmoid(beta)
   (optional, fused), the intra-chunk matrices, the WY solve -> w, u, qg, kd, Aqk.
3. ``kda_chunk_state_kernel`` (here), grid (V / BV, N * H), sequential over each sequence's chunks: carries
   the [K, BV] state slice in registers and writes the output of every chunk on the way (fla writes the
   per-chunk states to memory and computes the output in a further launch; here they never leave registers).

Layouts follow vLLM 0.26's vendored fla: q, k ``[B, T, H, K]``, v ``[B, T, H, V]``, g ``[B, T, H, K]``,
beta ``[B, T, H]``, states ``[N, H, V, K]`` fp32 (V first). Reference: ``naive.naive_recurrent_kda``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .chunk_intra import BC, kda_chunk_intra_kernel
from .fused_recurrent import reject_unsupported
from .gate import kda_gate_chunk_cumsum
from .utils import CHUNK_SIZE, check_head_dims, check_state, prepare_chunk_indices, sequence_bounds


@triton.jit
def kda_chunk_state_kernel(
    qg, kd, w, u, aqk, gc, o, h0, ht, cu_seqlens, T,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BT: tl.constexpr,
    HAS_H0: tl.constexpr, STORE_HT: tl.constexpr, IS_VARLEN: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """Per chunk:  U = u - w S;  o = qg S + Aqk U;  S = exp(gc_last) * S + kd^T U   (S: [K, BV] fp32)."""
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    bos, eos = sequence_bounds(cu_seqlens, i_n, T, IS_VARLEN)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    o_t = tl.arange(0, BT)
    mask_k = o_k < K
    mask_v = o_v < V
    mask_s = mask_k[:, None] & mask_v[None, :]
    s_base = (i_n.to(tl.int64) * H + i_h) * (V * K)
    offs_s = o_v[None, :] * K + o_k[:, None]  # [K, BV] view of the [V, K] state (int32: small, kept live)
    b_s = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_H0:
        b_s += tl.load(h0 + s_base + offs_s, mask=mask_s, other=0.0)
    causal = o_t[:, None] >= o_t[None, :]
    # scalar 64-bit bases + 32-bit in-tile offsets: per-element 64-bit offsets of four [BT, K] tiles would not
    # fit in registers next to the state
    L = (eos - bos).to(tl.int32)
    tile_k = o_t[:, None] * (H * K) + o_k[None, :]
    tile_v = o_t[:, None] * (H * V) + o_v[None, :]
    tile_a = o_t[:, None] * (H * BT) + o_t[None, :]
    for i_c in range(0, tl.cdiv(L, BT)):
        r = i_c * BT
        row0 = bos + r
        valid = (r + o_t) < L
        m_rk = valid[:, None] & mask_k[None, :]
        # each tile loaded right before its dot: they are register operands of the MMAs, not all live at once
        last = tl.minimum(r + BT, L) - 1
        g_last = tl.load(gc + (bos + last) * (H * K) + i_h * K + o_k, mask=mask_k, other=0.0)
        b_sd = b_s.to(w.dtype.element_ty)
        b_w = tl.load(w + (row0 * (H * K) + i_h * K) + tile_k, mask=m_rk, other=0.0)
        b_u = tl.load(u + (row0 * (H * V) + i_h * V) + tile_v, mask=valid[:, None] & mask_v[None, :],
                      other=0.0).to(tl.float32)
        b_und = (b_u - tl.dot(b_w, b_sd, input_precision=DOT_PREC)).to(w.dtype.element_ty)
        b_qg = tl.load(qg + (row0 * (H * K) + i_h * K) + tile_k, mask=m_rk, other=0.0)
        b_o = tl.dot(b_qg, b_sd, input_precision=DOT_PREC)
        # above the diagonal Aqk was never written: masked out, never read
        b_a = tl.load(aqk + (row0 * (H * BT) + i_h * BT) + tile_a, mask=valid[:, None] & causal, other=0.0)
        b_o = tl.dot(b_a.to(w.dtype.element_ty), b_und, acc=b_o, input_precision=DOT_PREC)
        tl.store(o + (row0 * (H * V) + i_h * V) + tile_v, b_o.to(o.dtype.element_ty),
                 mask=valid[:, None] & mask_v[None, :])
        b_kd = tl.load(kd + (row0 * (H * K) + i_h * K) + tile_k, mask=m_rk, other=0.0)
        b_s = b_s * tl.exp(g_last)[:, None] + tl.dot(tl.trans(b_kd), b_und, input_precision=DOT_PREC)
    if STORE_HT:
        tl.store(ht + s_base + offs_s, b_s, mask=mask_s)


def _chunk_kda_fwd(q, k, v, g, beta, scale, initial_state, output_final_state, l2norm, cu_seqlens, A_log, dt_bias,
                   lower_bound, beta_sigmoid, where):
    if cu_seqlens is not None and q.shape[0] != 1:
        raise ValueError(f"{where}: batch size must be 1 with `cu_seqlens`, got {q.shape[0]}")
    B, T, H, K = q.shape
    V = v.shape[-1]
    check_head_dims(K, V, where)
    if k.shape != q.shape or g.shape != q.shape or beta.shape != (B, T, H) or v.shape[:3] != (B, T, H):
        raise ValueError(f"{where}: shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}, "
                         f"g {tuple(g.shape)}, beta {tuple(beta.shape)} do not match [B, T, H, K/V] / [B, T, H]")
    N = B if cu_seqlens is None else cu_seqlens.numel() - 1
    check_state(initial_state, H, K, V, where)
    if initial_state is not None and initial_state.shape[0] != N:
        raise ValueError(f"{where}: `initial_state` has {initial_state.shape[0]} states for {N} sequences")
    if scale is None:
        scale = K ** -0.5
    q, k, v, beta = (x.contiguous() for x in (q, k, v, beta))
    if initial_state is not None:  # the state kernel addresses sequence n at n*H*V*K (a strided view would misread)
        initial_state = initial_state.contiguous()
    chunk_indices = prepare_chunk_indices(cu_seqlens, CHUNK_SIZE) if cu_seqlens is not None else None
    gc = kda_gate_chunk_cumsum(g, A_log=A_log, dt_bias=dt_bias, lower_bound=lower_bound, cu_seqlens=cu_seqlens,
                               chunk_indices=chunk_indices)
    w, qg, kd = (torch.empty_like(k) for _ in range(3))
    u = torch.empty_like(v)
    aqk = torch.empty(B, T, H, CHUNK_SIZE, dtype=torch.float32, device=q.device)
    tbuf = torch.empty(B, T, H, CHUNK_SIZE, dtype=torch.float32, device=q.device)  # rows of (I + A)^-1, scratch
    o = torch.empty_like(v)
    ht = torch.empty(N, H, V, K, dtype=torch.float32, device=q.device) if output_final_state else None
    if T == 0:
        if ht is not None:
            ht.copy_(initial_state) if initial_state is not None else ht.zero_()
        return o, ht
    dot_prec = "ieee" if q.dtype == torch.float32 else "tf32"
    BK = triton.next_power_of_2(K)
    NT = triton.cdiv(T, CHUNK_SIZE) if cu_seqlens is None else chunk_indices.shape[0]
    kda_chunk_intra_kernel[(NT, (1 if cu_seqlens is not None else B) * H)](
        q, k, v, gc, beta, w, u, qg, kd, aqk, tbuf, cu_seqlens if cu_seqlens is not None else q,
        chunk_indices if chunk_indices is not None else q, float(scale), T,
        H=H, K=K, V=V, BK=BK, BVF=triton.next_power_of_2(V), BT=CHUNK_SIZE, BC=BC,
        L2NORM=l2norm, BETA_SIGMOID=beta_sigmoid, IS_VARLEN=cu_seqlens is not None, DOT_PREC=dot_prec,
        num_warps=4)  # sm_90, K=V=128: fewer spills than 8 warps (ptxas: 2.0 KB vs 3.1 KB stack)
    # BV=32, 4 warps, 2 stages: ~200 registers and no spills for K=V=128 on sm_90 (ptxas -res-usage); wider
    # tiles or more stages spill (the [BT, K] tiles are register operands of the MMAs)
    BV = min(32, triton.next_power_of_2(V))
    kda_chunk_state_kernel[(triton.cdiv(V, BV), N * H)](
        qg, kd, w, u, aqk, gc, o, initial_state if initial_state is not None else q, ht if ht is not None else q,
        cu_seqlens if cu_seqlens is not None else q, T,
        H=H, K=K, V=V, BK=BK, BV=BV, BT=CHUNK_SIZE, HAS_H0=initial_state is not None, STORE_HT=ht is not None,
        IS_VARLEN=cu_seqlens is not None, DOT_PREC=dot_prec, num_warps=4, num_stages=2)
    return o, ht


def chunk_kda(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float = None,
    initial_state: torch.Tensor = None,
    output_final_state: bool = False,
    use_qk_l2norm_in_kernel: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    *,
    use_gate_in_kernel: bool = False,
    A_log: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    lower_bound: float | None = None,
    use_beta_sigmoid_in_kernel: bool = False,
    safe_gate: bool = False,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunked KDA prefill (vLLM 0.26's ``chunk_kda`` signature; fla 0.6's gate/beta keywords).

    Args:
        q, k: ``[B, T, H, K]``; v: ``[B, T, H, V]``; B == 1 with ``cu_seqlens`` ``[N + 1]`` (int32/int64).
        g: ``[B, T, H, K]`` log decay (<= 0), or the raw gate projection with ``use_gate_in_kernel``
            (``A_log`` [H], ``dt_bias`` [H*K] or None, ``lower_bound`` None or the bounded variant).
        beta: ``[B, T, H]``, sigmoid'ed unless ``use_beta_sigmoid_in_kernel``.
        initial_state: fp32 ``[N, H, V, K]`` or None (zeros).
        safe_gate: accepted for fla compatibility; the intra-chunk decay is computed overflow-free anyway.
    Returns ``(o [B, T, H, V] in v's dtype, final_state [N, H, V, K] fp32 or None)``.
    """
    reject_unsupported("chunk_kda", kwargs)
    if use_gate_in_kernel and A_log is None:
        raise ValueError("chunk_kda: `A_log` is required with `use_gate_in_kernel=True`")
    return _chunk_kda_fwd(q, k, v, g, beta, scale, initial_state, output_final_state, use_qk_l2norm_in_kernel,
                          cu_seqlens, A_log if use_gate_in_kernel else None, dt_bias if use_gate_in_kernel else None,
                          lower_bound if use_gate_in_kernel else None, use_beta_sigmoid_in_kernel, "chunk_kda")


def chunk_kda_with_fused_gate(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    raw_g: torch.Tensor,
    beta: torch.Tensor,
    A_log: torch.Tensor,
    g_bias: torch.Tensor | None,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    use_qk_l2norm_in_kernel: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    *,
    lower_bound: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``chunk_kda`` from the raw gate projection (vLLM 0.26's signature): the gate is fused into the chunk
    cumsum launch. ``g_bias`` is dt_bias (H*K elements); ``lower_bound`` picks the bounded gate."""
    reject_unsupported("chunk_kda_with_fused_gate", kwargs)
    return _chunk_kda_fwd(q, k, v, raw_g, beta, scale, initial_state, output_final_state, use_qk_l2norm_in_kernel,
                          cu_seqlens, A_log, g_bias, lower_bound, False, "chunk_kda_with_fused_gate")
