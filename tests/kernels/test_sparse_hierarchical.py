"""Hierarchical page selection (``kernels/sparse_decode/hierarchical.py``) vs its PyTorch references
(``naive_hierarchical.py``), and the CPU-checkable parts of ``benchmarks/bench_sparse_hierarchical.py``.

Without CUDA the kernels run in Triton's interpreter at tiny shapes (``tests/support/triton_interp.py``, as in
``test_sparse_decode_kernels.py``); the ``gpu``-marked tests add Llama-3.1-8B-sized shapes and CUDA-graph replay.
"""

from __future__ import annotations

import math
import os
import sys

import pytest
import torch

triton = pytest.importorskip("triton")

from paged_tables import scattered_block_table  # noqa: E402
from triton_interp import CUDA, import_kernels, interpreter_env  # noqa: E402

DEV = "cuda" if CUDA else "cpu"
_MODULES = ("page_summary", "radix_topk", "library_topk", "select", "topk_split", "hierarchical")
ps, _, _, sel, _, hi = import_kernels(*(f"longseq.kernels.sparse_decode.{m}" for m in _MODULES))
_interpreter_env = pytest.fixture(autouse=True, scope="module")(interpreter_env)
from longseq.kernels.sparse_decode import naive  # noqa: E402
from longseq.kernels.sparse_decode import naive_hierarchical as nh  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if REPO not in sys.path:  # benchmarks/ is not installed: import it from the checkout
    sys.path.insert(0, REPO)
from benchmarks import bench_sparse_hierarchical as bench  # noqa: E402

FP8 = torch.float8_e4m3fn
gpu = pytest.mark.skipif(not CUDA, reason="needs CUDA")


