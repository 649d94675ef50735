"""longseq on vLLM's CPU platform: replaces ``CPU_ATTN`` (opt-in with ``LONGSEQ_CPU=1``).

The CPU platform always asks for ``CPU_ATTN``, so the plugin overrides that enum member's class path.
The class keeps the name ``CPU_ATTN`` and the stock head-major cache (``[B, Hkv, N, 2*D]`` whose
``[B, Hkv, 2N, D]`` view holds N K rows then N V rows). Two kernels (``LONGSEQ_CPU_KERNEL``):

- ``vllm`` (default for dense): vLLM's own CPU attention and cache-write ops run the math, so dense mode
  gives the built-in backend's tokens bit for bit; our builder/impl still wrap every step (trace, hooks).
- ``torch``: the PyTorch paged path from ``longseq.kernels.paged_attention`` (fp32 math, our own cache
  write in the plain layout). Techniques that read the cache themselves (sparse, duo) need this one,
  because vLLM's CPU cache write may use an ISA-specific layout.

Sparse mode runs on the ``torch`` path: sparse layers keep a Quest page index (PyTorch reference kernels)
and every decode request attends to its top pages only; prefill rows stay dense.
Duo mode runs on the ``torch`` path too: every row (prefill chunks and decodes) of every layer goes through
``longseq.attention_backends.core.duo.duo_attention`` (its PyTorch reference on CPU), streaming KV heads seeing
only sink + recent tokens.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import ClassVar

import torch

from vllm.v1.attention.backend import CommonAttentionMetadata
from vllm.v1.attention.backends.cpu_attn import (
    CPUAttentionBackend,
    CPUAttentionBackendImpl,
    CPUAttentionMetadata,
    CPUAttentionMetadataBuilder,
)

from longseq.attention_backends.core.duo import duo_attention
from longseq.attention_backends.core.sparse import sparse_decode
from longseq.attention_backends.vllm.common import LongSeqStepInfo, current_model_dtype, validate_attention_layer
from longseq.attention_backends.vllm.techniques import LayerTechniques, check_technique, sparse_reuse_for
from longseq.kernels.paged_attention import paged_attention_naive, write_paged_kv
from longseq.config import LongSeqConfigError, get_config


@dataclasses.dataclass
class LongSeqCPUMetadata(CPUAttentionMetadata):
    """vLLM's CPU metadata plus the shared step info (``None`` only in the dataclass default)."""

    step: LongSeqStepInfo | None = None


def windowed_prefix_cache_warning(kv_cache_spec, vllm_config) -> str | None:
    """The warning for a sliding-window KV group (the hybrid KV cache manager on) with prefix caching, else None.

    vLLM's CPU engine answers a repeated prompt of a windowed hybrid differently once it hits the prefix cache,
    with its own backend too; ``--disable-hybrid-kv-cache-manager`` avoids it (docs/benchmarks/hybrid.md).
    """
    from vllm.v1.kv_cache_interface import SlidingWindowSpec  # FullAttentionSpec also has a sliding_window field

    if not isinstance(kv_cache_spec, SlidingWindowSpec):
        return None
    if not getattr(vllm_config.cache_config, "enable_prefix_caching", False):
        return None
    return ("longseq CPU backend: vLLM's CPU engine with sliding-window layers, prefix caching and the hybrid KV "
            "cache manager returns other tokens for a prompt that hits the prefix cache (its own backend too); "
            "pass --disable-hybrid-kv-cache-manager (or --no-enable-prefix-caching). See docs/benchmarks/hybrid.md")


