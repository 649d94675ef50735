"""Page top-k through a library's radix top-k (``kernels/sparse_decode/library_topk.py``) against ours.

``topk_pages_flashinfer`` returns the pages of a row in any order, so selections are compared as sets (each row
sorted). On CPU the library call is replaced by ``torch.topk`` (the ``top_k`` argument, or the module's loader
patched for the ``topk_pages(impl="flashinfer")`` wiring); the ``gpu``-marked tests run FlashInfer itself,
eagerly and under CUDA-graph capture, where it is installed. Without CUDA the Triton score kernel runs in the
interpreter (tests/support/triton_interp.py).
"""

from __future__ import annotations

import importlib.util
import math
import sys

import pytest
import torch

triton = pytest.importorskip("triton")

from triton_interp import CUDA, import_kernels, interpreter_env  # noqa: E402

DEV = "cuda" if CUDA else "cpu"
_MODULES = ("page_summary", "radix_topk", "select", "topk_split", "decode")
sd = import_kernels(*(f"longseq.kernels.sparse_decode.{m}" for m in _MODULES), "longseq.kernels.sparse_decode")[-1]
_interpreter_env = pytest.fixture(autouse=True, scope="module")(interpreter_env)
from longseq.kernels.sparse_decode import library_topk  # noqa: E402
from longseq.kernels.sparse_decode.library_topk import flashinfer_topk_available, topk_pages_flashinfer  # noqa: E402


def torch_top_k(x, k):
    return torch.topk(x, k, dim=-1)


def make_rows(seed, bsz, hkv, max_pages, page_size, num_forced=(1, 2), lens=None):
    """Fresh random scores as ``score_pages`` writes them (sink and recent pages ``+inf``, ``-inf`` past the live
    pages) for random lengths, among them a partial first page, exactly-budget and over-width rows."""
    g = torch.Generator().manual_seed(seed)
    if lens is None:
        lens = torch.randint(1, max_pages * page_size + 1, (bsz,), generator=g).tolist()
        lens[0] = 1
        if bsz > 2:
            lens[-1] = max_pages * page_size + page_size + 3  # longer than the table: clamped to max_pages
    scores = torch.randn(bsz, hkv, max_pages, generator=g) * 3 + 0.25
    sink, recent = num_forced
    for b, n_tok in enumerate(lens):
        n = min(math.ceil(n_tok / page_size), max_pages)
        scores[b, :, :min(sink, n)] = float("inf")
        scores[b, :, max(n - recent, 0):n] = float("inf")
        scores[b, :, n:] = float("-inf")
    return scores, torch.tensor(lens, dtype=torch.int32)


def as_sets(ids: torch.Tensor) -> torch.Tensor:
    return ids.cpu().sort(dim=-1).values


def naive_selection(scores, seq_lens, page_size, num_select):
    """Per row: the live pages ranked by score, the first ``min(k, n)`` kept, ``-1`` for the rest (as sets)."""
    bsz, hkv, max_pages = scores.shape
    out = torch.full((bsz, hkv, num_select), -1, dtype=torch.int32)
    for b in range(bsz):
        n = min(math.ceil(int(seq_lens[b]) / page_size), max_pages)
        for h in range(hkv):
            row = scores[b, h, :n].tolist()
            top = sorted(range(n), key=lambda j: -row[j])[:num_select]
            out[b, h, :len(top)] = torch.tensor(top, dtype=torch.int32)
    return as_sets(out)


SHAPES = [  # bsz, hkv, max_pages, num_select, page_size
    (1, 1, 64, 8, 16), (3, 2, 300, 17, 16), (4, 8, 1000, 64, 8), (2, 4, 40, 64, 16), (5, 2, 513, 128, 4),
    (6, 3, 129, 129, 2)]


