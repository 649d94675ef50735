"""longseq on vLLM's GPU platform, selected with ``--attention-backend CUSTOM``.

Dense mode subclasses vLLM's FlashAttention backend: the KV write and the attention math are vLLM's own
kernels (so dense tokens match ``FLASH_ATTN`` exactly, CUDA graphs included), and this layer adds what
later techniques plug into: per-step :class:`LongSeqStepInfo` on the metadata and KV-write hooks.

Sparse mode (``LONGSEQ_ATTENTION=sparse``): every KV write of a sparse layer refreshes the layer's Quest page
index; decode queries (put first in the batch by ``reorder_batch_threshold = 1``) attend to their top pages
through longseq's Triton kernels; prefill stays on FlashAttention. In a mixed batch FlashAttention runs over
the whole batch and the decode rows are then overwritten by the sparse result (pure decode batches, the
steady state and what CUDA graphs capture, never call FlashAttention).

Duo mode (``LONGSEQ_ATTENTION=duo``): every row of every layer follows the layer's streaming-head mask (this
rank's, :func:`duo_mask_for_this_rank`). Decode-only steps (what CUDA graphs capture): one launch of longseq's
Triton DuoAttention kernel for all heads, split-K sized from shapes only, plus its merge (or, from
``LONGSEQ_DUO_HYBRID_DECODE_BATCH`` requests on, default 8, the prefill path below). Steps with prefill
rows: FlashAttention on the runs of consecutive retrieval KV heads (strided head views, causal over the whole
context) and the Triton kernel on the streaming heads only, which visit sink + window tiles (prefill cost of
a streaming head is O(T * (sink + recent)) instead of O(T^2)).
"""

from __future__ import annotations

import dataclasses

import torch

from vllm.v1.attention.backends.flash_attn import (
    FlashAttentionBackend,
    FlashAttentionImpl,
    FlashAttentionMetadata,
    FlashAttentionMetadataBuilder,
)

from longseq.attention_backends.core.sparse import QuestPageIndex, SparseSettings, layer_index, sparse_decode
from longseq.attention_backends.vllm.common import (
    BackendTrace,
    KVWriteHook,
    LongSeqStepInfo,
    current_model_dtype,
    duo_mask_for_this_rank,
    validate_attention_layer,
)
from longseq.kernels.duo_attention.unified import default_num_splits, duo_paged_attention, retrieval_head_runs
from longseq.config import SUPPORTED_HEAD_SIZES, LongSeqConfigError, get_config


@dataclasses.dataclass
class LongSeqFlashMetadata(FlashAttentionMetadata):
    """FlashAttention's metadata plus longseq's per-step info (``None`` only in profiling runs)."""

    step: LongSeqStepInfo | None = None


_FA_INIT_FIELDS: tuple[str, ...] | None = None


def _wrap_flash_metadata(inner: FlashAttentionMetadata, step: LongSeqStepInfo) -> LongSeqFlashMetadata:
    global _FA_INIT_FIELDS
    if _FA_INIT_FIELDS is None:
        _FA_INIT_FIELDS = tuple(f.name for f in dataclasses.fields(FlashAttentionMetadata) if f.init)
    return LongSeqFlashMetadata(**{name: getattr(inner, name) for name in _FA_INIT_FIELDS}, step=step)


class LongSeqFlashMetadataBuilder(FlashAttentionMetadataBuilder):
    # vLLM may reuse one group's metadata for another KV-cache group by swapping only block_table and
    # slot_mapping (update_block_table); our `step` would keep the first group's. Ask for a fresh build.
    supports_update_block_table: bool = False

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        config = get_config()
        if config.attention == "duo":
            duo_mask_for_this_rank(config, vllm_config)  # the pattern must fit the model: fail at start-up
            # Each layer's duo tensors go to the GPU now (host-to-device copies), not in its first forward,
            # which may run inside a CUDA-graph capture.
            layers = vllm_config.compilation_config.static_forward_context
            for name in layer_names:
                impl = getattr(layers.get(name), "impl", None)
                if isinstance(impl, LongSeqFlashImpl):
                    impl._duo_for(layers[name], device)
        if config.attention == "sparse":
            SparseSettings.from_config(config).validate_layer(
                block_size=kv_cache_spec.block_size, head_size=kv_cache_spec.head_size, backend="longseq sparse")
            # Decodes first: their queries are then the leading rows, a fixed slice under CUDA graphs.
            self.reorder_batch_threshold = 1

    def build(self, common_prefix_len, common_attn_metadata, fast_build: bool = False) -> LongSeqFlashMetadata:
        inner = super().build(common_prefix_len, common_attn_metadata, fast_build)
        return _wrap_flash_metadata(inner, LongSeqStepInfo.from_common(common_attn_metadata, self.block_size))


