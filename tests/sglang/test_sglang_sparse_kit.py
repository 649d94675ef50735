"""``longseq_sparse`` on CPU: SGLang's attention kit (dense-equivalent budget), sparse decode against an
independent Quest reference over SGLang's real pools and ForwardBatch, start-up errors, and registration."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap

import pytest

from conftest import clean_env

pytestmark = pytest.mark.sglang
NAME = "longseq_sparse"
HQ, HKV, D = 8, 2, 32  # GQA, group 4


def _case_names() -> list[str]:
    try:
        from sglang_kit import kit_cases

        return [c.name for c in kit_cases(NAME)]
    except ImportError:  # no sglang here: one placeholder, failed by conftest's _require_sglang if selected
        return ["sglang-not-installed"]


# ---------------------------------------------------------------------------------------------------------
# 1. SGLang's attention kit, budget >= every context: the sparse path must match the kit's SDPA reference.


@pytest.mark.parametrize("case_name", _case_names())
def test_attention_kit_case_dense_equivalent(case_name, longseq_env):
    from sglang_kit import kit_cases, run_case

    from longseq.attention_backends.sglang.sparse import TRACE, LongSeqSparseBackend
    from longseq.plugin.sglang import register

    case = {c.name: c for c in kit_cases(NAME)}[case_name]
    # Layer 0 is the kit's only layer: make it sparse. The Quest page must divide the kit's --page-size (1..32).
    longseq_env(LONGSEQ_SPARSE_DENSE_LAYERS="0", LONGSEQ_SPARSE_PAGE_SIZE=str(min(16, case.page_size)))
    register()
    before = dict(TRACE.counts)
    backend = run_case(case)  # float32, tight tolerance against the kit's reference
    assert type(backend) is LongSeqSparseBackend and backend.inner_name == "torch_native"
    delta = {k: TRACE.counts[k] - before[k] for k in before}
    swa = case.sliding_window_size is not None  # sliding-window layers stay dense: no page index
    if case.forward_mode.is_decode():
        assert delta["decode_calls"] == delta["sparse_decode_calls"] == delta["index_updates"] == 1
    else:
        assert delta["extend_calls"] == 1 and delta["sparse_decode_calls"] == 0
        assert delta["index_updates"] == (0 if swa else 1)
    assert delta["forward_calls"] == delta["backends_built"] == 1


# ---------------------------------------------------------------------------------------------------------
# Real SGLang objects (the kit's MockModelRunner is a ModelRunner with a real ReqToTokenPool and
# MHATokenToKVPool), filled through our backend: two chunked-prefill extend steps, then decode steps.


def make_runner(page_size: int, *, head_dim: int = D, max_context_len: int = 256, batch: int = 2,
                kv_cache_dtype_str: str = "auto"):
    import torch
    from sglang.srt.model_executor.forward_batch_info import ForwardMode
    from sglang.test.kits.attention_unittest.attention_methods import dense_attention as da

    case = da.DenseAttentionCase(name="longseq_sparse", backend=NAME, forward_mode=ForwardMode.DECODE,
                                 num_heads=HQ, num_kv_heads=HKV, page_size=page_size, prefix_lens=(1,) * batch)
    config = da.TinyModelConfig(num_heads=HQ, num_kv_heads=HKV, head_dim=head_dim, hidden_size=64,
                                context_len=max_context_len)
    runner = da.MockModelRunner(case=case, model_config=config, dtype=torch.float32, device="cpu",
                                max_context_len=max_context_len, head_dim=head_dim)
    runner.kv_cache_dtype_str = kv_cache_dtype_str
    return runner


def make_layer(layer_id: int = 0):
    from sglang.srt.layers.radix_attention import RadixAttention

    return RadixAttention(num_heads=HQ, head_dim=D, scaling=D**-0.5, num_kv_heads=HKV, layer_id=layer_id)


def make_batch(runner, mode, prefix_lens, new_lens, loc_fn):
    """A ForwardBatch writing ``new_lens`` tokens after ``prefix_lens`` per request (slots from ``loc_fn``)."""
    import torch
    from sglang.srt.model_executor.forward_batch_info import ForwardBatch

    seq_lens = [p + n for p, n in zip(prefix_lens, new_lens)]
    locs, positions = [], []
    for r, (p, n) in enumerate(zip(prefix_lens, new_lens)):
        for pos in range(p, p + n):
            runner.req_to_token_pool.req_to_token[r, pos] = loc_fn(r, pos)
            locs.append(loc_fn(r, pos))
            positions.append(pos)
    batch = ForwardBatch(
        forward_mode=mode, batch_size=len(seq_lens), input_ids=torch.zeros(len(locs), dtype=torch.int64),
        req_pool_indices=torch.arange(len(seq_lens), dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32), seq_lens_cpu=torch.tensor(seq_lens, dtype=torch.int32),
        out_cache_loc=torch.tensor(locs, dtype=torch.int64), seq_lens_sum=sum(seq_lens),
        positions=torch.tensor(positions, dtype=torch.int64))
    runner.kv_index_translator.bind_own_plan(batch)
    if mode.is_extend():
        batch.extend_prefix_lens = torch.tensor(prefix_lens, dtype=torch.int32)
        batch.extend_prefix_lens_cpu = list(prefix_lens)
        batch.extend_seq_lens = torch.tensor(new_lens, dtype=torch.int32)
        batch.extend_seq_lens_cpu = list(new_lens)
        batch.extend_num_tokens = len(locs)
    return batch


def run_layer(backend, layer, batch, gen):
    """Fresh random q/k/v through RadixAttention -> backend (as a model layer calls it); returns (q, k, out)."""
    import torch
    from sglang.srt.model_executor.forward_context import ForwardContext, forward_context

    t = batch.out_cache_loc.shape[0]
    q = torch.randn(t, HQ * D, generator=gen)
    k, v = torch.randn(t, HKV * D, generator=gen), torch.randn(t, HKV * D, generator=gen)
    with torch.no_grad(), forward_context(ForwardContext(attn_backend=backend)):
        backend.init_forward_metadata(batch)
        return q, k.view(t, HKV, D), layer(q, k, v, batch)


CONTEXT = (230, 201)  # prefill lengths: 15 and 13 Quest pages of 16, against a 4-page budget
CHUNK = (100, 75)  # first prefill chunk: ends mid-page, so the second chunk re-summarizes that page


def prefill_and_decode(backend, runner, layer, steps: int = 2):
    """Two prefill chunks, then ``steps`` decode steps; yields (q [B, Hq, D], out [B, Hq*D], seq_lens).

    Each decode step first checks that the step's new keys are in the pool at the requests' last positions."""
    import torch
    from sglang.srt.model_executor.forward_batch_info import ForwardMode
    from sglang.test.kits.attention_unittest.attention_methods.dense_attention import make_loc_fn

    total = tuple(c + steps for c in CONTEXT)
    loc_fn = make_loc_fn("shuffled_pages", batch_size=2, seq_lens=total, prefix_lens=(0, 0),
                         page_size=runner.page_size, max_context_len=256, seed=7)
    gen = torch.Generator().manual_seed(11)
    rest = tuple(c - h for c, h in zip(CONTEXT, CHUNK))
    run_layer(backend, layer, make_batch(runner, ForwardMode.EXTEND, (0, 0), CHUNK, loc_fn), gen)
    run_layer(backend, layer, make_batch(runner, ForwardMode.EXTEND, CHUNK, rest, loc_fn), gen)
    for step in range(steps):
        prefix = tuple(c + step for c in CONTEXT)
        q, k, out = run_layer(backend, layer, make_batch(runner, ForwardMode.DECODE, prefix, (1, 1), loc_fn), gen)
        for b, n in enumerate(prefix):
            assert torch.equal(request_kv(runner, b, n + 1)[0][n], k[b])
        yield q.view(-1, HQ, D), out, [p + 1 for p in prefix]


def request_kv(runner, b: int, n: int):
    """Request ``b``'s first ``n`` keys and values in logical order, ``[n, Hkv, D]``, read through req_to_token."""
    slots = runner.req_to_token_pool.req_to_token[b, :n].long()
    pool = runner.token_to_kv_pool
    return pool.get_key_buffer(0)[slots], pool.get_value_buffer(0)[slots]