# --------------------------------------------------------------------------------------------- CPU: injected top_k
@pytest.mark.parametrize("bsz,hkv,max_pages,k,page_size", SHAPES)
def test_same_pages_as_ours_and_the_reference(bsz, hkv, max_pages, k, page_size):
    scores, seq_lens = make_rows(bsz * 1000 + max_pages, bsz, hkv, max_pages, page_size)
    ids, nv = topk_pages_flashinfer(scores, seq_lens, page_size, k, top_k=torch_top_k)
    ref, rnv = sd.topk_pages(scores, seq_lens, page_size, k, impl="torch")
    assert ids.dtype == torch.int32 and ids.shape == (bsz, hkv, k) and nv.dtype == torch.int32
    assert torch.equal(as_sets(ids), as_sets(ref)) and torch.equal(nv, rnv)
    assert torch.equal(as_sets(ids), naive_selection(scores, seq_lens, page_size, k))
    n = torch.clamp((seq_lens + page_size - 1) // page_size, max=min(k, max_pages))
    assert torch.equal(nv, n.to(torch.int32))
    assert torch.equal((ids >= 0).sum(-1), nv[:, None].expand(-1, hkv))  # -1 exactly where a row is short


def test_short_rows_are_minus_one_padded():
    """Rows with fewer live pages than the budget hold every live page once and -1 in the other slots."""
    bsz, hkv, max_pages, k, page_size = 4, 2, 50, 16, 8
    lens = [1, 8 * 5 + 3, 8 * 16, 8 * 50]  # 1, 6, 16 (exactly the budget), 50 live pages
    scores, seq_lens = make_rows(7, bsz, hkv, max_pages, page_size, lens=lens)
    ids, nv = topk_pages_flashinfer(scores, seq_lens, page_size, k, top_k=torch_top_k)
    assert nv.tolist() == [1, 6, 16, 16]
    for b, n in enumerate([1, 6, 16]):
        want = torch.tensor(list(range(n)) + [-1] * (k - n), dtype=torch.int32).sort().values
        assert torch.equal(as_sets(ids[b]), want.expand(hkv, -1))


@pytest.mark.parametrize("bsz,hkv,max_pages,k,page_size", SHAPES[1:5])
def test_refresh_keeps_the_other_rows_exactly(bsz, hkv, max_pages, k, page_size):
    scores, seq_lens = make_rows(bsz + max_pages, bsz, hkv, max_pages, page_size)
    fresh, _ = topk_pages_flashinfer(scores, seq_lens, page_size, k, top_k=torch_top_k)
    g = torch.Generator().manual_seed(3)
    kept = torch.randint(-1, max_pages, (bsz, hkv, k), generator=g, dtype=torch.int32)
    before = kept.clone()
    refresh = torch.tensor([(b + 1) % 2 for b in range(bsz)], dtype=torch.int32)  # rows 0, 2, ... select
    out, nv = topk_pages_flashinfer(scores, seq_lens, page_size, k, refresh=refresh, page_ids=kept,
                                    top_k=torch_top_k)
    assert out.data_ptr() == kept.data_ptr()
    sel = refresh.bool()
    assert torch.equal(kept[~sel], before[~sel])
    assert torch.equal(as_sets(kept[sel]), as_sets(fresh[sel]))
    assert torch.equal(nv, sd.topk_pages(scores, seq_lens, page_size, k, impl="torch")[1])


def test_page_ids_are_written_in_place():
    scores, seq_lens = make_rows(11, 3, 2, 40, 8)
    buf = torch.full((3, 2, 64), 7, dtype=torch.int32)  # wider than the row: the tail becomes -1
    out, _ = topk_pages_flashinfer(scores, seq_lens, 8, 64, page_ids=buf, top_k=torch_top_k)
    assert out.data_ptr() == buf.data_ptr() and (buf[:, :, 40:] == -1).all()
    assert torch.equal(as_sets(buf), as_sets(sd.topk_pages(scores, seq_lens, 8, 64, impl="torch")[0]))


def test_topk_pages_impl_flashinfer_calls_it(monkeypatch):
    """``topk_pages(impl="flashinfer")`` and ``select_topk_pages(topk_impl="flashinfer")`` (with and without
    ``refresh``) go through the library call (its loader patched to torch.topk here)."""
    calls = []
    monkeypatch.setattr(library_topk, "_flashinfer_top_k", lambda: lambda x, k: calls.append(k) or torch_top_k(x, k))
    scores, seq_lens = make_rows(5, 3, 2, 300, 16)
    ids, nv = sd.topk_pages(scores.to(DEV), seq_lens.to(DEV), 16, 17, impl="flashinfer")
    ref, rnv = sd.topk_pages(scores, seq_lens, 16, 17, impl="torch")
    assert calls == [17] and torch.equal(as_sets(ids), as_sets(ref)) and torch.equal(nv.cpu(), rnv)

    g = torch.Generator().manual_seed(0)
    bsz, hq, hkv, d, block_size, page_size, k = 3, 4, 2, 16, 16, 8, 6
    table = torch.randperm(40, generator=g)[:bsz * 5].view(bsz, 5).to(torch.int32)
    mid = torch.randn(40 * 2, hkv, d, generator=g)
    half = torch.rand(40 * 2, hkv, d, generator=g)
    seq_lens = torch.tensor([70, 9, 80], dtype=torch.int32)
    args = [t.to(DEV) for t in (torch.randn(bsz, hq, d, generator=g), mid - half, mid + half, table, seq_lens)]
    args += [page_size, block_size, k, 1, 2]
    ids, nv = sd.select_topk_pages(*args, topk_impl="flashinfer")
    ref, rnv = sd.select_topk_pages(*args, topk_impl="torch")
    assert len(calls) == 2 and torch.equal(as_sets(ids), as_sets(ref)) and torch.equal(nv.cpu(), rnv.cpu())
    kept = torch.randint(0, 10, (bsz, hkv, k), generator=g, dtype=torch.int32).to(DEV)
    before = kept.clone()
    refresh = torch.tensor([0, 1, 0], dtype=torch.int32, device=DEV)
    sd.select_topk_pages(*args, topk_impl="flashinfer", refresh=refresh, page_ids=kept)
    assert torch.equal(kept[[0, 2]], before[[0, 2]]) and torch.equal(as_sets(kept[1]), as_sets(ref[1]))


def test_imports_without_flashinfer(monkeypatch):
    """The module loads with FlashInfer unimportable; it says so, and only a call without ``top_k`` fails."""
    monkeypatch.setitem(sys.modules, "flashinfer", None)
    monkeypatch.setitem(sys.modules, "flashinfer.topk", None)
    spec = importlib.util.spec_from_file_location("_library_topk_copy", library_topk.__file__)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert not mod.flashinfer_topk_available()
    scores, seq_lens = make_rows(1, 2, 1, 20, 4)
    with pytest.raises(ImportError):
        mod.topk_pages_flashinfer(scores, seq_lens, 4, 4)
    assert mod.topk_pages_flashinfer(scores, seq_lens, 4, 4, top_k=torch_top_k)[0].shape == (2, 1, 4)
    if not CUDA:
        assert not flashinfer_topk_available()


# --------------------------------------------------------------------------------------------- GPU: FlashInfer
needs_flashinfer = pytest.mark.skipif(not flashinfer_topk_available(), reason="needs CUDA and flashinfer.topk")


@pytest.mark.gpu
@needs_flashinfer
@pytest.mark.parametrize("bsz,max_pages,k", [(1, 16384, 256), (8, 4096, 256), (32, 16384, 256), (4, 2048, 64)])
def test_flashinfer_selects_our_pages(bsz, max_pages, k):
    """Engine-sized rows (8 KV heads), live lengths from one page to the whole table: the same page sets as our
    Triton select, with and without ``refresh``."""
    hkv, page_size = 8, 8
    g = torch.Generator().manual_seed(bsz + max_pages)
    lens = torch.randint(1, max_pages * page_size + 1, (bsz,), generator=g).tolist()
    lens[0] = min(lens[0], (k // 2) * page_size - 3)  # shorter than the budget
    scores, seq_lens = make_rows(bsz, bsz, hkv, max_pages, page_size, num_forced=(1, 8), lens=lens)
    scores, seq_lens = scores.cuda(), seq_lens.cuda()
    ids, nv = sd.topk_pages(scores, seq_lens, page_size, k, impl="flashinfer")
    ref, rnv = sd.topk_pages(scores, seq_lens, page_size, k, impl="triton")
    assert torch.equal(as_sets(ids), as_sets(ref)) and torch.equal(nv.cpu(), rnv.cpu())
    kept = torch.randint(0, 5, (bsz, hkv, k), generator=g, dtype=torch.int32).cuda()
    before = kept.clone()
    refresh = (torch.arange(bsz, device="cuda") % 3 == 0).to(torch.int32)
    sd.topk_pages(scores, seq_lens, page_size, k, impl="flashinfer", refresh=refresh, page_ids=kept)
    sel = refresh.bool()
    assert torch.equal(kept[~sel], before[~sel]) and torch.equal(as_sets(kept[sel]), as_sets(ref[sel]))


@pytest.mark.gpu
@needs_flashinfer
def test_flashinfer_under_cuda_graph_matches_eager():
    """Captured once (with ``refresh`` into a persistent ``page_ids``), replayed with new scores, lengths and
    refresh rows: the eager call's pages, and the other rows untouched."""
    bsz, hkv, max_pages, k, page_size = 6, 8, 4096, 128, 16
    scores, seq_lens = make_rows(0, bsz, hkv, max_pages, page_size)
    scores, seq_lens = scores.cuda(), seq_lens.cuda()
    refresh = torch.ones(bsz, dtype=torch.int32, device="cuda")
    kept = torch.full((bsz, hkv, k), -1, dtype=torch.int32, device="cuda")

    def step():
        return sd.topk_pages(scores, seq_lens, page_size, k, impl="flashinfer", refresh=refresh, page_ids=kept)

    step()  # load and warm up outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        _, nv_g = step()
    for trial in range(3):
        new_scores, new_lens = make_rows(trial + 1, bsz, hkv, max_pages, page_size)
        scores.copy_(new_scores)
        seq_lens.copy_(new_lens)
        refresh.copy_(torch.tensor([1, trial % 2, 1, 0, 1, 1], dtype=torch.int32))
        before = kept.clone()
        graph.replay()
        torch.cuda.synchronize()
        eager, env = topk_pages_flashinfer(scores, seq_lens, page_size, k)
        sel = refresh.bool()
        assert torch.equal(kept[~sel], before[~sel])
        assert torch.equal(as_sets(kept[sel]), as_sets(eager[sel])) and torch.equal(nv_g, env)
        assert torch.equal(as_sets(eager), naive_selection(new_scores, new_lens, page_size, k))
