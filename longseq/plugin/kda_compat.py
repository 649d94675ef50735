"""vLLM version shims for the KDA layer swap (``LONGSEQ_KDA=1``), and its lazy registration.

How the swap is installed: ``KimiGatedDeltaNetAttention.register_oot(LongSeqKimiDeltaAttention)``, vLLM's
supported out-of-tree layer replacement (a ``PluggableLayer`` builds the registered subclass wherever the model
builds the original; vLLM 0.26 .. 0.33). Why not the alternatives: re-registering the model architecture
(``ModelRegistry``) means copying a model whose module moved between 0.26 and 0.32; replacing the GDN metadata
backend changes every GDN model (Qwen3-Next too) and not the kernels; rebinding Triton kernels by name
(``vllm.triton_utils.dispatcher``, 0.32+ only) is monkeypatching.

Registration is lazy: subclassing needs vLLM's layer module, whose import costs seconds (Triton, FLA), and
vLLM calls the plugin in every process. :func:`register_vllm_kda_layer` therefore registers at once when that
module is already imported, else installs an import hook that registers right after the module is first
executed, i.e. in the processes that build a Kimi-Linear model and before any layer is built.

The layer's ``_forward`` differs by version (detected from its signature, not the version number):
* vLLM 0.26: ``_forward(q_proj_states, k_proj_states, v_proj_states, g1, beta, core_attn_out)`` with separate
  q/k/v convolutions, ``beta`` already through sigmoid, reached through ``torch.ops.vllm.kda_attention``;
* vLLM 0.32+: ``_forward(mixed_qkv, g1, g2, beta, core_attn_out)`` with one packed convolution, raw ``beta``,
  the output norm inside, decorated with ``eager_break_during_capture``.
The two bodies below mirror vLLM's and call the kernel steps of ``attention_backends/vllm/kda.py``.

Routing (``LONGSEQ_KDA_PREFILL``): decode-only steps always run longseq's recurrent kernel (1.15-2.2x faster than
vLLM's on H200). A step with prefills runs, by default (``framework``), the base layer's own ``_forward`` for the
whole step (vLLM's vendored fla ``chunk_kda`` is 3.3x faster than our chunk kernel); ``longseq`` runs ours.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.util
import inspect
import sys
import types
from typing import Callable

from longseq.versions import LongSeqVersionError

VLLM_KDA_LAYER_MODULE = "vllm.model_executor.layers.mamba.gdn.kimi_gdn_linear_attn"
VLLM_KDA_LAYER_CLASS = "KimiGatedDeltaNetAttention"
OUR_KDA_LAYER = "longseq.attention_backends.vllm.kda.LongSeqKimiDeltaAttention"

_SPLIT_QKV = ("q_proj_states", "k_proj_states", "v_proj_states", "g1", "beta", "core_attn_out")  # vLLM 0.26
_PACKED_QKV = ("mixed_qkv", "g1", "g2", "beta", "core_attn_out")  # vLLM 0.32+


def vllm_kda_layer_api(layer_cls: type) -> str:
    """``"split_qkv"`` (vLLM 0.26) or ``"packed_qkv"`` (0.32+), from the signature of ``layer_cls._forward``."""
    params = tuple(inspect.signature(inspect.unwrap(layer_cls._forward)).parameters)[1:]
    if params == _SPLIT_QKV:
        return "split_qkv"
    if params == _PACKED_QKV:
        return "packed_qkv"
    raise LongSeqVersionError(
        f"LONGSEQ_KDA=1: vLLM's {layer_cls.__name__}._forward{params} matches no layout longseq knows "
        f"({_SPLIT_QKV} in vLLM 0.26, {_PACKED_QKV} in 0.32+); unset LONGSEQ_KDA")


def vllm_kda_forward(layer_cls: type) -> Callable:
    """The ``_forward`` for our subclass of ``layer_cls`` (see the module docstring)."""
    if vllm_kda_layer_api(layer_cls) == "split_qkv":
        return forward_split_qkv
    from vllm.compilation.breakable_cudagraph import eager_break_during_capture

    # The base's decorator does not carry over to an override: a CUDA-graph capture must still run it eagerly.
    return eager_break_during_capture(forward_packed_qkv)


@functools.cache
def _vllm_ops() -> types.SimpleNamespace:
    """vLLM's convolution ops and forward context (same module paths in 0.26 .. 0.33), resolved once."""
    from vllm.forward_context import get_forward_context
    from vllm.model_executor.layers.mamba.mamba_utils import is_conv_state_dim_first
    from vllm.model_executor.layers.mamba.ops.causal_conv1d import causal_conv1d_fn, causal_conv1d_update

    from longseq.attention_backends.vllm import kda

    return types.SimpleNamespace(get_forward_context=get_forward_context, causal_conv1d_fn=causal_conv1d_fn,
                                 causal_conv1d_update=causal_conv1d_update, kda=kda,
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


def _prefill_conv(ops, m, x, weight, bias, state):
    """Causal conv + SiLU over the varlen prefill tokens ``x [T, C]`` (continues/updates ``state``)."""
    return ops.causal_conv1d_fn(x.transpose(0, 1), weight, bias, activation="silu", conv_states=state,
                                has_initial_state=m.has_initial_state, cache_indices=m.non_spec_state_indices_tensor,
                                query_start_loc=m.non_spec_query_start_loc, metadata=m).transpose(0, 1)


def _framework_prefill(self, args: tuple, recurrent_state) -> None:
    """Run a step with prefills on the framework's own layer (``LONGSEQ_KDA_PREFILL=framework``).

    ``self.longseq_framework_forward`` is the base class's undecorated ``_forward``, called with our ``_forward``'s
    arguments. The test-only ``skip_kv_write`` fault restores the state pool after it, as our path then skips its
    write. The call is counted as ``framework_prefill_calls`` in the trace (flushed at 1, 2, 4, ... calls: decode
    runs from CUDA graphs afterwards, so no later ``forward_calls`` event would write it out)."""
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


def _prefill_on_framework(self, m) -> bool:
    return m.num_prefills > 0 and self.longseq_config.kda_prefill == "framework"


def _heads(x, head_dim):
    return x.unflatten(-1, (-1, head_dim)).unsqueeze(0)  # [T, H*D] -> [1, T, H, D]


def forward_split_qkv(self, q_proj_states, k_proj_states, v_proj_states, g1, beta, core_attn_out) -> None:
    """vLLM 0.26 ``_forward``: q/k/v ``[T, H*D]`` projections, g1 ``[1, T, H, D]`` raw gate, beta ``[1, T, H]``
    after sigmoid; writes ``core_attn_out[0, :T]`` (``[1, T_padded, H, D]``)."""
    m = _step_metadata(self)
    if m is None:
        return
    ops, n = _vllm_ops(), m.num_actual_tokens
    write_state = self.longseq_config.debug_fault != "skip_kv_write"
    conv_state, recurrent_state = _conv_states(self)
    if _prefill_on_framework(self, m):
        return _framework_prefill(self, (q_proj_states, k_proj_states, v_proj_states, g1, beta, core_attn_out),
                                  recurrent_state)
    convs = (self.q_conv1d, self.k_conv1d, self.v_conv1d)
    weights = [c.weight.view(c.weight.size(0), c.weight.size(2)) for c in convs]
    states = conv_state.chunk(3, dim=-2)
    xs = (q_proj_states[:n], k_proj_states[:n], v_proj_states[:n])
    g1, beta = g1[:, :n], beta[:, :n]
    if m.num_prefills > 0:
        q, k, v = [_heads(_prefill_conv(ops, m, x, w, c.bias, s), self.head_dim)
                   for x, w, c, s in zip(xs, weights, convs, states)]
        o = ops.kda.kda_prefill(q, k, v, g1, beta, self.A_log, self.dt_bias, recurrent_state,
                                m.non_spec_state_indices_tensor, m.has_initial_state, m.non_spec_query_start_loc,
                                write_state=write_state)
        self.longseq_trace.record("forward_calls", self.prefix, tokens=n)
    else:
        idx = m.non_spec_state_indices_tensor[:n]
        q, k, v = [_heads(ops.causal_conv1d_update(x, s, w, c.bias, activation="silu", conv_state_indices=idx,
                                                   validate_data=True), self.head_dim)
                   for x, w, c, s in zip(xs, weights, convs, states)]
        # As vLLM: all slot indices, and cu_seqlens cut to the real decodes (CUDA-graph padding is not computed).
        o = ops.kda.kda_decode(q, k, v, g1, beta, self.A_log, self.dt_bias, recurrent_state,
                               m.non_spec_state_indices_tensor, m.non_spec_query_start_loc[: m.num_decodes + 1],
                               write_state=write_state)
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
    write_state = self.longseq_config.debug_fault != "skip_kv_write"
    conv_state, recurrent_state = _conv_states(self)
    if _prefill_on_framework(self, m):
        return _framework_prefill(self, (mixed_qkv, g1, g2, beta, core_attn_out), recurrent_state)
    mixed_qkv, g1, beta = mixed_qkv[:n], g1[:, :n], beta[:, :n]
    weight = self.conv1d.weight.view(self.conv1d.weight.size(0), self.conv1d.weight.size(2))
    if m.num_prefills > 0:
        size = self.local_projection_size  # separate q/k/v convs give dense outputs from the strided inputs
        q, k, v = [_heads(_prefill_conv(ops, m, x, w, None, s), self.head_dim)
                   for x, w, s in zip(mixed_qkv.split(size, -1), weight.split(size, 0), conv_state.split(size, -2))]
        o = ops.kda.kda_prefill(q, k, v, g1, beta.float().sigmoid(), self.A_log, self.dt_bias, recurrent_state,
                                m.non_spec_state_indices_tensor, m.has_initial_state, m.non_spec_query_start_loc,
                                lower_bound=self.gate_lower_bound, write_state=write_state)
        self.longseq_trace.record("forward_calls", self.prefix, tokens=n)
    else:
        idx = m.non_spec_state_indices_tensor[:n]
        qkv = ops.causal_conv1d_update(mixed_qkv, conv_state, weight, self.conv1d.bias, activation="silu",
                                       conv_state_indices=idx, validate_data=True,
                                       out=mixed_qkv.new_empty(mixed_qkv.shape))
        o = ops.kda.kda_packed_decode(qkv, g1, beta, self.A_log, self.dt_bias, recurrent_state, idx,
                                      lower_bound=self.gate_lower_bound, write_state=write_state)
        self.longseq_trace.record("forward_calls", self.prefix)
    core_attn_out[0, :n] = o[0, :n]
    core_attn_out.copy_(self.o_norm(core_attn_out, g2))


# ------------------------------------------------------------------------------------ lazy registration
def install_vllm_kda_layer(layer_module: types.ModuleType | None = None) -> type:
    """``register_oot`` our subclass for vLLM's KDA layer now (idempotent). Returns the registered class.

    Raises:
        LongSeqVersionError: the layer's ``_forward`` has a layout longseq does not know, or another plugin
            already replaced the layer.
    """
    from vllm.model_executor.custom_op import op_registry_oot

    module = layer_module or importlib.import_module(VLLM_KDA_LAYER_MODULE)
    base = getattr(module, VLLM_KDA_LAYER_CLASS)
    current = op_registry_oot.get(VLLM_KDA_LAYER_CLASS)
    if current is not None:
        if f"{current.__module__}.{current.__qualname__}" == OUR_KDA_LAYER:
            return current
        raise LongSeqVersionError(
            f"LONGSEQ_KDA=1: {VLLM_KDA_LAYER_CLASS} is already replaced by {current.__module__}."
            f"{current.__qualname__} (another plugin); unset LONGSEQ_KDA or that plugin")
    vllm_kda_layer_api(base)  # fail here, at start-up, on an unknown layout
    from longseq.attention_backends.vllm.kda import LongSeqKimiDeltaAttention

    base.register_oot(LongSeqKimiDeltaAttention)
    return LongSeqKimiDeltaAttention


class _AfterImportHook(importlib.abc.MetaPathFinder):
    """Runs ``callback(module)`` right after the module ``name`` is first executed (one-shot)."""

    def __init__(self, name: str, callback: Callable[[types.ModuleType], object]):
        self.name, self.callback = name, callback

    def find_spec(self, fullname, path, target=None):
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)  # one-shot, and keeps find_spec below from finding us again
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        spec.loader = _CallbackLoader(spec.loader, self.callback)
        return spec


class _CallbackLoader(importlib.abc.Loader):
    def __init__(self, loader, callback):
        self._loader, self._callback = loader, callback

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        self._callback(module)

    def __getattr__(self, name):  # get_source, get_filename, ... for tracebacks and inspect
        return getattr(self._loader, name)


def register_vllm_kda_layer() -> str:
    """Install our KDA layer now if vLLM's layer module is loaded, else right after it loads. Idempotent.

    Returns ``"registered"`` or ``"deferred"`` (an import hook is waiting for the module).
    """
    if VLLM_KDA_LAYER_MODULE in sys.modules:
        install_vllm_kda_layer(sys.modules[VLLM_KDA_LAYER_MODULE])
        return "registered"
    if not any(isinstance(f, _AfterImportHook) and f.name == VLLM_KDA_LAYER_MODULE for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterImportHook(VLLM_KDA_LAYER_MODULE, install_vllm_kda_layer))
    return "deferred"
