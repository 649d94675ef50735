"""longseq on vLLM's GPU platform, selected with ``--attention-backend CUSTOM``.

Dense mode subclasses vLLM's FlashAttention backend: the KV write and the attention math are vLLM's own
kernels (so dense tokens match ``FLASH_ATTN`` exactly, CUDA graphs included), and this layer adds what
later techniques plug into: per-step :class:`LongSeqStepInfo` on the metadata and KV-write hooks.

Sparse mode (``LONGSEQ_ATTENTION=sparse``): every KV write of a sparse layer refreshes the layer's Quest page
index; decode queries (put first in the batch by ``reorder_batch_threshold = 1``) attend to their top pages
through longseq's Triton kernels; prefill stays on FlashAttention. In a mixed batch FlashAttention runs over
the whole batch and the decode rows are then overwritten by the sparse result (pure decode batches, the
steady state and what CUDA graphs capture, never call FlashAttention).

Duo mode (``LONGSEQ_ATTENTION=duo``): every row of every layer with a streaming head goes through
``longseq.attention_backends.core.duo.duo_attention`` with this rank's mask. Decode-only steps (what CUDA graphs
capture): one launch of longseq's Triton DuoAttention kernel for all heads (or, from
``LONGSEQ_DUO_HYBRID_DECODE_BATCH`` requests on, the prefill path). Steps with prefill rows: FlashAttention on
the runs of consecutive retrieval KV heads (:func:`flash_retrieval_heads`, strided head views, causal over the
whole context) and the Triton kernel on the streaming heads only, which visit sink + window tiles (prefill cost
of a streaming head is O(T * (sink + recent)) instead of O(T^2)).
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
from vllm.v1.attention.backends.utils import get_num_attention_heads_from_layers

from longseq.attention_backends.core.duo import HYBRID, duo_attention
from longseq.attention_backends.core.duo import retrieval_head_runs  # noqa: F401 - flash.retrieval_head_runs in tests
from longseq.attention_backends.core.sparse import sparse_decode
from longseq.attention_backends.vllm.common import (
    KVWriteHook,
    LongSeqStepInfo,
    current_model_dtype,
    validate_attention_layer,
)
from longseq.attention_backends.vllm.techniques import LayerTechniques, check_technique, sparse_reuse_for
from longseq.config import SUPPORTED_HEAD_SIZES, get_config
from longseq.kernels.score_mods import NO_MODS, ScoreMods


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
        # FlashAttention's ahead-of-time schedule must be sized for this group's heads: the duo-memory sublayers
        # have fewer than the model (vLLM 0.26 takes the model's counts; 0.32+ does this itself).
        self.num_heads_q = get_num_attention_heads_from_layers(vllm_config, layer_names) or self.num_heads_q
        self.num_heads_kv = kv_cache_spec.num_kv_heads
        layers = vllm_config.compilation_config.static_forward_context
        config = get_config()
        check_technique(config, kv_cache_spec, vllm_config)  # fail at start-up
        if config.attention == "duo":
            # Each layer's duo tensors go to the GPU now (host-to-device copies), not in its first forward,
            # which may run inside a CUDA-graph capture.
            for name in layer_names:
                impl = getattr(layers.get(name), "impl", None)
                if isinstance(impl, LongSeqFlashImpl) and impl.duo is not None:
                    impl._duo_for(layers[name], device)
        if config.attention == "sparse":
            # Decodes first: their queries are then the leading rows, a fixed slice under CUDA graphs.
            self.reorder_batch_threshold = 1
        self.sparse_reuse = sparse_reuse_for(config, kv_cache_spec, vllm_config, device)

    def build(self, common_prefix_len, common_attn_metadata, fast_build: bool = False) -> LongSeqFlashMetadata:
        inner = super().build(common_prefix_len, common_attn_metadata, fast_build)
        step = LongSeqStepInfo.from_common(common_attn_metadata, self.block_size)
        if self.sparse_reuse is not None:
            # Eager, before the layers (and any graph replay) run: one plan for all sparse layers of the group.
            nd = step.num_leading_decodes
            self.sparse_reuse.plan(step.block_table[:nd], step.seq_lens[:nd])
            step.sparse_reuse = self.sparse_reuse
        return _wrap_flash_metadata(inner, step)


class LongSeqFlashImpl(LayerTechniques, FlashAttentionImpl):
    """FlashAttention impl with longseq's validation, KV-write hooks, trace and techniques."""

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
        # FlashAttention runs window, soft-cap and sinks itself; techniques skip windowed layers (``techniques.py``)
        # and pass soft-cap and sinks to our kernels.
        self._init_techniques("cuda", sliding_window, getattr(self, "logits_soft_cap", None),
                              getattr(self, "sinks", None))

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
        # A duo layer without streaming heads keeps vLLM's FlashAttention path (same kernels, same schedule, so
        # its rows match FLASH_ATTN exactly).
        if self.duo is not None and attn_metadata is not None and self._duo_for(layer, query.device).num_streaming:
            if output_scale is not None or output_block_scale is not None:
                raise NotImplementedError("longseq duo: fused output quantization is not supported")
            self._duo_forward(layer, query, kv_cache, attn_metadata, output)
            return output
        if attn_metadata is None or not self._sparse_layer(layer):
            if attn_metadata is not None:
                self._record_forward(layer, attn_metadata.num_actual_tokens)
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
                          step.block_table[:nd], step.seq_lens[:nd], self.page_index, self.sparse, self.scale, out,
                          reuse=step.sparse_reuse, mods=self.score_mods)
            self.trace.counts["sparse_decode_calls"] += 1
        self._record_forward(layer, step.num_actual_tokens)
        return output

    def _duo_forward(self, layer, query, kv_cache, attn_metadata, output) -> None:
        """DuoAttention for every row of the step (see the module docstring for the two paths)."""
        step = attn_metadata.step
        t, nr = step.num_actual_tokens, step.num_reqs
        key_cache, value_cache = self._key_value_caches(kv_cache)

        def flash_on_retrieval_heads(q, k, v, out, runs) -> None:
            flash_retrieval_heads(q, k, v, out, runs, attn_metadata, self.scale, self.vllm_flash_attn_version,
                                  self.score_mods)

        path = duo_attention(
            query[:t].view(t, self.num_heads, self.head_size), key_cache, value_cache, step.block_table[:nr],
            step.query_start_loc[: nr + 1], step.seq_lens[:nr], self._duo_layer, self.scale,
            output[:t].view(t, self.num_heads, self.head_size), max_query_len=step.max_query_len,
            dense_retrieval=flash_on_retrieval_heads, hybrid_decode_batch=self.config.duo_hybrid_decode_batch,
            kernel="triton", mods=self.score_mods)  # the Triton interpreter runs it on CPU tensors in tests
        if path == HYBRID and step.max_query_len <= 1:  # counted at capture under CUDA graphs: they hold this path
            self.trace.counts["duo_hybrid_decode_calls"] += 1
        self.trace.counts["duo_calls"] += 1
        self._record_forward(layer, step.num_actual_tokens)


