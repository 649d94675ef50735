"""SGLang adapter for Kimi Delta Attention: longseq's KDA decode kernel as the decode kernel of SGLang's
``KDAKernelDispatcher`` (``LONGSEQ_KDA=1``).

SGLang's hybrid linear-attention backend (``KDAAttnBackend``) does the convolutions, state-pool bookkeeping and
metadata, and calls ``dispatcher.decode`` / ``dispatcher.packed_decode`` / ``dispatcher.extend`` with kernel
objects implementing ``LinearAttnKernelBase``. :func:`install_kda_kernels` (run by the plugin's AFTER hook on
``KDAAttnBackend.__init__``, see ``plugin/sglang.py``) validates the layer shapes against our kernels and
replaces the dispatcher's decode kernel with :class:`LongSeqKDAKernel`. Extends (prefill) and the
speculative-decoding verify kernel stay SGLang's: longseq has no chunk prefill kernel (docs/benchmarks/kda.md
says why).

Tensor contract (SGLang's): H heads, K = V = head dim, S state-pool slots, ``ssm_states`` ``[S, H, V, K]``
fp32 (V first, the layout our kernels use), ``cache_indices`` ``[N]`` pool slot per request (updated in
place), ``query_start_loc`` ``[N + 1]`` int32.
"""

from __future__ import annotations

import torch
from sglang.srt.layers.attention.linear.kernels.kernel_backend import LinearAttnKernelBase

from longseq.config import LongSeqConfigError
from longseq.kernels import kda as kda_kernels

#: SGLang pads CUDA-graph batches with slot -1 and every slot >= 0 is a request's (vLLM reserves slot 0).
SGLANG_FIRST_SLOT = 0
OFF = "unset LONGSEQ_KDA (or LONGSEQ_KDA=0) to run SGLang's own KDA kernels"


def check_kda_state_supported(ssm_states: torch.Tensor) -> None:
    """Raise at backend construction when our kernels cannot run on this state pool.

    Args: ssm_states: SGLang's KDA recurrent-state pool, ``[..., H, V, K]``.
    Raises: LongSeqConfigError naming the unsupported head dim or state dtype.
    """
    from longseq.kernels.kda.utils import MAX_HEAD_DIM

    V, K = ssm_states.shape[-2], ssm_states.shape[-1]
    if max(K, V) > MAX_HEAD_DIM:
        raise LongSeqConfigError(f"LONGSEQ_KDA=1: the model's KDA head dims (K={K}, V={V}) exceed the "
                                 f"{MAX_HEAD_DIM} longseq's KDA kernels handle; {OFF}")
    if ssm_states.dtype != torch.float32:
        raise LongSeqConfigError(f"LONGSEQ_KDA=1: the KDA recurrent state is {ssm_states.dtype}; longseq's KDA "
                                 f"kernels keep it in float32 (SGLang's mamba ssm dtype setting); {OFF}")


def _reject(name: str, value) -> None:
    raise NotImplementedError(f"LONGSEQ_KDA=1: longseq's KDA kernels do not support {name}={value!r}; {OFF}")


class LongSeqKDAKernel(LinearAttnKernelBase):
    """``LinearAttnKernelBase`` over longseq's KDA decode kernels (decode, packed decode); never the extend kernel."""

    supports_packed_decode = True
    supports_packed_decode_safe_gate = True  # the bounded gate (``lower_bound``) runs in our kernels too
    supports_track_state_snapshot = False  # extends stay on SGLang's kernel, which snapshots the states itself

    def __init__(self, trace=None):
        self.trace = trace  # optional per-process call counter (tests)

    def _count(self, what: str) -> None:
        if self.trace is not None:
            self.trace[what] = self.trace.get(what, 0) + 1

    def decode(self, q, k, v, a, b, *, A_log, dt_bias, ssm_states, cache_indices, query_start_loc,
               lower_bound=None, **kwargs) -> torch.Tensor:
        """One token per request. q, k, v ``[1, N, H, K]`` post-conv; a ``[N, H*K]`` (or ``[1, N, H*K]``) raw gate;
        b ``[N, H]`` (or ``[1, N, H]``) raw beta. Returns ``[1, N, H, V]``; states updated in place.
        Gate and sigmoid(beta) are computed inside the recurrent kernel: one launch per layer."""
        self._count("decode")
        N, H, K = q.shape[1], q.shape[2], q.shape[3]
        o, _ = kda_kernels.fused_recurrent_kda(q=q, k=k, v=v, g=a.reshape(1, N, H, K), beta=b.reshape(1, N, H),
                                               initial_state=ssm_states, use_qk_l2norm_in_kernel=True,
                                               cu_seqlens=query_start_loc, ssm_state_indices=cache_indices,
                                               first_valid_slot=SGLANG_FIRST_SLOT, A_log=A_log.reshape(-1),
                                               dt_bias=None if dt_bias is None else dt_bias.reshape(-1),
                                               lower_bound=lower_bound, use_gate_in_kernel=True,
                                               use_beta_sigmoid_in_kernel=True)
        return o

    def packed_decode(self, mixed_qkv, a, b, *, A_log, dt_bias, scale, ssm_states, cache_indices, num_v_heads,
                      head_v_dim, lower_bound=None, **kwargs) -> torch.Tensor:
        """Fused decode from the post-conv ``mixed_qkv`` ``[N, 3*H*K]``; a/b raw gate and beta as in ``decode``.
        Returns ``[1, N, H, V]``."""
        if any(kwargs.get(f"replayssm_{x}") is not None for x in ("d", "k", "g", "write_pos")):
            _reject("--enable-linear-replayssm", True)
        self._count("packed_decode")
        N, H = mixed_qkv.shape[0], num_v_heads
        o, _ = kda_kernels.fused_recurrent_kda_packed_decode(
            mixed_qkv=mixed_qkv, raw_g=a.reshape(1, N, H, -1), raw_beta=b.reshape(1, N, H), A_log=A_log.reshape(-1),
            dt_bias=dt_bias.reshape(-1), lower_bound=lower_bound, initial_state=ssm_states,
            state_indices=cache_indices, scale=scale, first_valid_slot=SGLANG_FIRST_SLOT)
        return o

    def extend(self, q, k, v, g, beta, *, ssm_states, cache_indices, query_start_loc, **kwargs):
        """Not ours: :func:`install_kda_kernels` leaves SGLang's extend kernel in place (``LinearAttnKernelBase``
        declares ``extend`` abstract, so it is defined, and refuses)."""
        raise NotImplementedError(f"LONGSEQ_KDA=1: longseq has no KDA extend (chunk prefill) kernel; SGLang's "
                                  f"extend kernel runs extends; {OFF}")


def install_kda_kernels(dispatcher, ssm_states: torch.Tensor, state_tracking: bool = False,
                        trace=None) -> LongSeqKDAKernel:
    """Validate ``ssm_states`` and make ``dispatcher`` (a ``KDAKernelDispatcher``) run decode on our kernels.
    Returns the installed kernel object.

    Args:
        state_tracking: whether SGLang's mamba radix cache keeps an extra state buffer; accepted for the plugin's
            call and unused: extends, which snapshot those states, stay on SGLang's kernel.
    """
    check_kda_state_supported(ssm_states)
    kernel = LongSeqKDAKernel(trace)
    dispatcher.decode_kernel = kernel
    dispatcher.supports_packed_decode = kernel.supports_packed_decode
    dispatcher.supports_packed_decode_safe_gate = kernel.supports_packed_decode_safe_gate
    return kernel
