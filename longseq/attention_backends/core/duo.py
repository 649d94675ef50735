"""DuoAttention, framework-free: which KV heads stream (the mask), each layer's tensors, and one attention step.

DuoAttention splits the KV heads of every layer in two kinds:
  retrieval heads keep full causal attention over the whole context;
  streaming heads attend only to the first ``sink_size`` tokens (attention sinks) and the ``recent_size``
  most recent tokens (the query's own token included), so their KV cache stays bounded.

The gates of a calibrated pattern (files, built-in names, random patterns: ``duo_pattern.py``, whose
:func:`load_duo_pattern` is importable from here too) become a :class:`StreamingHeadMask`: either ``sparsity``
(a fraction of ALL KV heads of the model, the lowest gates first) or ``threshold`` (gate below it streams).

Tensor parallelism: vLLM and SGLang split the KV heads contiguously over the ranks;
:meth:`StreamingHeadMask.shard` gives the mask of one rank's heads (see there for the replicated case).

Framework adapters call: :func:`rank_streaming_mask` once at start-up (loads, validates against the model's
total KV heads, shards to this rank), :meth:`DuoLayer.build` once per attention layer, then
:func:`duo_attention` for every step of that layer. The adapter passes its framework's dense kernel for the
retrieval heads as a callable; nothing here imports a framework.
"""

from __future__ import annotations

import dataclasses
from typing import Literal, Protocol

import torch

from longseq.attention_backends.core.duo_pattern import (
    DuoPattern,
    check_shape,
    check_size,
    load_duo_pattern,
    random_pattern,
    random_pattern_seed,
)
from longseq.attention_backends.core.head_count import streaming_head_count
from longseq.attention_backends.core.layers import layer_index
from longseq.config import LongSeqConfig, LongSeqConfigError
from longseq.kernels.score_mods import NO_MODS, ScoreMods
from longseq.kernels.duo_attention.naive import retrieval_head_runs

#: Sparsity used when neither ``duo_sparsity`` nor ``duo_threshold`` is configured.
DEFAULT_SPARSITY = 0.5


