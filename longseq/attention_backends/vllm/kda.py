"""vLLM adapter for Kimi Delta Attention: Kimi-Linear's KDA layer with its decode kernel swapped for longseq's.

``LongSeqKimiDeltaAttention`` subclasses vLLM's ``KimiGatedDeltaNetAttention`` and is installed with
``KimiGatedDeltaNetAttention.register_oot`` (``plugin/vllm.py`` does that when ``LONGSEQ_KDA=1``), so the model
builds ours wherever it builds vLLM's. Only ``_forward`` changes: decode-only steps run longseq's recurrent kernel,
steps with prefills run the base layer's own ``_forward`` for the whole step (vLLM's vendored fla ``chunk_kda``;
docs/benchmarks/kda.md says why). The projections, weights, state shapes/dtypes, metadata builder and output
norm stay vLLM's, so checkpoints load unchanged and the outputs differ from vLLM's only by rounding.

``_forward``'s signature differs by version (``versions.vllm_kda_layer_api`` reads it from the signature):
* vLLM 0.26: ``_forward(q_proj_states, k_proj_states, v_proj_states, g1, beta, core_attn_out)`` with separate
  q/k/v convolutions, ``beta`` already through sigmoid, reached through ``torch.ops.vllm.kda_attention``;
* vLLM 0.32+: ``_forward(mixed_qkv, g1, g2, beta, core_attn_out)`` with one packed convolution, raw ``beta``,
  the output norm inside, decorated with ``eager_break_during_capture``.
The two bodies below (:func:`forward_split_qkv`, :func:`forward_packed_qkv`) mirror vLLM's decode branches and
call the version-neutral kernel steps at the end of this module.

This module imports vLLM's layer module (it must, to subclass it): nothing imports it at plugin registration.
Shapes: T tokens of a step, N sequences, H local KDA heads, D = head_dim (K = V = D), S state-pool slots.
"""

from __future__ import annotations

import functools
import inspect
import types
from collections.abc import Callable

import torch
from vllm.model_executor.layers.mamba.gdn.kimi_gdn_linear_attn import KimiGatedDeltaNetAttention

from longseq.attention_backends.vllm.common import BackendTrace
from longseq.config import LongSeqConfigError, get_config
from longseq.kernels import kda as kda_kernels
from longseq.versions import vllm_kda_layer_api

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


# ------------------------------------------------------------------------------ _forward, both vLLM versions
@functools.cache
def _vllm_ops() -> types.SimpleNamespace:
    """vLLM's convolution op and forward context (same module paths in 0.26 .. 0.33), resolved once."""
    from vllm.forward_context import get_forward_context
    from vllm.model_executor.layers.mamba.mamba_utils import is_conv_state_dim_first
    from vllm.model_executor.layers.mamba.ops.causal_conv1d import causal_conv1d_update

    return types.SimpleNamespace(get_forward_context=get_forward_context, causal_conv1d_update=causal_conv1d_update,
                                 is_conv_state_dim_first=is_conv_state_dim_first)


def _step_metadata(layer):
    """This layer's ``GDNAttentionMetadata`` for the step, or None in profile/warm-up runs (nothing to do)."""
    meta = _vllm_ops().get_forward_context().attn_metadata
    if meta is None:
        return None
    return meta.get(layer.prefix)


def _conv_states(layer):
    """``(conv_state [S, C, width-1] view, recurrent_state [S, H, D, D])`` whatever the conv-state layout."""
    conv_state, recurrent_state = layer.kv_cache
    if not _vllm_ops().is_conv_state_dim_first():  # the SD layout stores (width-1, C): the kernels want (C, width-1)
        conv_state = conv_state.transpose(-1, -2)
    return conv_state, recurrent_state


def _framework_prefill(self, args: tuple, recurrent_state) -> None:
    """Run a step with prefills on the framework's own layer.

    ``self.longseq_framework_forward`` is the base class's undecorated ``_forward``, called with our ``_forward``'s
    arguments. The test-only ``skip_kv_write`` fault restores the state pool after it, as our decode then skips
    its write. The call is counted as ``framework_prefill_calls`` in the trace (flushed at 1, 2, 4, ... calls:
    decode runs from CUDA graphs afterwards, so no later ``forward_calls`` event would write it out)."""
    saved = recurrent_state.clone() if self.longseq_config.debug_fault == "skip_kv_write" else None
    self.longseq_framework_forward(*args)
    if saved is not None:
        recurrent_state.copy_(saved)
    trace = self.longseq_trace
    calls = trace.counts.get("framework_prefill_calls", 0) + 1
    trace.counts["framework_prefill_calls"] = calls
    trace.layers.add(self.prefix)
    if calls & (calls - 1) == 0:
        trace.flush()


