"""The batched PyTorch selection / sparse decode (the CPU engine's path) against the per-request references."""

from __future__ import annotations

import pytest
import torch

from longseq.kernels.sparse_decode import naive
from longseq.kernels.sparse_decode.torch_ops import (
    score_pages_torch,
    select_topk_pages_torch,
    sparse_paged_decode_torch,
)


def _setup(seq_lens, hq, hkv, d, block_size, page_size, dtype, seed, summary_dtype=None):
    g = torch.Generator().manual_seed(seed)
    bps = max(-(-n // block_size) for n in seq_lens) + 1
    num_blocks = len(seq_lens) * bps + 3
    kv = torch.randn(2, num_blocks, block_size, hkv, 2 * d, generator=g).to(dtype)
    key_cache, value_cache = kv[0][..., :d], kv[1][..., d:]  # strided views, as vLLM's layouts give
    block_table = torch.randperm(num_blocks, generator=g)[: len(seq_lens) * bps].view(len(seq_lens), bps).int()
    seq = torch.tensor(seq_lens, dtype=torch.int32)
    sdt = summary_dtype or dtype
    pages = num_blocks * block_size // page_size
    pmin = torch.empty(pages, hkv, d, dtype=sdt)
    pmax = torch.empty(pages, hkv, d, dtype=sdt)
    slots = torch.cat([block_table[b].long().repeat_interleave(block_size)[:n] * block_size
                       + torch.arange(n) % block_size for b, n in enumerate(seq_lens)])
    naive.update_page_summary_ref(key_cache, slots, pmin, pmax, page_size)
    q = torch.randn(len(seq_lens), hq, d, generator=g).to(dtype)
    return q, key_cache, value_cache, block_table, seq, pmin, pmax


@pytest.mark.parametrize("hq,hkv,d,page_size,block_size,summary", [
    (9, 3, 64, 16, 16, None), (8, 8, 32, 8, 32, None), (12, 2, 128, 16, 64, torch.float8_e4m3fn),
    (6, 3, 64, 16, 16, torch.float32)])
def test_select_and_decode_match_references(hq, hkv, d, page_size, block_size, summary):
    seq_lens = [700, 33, 0, 1, 256, 1000]
    q, kc, vc, bt, seq, pmin, pmax = _setup(seq_lens, hq, hkv, d, block_size, page_size, torch.bfloat16,
                                           seed=hq + d, summary_dtype=summary)
    args = (q, pmin, pmax, bt, seq, page_size, block_size)
    s_ref = naive.score_pages_ref(*args, 1, 2)
    s = score_pages_torch(*args, 1, 2)
    fin = torch.isfinite(s_ref)
    assert torch.equal(fin, torch.isfinite(s)) and torch.equal(s_ref[~fin], s[~fin])
    torch.testing.assert_close(s[fin], s_ref[fin], rtol=1e-5, atol=1e-4)
    for gm in (False, True):  # the group-max score too (LONGSEQ_SPARSE_GROUP_SCORE=max), and its selection
        s_ref_g, s_g = naive.score_pages_ref(*args, 1, 2, gm), score_pages_torch(*args, 1, 2, gm)
        fin_g = torch.isfinite(s_ref_g)
        assert torch.equal(fin_g, torch.isfinite(s_g)) and torch.equal(s_ref_g[~fin_g], s_g[~fin_g])
        torch.testing.assert_close(s_g[fin_g], s_ref_g[fin_g], rtol=1e-5, atol=1e-4)
        ids_g, _ = select_topk_pages_torch(*args, 16, 1, 2, group_max=gm)
        ref_g, _ = naive.select_topk_pages_ref(*args, 16, 1, 2, group_max=gm)
        for b in range(len(seq_lens)):
            for h in range(hkv):
                a, r = ids_g[b, h][ids_g[b, h] >= 0].long(), ref_g[b, h][ref_g[b, h] >= 0].long()
                if len(a):
                    torch.testing.assert_close(s_ref_g[b, h, a].min(), s_ref_g[b, h, r].min(), rtol=1e-5, atol=1e-4)
    if hq > hkv:  # a real group: the two scores differ
        assert not torch.equal(naive.score_pages_ref(*args, 1, 2, True)[fin], s_ref[fin])
    for k in (4, 16, 200):
        ids_ref, nv_ref = naive.select_topk_pages_ref(*args, k, 1, 2)
        ids, nv = select_topk_pages_torch(*args, k, 1, 2)
        assert torch.equal(nv, nv_ref)
        # Rounding may swap near-equal pages: the chosen sets' minimum score must match the reference's.
        for b in range(len(seq_lens)):
            for h in range(hkv):
                a, r = ids[b, h][ids[b, h] >= 0].long(), ids_ref[b, h][ids_ref[b, h] >= 0].long()
                assert len(a) == len(r) == int(nv[b])
                assert torch.equal(a, a.sort().values)
                if len(a):
                    torch.testing.assert_close(s_ref[b, h, a].min(), s_ref[b, h, r].min(), rtol=1e-5, atol=1e-4)
        out = sparse_paged_decode_torch(q, kc, vc, bt, seq, ids_ref, page_size, d ** -0.5)
        ref = naive.sparse_paged_decode_ref(q, kc, vc, bt, seq, ids_ref, page_size, d ** -0.5)
        torch.testing.assert_close(out.float(), ref.float(), rtol=1e-2, atol=1e-2)
        assert out[2].abs().sum() == 0  # the empty request sees no token


def test_all_pages_is_dense_attention():
    q, kc, vc, bt, seq, pmin, pmax = _setup([300, 129], 8, 2, 64, 16, 16, torch.float32, seed=7)
    ids, _ = select_topk_pages_torch(q, pmin, pmax, bt, seq, 16, 16, 64)
    out = sparse_paged_decode_torch(q, kc, vc, bt, seq, ids, 16, 0.125)
    for b, n in enumerate([300, 129]):
        pos = torch.arange(n)
        blk = bt[b].long()[pos // 16]
        k, v = kc[blk, pos % 16], vc[blk, pos % 16]  # [n, Hkv, D]
        qb = q[b].view(2, 4, 64)
        p = torch.softmax(torch.einsum("hgd,nhd->hgn", qb, k) * 0.125, -1)
        torch.testing.assert_close(out[b], torch.einsum("hgn,nhd->hgd", p, v).reshape(8, 64), rtol=1e-5, atol=1e-5)


def test_score_mods_all_pages_is_dense_attention_with_them():
    """Soft-cap and sinks: the batched op over every page equals the dense path (``paged_attention_naive``), and the
    per-request reference over a random subset."""
    from longseq.kernels.paged_attention import paged_attention_naive
    from longseq.kernels.score_mods import ScoreMods

    q, kc, vc, bt, seq, pmin, pmax = _setup([300, 129, 0], 8, 2, 64, 16, 16, torch.float32, seed=8)
    mods = ScoreMods(softcap=2.0, sinks=torch.randn(8, generator=torch.Generator().manual_seed(1)))
    ids, _ = select_topk_pages_torch(q, pmin, pmax, bt, seq, 16, 16, 64)
    out = sparse_paged_decode_torch(q, kc, vc, bt, seq, ids, 16, 0.25, mods=mods)
    dense = paged_attention_naive(q, kc.transpose(1, 2), vc.transpose(1, 2), bt, torch.arange(4, dtype=torch.int32),
                                  seq, 0.25, mods=mods)
    torch.testing.assert_close(out[:2], dense[:2], rtol=1e-5, atol=1e-5)
    assert (out[2] == 0).all()
    few, _ = select_topk_pages_torch(q, pmin, pmax, bt, seq, 16, 16, 5)
    got = sparse_paged_decode_torch(q, kc, vc, bt, seq, few, 16, 0.25, mods=mods)
    ref = naive.sparse_paged_decode_ref(q, kc, vc, bt, seq, few, 16, 0.25, mods=mods)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
