"""What the vLLM GPU and CPU backends share per technique: one layer's sparse/duo state, the builders' checks.

vLLM builds one Impl per attention layer, so the per-layer state of a technique lives on the Impl:
:class:`LayerTechniques` is mixed into ``LongSeqFlashImpl`` and ``LongSeqCPUImpl``. Only the kernels differ
between the two (Triton + FlashAttention on GPU, PyTorch references on CPU).
"""

from __future__ import annotations

import torch

from longseq.attention_backends.core.duo import DuoLayer, StreamingHeadMask, rank_streaming_mask
from longseq.attention_backends.core.layers import global_layer_rows, layer_index
from longseq.attention_backends.core.sparse import QuestPageIndex, SelectionReuse, SparseSettings
from longseq.attention_backends.vllm.common import BackendTrace
from longseq.config import LongSeqConfig, LongSeqConfigError
from longseq.kernels.score_mods import ScoreMods


def _current_vllm_config(vllm_config=None):
    from vllm.config import get_current_vllm_config_or_none

    return vllm_config or get_current_vllm_config_or_none()


def model_global_layer_rows(vllm_config=None) -> list[int | None]:
    """Per layer of the model being built: its row among the global (not sliding-window) layers, None for a
    windowed layer (``global_layer_rows`` over the HF config's ``layer_types``)."""
    model = _current_vllm_config(vllm_config).model_config
    hf = getattr(model, "hf_text_config", model.hf_config)
    try:
        return global_layer_rows(getattr(hf, "layer_types", None), hf.num_hidden_layers)
    except ValueError as e:
        raise LongSeqConfigError(f"longseq: cannot tell windowed from global layers: {e}") from None


def duo_mask_for_this_rank(config: LongSeqConfig, vllm_config=None) -> StreamingHeadMask:
    """DuoAttention's streaming-head mask for this worker's tensor-parallel rank, validated against the model
    being built (``vllm_config``: the current one when omitted): one row per global layer (a hybrid model's
    sliding-window layers are not in the pattern). Raises ``LongSeqConfigError`` at start-up."""
    cfg = _current_vllm_config(vllm_config)
    model = cfg.model_config
    num_global = sum(r is not None for r in model_global_layer_rows(cfg))
    if num_global == 0:
        raise LongSeqConfigError("longseq duo: every attention layer of this model is sliding-window; duo applies "
                                 "to global layers only")
    tp_size = cfg.parallel_config.tensor_parallel_size
    tp_rank = 0
    if tp_size > 1:
        from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

        tp_rank = get_tensor_model_parallel_rank()
    return rank_streaming_mask(config, num_global, model.get_total_num_kv_heads(), tp_rank, tp_size)


def check_technique(config: LongSeqConfig, kv_cache_spec, vllm_config) -> None:
    """The MetadataBuilders' start-up check of the configured technique against this KV-cache group: the sparse
    page size must divide the block size, the duo pattern must fit the model (``LongSeqConfigError`` otherwise)."""
    if config.attention == "sparse":
        SparseSettings.from_config(config).validate_layer(
            block_size=kv_cache_spec.block_size, head_size=kv_cache_spec.head_size, backend="longseq sparse")
    if config.attention == "duo":
        duo_mask_for_this_rank(config, vllm_config)


def sparse_reuse_for(config: LongSeqConfig, kv_cache_spec, vllm_config, device) -> SelectionReuse | None:
    """The builder's :class:`SelectionReuse` for its KV-cache group (sparse mode with
    ``LONGSEQ_SPARSE_REUSE_STEPS`` > 1), sized for the scheduler's most concurrent requests; else None."""
    if config.attention != "sparse" or config.sparse_reuse_steps <= 1:
        return None
    return SelectionReuse(SparseSettings.from_config(config), kv_cache_spec.block_size,
                          vllm_config.scheduler_config.max_num_seqs, device)