# --------------------------------------------------------------------------------------------- helpers
class Cache:
    """A paged ``[num_blocks, block_size, Hkv, D]`` key cache full of stale random keys, a shuffled block table
    (junk past each request's blocks) and fresh random keys per request, written through ``write``."""

    def __init__(self, seq_lens, hkv, d, block_size, dtype, seed):
        g = torch.Generator().manual_seed(seed)
        self.g, self.block_size, self.seq_lens_list = g, block_size, list(seq_lens)
        nblk = [math.ceil(s / block_size) for s in seq_lens]
        self.num_blocks = sum(nblk) + 2
        self.key_cache = torch.randn(self.num_blocks, block_size, hkv, d, generator=g).to(dtype)
        self.block_table = scattered_block_table(nblk, self.num_blocks, max(nblk) + 1, g)
        self.seq_lens = torch.tensor(seq_lens, dtype=torch.int32)
        self.keys = [torch.randn(s, hkv, d, generator=g).to(dtype) for s in seq_lens]

    def slots(self, i, start, end):
        pos = torch.arange(start, end)
        return self.block_table[i].long()[pos // self.block_size] * self.block_size + pos % self.block_size

    def write(self, i, start, end):
        s = self.slots(i, start, end)
        self.key_cache[s // self.block_size, s % self.block_size] = self.keys[i][start:end]
        return s


def summaries(c, page_size, sdt, slot_mapping, seed):
    """Page and block summaries of the cache after ``slot_mapping`` was written, by the references, over random
    stale contents (never zeros)."""
    g = torch.Generator().manual_seed(seed)
    hkv, d = c.key_cache.shape[2:]
    pmin, pmax = ps.allocate_page_summary(c.num_blocks, c.block_size, hkv, d, page_size, c.key_cache.dtype, "cpu",
                                          summary_dtype=sdt)
    bmin, bmax = hi.allocate_block_summary(c.num_blocks, hkv, d, sdt, "cpu")
    for t in (pmin, pmax, bmin, bmax):
        t.copy_(torch.randn(t.shape, generator=g).to(sdt))
    naive.update_page_summary_ref(c.key_cache, slot_mapping, pmin, pmax, page_size)
    nh.update_block_summary_ref(pmin, pmax, bmin, bmax, slot_mapping, c.block_size, page_size)
    return pmin, pmax, bmin, bmax


def same(a, b):
    """Equal values (NaN == NaN, -0 == +0), whatever the dtypes."""
    torch.testing.assert_close(a.float().cpu(), b.float().cpu(), rtol=0, atol=0, equal_nan=True)


def to_dev(*ts):
    return [t.to(DEV) for t in ts]


# --------------------------------------------------------------------------------------------- block summaries
@pytest.mark.parametrize("summary", ["cache", "fp8"])
@pytest.mark.parametrize("block_size", [64, 128])
def test_update_block_summary_steps_match_reference(block_size, summary):
    """Prefill chunks with padding, then decode steps; stale page and block summaries everywhere else."""
    page_size, hkv, d, dtype = 8, 2, 16, torch.bfloat16
    sdt = FP8 if summary == "fp8" else dtype
    lens = [block_size + 21, 2 * block_size, 9]
    c = Cache(lens, hkv, d, block_size, dtype, seed=block_size)
    pmin, pmax = ps.allocate_page_summary(c.num_blocks, block_size, hkv, d, page_size, dtype, "cpu",
                                          summary_dtype=sdt)
    bmin, bmax = hi.allocate_block_summary(c.num_blocks, hkv, d, sdt, "cpu")
    for t in (pmin, pmax, bmin, bmax):
        t.copy_((torch.randn(t.shape, generator=c.g) * 3).to(sdt))
    if summary == "fp8":  # out-of-range summaries (NaN) of one request's page must reach its block
        big = int(c.slots(1, 3 * page_size, 3 * page_size + 1))
        c.keys[1][3 * page_size + 2, 0, 5] = 1000.0
    kmin, kmax = (t.clone().to(DEV) for t in (bmin, bmax))
    pad = torch.tensor([-1])
    b1 = 2 * block_size
    steps = [[(0, 0, 40), (1, 0, b1 - 30), (2, 0, 5)], [(0, 40, block_size + 20), (1, b1 - 30, b1), (2, 5, 9)],
             [(0, block_size + 20, block_size + 21)]]
    for step in steps:
        sm = torch.cat([torch.cat([c.write(i, a, e), pad]) for i, a, e in step] + [pad])
        naive.update_page_summary_ref(c.key_cache, sm, pmin, pmax, page_size)
        nh.update_block_summary_ref(pmin, pmax, bmin, bmax, sm, block_size, page_size)
        dpmin, dpmax = to_dev(pmin, pmax)
        hi.update_block_summary(dpmin, dpmax, kmin, kmax, sm.to(DEV), block_size, page_size)
        same(kmin, bmin)
        same(kmax, bmax)
    # Independent of the reference: a block's summary is the (outward fp8) min/max of exactly its request's keys.
    for i, n in enumerate(lens):
        for j in range(math.ceil(n / block_size)):
            blk = int(c.block_table[i, j])
            keys = c.keys[i][j * block_size : min(n, (j + 1) * block_size)].float()
            same(bmin[blk], naive.round_summary_ref(keys.amin(0), False, sdt))
            same(bmax[blk], naive.round_summary_ref(keys.amax(0), True, sdt))
    if summary == "fp8":
        assert bmax[big // block_size, 0, 5].float().isnan()


def test_update_block_summary_one_program_per_block():
    """A launch that ends mid-block summarizes the block's pages up to its last slot; untouched blocks are not
    written."""
    page_size, block_size, hkv, d = 8, 64, 1, 16
    c = Cache([block_size], hkv, d, block_size, torch.float32, seed=3)
    sm = c.write(0, 0, block_size)
    pmin, pmax, bmin, bmax = summaries(c, page_size, torch.float32, sm, seed=4)
    kmin, kmax = torch.zeros_like(bmin).to(DEV), torch.zeros_like(bmax).to(DEV)
    blk = int(c.block_table[0, 0])
    dp = to_dev(pmin, pmax)
    hi.update_block_summary(*dp, kmin, kmax, sm[:20].to(DEV), block_size, page_size)  # pages 0..2
    same(kmin[blk], pmin[blk * 8 : blk * 8 + 3].amin(0))
    hi.update_block_summary(*dp, kmin, kmax, sm.to(DEV), block_size, page_size)
    same(kmin[blk], bmin[blk])
    same(kmax[blk], bmax[blk])
    others = torch.ones(kmin.shape[0], dtype=torch.bool)
    others[blk] = False
    assert (kmin.cpu()[others] == 0).all(), "untouched blocks are not written"


# --------------------------------------------------------------------------------------------- selection
def build(lens, hq, hkv, d, block_size, page_size, dtype, sdt, seed):
    c = Cache(lens, hkv, d, block_size, dtype, seed)
    sm = torch.cat([c.write(i, 0, n) for i, n in enumerate(lens)])
    c.summ = summaries(c, page_size, sdt, sm, seed + 1)
    c.q = torch.randn(len(lens), hq, d, generator=c.g).to(dtype)
    return c


def select_both(c, page_size, k, nbs, sink, recent):
    args = (c.q, *c.summ, c.block_table, c.seq_lens, page_size, c.block_size, k, nbs, sink, recent)
    ids, nv = hi.select_topk_pages_hierarchical(*to_dev(*args[:7]), *args[7:])
    rids, rnv = nh.select_topk_pages_hierarchical_ref(*args)
    return ids.cpu(), nv.cpu(), rids, rnv


@pytest.mark.parametrize("summary,dtype", [("cache", torch.float32), ("cache", torch.bfloat16), ("fp8", torch.bfloat16)])
@pytest.mark.parametrize("block_size", [64, 128])
def test_select_hierarchical_matches_reference(block_size, summary, dtype):
    """Requests shorter than the budget, exactly at it, at block boundaries, with a partial last block, empty;
    3 of the 5 blocks kept are forced (sink, recent), 2 chosen by score."""
    page_size, k, sink, recent, nbs = 8, 12, 1, 2, 5
    ppb = block_size // page_size
    lens = [40, k * page_size, 6 * block_size, 8 * block_size + 13, 1, 0]
    c = build(lens, 4, 2, 32, block_size, page_size, dtype, FP8 if summary == "fp8" else dtype, seed=block_size)
    ids, nv, rids, rnv = select_both(c, page_size, k, nbs, sink, recent)
    assert ids.dtype == torch.int32 and nv.dtype == torch.int32 and ids.shape == rids.shape == (6, 2, k)
    assert torch.equal(nv, rnv) and torch.equal(ids, rids)
    for b, n in enumerate(lens):
        n_pages = math.ceil(n / page_size)
        for h in range(2):
            row = ids[b, h]
            m = int((row >= 0).sum())
            assert m == min(k, n_pages) and (row[m:] == -1).all()
            assert m == 0 or (row[1:m] > row[: m - 1]).all(), "ascending"
            need = set(range(min(sink, n_pages))) | set(range(max(n_pages - recent, 0), n_pages))
            assert need <= set(row.tolist())
            if n_pages > k:  # the pages come from at most nbs blocks
                assert len({p // ppb for p in row.tolist()}) <= nbs


def test_select_hierarchical_short_blocks():
    """Blocks that cannot fill the budget (nbs * ppb < num_select + ppb - 1): the chosen blocks' live pages,
    fewer than num_valid when the partial last block is among them."""
    page_size, block_size, k, nbs = 8, 64, 16, 2
    lens = [4 * block_size + 9, 3 * block_size]
    c = build(lens, 4, 2, 32, block_size, page_size, torch.float32, torch.float32, seed=7)
    ids, nv, rids, rnv = select_both(c, page_size, k, nbs, 0, 1)
    assert torch.equal(nv, rnv) and torch.equal(ids, rids)
    assert ((ids[0] >= 0).sum(-1) == 10).all()  # the last block (2 live pages) is forced: 8 + 2 pages
    assert ((ids[1] >= 0).sum(-1) == 16).all()


@pytest.mark.parametrize("summary", ["cache", "fp8"])
@pytest.mark.parametrize("block_size", [64, 128])
def test_all_blocks_equals_flat_selection(block_size, summary):
    """Keeping every block, the hierarchical selection is the flat one (tie-free inputs)."""
    page_size, k, sink, recent = 8, 10, 1, 3
    lens = [5 * block_size + 17, 2 * block_size, 50]
    sdt = FP8 if summary == "fp8" else torch.float32
    c = build(lens, 4, 2, 32, block_size, page_size, torch.float32, sdt, seed=block_size + 1)
    nbs = c.block_table.shape[1]
    ids, nv, rids, _ = select_both(c, page_size, k, nbs, sink, recent)
    flat, fnv = naive.select_topk_pages_ref(c.q, c.summ[0], c.summ[1], c.block_table, c.seq_lens, page_size,
                                            block_size, k, sink, recent)
    assert torch.equal(ids, rids) and torch.equal(nv, fnv)
    for b in range(len(lens)):
        for h in range(2):
            assert set(ids[b, h].tolist()) == set(flat[b, h].tolist())


def test_coarse_forced_blocks_cover_forced_pages():
    for ppb in (1, 4, 8, 16):
        for s in range(20):
            for r in range(20):
                sb, rb = nh.coarse_forced_blocks(s, r, ppb)
                assert sb * ppb >= s and (sb - 1) * ppb < s
                for n in range(max(r, 1), 80):  # the blocks of pages n-r .. n-1 are the last rb of ceil(n/ppb)
                    nb = -(-n // ppb)
                    if r:
                        assert (n - r) // ppb >= nb - rb


# --------------------------------------------------------------------------------------------- benchmark helpers
def test_bench_args_and_helpers():
    args = bench.parse_args([])
    assert args.cases == [(129024, 1), (32768, 8)] and args.block_sizes == [128, 64] and args.num_select == 256
    args = bench.parse_args(["--cases", "4096x2", "--blocks-select", "8,16", "--block-sizes", "64"])
    assert args.cases == [(4096, 2)] and args.blocks_select == [8, 16] and args.block_sizes == [64]
    assert bench.valid_blocks_select([16, 32, 64], 256, 8, 2) == [32, 64]
    assert bench.valid_blocks_select([16, 32, 64], 256, 16, 2) == [16, 32, 64]
    f = torch.tensor([[[1, 4, 7, -1]], [[0, 2, -1, -1]]])
    h = torch.tensor([[[4, 7, 9, 10]], [[2, 3, -1, -1]]])
    assert bench.recall(f, f) == 1.0 and bench.recall(f, h) == pytest.approx(3 / 5)
    assert bench.recall(torch.full((1, 1, 3), -1), h[:1]) == 1.0
    x = bench.ar1_walk(4000, 3, 50.0, torch.Generator().manual_seed(0))
    assert abs(float(x.std()) - 1.0) < 0.25
    lag1 = float((x[1:] * x[:-1]).mean() / (x * x).mean())
    assert lag1 > 0.95  # smooth: neighbours nearly equal


def test_bench_inputs_and_recall_on_cpu():
    """The benchmark's cache (references on CPU): summaries consistent with the keys, needles found by the flat
    selection, and recall 1 when every block is kept."""
    ctx, batch, hq, hkv, d, bs, p, k = 512, 2, 4, 2, 32, 64, 8, 8
    inp = bench.Inputs(ctx, batch, hq, hkv, d, bs, p, torch.float32, FP8, 32.0, 2, seed=0)
    assert not inp.key_cache.isnan().any()
    used = inp.block_table.reshape(-1).long()
    pm = inp.page_min.float().view(inp.num_blocks, bs // p, hkv, d)[used]
    same(pm.amin(1), inp.block_min.float()[used])
    for b in range(batch):  # page summaries hold the request's keys
        keys = inp.key_cache.view(-1, hkv, d)[inp.slots.view(batch, ctx)[b]]
        gp = inp.slots.view(batch, ctx)[b, ::p] // p
        assert (inp.page_min.float()[gp] <= keys.view(-1, p, hkv, d).amin(1)).all()
    args = (inp.q, inp.page_min, inp.page_max, inp.block_table, inp.seq_lens, p, bs, k, 1, 1)
    flat, _ = naive.select_topk_pages_ref(*args)
    assert bench.planted_recall(flat, inp.planted_pages) == 1.0
    nb_all = inp.block_table.shape[1]
    for nbs, expect_all in ((nb_all, True), (2, False)):
        ids, _ = nh.select_topk_pages_hierarchical_ref(inp.q, inp.page_min, inp.page_max, inp.block_min,
                                                       inp.block_max, inp.block_table, inp.seq_lens, p, bs, k, nbs,
                                                       1, 1)
        r = bench.recall(flat, ids)
        assert (r == 1.0) if expect_all else (0.0 <= r <= 1.0)


# --------------------------------------------------------------------------------------------- GPU only
@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("block_size,nbs", [(128, 16), (128, 64), (64, 32), (64, 64)])
@pytest.mark.parametrize("summary", ["fp8", "cache"])
def test_llama_sized_hierarchical(block_size, nbs, summary):
    page_size, k, hq, hkv, d = 8, 256, 32, 8, 128
    lens = [32768 + 5, 9000, 2000, 1024 * 2 + 3]
    dtype = torch.bfloat16
    c = build(lens, hq, hkv, d, block_size, page_size, dtype, FP8 if summary == "fp8" else dtype, seed=nbs)
    # Block summaries of the whole prefill in one launch vs the reference.
    pmin, pmax, bmin, bmax = to_dev(*c.summ)
    sm = torch.cat([c.slots(i, 0, n) for i, n in enumerate(lens)]).to(DEV)
    kmin, kmax = (torch.full(bmin.shape, float("nan"), device=DEV).to(bmin.dtype) for _ in range(2))
    hi.update_block_summary(pmin, pmax, kmin, kmax, sm, block_size, page_size)
    touched = torch.unique(sm // block_size)
    same(kmin[touched], bmin[touched])
    same(kmax[touched], bmax[touched])
    ids, nv, rids, rnv = select_both(c, page_size, k, nbs, 1, 4)
    assert torch.equal(nv, rnv)
    # Scores agree to float rounding only: compare as sets, allowing a swap of near-equal pages.
    for b in range(len(lens)):
        for h in range(hkv):
            a, r = set(ids[b, h].tolist()), set(rids[b, h].tolist())
            assert len(a ^ r) <= 2, (b, h, sorted(a ^ r))


@pytest.mark.gpu
@gpu
def test_hierarchical_cuda_graph_replay_follows_new_inputs():
    page_size, block_size, k, nbs, hq, hkv, d = 8, 128, 64, 16, 32, 8, 128
    lens = [6000, 3000]
    c = build(lens, hq, hkv, d, block_size, page_size, torch.bfloat16, FP8, seed=2)
    pmin, pmax, bmin, bmax = to_dev(*c.summ)
    q, seq_lens, bt = c.q.to(DEV), c.seq_lens.to(DEV), c.block_table.to(DEV)
    slot = torch.tensor([int(c.slots(0, 5999, 6000)), -1], device=DEV)

    def step():
        hi.update_block_summary(pmin, pmax, bmin, bmax, slot, block_size, page_size)
        return hi.select_topk_pages_hierarchical(q, pmin, pmax, bmin, bmax, bt, seq_lens, page_size, block_size, k,
                                                 nbs, 1, 4)

    step()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ids_g, nv_g = step()
    for trial in range(3):
        q.copy_(torch.randn(q.shape, device=DEV).to(q.dtype))
        seq_lens.copy_(torch.tensor([6000 - 300 * trial, 3000 - 7 * trial]))
        graph.replay()
        torch.cuda.synchronize()
        ref, rnv = nh.select_topk_pages_hierarchical_ref(q, pmin, pmax, bmin, bmax, bt, seq_lens, page_size,
                                                         block_size, k, nbs, 1, 4)
        assert torch.equal(nv_g.cpu(), rnv.cpu())
        for b in range(2):
            for h in range(hkv):
                a, r = set(ids_g[b, h].tolist()), set(ref[b, h].tolist())
                assert len(a ^ r) <= 2
