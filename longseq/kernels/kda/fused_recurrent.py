"""KDA recurrent decode: every sequence of a batch, one launch per layer, state updated in place.

The delta rule is independent per value column j of the state (s_j <- a*s_j; s_j += b*k*(v_j - k.s_j);
o_j = s_j.q), so the grid splits V across programs, grid ``(V / BV, N * H)``: at batch 1 with H=32 that is
still hundreds of programs, where one program per (sequence, head) would leave most SMs idle. Each program
keeps a ``[BV, K]`` fp32 slice of the state in registers, reads q, k, g, beta once per token, normalizes q/k,
applies the gate and sigmoid(beta) when asked (as the frameworks' fused call sites do), and writes its slice
back to the state pool (``[slots, H, V, K]``, V first like vLLM/SGLang) at the sequence's slot.

Slots below ``first_valid_slot`` are padding (vLLM: 0 is its null block, so 1; SGLang: -1 is padding, so 0):
their state is neither read nor written and their output is zero.
Reference: ``naive.naive_recurrent_kda`` (state K-first there).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .gate import kda_gate_value
from .utils import check_head_dims, check_state, sequence_bounds

#: ``(BV, num_warps)`` forced on every recurrent launch, or None for :func:`_pick_tile`'s choice. A tuning hook:
#: ``benchmarks/bench_kda_kernels.py`` sets it to time tile variants in one GPU run.
DECODE_TILE: tuple[int, int] | None = None


@triton.jit
def kda_recurrent_kernel(
    q, k, v, g, beta, A_log, dt_bias, o, h0, ht, cu_seqlens, state_indices,
    scale, lower_bound, softplus_beta, softplus_threshold, first_valid_slot, T,
    stride_q, stride_k, stride_v, stride_g, stride_beta, stride_o, stride_idx_seq, stride_idx_tok,
    stride_h0_slot, stride_ht_slot,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    USE_GATE: tl.constexpr, HAS_BIAS: tl.constexpr, USE_LOWER_BOUND: tl.constexpr, BETA_SIGMOID: tl.constexpr,
    L2NORM: tl.constexpr, IS_VARLEN: tl.constexpr, HAS_H0: tl.constexpr, INDEX_MODE: tl.constexpr,
    STORE_STATE: tl.constexpr,
):
    """One (V-block, sequence*head) program.

    q, k: token rows with strides ``stride_q``/``stride_k`` (elements), heads at ``h*K``; v, o likewise with
    ``h*V``; g: [tokens, H, K] rows of ``stride_g`` (raw projection if USE_GATE, else log decay);
    beta: [tokens, H] rows of ``stride_beta`` (raw if BETA_SIGMOID). h0/ht: [slots or N, H, V, K] fp32, each
    slot contiguous but slots ``stride_h0_slot``/``stride_ht_slot`` elements apart: vLLM's state pool is a view
    of its KV-cache pages (``torch.as_strided`` with the page size as the slot stride, conv state in between).
    INDEX_MODE: 0 = no indices (h0[n] -> ht[n]), 1 = one slot per sequence (read and written in place),
    2 = a slot per token (spec decode: read slot [n, 0], state after token t written to slot [n, t]).
    """
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    bos, eos = sequence_bounds(cu_seqlens, i_n, T, IS_VARLEN)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    mask_k = o_k < K
    mask_v = o_v < V
    mask_s = mask_v[:, None] & mask_k[None, :]
    offs_s = i_h * V * K + o_v[:, None] * K + o_k[None, :]

    slot = i_n.to(tl.int64)
    if INDEX_MODE > 0:
        slot = tl.load(state_indices + i_n * stride_idx_seq).to(tl.int64)
        if slot < first_valid_slot:  # padding: zero output, state untouched
            for i_t in range(bos, eos):
                tl.store(o + i_t * stride_o + i_h * V + o_v, tl.zeros([BV], dtype=tl.float32), mask=mask_v)
            return

    b_s = tl.zeros([BV, BK], dtype=tl.float32)
    if HAS_H0:
        b_s += tl.load(h0 + slot * stride_h0_slot + offs_s, mask=mask_s, other=0.0)
    a_log = 0.0
    if USE_GATE:
        a_log = tl.load(A_log + i_h).to(tl.float32)
    for i_t in range(bos, eos):
        b_q = tl.load(q + i_t * stride_q + i_h * K + o_k, mask=mask_k, other=0.0).to(tl.float32)
        b_k = tl.load(k + i_t * stride_k + i_h * K + o_k, mask=mask_k, other=0.0).to(tl.float32)
        b_v = tl.load(v + i_t * stride_v + i_h * V + o_v, mask=mask_v, other=0.0).to(tl.float32)
        b_g = tl.load(g + i_t * stride_g + i_h * K + o_k, mask=mask_k, other=0.0).to(tl.float32)
        b_beta = tl.load(beta + i_t * stride_beta + i_h).to(tl.float32)
        if L2NORM:
            b_q = b_q / tl.sqrt(tl.sum(b_q * b_q) + 1e-6)
            b_k = b_k / tl.sqrt(tl.sum(b_k * b_k) + 1e-6)
        if USE_GATE:
            if HAS_BIAS:
                b_g += tl.load(dt_bias + i_h * K + o_k, mask=mask_k, other=0.0).to(tl.float32)
            b_g = kda_gate_value(b_g, a_log, lower_bound, softplus_beta, softplus_threshold, USE_LOWER_BOUND)
        if BETA_SIGMOID:
            b_beta = tl.sigmoid(b_beta)
        b_s *= tl.exp(b_g)[None, :]
        b_vn = b_beta * (b_v - tl.sum(b_s * b_k[None, :], axis=1))
        b_s += b_vn[:, None] * b_k[None, :]
        b_o = tl.sum(b_s * (b_q * scale)[None, :], axis=1)
        tl.store(o + i_t * stride_o + i_h * V + o_v, b_o.to(o.dtype.element_ty), mask=mask_v)
        if INDEX_MODE == 2:
            slot_t = tl.load(state_indices + i_n * stride_idx_seq + (i_t - bos) * stride_idx_tok).to(tl.int64)
            if slot_t >= first_valid_slot:
                tl.store(ht + slot_t * stride_ht_slot + offs_s, b_s, mask=mask_s)
    if STORE_STATE:
        if INDEX_MODE != 2:
            tl.store(ht + slot * stride_ht_slot + offs_s, b_s, mask=mask_s)


def _pick_tile(num_nh: int, V: int) -> tuple[int, int]:
    """(BV, num_warps): value-block width and warps per program.

    Narrow blocks at small batch so that even batch 1 (H=32) spreads over 256 programs; at K=128 on sm_90 both
    configurations stay under ~110 registers with no spills (ptxas -res-usage), while BV=64 spills.
    """
    if num_nh < 512:
        return min(16, triton.next_power_of_2(V)), 4
    return min(32, triton.next_power_of_2(V)), 8


def _slot_stride(state: torch.Tensor | None) -> int:
    """Elements between consecutive slots of a ``[slots, H, V, K]`` state (its stride, not H*V*K: see the kernel)."""
    if state is None:
        return 0
    if state.ndim != 4:
        raise ValueError(f"KDA recurrent state must be [slots, H, V, K], got shape {tuple(state.shape)}")
    return state.stride(0)


def _launch_recurrent(*, q, k, v, g, beta, o, h0, ht, cu_seqlens, state_indices, N, T, H, K, V, scale,
                      A_log, dt_bias, lower_bound, use_gate, beta_sigmoid, l2norm, store_state,
                      first_valid_slot, softplus_beta=1.0, softplus_threshold=20.0):
    if state_indices is None:
        index_mode, s_seq, s_tok = 0, 0, 0
    elif state_indices.ndim == 1:
        index_mode, s_seq, s_tok = 1, state_indices.stride(0), 0
    else:
        index_mode, (s_seq, s_tok) = 2, state_indices.stride()
    BV, num_warps = DECODE_TILE or _pick_tile(N * H, V)
    dummy = q
    kda_recurrent_kernel[(triton.cdiv(V, BV), N * H)](
        q, k, v, g, beta, A_log if A_log is not None else dummy, dt_bias if dt_bias is not None else dummy, o,
        h0 if h0 is not None else dummy, ht if ht is not None else dummy,
        cu_seqlens if cu_seqlens is not None else dummy, state_indices if state_indices is not None else dummy,
        float(scale), float(lower_bound or 0.0), float(softplus_beta), float(softplus_threshold),
        int(first_valid_slot), T,
        q.stride(-3), k.stride(-3), v.stride(-3), g.stride(-3), beta.stride(-2), o.stride(-3), s_seq, s_tok,
        _slot_stride(h0), _slot_stride(ht),
        H=H, K=K, V=V, BK=triton.next_power_of_2(K), BV=BV, USE_GATE=use_gate, HAS_BIAS=dt_bias is not None,
        USE_LOWER_BOUND=lower_bound is not None, BETA_SIGMOID=beta_sigmoid, L2NORM=l2norm,
        IS_VARLEN=cu_seqlens is not None, HAS_H0=h0 is not None, INDEX_MODE=index_mode, STORE_STATE=store_state,
        num_warps=num_warps, num_stages=1)


# fla/vLLM keywords accepted when they ask for what these kernels do anyway (the default), or that are hints only
_ACCEPTED_DEFAULTS = {"head_first": False, "num_accepted_tokens": None, "chunk_size": 64, "state_v_first": True,
                      "transpose_state_layout": True, "allow_neg_eigval": False, "return_intermediate_states": False,
                      "cp_context": None, "disable_recompute": False}
_HINTS = {"cu_seqlens_cpu", "max_num_seqs", "use_graph"}


def reject_unsupported(where: str, kwargs: dict) -> None:
    """Raise for arguments the frameworks may pass that these kernels do not implement, naming them."""
    for name, value in kwargs.items():
        if name in _HINTS:
            continue
        if name in _ACCEPTED_DEFAULTS:
            default = _ACCEPTED_DEFAULTS[name]
            if value is default or (default is not None and isinstance(value, (bool, int)) and value == default):
                continue
        raise NotImplementedError(f"{where}: argument `{name}`={value!r} is not supported by longseq's KDA kernels "
                                  f"(state layout is V-first [.., H, V, K], chunk size 64, forward only)")


def fused_recurrent_kda(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor = None,
    scale: float = None,
    initial_state: torch.Tensor = None,
    inplace_final_state: bool = True,
    use_qk_l2norm_in_kernel: bool = True,
    cu_seqlens: torch.Tensor | None = None,
    ssm_state_indices: torch.LongTensor | None = None,
    *,
    A_log: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    lower_bound: float | None = None,
    use_gate_in_kernel: bool = False,
    use_beta_sigmoid_in_kernel: bool = False,
    first_valid_slot: int = 1,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Recurrent KDA over a batch (vLLM 0.26's ``fused_recurrent_kda`` signature; fla 0.6's gate keywords).

    Args:
        q, k: ``[B, T, H, K]``; v: ``[B, T, H, V]`` (B == 1 with ``cu_seqlens``: the N sequences packed).
        g: ``[B, T, H, K]`` log decay, or the raw gate projection with ``use_gate_in_kernel`` (then
            ``A_log`` [H], optional ``dt_bias`` [H*K], optional ``lower_bound`` pick the gate variant).
        beta: ``[B, T, H]``, already sigmoid'ed unless ``use_beta_sigmoid_in_kernel``.
        initial_state: fp32 ``[slots, H, V, K]`` with ``ssm_state_indices`` (``[N]``, or ``[N, T]`` to keep
            each token's state, as spec decode does), else ``[N, H, V, K]``; None for zeros. Each slot is
            contiguous; slots may lie further apart (vLLM's pool is a strided view of its KV-cache pages).
        inplace_final_state: write the final state into ``initial_state`` (at the slots); else return a new
            ``[N, H, V, K]`` final state.
        first_valid_slot: slots below it are padding (1 for vLLM's null block 0; 0 for SGLang's -1).
    Returns ``(o [B, T, H, V] in v's dtype, final_state)``.
    """
    reject_unsupported("fused_recurrent_kda", kwargs)
    if beta is None:
        raise ValueError("fused_recurrent_kda: `beta` is required")
    if cu_seqlens is not None and q.shape[0] != 1:
        raise ValueError(f"fused_recurrent_kda: batch size must be 1 with `cu_seqlens`, got {q.shape[0]}")
    if use_gate_in_kernel and A_log is None:
        raise ValueError("fused_recurrent_kda: `A_log` is required with `use_gate_in_kernel=True`")
    B, T, H, K = k.shape
    V = v.shape[-1]
    check_head_dims(K, V, "fused_recurrent_kda")
    if q.shape != k.shape or g.shape != k.shape or v.shape[:3] != (B, T, H) or beta.shape != (B, T, H):
        raise ValueError(f"fused_recurrent_kda: shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}, "
                         f"g {tuple(g.shape)}, beta {tuple(beta.shape)} do not match [B, T, H, K/V] / [B, T, H] "
                         f"(one value head per key head; no head-wise beta)")
    check_state(initial_state, H, K, V, "fused_recurrent_kda")
    if ssm_state_indices is not None and initial_state is None:
        raise ValueError("fused_recurrent_kda: `ssm_state_indices` needs `initial_state` (the state pool)")
    N = B if cu_seqlens is None else cu_seqlens.numel() - 1
    if scale is None:
        scale = K ** -0.5
    # flat token rows: the kernel reads each tensor's stride(-3) (stride(-2) for beta) as its token stride, and
    # .contiguous() alone may keep a size-1 dim's arbitrary stride there
    q, k, v, g = (x.contiguous().reshape(B * T, H, x.shape[-1]) for x in (q, k, v, g))
    beta = beta.contiguous().reshape(B * T, H)
    o = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    if initial_state is not None and inplace_final_state:
        ht = initial_state
    elif ssm_state_indices is not None:
        raise NotImplementedError("fused_recurrent_kda: `inplace_final_state=False` with `ssm_state_indices`")
    else:
        ht = torch.empty(N, H, V, K, dtype=torch.float32, device=q.device)
    _launch_recurrent(q=q, k=k, v=v, g=g, beta=beta, o=o, h0=initial_state, ht=ht, cu_seqlens=cu_seqlens,
                      state_indices=ssm_state_indices, N=N, T=T, H=H, K=K, V=V, scale=scale, A_log=A_log,
                      dt_bias=dt_bias, lower_bound=lower_bound, use_gate=use_gate_in_kernel,
                      beta_sigmoid=use_beta_sigmoid_in_kernel, l2norm=use_qk_l2norm_in_kernel, store_state=True,
                      first_valid_slot=first_valid_slot)
    return o.view(B, T, H, V), ht