def flash_retrieval_heads(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor, out: torch.Tensor,
                          runs: list[tuple[int, int]], meta, scale: float, fa_version: int | None,
                          mods: ScoreMods = NO_MODS) -> None:
    """Causal FlashAttention over the whole context for the KV heads of ``runs`` (one call per run, on strided
    head views of ``q``/caches/``out``: ``[T, Hq, D]``, ``[num_blocks, block_size, Hkv, D]``). ``meta`` gives
    ``query_start_loc``, ``max_query_len``, ``seq_lens``, ``max_seq_len``, ``block_table`` and
    ``max_num_splits`` (FlashAttention's metadata fields). vLLM's ahead-of-time schedule is for all heads, so
    it is not passed (FlashAttention schedules each call itself). ``mods``: the layer's soft-cap and sinks (the
    sinks of each run's query heads go to FlashAttention's ``s_aux``)."""
    from vllm.vllm_flash_attn import flash_attn_varlen_func

    group = q.shape[1] // key_cache.shape[2]
    extra = {"softcap": mods.softcap} if mods.softcap is not None else {}
    for lo, hi in runs:
        if mods.sinks is not None:  # only when set: older FlashAttention wrappers have no s_aux
            extra["s_aux"] = mods.sinks[lo * group : hi * group]
        flash_attn_varlen_func(
            q=q[:, lo * group : hi * group], k=key_cache[:, :, lo:hi], v=value_cache[:, :, lo:hi],
            out=out[:, lo * group : hi * group], cu_seqlens_q=meta.query_start_loc, max_seqlen_q=meta.max_query_len,
            seqused_k=meta.seq_lens, max_seqlen_k=meta.max_seq_len, softmax_scale=scale, causal=True,
            block_table=meta.block_table, fa_version=fa_version, num_splits=getattr(meta, "max_num_splits", 0),
            **extra)


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
