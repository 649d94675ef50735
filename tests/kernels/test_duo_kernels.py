"""DuoAttention Triton kernel (longseq.kernels.duo_attention.unified) vs the PyTorch reference (naive.py).

Without CUDA the kernel runs in Triton's interpreter at small shapes (TRITON_INTERPRET=1 while the kernel
modules are imported and while these tests run: tests/support/triton_interp.py); with CUDA the same tests
run natively and the ``gpu``-marked ones add Llama-3.1-8B-sized shapes and CUDA-graph replay.
"""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")

from paged_tables import scattered_block_table  # noqa: E402
from triton_interp import CUDA, import_kernels, interpreter_env  # noqa: E402

DEV = "cuda" if CUDA else "cpu"


(uni,) = import_kernels("longseq.kernels.duo_attention.unified")
_interpreter_env = pytest.fixture(autouse=True, scope="module")(interpreter_env)

from longseq.kernels.duo_attention import duo_paged_attention_ref  # noqa: E402
from longseq.kernels.score_mods import NO_MODS, ScoreMods  # noqa: E402

TOL = {torch.float32: 2e-4, torch.bfloat16: 2.5e-2, torch.float16: 4e-3}


class Batch:
    """Requests ``(cached, new)``: a paged cache of random keys in a shuffled block table (stale random blocks
    past each request's tokens), queries for the ``new`` last tokens, a random streaming mask with both kinds."""

    def __init__(self, reqs, hq, hkv, d, block_size=16, dtype=torch.float32, seed=0, dev=DEV):
        g = torch.Generator().manual_seed(seed)
        seq_lens = [c + n for c, n in reqs]
        nblk = [triton.cdiv(s, block_size) for s in seq_lens]
        num_blocks = sum(nblk) + 2
        kv = torch.randn(2, num_blocks, block_size, hkv, d, generator=g)
        table = scattered_block_table(nblk, num_blocks, max(nblk) + 1, g)
        q_lens = [n for _, n in reqs]
        self.query = torch.randn(sum(q_lens), hq, d, generator=g).to(dtype).to(dev)
        self.key_cache, self.value_cache = kv[0].to(dtype).to(dev), kv[1].to(dtype).to(dev)
        self.block_table = table.to(dev)
        self.seq_lens = torch.tensor(seq_lens, dtype=torch.int32, device=dev)
        self.qsl_cpu = torch.tensor([0] + q_lens, dtype=torch.int32).cumsum(0).to(torch.int32)
        self.qsl = self.qsl_cpu.to(dev)
        self.max_query_len = max(q_lens)
        mask = torch.rand(hkv, generator=g) < 0.5
        mask[0], mask[-1] = True, False  # both kinds present
        self.is_streaming = mask.to(dev)
        self.scale = d ** -0.5

    def ref(self, sink, recent, mods=NO_MODS):
        return duo_paged_attention_ref(self.query, self.key_cache, self.value_cache, self.block_table, self.qsl_cpu,
                                       self.seq_lens, self.is_streaming, sink, recent, self.scale, mods=mods)

    def run(self, sink, recent, **kw):
        return uni.duo_paged_attention(self.query, self.key_cache, self.value_cache, self.block_table, self.qsl,
                                       self.seq_lens, self.is_streaming, sink, recent, self.scale,
                                       self.max_query_len, **kw)


def check(out, ref, dtype):
    assert torch.isfinite(out).all()
    err = (out.float() - ref.float()).abs().max().item() / ref.float().abs().max().item()
    assert err < TOL[dtype], err


# (cached, new) per request. Sink 20 and recent 24 cross 16-token pages; 300 keys span 5 tiles of 64.
CASES = {
    "decode": [(299, 1), (44, 1), (128, 1)],
    "prefill": [(0, 150)],
    "chunked_prefill": [(130, 70)],
    "mixed": [(299, 1), (0, 37), (90, 40), (10, 1)],
}


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("hq,hkv,d", [(12, 4, 64), (8, 2, 128)])
def test_matches_reference(name, hq, hkv, d):
    b = Batch(CASES[name], hq, hkv, d, seed=hash(name) % 1000)
    check(b.run(20, 24), b.ref(20, 24), torch.float32)


@pytest.mark.parametrize("num_splits", [2, 5])
def test_decode_split_k(num_splits):
    """Split-K decode; two padding rows past the last request (as under CUDA graphs) come out as zeros."""
    b = Batch(CASES["decode"], 12, 4, 64, seed=1)
    ref = b.ref(20, 24)
    b.query = torch.cat([b.query, torch.randn(2, 12, 64, device=DEV)])
    out = b.run(20, 24, num_splits=num_splits, out=torch.full_like(b.query, float("nan")))
    check(out[:3], ref, torch.float32)
    assert (out[3:] == 0).all()