def quest_one(runner, q, b: int, n: int, p: int, num_select: int, sink: int, recent: int, group_max: bool,
              keep=None, extra=()):
    """Independent Quest decode of request ``b`` (``n`` tokens): a contiguous copy of its KV, page min/max by
    ``amin``/``amax``, the kernels' PyTorch references for selection and sparse attention. ``keep``: ``[1, Hkv, S]``
    pages selected at an earlier step (selection reuse) attended with the ``extra`` pages instead of a new
    selection. Returns (out ``[1, Hq, D]``, the pages ``[1, Hkv, S]``, (page_min, page_max))."""
    import torch

    from longseq.kernels.sparse_decode.naive import select_topk_pages_ref, sparse_paged_decode_ref

    k, v = request_kv(runner, b, n)
    pages = math.ceil(n / p)
    kc, vc = (torch.zeros(pages * p, HKV, D).index_copy_(0, torch.arange(n), x).view(pages, p, HKV, D)
              for x in (k, v))
    pmin = torch.stack([k[j * p:(j + 1) * p].amin(0) for j in range(pages)])
    pmax = torch.stack([k[j * p:(j + 1) * p].amax(0) for j in range(pages)])
    table, lens = torch.arange(pages, dtype=torch.int32)[None], torch.tensor([n], dtype=torch.int32)
    ids = keep
    if ids is None:
        ids, _ = select_topk_pages_ref(q[b:b + 1], pmin, pmax, table, lens, p, p, num_select, sink, recent,
                                       group_max=group_max)
        assert ids.shape == (1, HKV, num_select) and bool((ids >= 0).all())  # a real selection of 13-15 pages
    listed = torch.cat([ids, torch.tensor(list(extra), dtype=torch.int32).view(1, 1, -1).expand(1, HKV, -1)], 2)
    return sparse_paged_decode_ref(q[b:b + 1], kc, vc, table, lens, listed, p, D**-0.5), ids, (pmin, pmax)


