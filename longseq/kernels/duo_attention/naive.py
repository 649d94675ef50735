"""PyTorch references for DuoAttention: causal attention where streaming KV heads see sink + recent tokens only.

Per KV head ``h`` (``is_streaming[h]``), a query at absolute position ``p`` attends to keys ``j`` with
``j <= p`` and, for a streaming head, ``j < sink_size or j > p - recent_size``: the first ``sink_size`` tokens
and the ``recent_size`` most recent ones (its own token included). Retrieval heads see every ``j <= p``.
GQA: ``Hq = G * Hkv`` and query head ``i`` uses KV head ``i // G``.

Cache layout of the paged decode: ``key_cache``/``value_cache`` are ``[num_blocks, block_size, Hkv, D]`` with
any strides (as in ``longseq.kernels.paged_attention``); token ``t`` of request ``b`` lives at block
``block_table[b, t // block_size]``, offset ``t % block_size``.

Written for clarity: fp32 math, materialized scores, one request at a time.
"""

from __future__ import annotations

import torch

from longseq.kernels.score_mods import NO_MODS, ScoreMods, soft_cap, softmax_with_sinks


def duo_token_mask(q_pos: torch.Tensor, num_keys: int, is_streaming: torch.Tensor, sink_size: int,
                   recent_size: int) -> torch.Tensor:
    """Which keys each query may attend to, per KV head.

    Args:
        q_pos: ``[Tq]`` int absolute positions of the queries (each ``< num_keys``).
        num_keys: keys at positions ``0 .. num_keys-1``.
        is_streaming: ``[Hkv]`` bool.
        sink_size, recent_size: streaming sizes (positive ints).

    Returns:
        ``[Hkv, Tq, num_keys]`` bool, True where the key is visible.
    """
    p = q_pos.long().reshape(-1, 1)  # [Tq, 1]
    j = torch.arange(num_keys, device=q_pos.device).reshape(1, -1)  # [1, Tk]
    causal = j <= p
    window = (j < sink_size) | (j > p - recent_size)
    streaming = is_streaming.to(device=q_pos.device, dtype=torch.bool).reshape(-1, 1, 1)  # [Hkv, 1, 1]
    return causal[None] & (window[None] | ~streaming)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor, scale: float,
            mods: ScoreMods = NO_MODS) -> torch.Tensor:
    """Masked softmax attention in fp32.

    Args:
        q: ``[Tq, Hq, D]``; k, v: ``[Tk, Hkv, D]``; allowed: ``[Hkv, Tq, Tk]`` bool (every row has a True).
        mods: soft-cap and ``[Hq]`` sinks (``score_mods.py``).

    Returns:
        ``[Tq, Hq, D]`` fp32.
    """
    tq, hq, d = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    qf = q.float().reshape(tq, hkv, g, d).permute(1, 2, 0, 3)  # [Hkv, G, Tq, D]
    kf = k.float().permute(1, 0, 2)  # [Hkv, Tk, D]
    vf = v.float().permute(1, 0, 2)
    s = soft_cap(torch.einsum("hgqd,hkd->hgqk", qf, kf) * scale, mods.softcap)  # [Hkv, G, Tq, Tk]
    s = s.masked_fill(~allowed[:, None], float("-inf"))
    sinks = mods.sinks_on(q.device, hq)
    p = softmax_with_sinks(s, None if sinks is None else sinks.view(hkv, g, 1))
    o = torch.einsum("hgqk,hkd->hgqd", p, vf)  # [Hkv, G, Tq, D]
    return o.permute(2, 0, 1, 3).reshape(tq, hq, d)


def _check_gqa(hq: int, hkv: int, is_streaming: torch.Tensor) -> None:
    if hkv == 0 or hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of KV heads ({hkv})")
    if tuple(is_streaming.shape) != (hkv,):
        raise ValueError(f"is_streaming must be [Hkv]=[{hkv}], got {tuple(is_streaming.shape)}")


def duo_prefill_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, is_streaming: torch.Tensor, sink_size: int,
                    recent_size: int, scale: float, q_start: int = 0, mods: ScoreMods = NO_MODS) -> torch.Tensor:
    """Causal DuoAttention of one request's (chunk of) prefill.

    Args:
        q: ``[Tq, Hq, D]`` queries at positions ``q_start .. q_start+Tq-1``.
        k, v: ``[Tk, Hkv, D]`` keys/values at positions ``0 .. Tk-1``, ``Tk = q_start + Tq`` (chunked prefill:
            the earlier chunks' keys come first).
        is_streaming: ``[Hkv]`` bool.
        sink_size, recent_size: streaming sizes; scale: softmax scale (usually ``D ** -0.5``).
        q_start: position of the first query.
        mods: the layer's soft-cap and sinks (``score_mods.py``).

    Returns:
        ``[Tq, Hq, D]`` in ``q.dtype``.
    """
    tq, hq, _ = q.shape
    tk, hkv, _ = k.shape
    if tk != q_start + tq:
        raise ValueError(f"keys ({tk}) must cover positions 0 .. q_start + Tq - 1 = {q_start + tq - 1}")
    _check_gqa(hq, hkv, is_streaming)
    q_pos = torch.arange(q_start, q_start + tq, device=q.device)
    allowed = duo_token_mask(q_pos, tk, is_streaming, sink_size, recent_size)
    return _attend(q, k, v, allowed, scale, mods).to(q.dtype)