@pytest.mark.parametrize("hq,hkv,dtype", [(12, 4, torch.float32), (12, 4, torch.bfloat16), (4, 4, torch.float32)])
def test_decode_without_tensor_core_dots(hq, hkv, dtype):
    """``use_dot=False`` (register multiply-and-sum over G rows), with and without split-K and the next-tile
    prefetch; refused for prefill."""
    b = Batch(CASES["decode"], hq, hkv, 64, dtype=dtype, seed=10)
    ref = b.ref(20, 24)
    check(b.run(20, 24, use_dot=False, tile_n=32), ref, dtype)
    check(b.run(20, 24, use_dot=False, num_splits=3, prefetch=True), ref, dtype)
    check(b.run(20, 24, num_splits=2, prefetch=True, tile_n=32), ref, dtype)
    p = Batch(CASES["mixed"], 8, 2, 64, seed=10)
    with pytest.raises(ValueError, match="decode layout"):
        p.run(20, 24, use_dot=False)


def _mods(kind: str, hq: int, seed: int) -> ScoreMods:
    """Soft-cap low enough to bend these scores (|q.k| * scale reaches ~4), sinks on both sides of them."""
    sinks = 2.0 * torch.randn(hq, generator=torch.Generator().manual_seed(seed))
    return ScoreMods(softcap=2.5 if "cap" in kind else None, sinks=sinks.to(DEV) if "sinks" in kind else None)


@pytest.mark.parametrize("kind", ["cap", "sinks", "cap+sinks"])
@pytest.mark.parametrize("name,num_splits", [("mixed", 1), ("decode", 1), ("decode", 3)])
def test_score_mods_match_reference(kind, name, num_splits):
    """Soft-cap and learned sinks (``score_mods.py``) in every write path: one program, split-K merge."""
    b = Batch(CASES[name], 12, 4, 64, seed=11)
    mods = _mods(kind, 12, seed=len(kind))
    ref = b.ref(20, 24, mods)
    check(b.run(20, 24, num_splits=num_splits, mods=mods), ref, torch.float32)
    assert (ref - b.ref(20, 24)).abs().max() > 1e-2  # the modifiers change the answer


def test_score_mods_bf16_decode_without_dots():
    b = Batch(CASES["decode"], 8, 2, 64, dtype=torch.bfloat16, seed=12)
    mods = _mods("cap+sinks", 8, seed=3)
    check(b.run(20, 24, use_dot=False, num_splits=2, mods=mods), b.ref(20, 24, mods), torch.bfloat16)


def test_short_sequences_see_every_key():
    """Shorter than sink + recent: streaming heads see everything, so the result is dense attention."""
    b = Batch([(30, 1), (0, 25), (5, 9)], 8, 2, 64, seed=2)
    out = b.run(16, 32)
    check(out, b.ref(16, 32), torch.float32)
    b.is_streaming[:] = False
    check(out, b.ref(16, 32), torch.float32)


def test_bf16_mixed_batch():
    b = Batch(CASES["mixed"], 8, 2, 64, dtype=torch.bfloat16, seed=3)
    check(b.run(20, 24), b.ref(20, 24), torch.bfloat16)


