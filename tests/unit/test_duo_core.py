"""DuoAttention core (sparsify, TP shards) and the PyTorch references, on CPU without a framework."""

import math

import pytest
import torch
import torch.nn.functional as F

from longseq.attention_backends.core import duo
from longseq.attention_backends.core.duo import StreamingHeadMask
from longseq.attention_backends.core.duo_pattern import DuoPattern, random_pattern, save_duo_pattern
from longseq.kernels.duo_attention import duo_paged_decode_ref, duo_prefill_ref, duo_token_mask
from longseq.config import LongSeqConfig, LongSeqConfigError


def pattern_of(rows, sink=4, recent=8):
    return DuoPattern(torch.tensor(rows, dtype=torch.float64), sink, recent, source="test")


# ---------------------------------------------------------------- sparsify


def test_sparsity_streams_the_lowest_gates():
    pat = pattern_of([[0.9, 0.1, 0.5, 0.7], [0.3, 0.8, 0.2, 0.6]])
    m = StreamingHeadMask.from_pattern(pat, sparsity=0.5)  # 4 of 8 heads: gates 0.1, 0.2, 0.3, 0.5
    assert m.is_streaming.tolist() == [[False, True, True, False], [True, False, True, False]]
    assert m.sparsity == 0.5 and (m.sink_size, m.recent_size) == (4, 8)
    assert m.for_layer(1).tolist() == [True, False, True, False]
    assert StreamingHeadMask.from_pattern(pat, sparsity=0.0).is_streaming.sum() == 0
    assert bool(StreamingHeadMask.from_pattern(pat, sparsity=1.0).is_streaming.all())
    # k = floor(s * N + 1/2): 0.3 * 8 = 2.4 -> 2 heads; 0.3125 * 8 = 2.5 -> 3; 0.99 * 8 -> all 8
    assert StreamingHeadMask.from_pattern(pat, sparsity=0.3).is_streaming.sum() == 2
    assert StreamingHeadMask.from_pattern(pat, sparsity=0.3125).is_streaming.sum() == 3
    assert StreamingHeadMask.from_pattern(pat, sparsity=0.99).is_streaming.sum() == 8


def test_sparsity_ties_break_by_layer_then_head():
    pat = pattern_of([[0.1, 0.5, 0.5], [0.5, 0.9, 0.2]])
    m = StreamingHeadMask.from_pattern(pat, sparsity=0.5)  # 3 heads: 0.1, 0.2, then the first 0.5
    assert m.is_streaming.tolist() == [[True, True, False], [False, False, True]]
    flat = pattern_of([[0.5] * 3] * 3)
    m = StreamingHeadMask.from_pattern(flat, sparsity=4 / 9)
    assert m.is_streaming.tolist() == [[True, True, True], [True, False, False], [False, False, False]]
    again = StreamingHeadMask.from_pattern(flat, sparsity=4 / 9)
    assert torch.equal(m.is_streaming, again.is_streaming)


def test_sparsity_on_a_calibration_sized_pattern_matches_the_quantile():
    pat = random_pattern(30, 3, seed=11)
    for s, k in ((0.25, 23), (0.5, 45), (0.75, 68)):  # 22.5 and 67.5 round up
        m = StreamingHeadMask.from_pattern(pat, sparsity=s)
        assert int(m.is_streaming.sum()) == k
        assert pat.gates[m.is_streaming].max() < pat.gates[~m.is_streaming].min()


def test_threshold_streams_gates_below_it():
    pat = pattern_of([[0.9, 0.1, 0.5, 0.7], [0.3, 0.8, 0.2, 1.0]])
    assert StreamingHeadMask.from_pattern(pat, threshold=0.5).is_streaming.tolist() == [
        [False, True, False, False], [True, False, True, False]]  # 0.5 itself stays retrieval
    assert StreamingHeadMask.from_pattern(pat, threshold=0.0).is_streaming.sum() == 0
    assert StreamingHeadMask.from_pattern(pat, threshold=1.0).is_streaming.sum() == 7


