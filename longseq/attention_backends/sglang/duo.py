"""``longseq_duo``: DuoAttention for SGLang (``--attention-backend longseq_duo``), CPU and CUDA.

The backend name selects the technique; its knobs are the ``LONGSEQ_DUO_*`` settings (pattern, sparsity or
threshold, sink/recent sizes), as for vLLM. Every KV head of a layer is either a retrieval head (full causal
attention) or a streaming head (the first ``sink_size`` tokens and the ``recent_size`` most recent ones): see
``longseq.attention_backends.core.duo``.

At start-up the pattern is loaded, validated against the model (``num_hidden_layers`` x total KV heads) and
sharded to the KV heads this tensor-parallel rank holds, which must equal the KV pool's head count: any
mismatch is a :class:`LongSeqConfigError` naming the pattern and both shapes.

Per layer (``layer.layer_id`` indexes the pattern's rows):
  * a layer with at least one streaming head (a "duo layer") writes its K/V to SGLang's pool itself and runs
    DuoAttention for decode and extend alike (prefill with a cached prefix, chunked prefill, mixed batches),
    reading each request's keys through ``req_to_token`` (slot ``s`` of the pool is row ``s``: any
    ``--page-size`` works);
  * every other layer, and what the duo math does not implement (sliding window, cross-attention, non-causal,
    logit soft-cap, learned sinks or other extras), runs the wrapped dense SGLang backend exactly as
    ``longseq_dense`` does (``torch_native`` on CPU, or ``LONGSEQ_SGLANG_DENSE``).

Compute: ``longseq.attention_backends.core.duo.duo_attention``.
  * On CPU its PyTorch reference (fp32 math), with each request's queries split into blocks of at most
    :data:`MAX_QUERY_ROWS` so a long prefill never materializes more than ``Hq * MAX_QUERY_ROWS * context``
    scores; the pool is read as pages of one slot (the block table is each request's ``req_to_token`` row).
  * On CUDA longseq's Triton kernel (the one vLLM's duo path runs), over the pool as pages of ``--page-size P``
    slots (``k_buffer.view(-1, P, Hkv, D)``, block table ``req_to_token[req, ::P] // P``, as ``longseq_sparse``
    reads it). Decode steps take one launch whose shapes depend only on the batch size, and the block table
    is gathered inside the graph into a buffer made in ``init_cuda_graph_state``, so decode CUDA graphs replay
    it; extend steps run eagerly.

The KV pool stays full size: streaming heads' evicted tokens are not freed (this release saves compute,
not memory, in SGLang). Speculative decoding is refused at start-up.
"""

from __future__ import annotations

import torch

from longseq.attention_backends.core.duo import DuoLayer, StreamingHeadMask, duo_attention, rank_streaming_mask
from longseq.attention_backends.sglang.dense import (
    BackendTrace,
    LongSeqTechniqueBackend,
    check_runner_kv_pool,
    plain_causal_attention,
)
from longseq.attention_backends.sglang.paged import PagedPool
from longseq.config import LongSeqConfig, LongSeqConfigError

BACKEND_NAME = "longseq_duo"
TRACE = BackendTrace(BACKEND_NAME, extra_counts=("duo_calls",), technique="duo")
#: Queries per block of the reference: bounds the fp32 score tensor at ``Hq x MAX_QUERY_ROWS x context``.
MAX_QUERY_ROWS = 256


def _tp_rank_size() -> tuple[int, int]:
    """SGLang's tensor-parallel rank and size (how models split KV heads: ``QKVParallelLinear`` over TP)."""
    from sglang.srt.runtime_context import get_parallel

    try:
        parallel = get_parallel()
        return int(parallel.tp_rank), int(parallel.tp_size)
    except Exception as e:  # noqa: BLE001 - unpublished parallel state: say what is missing
        raise LongSeqConfigError(f"--attention-backend {BACKEND_NAME}: the KV pool holds a shard of the KV heads "
                                 f"but SGLang's tensor-parallel rank is unknown ({e})") from e


