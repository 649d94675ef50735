"""Quest sparse-decode Triton kernels vs their PyTorch references (longseq.kernels.sparse_decode.naive).

Without CUDA the kernels run in Triton's interpreter at small shapes: TRITON_INTERPRET=1 is set while the
kernel modules are imported (``triton.jit`` decides at decoration time) and while this module's tests run
(the interpreter reads it at run time too), and restored after, so other modules' subprocesses never see it; with CUDA the same
tests run natively, and the ``gpu``-marked ones add Llama-3.1-8B-sized shapes and CUDA-graph capture.
"""

from __future__ import annotations

import math

import pytest
import torch

triton = pytest.importorskip("triton")

from paged_tables import scattered_block_table  # noqa: E402
from triton_interp import CUDA, import_kernels, interpreter_env  # noqa: E402

DEV = "cuda" if CUDA else "cpu"

# The sparse_decode package with its kernels interpreted when there is no GPU (see tests/support/triton_interp.py).
_SPARSE_MODULES = ("page_summary", "radix_topk", "select", "topk_split", "decode")
sd = import_kernels(*(f"longseq.kernels.sparse_decode.{m}" for m in _SPARSE_MODULES), "longseq.kernels.sparse_decode")[-1]
_interpreter_env = pytest.fixture(autouse=True, scope="module")(interpreter_env)
from longseq.kernels.paged_attention import paged_attention_naive  # noqa: E402
from longseq.kernels.score_mods import ScoreMods  # noqa: E402
from longseq.kernels.sparse_decode import naive  # noqa: E402