class LongSeqFlashImpl(FlashAttentionImpl):
    """FlashAttention impl with longseq's validation, KV-write hooks and trace."""

    def __init__(self, num_heads: int, head_size: int, scale: float, num_kv_heads: int,
                 alibi_slopes, sliding_window, kv_cache_dtype: str, *args, **kwargs) -> None:
        super().__init__(num_heads, head_size, scale, num_kv_heads, alibi_slopes, sliding_window,
                         kv_cache_dtype, *args, **kwargs)
        self.config = get_config()
        validate_attention_layer(
            backend="longseq CUDA backend", head_size=head_size, num_heads=num_heads,
            num_kv_heads=num_kv_heads, kv_cache_dtype=kv_cache_dtype, model_dtype=current_model_dtype(),
            attn_type=str(getattr(self.attn_type, "value", self.attn_type)),
        )
        self.kv_write_hooks: list[KVWriteHook] = []
        self.trace = BackendTrace.for_backend("cuda", self.config)
        self.sparse = SparseSettings.from_config(self.config) if self.config.attention == "sparse" else None
        self.page_index: QuestPageIndex | None = None
        self._is_sparse_layer: bool | None = None  # known once the layer's name is seen
        self.duo = duo_mask_for_this_rank(self.config) if self.config.attention == "duo" else None
        self._duo_layer: DuoLayer | None = None  # built on the first forward (needs the layer's name, device)

    def _sparse_layer(self, layer) -> bool:
        if self._is_sparse_layer is None:
            self._is_sparse_layer = self.sparse is not None and self.sparse.is_sparse_layer(
                getattr(layer, "layer_name", ""))
            if self._is_sparse_layer:
                self.page_index = QuestPageIndex(self.sparse.page_size, self.sparse.summary_dtype)
        return self._is_sparse_layer

    def _key_value_caches(self, kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[num_blocks, block_size, Hkv, D]`` key and value views of the layer's ``[B, Hkv, N, 2*D]`` cache
        (the logical layout of every supported vLLM version, see ``longseq/versions.py``)."""
        return kv_cache.transpose(1, 2).split(self.head_size, dim=-1)

    def do_kv_cache_update(self, layer: torch.nn.Module, key: torch.Tensor, value: torch.Tensor,
                           kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        if self.config.debug_fault != "skip_kv_write":
            super().do_kv_cache_update(layer, key, value, kv_cache, slot_mapping)
        if self._sparse_layer(layer):
            self.page_index.update(self._key_value_caches(kv_cache)[0], slot_mapping)
        for hook in self.kv_write_hooks:
            hook(getattr(layer, "layer_name", ""), key, value, kv_cache, slot_mapping)
        self.trace.record("kv_writes")

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output,
                output_scale=None, output_block_scale=None) -> torch.Tensor:
        if self.duo is not None and attn_metadata is not None and self._duo_for(layer, query.device).num_streaming:
            if output_scale is not None or output_block_scale is not None:
                raise NotImplementedError("longseq duo: fused output quantization is not supported")
            self._duo_forward(layer, query, kv_cache, attn_metadata, output)
            return output
        if attn_metadata is None or not self._sparse_layer(layer):
            if attn_metadata is not None:
                self.trace.record("forward_calls", getattr(layer, "layer_name", ""), attn_metadata.num_actual_tokens)
            return super().forward(layer, query, key, value, kv_cache, attn_metadata, output,
                                   output_scale, output_block_scale)
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("longseq sparse: fused output quantization is not supported")
        step = attn_metadata.step
        nd = step.num_leading_decodes
        if nd < step.num_reqs:  # prefill or mixed batch: FlashAttention for all rows
            super().forward(layer, query, key, value, kv_cache, attn_metadata, output)
        if nd:
            key_cache, value_cache = self._key_value_caches(kv_cache)
            out = output[:nd].view(nd, self.num_heads, self.head_size)
            sparse_decode(query[:nd].view(nd, self.num_heads, self.head_size), key_cache, value_cache,
                          step.block_table[:nd], step.seq_lens[:nd], self.page_index, self.sparse, self.scale, out)
            self.trace.counts["sparse_decode_calls"] += 1
        self.trace.record("forward_calls", getattr(layer, "layer_name", ""), step.num_actual_tokens)
        return output

    def _duo_for(self, layer, device: torch.device) -> "DuoLayer":
        """The layer's duo tensors. A layer without streaming heads is dense: it keeps vLLM's FlashAttention
        path (same kernels, same schedule, so its rows match ``FLASH_ATTN`` exactly)."""
        if self._duo_layer is None:
            if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
                raise RuntimeError("longseq duo: layer tensors must be built before CUDA-graph capture (the "
                                   "metadata builder does it for the layers it is given)")
            self._duo_layer = DuoLayer.build(self.duo, getattr(layer, "layer_name", ""), device)
        return self._duo_layer

    def _duo_forward(self, layer, query, kv_cache, attn_metadata, output) -> None:
        """DuoAttention for every row of the step (see the module docstring for the two paths)."""
        step = attn_metadata.step
        duo = self._duo_layer
        t, nr = step.num_actual_tokens, step.num_reqs
        q = query[:t].view(t, self.num_heads, self.head_size)
        out = output[:t].view(t, self.num_heads, self.head_size)
        key_cache, value_cache = self._key_value_caches(kv_cache)
        args = (key_cache, value_cache, step.block_table[:nr], step.query_start_loc[: nr + 1], step.seq_lens[:nr],
                duo.is_streaming, self.duo.sink_size, self.duo.recent_size, self.scale)
        # Decode: one launch, split-K over the long heads (unless the hybrid decode is on for this batch size).
        if step.max_query_len <= 1 and not hybrid_decode(nr, self.config.duo_hybrid_decode_batch):
            splits = default_num_splits(nr, duo.num_retrieval, q.device) if duo.num_retrieval else 1
            duo_paged_attention(q, *args, max_query_len=1, out=out, kv_heads=duo.all_heads, num_splits=splits)
        else:
            if step.max_query_len <= 1:  # counted at capture under CUDA graphs: shows the graphs hold this path
                self.trace.counts["duo_hybrid_decode_calls"] += 1
            flash_retrieval_heads(q, key_cache, value_cache, out, duo.retrieval_runs, attn_metadata, self.scale,
                                  self.vllm_flash_attn_version)
            if duo.num_streaming:
                duo_paged_attention(q, *args, max_query_len=step.max_query_len, out=out,
                                    kv_heads=duo.streaming_heads, num_splits=1)
        self.trace.counts["duo_calls"] += 1
        self.trace.record("forward_calls", getattr(layer, "layer_name", ""), step.num_actual_tokens)


def hybrid_decode(num_reqs: int, min_batch: int) -> bool:
    """Whether a decode-only step of ``num_reqs`` requests (the padded batch size under CUDA graphs, fixed per
    graph) takes the prefill path: FlashAttention on the retrieval-head runs (vLLM's fixed split count under
    graphs) and the Triton kernel on the streaming heads. ``min_batch`` (``LONGSEQ_DUO_HYBRID_DECODE_BATCH``,
    default 8): from that many requests on; 0: never (one Triton launch for all heads).
    ``benchmarks/bench_duo_kernels.py --variants`` measures both (``hybrid_s32`` vs the best ``duo`` variant
    per batch)."""
    return min_batch > 0 and num_reqs >= min_batch


@dataclasses.dataclass
class DuoLayer:
    """One attention layer's DuoAttention tensors on the model's device (built once per layer).

    Attributes:
        is_streaming: ``[Hkv]`` int8 (this rank's KV heads).
        streaming_heads: ``[n]`` int32 ids of the streaming KV heads; all_heads: ``[Hkv]`` int32 ``0..Hkv-1``.
        retrieval_runs: ``[(lo, hi), ...]`` runs of consecutive retrieval KV heads (host side).
        num_streaming, num_retrieval: head counts (host side: grid sizes stay fixed under CUDA graphs).
    """

    is_streaming: torch.Tensor
    streaming_heads: torch.Tensor
    all_heads: torch.Tensor
    retrieval_runs: list[tuple[int, int]]
    num_streaming: int
    num_retrieval: int

    @classmethod
    def build(cls, mask, layer_name: str, device: torch.device) -> "DuoLayer":
        i = layer_index(layer_name)
        if i is None:
            raise LongSeqConfigError(f"longseq duo: cannot tell the layer number of attention layer {layer_name!r}")
        flags = mask.for_layer(i).to(torch.bool)
        heads = flags.nonzero().squeeze(1).to(torch.int32)
        return cls(flags.to(device=device, dtype=torch.int8), heads.to(device),
                   torch.arange(len(flags), dtype=torch.int32, device=device), retrieval_head_runs(flags),
                   int(flags.sum()), int((~flags).sum()))


def flash_retrieval_heads(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor, out: torch.Tensor,
                          runs: list[tuple[int, int]], meta, scale: float, fa_version: int | None) -> None:
    """Causal FlashAttention over the whole context for the KV heads of ``runs`` (one call per run, on strided
    head views of ``q``/caches/``out``: ``[T, Hq, D]``, ``[num_blocks, block_size, Hkv, D]``). ``meta`` gives
    ``query_start_loc``, ``max_query_len``, ``seq_lens``, ``max_seq_len``, ``block_table`` and
    ``max_num_splits`` (FlashAttention's metadata fields). vLLM's ahead-of-time schedule is for all heads, so
    it is not passed (FlashAttention schedules each call itself)."""
    from vllm.vllm_flash_attn import flash_attn_varlen_func

    group = q.shape[1] // key_cache.shape[2]
    for lo, hi in runs:
        flash_attn_varlen_func(
            q=q[:, lo * group : hi * group], k=key_cache[:, :, lo:hi], v=value_cache[:, :, lo:hi],
            out=out[:, lo * group : hi * group], cu_seqlens_q=meta.query_start_loc, max_seqlen_q=meta.max_query_len,
            seqused_k=meta.seq_lens, max_seqlen_k=meta.max_seq_len, softmax_scale=scale, causal=True,
            block_table=meta.block_table, fa_version=fa_version, num_splits=getattr(meta, "max_num_splits", 0))


class LongSeqFlashBackend(FlashAttentionBackend):
    """``AttentionBackendEnum.CUSTOM``: vLLM's FlashAttention backend with longseq's builder and impl.

    Cache shape, layout and kernel block sizes are FlashAttention's in every supported vLLM version
    (inherited), so the 0.26 ``get_kv_cache_shape`` and 0.32+ ``supported_kv_cache_layouts`` APIs both hold.
    """

    # vLLM 0.33: a fused QK-norm/RoPE/KV-insert op may write the cache itself when the backend allows it,
    # skipping do_kv_cache_update and so our KV-write hooks. Keep every write on our path.
    supports_kv_cache_update_bypass: bool = False

    @staticmethod
    def get_name() -> str:
        return "CUSTOM"

    @staticmethod
    def get_impl_cls() -> type[LongSeqFlashImpl]:
        return LongSeqFlashImpl

    @staticmethod
    def get_builder_cls() -> type[LongSeqFlashMetadataBuilder]:
        return LongSeqFlashMetadataBuilder

    @classmethod
    def supports_head_size(cls, head_size: int) -> bool:
        return head_size in SUPPORTED_HEAD_SIZES and super().supports_head_size(head_size)

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type == "decoder"