def runner_streaming_mask(model_runner, config: LongSeqConfig) -> StreamingHeadMask:
    """Validate the runner for the duo path; return the streaming mask of this rank's KV heads.

    Raises:
        LongSeqConfigError: no/invalid pattern, a pattern that does not fit the model (layers x total KV heads)
            or this rank's KV pool, a device other than CPU or CUDA, MLA, unequal key/value head sizes, an unsupported KV
            dtype or layout, translated KV ids, speculative decoding, or a longseq backend as the inner one.
    """
    where = f"--attention-backend {BACKEND_NAME}"
    device = str(model_runner.device).split(":")[0]
    if device not in ("cpu", "cuda"):
        raise LongSeqConfigError(f"{where} runs on CPU and CUDA, not on {model_runner.device}")
    if config.sglang_dense_backend.startswith("longseq_"):  # the inner backend must be one of SGLang's own
        raise LongSeqConfigError(f"LONGSEQ_SGLANG_DENSE={config.sglang_dense_backend!r}: {where} wraps one of "
                                 "SGLang's dense backends (auto, torch_native, ...), not a longseq backend")
    spec = getattr(model_runner, "spec_algorithm", None)
    if spec is not None and not spec.is_none():
        raise LongSeqConfigError(f"{where}: speculative decoding is not supported; remove --speculative-algorithm")
    check_runner_kv_pool(model_runner, where)
    if config.duo_memory:
        raise LongSeqConfigError(f"{where}: LONGSEQ_DUO_MEMORY=1 (streaming heads' KV kept at sink + recent) is "
                                 "implemented for vLLM only; unset it (duo still saves compute on SGLang)")

    model_config = model_runner.model_config
    total_kv_heads = model_config.get_total_num_kv_heads()
    rank_kv_heads = int(model_runner.token_to_kv_pool.head_num)
    # The whole pattern must fit the whole model; the shard is only needed when this rank holds fewer heads.
    rank, size = (0, 1) if rank_kv_heads == total_kv_heads else _tp_rank_size()
    mask = rank_streaming_mask(config, int(model_config.num_hidden_layers), int(total_kv_heads), rank, size)
    if mask.num_kv_heads != rank_kv_heads:
        raise LongSeqConfigError(
            f"{where}: duo pattern {mask.source} gives tensor-parallel rank {rank}/{size} {mask.num_kv_heads} KV "
            f"heads, but its KV pool holds {rank_kv_heads}")
    return mask


def split_query_blocks(query_start_loc: list[int], seq_lens: list[int], max_rows: int):
    """Split each request's queries into blocks of at most ``max_rows`` rows (each block a pseudo-request).

    Args:
        query_start_loc: ``B + 1`` row offsets; request ``b``'s queries are at its last positions.
        seq_lens: ``B`` context lengths (queries included).

    Returns:
        ``(block_qsl [N+1], block_seq_lens [N], block_request [N])`` int tensors: block ``i`` holds rows
        ``block_qsl[i] .. block_qsl[i+1]-1`` of request ``block_request[i]``, its last query at position
        ``block_seq_lens[i] - 1``.
    """
    qsl, lens, owner = [0], [], []
    for b, n in enumerate(seq_lens):
        q0, q1 = query_start_loc[b], query_start_loc[b + 1]
        first_pos = n - (q1 - q0)
        for r0 in range(q0, q1, max_rows):
            r1 = min(r0 + max_rows, q1)
            qsl.append(r1)
            lens.append(first_pos + (r1 - q0))
            owner.append(b)
    as_int = lambda x: torch.tensor(x, dtype=torch.int64)  # noqa: E731
    return as_int(qsl), as_int(lens), as_int(owner)


