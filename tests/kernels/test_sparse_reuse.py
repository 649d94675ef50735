"""Selection reuse across decode steps (LONGSEQ_SPARSE_REUSE_STEPS): the plan kernel vs its reference, the score /
top-k / decode kernels with ``refresh`` and ``extra_pages``, and the core step over many decode steps on the
Triton and the PyTorch paths (the vLLM CPU engine and SGLang's CPU kit run the PyTorch one: same pages).

Without CUDA the Triton kernels run in the interpreter (tests/support/triton_interp.py).
"""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")

from triton_interp import CUDA, import_kernels, interpreter_env  # noqa: E402

DEV = "cuda" if CUDA else "cpu"
_MODULES = ("page_summary", "radix_topk", "select", "topk_split", "decode", "reuse")
sd = import_kernels(*(f"longseq.kernels.sparse_decode.{m}" for m in _MODULES), "longseq.kernels.sparse_decode")[-1]
_interpreter_env = pytest.fixture(autouse=True, scope="module")(interpreter_env)
from longseq.attention_backends.core.sparse import QuestPageIndex, SelectionReuse, SparseSettings, sparse_decode  # noqa: E402
from longseq.kernels.sparse_decode import naive  # noqa: E402
from longseq.kernels.sparse_decode.reuse import extra_page_slots, plan_selection_reuse  # noqa: E402