def _heads(x, head_dim):
    return x.unflatten(-1, (-1, head_dim)).unsqueeze(0)  # [T, H*D] -> [1, T, H, D]


def forward_split_qkv(self, q_proj_states, k_proj_states, v_proj_states, g1, beta, core_attn_out) -> None:
    """vLLM 0.26 ``_forward``: q/k/v ``[T, H*D]`` projections, g1 ``[1, T, H, D]`` raw gate, beta ``[1, T, H]``
    after sigmoid; writes ``core_attn_out[0, :T]`` (``[1, T_padded, H, D]``)."""
    m = _step_metadata(self)
    if m is None:
        return
    ops, n = _vllm_ops(), m.num_actual_tokens
    conv_state, recurrent_state = _conv_states(self)
    if m.num_prefills > 0:
        return _framework_prefill(self, (q_proj_states, k_proj_states, v_proj_states, g1, beta, core_attn_out),
                                  recurrent_state)
    convs = (self.q_conv1d, self.k_conv1d, self.v_conv1d)
    weights = [c.weight.view(c.weight.size(0), c.weight.size(2)) for c in convs]
    states = conv_state.chunk(3, dim=-2)
    xs = (q_proj_states[:n], k_proj_states[:n], v_proj_states[:n])
    idx = m.non_spec_state_indices_tensor[:n]
    q, k, v = [_heads(ops.causal_conv1d_update(x, s, w, c.bias, activation="silu", conv_state_indices=idx,
                                               validate_data=True), self.head_dim)
               for x, w, c, s in zip(xs, weights, convs, states)]
    # As vLLM: all slot indices, and cu_seqlens cut to the real decodes (CUDA-graph padding is not computed).
    o = kda_decode(q, k, v, g1[:, :n], beta[:, :n], self.A_log, self.dt_bias, recurrent_state,
                   m.non_spec_state_indices_tensor, m.non_spec_query_start_loc[: m.num_decodes + 1],
                   write_state=self.longseq_config.debug_fault != "skip_kv_write")
    self.longseq_trace.record("forward_calls", self.prefix)
    core_attn_out[0, :n] = o[0, :n]


def forward_packed_qkv(self, mixed_qkv, g1, g2, beta, core_attn_out) -> None:
    """vLLM 0.32+ ``_forward``: mixed_qkv ``[T, 3*H*D]``, g1 ``[1, T, H, D]`` raw gate, g2 ``[T, H, D]`` output
    gate, beta ``[1, T, H]`` raw; writes the gated-RMS-normed output into ``core_attn_out`` ``[1, T_padded, H, D]``."""
    m = _step_metadata(self)
    if m is None:
        return
    if m.spec_sequence_masks is not None:  # rejected at construction; a batch with drafts must not pass silently
        raise NotImplementedError("LONGSEQ_KDA=1: speculative-decoding batches are not supported")
    ops, n = _vllm_ops(), m.num_actual_tokens
    conv_state, recurrent_state = _conv_states(self)
    if m.num_prefills > 0:
        return _framework_prefill(self, (mixed_qkv, g1, g2, beta, core_attn_out), recurrent_state)
    mixed_qkv = mixed_qkv[:n]
    weight = self.conv1d.weight.view(self.conv1d.weight.size(0), self.conv1d.weight.size(2))
    idx = m.non_spec_state_indices_tensor[:n]
    qkv = ops.causal_conv1d_update(mixed_qkv, conv_state, weight, self.conv1d.bias, activation="silu",
                                   conv_state_indices=idx, validate_data=True, out=mixed_qkv.new_empty(mixed_qkv.shape))
    o = kda_packed_decode(qkv, g1[:, :n], beta[:, :n], self.A_log, self.dt_bias, recurrent_state, idx,
                          lower_bound=self.gate_lower_bound,
                          write_state=self.longseq_config.debug_fault != "skip_kv_write")
    self.longseq_trace.record("forward_calls", self.prefix)
    core_attn_out[0, :n] = o[0, :n]
    core_attn_out.copy_(self.o_norm(core_attn_out, g2))


