"""DuoAttention that saves KV memory in vLLM (``LONGSEQ_DUO_MEMORY=1``): streaming KV heads keep only their sink and
recent tokens in the paged cache, so the scheduler admits more requests.

vLLM gives every KV head of a layer one block table (one ``KVCacheSpec`` per layer), so the split happens in the
model: each decoder layer's attention becomes two vLLM attention layers (:class:`DuoSplitAttention`),
``...attn.retrieval`` over the retrieval KV heads (a full-attention spec, as before) and ``...attn.streaming``
over the streaming KV heads (:class:`SinkWindowSpec`). The streaming group's manager (:class:`SinkWindowManager`)
frees every block between the sink and the window once no query can see it, and the pool is sized for
``sink + recent`` tokens per request in that group (``max_memory_usage_bytes``). The backend runs the retrieval
sublayer dense and the streaming one through the duo kernel with all its heads streaming; freed blocks read as
vLLM's null block (zeros), which the kernels mask out. Plan and trade-offs: docs/duo-memory.md.

Prefix caching stays on: the streaming group answers cache hits with full-attention semantics (a hit needs every
block of the prefix still cached), which is exact because a freed block keeps its hash only until it is reused.

Registration: importing this module registers the spec with vLLM's ``KVCacheSpecRegistry`` (after vLLM's own
specs, which the registry registers lazily only while it is empty), in the worker that builds the model and in
the engine core that unpickles the specs.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from vllm.model_executor.layers.attention import Attention
from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager
from vllm.v1.kv_cache_interface import AttentionSpec, FullAttentionSpec
from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

from longseq.config import LongSeqConfigError

#: The sublayer names under the replaced ``...attn`` module (one integer in the path: vLLM's layer index).
RETRIEVAL, STREAMING = "retrieval", "streaming"


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclasses.dataclass(frozen=True, kw_only=True)
class SinkWindowSpec(AttentionSpec):
    """The streaming heads' KV: a query at position ``p`` reads keys ``j < sink_tokens`` and
    ``j > p - recent_tokens``. Not a ``FullAttentionSpec`` subclass, so vLLM puts these layers in their own group."""

    sink_tokens: int = 0  # defaults only because the base has defaulted fields; StreamingHeadsAttention sets all
    recent_tokens: int = 0
    #: Tokens scheduled but not yet settled (vLLM's ``max_in_flight_tokens``: one prefill chunk per concurrent
    #: batch, 2 under async scheduling; every supported vLLM has it, the 0.33 conformance test checks), known where
    #: the spec is made; the scheduler's admission gate reads it (0: no cap, count every block).
    in_flight_tokens: int = 0

    def _max_blocks_held(self, in_flight_tokens: int, max_model_len: int) -> int:
        """The most blocks one request holds at once: the sink blocks plus the window and the tokens in flight
        (as ``SlidingWindowSpec`` counts them), never more than the whole context."""
        bs = self.block_size
        blocks = _cdiv(self.sink_tokens, bs) + _cdiv(min(self.recent_tokens - 1 + in_flight_tokens, max_model_len),
                                                     bs) + 1
        return min(blocks, _cdiv(max_model_len, bs))

    def max_memory_usage_bytes(self, vllm_config) -> int:
        """What one request holds at most (:meth:`_max_blocks_held`), in bytes: sizes the pool."""
        return self._max_blocks_held(vllm_config.max_in_flight_tokens,
                                     vllm_config.model_config.max_model_len) * self.page_size_bytes


def _attention_fields(spec: AttentionSpec) -> dict:
    """The ``AttentionSpec`` fields of ``spec`` (block size, heads, dtype, ...), to rebuild it as another spec."""
    return {f.name: getattr(spec, f.name) for f in dataclasses.fields(AttentionSpec) if f.init}


def as_full_attention(spec: AttentionSpec) -> FullAttentionSpec:
    """The same pages as a full-attention spec (what vLLM's full-attention cache lookup accepts)."""
    return FullAttentionSpec(**_attention_fields(spec))


class SinkWindowManager(FullAttentionManager):
    """Full-attention bookkeeping, plus freeing the blocks between the sink and the window.

    ``get_num_skipped_tokens`` stays 0 (nothing is skipped at the head, unlike a sliding window), so prefix
    hits and connector loads allocate every block as for full attention; the gap is freed afterwards.
    """

    def get_num_blocks_to_allocate(self, request_id: str, num_tokens: int, *args, **kwargs) -> int:
        """As for full attention, except vLLM's admission gate (``apply_admission_cap``, which asks for the whole
        prompt before a request starts) is answered with what this group holds at most, as vLLM caps its
        sliding-window groups: otherwise a 126K request waits for room for 126K streaming tokens it never keeps."""
        spec: SinkWindowSpec = self.kv_cache_spec
        if kwargs.get("apply_admission_cap") and spec.in_flight_tokens > 0:
            cap = spec._max_blocks_held(spec.in_flight_tokens, num_tokens) * self.block_size
            num_tokens = min(num_tokens, cap)
        return super().get_num_blocks_to_allocate(request_id, num_tokens, *args, **kwargs)

    def remove_skipped_blocks(self, request_id: str, processed_computed_tokens: int,
                              num_prompt_tokens: int | None = None) -> None:
        spec: SinkWindowSpec = self.kv_cache_spec
        first, last = sink_window_gap(processed_computed_tokens, spec.sink_tokens, spec.recent_tokens,
                                      self.block_size)
        blocks = self.req_to_blocks.get(request_id)
        if blocks is None or last <= first:
            return
        self._remove_blocks_in_range(request_id, first, min(last, len(blocks)))

    @classmethod
    def find_longest_cache_hit(cls, block_hashes, max_length, kv_cache_group_ids, block_pool, kv_cache_spec,
                               *args, **kwargs):
        if isinstance(kv_cache_spec, SinkWindowSpec):
            kv_cache_spec = as_full_attention(kv_cache_spec)
        return super().find_longest_cache_hit(block_hashes, max_length, kv_cache_group_ids, block_pool,
                                              kv_cache_spec, *args, **kwargs)


def sink_window_gap(processed_tokens: int, sink: int, recent: int, block_size: int) -> tuple[int, int]:
    """``(first, last)``: the blocks ``first <= b < last`` that no query from position ``processed_tokens`` on can
    read (the next query ``p`` sees ``j < sink`` and ``j >= p - recent + 1``). Blocks holding a sink token stay."""
    first = _cdiv(sink, block_size)
    last = max(0, processed_tokens - recent + 1) // block_size
    return first, max(first, last)


def _register_spec() -> None:
    KVCacheSpecRegistry._ensure_registered()  # vLLM's own specs first: it registers them only while empty
    KVCacheSpecRegistry.register(SinkWindowSpec, SinkWindowManager, uniform_type_base_spec=SinkWindowSpec)


_register_spec()


class StreamingHeadsAttention(Attention):
    """A vLLM attention layer over one layer's streaming KV heads: its KV group is :class:`SinkWindowSpec`
    (``longseq_sink_tokens`` / ``longseq_recent_tokens`` are set right after construction)."""

    longseq_sink_tokens: int = 0
    longseq_recent_tokens: int = 0

    def get_kv_cache_spec(self, vllm_config):
        spec = super().get_kv_cache_spec(vllm_config)
        if type(spec) is not FullAttentionSpec:
            raise LongSeqConfigError(f"longseq duo memory: layer {self.layer_name} has a {type(spec).__name__} KV "
                                     "cache; only plain full attention can be split")
        return SinkWindowSpec(**_attention_fields(spec), sink_tokens=self.longseq_sink_tokens,
                              recent_tokens=self.longseq_recent_tokens,
                              in_flight_tokens=vllm_config.max_in_flight_tokens)


def _q_heads(kv_heads: list[int], group: int) -> list[int]:
    return [h * group + g for h in kv_heads for g in range(group)]


def heads_by_kind(streaming: list[bool]) -> list[tuple[str, list[int]]]:
    """``[(RETRIEVAL, kv heads), (STREAMING, kv heads)]`` of one layer, kinds without heads left out."""
    kinds = ((RETRIEVAL, [h for h, s in enumerate(streaming) if not s]),
             (STREAMING, [h for h, s in enumerate(streaming) if s]))
    return [(kind, heads) for kind, heads in kinds if heads]


def head_shuffle(streaming: list[bool], group: int) -> tuple[list[int], dict[str, tuple[int, ...]], list[int]]:
    """How :class:`DuoSplitAttention` regroups one layer's heads, as index lists over the concatenated
    ``[q heads (Hq), k heads (Hkv), v heads (Hkv)]`` of one token.

    Returns (``gather``: the heads in the order retrieval q, k, v, then streaming q, k, v; ``parts``: per kind
    present, ``(q0, q1, k0, k1, v0, v1)`` bounds in ``gather``'s order; ``scatter``: for each original query head,
    its row among the sublayers' concatenated outputs (retrieval heads first)).
    """
    hkv = len(streaming)
    hq = hkv * group
    gather, parts, out_order = [], {}, []
    for kind, heads in heads_by_kind(streaming):
        qh = _q_heads(heads, group)
        q0 = len(gather)
        gather += qh + [hq + h for h in heads] + [hq + hkv + h for h in heads]
        parts[kind] = (q0, q0 + len(qh), q0 + len(qh), q0 + len(qh) + len(heads), q0 + len(qh) + len(heads),
                       len(gather))
        out_order += qh
    scatter = [out_order.index(h) for h in range(hq)]
    return gather, parts, scatter


class DuoSplitAttention(nn.Module):
    """Replaces one decoder layer's ``Attention``: the same ``forward(q, k, v)``, run as a retrieval sublayer and a
    streaming sublayer over their own heads (either may be absent when a layer has no heads of that kind).

    ``q``: ``[T, Hq * D]``, ``k``/``v``: ``[T, Hkv * D]`` (this rank's heads, model dtype); returns ``[T, Hq * D]``.
    """

    def __init__(self, original: Attention, streaming: list[bool], sink: int, recent: int, cache_config) -> None:
        super().__init__()
        hq, hkv = original.num_heads, original.num_kv_heads
        if len(streaming) != hkv or hq % hkv:
            raise LongSeqConfigError(f"longseq duo memory: layer {original.layer_name}: {len(streaming)} pattern "
                                     f"columns for {hkv} KV heads ({hq} query heads)")
        head_size_v = getattr(original, "head_size_v", None) or original.head_size
        if head_size_v != original.head_size:
            raise LongSeqConfigError(f"longseq duo memory: layer {original.layer_name}: value head size "
                                     f"{head_size_v} differs from the key head size {original.head_size}")
        group = hq // hkv
        for kind, heads in heads_by_kind(streaming):
            cls = Attention if kind == RETRIEVAL else StreamingHeadsAttention
            sub = cls(len(heads) * group, original.head_size, original.impl.scale, num_kv_heads=len(heads),
                      cache_config=cache_config, prefix=f"{original.layer_name}.{kind}")
            sub.longseq_duo_role = kind
            sub.longseq_sink_tokens, sub.longseq_recent_tokens = sink, recent
            self.add_module(kind, sub)
        self._set_heads(streaming, hq, original.head_size)

    def _set_heads(self, streaming: list[bool], num_heads: int, head_size: int) -> None:
        self.num_heads, self.num_kv_heads, self.head_size = num_heads, len(streaming), head_size
        gather, self.part_bounds, scatter = head_shuffle(streaming, num_heads // len(streaming))
        self.parts = tuple(self.part_bounds)
        self.register_buffer("gather", torch.tensor(gather, dtype=torch.long), persistent=False)
        self.register_buffer("scatter", torch.tensor(scatter, dtype=torch.long), persistent=False)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kwargs) -> torch.Tensor:
        if len(self.parts) == 1:  # every head of one kind: no shuffle
            return getattr(self, self.parts[0])(q, k, v, **kwargs)
        t, d = q.shape[0], self.head_size
        # One gather for all six head sets and one for the output (the sublayers get strided views, as attention
        # layers get views of the qkv projection): in small decode steps every kernel per layer counts.
        heads = torch.cat([q.view(t, self.num_heads, d), k.view(t, self.num_kv_heads, d),
                           v.view(t, self.num_kv_heads, d)], 1).index_select(1, self.gather)
        outs = []
        for kind in self.parts:
            q0, q1, k0, k1, v0, v1 = self.part_bounds[kind]
            o = getattr(self, kind)(heads[:, q0:q1].reshape(t, -1), heads[:, k0:k1].reshape(t, -1),
                                    heads[:, v0:v1].reshape(t, -1), **kwargs)
            outs.append(o.view(t, -1, d))
        return torch.cat(outs, 1).index_select(1, self.scatter).view(t, -1)


def split_model_attention(model: nn.Module, vllm_config, config) -> int:
    """Replace every decoder layer's ``attn`` (a vLLM ``Attention``) of ``model`` by a :class:`DuoSplitAttention`
    with this rank's per-layer streaming heads; returns the number of layers split. Runs inside the model's
    ``__init__`` (vLLM's config is current). Raises :class:`LongSeqConfigError` for what it cannot split."""
    from longseq.attention_backends.core.layers import layer_index
    from longseq.attention_backends.vllm.techniques import duo_mask_for_this_rank, model_global_layer_rows

    why = unsupported_reason(vllm_config)
    if why:
        raise LongSeqConfigError(f"LONGSEQ_DUO_MEMORY=1: {why}")
    rows = model_global_layer_rows(vllm_config)
    if any(r is None for r in rows):
        raise LongSeqConfigError("LONGSEQ_DUO_MEMORY=1: this model has sliding-window layers; duo memory saving "
                                 "supports models whose every layer is global (unset LONGSEQ_DUO_MEMORY: duo still "
                                 "runs, saving compute only)")
    mask = duo_mask_for_this_rank(config, vllm_config)
    context = vllm_config.compilation_config.static_forward_context
    split = 0
    for _, module in list(model.named_modules()):
        attn = getattr(module, "attn", None)
        if not isinstance(attn, Attention):
            continue
        i = layer_index(attn.layer_name)
        if i is None or i >= len(rows):
            raise LongSeqConfigError(f"LONGSEQ_DUO_MEMORY=1: cannot tell the layer number of {attn.layer_name!r}")
        if getattr(attn, "sliding_window", None) or getattr(attn.impl, "logits_soft_cap", None):
            raise LongSeqConfigError(f"LONGSEQ_DUO_MEMORY=1: layer {attn.layer_name} has a sliding window or "
                                     "soft-capping; duo memory saving supports plain causal attention")
        context.pop(attn.layer_name, None)  # its KV cache is the sublayers' now
        module.attn = DuoSplitAttention(attn, mask.for_layer(rows[i]).tolist(), mask.sink_size, mask.recent_size,
                                        vllm_config.cache_config)
        split += 1
    if split == 0:
        raise LongSeqConfigError("LONGSEQ_DUO_MEMORY=1: found no attention layer to split in this model")
    return split


def unsupported_reason(vllm_config) -> str | None:
    """Why this engine configuration cannot save duo KV memory, or None."""
    if getattr(vllm_config.scheduler_config, "disable_hybrid_kv_cache_manager", False):
        return ("vLLM's hybrid KV cache manager is off (--disable-hybrid-kv-cache-manager, or a KV connector without "
                "SupportsHMA); the streaming heads' KV group needs it")
    if vllm_config.kv_transfer_config is not None:
        return ("a KV connector is configured (--kv-transfer-config); offloading the split duo layout is not "
                "supported: drop the connector or unset LONGSEQ_DUO_MEMORY")
    if str(vllm_config.cache_config.cache_dtype) != "auto":
        return f"kv_cache_dtype={vllm_config.cache_config.cache_dtype!r}: only the model dtype is supported"
    return None