# --------------------------------------------------------------------------------------------- helpers
class Cache:
    """A paged cache filled with stale random keys (block reuse), a shuffled block table per request, and
    each request's tokens written through ``slot_mapping``."""

    def __init__(self, seq_lens, hkv, d, block_size, dtype, seed, layout="flash", spare_blocks=3):
        g = torch.Generator().manual_seed(seed)
        self.g, self.hkv, self.d, self.block_size, self.dtype = g, hkv, d, block_size, dtype
        self.seq_lens_list = list(seq_lens)
        nblk = [math.ceil(s / block_size) for s in seq_lens]
        max_blocks = max(nblk) + 1  # one unused column: table entries past a request's blocks are junk
        self.num_blocks = sum(nblk) + spare_blocks
        if layout == "flash":  # vLLM CUDA: [num_blocks, block_size, Hkv, D] contiguous, K and V in one tensor
            kv = torch.randn(2, self.num_blocks, block_size, hkv, d, generator=g).to(dtype)
            self.key_cache, self.value_cache = kv[0], kv[1]
        else:  # our CPU cache: [num_blocks, Hkv, 2 * block_size, D], permuted to the logical order
            kv = torch.randn(self.num_blocks, hkv, 2 * block_size, d, generator=g).to(dtype)
            k, v = kv.chunk(2, dim=2)
            self.key_cache, self.value_cache = k.permute(0, 2, 1, 3), v.permute(0, 2, 1, 3)
        self.block_table = scattered_block_table(nblk, self.num_blocks, max_blocks, g)
        self.seq_lens = torch.tensor(seq_lens, dtype=torch.int32)
        # Fresh keys/values per request, written over the stale cache contents.
        self.keys = [torch.randn(s, hkv, d, generator=g).to(dtype) for s in seq_lens]
        self.values = [torch.randn(s, hkv, d, generator=g).to(dtype) for s in seq_lens]

    def slots(self, i, start, end):
        pos = torch.arange(start, end, device=self.block_table.device)
        return self.block_table[i].long()[pos // self.block_size] * self.block_size + pos % self.block_size

    def write(self, i, start, end):
        s = self.slots(i, start, end)
        blk, off = s // self.block_size, s % self.block_size
        self.key_cache[blk, off] = self.keys[i][start:end]
        self.value_cache[blk, off] = self.values[i][start:end]
        return s

    def write_all(self):
        return torch.cat([self.write(i, 0, n) for i, n in enumerate(self.seq_lens_list)])

    def to(self, dev):
        for name in ("key_cache", "value_cache", "block_table", "seq_lens"):
            setattr(self, name, getattr(self, name).to(dev))
        return self


FP8 = torch.float8_e4m3fn
SUMMARY_DTYPES = ["cache", "fp8"]


def summary_dtype(name, cache_dtype):
    return FP8 if name == "fp8" else cache_dtype


def summaries(cache, page_size, dev=DEV, summary="cache"):
    """Summaries of a fully written cache, by the reference (the kernel has its own tests; the
    interpreter would take a program per token here). Pages never written stay NaN."""
    pmin, pmax = sd.allocate_page_summary(cache.num_blocks, cache.block_size, cache.hkv, cache.d, page_size,
                                          cache.dtype, dev, summary_dtype=summary_dtype(summary, cache.dtype))
    pmin.fill_(float("nan"))
    pmax.fill_(float("nan"))
    naive.update_page_summary_ref(cache.key_cache, cache.slot_mapping, pmin, pmax, page_size)
    return pmin, pmax


def build(seq_lens, hq, hkv, d, block_size, page_size, dtype, seed, layout="flash", summary="cache"):
    c = Cache(seq_lens, hkv, d, block_size, dtype, seed, layout)
    c.slot_mapping = c.write_all()
    c.to(DEV)
    c.page_min, c.page_max = summaries(c, page_size, summary=summary)
    c.q = torch.randn(len(seq_lens), hq, d, generator=c.g).to(dtype).to(DEV)
    return c


def same(a, b):
    """Equal values (NaN == NaN, -0 == +0), whatever the dtypes."""
    torch.testing.assert_close(a.float().cpu(), b.float().cpu(), rtol=0, atol=0, equal_nan=True)


def rel_err(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def check_selection(ids, num_valid, scores, seq_lens, page_size, num_select):
    """``ids`` is a correct top-k of ``scores``: right count, ascending, and no unselected valid page
    scores above a selected one (up to rounding), so ties may go either way."""
    ids, scores = ids.cpu().long(), scores.cpu().double()
    for b, s in enumerate(seq_lens.tolist()):
        n = math.ceil(s / page_size)
        k = min(num_select, n)
        assert int(num_valid[b]) == k
        for h in range(ids.shape[1]):
            row = ids[b, h]
            assert (row[k:] == -1).all() and (row[:k] >= 0).all() and (row[:k] < n).all()
            assert k == 0 or (row[1:k] > row[: k - 1]).all(), "ascending and unique"
            chosen = torch.zeros(n, dtype=torch.bool)
            chosen[row[:k]] = True
            sc = scores[b, h, :n]
            if k < n:
                lo, hi = float(sc[chosen].min()), float(sc[~chosen].max())
                tol = 1e-4 * max(1.0, abs(hi)) if math.isfinite(hi) else 0.0
                assert lo >= hi - tol, (b, h, lo, hi)


# --------------------------------------------------------------------------------------------- summaries
@pytest.mark.parametrize("summary", SUMMARY_DTYPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("page_size,layout", [(16, "flash"), (8, "cpu"), (4, "flash")])
def test_update_page_summary_steps_match_reference(dtype, page_size, layout, summary):
    """Prefill chunks with padding, then decode steps, over a cache full of stale keys."""
    block_size, hkv, d = 16, 2, 64
    sdt = summary_dtype(summary, dtype)
    c = Cache([37, 70, 9, 16], hkv, d, block_size, dtype, seed=11 + page_size, layout=layout).to(DEV)
    c.keys = [k.to(DEV) for k in c.keys]
    c.values = [v.to(DEV) for v in c.values]
    pmin, pmax = sd.allocate_page_summary(c.num_blocks, block_size, hkv, d, page_size, dtype, DEV,
                                          summary_dtype=sdt)
    assert pmin.dtype == pmax.dtype == sdt and pmin.shape == (c.num_blocks * block_size // page_size, hkv, d)
    pmin.copy_(torch.randn(pmin.shape, generator=c.g).to(sdt))
    pmax.copy_(torch.randn(pmax.shape, generator=c.g).to(sdt))
    rmin, rmax = pmin.clone(), pmax.clone()
    pad = torch.tensor([-1], device=DEV)
    # (request, start, end) per step; decode steps write one token, prefill steps chunks.
    steps = [[(0, 0, 20), (1, 0, 33), (2, 0, 9)], [(0, 20, 36), (1, 33, 66), (3, 0, 16)],
             [(0, 36, 37), (1, 66, 67)], [(1, 67, 68)], [(1, 68, 70)]]
    for step in steps:
        sm = torch.cat([torch.cat([c.write(i, a, e).to(DEV), pad]) for i, a, e in step] + [pad, pad])
        sd.update_page_summary(c.key_cache, sm, pmin, pmax, page_size)
        naive.update_page_summary_ref(c.key_cache, sm, rmin, rmax, page_size)
        same(pmin, rmin)
        same(pmax, rmax)
    # Independent of the reference: each page's summary is the min/max of exactly its request's keys
    # (fp8: the nearest fp8 values outward, within one fp8 step).
    for i, n in enumerate(c.seq_lens_list):
        for j in range(math.ceil(n / page_size)):
            gp = int(c.slots(i, j * page_size, j * page_size + 1)) // page_size
            keys = c.keys[i][j * page_size : (j + 1) * page_size].float()
            lo, hi = pmin[gp].float(), pmax[gp].float()
            if summary == "fp8":
                assert (lo <= keys.amin(0)).all() and (hi >= keys.amax(0)).all()
                assert ((keys.amin(0) - lo) <= keys.amin(0).abs() / 8 + 2**-9).all()
                assert ((hi - keys.amax(0)) <= keys.amax(0).abs() / 8 + 2**-9).all()
            else:
                assert torch.equal(lo, keys.amin(0)) and torch.equal(hi, keys.amax(0))


def test_fp8_summary_rounds_outward_at_the_edges():
    """Exact fp8 values stay, others step outward; subnormals, zeros, +-448 and out-of-range (NaN)."""
    vals = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(FP8).float()
    vals = vals[~vals.isnan()]
    edge = torch.tensor([448.0, 449.0, 479.0, 480.0, 1e6, -448.0, -449.0, -1e6, 0.0, -0.0, 1e-30, -1e-30,
                         2.0**-9, 2.0**-10, -(2.0**-10), 0.0019, 2.0**-6, 0.0157, 3.3e38])
    x = torch.cat([vals, vals * 1.01, vals * 0.99, vals + 1e-6, vals - 1e-6, edge,
                   torch.randn(400, generator=torch.Generator().manual_seed(0)) * 30])
    # One "page" per key row: a block of 1 token per page, so min == max == the value itself.
    n, d = x.numel(), 16
    x = torch.nn.functional.pad(x, (0, (-n) % d)).view(-1, 1, 1, d)  # [pages, 1 token, 1 head, D]
    key_cache = x.to(DEV)
    slots = torch.arange(x.shape[0], device=DEV)
    pmin, pmax = sd.allocate_page_summary(x.shape[0], 1, 1, d, 1, torch.float32, DEV, summary_dtype=FP8)
    sd.update_page_summary(key_cache, slots, pmin, pmax, 1)
    xs = x.view(-1, 1, d)
    same(pmin, naive.round_summary_ref(xs, False, FP8))
    same(pmax, naive.round_summary_ref(xs, True, FP8))
    lo, hi = pmin.float().cpu(), pmax.float().cpu()
    assert (lo[~lo.isnan()] <= xs[~lo.isnan()]).all() and (hi[~hi.isnan()] >= xs[~hi.isnan()]).all()
    assert hi[xs > 448].isnan().all() and lo[xs < -448].isnan().all()
    assert (hi[xs < -448] == -448).all() and (lo[xs > 448] == 448).all()


# --------------------------------------------------------------------------------------------- scoring
@pytest.mark.parametrize("summary", SUMMARY_DTYPES)
@pytest.mark.parametrize("hq,hkv,d", [(2, 2, 64), (8, 2, 128), (16, 2, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("group_max", [False, True])
def test_score_pages_matches_reference(hq, hkv, d, dtype, summary, group_max):
    c = build([130, 7, 64, 33], hq, hkv, d, 16, 8, dtype, seed=hq * 7 + d, summary=summary)
    args = (c.q, c.page_min, c.page_max, c.block_table, c.seq_lens, 8, 16, 2, 3)
    got = sd.score_pages(*args, group_max=group_max).cpu()
    ref = naive.score_pages_ref(*args, group_max=group_max).cpu()
    assert torch.equal(torch.isposinf(got), torch.isposinf(ref))
    assert torch.equal(torch.isneginf(got), torch.isneginf(ref))
    fin = torch.isfinite(ref)
    torch.testing.assert_close(got[fin], ref[fin], rtol=1e-5, atol=1e-4 * float(ref[fin].abs().max()))


@pytest.mark.parametrize("summary", SUMMARY_DTYPES)
@pytest.mark.parametrize("hq,hkv", [(4, 4), (8, 2)])
def test_quest_bound_upper_bounds_every_token(hq, hkv, summary):
    """The score bounds every token's (group-summed) q . k, and the group-max score every head's own q . k;
    with fp8 summaries too, including keys of all magnitudes and pages with keys past fp8's range (+inf)."""
    d, page_size, block_size = 64, 8, 16
    c = Cache([100, 45], hkv, d, block_size, torch.float32, seed=5)
    big_pages = {(0, 3), (1, 5)}
    if summary == "fp8":
        for b, keys in enumerate(c.keys):  # magnitudes from 1e-3 to 1e2 per page, two pages past 448
            for j in range(math.ceil(keys.shape[0] / page_size)):
                keys[j * page_size : (j + 1) * page_size] *= 10.0 ** ((j % 6) - 3)
            for bb, j in big_pages:
                if bb == b:
                    keys[j * page_size + 2, 0, 5] = 600.0 if b == 0 else -1000.0
    c.slot_mapping = c.write_all()
    c.to(DEV)
    pmin, pmax = summaries(c, page_size, summary=summary)
    q = torch.randn(2, hq, d, generator=c.g).to(DEV)
    scores = sd.score_pages(q, pmin, pmax, c.block_table, c.seq_lens, page_size, block_size).cpu()
    per_head_max = sd.score_pages(q, pmin, pmax, c.block_table, c.seq_lens, page_size, block_size,
                                  group_max=True).cpu()
    g = hq // hkv
    for b, n in enumerate(c.seq_lens_list):
        # group max: the bound holds for every query head of the group on its own
        head_dots = torch.einsum("thd,hgd->hgt", c.keys[b].double(), q[b].cpu().double().view(hkv, g, d))
        for j in range(math.ceil(n / page_size)):
            top = head_dots[:, :, j * page_size : (j + 1) * page_size].amax((1, 2))
            bound = per_head_max[b, :, j].double()
            assert (top <= bound + 1e-4 * bound.abs().clamp_min(1)).all()
        qb = q[b].cpu().double().view(hkv, g, d).sum(1)  # the group's summed q . k is what is bounded
        dots = torch.einsum("thd,hd->ht", c.keys[b].double(), qb)  # [Hkv, n]
        for j in range(math.ceil(n / page_size)):
            page_dots = dots[:, j * page_size : (j + 1) * page_size]
            bound = scores[b, :, j].double()
            assert (page_dots.max(1).values <= bound + 1e-4 * bound.abs().clamp_min(1)).all()
            if summary == "fp8" and (b, j) in big_pages:
                assert bound[0] == float("inf")
            else:
                assert torch.isfinite(bound).all()


# --------------------------------------------------------------------------------------------- top-k
# select_topk_pages variants: torch top-k; triton unfused / fused (one launch), over whole rows (cap 0) and
# with the group-max candidate filter (cap 64; rows overflowing the cap: test_fused_select_clustered_scores).
SELECT_VARIANTS = {
    "torch": dict(topk_impl="torch"),
    "triton": dict(topk_impl="triton", fused=False, candidate_cap=0),
    "fused": dict(topk_impl="triton", fused=True, candidate_cap=0),
    "filter": dict(topk_impl="triton", fused=False, candidate_cap=64),
    "fused-filter": dict(topk_impl="triton", fused=True, candidate_cap=64),
}


def counters_are_zero():
    """The fused kernels leave their per-row counters at zero for the next launch."""
    buf = sd.select.counters(torch.device(DEV), 1)
    return int(buf.abs().sum()) == 0


@pytest.mark.parametrize("variant", ["triton", "fused-filter"])
def test_group_max_selection_matches_reference(variant):
    """LONGSEQ_SPARSE_GROUP_SCORE=max through the unfused and the fused (score + select) launches."""
    page_size, block_size, k = 8, 16, 6
    c = build([150, 30, 81, 0], 9, 3, 64, block_size, page_size, torch.float32, seed=11)
    args = (c.q, c.page_min, c.page_max, c.block_table, c.seq_lens, page_size, block_size, k, 1, 2)
    ids, nv = sd.select_topk_pages(*args, **SELECT_VARIANTS[variant], group_max=True)
    rids, rnv = naive.select_topk_pages_ref(*args, group_max=True)
    assert torch.equal(nv.cpu(), rnv.cpu()) and torch.equal(ids.cpu(), rids.cpu())
    assert not torch.equal(rids, naive.select_topk_pages_ref(*args)[0])  # the sum picks other pages here


@pytest.mark.parametrize("hq,hkv,d", [(4, 4, 64), (8, 2, 128), (16, 2, 64)])
@pytest.mark.parametrize("variant", list(SELECT_VARIANTS))
def test_select_topk_pages_matches_reference(hq, hkv, d, variant):
    # Budget 6 pages of 8 tokens: requests shorter than the budget, one exactly at it, longer ones, and an
    # empty one (a padded batch slot under CUDA graphs: no page, num_valid 0).
    page_size, block_size, k = 8, 16, 6
    c = build([150, 30, 48, 81, 1, 0], hq, hkv, d, block_size, page_size, torch.float32, seed=hq + d)
    args = (c.q, c.page_min, c.page_max, c.block_table, c.seq_lens, page_size, block_size, k, 1, 2)
    ids, nv = sd.select_topk_pages(*args, **SELECT_VARIANTS[variant])
    rids, rnv = naive.select_topk_pages_ref(*args)
    assert ids.dtype == torch.int32 and nv.dtype == torch.int32 and ids.shape == rids.shape
    assert torch.equal(nv.cpu(), rnv.cpu())
    scores = naive.score_pages_ref(*args[:7], 1, 2)
    check_selection(ids, nv, scores, c.seq_lens, page_size, k)
    assert torch.equal(ids.cpu(), rids.cpu())  # continuous random scores: no ties
    for b, n in enumerate(c.seq_lens_list):  # sink page 0 and the last 2 pages always in
        n_pages = math.ceil(n / page_size)
        need = set(range(min(1, n_pages))) | set(range(max(n_pages - 2, 0), n_pages))
        for h in range(hkv):
            assert need <= set(ids[b, h].tolist())
    assert counters_are_zero()


@pytest.mark.parametrize("max_pages,k", [(300, 17), (64, 64), (1000, 1), (1000, 40)])
def test_topk_with_ties_and_extremes(max_pages, k):
    """Integer-valued scores (many ties), negative and positive, +inf forced pages: a valid top-k."""
    g = torch.Generator().manual_seed(max_pages + k)
    bsz, hkv, page_size = 3, 2, 16
    scores = torch.randint(-5, 5, (bsz, hkv, max_pages), generator=g).float() * 0.5
    scores[:, :, 3] = float("inf")
    scores[0, 0, :20] = -1e30
    scores[1] -= 10.0  # every score negative: the threshold's top byte is below the sign flip
    scores[2, 1, 50:] = torch.randn(max_pages - 50, generator=g)  # a row without ties
    seq_lens = torch.tensor([max_pages * page_size, 40 * page_size - 3, 5], dtype=torch.int32)
    for b, s in enumerate(seq_lens.tolist()):
        scores[b, :, math.ceil(s / page_size) :] = float("-inf")
    for impl, cap in (("triton", None), ("triton", 0), ("triton", 128), ("torch", None)):
        ids, nv = sd.topk_pages(scores.to(DEV), seq_lens.to(DEV), page_size, k, impl=impl, candidate_cap=cap)
        check_selection(ids, nv, scores, seq_lens, page_size, k)


@pytest.mark.parametrize("k", [5, 50, 128])
@pytest.mark.parametrize("cap", [256, 1024])
@pytest.mark.parametrize("seg", [0, 512])
def test_topk_candidate_filter_is_exact(k, cap, seg):
    """Long rows of continuous scores: the filtered select equals torch.topk, whether the candidates fit
    (random rows) or not (sorted rows: the top pages fill whole groups, so the group-max bound is loose and
    the full-row fallback runs), at every row length and with the sink/recent +inf pages."""
    g = torch.Generator().manual_seed(k + cap)
    bsz, hkv, max_pages, page_size = 3, 4, 3000, 16
    scores = torch.randn(bsz, hkv, max_pages, generator=g) * 3 + 40
    scores[1] = scores[1].sort(dim=-1).values  # clustered: ascending pages
    scores[:, :, :1] = float("inf")
    seq_lens = torch.tensor([max_pages * page_size, 2000 * page_size - 7, 60 * page_size], dtype=torch.int32)
    for b, s in enumerate(seq_lens.tolist()):
        n = math.ceil(s / page_size)
        scores[b, :, n - 4 : n] = float("inf")
        scores[b, :, n:] = float("-inf")
    ids, nv = sd.topk_pages(scores.to(DEV), seq_lens.to(DEV), page_size, k, impl="triton", candidate_cap=cap,
                            segment_pages=seg)
    rids, rnv = sd.topk_pages(scores, seq_lens, page_size, k, impl="torch")
    check_selection(ids, nv, scores, seq_lens, page_size, k)
    assert torch.equal(ids.cpu(), rids) and torch.equal(nv.cpu(), rnv)


@pytest.mark.parametrize("k", [40, 128])
@pytest.mark.parametrize("seg", [0, 256])
def test_topk_many_equal_scores_takes_the_tie_path(k, seg):
    """Rows where most scores are equal (summaries rounded to the same few fp8 values do this): more candidates
    than the cap but fewer than k pages above the bound. The selection must equal the whole-row select's
    (larger pages first, then the first equal pages), row by row, with and without a few distinct scores."""
    g = torch.Generator().manual_seed(k)
    bsz, hkv, max_pages, page_size = 3, 2, 3000, 16
    scores = torch.full((bsz, hkv, max_pages), 0.25)
    scores[0, 0, torch.randperm(max_pages, generator=g)[:10]] = 3.0  # 10 above the tie
    scores[1, 1, torch.randperm(max_pages, generator=g)[:k + 5]] = torch.randn(k + 5, generator=g) + 5  # >= k above
    scores[:, :, 0] = float("inf")
    seq_lens = torch.tensor([max_pages * page_size, 2500 * page_size - 3, 900 * page_size], dtype=torch.int32)
    for b, sl in enumerate(seq_lens.tolist()):
        scores[b, :, math.ceil(sl / page_size):] = float("-inf")
    ids, nv = sd.topk_pages(scores.to(DEV), seq_lens.to(DEV), page_size, k, impl="triton", candidate_cap=256,
                            segment_pages=seg)
    full, fnv = sd.topk_pages(scores.to(DEV), seq_lens.to(DEV), page_size, k, impl="triton", candidate_cap=0,
                              segment_pages=0)
    check_selection(ids, nv, scores, seq_lens, page_size, k)
    assert torch.equal(ids.cpu(), full.cpu()) and torch.equal(nv.cpu(), fnv.cpu())


@pytest.mark.parametrize("seg", [256, 512])
def test_split_topk_equals_the_one_program_select(seg):
    """Rows split over segments (several programs per row, then a merge) pick exactly the pages the one-program
    select picks, ties included: integer scores (many ties across segment borders), a row shorter than one
    segment, rows ending mid-segment, num_select above a row's live pages, +inf forced pages, all-negative rows."""
    g = torch.Generator().manual_seed(seg)
    bsz, hkv, max_pages, page_size, k = 4, 2, 1800, 16, 100
    scores = torch.randint(-6, 6, (bsz, hkv, max_pages), generator=g).float() * 0.25
    scores[0, 1] = torch.randn(max_pages, generator=g)  # continuous, no ties
    scores[1] -= 50.0
    scores[:, :, 0] = float("inf")
    seq_lens = torch.tensor([max_pages * page_size, (seg + 37) * page_size - 5, 90 * page_size, 1000 * page_size + 1],
                            dtype=torch.int32)
    for b, sl in enumerate(seq_lens.tolist()):
        n = math.ceil(sl / page_size)
        scores[b, :, max(n - 3, 1):n] = float("inf")
        scores[b, :, n:] = float("-inf")
    assert sd.topk_split.split_applies(max_pages, k, seg)
    assert sd.topk_split.split_applies(8192, 128, None, 8) and not sd.topk_split.split_applies(8192, 128, None, 64)
    assert not sd.topk_split.split_applies(2048, 128, None, 8)  # rows of at most two segments: one program
    # LONGSEQ_SPARSE_TOPK_SPLIT_ROWS moves the row threshold; 0 never splits
    assert sd.topk_split.split_applies(8192, 128, None, 64, 128) and not sd.topk_split.split_applies(8192, 128, None, 8, 0)
    ids, nv = sd.topk_pages(scores.to(DEV), seq_lens.to(DEV), page_size, k, impl="triton", segment_pages=seg)
    one, onv = sd.topk_pages(scores.to(DEV), seq_lens.to(DEV), page_size, k, impl="triton", segment_pages=0)
    check_selection(ids, nv, scores, seq_lens, page_size, k)
    assert torch.equal(ids.cpu(), one.cpu()) and torch.equal(nv.cpu(), onv.cpu())
    # The merge done by each row's last segment program (one launch): same pages, counters left at zero.
    fids, fnv = sd.topk_split.topk_pages_split(scores.to(DEV), seq_lens.to(DEV), page_size, k, segment_pages=seg,
                                               fused_merge=True)
    assert torch.equal(fids.cpu(), one.cpu()) and torch.equal(fnv.cpu(), onv.cpu())
    assert counters_are_zero()
    with pytest.raises(ValueError, match="segment_pages must be a power of two"):
        sd.topk_split.topk_pages_split(scores.to(DEV), seq_lens.to(DEV), page_size, k, segment_pages=128)


@pytest.mark.parametrize("cap", [32, 64])
def test_fused_select_clustered_scores(cap):
    """Page scores rising with the page index: the top pages fill whole groups, so the group-max bound lets
    through 64 candidates: over a cap of 32 (the fused kernel's full-row fallback), within a cap of 64."""
    hq, hkv, d, page_size, block_size, k = 4, 2, 32, 16, 16, 16
    c = Cache([2048, 2000], hkv, d, block_size, torch.float32, seed=4)
    q = torch.randn(2, hq, d, generator=c.g)
    for b, keys in enumerate(c.keys):
        u = q[b].view(hkv, hq // hkv, d).sum(1)  # [Hkv, D]: keys along the group query: score ~ page index
        j = torch.arange(keys.shape[0]) // page_size
        keys[:] = (1.0 + j / 128.0)[:, None, None] * u[None]
    c.slot_mapping = c.write_all()
    c.to(DEV)
    pmin, pmax = summaries(c, page_size)
    args = (q.to(DEV), pmin, pmax, c.block_table, c.seq_lens, page_size, block_size, k)
    ids, nv = sd.select_topk_pages(*args, fused=True, candidate_cap=cap, topk_num_warps=1)
    rids, rnv = naive.select_topk_pages_ref(*args)
    assert torch.equal(ids.cpu(), rids.cpu()) and torch.equal(nv.cpu(), rnv.cpu()) and counters_are_zero()
    n = math.ceil(2000 / page_size)
    assert ids[1, 0].tolist() == list(range(n - k, n))


@pytest.mark.parametrize("summary", SUMMARY_DTYPES)
def test_needle_pages_are_recalled(summary):
    """Random keys plus needle pages whose keys point along the group's query: >= 95% are selected, with exact
    and with fp8 summaries."""
    hq, hkv, d, page_size, block_size = 8, 2, 64, 16, 16
    seq_lens = [2048, 1500]
    num_needles, k = 6, 16
    c = Cache(seq_lens, hkv, d, block_size, torch.float32, seed=3)
    g = c.g
    q = torch.randn(len(seq_lens), hq, d, generator=g)
    hits = total = 0
    needles = {}
    for b, n in enumerate(seq_lens):
        n_pages = math.ceil(n / page_size)
        for h in range(hkv):
            u = q[b, h * (hq // hkv) : (h + 1) * (hq // hkv)].sum(0)
            u = u / u.norm()
            # Needles away from the forced sink/recent pages, so only their scores can pick them.
            pages = torch.randperm(n_pages - 8, generator=g)[:num_needles] + 2
            needles[b, h] = set(pages.tolist())
            for j in pages.tolist():
                rows = slice(j * page_size, min((j + 1) * page_size, n))
                m = c.keys[b][rows, h].shape[0]
                c.keys[b][rows, h] = 3.0 * math.sqrt(d) * u + 0.5 * torch.randn(m, d, generator=g)
    c.slot_mapping = c.write_all()
    c.to(DEV)
    pmin, pmax = summaries(c, page_size, summary=summary)
    ids, nv = sd.select_topk_pages(q.to(DEV), pmin, pmax, c.block_table, c.seq_lens, page_size, block_size,
                                   k, num_sink_pages=1, num_recent_pages=4)
    for (b, h), want in needles.items():
        got = set(ids[b, h].tolist())
        hits += len(want & got)
        total += len(want)
    assert hits / total >= 0.95, (hits, total)


# --------------------------------------------------------------------------------------------- decode
DECODE_CASES = [  # hq, hkv, d, dtype, page_size, num_splits
    (4, 4, 64, torch.float32, 16, 1),
    (8, 2, 128, torch.float32, 8, 3),
    (16, 2, 64, torch.float32, 4, None),
    (8, 2, 64, torch.bfloat16, 16, 2),
    (8, 1, 128, torch.float16, 8, None),
    (6, 2, 80, torch.float32, 8, 2),
    (8, 2, 128, torch.float32, 8, 20),  # empty splits; merged two heads at a time (S * D > 4096)
]


@pytest.mark.parametrize("fuse_merge", [True, False])
@pytest.mark.parametrize("hq,hkv,d,dtype,page_size,num_splits", DECODE_CASES)
def test_sparse_paged_decode_matches_reference(hq, hkv, d, dtype, page_size, num_splits, fuse_merge):
    block_size, k = 16, 7
    layout = "cpu" if d == 64 else "flash"
    c = build([100, 30, 57, 1, 0], hq, hkv, d, block_size, page_size, dtype, seed=hq * d + page_size, layout=layout)
    # Random page subsets in random order, -1 padded; ensure the partial last page is often in.
    ids = torch.full((len(c.seq_lens_list), hkv, k), -1, dtype=torch.int32)
    for b, n in enumerate(c.seq_lens_list):
        n_pages = math.ceil(n / page_size)
        for h in range(hkv):
            pick = torch.randperm(n_pages, generator=c.g)[: min(k - 1, n_pages)]
            if (b + h) % 2 == 0:
                pick = torch.cat([pick[pick != n_pages - 1][: k - 2], torch.tensor([n_pages - 1])])
            ids[b, h, : len(pick)] = pick.to(torch.int32)
            ids[b, h] = ids[b, h][torch.randperm(k, generator=c.g)]
    ids = ids.to(DEV)
    scale = d ** -0.5
    out = torch.full_like(c.q, float("nan"))
    got = sd.sparse_paged_decode(c.q, c.key_cache, c.value_cache, c.block_table, c.seq_lens, ids, page_size,
                                 scale, out=out, num_splits=num_splits, fuse_merge=fuse_merge)
    assert got.data_ptr() == out.data_ptr() and got.dtype == dtype and counters_are_zero()
    ref = naive.sparse_paged_decode_ref(c.q, c.key_cache, c.value_cache, c.block_table, c.seq_lens, ids,
                                        page_size, scale)
    assert not got.isnan().any()
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert rel_err(got, ref) < tol


@pytest.mark.parametrize("kind", ["cap", "sinks", "cap+sinks"])
@pytest.mark.parametrize("num_splits,fuse_merge,dtype", [(1, True, torch.float32), (3, True, torch.float32),
                                                         (3, False, torch.float32), (2, True, torch.bfloat16)])
def test_sparse_decode_score_mods_match_reference(kind, num_splits, fuse_merge, dtype):
    """Soft-cap and learned sinks (``score_mods.py``) in every write path: one split, fused merge, merge kernel."""
    hq, hkv, d, page_size, block_size, k = 8, 2, 64, 8, 16, 5
    c = build([100, 30, 1, 0], hq, hkv, d, block_size, page_size, dtype, seed=31, layout="flash")
    ids = torch.stack([torch.stack([_random_pages(n, page_size, k, c.g) for _ in range(hkv)])
                       for n in c.seq_lens_list]).to(DEV)
    g = torch.Generator().manual_seed(len(kind))
    mods = ScoreMods(softcap=2.5 if "cap" in kind else None,
                     sinks=(2.0 * torch.randn(hq, generator=g)).to(DEV) if "sinks" in kind else None)
    scale = d ** -0.5 * 3.0  # larger scores, so the soft-cap bends them
    got = sd.sparse_paged_decode(c.q, c.key_cache, c.value_cache, c.block_table, c.seq_lens, ids, page_size,
                                 scale, num_splits=num_splits, fuse_merge=fuse_merge, mods=mods)
    ref = naive.sparse_paged_decode_ref(c.q, c.key_cache, c.value_cache, c.block_table, c.seq_lens, ids,
                                        page_size, scale, mods=mods)
    plain = naive.sparse_paged_decode_ref(c.q, c.key_cache, c.value_cache, c.block_table, c.seq_lens, ids,
                                          page_size, scale)
    assert not got.isnan().any() and counters_are_zero()
    assert rel_err(got, ref) < (1e-5 if dtype == torch.float32 else 1e-2)
    assert rel_err(plain, ref) > 1e-2  # the modifiers change the answer
    assert (got[3] == 0).all()  # an empty request stays zeros with sinks


def _random_pages(n: int, page_size: int, k: int, g: torch.Generator) -> torch.Tensor:
    """``[k]`` int32: up to ``k`` distinct random pages of an ``n``-token request, ``-1`` padded."""
    pick = torch.randperm(math.ceil(n / page_size), generator=g)[:k].to(torch.int32)
    return torch.cat([pick, torch.full((k - len(pick),), -1, dtype=torch.int32)])


@pytest.mark.parametrize("hq,hkv,d,dtype", [(8, 2, 64, torch.float32), (4, 1, 128, torch.bfloat16)])
def test_all_pages_equals_dense_paged_attention(hq, hkv, d, dtype):
    page_size, block_size = 8, 16
    c = build([77, 16, 3], hq, hkv, d, block_size, page_size, dtype, seed=d, layout="cpu")
    ids = sd.dense_page_ids(c.block_table, c.seq_lens, page_size, block_size, hkv)
    got = sd.sparse_paged_decode(c.q, c.key_cache, c.value_cache, c.block_table, c.seq_lens, ids, page_size,
                                 d ** -0.5, num_splits=2)
    qsl = torch.arange(len(c.seq_lens_list) + 1, dtype=torch.int32)
    dense = paged_attention_naive(c.q.cpu(), c.key_cache.cpu().permute(0, 2, 1, 3),
                                  c.value_cache.cpu().permute(0, 2, 1, 3), c.block_table.cpu(), qsl,
                                  c.seq_lens.cpu(), d ** -0.5)
    assert rel_err(got.cpu(), dense) < (1e-5 if dtype == torch.float32 else 1e-2)


def test_select_then_decode_with_full_budget_is_dense():
    """num_select >= every request's page count: selection + sparse decode = dense decode."""
    hq, hkv, d, page_size, block_size = 8, 2, 64, 8, 16
    c = build([60, 17], hq, hkv, d, block_size, page_size, torch.float32, seed=9)
    max_pages = c.block_table.shape[1] * block_size // page_size
    ids, nv = sd.select_topk_pages(c.q, c.page_min, c.page_max, c.block_table, c.seq_lens, page_size,
                                   block_size, max_pages, 1, 1)
    assert nv.tolist() == [math.ceil(n / page_size) for n in c.seq_lens_list]
    got = sd.sparse_paged_decode(c.q, c.key_cache, c.value_cache, c.block_table, c.seq_lens, ids, page_size, 0.1)
    qsl = torch.arange(3, dtype=torch.int32)
    dense = paged_attention_naive(c.q.cpu(), c.key_cache.cpu().permute(0, 2, 1, 3),
                                  c.value_cache.cpu().permute(0, 2, 1, 3), c.block_table.cpu(), qsl,
                                  c.seq_lens.cpu(), 0.1)
    assert rel_err(got.cpu(), dense) < 1e-5


# --------------------------------------------------------------------------------------------- GPU only
gpu = pytest.mark.skipif(not CUDA, reason="needs CUDA")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("hq,hkv,d,dtype,summary", [
    (32, 8, 128, torch.bfloat16, "fp8"), (32, 8, 128, torch.float16, "cache"),
    (32, 4, 64, torch.bfloat16, "cache"), (32, 4, 64, torch.float16, "fp8"),
    (28, 4, 128, torch.bfloat16, "fp8"), (28, 4, 128, torch.float16, "cache")])
def test_llama_sized_pipeline(hq, hkv, d, dtype, summary):
    page_size, block_size, k = 16, 16, 128
    c = build([32768, 9000, 2000, 513], hq, hkv, d, block_size, page_size, dtype, seed=hq + d, summary=summary)
    # Summaries of the whole cache in one step through the kernel vs the reference (NaN: never written).
    kmin, kmax = (torch.full(c.page_min.shape, float("nan"), device=DEV).to(c.page_min.dtype) for _ in range(2))
    sd.update_page_summary(c.key_cache, c.slot_mapping.to(DEV), kmin, kmax, page_size)
    same(kmin, c.page_min)
    same(kmax, c.page_max)
    args = (c.q, c.page_min, c.page_max, c.block_table, c.seq_lens, page_size, block_size, k, 1, 4)
    scores = naive.score_pages_ref(*args[:7], 1, 4)
    got_scores = sd.score_pages(*args[:7], 1, 4)
    fin = torch.isfinite(scores)
    assert torch.equal(fin, torch.isfinite(got_scores))
    torch.testing.assert_close(got_scores[fin], scores[fin], rtol=1e-5, atol=1e-4 * float(scores[fin].abs().max()))
    for variant in SELECT_VARIANTS.values():
        ids, nv = sd.select_topk_pages(*args, **variant)
        check_selection(ids, nv, scores, c.seq_lens, page_size, k)
    for cap in (None, 256, 2048):
        ids, nv = sd.select_topk_pages(*args, candidate_cap=cap)
        check_selection(ids, nv, scores, c.seq_lens, page_size, k)
    assert counters_are_zero()
    out = sd.sparse_paged_decode(c.q, c.key_cache, c.value_cache, c.block_table, c.seq_lens, ids, page_size,
                                 d ** -0.5)
    ref = naive.sparse_paged_decode_ref(c.q, c.key_cache, c.value_cache, c.block_table, c.seq_lens, ids,
                                        page_size, d ** -0.5)
    assert rel_err(out, ref) < 1e-2


def test_long_rows_go_through_the_split_select():
    """Rows longer than one program holds (SGLang's table is context + 4 slots wide: 16,386 pages of 8 tokens at
    128K) are split over segments at any row count and pick the torch path's pages; where even the merge would
    not fit one program, ``auto`` takes the torch path and ``triton`` says why."""
    g = torch.Generator().manual_seed(7)
    bsz, hkv, max_pages, page_size, k = 2, 2, sd.select._MAX_TRITON_TOPK + 2, 8, 64
    scores = torch.randn(bsz, hkv, max_pages, generator=g)
    seq_lens = torch.tensor([max_pages * page_size, 5000 * page_size + 3], dtype=torch.int32)
    scores[1, :, 5001:] = float("-inf")
    assert sd.topk_split.split_fits(max_pages, k) and not sd.topk_split.split_fits(max_pages, k, 0)
    assert sd.select._resolve_impl("auto", max_pages, k) == "triton"
    assert sd.select._resolve_impl("auto", 70000, 256) == "torch"  # 69 segments x 256 winners: no merge program
    ids, nv = sd.topk_pages(scores.to(DEV), seq_lens.to(DEV), page_size, k, split_max_rows=0)  # rows rule: never
    ref, rnv = sd.topk_pages(scores, seq_lens, page_size, k, impl="torch")
    check_selection(ids, nv, scores, seq_lens, page_size, k)
    assert torch.equal(ids.cpu(), ref) and torch.equal(nv.cpu(), rnv)
    with pytest.raises(ValueError, match="fit neither"):
        sd.topk_pages(scores.to(DEV), seq_lens.to(DEV), page_size, k, impl="triton", segment_pages=0)


@pytest.mark.gpu
@gpu
def test_topk_long_rows_split_like_torch():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(2, 4, 20000, generator=g).to(DEV)
    seq_lens = torch.tensor([20000 * 16, 7000 * 16 + 5], dtype=torch.int32, device=DEV)
    scores[1, :, 7001:] = float("-inf")
    ids, nv = sd.topk_pages(scores, seq_lens, 16, 256)
    check_selection(ids, nv, scores, seq_lens, 16, 256)
    assert torch.equal(ids, sd.topk_pages(scores, seq_lens, 16, 256, impl="torch")[0])  # split path, same pages
    s2 = scores[:, :, :16384].contiguous()
    ids_t, _ = sd.topk_pages(s2, seq_lens, 16, 256, impl="triton")
    ids_r, _ = sd.topk_pages(s2, seq_lens, 16, 256, impl="torch")
    assert torch.equal(ids_t, ids_r)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("fused", [True, False])
def test_cuda_graph_replay_follows_new_inputs(fused):
    """Replays with new queries and lengths (the fused kernels' counters must reset every launch)."""
    hq, hkv, d, page_size, block_size, k = 32, 8, 128, 16, 16, 64
    c = build([4000, 1500], hq, hkv, d, block_size, page_size, torch.bfloat16, seed=1, summary="fp8")
    slot = torch.zeros(2, dtype=torch.int64, device=DEV)
    q, seq_lens = c.q.clone(), c.seq_lens.clone()
    out = torch.empty_like(q)

    def step():
        sd.update_page_summary(c.key_cache, slot, c.page_min, c.page_max, page_size)
        ids, _ = sd.select_topk_pages(q, c.page_min, c.page_max, c.block_table, seq_lens, page_size,
                                      block_size, k, 1, 4, fused=fused)
        sd.sparse_paged_decode(q, c.key_cache, c.value_cache, c.block_table, seq_lens, ids, page_size,
                               d ** -0.5, out=out, num_splits=8, fuse_merge=fused)
        return ids

    slot.copy_(torch.tensor([int(c.slot_mapping[3999]), -1]))
    step()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ids_g = step()
    for trial in range(3):
        q.copy_(torch.randn(q.shape, device=DEV).to(q.dtype))
        seq_lens.copy_(torch.tensor([4000 - 100 * trial, 1500 - 7 * trial]))
        graph.replay()
        torch.cuda.synchronize()
        scores = naive.score_pages_ref(q, c.page_min, c.page_max, c.block_table, seq_lens, page_size,
                                       block_size, 1, 4)
        check_selection(ids_g, torch.tensor([k, k]), scores, seq_lens.cpu(), page_size, k)
        ref = naive.sparse_paged_decode_ref(q, c.key_cache, c.value_cache, c.block_table, seq_lens, ids_g,
                                            page_size, d ** -0.5)
        assert rel_err(out, ref) < 1e-2
    assert counters_are_zero()


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("fused_merge", [False, True])
def test_split_topk_cuda_graph_replay_follows_new_scores(fused_merge):
    """The split top-k (the default for long rows at small batch) captured in a CUDA graph: replays with new
    scores and lengths select what the one-program select selects on the same inputs."""
    bsz, hkv, max_pages, page_size, k = 2, 8, 8192, 16, 128
    scores = torch.empty(bsz, hkv, max_pages, device=DEV)
    seq_lens = torch.empty(bsz, dtype=torch.int32, device=DEV)

    def fill(trial):
        g = torch.Generator().manual_seed(trial)
        scores.copy_(torch.randn(bsz, hkv, max_pages, generator=g))
        lens = [8064 * page_size - 3 * trial, (1000 + 997 * trial) * page_size]
        seq_lens.copy_(torch.tensor(lens, dtype=torch.int32))
        for b, sl in enumerate(lens):
            scores[b, :, math.ceil(sl / page_size):] = float("-inf")

    assert sd.topk_split.split_applies(max_pages, k, None, bsz * hkv)
    def split():
        return sd.topk_split.topk_pages_split(scores, seq_lens, page_size, k, fused_merge=fused_merge)

    fill(0)
    split()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ids_g, nv_g = split()
    for trial in range(1, 4):
        fill(trial)
        graph.replay()
        torch.cuda.synchronize()
        one, onv = sd.topk_pages(scores, seq_lens, page_size, k, segment_pages=0)
        assert torch.equal(ids_g, one) and torch.equal(nv_g, onv)
    assert counters_are_zero()