class LongSeqCPUMetadataBuilder(CPUAttentionMetadataBuilder):
    def __init__(self, kv_cache_spec, layer_names, vllm_config, device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        config = get_config()
        check_technique(config, kv_cache_spec, vllm_config)  # fail at start-up
        warning = windowed_prefix_cache_warning(kv_cache_spec, vllm_config)
        if warning:
            logging.getLogger("longseq").warning(warning)
        self.sparse_reuse = sparse_reuse_for(config, kv_cache_spec, vllm_config, device)

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> LongSeqCPUMetadata:
        stock = super().build(common_prefix_len, common_attn_metadata, fast_build)
        step = LongSeqStepInfo.from_common(common_attn_metadata, self.kv_cache_spec.block_size)
        if self.sparse_reuse is not None:  # one plan per step for the decode rows, in the order the layers use
            reqs = step.decode_req_indices()
            self.sparse_reuse.plan(step.block_table[reqs], step.seq_lens[reqs])
            step.sparse_reuse = self.sparse_reuse
        return LongSeqCPUMetadata(**{f.name: getattr(stock, f.name) for f in dataclasses.fields(stock)}, step=step)


def split_cpu_kv_cache(kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B, Hkv, N, 2*D]`` cache -> (key_cache, value_cache), each ``[B, Hkv, N, D]`` (vLLM CPU layout)."""
    num_blocks, num_kv_heads, block_size, _ = kv_cache.shape
    key_cache, value_cache = kv_cache.view(num_blocks, num_kv_heads, 2 * block_size, -1).chunk(2, dim=2)
    return key_cache, value_cache


class LongSeqCPUImpl(LayerTechniques, CPUAttentionBackendImpl):
    """Decoder self-attention over the paged cache: vLLM's CPU kernel or our PyTorch path."""

    def __init__(self, num_heads: int, head_size: int, scale: float, num_kv_heads: int | None = None,
                 alibi_slopes: list[float] | None = None, sliding_window: int | None = None,
                 kv_cache_dtype: str = "auto", logits_soft_cap: float | None = None,
                 attn_type: str = "decoder", kv_sharing_target_layer_name: str | None = None,
                 **extra_impl_args) -> None:
        self.config = get_config()
        num_kv_heads = num_kv_heads or num_heads
        validate_attention_layer(
            backend="longseq CPU backend", head_size=head_size, num_heads=num_heads,
            num_kv_heads=num_kv_heads, kv_cache_dtype=kv_cache_dtype,
            model_dtype=current_model_dtype(), attn_type=str(getattr(attn_type, "value", attn_type)),
        )
        sinks = extra_impl_args.pop("sinks", None)
        unsupported = {"alibi_slopes": alibi_slopes, **{k: v for k, v in extra_impl_args.items() if v is not None}}
        unsupported = {k: v for k, v in unsupported.items() if v not in (None, 0, 0.0)}
        if unsupported:
            raise LongSeqConfigError(f"longseq CPU backend: layer features not supported yet: {sorted(unsupported)}")
        # Window, soft-cap and sinks are vLLM's CPU kernel's own: layers with them run it (older vLLMs have no
        # ``sinks`` argument, so it is passed only when set).
        super().__init__(num_heads, head_size, scale, num_kv_heads, None, sliding_window, kv_cache_dtype,
                         logits_soft_cap, attn_type, kv_sharing_target_layer_name,
                         **({"sinks": sinks} if sinks is not None else {}))
        self._init_techniques("cpu", sliding_window, logits_soft_cap, sinks)
        # The PyTorch path (sparse, duo, LONGSEQ_CPU_KERNEL=torch) applies soft-cap and sinks but has no window:
        # windowed layers keep vLLM's kernel in every mode (no technique applies to them).
        self.use_torch = not self.windowed and (
            self.config.cpu_kernel == "torch" or self.sparse is not None or self.duo is not None)

    def do_kv_cache_update(self, layer: torch.nn.Module, key: torch.Tensor, value: torch.Tensor,
                           kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        if self.config.debug_fault == "skip_kv_write":
            return
        if self.use_torch:
            key_cache, value_cache = split_cpu_kv_cache(kv_cache)
            write_paged_kv(key, value, key_cache, value_cache, slot_mapping)
            if self._sparse_layer(layer):  # the index reads [blocks, block_size, Hkv, D] views
                self.page_index.update(key_cache.transpose(1, 2), slot_mapping)
        else:
            super().do_kv_cache_update(layer, key, value, kv_cache, slot_mapping)
        self.trace.record("kv_writes")

    def forward(self, layer, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                kv_cache: torch.Tensor, attn_metadata: LongSeqCPUMetadata | None, output: torch.Tensor,
                output_scale: torch.Tensor | None = None, output_block_scale: torch.Tensor | None = None,
                ) -> torch.Tensor:
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("longseq CPU backend: fused output quantization is not supported")
        if attn_metadata is None:  # profiling run
            return output
        step = attn_metadata.step
        if self.use_torch:
            key_cache, value_cache = split_cpu_kv_cache(kv_cache)
            out = output.view(output.shape[0], self.num_heads, self.head_size)
            if self.duo is not None:
                self._duo_rows(layer, query, key_cache, value_cache, step, out)
                self._record_forward(layer, step.num_actual_tokens)
                return output
            paged_attention_naive(
                query[: step.num_actual_tokens], key_cache, value_cache, step.block_table[: step.num_reqs],
                step.query_start_loc_cpu[: step.num_reqs + 1], step.seq_lens[: step.num_reqs], self.scale,
                output=out, mods=self.score_mods,
            )
            if step.num_decode_reqs and self._sparse_layer(layer):
                self._sparse_decode_rows(query, key_cache, value_cache, step, out)
        else:
            super().forward(layer, query, key, value, kv_cache, attn_metadata, output)
        self._record_forward(layer, step.num_actual_tokens)
        return output

    def _duo_rows(self, layer, query, key_cache, value_cache, step, out) -> None:
        """Every row through DuoAttention with this layer's streaming heads (the reference kernel on CPU)."""
        t, nr = step.num_actual_tokens, step.num_reqs
        duo_attention(query[:t].view(-1, self.num_heads, self.head_size), key_cache.transpose(1, 2),
                      value_cache.transpose(1, 2), step.block_table[:nr], step.query_start_loc_cpu[: nr + 1],
                      step.seq_lens[:nr], self._duo_for(layer, query.device), self.scale, out[:t],
                      max_query_len=step.max_query_len, mods=self.score_mods)
        self.trace.counts["duo_calls"] += 1

    def _sparse_decode_rows(self, query, key_cache, value_cache, step, out) -> None:
        """Overwrite every decode request's row with attention over its top pages (the dense rows were the
        reference path's; requests within the budget get the same pages, so the same result)."""
        reqs = step.decode_req_indices()
        rows = step.query_start_loc_cpu[reqs].long()
        res = torch.empty(len(rows), self.num_heads, self.head_size, dtype=query.dtype)
        sparse_decode(query[rows], key_cache.transpose(1, 2), value_cache.transpose(1, 2),
                      step.block_table[reqs], step.seq_lens[reqs], self.page_index, self.sparse, self.scale, res,
                      reuse=step.sparse_reuse, mods=self.score_mods)
        out[rows] = res.to(out.dtype)
        self.trace.counts["sparse_decode_calls"] += 1


class LongSeqCPUBackend(CPUAttentionBackend):
    """``CPU_ATTN`` replacement. Keeps the stock name, dtypes and cache layout; swaps builder and impl."""

    supported_kv_cache_dtypes: ClassVar[list] = ["auto", "float16", "bfloat16"]

    @staticmethod
    def get_name() -> str:
        return "CPU_ATTN"

    @staticmethod
    def get_impl_cls() -> type[LongSeqCPUImpl]:
        return LongSeqCPUImpl

    @staticmethod
    def get_builder_cls() -> type[LongSeqCPUMetadataBuilder]:
        return LongSeqCPUMetadataBuilder

    @classmethod
    def supports_sliding_window(cls) -> bool:
        return True  # windowed layers run vLLM's CPU kernel (LongSeqCPUImpl)

    @classmethod
    def supports_non_causal(cls) -> bool:
        return False

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type == "decoder"
