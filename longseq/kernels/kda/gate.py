"""The KDA forget gate, alone (``fused_kda_gate``) or fused with the chunk-local cumulative sum that a chunked
prefill takes (``kda_gate_chunk_cumsum``, fla's gate form; no longseq path calls it: prefill is the framework's).

Gate (log decay, fp32), per head h and channel d, on ``x = g + dt_bias``:
    default      -exp(A_log[h]) * softplus(x)                  (softplus with ``beta``/``threshold``)
    lower bound  lower_bound * sigmoid(exp(A_log[h]) * x)       (values in [lower_bound, 0))
Reference: ``naive.naive_kda_gate``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .utils import CHUNK_SIZE, chunk_bounds, prepare_chunk_indices


@triton.jit
def kda_gate_value(x, a_log, lower_bound, beta, threshold, USE_LOWER_BOUND: tl.constexpr):
    """Gate of ``x = g + dt_bias`` (fp32) for a head whose ``A_log`` is ``a_log``; shared by all KDA kernels."""
    a = tl.exp(a_log)
    if USE_LOWER_BOUND:
        y = lower_bound * tl.sigmoid(a * x)
    else:
        xs = x * beta
        # min(): exp of the branch that tl.where discards must not overflow
        softplus = tl.where(xs > threshold, x, tl.log(1.0 + tl.exp(tl.minimum(xs, threshold))) / beta)
        y = -a * softplus
    return y


@triton.jit
def kda_gate_kernel(g, A_log, dt_bias, y, lower_bound, beta, threshold, T, H: tl.constexpr, D: tl.constexpr,
                    BT: tl.constexpr, BD: tl.constexpr, HAS_BIAS: tl.constexpr, USE_LOWER_BOUND: tl.constexpr):
    """One [BT, D] tile of one head: g [T, H*D] (any float) -> y [T, H*D] fp32."""
    i_t, i_h = tl.program_id(0), tl.program_id(1)
    o_t = i_t * BT + tl.arange(0, BT)
    o_d = tl.arange(0, BD)
    mask = (o_t[:, None] < T) & (o_d[None, :] < D)
    offs = o_t[:, None].to(tl.int64) * (H * D) + i_h * D + o_d[None, :]
    x = tl.load(g + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        x += tl.load(dt_bias + i_h * D + o_d, mask=o_d < D, other=0.0).to(tl.float32)[None, :]
    a_log = tl.load(A_log + i_h).to(tl.float32)
    tl.store(y + offs, kda_gate_value(x, a_log, lower_bound, beta, threshold, USE_LOWER_BOUND), mask=mask)


@triton.jit
def kda_gate_chunk_cumsum_kernel(g, A_log, dt_bias, y, cu_seqlens, chunk_indices, lower_bound, beta, threshold, T,
                                 H: tl.constexpr, D: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr,
                                 APPLY_GATE: tl.constexpr, HAS_BIAS: tl.constexpr, USE_LOWER_BOUND: tl.constexpr,
                                 IS_VARLEN: tl.constexpr):
    """Chunk-local inclusive cumsum over time of the gate (or of ``g`` itself when not APPLY_GATE).

    g, y: [B*T, H, D] (y fp32); one program per (chunk, batch*head). Rows past a sequence's end are
    neither read nor written.
    """
    i_c, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    bos, eos, i_c = chunk_bounds(cu_seqlens, chunk_indices, i_c, i_b, T, IS_VARLEN)
    o_t = bos + i_c * BT + tl.arange(0, BT)
    o_d = tl.arange(0, BD)
    mask = (o_t[:, None] < eos) & (o_d[None, :] < D)
    offs = o_t[:, None] * (H * D) + i_h * D + o_d[None, :]
    x = tl.load(g + offs, mask=mask, other=0.0).to(tl.float32)
    if APPLY_GATE:
        if HAS_BIAS:
            x += tl.load(dt_bias + i_h * D + o_d, mask=o_d < D, other=0.0).to(tl.float32)[None, :]
        x = kda_gate_value(x, tl.load(A_log + i_h).to(tl.float32), lower_bound, beta, threshold, USE_LOWER_BOUND)
        x = tl.where(mask, x, 0.0)
    tl.store(y + offs, tl.cumsum(x, axis=0), mask=mask)


def fused_kda_gate(
    g: torch.Tensor,
    A: torch.Tensor,
    head_k_dim: int,
    g_bias: torch.Tensor | None = None,
    beta: float = 1.0,
    threshold: float = 20.0,
    lower_bound: float | None = None,
) -> torch.Tensor:
    """KDA gate, vLLM 0.26's ``fused_kda_gate`` signature (plus ``lower_bound`` for the bounded variant).

    Args:
        g: ``[..., H * head_k_dim]`` raw gate projection (any float dtype).
        A: ``A_log``, H elements (``[H]`` or ``[1, 1, H, 1]``).
        head_k_dim: K.
        g_bias: ``dt_bias`` with ``H * K`` elements, or None.
        beta, threshold: softplus parameters (default variant only).
        lower_bound: None, or a negative float for ``lower_bound * sigmoid(exp(A_log) * (g + g_bias))``.

    Returns ``[..., H, K]`` float32.
    """
    H = A.numel()
    if g.shape[-1] != H * head_k_dim:
        raise ValueError(f"fused_kda_gate: last dim of g ({g.shape[-1]}) != H ({H}) * head_k_dim ({head_k_dim})")
    if lower_bound is not None and not lower_bound < 0:
        raise ValueError(f"fused_kda_gate: lower_bound must be negative, got {lower_bound}")
    lead = g.shape[:-1]
    g2 = g.reshape(-1, g.shape[-1]).contiguous()
    T = g2.shape[0]
    y = torch.empty(g2.shape, dtype=torch.float32, device=g.device)
    BT = 32
    kda_gate_kernel[(triton.cdiv(T, BT), H)](
        g2, A.reshape(-1).contiguous(), g_bias.reshape(-1).contiguous() if g_bias is not None else g2, y,
        float(lower_bound or 0.0), float(beta), float(threshold), T, H=H, D=head_k_dim, BT=BT,
        BD=triton.next_power_of_2(head_k_dim), HAS_BIAS=g_bias is not None, USE_LOWER_BOUND=lower_bound is not None,
        num_warps=4)
    return y.view(*lead, H, head_k_dim)


def kda_gate_chunk_cumsum(
    g: torch.Tensor,
    A_log: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    lower_bound: float | None = None,
    cu_seqlens: torch.Tensor | None = None,
    chunk_indices: torch.Tensor | None = None,
    beta: float = 1.0,
    threshold: float = 20.0,
) -> torch.Tensor:
    """Chunk-local (64-row) cumulative sum over time of the gate, fp32.

    g: ``[B, T, H, K]``. With ``A_log`` the gate is applied first (g is then the raw projection); without
    it g is already the log decay. With ``cu_seqlens`` (B must be 1) chunks restart at every sequence start.
    Returns ``[B, T, H, K]`` float32.
    """
    B, T, H, D = g.shape
    g = g.contiguous()
    y = torch.empty(g.shape, dtype=torch.float32, device=g.device)
    if cu_seqlens is not None and chunk_indices is None:
        chunk_indices = prepare_chunk_indices(cu_seqlens, CHUNK_SIZE)
    NT = triton.cdiv(T, CHUNK_SIZE) if cu_seqlens is None else chunk_indices.shape[0]
    if NT == 0:
        return y
    kda_gate_chunk_cumsum_kernel[(NT, (1 if cu_seqlens is not None else B) * H)](
        g, A_log.reshape(-1).contiguous() if A_log is not None else g,
        dt_bias.reshape(-1).contiguous() if dt_bias is not None else g, y,
        cu_seqlens if cu_seqlens is not None else g, chunk_indices if chunk_indices is not None else g,
        float(lower_bound or 0.0), float(beta), float(threshold), T, H=H, D=D, BT=CHUNK_SIZE,
        BD=triton.next_power_of_2(D), APPLY_GATE=A_log is not None, HAS_BIAS=dt_bias is not None,
        USE_LOWER_BOUND=lower_bound is not None, IS_VARLEN=cu_seqlens is not None, num_warps=4)
    return y
