"""SGLang adapter for Kimi Delta Attention: longseq's KDA kernels as the decode/extend kernels of SGLang's
``KDAKernelDispatcher`` (``LONGSEQ_KDA=1``).

SGLang's hybrid linear-attention backend (``KDAAttnBackend``) does the convolutions, state-pool bookkeeping and
metadata, and calls ``dispatcher.decode`` / ``dispatcher.packed_decode`` / ``dispatcher.extend`` with kernel
objects implementing ``LinearAttnKernelBase``. :func:`install_kda_kernels` (run by the plugin's AROUND hook on
``KDAAttnBackend.__init__``, see ``plugin/sglang.py``) validates the layer shapes against our kernels and
replaces the dispatcher's decode kernel with :class:`LongSeqKDAKernel`, and its extend (prefill) kernel too only
under ``LONGSEQ_KDA_PREFILL=longseq``: by default (``framework``) extends stay on SGLang's own kernel, as our chunk
kernel measured 3.3x slower than fla's on H200 while our decode is faster. The speculative-decoding verify kernel
stays SGLang's.

Tensor contract (SGLang's): H heads, K = V = head dim, S state-pool slots, ``ssm_states`` ``[S, H, V, K]``
fp32 (V first, the layout our kernels use), ``cache_indices`` ``[N]`` pool slot per request (updated in
place), ``query_start_loc`` ``[N + 1]`` int32.
"""

from __future__ import annotations

import torch
from sglang.srt.layers.attention.linear.kernels.kernel_backend import LinearAttnKernelBase

from longseq.kernels import kda as kda_kernels
from longseq.config import LongSeqConfigError, get_config

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
    """``LinearAttnKernelBase`` over longseq's KDA kernels (decode, packed decode, extend)."""

    supports_packed_decode = True
    supports_packed_decode_safe_gate = True  # the bounded gate (``lower_bound``) runs in our kernels too
    supports_track_state_snapshot = False  # an extra-buffer radix cache is refused at start-up (install_kda_kernels)

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

    def extend(self, q, k, v, g, beta, *, ssm_states, cache_indices, query_start_loc, A_log=None, dt_bias=None,
               lower_bound=None, beta_is_raw=False, return_intermediate_states=False, **kwargs):
        """Chunked prefill. q, k, v ``[1, T, H, K]``; g ``[1, T, H, K]`` raw gate (gate fused in the kernel);
        beta ``[1, T, H]`` (raw when ``beta_is_raw``). Each request continues from ``ssm_states[cache_indices]``
        (SGLang zeroes a fresh request's slot) and its final state is written back. Returns ``[1, T, H, V]``."""
        if return_intermediate_states or kwargs.get("track_state") is not None:
            _reject("mamba radix-cache state tracking (use --mamba-radix-cache-strategy no_buffer)", True)
        if A_log is None:
            _reject("a pre-computed gate (A_log=None)", None)
        self._count("extend")
        idx = cache_indices.long()
        beta = beta.float().sigmoid() if beta_is_raw else beta
        o, final_state = kda_kernels.chunk_kda_with_fused_gate(
            q=q, k=k, v=v, raw_g=g.reshape(q.shape), beta=beta.reshape(q.shape[:3]), A_log=A_log, g_bias=dt_bias,
            initial_state=ssm_states.index_select(0, idx), output_final_state=True, use_qk_l2norm_in_kernel=True,
            cu_seqlens=query_start_loc, lower_bound=lower_bound)
        ssm_states[idx] = final_state.to(ssm_states.dtype)
        return o


def install_kda_kernels(dispatcher, ssm_states: torch.Tensor, state_tracking: bool, trace=None,
                        prefill: str | None = None) -> LongSeqKDAKernel:
    """Validate ``ssm_states`` and make ``dispatcher`` (a ``KDAKernelDispatcher``) run decode (and, under
    ``prefill="longseq"``, extend) on our kernels. Returns the installed kernel object.

    Args:
        state_tracking: SGLang's mamba radix cache keeps an extra state buffer (``enable_mamba_extra_buffer``):
            extends must then snapshot per-chunk states, which our extend kernel does not produce; refused here
            under ``prefill="longseq"``, at start-up, rather than by SGLang's assertion at the first such extend.
        prefill: ``LONGSEQ_KDA_PREFILL`` (``framework``: SGLang's extend kernel stays; ``longseq``: ours);
            None reads it from the longseq config.
    """
    if prefill is None:
        prefill = get_config().kda_prefill
    check_kda_state_supported(ssm_states)
    if state_tracking and prefill == "longseq":
        raise LongSeqConfigError(
            "LONGSEQ_KDA=1: SGLang's mamba radix cache resolved to an extra state buffer (--mamba-radix-cache-"
            "strategy auto/extra_buffer), which needs per-chunk KDA state snapshots longseq's extend kernel does not "
            "produce (LONGSEQ_KDA_PREFILL=longseq); pass --mamba-radix-cache-strategy no_buffer (or "
            f"--disable-radix-cache), or unset LONGSEQ_KDA_PREFILL (SGLang's extend kernel), or {OFF}")
    kernel = LongSeqKDAKernel(trace)
    dispatcher.decode_kernel = kernel
    if prefill == "longseq":
        dispatcher.extend_kernel = kernel
    dispatcher.supports_packed_decode = kernel.supports_packed_decode
    dispatcher.supports_packed_decode_safe_gate = kernel.supports_packed_decode_safe_gate
    return kernel
