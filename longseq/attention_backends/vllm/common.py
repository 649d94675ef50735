"""What every longseq vLLM backend shares: per-step request info, KV-write hooks, validation, tracing."""

from __future__ import annotations

import dataclasses
import json
import os
import threading
from typing import Protocol

import torch

from longseq.config import (
    SUPPORTED_DTYPES,
    SUPPORTED_HEAD_SIZES,
    SUPPORTED_KV_CACHE_DTYPES,
    LongSeqConfig,
    LongSeqConfigError,
)


@dataclasses.dataclass
class LongSeqStepInfo:
    """Per-step request layout handed to every layer (built once per step by the MetadataBuilder).

    Tensors on the model's device unless named ``*_cpu``.

    Attributes:
        num_reqs: requests in the batch.
        num_actual_tokens: query tokens excluding CUDA-graph padding.
        query_start_loc: ``[num_reqs + 1]`` int32 cumulative query offsets.
        query_start_loc_cpu: same, on CPU.
        seq_lens: ``[num_reqs]`` int32 context length (cached + new) per request.
        block_table: ``[num_reqs, max_blocks]`` int32 physical block ids.
        slot_mapping: ``[num_tokens]`` int64 cache slot per new token, ``-1`` = padding.
        max_query_len, max_seq_len: upper bounds for this step.
        num_decode_reqs: requests with exactly one new token (decode steps).
        num_leading_decodes: how many of the first requests are decodes (vLLM puts decodes first when the
            builder sets ``reorder_batch_threshold = 1``), so their queries are ``query[:num_leading_decodes]``.
        block_size: tokens per KV block.
        sparse_reuse: sparse mode's :class:`SelectionReuse`, planned for this step's decode rows (the rows of
            :meth:`decode_req_indices`), or None.
    """

    num_reqs: int
    num_actual_tokens: int
    query_start_loc: torch.Tensor
    query_start_loc_cpu: torch.Tensor
    seq_lens: torch.Tensor
    block_table: torch.Tensor
    slot_mapping: torch.Tensor
    max_query_len: int
    max_seq_len: int
    num_decode_reqs: int
    num_leading_decodes: int
    block_size: int
    sparse_reuse: object | None = None

    def decode_req_indices(self) -> torch.Tensor:
        """``[num_decode_reqs]`` int64 indices (on CPU) of the requests with exactly one new token."""
        qsl = self.query_start_loc_cpu[: self.num_reqs + 1]
        return ((qsl[1:] - qsl[:-1]) == 1).nonzero().squeeze(1)

    @classmethod
    def from_common(cls, cam, block_size: int) -> "LongSeqStepInfo":
        """From vLLM's ``CommonAttentionMetadata`` (fields common to vLLM 0.26 .. 0.33)."""
        qsl_cpu = cam.query_start_loc_cpu
        q_lens = qsl_cpu[1 : cam.num_reqs + 1] - qsl_cpu[: cam.num_reqs]
        is_decode = q_lens == 1
        not_decode = (~is_decode).nonzero()
        leading = int(not_decode[0, 0]) if len(not_decode) else cam.num_reqs
        return cls(
            num_reqs=cam.num_reqs,
            num_actual_tokens=cam.num_actual_tokens,
            query_start_loc=cam.query_start_loc,
            query_start_loc_cpu=qsl_cpu,
            seq_lens=cam.seq_lens,
            block_table=cam.block_table_tensor,
            slot_mapping=cam.slot_mapping,
            max_query_len=cam.max_query_len,
            max_seq_len=cam.max_seq_len,
            num_decode_reqs=int(is_decode.sum()),
            num_leading_decodes=leading,
            block_size=block_size,
        )