@dataclasses.dataclass
class StreamingHeadMask:
    """Which KV heads stream, per layer, and the streaming sizes.

    Attributes:
        is_streaming: ``[num_layers, num_kv_heads]`` bool tensor (CPU unless moved with :meth:`to`).
        sink_size, recent_size: a streaming head's query at position ``p`` sees keys ``j <= p`` with
            ``j < sink_size`` or ``j > p - recent_size``.
        source: the pattern's source, for messages.
        kv_head_ids: the model's (global) KV-head index of each column (``0..H-1`` unless sharded).
    """

    is_streaming: torch.Tensor
    sink_size: int
    recent_size: int
    source: str = "<in memory>"
    kv_head_ids: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        m = self.is_streaming if isinstance(self.is_streaming, torch.Tensor) else torch.as_tensor(
            self.is_streaming, device="cpu")
        if m.dim() != 2 or m.dtype != torch.bool:
            raise LongSeqConfigError(f"duo mask {self.source}: is_streaming must be a 2-D bool tensor, got "
                                     f"{m.dtype} of shape {tuple(m.shape)}")
        self.is_streaming = m
        self.sink_size = check_size(self.sink_size, "sink_size", self.source)
        self.recent_size = check_size(self.recent_size, "recent_size", self.source)
        if self.kv_head_ids is None:
            self.kv_head_ids = tuple(range(m.shape[1]))
        self.kv_head_ids = tuple(int(h) for h in self.kv_head_ids)
        if len(self.kv_head_ids) != m.shape[1]:
            raise LongSeqConfigError(f"duo mask {self.source}: {len(self.kv_head_ids)} kv_head_ids for "
                                     f"{m.shape[1]} KV heads")

    @classmethod
    def from_pattern(cls, pattern: DuoPattern, *, sparsity: float | None = None, threshold: float | None = None,
                     sink_size: int | None = None, recent_size: int | None = None) -> "StreamingHeadMask":
        """Sparsify ``pattern``: exactly one of ``sparsity`` or ``threshold``.

        ``sparsity`` in [0, 1]: ``k = floor(sparsity * N + 1/2)`` of all ``N = num_layers * num_kv_heads`` KV
        heads stream, those with the lowest gates (the fraction closest to ``sparsity``, halves rounded up). Ties
        are broken by position: among equal gates the lower layer, then the lower KV head, streams first.
        ``threshold`` in [0, 1]: a head streams when its gate is ``< threshold``.
        ``sink_size``/``recent_size`` override the pattern's.
        """
        if (sparsity is None) == (threshold is None):
            raise LongSeqConfigError(
                f"duo pattern {pattern.source}: give exactly one of sparsity or threshold "
                f"(got sparsity={sparsity!r}, threshold={threshold!r})")
        gates = pattern.gates
        if sparsity is not None:
            s = float(sparsity)
            if not 0.0 <= s <= 1.0:
                raise LongSeqConfigError(f"duo sparsity={sparsity!r} must be in [0, 1] (fraction of KV heads that stream)")
            n = gates.numel()
            k = streaming_head_count(s, n)
            order = torch.argsort(gates.reshape(-1), stable=True)  # ascending; equal gates keep row-major order
            flat = torch.zeros(n, dtype=torch.bool, device="cpu")
            flat[order[:k]] = True
            streaming = flat.view(gates.shape)
        else:
            t = float(threshold)
            if not 0.0 <= t <= 1.0:
                raise LongSeqConfigError(f"duo threshold={threshold!r} must be in [0, 1] (heads with a lower gate "
                                         "stream)")
            streaming = gates < t
        return cls(streaming, pattern.sink_size if sink_size is None else sink_size,
                   pattern.recent_size if recent_size is None else recent_size, pattern.source)

    @classmethod
    def from_config(cls, config: LongSeqConfig, pattern: DuoPattern | None = None) -> "StreamingHeadMask":
        """The mask configured by ``config.duo_*`` (pattern loaded from ``config.duo_pattern`` unless given).

        Neither sparsity nor threshold set: sparsity :data:`DEFAULT_SPARSITY`. ``duo_sink``/``duo_recent``
        override the pattern's sizes.
        """
        if pattern is None:
            if not config.duo_pattern:
                raise LongSeqConfigError("duo mode needs LONGSEQ_DUO_PATTERN (a pattern folder or a built-in name)")
            if random_pattern_seed(config.duo_pattern) is not None:
                raise LongSeqConfigError(f"duo pattern {config.duo_pattern!r} is built for a model's shape: use "
                                         "rank_streaming_mask(config, num_layers, num_kv_heads)")
            pattern = load_duo_pattern(config.duo_pattern)
        sparsity, threshold = config.duo_sparsity, config.duo_threshold
        if sparsity is None and threshold is None:
            sparsity = DEFAULT_SPARSITY
        return cls.from_pattern(pattern, sparsity=sparsity, threshold=threshold, sink_size=config.duo_sink,
                                recent_size=config.duo_recent)

    @property
    def num_layers(self) -> int:
        return self.is_streaming.shape[0]

    @property
    def num_kv_heads(self) -> int:
        return self.is_streaming.shape[1]

    @property
    def sparsity(self) -> float:
        """Fraction of this mask's KV heads that stream."""
        return self.is_streaming.float().mean().item()

    def for_layer(self, layer: int) -> torch.Tensor:
        """``[num_kv_heads]`` bool: the streaming KV heads of ``layer``."""
        if not 0 <= layer < self.num_layers:
            raise LongSeqConfigError(f"duo pattern {self.source}: layer {layer} out of range (pattern has "
                                     f"{self.num_layers} layers)")
        return self.is_streaming[layer]

    def validate(self, num_layers: int, num_kv_heads: int) -> None:
        """Raise :class:`LongSeqConfigError` unless the mask has this shape (call it before :meth:`shard` with the
        model's total KV heads)."""
        check_shape(self.source, (self.num_layers, self.num_kv_heads), (num_layers, num_kv_heads))

    def to(self, device: torch.device | str) -> "StreamingHeadMask":
        return dataclasses.replace(self, is_streaming=self.is_streaming.to(device))

    def shard(self, tp_rank: int, tp_size: int) -> "StreamingHeadMask":
        """The mask of the KV heads that tensor-parallel rank ``tp_rank`` of ``tp_size`` holds.

        As vLLM (``QKVParallelLinear``) and SGLang split them: with ``H`` KV heads and ``H >= tp_size`` (``H``
        divisible by ``tp_size``), rank ``r`` holds the contiguous heads ``r*H/tp_size .. (r+1)*H/tp_size - 1``;
        with ``H < tp_size`` (``tp_size`` divisible by ``H``) every KV head is replicated and rank ``r`` holds the
        single head ``r * H // tp_size``. Call on the unsharded mask.
        """
        h = self.num_kv_heads
        if tp_size < 1 or not 0 <= tp_rank < tp_size:
            raise LongSeqConfigError(f"duo mask {self.source}: tp_rank={tp_rank} is not a rank of tp_size={tp_size}")
        if h >= tp_size:
            if h % tp_size:
                raise LongSeqConfigError(f"duo mask {self.source}: {h} KV heads cannot be split over "
                                         f"tp_size={tp_size} ranks")
            per = h // tp_size
            cols = list(range(tp_rank * per, (tp_rank + 1) * per))
        else:
            if tp_size % h:
                raise LongSeqConfigError(f"duo mask {self.source}: {h} KV heads cannot be replicated over "
                                         f"tp_size={tp_size} ranks")
            cols = [tp_rank * h // tp_size]
        cols_t = torch.tensor(cols, dtype=torch.long, device=self.is_streaming.device)
        return dataclasses.replace(self, is_streaming=self.is_streaming.index_select(1, cols_t),
                                   kv_head_ids=tuple(self.kv_head_ids[c] for c in cols))


def rank_streaming_mask(config: LongSeqConfig, num_layers: int, num_kv_heads: int, tp_rank: int = 0,
                        tp_size: int = 1) -> StreamingHeadMask:
    """The mask one tensor-parallel rank applies: loaded from ``config`` (a ``random[:seed]`` pattern is built
    for this shape, the same on every rank), validated against the whole model (``num_layers`` x
    ``num_kv_heads`` KV heads, before sharding: a clear start-up error otherwise), then restricted to the KV
    heads this rank holds."""
    seed = random_pattern_seed(config.duo_pattern)
    pattern = random_pattern(num_layers, num_kv_heads, seed) if seed is not None else (
        load_duo_pattern(config.duo_pattern) if config.duo_memory else None)
    mask = StreamingHeadMask.from_config(config, pattern)
    mask.validate(num_layers, num_kv_heads)
    mask = mask.shard(tp_rank, tp_size) if tp_size > 1 else mask
    if config.duo_memory:  # the same count in every layer of every rank: two KV groups of equal layer count
        cols = torch.tensor(mask.kv_head_ids, dtype=torch.long, device=pattern.gates.device)
        sparsity = DEFAULT_SPARSITY if config.duo_sparsity is None else config.duo_sparsity
        mask = dataclasses.replace(mask, is_streaming=per_layer_streaming(pattern.gates.index_select(1, cols),
                                                                          sparsity))
    return mask


def per_layer_streaming(gates: torch.Tensor, sparsity: float) -> torch.Tensor:
    """``[L, H]`` bool: in every layer, the ``k = floor(sparsity * H + 1/2)`` KV heads with the lowest gates
    stream (ties: the lower head first). ``gates``: ``[L, H]`` float, one rank's heads. DuoAttention's global
    quantile (:meth:`StreamingHeadMask.from_pattern`) gives layers different counts; saving KV memory in a paged
    server needs one count per layer (docs/duo-memory.md)."""
    num_layers, h = gates.shape
    k = streaming_head_count(sparsity, h)
    out = torch.zeros(num_layers, h, dtype=torch.bool, device="cpu")  # host side, whatever the default device
    order = torch.argsort(gates.float().cpu(), dim=1, stable=True)[:, :k]
    out.scatter_(1, order, True)
    return out


@dataclasses.dataclass
class DuoLayer:
    """One attention layer's DuoAttention tensors on the model's device (built once per layer, before any
    CUDA-graph capture, since building copies host to device).

    Attributes:
        is_streaming: ``[Hkv]`` int8, 1 for a streaming KV head (this rank's KV heads).
        streaming_heads: ``[n]`` int32 ids of the streaming KV heads; all_heads: ``[Hkv]`` int32 ``0..Hkv-1``.
        retrieval_runs: ``[(lo, hi), ...]`` runs of consecutive retrieval KV heads (host side).
        num_streaming, num_retrieval: head counts (host side: grid sizes stay fixed under CUDA graphs).
        sink_size, recent_size: the streaming sizes (as in :class:`StreamingHeadMask`).
    """

    is_streaming: torch.Tensor
    streaming_heads: torch.Tensor
    all_heads: torch.Tensor
    retrieval_runs: list[tuple[int, int]]
    num_streaming: int
    num_retrieval: int
    sink_size: int
    recent_size: int

    @classmethod
    def build(cls, mask: StreamingHeadMask, layer: int | str, device: torch.device | str) -> "DuoLayer":
        """The tensors of ``layer``: a row of ``mask`` or a module path ``...layers.<i>....`` (vLLM's layer names;
        a path without a layer number is a :class:`LongSeqConfigError`)."""
        if isinstance(layer, str):
            i = layer_index(layer)
            if i is None:
                raise LongSeqConfigError(f"longseq duo: cannot tell the layer number of attention layer {layer!r}")
            layer = i
        flags = mask.for_layer(layer).to(torch.bool)
        heads = flags.nonzero().squeeze(1).to(torch.int32)
        return cls(flags.to(device=device, dtype=torch.int8), heads.to(device),
                   torch.arange(len(flags), dtype=torch.int32, device=device), retrieval_head_runs(flags),
                   int(flags.sum()), int((~flags).sum()), mask.sink_size, mask.recent_size)


def hybrid_decode(num_reqs: int, min_batch: int) -> bool:
    """Whether a decode-only step of ``num_reqs`` requests (the padded batch size under CUDA graphs, fixed per
    graph) takes the hybrid path: the framework's dense kernel on the retrieval-head runs, the Triton kernel on
    the streaming heads. ``min_batch`` (``LONGSEQ_DUO_HYBRID_DECODE_BATCH``, default 8): from that many requests
    on; 0: never (one Triton launch for all heads). Large batches fill the GPU without split-K, where the dense
    kernel is faster on the retrieval heads (see docs/benchmarks/duo.md)."""
    return min_batch > 0 and num_reqs >= min_batch


class RetrievalAttention(Protocol):
    """A framework's dense causal attention over the whole context, for the KV heads of ``runs`` only.

    Args:
        q: ``[T, Hq, D]``; key_cache, value_cache: ``[num_blocks, block_size, Hkv, D]`` (any strides).
        out: ``[T, Hq, D]``; only the query heads of ``runs`` are written, in place.
        runs: ``[(lo, hi), ...]`` KV-head ranges; the kernel reads strided head views (``q[:, lo*G:hi*G]``,
            ``key_cache[:, :, lo:hi]``, ``G = Hq // Hkv``).
    The step's request layout (block table, lengths) is bound by the adapter.
    """

    def __call__(self, q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor, out: torch.Tensor,
                 runs: list[tuple[int, int]]) -> None: ...


#: What :func:`duo_attention` ran: one Triton launch for all KV heads, the framework's dense kernel on the
#: retrieval heads plus the Triton kernel on the streaming heads, or the PyTorch reference.
ONE_LAUNCH, HYBRID, REFERENCE = "one_launch", "hybrid", "reference"
DuoPath = Literal["one_launch", "hybrid", "reference"]


def duo_attention(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor, block_table: torch.Tensor,
                  query_start_loc: torch.Tensor, seq_lens: torch.Tensor, layer: DuoLayer, scale: float,
                  out: torch.Tensor, *, max_query_len: int, dense_retrieval: RetrievalAttention | None = None,
                  hybrid_decode_batch: int = 0, kernel: Literal["auto", "triton", "reference"] = "auto",
                  mods: ScoreMods = NO_MODS) -> DuoPath:
    """DuoAttention for every query row of one layer's step (prefill chunks and decodes, any mix).

    Args:
        q: ``[T, Hq, D]`` fp16/bf16/fp32 (any strides); request ``b``'s queries are rows
            ``query_start_loc[b] .. query_start_loc[b+1]-1``, at the last positions of its ``seq_lens[b]`` tokens.
        key_cache, value_cache: ``[num_blocks, block_size, Hkv, D]`` views (any strides) already holding this
            step's keys and values.
        block_table: ``[B, max_blocks]`` int32; query_start_loc: ``[B+1]`` int32; seq_lens: ``[B]`` int32. On
            ``q``'s device for the Triton kernel; the reference reads ``query_start_loc`` on the host (pass a
            CPU copy).
        layer: the layer's :class:`DuoLayer` (this rank's KV heads, tensors on ``q``'s device).
        scale: softmax scale.
        out: ``[T, Hq, D]`` written in place (rows past ``query_start_loc[B]`` may be left as they are).
        max_query_len: an upper bound of the requests' query lengths (host int); ``<= 1``: a decode-only step.
        dense_retrieval: the framework's dense kernel for the retrieval heads (see :class:`RetrievalAttention`),
            used by the Triton path in steps with prefill rows and in hybrid decode (:func:`hybrid_decode`);
            None: the Triton kernel computes every head.
        hybrid_decode_batch: ``LONGSEQ_DUO_HYBRID_DECODE_BATCH``.
        kernel: ``triton`` (longseq's Triton kernel; on CPU tensors only under the Triton interpreter),
            ``reference`` (PyTorch, fp32 math, one request at a time: the CPU path) or ``auto`` (Triton on CUDA
            tensors, else the reference).
        mods: the layer's soft-cap and sinks (``longseq/kernels/score_mods.py``); ``dense_retrieval`` must apply
            the same ones.

    Returns:
        The path taken: :data:`ONE_LAUNCH` (decode-only steps: split-K sized from shapes only, so a captured
        CUDA graph stays valid), :data:`HYBRID` or :data:`REFERENCE`.
    """
    if kernel == "auto":
        kernel = "triton" if q.is_cuda else "reference"
    if kernel == "reference":
        from longseq.kernels.duo_attention import duo_paged_attention_ref

        duo_paged_attention_ref(q, key_cache, value_cache, block_table, query_start_loc, seq_lens, layer.is_streaming,
                                layer.sink_size, layer.recent_size, scale, output=out, mods=mods)
        return REFERENCE
    if kernel != "triton":
        raise ValueError(f"duo_attention: kernel={kernel!r} is not one of auto, triton, reference")
    from longseq.kernels.duo_attention.unified import default_num_splits, duo_paged_attention

    num_reqs = seq_lens.shape[0]
    args = (key_cache, value_cache, block_table, query_start_loc, seq_lens, layer.is_streaming, layer.sink_size,
            layer.recent_size, scale)
    if dense_retrieval is None or (max_query_len <= 1 and not hybrid_decode(num_reqs, hybrid_decode_batch)):
        if max_query_len <= 1:  # split-K over the retrieval heads, the only ones reading the whole context
            splits = default_num_splits(num_reqs, layer.num_retrieval, q.device) if layer.num_retrieval else 1
            duo_paged_attention(q, *args, max_query_len=1, out=out, kv_heads=layer.all_heads, num_splits=splits,
                                mods=mods)
        else:
            duo_paged_attention(q, *args, max_query_len=max_query_len, out=out, kv_heads=layer.all_heads,
                                num_splits=1, mods=mods)
        return ONE_LAUNCH
    dense_retrieval(q, key_cache, value_cache, out, layer.retrieval_runs)
    if layer.num_streaming:  # streaming heads visit only their sink and window tiles
        duo_paged_attention(q, *args, max_query_len=max_query_len, out=out, kv_heads=layer.streaming_heads,
                            num_splits=1, mods=mods)
    return HYBRID
