"""Plain PyTorch references for Kimi Delta Attention (KDA): the token-by-token recurrence and the gate.

KDA is a gated delta rule with a per-channel decay. Per head, with the state S of shape [K, V]:

    S_t = (I - beta_t k_t k_t^T) Diag(exp(g_t)) S_{t-1} + beta_t k_t v_t^T
    o_t = S_t^T (scale * q_t)

These references follow fla's ``fla/ops/kda/naive.py`` (same argument names and layouts: the state here is
``[B, H, K, V]``, K first). The Triton kernels of this package keep the frameworks' state layout
``[..., H, V, K]`` (V first, as vLLM and SGLang store it); tests transpose between the two.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def naive_recurrent_kda(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Token-by-token KDA recurrence.

    Args:
        q, k: ``[B, T, H, K]`` queries and keys (already L2-normalized if the model normalizes them).
        v: ``[B, T, H, V]``.
        g: ``[B, T, H, K]`` per-channel log decay (``<= 0``), i.e. the gate's output.
        beta: ``[B, T, H]`` write strength (already passed through sigmoid).
        scale: query scale, default ``K ** -0.5``.
        initial_state: ``[B, H, K, V]`` or None (zeros).
        output_final_state: return the final state too.

    Computes in float64 when the inputs are float64, else in float32.
    Returns ``(o [B, T, H, V] in v's dtype, S [B, H, K, V] in the compute dtype or None)``.
    """
    dtype = v.dtype
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    B, T, H, K = q.shape
    V = v.shape[-1]
    if scale is None:
        scale = K ** -0.5
    q, k, v, g, beta = (x.to(compute) for x in (q, k, v, g, beta))
    q = q * scale
    S = q.new_zeros(B, H, K, V)
    if initial_state is not None:
        S = S + initial_state.to(compute)
    o = torch.zeros_like(v)
    for t in range(T):
        q_t, k_t, v_t, g_t, b_t = q[:, t], k[:, t], v[:, t], g[:, t], beta[:, t]
        S = S * g_t.exp()[..., None]  # Diag(exp(g_t)) S
        # (I - b k k^T) S + b k v^T  ==  S + k (b (v - k^T S))^T
        v_new = b_t[..., None] * (v_t - torch.einsum("bhk,bhkv->bhv", k_t, S))
        S = S + torch.einsum("bhk,bhv->bhkv", k_t, v_new)
        o[:, t] = torch.einsum("bhk,bhkv->bhv", q_t, S)
    return o.to(dtype), (S if output_final_state else None)


def naive_kda_gate(
    g: torch.Tensor,
    A_log: torch.Tensor,
    dt_bias: torch.Tensor | None = None,
    lower_bound: float | None = None,
    beta: float = 1.0,
    threshold: float = 20.0,
) -> torch.Tensor:
    """The KDA forget gate (log decay), in float32 (float64 for float64 inputs).

    Args:
        g: ``[..., H, K]`` raw gate projection.
        A_log: ``[H]`` (any shape with H elements).
        dt_bias: ``[H * K]`` (or ``[H, K]``) or None.
        lower_bound: None for ``-exp(A_log) * softplus(g + dt_bias)``; a negative float ``lb`` for the
            bounded variant ``lb * sigmoid(exp(A_log) * (g + dt_bias))`` (values in ``[lb, 0)``).
        beta, threshold: softplus parameters (as ``torch.nn.functional.softplus``).

    Returns ``[..., H, K]``.
    """
    compute = torch.float64 if g.dtype == torch.float64 else torch.float32
    H, K = g.shape[-2], g.shape[-1]
    x = g.to(compute)
    if dt_bias is not None:
        x = x + dt_bias.to(compute).reshape(H, K)
    a = A_log.to(compute).reshape(H, 1).exp()
    if lower_bound is not None:
        return lower_bound * torch.sigmoid(a * x)
    return -a * F.softplus(x, beta=beta, threshold=threshold)


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``x / sqrt(sum(x^2) + eps)`` over the last dim, as fla's and vLLM's kernels normalize q and k."""
    return x / torch.sqrt((x * x).sum(-1, keepdim=True) + eps)