class KVWriteHook(Protocol):
    """Called after new tokens' K/V are written to a layer's paged cache.

    Args:
        layer_name: the attention layer.
        key, value: ``[T, Hkv, D]`` new tokens (T may include padding past ``len(slot_mapping)``).
        kv_cache: the layer's cache, logical ``[num_blocks, Hkv, block_size, 2 * D]`` view.
        slot_mapping: ``[T']`` int64 slots, ``-1`` = padding.
    Techniques use it to keep per-page side data (page summaries) in step with the cache.
    """

    def __call__(self, layer_name: str, key: torch.Tensor, value: torch.Tensor,
                 kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None: ...


def validate_attention_layer(
    *, backend: str, head_size: int, num_heads: int, num_kv_heads: int, kv_cache_dtype: str,
    model_dtype: torch.dtype | None, attn_type: str,
) -> None:
    """Raise :class:`LongSeqConfigError` at engine start for a layer our backends cannot serve."""
    if head_size not in SUPPORTED_HEAD_SIZES:
        raise LongSeqConfigError(
            f"{backend}: head size {head_size} is not supported; supported head sizes: "
            f"{', '.join(map(str, SUPPORTED_HEAD_SIZES))}"
        )
    if num_heads % num_kv_heads:
        raise LongSeqConfigError(f"{backend}: {num_heads} query heads are not a multiple of {num_kv_heads} KV heads")
    if kv_cache_dtype not in SUPPORTED_KV_CACHE_DTYPES:
        raise LongSeqConfigError(
            f"{backend}: kv_cache_dtype={kv_cache_dtype!r} is not supported; allowed: "
            f"{', '.join(SUPPORTED_KV_CACHE_DTYPES)}"
        )
    if model_dtype is not None and str(model_dtype).removeprefix("torch.") not in SUPPORTED_DTYPES:
        raise LongSeqConfigError(
            f"{backend}: model dtype {model_dtype} is not supported; allowed: {', '.join(SUPPORTED_DTYPES)}"
        )
    if attn_type != "decoder":
        raise LongSeqConfigError(
            f"{backend}: attention type {attn_type!r} is not supported (decoder self-attention only); "
            "unset LONGSEQ_CPU / pick another --attention-backend for encoder models"
        )


class BackendTrace:
    """Per-process call counters, written as JSON to ``config.trace_dir`` when that is set.

    The file is rewritten when a layer is seen first and at call counts 1, 2, 4, 8, ... so its cost is nil
    in steady state; tests read
    it to prove the engine really ran our backend (vLLM falls back silently when a plugin fails).
    Under CUDA graphs only eager calls (capture, prefill) are counted.
    """

    _lock = threading.Lock()
    _instances: dict[str, "BackendTrace"] = {}

    def __init__(self, backend: str, config: LongSeqConfig):
        self.backend = backend
        self.config = config
        self.counts = {"forward_calls": 0, "kv_writes": 0, "tokens_attended": 0, "sparse_decode_calls": 0,
                       "duo_calls": 0, "duo_hybrid_decode_calls": 0}
        self.layers: set[str] = set()
        self._next_flush = 1

    @classmethod
    def for_backend(cls, backend: str, config: LongSeqConfig) -> "BackendTrace":
        with cls._lock:
            if backend not in cls._instances:
                cls._instances[backend] = cls(backend, config)
            return cls._instances[backend]

    def record(self, event: str, layer_name: str = "", tokens: int = 0) -> None:
        self.counts[event] += 1
        if tokens:
            self.counts["tokens_attended"] += tokens
        new_layer = bool(layer_name) and layer_name not in self.layers
        if new_layer:
            self.layers.add(layer_name)
        if not self.config.trace_dir or event != "forward_calls":
            return
        if new_layer or self.counts[event] >= self._next_flush:  # new layers: only during the first steps
            if self.counts[event] >= self._next_flush:
                self._next_flush *= 2
            self.flush()

    def flush(self) -> None:
        if not self.config.trace_dir:
            return
        os.makedirs(self.config.trace_dir, exist_ok=True)
        path = os.path.join(self.config.trace_dir, f"vllm-{self.backend}-{os.getpid()}.json")
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"framework": "vllm", "backend": self.backend, "pid": os.getpid(),
                       "technique": self.config.attention, "num_layers": len(self.layers), **self.counts}, f)
        os.replace(tmp, path)


def current_model_dtype() -> torch.dtype | None:
    """The model dtype from vLLM's current config (set while layers are built), else None."""
    from vllm.config import get_current_vllm_config_or_none  # present in vLLM 0.26 .. 0.33

    cfg = get_current_vllm_config_or_none()
    return None if cfg is None or cfg.model_config is None else cfg.model_config.dtype