@pytest.mark.parametrize("kwargs, match", [
    ({}, r"exactly one of sparsity or threshold"),
    ({"sparsity": 0.5, "threshold": 0.5}, r"exactly one of sparsity or threshold"),
    ({"sparsity": 1.5}, r"sparsity=1.5 must be in \[0, 1\]"),
    ({"sparsity": -0.1}, r"sparsity=-0.1 must be in \[0, 1\]"),
    ({"sparsity": float("nan")}, r"sparsity=nan must be in \[0, 1\]"),
    ({"threshold": 2.0}, r"threshold=2.0 must be in \[0, 1\]"),
    ({"sparsity": 0.5, "sink_size": 0}, r"sink_size=0 must be a positive integer"),
    ({"sparsity": 0.5, "recent_size": 3.5}, r"recent_size=3.5 must be a positive integer"),
])
def test_bad_sparsify_arguments(kwargs, match):
    with pytest.raises(LongSeqConfigError, match=match):
        StreamingHeadMask.from_pattern(pattern_of([[0.2, 0.4]]), **kwargs)


def test_size_overrides_and_for_layer_range():
    m = StreamingHeadMask.from_pattern(pattern_of([[0.2, 0.4]]), threshold=0.3, sink_size=2, recent_size=5)
    assert (m.sink_size, m.recent_size) == (2, 5)
    with pytest.raises(LongSeqConfigError, match=r"layer 1 out of range"):
        m.for_layer(1)


def test_from_config(tmp_path):
    folder = tmp_path / "pat"
    save_duo_pattern(pattern_of([[0.9, 0.1, 0.5, 0.7], [0.3, 0.8, 0.2, 0.6]], sink=16, recent=64), folder)
    m = StreamingHeadMask.from_config(LongSeqConfig(attention="duo", duo_pattern=str(folder)))
    assert m.sparsity == duo.DEFAULT_SPARSITY and (m.sink_size, m.recent_size) == (16, 64)
    m = StreamingHeadMask.from_config(LongSeqConfig(attention="duo", duo_pattern=str(folder), duo_threshold=0.25,
                                                    duo_sink=8, duo_recent=32))
    assert m.is_streaming.tolist() == [[False, True, False, False], [False, False, True, False]]
    assert (m.sink_size, m.recent_size) == (8, 32)
    with pytest.raises(LongSeqConfigError, match=r"LONGSEQ_DUO_PATTERN"):
        StreamingHeadMask.from_config(LongSeqConfig())


# ---------------------------------------------------------------- tensor parallelism


