"""What the vLLM GPU and CPU backends share per technique: one layer's sparse/duo state, the builders' checks.

vLLM builds one Impl per attention layer, so the per-layer state of a technique lives on the Impl:
:class:`LayerTechniques` is mixed into ``LongSeqFlashImpl`` and ``LongSeqCPUImpl``. Only the kernels differ
between the two (Triton + FlashAttention on GPU, PyTorch references on CPU).
"""

from __future__ import annotations

import torch

from longseq.attention_backends.core.duo import DuoLayer, StreamingHeadMask, rank_streaming_mask
from longseq.attention_backends.core.sparse import QuestPageIndex, SelectionReuse, SparseSettings
from longseq.attention_backends.vllm.common import BackendTrace
from longseq.config import LongSeqConfig


def duo_mask_for_this_rank(config: LongSeqConfig, vllm_config=None) -> StreamingHeadMask:
    """DuoAttention's streaming-head mask for this worker's tensor-parallel rank, validated against the model
    being built (``vllm_config``: the current one when omitted). Raises ``LongSeqConfigError`` at start-up."""
    from vllm.config import get_current_vllm_config_or_none

    cfg = vllm_config or get_current_vllm_config_or_none()
    model = cfg.model_config
    tp_size = cfg.parallel_config.tensor_parallel_size
    tp_rank = 0
    if tp_size > 1:
        from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

        tp_rank = get_tensor_model_parallel_rank()
    return rank_streaming_mask(config, model.hf_config.num_hidden_layers, model.get_total_num_kv_heads(),
                               tp_rank, tp_size)


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
    """

    config: LongSeqConfig

    def _init_techniques(self, backend: str) -> None:
        """``backend``: the trace's name (``cuda`` or ``cpu``)."""
        self.trace = BackendTrace.for_backend(backend, self.config)
        self.sparse = SparseSettings.from_config(self.config) if self.config.attention == "sparse" else None
        self.page_index: QuestPageIndex | None = None
        self._is_sparse_layer: bool | None = None  # known once the layer's name is seen
        self.duo = duo_mask_for_this_rank(self.config) if self.config.attention == "duo" else None
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
            self._duo_layer = DuoLayer.build(self.duo, getattr(layer, "layer_name", ""), device)
        return self._duo_layer

    def _record_forward(self, layer, num_tokens: int) -> None:
        self.trace.record("forward_calls", getattr(layer, "layer_name", ""), num_tokens)