def quest_reference(runner, q, seq_lens, p: int, num_select: int, sink: int, recent: int, group_max: bool):
    """:func:`quest_one` for every request, each selecting. Returns (out ``[B, Hq, D]``, summaries)."""
    import torch

    res = [quest_one(runner, q, b, n, p, num_select, sink, recent, group_max) for b, n in enumerate(seq_lens)]
    return torch.cat([r[0] for r in res]), [r[2] for r in res]


def dense_reference(runner, q, seq_lens):
    """Plain softmax attention over the whole context (GQA), fp32."""
    import torch

    outs = []
    for b, n in enumerate(seq_lens):
        k, v = request_kv(runner, b, n)
        k, v = k.repeat_interleave(HQ // HKV, 1), v.repeat_interleave(HQ // HKV, 1)  # [n, Hq, D]
        p = torch.softmax(torch.einsum("hd,nhd->hn", q[b], k) * D**-0.5, -1)
        outs.append(torch.einsum("hn,nhd->hd", p, v))
    return torch.stack(outs)


# Selection every step here (the selection itself against the reference); reuse has its own test below.
SPARSE_ENV = dict(LONGSEQ_SPARSE_BUDGET="64", LONGSEQ_SPARSE_PAGE_SIZE="16", LONGSEQ_SPARSE_DENSE_LAYERS="0",
                  LONGSEQ_SPARSE_SINK_PAGES="1", LONGSEQ_SPARSE_RECENT_PAGES="1", LONGSEQ_SPARSE_REUSE_STEPS="1")


@pytest.mark.parametrize("group_score", ["max", "sum"])
@pytest.mark.parametrize("sglang_page_size", [16, 32])  # 32: two Quest pages per SGLang page
def test_sparse_decode_matches_independent_quest_reference(sglang_page_size, group_score, longseq_env, tmp_path):
    import os

    import torch
    from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS

    from longseq.attention_backends.sglang.sparse import TRACE
    from longseq.plugin.sglang import register

    longseq_env(**SPARSE_ENV, LONGSEQ_TRACE_DIR=str(tmp_path), LONGSEQ_SPARSE_GROUP_SCORE=group_score)
    register()
    runner, layer = make_runner(sglang_page_size), make_layer(0)
    backend = ATTENTION_BACKENDS[NAME](runner)
    before = TRACE.counts["sparse_decode_calls"]
    for q, out, seq_lens in prefill_and_decode(backend, runner, layer):
        expected, summaries = quest_reference(runner, q, seq_lens, 16, num_select=4, sink=1, recent=1,
                                              group_max=group_score == "max")
        torch.testing.assert_close(out.view(-1, HQ, D), expected, atol=1e-5, rtol=1e-5)
        dense = dense_reference(runner, q, seq_lens)
        assert (expected - dense).abs().max() > 0.05  # negative control: 4 of 13-15 pages is not dense
        # the backend's page index (filled by the extend and decode steps) holds the same summaries
        index = backend.indexes[0]
        for b, (pmin, pmax) in enumerate(summaries):
            first_slots = runner.req_to_token_pool.req_to_token[b, : seq_lens[b] : 16].long()
            torch.testing.assert_close(index.page_min[first_slots // 16], pmin, atol=0, rtol=0)
            torch.testing.assert_close(index.page_max[first_slots // 16], pmax, atol=0, rtol=0)
    assert TRACE.counts["sparse_decode_calls"] - before == 2
    # a second backend on the same pool (two-batch overlap builds several) shares the page indexes
    assert ATTENTION_BACKENDS[NAME](runner).indexes is backend.indexes
    assert ATTENTION_BACKENDS[NAME](make_runner(sglang_page_size)).indexes == {}
    TRACE.flush()  # the per-process marker names this backend and counts the sparse steps
    marker = json.loads((tmp_path / f"sglang-{NAME}-{os.getpid()}.json").read_text())
    assert marker["backend"] == NAME and marker["technique"] == "sparse" and "torch_native" in marker["inner"]
    assert marker["sparse_decode_calls"] == TRACE.counts["sparse_decode_calls"] >= 2


def test_sparse_decode_reuses_selection_every_4_steps(longseq_env):
    """LONGSEQ_SPARSE_REUSE_STEPS=4 on SGLang's real pools: a request selects (4 pages) at decode steps 0, 4 and
    8; in between its output is the reference attention over the pages it selected then plus the pages opened
    since (the same plan as the vLLM and GPU paths: core/sparse.py)."""
    import torch
    from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS

    from longseq.plugin.sglang import register

    longseq_env(**{**SPARSE_ENV, "LONGSEQ_SPARSE_REUSE_STEPS": "4"})
    register()
    runner, layer = make_runner(16), make_layer(0)
    backend = ATTENTION_BACKENDS[NAME](runner)
    kept, new_pages = {}, 0
    for step, (q, out, seq_lens) in enumerate(prefill_and_decode(backend, runner, layer, steps=9)):
        for b, n in enumerate(seq_lens):
            if step % 4 == 0:
                want, ids, _ = quest_one(runner, q, b, n, 16, num_select=4, sink=1, recent=1, group_max=True)
                kept[b] = (ids, n)
            else:
                ids, n0 = kept[b]
                extra = list(range(math.ceil(n0 / 16), math.ceil(n / 16)))  # pages opened since the selection
                new_pages += len(extra)
                want, _, _ = quest_one(runner, q, b, n, 16, 4, 1, 1, True, keep=ids, extra=extra or [-1])
                fresh, _, _ = quest_one(runner, q, b, n, 16, 4, 1, 1, True)
                assert step != 1 or not torch.allclose(fresh, want, atol=1e-3)  # a new selection would differ
            torch.testing.assert_close(out.view(-1, HQ, D)[b:b + 1], want, atol=1e-5, rtol=1e-5)
    assert new_pages == 1  # request 1 opens page 13 (token 208) at step 7, after its selection at step 4


def test_dense_layers_and_budget_controls(longseq_env):
    """Layer ids below LONGSEQ_SPARSE_DENSE_LAYERS, and a budget covering the context, give dense output."""
    import torch
    from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS

    from longseq.attention_backends.sglang.sparse import TRACE
    from longseq.plugin.sglang import register

    register()
    for env, sparse_calls in (({**SPARSE_ENV, "LONGSEQ_SPARSE_DENSE_LAYERS": "1"}, 0),
                              ({**SPARSE_ENV, "LONGSEQ_SPARSE_BUDGET": "256"}, 1)):
        longseq_env(**env)
        runner = make_runner(16)
        backend = ATTENTION_BACKENDS[NAME](runner)
        before = TRACE.counts["sparse_decode_calls"]
        for q, out, seq_lens in prefill_and_decode(backend, runner, make_layer(0), steps=1):
            torch.testing.assert_close(out.view(-1, HQ, D), dense_reference(runner, q, seq_lens), atol=1e-5,
                                       rtol=1e-5)
        assert TRACE.counts["sparse_decode_calls"] - before == sparse_calls
        assert (0 in backend.indexes) == bool(sparse_calls)


def test_graph_metadata_hooks_build_the_same_block_table(longseq_env):
    """The CUDA-graph hooks gather a full-width block table into a static buffer; decode reads it and gives
    the eager result (torch_native has no graph state, so its hooks are stubbed here)."""
    import torch
    from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS
    from sglang.srt.model_executor.forward_batch_info import ForwardMode
    from sglang.srt.model_executor.forward_context import ForwardContext, forward_context

    from longseq.plugin.sglang import register

    longseq_env(**SPARSE_ENV)
    register()
    runner, layer = make_runner(32), make_layer(0)
    backend = ATTENTION_BACKENDS[NAME](runner)
    q, out, seq_lens = next(prefill_and_decode(backend, runner, layer, steps=1))
    eager_table = backend.block_table
    assert eager_table.shape == (2, math.ceil(max(seq_lens) / 32))
    backend.inner.init_cuda_graph_state = lambda max_bs, max_tokens: None
    backend.init_cuda_graph_state(4, 4)
    assert backend.graph_block_table.shape == (4, 256 // 32)
    batch = make_batch(runner, ForwardMode.DECODE, tuple(n - 1 for n in seq_lens), (1, 1), lambda r, pos: int(
        runner.req_to_token_pool.req_to_token[r, pos]))
    backend.init_forward_metadata_in_graph(batch)
    assert backend.block_table.data_ptr() == backend.graph_block_table.data_ptr()
    assert torch.equal(backend.block_table[:, : eager_table.shape[1]], eager_table)
    with torch.no_grad(), forward_context(ForwardContext(attn_backend=backend)):
        # the same decode again (no KV write), now reading the graph buffer's full-width table
        again = backend.forward_decode(q.reshape(2, -1), None, None, layer, batch, save_kv_cache=False)
    torch.testing.assert_close(again, out, atol=0, rtol=0)


# ---------------------------------------------------------------------------------------------------------
# 3. Start-up errors name the flag / variable to change.


@pytest.mark.parametrize(
    ("env", "runner_kw", "message"),
    [
        ({}, dict(page_size=1), r"--page-size 1 is not a multiple of LONGSEQ_SPARSE_PAGE_SIZE=8; "
                                r"pass --page-size 8 \(or a multiple of it\)"),
        ({"LONGSEQ_SPARSE_PAGE_SIZE": "32"}, dict(page_size=16),
         r"--page-size 16 is not a multiple of LONGSEQ_SPARSE_PAGE_SIZE=32; pass --page-size 32"),
        ({"LONGSEQ_SPARSE_BUDGET": "100"}, dict(page_size=16),
         r"LONGSEQ_SPARSE_BUDGET=100 must be a multiple of LONGSEQ_SPARSE_PAGE_SIZE=8"),
        ({"LONGSEQ_SPARSE_BUDGET": "lots"}, dict(page_size=16), r"LONGSEQ_SPARSE_BUDGET='lots' must be an integer"),
        ({"LONGSEQ_SPARSE_BUDGET": "0"}, dict(page_size=16), r"LONGSEQ_SPARSE_BUDGET=0 must be a positive integer"),
        ({"LONGSEQ_SPARSE_BUDGET": "32"}, dict(page_size=16),
         r"LONGSEQ_SPARSE_SINK_PAGES \+ LONGSEQ_SPARSE_RECENT_PAGES \(1 \+ 8\) exceed the budget of 4 pages"),
        ({}, dict(page_size=16, head_dim=512), r"sparse mode supports head sizes up to 256, not 512"),
        ({}, dict(page_size=16, kv_cache_dtype_str="fp8_e4m3"), r"--kv-cache-dtype fp8_e4m3 is not supported"),
        ({"LONGSEQ_SGLANG_DENSE": NAME}, dict(page_size=16),
         r"LONGSEQ_SGLANG_DENSE='longseq_sparse' is not an SGLang attention backend"),
    ],
)
def test_startup_errors(env, runner_kw, message, longseq_env, monkeypatch):
    import longseq.config as config
    from longseq.config import LongSeqConfigError
    from longseq.plugin.sglang import create_sparse_backend

    try:
        longseq_env(**env)
    except LongSeqConfigError:
        monkeypatch.setattr(config, "_CACHED", None)  # as in a fresh process: the factory must report it too
    runner = make_runner(max_context_len=32, **runner_kw)
    with pytest.raises(LongSeqConfigError, match=message):
        create_sparse_backend(runner)


def test_startup_error_for_head_major_kv_layout(longseq_env, monkeypatch):
    from longseq.config import LongSeqConfigError
    from longseq.plugin.sglang import create_sparse_backend

    longseq_env()
    monkeypatch.setenv("SGLANG_USE_HND_KVCACHE", "1")
    runner = make_runner(16, max_context_len=32)
    assert runner.token_to_kv_pool.kv_cache_layout == "hnd"
    with pytest.raises(LongSeqConfigError, match="KV cache layout 'hnd' is not supported"):
        create_sparse_backend(runner)


# ---------------------------------------------------------------------------------------------------------
# 4. Registration: registry, CLI choices, idempotency, the entry point in a fresh interpreter.


def test_registered_with_registry_and_cli():
    import argparse

    from sglang.srt.arg_groups.choices import ATTENTION_BACKEND_CHOICES
    from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS
    from sglang.srt.server_args import ServerArgs

    from longseq.plugin.sglang import create_dense_backend, create_sparse_backend, register

    register()
    register()
    assert ATTENTION_BACKENDS[NAME] is create_sparse_backend
    assert ATTENTION_BACKENDS["longseq_dense"] is create_dense_backend
    assert ATTENTION_BACKEND_CHOICES.count(NAME) == 1 and ATTENTION_BACKEND_CHOICES.count("longseq_dense") == 1
    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)
    args = parser.parse_args(["--model-path", "unused", "--attention-backend", NAME, "--page-size", "16",
                              "--decode-attention-backend", NAME])
    assert (args.attention_backend, args.decode_attention_backend, args.page_size) == (NAME, NAME, 16)


PROBE = textwrap.dedent("""
    import json, sys
    from sglang.srt.arg_groups.choices import ATTENTION_BACKEND_CHOICES
    from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS
    from sglang.srt.plugins import load_plugins
    before = "longseq_sparse" in ATTENTION_BACKENDS or "longseq_sparse" in ATTENTION_BACKEND_CHOICES
    load_plugins()
    f = ATTENTION_BACKENDS.get("longseq_sparse")
    print("LONGSEQ_PROBE " + json.dumps({
        "before": before, "factory": f and f"{f.__module__}.{f.__qualname__}",
        "choices": ATTENTION_BACKEND_CHOICES.count("longseq_sparse"),
        "imported": "longseq.attention_backends.sglang.sparse" in sys.modules}))
""")


def test_entry_point_registers_sparse_lazily(tmp_path):
    proc = subprocess.run([sys.executable, "-c", PROBE], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env=clean_env())
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("LONGSEQ_PROBE ")]
    assert proc.returncode == 0 and lines, proc.stderr[-4000:]
    out = json.loads(lines[-1].removeprefix("LONGSEQ_PROBE "))
    assert out == {"before": False, "factory": "longseq.plugin.sglang.create_sparse_backend", "choices": 1,
                   "imported": False}

