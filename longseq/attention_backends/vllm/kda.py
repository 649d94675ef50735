"""vLLM adapter for Kimi Delta Attention: Kimi-Linear's KDA layer with its kernels swapped for longseq's.

``LongSeqKimiDeltaAttention`` subclasses vLLM's ``KimiGatedDeltaNetAttention`` and is installed with
``KimiGatedDeltaNetAttention.register_oot`` (``plugin/kda_compat.py`` does that when ``LONGSEQ_KDA=1``), so the
model builds ours wherever it builds vLLM's. Only ``_forward`` changes (decode on our kernels; steps with prefills on
vLLM's own ``_forward`` unless ``LONGSEQ_KDA_PREFILL=longseq``): the projections, weights, state
shapes/dtypes, metadata builder and output norm stay vLLM's, so checkpoints load unchanged and the outputs
differ from vLLM's only by rounding. ``_forward``'s signature changed between vLLM 0.26 and 0.32; the two
bodies live in ``plugin/kda_compat.py`` and call the version-neutral kernel steps below.

This module imports vLLM's layer module (it must, to subclass it): nothing imports it at plugin registration.
Shapes: T tokens of a step, N sequences, H local KDA heads, D = head_dim (K = V = D), S state-pool slots.
"""

from __future__ import annotations

import inspect

import torch
from vllm.model_executor.layers.mamba.gdn.kimi_gdn_linear_attn import KimiGatedDeltaNetAttention

from longseq.attention_backends.vllm.common import BackendTrace
from longseq.kernels import kda as kda_kernels
from longseq.plugin import kda_compat
from longseq.config import LongSeqConfigError, get_config

#: Recurrent-state dtype our kernels read and write in place.
KDA_STATE_DTYPE = torch.float32


def check_kda_layer_supported(*, head_dim: int, state_dtype: torch.dtype, num_speculative_tokens: int = 0) -> None:
    """Raise at layer construction (engine start) when longseq's KDA kernels cannot run this layer.

    Raises:
        LongSeqConfigError: head_dim above what the kernels handle, or a recurrent state that is not fp32.
        NotImplementedError: speculative decoding, which this adapter does not route to our kernels.
    """
    from longseq.kernels.kda.utils import MAX_HEAD_DIM

    off = "unset LONGSEQ_KDA (or LONGSEQ_KDA=0) to run vLLM's own KDA kernels"
    if head_dim > MAX_HEAD_DIM:
        raise LongSeqConfigError(
            f"LONGSEQ_KDA=1: the model's KDA head_dim (linear_attn_config.head_dim) is {head_dim}; longseq's KDA "
            f"kernels handle head_dim <= {MAX_HEAD_DIM}; {off}")
    if state_dtype != KDA_STATE_DTYPE:
        raise LongSeqConfigError(
            f"LONGSEQ_KDA=1: the KDA recurrent state is {state_dtype} (mamba_ssm_cache_dtype); longseq's KDA "
            f"kernels keep it in float32: use --mamba-ssm-cache-dtype auto/float32, or {off}")
    if num_speculative_tokens:
        raise NotImplementedError(
            f"LONGSEQ_KDA=1 does not run speculative decoding (num_speculative_tokens={num_speculative_tokens}) "
            f"on longseq's KDA kernels; disable speculative decoding or {off}")


class LongSeqKimiDeltaAttention(KimiGatedDeltaNetAttention):
    """vLLM's Kimi-Linear KDA layer running longseq's KDA kernels (see the module docstring)."""

    def __init__(self, config, vllm_config, prefix: str = "") -> None:
        super().__init__(config, vllm_config, prefix)
        self.longseq_config = get_config()
        check_kda_layer_supported(head_dim=self.head_dim, state_dtype=self.get_state_dtype()[1],
                                  num_speculative_tokens=getattr(self, "num_spec", 0))
        self.longseq_trace = BackendTrace.for_backend("kda", self.longseq_config)

    #: vLLM 0.26: ``(q_proj_states, k_proj_states, v_proj_states, g1, beta, core_attn_out)``;
    #: 0.32+: ``(mixed_qkv, g1, g2, beta, core_attn_out)`` (re-wrapped in ``eager_break_during_capture``).
    _forward = kda_compat.vllm_kda_forward(KimiGatedDeltaNetAttention)
    #: vLLM's own ``_forward`` (undecorated: ours already breaks CUDA-graph capture), run for steps with prefills
    #: under ``LONGSEQ_KDA_PREFILL=framework`` (the default).
    longseq_framework_forward = inspect.unwrap(KimiGatedDeltaNetAttention._forward)


# ------------------------------------------------------------------------ kernel steps (version-neutral)
def gather_initial_states(recurrent_state: torch.Tensor, state_indices: torch.Tensor,
                          has_initial_state: torch.Tensor) -> torch.Tensor:
    """Each sequence's state row, zeros for sequences without one yet.

    Args: recurrent_state ``[S, H, D, D]`` fp32 pool; state_indices ``[N]`` int; has_initial_state ``[N]`` bool.
    Returns ``[N, H, D, D]`` fp32 (a copy; no host sync, so it is safe inside CUDA-graph capture).
    """
    rows = recurrent_state.index_select(0, state_indices.long())
    return torch.where(has_initial_state.view(-1, 1, 1, 1), rows, torch.zeros((), dtype=rows.dtype,
                                                                             device=rows.device))