class LongSeqDuoBackend(PagedPool, LongSeqTechniqueBackend):
    """``longseq_dense``'s proxy around the inner SGLang backend, plus DuoAttention for duo layers.

    Tensor contract (SGLang's): ``q`` ``[T, Hq * D]`` (or ``[T, Hq, D]``), ``k``/``v`` ``[T, Hkv, D]``;
    output ``[T, Hq * D]`` in ``q``'s dtype. Own state: ``mask`` (this rank's :class:`StreamingHeadMask`,
    ``[num_layers, Hkv]``) and ``duo_layers`` (layer id -> :class:`DuoLayer`, built on first use).
    """

    _OWN = LongSeqTechniqueBackend._OWN | PagedPool._PAGED_OWN | {"mask", "duo_layers", "kernel"}
    trace = TRACE

    def __init__(self, model_runner, config: LongSeqConfig):
        mask = runner_streaming_mask(model_runner, config)  # before building the inner backend: fail fast
        super().__init__(model_runner, config)
        self.mask = mask
        self.duo_layers: dict[int, DuoLayer] = {}
        #: ``triton`` on CUDA, ``reference`` on CPU (tests set ``triton`` on CPU under Triton's interpreter)
        self.kernel = "triton" if self.req_to_token.is_cuda else "reference"
        self._init_paged(model_runner.page_size or 1)

    def __repr__(self) -> str:
        return (f"LongSeqDuoBackend(inner={self.inner_name}, pattern={self.mask.source}, "
                f"streaming={self.mask.sparsity:.2f}, sink={self.mask.sink_size}, recent={self.mask.recent_size})")

    # ---- metadata (Triton path): the batch's block table, once per step (not per layer) ----
    def init_forward_metadata(self, forward_batch):
        self.inner.init_forward_metadata(forward_batch)
        self.block_table = self._eager_block_table(forward_batch) if self.kernel == "triton" else None

    def _duo_layer(self, layer_id: int) -> DuoLayer:
        if layer_id not in self.duo_layers:
            self.duo_layers[layer_id] = DuoLayer.build(self.mask, layer_id, self.req_to_token.device)
        return self.duo_layers[layer_id]

    def is_duo_layer(self, layer, kwargs) -> bool:
        """Plain causal self-attention with at least one streaming head in this layer; everything else (no
        streaming head, sliding window, cross-attention, non-causal, soft-cap, extras) stays dense."""
        attn_type = getattr(layer, "attn_type", None)
        return (self._duo_layer(layer.layer_id).num_streaming > 0
                and getattr(attn_type, "value", "decoder") == "decoder" and plain_causal_attention(layer, kwargs))

    def _duo_attention_triton(self, q, layer, forward_batch, decode: bool):
        """The Triton path (K/V already written): every query row of the step in one or two launches.
        Decode: ``[B]`` rows, nothing read on the host (graph-safe). Extend: ``extend_seq_lens`` rows each."""
        hq, d = layer.tp_q_head_num, layer.qk_head_dim
        q = q.reshape(-1, hq, d)
        key_cache, value_cache = self._paged_kv(layer)
        table = self._step_block_table(forward_batch)
        seq_lens = forward_batch.seq_lens.to(torch.int32)
        if decode:
            qsl = torch.arange(q.shape[0] + 1, dtype=torch.int32, device=q.device)
            max_query_len = 1
        else:
            lens = forward_batch.extend_seq_lens
            qsl = torch.nn.functional.pad(torch.cumsum(lens, 0), (1, 0)).to(torch.int32)
            max_query_len = max(self._extend_query_lens(forward_batch), default=0)
        out = q.new_empty(q.shape[0], hq * d)
        duo_attention(q, key_cache, value_cache, table, qsl, seq_lens, self._duo_layer(layer.layer_id), layer.scaling,
                      out.view(-1, hq, d), max_query_len=max_query_len, kernel="triton")
        self.trace.counts["duo_calls"] += 1
        return out

    def _duo_attention(self, q, k, v, layer, forward_batch, save_kv_cache, query_lens: list[int] | None):
        """Write this step's K/V, then DuoAttention of every query row; ``query_lens`` [B] rows per request
        (None: a decode step, one row each)."""
        self._write_kv(k, v, layer, forward_batch, save_kv_cache)
        if self.kernel == "triton":
            return self._duo_attention_triton(q, layer, forward_batch, decode=query_lens is None)
        if query_lens is None:
            query_lens = [1] * forward_batch.batch_size
        hq, d = layer.tp_q_head_num, layer.qk_head_dim
        q = q.reshape(-1, hq, d)
        seq_lens_cpu = getattr(forward_batch, "seq_lens_cpu", None)
        seq_lens = (forward_batch.seq_lens if seq_lens_cpu is None else seq_lens_cpu).tolist()
        qsl = [0]
        for n in query_lens:
            qsl.append(qsl[-1] + int(n))
        if qsl[-1] != q.shape[0]:
            raise RuntimeError(f"{BACKEND_NAME}: the batch has {q.shape[0]} query rows, its requests {qsl[-1]}")
        block_qsl, block_lens, owner = split_query_blocks(qsl, seq_lens, MAX_QUERY_ROWS)
        # Slot s of the pool is row s: a [num_slots, 1, Hkv, D] paged view with block size 1, whose block
        # table is each request's req_to_token row.
        key_cache = self.pool.get_key_buffer(layer.layer_id).unsqueeze(1)
        value_cache = self.pool.get_value_buffer(layer.layer_id).unsqueeze(1)
        width = max(seq_lens, default=0)
        rows = forward_batch.req_pool_indices.long().cpu()[owner]
        table = self.req_to_token[rows.to(self.req_to_token.device), :width]
        out = q.new_empty(q.shape[0], hq * d)
        duo_attention(q, key_cache, value_cache, table, block_qsl, block_lens, self._duo_layer(layer.layer_id),
                      layer.scaling, out.view(-1, hq, d), max_query_len=max(query_lens, default=0), kernel="reference")
        self.trace.counts["duo_calls"] += 1
        return out

    def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs):
        self.trace.record("decode_calls")
        if not self.is_duo_layer(layer, kwargs):
            return self.inner.forward_decode(q, k, v, layer, forward_batch, save_kv_cache, **kwargs)
        return self._duo_attention(q, k, v, layer, forward_batch, save_kv_cache, None)

    def _extend_query_lens(self, forward_batch) -> list[int]:
        lens = getattr(forward_batch, "extend_seq_lens_cpu", None)
        if lens is None:
            lens = forward_batch.extend_seq_lens.tolist()
        return [int(n) for n in lens]

    def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs):
        self.trace.record("extend_calls")
        if not self.is_duo_layer(layer, kwargs):
            return self.inner.forward_extend(q, k, v, layer, forward_batch, save_kv_cache, **kwargs)
        return self._duo_attention(q, k, v, layer, forward_batch, save_kv_cache,
                                   self._extend_query_lens(forward_batch))

    def forward_mixed(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs):
        self.trace.record("extend_calls")  # a mixed batch lists every request's rows in extend_seq_lens
        if not self.is_duo_layer(layer, kwargs):
            return self.inner.forward_mixed(q, k, v, layer, forward_batch, save_kv_cache, **kwargs)
        return self._duo_attention(q, k, v, layer, forward_batch, save_kv_cache,
                                   self._extend_query_lens(forward_batch))