def fused_recurrent_kda_packed_decode(
    mixed_qkv: torch.Tensor,
    raw_g: torch.Tensor,
    raw_beta: torch.Tensor,
    A_log: torch.Tensor,
    dt_bias: torch.Tensor,
    lower_bound: float | None,
    initial_state: torch.Tensor,
    state_indices: torch.Tensor,
    scale: float | None = None,
    out: torch.Tensor | None = None,
    *,
    first_valid_slot: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decode token per sequence straight from packed post-conv QKV (vLLM 0.32's signature).

    Args:
        mixed_qkv: ``[B, >= 2*H*K + H*V]`` rows ``[q (H*K) | k (H*K) | v (H*V) | ...]`` (last dim contiguous).
        raw_g: ``[1, B, H, K]`` raw gate projection; raw_beta: ``[1, B, H]`` pre-sigmoid.
        A_log: ``[H]``; dt_bias: ``H*K`` elements; lower_bound: None (softplus gate) or the bounded variant.
        initial_state: fp32 state pool ``[slots, H, V, K]``, updated in place at ``state_indices`` ``[B]``.
    q and k are L2-normalized in the kernel. Returns ``(out [1, B, H, V] in mixed_qkv's dtype, initial_state)``.
    """
    if mixed_qkv.ndim != 2 or mixed_qkv.stride(-1) != 1:
        raise ValueError("fused_recurrent_kda_packed_decode: `mixed_qkv` must be 2D and contiguous in its last dim")
    if initial_state.ndim != 4:
        raise ValueError("fused_recurrent_kda_packed_decode: `initial_state` must have shape [slots, H, V, K]")
    _, H, V, K = initial_state.shape
    check_head_dims(K, V, "fused_recurrent_kda_packed_decode")
    check_state(initial_state, H, K, V, "fused_recurrent_kda_packed_decode")
    B = mixed_qkv.shape[0]
    if mixed_qkv.shape[1] < 2 * H * K + H * V:
        raise ValueError(f"fused_recurrent_kda_packed_decode: packed QKV {tuple(mixed_qkv.shape)} is narrower than "
                         f"2*H*K + H*V = {2 * H * K + H * V}")
    if tuple(raw_g.shape) != (1, B, H, K) or raw_g.stride()[2:] != (K, 1):
        raise ValueError(f"fused_recurrent_kda_packed_decode: `raw_g` must be [1, B, H, K] contiguous per token, "
                         f"got {tuple(raw_g.shape)}")
    if tuple(raw_beta.shape) != (1, B, H) or raw_beta.stride(2) != 1:
        raise ValueError(f"fused_recurrent_kda_packed_decode: `raw_beta` must be [1, B, H], got {tuple(raw_beta.shape)}")
    if state_indices.ndim != 1 or state_indices.shape[0] != B:
        raise ValueError("fused_recurrent_kda_packed_decode: `state_indices` must be [B], one slot per token")
    if A_log.numel() != H or dt_bias.numel() != H * K:
        raise ValueError("fused_recurrent_kda_packed_decode: `A_log` or `dt_bias` has an incompatible shape")
    if scale is None:
        scale = K ** -0.5
    if out is None:
        out = torch.empty((1, B, H, V), dtype=mixed_qkv.dtype, device=mixed_qkv.device)
    # views into the packed rows: [B, H, K] with token stride mixed_qkv.stride(0); the kernel reads stride(-3)
    q = mixed_qkv[:, : H * K].unflatten(1, (H, K))
    k = mixed_qkv[:, H * K: 2 * H * K].unflatten(1, (H, K))
    v = mixed_qkv[:, 2 * H * K: 2 * H * K + H * V].unflatten(1, (H, V))
    _launch_recurrent(q=q, k=k, v=v, g=raw_g[0], beta=raw_beta[0], o=out[0], h0=initial_state, ht=initial_state,
                      cu_seqlens=None, state_indices=state_indices, N=B, T=1, H=H, K=K, V=V, scale=scale,
                      A_log=A_log.reshape(-1), dt_bias=dt_bias.reshape(-1), lower_bound=lower_bound, use_gate=True,
                      beta_sigmoid=True, l2norm=True, store_state=True, first_valid_slot=first_valid_slot)
    return out, initial_state