def vllm_kda_forward(layer_cls: type) -> Callable:
    """The ``_forward`` for our subclass of ``layer_cls``: :func:`forward_split_qkv` (vLLM 0.26) or
    :func:`forward_packed_qkv` (0.32+).

    Raises:
        LongSeqVersionError: ``layer_cls._forward`` has a layout longseq does not know.
    """
    if vllm_kda_layer_api(layer_cls) == "split_qkv":
        return forward_split_qkv
    from vllm.compilation.breakable_cudagraph import eager_break_during_capture

    # The base's decorator does not carry over to an override: a CUDA-graph capture must still run it eagerly.
    return eager_break_during_capture(forward_packed_qkv)


class LongSeqKimiDeltaAttention(KimiGatedDeltaNetAttention):
    """vLLM's Kimi-Linear KDA layer running longseq's KDA decode kernel (see the module docstring)."""

    def __init__(self, config, vllm_config, prefix: str = "") -> None:
        super().__init__(config, vllm_config, prefix)
        self.longseq_config = get_config()
        check_kda_layer_supported(head_dim=self.head_dim, state_dtype=self.get_state_dtype()[1],
                                  num_speculative_tokens=getattr(self, "num_spec", 0))
        self.longseq_trace = BackendTrace.for_backend("kda", self.longseq_config)

    #: vLLM 0.26: ``(q_proj_states, k_proj_states, v_proj_states, g1, beta, core_attn_out)``;
    #: 0.32+: ``(mixed_qkv, g1, g2, beta, core_attn_out)`` (re-wrapped in ``eager_break_during_capture``).
    _forward = vllm_kda_forward(KimiGatedDeltaNetAttention)
    #: vLLM's own ``_forward`` (undecorated: ours already breaks CUDA-graph capture), run for steps with prefills.
    longseq_framework_forward = inspect.unwrap(KimiGatedDeltaNetAttention._forward)


# ------------------------------------------------------------------------ kernel steps (version-neutral)
def kda_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, raw_g: torch.Tensor, beta: torch.Tensor,
               A_log: torch.Tensor, dt_bias: torch.Tensor, recurrent_state: torch.Tensor,
               state_indices: torch.Tensor, cu_seqlens: torch.Tensor, write_state: bool = True) -> torch.Tensor:
    """One recurrent KDA step per sequence (vLLM 0.26's decode path), the gate computed inside the recurrent kernel
    (one launch per layer where vLLM runs a gate kernel and then the recurrent one).

    Args:
        q, k, v: ``[1, N, H, D]`` post-conv (q and k are L2-normalized in the kernel), one token per sequence.
        raw_g: ``[1, N, H, D]`` gate projection before the gate; beta: ``[1, N, H]`` write strength after sigmoid.
        A_log: ``[H]`` (vLLM 0.26 stores ``[1, 1, H, 1]``) fp32; dt_bias: ``[H * D]`` fp32.
        recurrent_state: ``[S, H, D, D]`` fp32 pool (V, K order), updated in place at ``state_indices``.
            In vLLM it is a strided view of the KV-cache pages (slots a page apart, the conv state in between):
            the kernels address slots by the pool's stride, never by ``H * D * D``.
        state_indices: ``[>= N]`` pool slot per sequence (CUDA-graph padding beyond N, and slot 0, vLLM's null
            block, are skipped); cu_seqlens: ``[N + 1]`` int32 token offsets.
        write_state: False only for the test-only fault injection (negative control).
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
        recurrent_state, state_indices, write_state: as :func:`kda_decode` (states updated in place).
        lower_bound: None (softplus gate) or the bounded gate's negative bound (vLLM 0.32+ ``gate_lower_bound``).
    Returns ``[1, N, H, D]``.
    """
    o, _ = kda_kernels.fused_recurrent_kda_packed_decode(
        mixed_qkv=mixed_qkv, raw_g=raw_g, raw_beta=raw_beta, A_log=A_log, dt_bias=dt_bias, lower_bound=lower_bound,
        initial_state=recurrent_state if write_state else recurrent_state.clone(), state_indices=state_indices)
    return o