class Decoding:
    """A paged cache with ``B`` requests that grow by one token per decode step (fresh random keys/values,
    each request's blocks scattered), and the requests can be replaced by new ones in the same row."""

    def __init__(self, lens, hkv=2, d=32, block_size=16, num_blocks=96, max_blocks=24, seed=0, device="cpu"):
        self.g = torch.Generator().manual_seed(seed)
        self.hkv, self.d, self.block_size, self.max_blocks = hkv, d, block_size, max_blocks
        # the caches live on the device (the page index is keyed to the cache it summarizes); tables on CPU
        kv = torch.randn(2, num_blocks, block_size, hkv, d, generator=self.g).to(torch.bfloat16).to(device)
        self.key_cache, self.value_cache = kv[0], kv[1]
        self.free = torch.randperm(num_blocks, generator=self.g).tolist()
        self.block_table = torch.zeros(len(lens), max_blocks, dtype=torch.int32)
        self.seq_lens = torch.zeros(len(lens), dtype=torch.int32)
        self.written: list[torch.Tensor] = []  # slots written since the last take_slots()
        for b, n in enumerate(lens):
            self.start_request(b, n)

    def start_request(self, b: int, length: int) -> None:
        """A new request of ``length`` tokens in row ``b`` (new blocks; the old ones are not freed)."""
        self.block_table[b] = torch.tensor([self.free.pop() for _ in range(self.max_blocks)], dtype=torch.int32)
        self.seq_lens[b] = 0
        self.grow(b, length)

    def grow(self, b: int, n: int) -> None:
        pos = torch.arange(int(self.seq_lens[b]), int(self.seq_lens[b]) + n)
        slots = self.block_table[b].long()[pos // self.block_size] * self.block_size + pos % self.block_size
        dev = self.key_cache.device
        blk, off = (slots // self.block_size).to(dev), (slots % self.block_size).to(dev)
        self.key_cache[blk, off] = torch.randn(n, self.hkv, self.d, generator=self.g).to(torch.bfloat16).to(dev)
        self.value_cache[blk, off] = torch.randn(n, self.hkv, self.d, generator=self.g).to(torch.bfloat16).to(dev)
        self.seq_lens[b] += n
        self.written.append(slots)

    def take_slots(self) -> torch.Tensor:
        s, self.written = torch.cat(self.written), []
        return s


# --------------------------------------------------------------------------------------------- plan kernel
@pytest.mark.parametrize("every,page_size", [(4, 8), (6, 2), (1, 4)])
def test_plan_kernel_matches_reference_over_steps(every, page_size):
    """Random growth (0..every+1 tokens), new requests in a row, reordered rows: same state and decisions."""
    g = torch.Generator().manual_seed(every * 10 + page_size)
    rows, width, block = 9, 12, 16
    table = torch.randint(0, 500, (rows, width), generator=g, dtype=torch.int32)
    lens = torch.randint(1, width * block - 64, (rows,), generator=g, dtype=torch.int32)
    e = extra_page_slots(every, page_size)
    states = []
    for _ in range(2):
        states.append([torch.zeros(rows, dtype=torch.int32), torch.full((rows,), -1, dtype=torch.int32),
                       torch.ones(rows, dtype=torch.int32), torch.full((rows, e), -1, dtype=torch.int32)])
    reused = refreshed = 0
    for step in range(12):
        if step % 5 == 4:  # a new request in row 2 whose length is within the window, and two rows swapped
            table[2] = torch.randint(0, 500, (width,), generator=g, dtype=torch.int32)
            table[[4, 5]] = table[[5, 4]]
            lens[[4, 5]] = lens[[5, 4]]
        dev_state = [t.to(DEV) for t in states[0]]
        plan_selection_reuse(table.to(DEV), lens.to(DEV), *dev_state, every, page_size, block)
        naive.plan_selection_reuse_ref(table, lens, *states[1], every, page_size, block)
        for got, want in zip(dev_state, states[1]):
            assert torch.equal(got.cpu(), want)
        states[0] = [t.cpu() for t in dev_state]
        reused += int((states[1][2] == 0).sum())
        refreshed += int((states[1][2] == 1).sum())
        lens += torch.randint(0, every + 2, (rows,), generator=g, dtype=torch.int32)
    assert refreshed > 0 and (reused > 0) == (every > 1)


def test_plan_reference_rules():
    """The rules, one case each: first sight, growth within and past the window, a replaced block, no growth."""
    every, p, block = 4, 8, 16
    table = torch.tensor([[7, 8, 9, 10]], dtype=torch.int32)
    st = [torch.zeros(1, dtype=torch.int32), torch.full((1,), -1, dtype=torch.int32),
          torch.ones(1, dtype=torch.int32), torch.full((1, 1), -1, dtype=torch.int32)]

    def plan(n):
        naive.plan_selection_reuse_ref(table, torch.tensor([n], dtype=torch.int32), *st, every, p, block)
        return int(st[2][0]), st[3][0].tolist()

    assert plan(30) == (1, [-1]) and st[0].tolist() == [30] and st[1].tolist() == [8]  # first sight: select
    assert plan(32) == (0, [-1])  # same page 3 (tokens 24..31) still the last: nothing new
    assert plan(33) == (0, [4])  # token 32 opened page 4, written since the selection
    assert plan(34) == (1, [-1])  # 4 tokens since the selection: select again
    table[0, 2] = 99  # the block of token 33 (the row's last at that selection) replaced: another request
    assert plan(35) == (1, [-1])
    assert plan(35) == (1, [-1])  # no growth (a repeated plan of one step): select again
    assert extra_page_slots(1, 8) == 0 and extra_page_slots(4, 8) == 1 and extra_page_slots(9, 8) == 1
    assert extra_page_slots(10, 8) == 2 and extra_page_slots(6, 2) == 3


# --------------------------------------------------------------------------------------------- select and decode
@pytest.mark.parametrize("segment_pages", [None, 16])
def test_select_with_refresh_keeps_the_other_rows(segment_pages):
    """Rows with refresh=0 keep their page_ids untouched; the others get exactly the full selection."""
    torch.manual_seed(1)
    dec = Decoding([300, 220, 90, 310], block_size=16)
    num_pages_total = dec.key_cache.shape[0] * 16 // 4
    pmin = torch.empty(num_pages_total, dec.hkv, dec.d, dtype=torch.bfloat16)
    pmax = torch.empty_like(pmin)
    naive.update_page_summary_ref(dec.key_cache, dec.take_slots(), pmin, pmax, 4)
    q = torch.randn(4, 4, dec.d).to(torch.bfloat16)
    args = [t.to(DEV) for t in (q, pmin, pmax, dec.block_table, dec.seq_lens)]
    full, _ = sd.select_topk_pages(*args, 4, 16, 8, 1, 2, segment_pages=segment_pages)
    kept = torch.randint(0, 5, (4, dec.hkv, 8), dtype=torch.int32).to(DEV)
    before = kept.clone()
    refresh = torch.tensor([1, 0, 1, 0], dtype=torch.int32, device=DEV)
    out, _ = sd.select_topk_pages(*args, 4, 16, 8, 1, 2, segment_pages=segment_pages, refresh=refresh,
                                  page_ids=kept)
    assert out.data_ptr() == kept.data_ptr()
    assert torch.equal(kept[[0, 2]], full[[0, 2]]) and torch.equal(kept[[1, 3]], before[[1, 3]])


@pytest.mark.parametrize("num_splits", [1, 3])  # the last split also reads the extra pages
def test_decode_with_extra_pages_matches_reference(num_splits):
    torch.manual_seed(2)
    dec = Decoding([200, 130, 70], block_size=16)
    q = torch.randn(3, 4, dec.d).to(torch.bfloat16)
    page_ids = torch.stack([torch.randperm(16)[:6].sort().values for _ in range(3 * dec.hkv)]).view(3, dec.hkv, 6)
    page_ids = page_ids.to(torch.int32)
    extra = torch.tensor([[49, 50], [-1, -1], [17, -1]], dtype=torch.int32)  # row 1: nothing new
    want = naive.sparse_paged_decode_ref(q, dec.key_cache, dec.value_cache, dec.block_table, dec.seq_lens,
                                         torch.cat([page_ids, extra[:, None].expand(-1, dec.hkv, -1)], 2), 4, 0.2)
    got = sd.sparse_paged_decode(*[t.to(DEV) for t in (q, dec.key_cache, dec.value_cache, dec.block_table,
                                                       dec.seq_lens, page_ids)], 4, 0.2, extra_pages=extra.to(DEV),
                                 num_splits=num_splits)
    torch.testing.assert_close(got.cpu().float(), want.float(), atol=2e-2, rtol=2e-2)
    from longseq.kernels.sparse_decode.torch_ops import sparse_paged_decode_torch

    batched = sparse_paged_decode_torch(q, dec.key_cache, dec.value_cache, dec.block_table, dec.seq_lens,
                                        page_ids, 4, 0.2, extra_pages=extra)
    torch.testing.assert_close(batched.float(), want.float(), atol=2e-2, rtol=2e-2)


# --------------------------------------------------------------------------------------------- the core step
def _run_steps(kernel: str, every: int, steps: int = 11):
    """Decode ``steps`` steps of 3 requests through the core (plan + sparse_decode); row 1 gets a new request at
    step 6. Returns per step: (refresh, kept pages, output), and the inputs to recompute them."""
    settings = SparseSettings(budget_tokens=32, page_size=4, dense_layers=0, sink_pages=1, recent_pages=2,
                              summary="cache", group_max=True, reuse_steps=every)
    dev = DEV if kernel == "triton" else "cpu"
    dec = Decoding([301, 150, 222], block_size=16, seed=5, device=dev)
    g = torch.Generator().manual_seed(9)
    index = QuestPageIndex(settings.page_size)
    reuse = SelectionReuse(settings, 16, max_rows=4, device=dev)
    log = []
    for step in range(steps):
        if step == 6:
            dec.start_request(1, 155)  # old selection at 155 tokens: within the growth window but for the tag
        for b in range(3):
            dec.grow(b, 1)
        kc, vc = dec.key_cache, dec.value_cache
        bt, sl = dec.block_table.to(dev), dec.seq_lens.to(dev)
        index.update(kc, dec.take_slots().to(dev))
        reuse.plan(bt, sl, kernel=kernel)
        q = torch.randn(3, 4, dec.d, generator=g).to(torch.bfloat16).to(dev)
        out = torch.empty_like(q)
        sparse_decode(q, kc, vc, bt, sl, index, settings, 0.2, out, reuse=reuse, kernel=kernel)
        kept = index.kept_pages(reuse.capacity, dec.hkv, settings.num_select, dev)[:3]
        log.append(dict(refresh=reuse.refresh.cpu().clone(), extra=reuse.extra.cpu().clone(), kept=kept.cpu().clone(),
                        out=out.cpu().float(), q=q.cpu(), seq_lens=dec.seq_lens.clone(),
                        table=dec.block_table.clone(), pmin=index.page_min.cpu().clone(),
                        pmax=index.page_max.cpu().clone(), key_cache=dec.key_cache.cpu().clone(),
                        value_cache=dec.value_cache.cpu().clone()))
    return settings, log


@pytest.mark.parametrize("kernel", ["triton", "torch"])
def test_core_reuses_selection_for_n_steps_and_attends_new_pages(kernel):
    """Each row selects every 4 steps (row 1 also right after a new request took it); in between it keeps its
    pages and attends to the pages written since (on top of the budget's 8 pages: one slot for 4 steps)."""
    settings, log = _run_steps(kernel, every=4)
    assert log[0]["kept"].shape[-1] == settings.num_select and log[0]["extra"].shape[-1] == 1
    refresh = torch.stack([s["refresh"] for s in log])  # [steps, 3]
    assert refresh[:, 0].tolist() == [1, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0]
    assert refresh[:, 1].tolist() == [1, 0, 0, 0, 1, 0, 1, 0, 0, 0, 1]  # step 6: a new request in the row
    last = {}
    for step, s in enumerate(log):
        fresh, _ = naive.select_topk_pages_ref(s["q"], s["pmin"], s["pmax"], s["table"], s["seq_lens"], 4, 16,
                                               settings.num_select, 1, 2, group_max=True)
        for b in range(3):
            if s["refresh"][b]:
                assert torch.equal(s["kept"][b], fresh[b]), (step, b)
                last[b] = fresh[b]
            else:
                assert torch.equal(s["kept"][b], last[b]), (step, b)
        pages = torch.cat([s["kept"], s["extra"][:, None].expand(-1, s["kept"].shape[1], -1)], 2)
        want = naive.sparse_paged_decode_ref(s["q"], s["key_cache"], s["value_cache"], s["table"], s["seq_lens"],
                                             pages, 4, 0.2)
        torch.testing.assert_close(s["out"], want.float(), atol=2e-2, rtol=2e-2)
    # the new pages were attended: some reuse step had a page opened since its selection
    assert any(int(x) >= 0 for s in log for x in s["extra"].flatten())


def test_triton_and_torch_paths_keep_the_same_pages():
    """The GPU kernels and the PyTorch path (vLLM CPU engine, SGLang CPU kit) make the same plan and keep the
    same pages at every step."""
    _, a = _run_steps("triton", every=4)
    _, b = _run_steps("torch", every=4)
    for sa, sb in zip(a, b):
        assert torch.equal(sa["refresh"], sb["refresh"]) and torch.equal(sa["extra"], sb["extra"])
        assert torch.equal(sa["kept"], sb["kept"])
        torch.testing.assert_close(sa["out"], sb["out"], atol=2e-2, rtol=2e-2)


def test_reuse_steps_1_selects_every_step():
    settings, log = _run_steps("torch", every=1, steps=4)
    assert all(bool(s["refresh"].all()) for s in log) and all(s["extra"].shape[1] == 0 for s in log)


@pytest.mark.gpu
def test_reuse_under_cuda_graph_matches_eager():
    """Llama-3.1-8B layout (32/8 heads, head 128, fp8 summaries, pages of 8, budget 2048, rows of 12K-20K tokens):
    the captured sparse step replayed over decode steps, each planned eagerly, keeps the same pages and gives
    the same output as the eager step; rows do reuse (the graph reads the plan from fixed buffers)."""
    assert CUDA, "this test runs on the GPU machine"
    torch.manual_seed(0)
    hkv, hq, d, bs = 8, 32, 128, 16
    settings = SparseSettings(budget_tokens=2048, page_size=8, dense_layers=0, sink_pages=1, recent_pages=8,
                              summary="fp8", group_max=True, reuse_steps=4)
    max_blocks, rows = 1300, 3
    nb = rows * max_blocks + 8
    kc = torch.randn(nb, bs, hkv, d, device="cuda").to(torch.bfloat16)
    vc = torch.randn(nb, bs, hkv, d, device="cuda").to(torch.bfloat16)
    table = torch.randperm(nb, device="cuda")[: rows * max_blocks].view(rows, max_blocks).to(torch.int32)
    seq = torch.tensor([20000, 12000, 16000], device="cuda", dtype=torch.int32)

    def slots(b, start, end):
        pos = torch.arange(start, end, device="cuda")
        return table[b].long()[pos // bs] * bs + pos % bs

    written = torch.cat([slots(b, 0, int(seq[b])) for b in range(rows)])
    indexes = [QuestPageIndex(8, settings.summary_dtype) for _ in range(2)]
    reuses = [SelectionReuse(settings, bs, max_rows=rows, device="cuda") for _ in range(2)]
    for index in indexes:
        index.update(kc, written)
    q_static = torch.randn(rows, hq, d, device="cuda").to(torch.bfloat16)
    outs = [torch.empty_like(q_static) for _ in range(2)]
    for index, reuse, out in zip(indexes, reuses, outs):  # the same first (selecting) step on both
        reuse.plan(table, seq)
        sparse_decode(q_static, kc, vc, table, seq, index, settings, 0.088, out, reuse=reuse)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        sparse_decode(q_static, kc, vc, table, seq, indexes[1], settings, 0.088, outs[1], reuse=reuses[1])
    refreshes = []
    for step in range(9):
        new = torch.cat([slots(b, int(seq[b]), int(seq[b]) + 1) for b in range(rows)])
        kc.view(-1, hkv, d)[new] = torch.randn(rows, hkv, d, device="cuda").to(torch.bfloat16)
        vc.view(-1, hkv, d)[new] = torch.randn(rows, hkv, d, device="cuda").to(torch.bfloat16)
        seq += 1
        q = torch.randn(rows, hq, d, device="cuda").to(torch.bfloat16)
        for index, reuse in zip(indexes, reuses):
            index.update(kc, new)
            reuse.plan(table, seq)
        sparse_decode(q, kc, vc, table, seq, indexes[0], settings, 0.088, outs[0], reuse=reuses[0])
        q_static.copy_(q)
        graph.replay()
        torch.cuda.synchronize()
        kept = [ix.kept_pages(rows, hkv, settings.num_select, torch.device("cuda")) for ix in indexes]
        assert torch.equal(kept[0], kept[1]), step
        assert torch.equal(reuses[0].refresh, reuses[1].refresh)
        torch.testing.assert_close(outs[1].float(), outs[0].float(), atol=1e-2, rtol=1e-2)
        refreshes.append(reuses[0].refresh.tolist())
    assert refreshes[:5] == [[0, 0, 0]] * 3 + [[1, 1, 1], [0, 0, 0]], refreshes  # every 4th step selects
