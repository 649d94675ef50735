"""longseq on vLLM's GPU platform, selected with ``--attention-backend CUSTOM``.

Dense mode subclasses vLLM's FlashAttention backend: the KV write and the attention math are vLLM's own
kernels (so dense tokens match ``FLASH_ATTN`` exactly, CUDA graphs included), and this layer adds what
later techniques plug into: per-step :class:`LongSeqStepInfo` on the metadata and KV-write hooks.
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

from longseq.attention_backends.vllm.common import (
    BackendTrace,
    KVWriteHook,
    LongSeqStepInfo,
    current_model_dtype,
    validate_attention_layer,
)
from longseq.plugin.config import SUPPORTED_HEAD_SIZES, get_config


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

    def do_kv_cache_update(self, layer: torch.nn.Module, key: torch.Tensor, value: torch.Tensor,
                           kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        if self.config.debug_fault != "skip_kv_write":
            super().do_kv_cache_update(layer, key, value, kv_cache, slot_mapping)
        for hook in self.kv_write_hooks:
            hook(getattr(layer, "layer_name", ""), key, value, kv_cache, slot_mapping)
        self.trace.record("kv_writes")

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output,
                output_scale=None, output_block_scale=None) -> torch.Tensor:
        if attn_metadata is not None:
            self.trace.record("forward_calls", getattr(layer, "layer_name", ""), attn_metadata.num_actual_tokens)
        return super().forward(layer, query, key, value, kv_cache, attn_metadata, output,
                               output_scale, output_block_scale)


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
