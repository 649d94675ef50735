"""The PyTorch paged-attention path vs plain causal attention on contiguous tensors."""

import pytest
import torch

from longseq.kernels.paged_attention import paged_attention_naive, write_paged_kv
from longseq.kernels.score_mods import ScoreMods


def dense_causal_reference(q, k, v, scale, softcap=None, sinks=None):
    """q: [Lq, Hq, D], k/v: [L, Hkv, D]; queries are the last Lq positions. fp64 math. ``softcap``: scores
    become ``cap * tanh(s / cap)``; ``sinks`` ``[Hq]``: ``e^sink`` joins each softmax's denominator."""
    lq, hq, _ = q.shape
    l, hkv, _ = k.shape
    g = hq // hkv
    k = k.double().repeat_interleave(g, dim=1)
    v = v.double().repeat_interleave(g, dim=1)
    s = torch.einsum("qhd,khd->hqk", q.double(), k) * scale
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    qpos = torch.arange(l - lq, l)[:, None]
    e = torch.exp(s).masked_fill(torch.arange(l)[None, :] > qpos, 0.0)  # scores here are small: no max shift
    denom = e.sum(-1, keepdim=True)
    if sinks is not None:
        denom = denom + torch.exp(sinks.double())[:, None, None]
    return torch.einsum("hqk,khd->qhd", e / denom, v)


@pytest.mark.parametrize("hq,hkv,d", [(4, 4, 64), (9, 3, 64), (8, 2, 128), (16, 2, 128)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mixed_batch_matches_dense(hq, hkv, d, dtype):
    _check_mixed_batch(hq, hkv, d, dtype, {})


@pytest.mark.parametrize("kind", ["softcap", "sinks", "both"])
def test_score_mods_match_dense(kind):
    """Soft-cap and learned sinks (``score_mods.py``): the explicit-score path instead of SDPA."""
    sinks = torch.randn(9, generator=torch.Generator().manual_seed(5)) * 2
    mods = {"softcap": 1.5 if kind != "sinks" else None, "sinks": sinks if kind != "softcap" else None}
    _check_mixed_batch(9, 3, 64, torch.float32, mods)


def _check_mixed_batch(hq, hkv, d, dtype, mods):
    g = torch.Generator().manual_seed(hq * 1000 + d)
    block_size, num_blocks = 16, 64
    # (context length, new query tokens): decode, prefill, chunked prefill over a cached prefix.
    reqs = [(37, 1), (50, 50), (129, 17), (16, 1), (5, 5)]
    kv = torch.randn(num_blocks, hkv, 2 * block_size, d, generator=g).to(dtype)
    key_cache, value_cache = kv.chunk(2, dim=2)  # strided views, like vLLM's CPU cache
    perm = torch.randperm(num_blocks, generator=g)
    tables, ks, vs, qs, used = [], [], [], [], 0
    for ctx, _ in reqs:
        nb = (ctx + block_size - 1) // block_size
        tables.append(perm[used : used + nb]); used += nb
        ks.append(torch.randn(ctx, hkv, d, generator=g).to(dtype))
        vs.append(torch.randn(ctx, hkv, d, generator=g).to(dtype))
    max_blocks = max(len(t) for t in tables)
    block_table = torch.zeros(len(reqs), max_blocks, dtype=torch.int32)
    for i, t in enumerate(tables):
        block_table[i, : len(t)] = t
    # Write every token through write_paged_kv, with padding slots mixed in.
    for i, (ctx, _) in enumerate(reqs):
        pos = torch.arange(ctx)
        slots = tables[i][pos // block_size].long() * block_size + pos % block_size
        slots = torch.cat([slots, torch.tensor([-1, -1])])
        pad = torch.randn(2, hkv, d, generator=g).to(dtype)
        write_paged_kv(torch.cat([ks[i], pad]), torch.cat([vs[i], pad]), key_cache, value_cache, slots)
    for ctx, ql in reqs:
        qs.append(torch.randn(ql, hq, d, generator=g).to(dtype))
    query = torch.cat(qs)
    qsl = torch.tensor([0] + [q for _, q in reqs], dtype=torch.int32).cumsum(0).to(torch.int32)
    seq_lens = torch.tensor([c for c, _ in reqs], dtype=torch.int32)
    out = torch.full((query.shape[0] + 3, hq, d), 7.0, dtype=dtype)  # padded rows must stay untouched
    scale = d ** -0.5
    paged_attention_naive(query, key_cache, value_cache, block_table, qsl, seq_lens, scale, output=out,
                          mods=ScoreMods(**mods))
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    for i, (ctx, ql) in enumerate(reqs):
        ref = dense_causal_reference(qs[i], ks[i], vs[i], scale, **mods)
        got = out[qsl[i] : qsl[i + 1]].double()
        torch.testing.assert_close(got, ref, atol=tol, rtol=tol)
    assert torch.all(out[query.shape[0] :] == 7.0)


def test_write_paged_kv_places_tokens_and_skips_padding():
    key_cache = torch.zeros(4, 2, 8, 3)
    value_cache = torch.zeros(4, 2, 8, 3)
    key = torch.randn(3, 2, 3)
    value = torch.randn(3, 2, 3)
    write_paged_kv(key, value, key_cache, value_cache, torch.tensor([2 * 8 + 5, -1, 3 * 8 + 0]))
    assert torch.equal(key_cache[2, :, 5], key[0]) and torch.equal(value_cache[3, :, 0], value[2])
    assert int((key_cache != 0).any(-1).sum()) == 4  # 2 tokens x 2 heads, padding row not written