def kda_prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, raw_g: torch.Tensor, beta: torch.Tensor,
                A_log: torch.Tensor, dt_bias: torch.Tensor, recurrent_state: torch.Tensor,
                state_indices: torch.Tensor, has_initial_state: torch.Tensor, cu_seqlens: torch.Tensor,
                lower_bound: float | None = None, write_state: bool = True) -> torch.Tensor:
    """Chunked KDA over a varlen batch from the raw gate, continuing and updating the pooled states.

    Args:
        q, k, v: ``[1, T, H, D]`` post-conv (q and k are L2-normalized in the kernel).
        raw_g: ``[1, T, H, D]`` gate projection before the gate (``fused_kda_gate`` runs inside the kernel).
        beta: ``[1, T, H]`` write strength after sigmoid.
        A_log: ``[H]`` (vLLM 0.26 stores ``[1, 1, H, 1]``) fp32; dt_bias: ``[H * D]`` fp32.
        recurrent_state: ``[S, H, D, D]`` fp32 pool (V, K order); rows ``state_indices`` are read and rewritten.
            In vLLM it is a strided view of the KV-cache pages (slots a page apart, the conv state in between):
            the kernels address slots by the pool's stride, never by ``H * D * D``.
        state_indices: ``[N]`` pool slot per sequence; has_initial_state: ``[N]`` bool.
        cu_seqlens: ``[N + 1]`` int32 token offsets.
        lower_bound: None (softplus gate) or the bounded gate's negative bound (vLLM 0.32+ ``gate_lower_bound``).
        write_state: False only for the test-only fault injection (negative control).
    Returns ``[1, T, H, D]`` in q's dtype.
    """
    initial_state = gather_initial_states(recurrent_state, state_indices, has_initial_state)
    o, final_state = kda_kernels.chunk_kda_with_fused_gate(
        q=q, k=k, v=v, raw_g=raw_g, beta=beta, A_log=A_log, g_bias=dt_bias, initial_state=initial_state,
        output_final_state=True, use_qk_l2norm_in_kernel=True, cu_seqlens=cu_seqlens, lower_bound=lower_bound)
    if write_state:
        recurrent_state[state_indices.long()] = final_state.to(recurrent_state.dtype)
    return o


def kda_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, raw_g: torch.Tensor, beta: torch.Tensor,
               A_log: torch.Tensor, dt_bias: torch.Tensor, recurrent_state: torch.Tensor,
               state_indices: torch.Tensor, cu_seqlens: torch.Tensor, write_state: bool = True) -> torch.Tensor:
    """One recurrent KDA step per sequence (vLLM 0.26's decode path), the gate computed inside the recurrent kernel
    (one launch per layer where vLLM runs a gate kernel and then the recurrent one).

    Args: as :func:`kda_prefill` with T = N (one token per sequence); ``cu_seqlens`` ``[N + 1]``;
    ``state_indices`` ``[>= N]`` (CUDA-graph padding beyond N, and slot 0, vLLM's null block, are skipped).
    The states of ``state_indices`` are updated in place.
    Returns ``[1, N, H, D]``.
    """
    o, _ = kda_kernels.fused_recurrent_kda(
        q=q, k=k, v=v, g=raw_g.reshape(q.shape), beta=beta,
        initial_state=recurrent_state if write_state else recurrent_state.clone(),
        use_qk_l2norm_in_kernel=True, cu_seqlens=cu_seqlens, ssm_state_indices=state_indices,
        A_log=A_log.reshape(-1), dt_bias=dt_bias, use_gate_in_kernel=True)
    return o


def kda_packed_decode(mixed_qkv: torch.Tensor, raw_g: torch.Tensor, raw_beta: torch.Tensor, A_log: torch.Tensor,
                      dt_bias: torch.Tensor, recurrent_state: torch.Tensor, state_indices: torch.Tensor,
                      lower_bound: float | None = None, write_state: bool = True) -> torch.Tensor:
    """One fused decode step per sequence from packed post-conv q|k|v (vLLM 0.32+'s decode path).

    Args:
        mixed_qkv: ``[N, 3 * H * D]`` (q, k, v concatenated per token).
        raw_g: ``[1, N, H, D]``; raw_beta: ``[1, N, H]`` before sigmoid; A_log ``[H]``; dt_bias ``[H * D]``.
        recurrent_state, state_indices, lower_bound: as :func:`kda_prefill` (states updated in place).
    Returns ``[1, N, H, D]``.
    """
    o, _ = kda_kernels.fused_recurrent_kda_packed_decode(
        mixed_qkv=mixed_qkv, raw_g=raw_g, raw_beta=raw_beta, A_log=A_log, dt_bias=dt_bias, lower_bound=lower_bound,
        initial_state=recurrent_state if write_state else recurrent_state.clone(), state_indices=state_indices)
    return o