def duo_paged_decode_ref(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                         block_table: torch.Tensor, seq_lens: torch.Tensor, is_streaming: torch.Tensor,
                         sink_size: int, recent_size: int, scale: float, mods: ScoreMods = NO_MODS) -> torch.Tensor:
    """One decode query per request over a paged KV cache.

    Args:
        q: ``[B, Hq, D]``; the query of request ``b`` is at position ``seq_lens[b] - 1``.
        key_cache, value_cache: ``[num_blocks, block_size, Hkv, D]`` (any strides), already holding the
            query's own key/value.
        block_table: ``[B, max_blocks]`` int32 physical block ids; seq_lens: ``[B]`` int (query token included).
        is_streaming: ``[Hkv]`` bool; sink_size, recent_size, scale, mods as in :func:`duo_prefill_ref`.

    Returns:
        ``[B, Hq, D]`` in ``q.dtype`` (zeros for a request with ``seq_len == 0``, i.e. padding).
    """
    b_, hq, _ = q.shape
    block_size, hkv = key_cache.shape[1], key_cache.shape[2]
    _check_gqa(hq, hkv, is_streaming)
    out = torch.zeros_like(q)
    for b in range(b_):
        n = int(seq_lens[b])
        if n == 0:
            continue
        pos = torch.arange(n, device=q.device)
        blk = block_table[b].long()[pos // block_size]
        off = pos % block_size
        k = key_cache[blk, off]  # [n, Hkv, D]
        v = value_cache[blk, off]
        allowed = duo_token_mask(pos[-1:], n, is_streaming, sink_size, recent_size)  # [Hkv, 1, n]
        out[b] = _attend(q[b : b + 1], k, v, allowed, scale, mods)[0].to(q.dtype)
    return out


def duo_paged_attention_ref(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                            block_table: torch.Tensor, query_start_loc: torch.Tensor, seq_lens: torch.Tensor,
                            is_streaming: torch.Tensor, sink_size: int, recent_size: int, scale: float,
                            output: torch.Tensor | None = None, mods: ScoreMods = NO_MODS) -> torch.Tensor:
    """A mixed batch (prefill chunks and decodes) over a paged KV cache, one request at a time.

    Args:
        query: ``[T, Hq, D]``, request ``b``'s queries are rows ``query_start_loc[b] .. query_start_loc[b+1]-1``
            at the last positions of its ``seq_lens[b]`` tokens (chunked prefill and decode alike).
        key_cache, value_cache: ``[num_blocks, block_size, Hkv, D]`` (any strides), holding this step's keys.
        block_table: ``[B, max_blocks]``; query_start_loc: ``[B+1]`` (CPU); seq_lens: ``[B]``.
        is_streaming, sink_size, recent_size, scale, mods: as in :func:`duo_prefill_ref`.
        output: optional ``[T, Hq, D]`` to write into.

    Returns:
        ``[T, Hq, D]`` (``output`` if given).
    """
    block_size = key_cache.shape[1]
    out = torch.empty_like(query) if output is None else output
    for b in range(len(seq_lens)):
        q0, q1, n = int(query_start_loc[b]), int(query_start_loc[b + 1]), int(seq_lens[b])
        if q1 == q0:
            continue
        pos = torch.arange(n, device=query.device)
        blk = block_table[b].long()[pos // block_size]
        k, v = key_cache[blk, pos % block_size], value_cache[blk, pos % block_size]
        out[q0:q1] = duo_prefill_ref(query[q0:q1], k, v, is_streaming, sink_size, recent_size, scale,
                                     q_start=n - (q1 - q0), mods=mods).to(out.dtype)
    return out


def retrieval_head_runs(is_streaming: torch.Tensor) -> list[tuple[int, int]]:
    """Maximal runs ``[lo, hi)`` of consecutive retrieval KV heads of a ``[Hkv]`` mask (host side, once per
    layer): the head slices a dense kernel such as FlashAttention can take as strided views."""
    runs: list[tuple[int, int]] = []
    lo = None
    flags = [bool(x) for x in is_streaming.tolist()]
    for h, streaming in enumerate(flags + [True]):
        if not streaming and lo is None:
            lo = h
        elif streaming and lo is not None:
            runs.append((lo, h))
            lo = None
    return runs
