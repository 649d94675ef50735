"""PyTorch reference: write K/V into a paged cache and run causal attention over it.

Cache layout (one layer): ``key_cache`` and ``value_cache`` are ``[num_blocks, num_kv_heads,
block_size, head_size]`` views (vLLM's head-major ``HND`` layout); they may be strided views into one
``[num_blocks, num_kv_heads, 2 * block_size, head_size]`` buffer, as vLLM's CPU cache is.
A slot id is ``block * block_size + offset``; ``-1`` marks padding and is skipped.
"""

from __future__ import annotations

import torch

from longseq.kernels.score_mods import NO_MODS, ScoreMods, soft_cap, softmax_with_sinks


def write_paged_kv(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Scatter new tokens' K/V into the paged cache, in place.

    Args:
        key, value: ``[T, Hkv, D]``, any float dtype (cast to the cache dtype).
        key_cache, value_cache: ``[B, Hkv, N, D]``.
        slot_mapping: ``[T']`` int (``T' <= T``; extra rows of ``key`` are padding), ``-1`` = skip.
    """
    n = slot_mapping.shape[0]
    slots = slot_mapping.to(torch.long)
    valid = slots >= 0
    if not bool(valid.all()):
        idx = valid.nonzero().squeeze(1)
        slots = slots[idx]
        key, value = key[:n][idx], value[:n][idx]
    else:
        key, value = key[:n], value[:n]
    block_size = key_cache.shape[2]
    blocks, offsets = slots // block_size, slots % block_size
    # Advanced indices around a slice put the indexed dim first: the target is [T, Hkv, D].
    key_cache[blocks, :, offsets] = key.to(key_cache.dtype)
    value_cache[blocks, :, offsets] = value.to(value_cache.dtype)


def gather_paged_kv(cache: torch.Tensor, block_ids: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Contiguous ``[Hkv, num_tokens, D]`` copy of one request's tokens from a ``[B, Hkv, N, D]`` cache.

    ``block_ids``: ``[>= ceil(num_tokens / N)]`` physical block ids in logical order.
    """
    block_size = cache.shape[2]
    nblk = (num_tokens + block_size - 1) // block_size
    pages = cache[block_ids[:nblk].to(torch.long)]  # [nblk, Hkv, N, D]
    return pages.permute(1, 0, 2, 3).reshape(cache.shape[1], nblk * block_size, cache.shape[3])[:, :num_tokens]


def paged_attention_naive(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_table: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    output: torch.Tensor | None = None,
    compute_dtype: torch.dtype = torch.float32,
    mods: ScoreMods = NO_MODS,
) -> torch.Tensor:
    """Causal attention of each request's new queries over its whole paged context.

    The queries of request ``i`` are the last ``q_len_i`` tokens of its ``seq_len_i`` context
    (prefill, chunked prefill with a cached prefix, and decode are the same case).

    Args:
        query: ``[T, Hq, D]``; ``Hq`` a multiple of ``Hkv`` (GQA groups are consecutive query heads).
        key_cache, value_cache: ``[B, Hkv, N, D]``.
        block_table: ``[R, max_blocks]`` int32 physical block ids per request.
        query_start_loc: ``[R + 1]`` int32 cumulative query offsets (on CPU, or any device).
        seq_lens: ``[R]`` int32 context length per request, including the new queries.
        scale: softmax scale.
        output: optional ``[>= T, Hq, D]`` tensor written in place (rows past ``T`` untouched).
        compute_dtype: dtype of the math (fp32 by default: a reference should not round).
        mods: the layer's soft-cap and ``[Hq]`` sinks (``longseq/kernels/score_mods.py``).

    Returns:
        ``[T, Hq, D]`` attention output in ``query.dtype`` (a view of ``output`` when given).
    """
    qsl = query_start_loc.tolist()
    lens = seq_lens.tolist()
    num_tokens = qsl[-1]
    out = output if output is not None else torch.empty_like(query)
    hq, hkv = query.shape[1], key_cache.shape[1]
    group = hq // hkv
    sinks = mods.sinks_on(query.device, hq)
    for i, ctx in enumerate(lens):
        q0, q1 = qsl[i], qsl[i + 1]
        qlen = q1 - q0
        if qlen == 0:
            continue
        k = gather_paged_kv(key_cache, block_table[i], ctx).to(compute_dtype)
        v = gather_paged_kv(value_cache, block_table[i], ctx).to(compute_dtype)
        if group > 1:
            k = k.repeat_interleave(group, dim=0)
            v = v.repeat_interleave(group, dim=0)
        q = query[q0:q1].transpose(0, 1).to(compute_dtype)  # [Hq, qlen, D]
        mask = None
        if qlen > 1:
            # Query j sits at absolute position ctx - qlen + j and may see keys 0..that position.
            qpos = torch.arange(ctx - qlen, ctx, device=query.device).unsqueeze(1)
            mask = torch.arange(ctx, device=query.device).unsqueeze(0) <= qpos
        if mods.any:  # SDPA has neither: the scores in full
            s = soft_cap(torch.einsum("hqd,hkd->hqk", q, k) * scale, mods.softcap)
            if mask is not None:
                s = s.masked_fill(~mask, float("-inf"))
            o = softmax_with_sinks(s, None if sinks is None else sinks[:, None].to(compute_dtype)) @ v
        else:
            o = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
        out[q0:q1] = o.transpose(0, 1).to(out.dtype)
    return out[:num_tokens]