@pytest.mark.parametrize("tile_n,prefetch", [(None, False), (16, True)])
def test_streaming_heads_skip_tiles_outside_sink_and_window(tile_n, prefetch):
    """NaN in the keys/values of tiles a streaming head must skip (64..191 for queries at 250..299 with sink 20,
    recent 24, 64- or 16-key tiles): a kernel that visited them would turn NaN, even masked (0 * NaN)."""
    b = Batch([(299, 1), (250, 2)], 8, 2, 64, seed=4)
    ref = b.ref(20, 24)
    pos = torch.arange(64, 192, device=DEV)  # skipped by both requests (second: queries at 250, 251)
    heads = b.is_streaming.nonzero().squeeze(1)
    for r in range(2):
        blk = b.block_table[r].long()[pos // 16]
        for h in heads.tolist():
            b.key_cache[blk, pos % 16, h] = float("nan")
            b.value_cache[blk, pos % 16, h] = float("nan")
    check(b.run(20, 24, tile_n=tile_n, prefetch=prefetch), ref, torch.float32)
    check(b.run(20, 24, num_splits=3, tile_n=tile_n, prefetch=prefetch), ref, torch.float32)


def test_subset_of_heads_leaves_other_rows():
    """``kv_heads`` = the streaming heads only (the FlashAttention hybrid): other heads' rows untouched."""
    b = Batch(CASES["mixed"], 8, 2, 64, seed=5)
    out = torch.full_like(b.query, 7.0)
    heads = b.is_streaming.nonzero().squeeze(1).to(torch.int32)
    b.run(20, 24, out=out, kv_heads=heads)
    ref = b.ref(20, 24)
    g = 4
    for h in range(2):
        rows = slice(h * g, (h + 1) * g)
        if b.is_streaming[h]:
            check(out[:, rows], ref[:, rows], torch.float32)
        else:
            assert (out[:, rows] == 7.0).all()
    with pytest.raises(ValueError, match="split-K"):
        b.run(20, 24, out=out, kv_heads=heads, num_splits=2)


def test_retrieval_head_runs():
    runs = uni.retrieval_head_runs(torch.tensor([False, False, True, False, True, True, False, False]))
    assert runs == [(0, 2), (3, 4), (6, 8)]
    assert uni.retrieval_head_runs(torch.ones(4, dtype=torch.bool)) == []


# ------------------------------------------------------------------------------------------------ GPU only
@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_llama_sized_mixed_batch(dtype):
    b = Batch([(6000, 1), (3000, 1), (0, 1500), (4000, 700)], 32, 8, 128, dtype=dtype, seed=6)
    check(b.run(64, 256), b.ref(64, 256), dtype)
    dec = Batch([(20000, 1), (9000, 1), (300, 1)], 32, 8, 128, dtype=dtype, seed=7)
    ref = dec.ref(64, 256)
    check(dec.run(64, 256), ref, dtype)
    for tile_n, warps in ((32, 8), (64, 4)):
        check(dec.run(64, 256, use_dot=False, tile_n=tile_n, num_warps=warps), ref, dtype)
        check(dec.run(64, 256, use_dot=False, tile_n=tile_n, num_warps=warps, prefetch=True), ref, dtype)
    check(dec.run(64, 256, prefetch=True, num_stages=1), ref, dtype)
    check(dec.run(64, 256, tile_n=128, num_warps=8, num_stages=3), ref, dtype)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_cuda_graph_decode_follows_new_seq_lens():
    b = Batch([(5000, 1), (2000, 1)], 32, 8, 128, dtype=torch.bfloat16, seed=8)
    out = torch.empty_like(b.query)
    run = lambda: b.run(64, 256, out=out, num_splits=16)  # noqa: E731
    run()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    for lens in ([5001, 2001], [300, 4000]):
        b.seq_lens.copy_(torch.tensor(lens, dtype=torch.int32))
        graph.replay()
        torch.cuda.synchronize()
        check(out, b.ref(64, 256), torch.bfloat16)


@pytest.mark.parametrize("name", ["decode", "mixed"])
def test_vllm_flash_backend_duo_forward(name, monkeypatch):
    """The CUDA backend's duo forward on a vLLM-layout cache ``[num_blocks, Hkv, block_size, 2*D]``: decode-only
    steps through the kernel alone, other steps through FlashAttention on retrieval-head runs (stood in for
    here by the reference, FlashAttention being GPU-only) plus the kernel on streaming heads."""
    import types

    flash = pytest.importorskip("longseq.attention_backends.vllm.flash")
    from longseq.attention_backends.core.duo import StreamingHeadMask
    from longseq.attention_backends.vllm.common import BackendTrace
    from longseq.config import LongSeqConfig

    hq, hkv, d, _bs = 8, 4, 64, 16
    b = Batch(CASES[name], hq, hkv, d, seed=9)
    b.is_streaming = torch.tensor([True, False, True, False], device=DEV)  # two retrieval runs
    kv_cache = torch.cat([b.key_cache, b.value_cache], dim=-1).transpose(1, 2).contiguous()
    impl = object.__new__(flash.LongSeqFlashImpl)
    impl.num_heads, impl.head_size, impl.scale, impl.vllm_flash_attn_version = hq, d, b.scale, 3
    impl.duo = StreamingHeadMask(torch.stack([~b.is_streaming.cpu(), b.is_streaming.cpu()]), 20, 24)
    impl._duo_layer = None
    impl._duo_pattern_rows = [0, 1]  # the two-layer pattern, no sliding-window layers
    impl.score_mods = ScoreMods()  # no soft-cap, no sinks (``_init_techniques`` sets it)
    impl.config = LongSeqConfig()
    impl.trace = BackendTrace("test", impl.config)
    layer = types.SimpleNamespace(layer_name="model.layers.1.self_attn.attn")
    impl._duo_for(layer, torch.device(DEV))
    calls = []

    def fa_reference(q, key_cache, value_cache, out, runs, meta, scale, version, mods):
        calls.append(runs)
        dense = duo_paged_attention_ref(q, key_cache, value_cache, meta.block_table, b.qsl_cpu, meta.seq_lens,
                                        torch.zeros(hkv, dtype=torch.bool), 1, 1, scale, mods=mods)
        for lo, hi in runs:
            out[:, lo * 2 : hi * 2] = dense[:, lo * 2 : hi * 2]

    monkeypatch.setattr(flash, "flash_retrieval_heads", fa_reference)
    t, nr = b.query.shape[0], len(CASES[name])
    step = types.SimpleNamespace(num_actual_tokens=t, num_reqs=nr, block_table=b.block_table, seq_lens=b.seq_lens,
                                 query_start_loc=b.qsl, max_query_len=b.max_query_len)
    meta = types.SimpleNamespace(step=step, block_table=b.block_table, seq_lens=b.seq_lens, query_start_loc=b.qsl,
                                 max_query_len=b.max_query_len, max_seq_len=int(b.seq_lens.max()))
    output = torch.zeros(t + 2, hq * d, dtype=b.query.dtype, device=DEV)  # vLLM pads rows; ours: first t
    query = torch.cat([b.query, torch.randn(2, hq, d, device=DEV)])
    impl._duo_forward(layer, query, kv_cache, meta, output)
    check(output[:t].view(t, hq, d), b.ref(20, 24), torch.float32)
    assert calls == ([] if name == "decode" else [[(1, 2), (3, 4)]])
    assert impl.trace.counts["duo_calls"] == 1