class LayerTechniques:
    """One attention layer's technique state, mixed into the GPU and CPU Impls.

    Attributes (set by :meth:`_init_techniques`, from ``self.config``):
        trace: the backend's :class:`BackendTrace`.
        sparse: :class:`SparseSettings` in sparse mode, else None; ``page_index``: the layer's
            :class:`QuestPageIndex` once the layer is known to be sparse (its name is seen at the first write).
        duo: this rank's :class:`StreamingHeadMask` in duo mode, else None; ``_duo_layer``: the layer's
            :class:`DuoLayer` once built (it needs the layer's name and device).
        windowed: the layer has a sliding window (it runs the framework's kernel in every mode).
        score_mods: the layer's soft-cap and sinks (:class:`ScoreMods`), for our kernels.
    """

    config: LongSeqConfig

    def _init_techniques(self, backend: str, sliding_window: int | None = None,
                         logits_soft_cap: float | None = None, sinks: torch.Tensor | None = None) -> None:
        """``backend``: the trace's name (``cuda`` or ``cpu``). ``sliding_window``: the layer's window (None or
        <= 0: global layer); a windowed layer keeps its window and runs dense whatever the technique.
        ``logits_soft_cap`` (None or 0: none), ``sinks`` (``[Hq]`` parameter, read at each step since weights load
        after this): the layer's score modifiers, ``self.score_mods``; every kernel of ours applies them."""
        self.trace = BackendTrace.for_backend(backend, self.config)
        technique = self.config.attention
        self.windowed = sliding_window is not None and sliding_window > 0
        self.score_mods = ScoreMods.of(logits_soft_cap, sinks)
        applies = not self.windowed
        self.sparse = SparseSettings.from_config(self.config) if technique == "sparse" and applies else None
        self.page_index: QuestPageIndex | None = None
        self._is_sparse_layer: bool | None = None  # known once the layer's name is seen
        self.duo = duo_mask_for_this_rank(self.config) if technique == "duo" and applies else None
        self._duo_pattern_rows = model_global_layer_rows() if self.duo is not None else None
        self._duo_layer: DuoLayer | None = None

    def _sparse_layer(self, layer) -> bool:
        """Whether ``layer`` runs sparse decode (its page index is made the first time this says yes)."""
        if self._is_sparse_layer is None:
            self._is_sparse_layer = self.sparse is not None and self.sparse.is_sparse_layer(
                getattr(layer, "layer_name", ""))
            if self._is_sparse_layer:
                self.page_index = QuestPageIndex(self.sparse.page_size, self.sparse.summary_dtype)
        return self._is_sparse_layer

    def _duo_for(self, layer, device: torch.device) -> DuoLayer:
        """The layer's duo tensors, built on the first call."""
        if self._duo_layer is None:
            if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
                raise RuntimeError("longseq duo: layer tensors must be built before CUDA-graph capture (the "
                                   "metadata builder does it for the layers it is given)")
            role = getattr(layer, "longseq_duo_role", None)
            if role is not None:  # a sublayer of LONGSEQ_DUO_MEMORY's split: every head of one kind
                flags = torch.full((1, self.num_kv_heads), role == "streaming", dtype=torch.bool)
                self._duo_layer = DuoLayer.build(StreamingHeadMask(flags, self.duo.sink_size, self.duo.recent_size),
                                                 0, device)
                return self._duo_layer
            name = getattr(layer, "layer_name", "")
            if self.config.duo_memory:  # vLLM built the model without our split class: say so, never run unsplit
                raise LongSeqConfigError(
                    f"LONGSEQ_DUO_MEMORY=1: attention layer {name!r} was not split into retrieval and streaming "
                    "sublayers, so no KV memory would be saved: this model's architecture is not a Llama or Qwen2 "
                    "model class of vLLM (unset LONGSEQ_DUO_MEMORY: duo still runs, saving compute only)")
            i = layer_index(name)
            if i is None or i >= len(self._duo_pattern_rows):
                raise LongSeqConfigError(f"longseq duo: cannot tell the layer number of attention layer {name!r}")
            self._duo_layer = DuoLayer.build(self.duo, self._duo_pattern_rows[i], device)
        return self._duo_layer

    def _record_forward(self, layer, num_tokens: int) -> None:
        self.trace.record("forward_calls", getattr(layer, "layer_name", ""), num_tokens)