def test_shard_contiguous_kv_heads():
    pat = random_pattern(3, 4, seed=2)
    m = StreamingHeadMask.from_pattern(pat, sparsity=0.5)
    s = m.shard(0, 1)
    assert torch.equal(s.is_streaming, m.is_streaming) and s.kv_head_ids == (0, 1, 2, 3)
    for tp in (2, 4):
        shards = [m.shard(r, tp) for r in range(tp)]
        assert [sh.kv_head_ids for sh in shards] == [tuple(range(r * 4 // tp, (r + 1) * 4 // tp)) for r in range(tp)]
        assert torch.equal(torch.cat([sh.is_streaming for sh in shards], dim=1), m.is_streaming)
        assert all(sh.num_kv_heads == 4 // tp and sh.sink_size == m.sink_size for sh in shards)
    assert m.shard(1, 2).for_layer(2).tolist() == m.is_streaming[2, 2:4].tolist()


def test_shard_replicates_when_fewer_kv_heads_than_ranks():
    m = StreamingHeadMask(torch.tensor([[True, False], [False, True]]), 4, 8)
    owners = [m.shard(r, 4).kv_head_ids for r in range(4)]
    assert owners == [(0,), (0,), (1,), (1,)]
    assert m.shard(3, 4).is_streaming.tolist() == [[False], [True]]
    one = StreamingHeadMask(torch.tensor([[True]]), 4, 8)
    assert all(one.shard(r, 2).is_streaming.tolist() == [[True]] for r in range(2))


@pytest.mark.parametrize("heads, rank, tp, match", [
    (3, 0, 2, r"3 KV heads cannot be split over tp_size=2"),
    (2, 0, 3, r"2 KV heads cannot be replicated over tp_size=3"),
    (4, 2, 2, r"tp_rank=2 is not a rank of tp_size=2"),
    (4, -1, 2, r"tp_rank=-1 is not a rank"),
])
def test_bad_shards(heads, rank, tp, match):
    m = StreamingHeadMask(torch.zeros(2, heads, dtype=torch.bool), 4, 8)
    with pytest.raises(LongSeqConfigError, match=match):
        m.shard(rank, tp)


# ---------------------------------------------------------------- references

HQ, HKV, D = 6, 3, 16
SCALE = D ** -0.5


def qkv(t_q, t_k, seed):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(t_q, HQ, D, generator=gen)
    k = torch.randn(t_k, HKV, D, generator=gen)
    v = torch.randn(t_k, HKV, D, generator=gen)
    return q, k, v


def causal_sdpa(q, k, v):
    """Plain causal attention through PyTorch's own SDPA (queries = keys' positions)."""
    g = HQ // HKV
    kk, vv = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
    o = F.scaled_dot_product_attention(q.transpose(0, 1), kk.transpose(0, 1), vv.transpose(0, 1), is_causal=True,
                                       scale=SCALE)
    return o.transpose(0, 1)


def test_token_mask_keeps_sink_and_exactly_recent_tokens():
    m = duo_token_mask(torch.arange(20), 20, torch.tensor([True, False]), sink_size=3, recent_size=5)
    assert m.shape == (2, 20, 20)
    assert torch.equal(m[1], torch.ones(20, 20, dtype=torch.bool).tril())
    assert m[0, 19].nonzero().flatten().tolist() == [0, 1, 2, 15, 16, 17, 18, 19]
    assert m[0, 7].nonzero().flatten().tolist() == [0, 1, 2, 3, 4, 5, 6, 7]  # windows overlap: all of 0..7
    assert m[0, 9].nonzero().flatten().tolist() == [0, 1, 2, 5, 6, 7, 8, 9]
    assert bool((m[0].sum(-1)[8:] == 8).all())


def test_retrieval_heads_equal_plain_causal_attention():
    q, k, v = qkv(40, 40, seed=1)
    out = duo_prefill_ref(q, k, v, torch.zeros(HKV, dtype=torch.bool), 4, 8, SCALE)
    torch.testing.assert_close(out, causal_sdpa(q, k, v), atol=1e-5, rtol=1e-5)


def test_streaming_head_with_window_covering_everything_is_full_attention():
    q, k, v = qkv(24, 24, seed=2)
    full = causal_sdpa(q, k, v)
    for sink, recent in ((4, 20), (1, 24), (30, 1), (8, 100)):
        out = duo_prefill_ref(q, k, v, torch.ones(HKV, dtype=torch.bool), sink, recent, SCALE)
        torch.testing.assert_close(out, full, atol=1e-5, rtol=1e-5)


def test_streaming_head_ignores_keys_outside_sink_and_window():
    t, sink, recent = 48, 4, 8
    is_streaming = torch.tensor([True, False, True])
    q, k, v = qkv(t, t, seed=3)
    base = duo_prefill_ref(q, k, v, is_streaming, sink, recent, SCALE)
    # positions sink .. t-recent-4 are outside the windows of the last 4 queries (p >= t-4)
    k2, v2 = k.clone(), v.clone()
    gen = torch.Generator().manual_seed(30)
    k2[sink : t - recent - 3] = torch.randn(t - recent - 3 - sink, HKV, D, generator=gen) * 3
    v2[sink : t - recent - 3] = torch.randn(t - recent - 3 - sink, HKV, D, generator=gen) * 3
    out = duo_prefill_ref(q, k2, v2, is_streaming, sink, recent, SCALE)
    streaming_q = torch.tensor([True, True, False, False, True, True])  # query heads of KV heads 0 and 2
    torch.testing.assert_close(out[-4:, streaming_q], base[-4:, streaming_q], atol=1e-6, rtol=1e-6)
    assert (out[-4:, ~streaming_q] - base[-4:, ~streaming_q]).abs().max() > 1e-2  # retrieval heads do see them
    for pos in (0, sink - 1, t - recent, t - 1):  # a sink key or one inside the window changes the last query
        k3 = k.clone()
        k3[pos] = torch.randn(HKV, D, generator=gen) * 3
        out = duo_prefill_ref(q, k3, v, is_streaming, sink, recent, SCALE)
        assert (out[-1, streaming_q] - base[-1, streaming_q]).abs().max() > 1e-3, pos


def test_chunked_prefill_equals_rows_of_full_prefill():
    t = 41
    is_streaming = torch.tensor([True, False, True])
    q, k, v = qkv(t, t, seed=4)
    full = duo_prefill_ref(q, k, v, is_streaming, 3, 7, SCALE)
    for a, b in ((0, 13), (13, 29), (29, 41), (40, 41)):
        part = duo_prefill_ref(q[a:b], k[:b], v[:b], is_streaming, 3, 7, SCALE, q_start=a)
        torch.testing.assert_close(part, full[a:b], atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match=r"keys \(41\) must cover positions 0 .. q_start \+ Tq - 1 = 39"):
        duo_prefill_ref(q[13:29], k, v, is_streaming, 3, 7, SCALE, q_start=24)


def test_paged_decode_equals_last_row_of_prefill_on_shuffled_cache():
    block_size, sink, recent = 16, 4, 8
    is_streaming = torch.tensor([True, False, True])
    lens = [37, 64, 5, 0, 9]  # 0 = a padding slot
    gen = torch.Generator().manual_seed(5)
    max_blocks = 4
    num_blocks = 20
    perm = torch.randperm(num_blocks, generator=gen)
    block_table = perm[: len(lens) * max_blocks].view(len(lens), max_blocks).to(torch.int32)
    # a [num_blocks, Hkv, block_size, D] store viewed as [num_blocks, block_size, Hkv, D] (non-contiguous)
    key_cache = torch.randn(num_blocks, HKV, block_size, D, generator=gen).permute(0, 2, 1, 3)
    value_cache = torch.randn(num_blocks, HKV, block_size, D, generator=gen).permute(0, 2, 1, 3)
    q = torch.randn(len(lens), HQ, D, generator=gen)
    qs, ks, vs = [], [], []
    for b, n in enumerate(lens):
        qs.append(torch.randn(n, HQ, D, generator=gen))
        ks.append(torch.randn(n, HKV, D, generator=gen))
        vs.append(torch.randn(n, HKV, D, generator=gen))
        if n:
            qs[b][-1] = q[b]
            pos = torch.arange(n)
            blk = block_table[b].long()[pos // block_size]
            key_cache[blk, pos % block_size] = ks[b]
            value_cache[blk, pos % block_size] = vs[b]
    out = duo_paged_decode_ref(q, key_cache, value_cache, block_table, torch.tensor(lens, dtype=torch.int32),
                               is_streaming, sink, recent, SCALE)
    assert out.shape == (len(lens), HQ, D)
    for b, n in enumerate(lens):
        if n == 0:
            assert bool((out[b] == 0).all())
            continue
        ref = duo_prefill_ref(qs[b], ks[b], vs[b], is_streaming, sink, recent, SCALE)[-1]
        torch.testing.assert_close(out[b], ref, atol=1e-6, rtol=1e-5)
    # and the decode differs from dense where the window cuts (the 37- and 64-token requests)
    dense = duo_paged_decode_ref(q, key_cache, value_cache, block_table, torch.tensor(lens, dtype=torch.int32),
                                 torch.zeros(HKV, dtype=torch.bool), sink, recent, SCALE)
    assert (dense[1, :2] - out[1, :2]).abs().max() > 1e-3
    torch.testing.assert_close(dense[1, 2:4], out[1, 2:4], atol=1e-6, rtol=1e-5)


def test_reference_keeps_input_dtype_and_checks_heads():
    q, k, v = qkv(12, 12, seed=6)
    out = duo_prefill_ref(q.bfloat16(), k.bfloat16(), v.bfloat16(), torch.tensor([True, False, True]), 2, 4, SCALE)
    assert out.dtype == torch.bfloat16
    ref = duo_prefill_ref(q.bfloat16().float(), k.bfloat16().float(), v.bfloat16().float(),
                          torch.tensor([True, False, True]), 2, 4, SCALE)
    torch.testing.assert_close(out.float(), ref, atol=1e-2, rtol=1e-2)
    with pytest.raises(ValueError, match=r"is_streaming must be \[Hkv\]=\[3\]"):
        duo_prefill_ref(q, k, v, torch.tensor([True]), 2, 4, SCALE)
    with pytest.raises(ValueError, match=r"query heads \(6\) must be a multiple of KV heads \(4\)"):
        duo_prefill_ref(q, torch.randn(12, 4, D), torch.randn(12, 4, D), torch.ones(4, dtype=torch.bool), 2, 4, SCALE)
    assert math.isfinite(float(out.float().abs().max()))


def test_paged_mixed_batch_matches_prefill_and_decode_refs():
    """A chunked-prefill request and a decode request in one batch over a shuffled paged cache."""
    from longseq.kernels.duo_attention import duo_paged_attention_ref, duo_paged_decode_ref, duo_prefill_ref

    g = torch.Generator().manual_seed(3)
    bs, nb, hkv, hq, d = 16, 24, 2, 6, 16
    kc, vc = torch.randn(nb, bs, hkv, d, generator=g), torch.randn(nb, bs, hkv, d, generator=g)
    bt = torch.randperm(nb, generator=g)[:12].view(2, 6).int()
    seq = torch.tensor([70, 91])
    qsl = torch.tensor([0, 9, 10])  # request 0: a 9-token chunk ending at 69; request 1: one decode token
    q = torch.randn(10, hq, d, generator=g)
    streaming = torch.tensor([True, False])
    out = duo_paged_attention_ref(q, kc, vc, bt, qsl, seq, streaming, 4, 20, d ** -0.5)
    pos = torch.arange(70)
    blk = bt[0].long()[pos // bs]
    ref0 = duo_prefill_ref(q[:9], kc[blk, pos % bs], vc[blk, pos % bs], streaming, 4, 20, d ** -0.5, q_start=61)
    ref1 = duo_paged_decode_ref(q[9:], kc, vc, bt[1:], seq[1:], streaming, 4, 20, d ** -0.5)
    torch.testing.assert_close(out[:9], ref0)
    torch.testing.assert_close(out[9:], ref1)


# ---------------------------------------------------------------- layer tensors and the step


def test_duo_layer_from_row_or_layer_name():
    mask = StreamingHeadMask(torch.tensor([[True, False, False, True], [False, True, True, False]]), 4, 8)
    layer = duo.DuoLayer.build(mask, "model.layers.1.self_attn.attn", "cpu")
    assert layer.is_streaming.dtype == torch.int8 and layer.is_streaming.tolist() == [0, 1, 1, 0]
    assert layer.streaming_heads.tolist() == [1, 2] and layer.all_heads.tolist() == [0, 1, 2, 3]
    assert layer.retrieval_runs == [(0, 1), (3, 4)] and (layer.num_streaming, layer.num_retrieval) == (2, 2)
    assert (layer.sink_size, layer.recent_size) == (4, 8)
    assert duo.DuoLayer.build(mask, 0, "cpu").retrieval_runs == [(1, 3)]
    with pytest.raises(LongSeqConfigError, match="cannot tell the layer number of attention layer 'lm_head'"):
        duo.DuoLayer.build(mask, "lm_head", "cpu")
    with pytest.raises(LongSeqConfigError, match="layer 2 out of range"):
        duo.DuoLayer.build(mask, 2, "cpu")
    assert duo.retrieval_head_runs(torch.ones(3, dtype=torch.bool)) == []


def _paged_batch(seed=4):
    """A chunked-prefill request and a decode request over a shuffled paged cache (as above)."""
    g = torch.Generator().manual_seed(seed)
    bs, nb, hkv, hq, d = 16, 24, 2, 6, 16
    kc, vc = torch.randn(nb, bs, hkv, d, generator=g), torch.randn(nb, bs, hkv, d, generator=g)
    bt = torch.randperm(nb, generator=g)[:12].view(2, 6).int()
    return torch.randn(10, hq, d, generator=g), kc, vc, bt, torch.tensor([0, 9, 10]), torch.tensor([70, 91])


def test_duo_attention_on_cpu_is_the_reference():
    from longseq.kernels.duo_attention import duo_paged_attention_ref

    q, kc, vc, bt, qsl, seq = _paged_batch()
    mask = StreamingHeadMask(torch.tensor([[True, False]]), 4, 20)
    layer = duo.DuoLayer.build(mask, 0, "cpu")
    out = torch.full_like(q, float("nan"))
    path = duo.duo_attention(q, kc, vc, bt, qsl, seq, layer, 0.25, out, max_query_len=9)
    assert path == duo.REFERENCE
    assert torch.equal(out, duo_paged_attention_ref(q, kc, vc, bt, qsl, seq, mask.for_layer(0), 4, 20, 0.25))
    with pytest.raises(ValueError, match="kernel='cuda' is not one of auto, triton, reference"):
        duo.duo_attention(q, kc, vc, bt, qsl, seq, layer, 0.25, out, max_query_len=9, kernel="cuda")


@pytest.mark.parametrize("max_query_len,num_reqs,dense,hybrid_batch,want", [
    (1, 2, True, 0, "one_launch"),  # decode: one launch, split-K
    (1, 2, True, 2, "hybrid"),  # decode from the hybrid batch size on
    (1, 1, True, 2, "one_launch"),  # below it
    (9, 2, True, 0, "hybrid"),  # prefill rows: dense kernel on the retrieval heads
    (9, 2, False, 0, "one_launch"),  # no dense kernel: the Triton kernel does every head
    (1, 2, False, 2, "one_launch"),
])
def test_duo_attention_triton_path_choice(max_query_len, num_reqs, dense, hybrid_batch, want, monkeypatch):
    """Which kernels the Triton path launches, and with which heads and splits (the kernels recorded, not run)."""
    pytest.importorskip("triton")
    from longseq.kernels.duo_attention import unified

    launches, dense_calls = [], []
    monkeypatch.setattr(unified, "duo_paged_attention",
                        lambda q, *args, **kw: launches.append((args[5].tolist(), *args[6:], kw["max_query_len"],
                                                                kw["kv_heads"].tolist(), kw["num_splits"])))
    monkeypatch.setattr(unified, "default_num_splits", lambda batch, heads, device: 10 * batch + heads)
    mask = StreamingHeadMask(torch.tensor([[True, False, False, True]]), 4, 8)
    layer = duo.DuoLayer.build(mask, 0, "cpu")
    q, out = torch.zeros(3, 8, 16), torch.zeros(3, 8, 16)
    seq = torch.ones(num_reqs, dtype=torch.int32)

    def flash(q_, k_, v_, out_, runs):
        assert q_ is q and out_ is out
        dense_calls.append(runs)

    path = duo.duo_attention(q, None, None, None, None, seq, layer, 0.5, out, max_query_len=max_query_len,
                             dense_retrieval=flash if dense else None, hybrid_decode_batch=hybrid_batch,
                             kernel="triton")
    assert path == want
    layer_args = ([1, 0, 0, 1], 4, 8, 0.5)  # is_streaming, sink_size, recent_size, scale
    if want == "hybrid":
        assert dense_calls == [[(1, 3)]] and launches == [(*layer_args, max_query_len, [0, 3], 1)]
    elif max_query_len == 1:
        assert not dense_calls and launches == [(*layer_args, 1, [0, 1, 2, 3], 10 * num_reqs + 2)]
    else:
        assert not dense_calls and launches == [(*layer_args, max_query_len, [0, 1, 2, 3], 1)]


def test_global_layer_rows_skip_windowed_layers():
    from longseq.attention_backends.core.layers import global_layer_rows

    gemma3 = ["sliding_attention"] * 5 + ["full_attention"]
    assert global_layer_rows(gemma3 * 2, 12) == [None] * 5 + [0] + [None] * 5 + [1]
    assert global_layer_rows(["full_attention", "sliding_attention", "chunked_attention"], 3) == [0, None, 1]
    assert global_layer_rows(None, 3) == [0, 1, 2]  # no layer_types: every layer is global
    with pytest.raises(ValueError, match="2 entries for 3 layers"):
        global_layer_rows(["full_attention"] * 2, 3)
