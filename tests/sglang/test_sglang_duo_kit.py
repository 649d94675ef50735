"""``longseq_duo`` on CPU: SGLang's attention kit (every head streaming, window covering the context: dense),
DuoAttention against the PyTorch references over SGLang's real pools and ForwardBatch (chunked prefill with a
prefix, then decode, both head kinds present), start-up errors, and registration."""

from __future__ import annotations

import pytest

from test_sglang_sparse_kit import D, HKV, HQ, make_batch, make_layer, make_runner, request_kv, run_layer

pytestmark = pytest.mark.sglang
NAME = "longseq_duo"


def _case_names() -> list[str]:
    try:
        from sglang_kit import kit_cases

        return [c.name for c in kit_cases(NAME)]
    except ImportError:  # no sglang here: one placeholder, failed by conftest's _require_sglang if selected
        return ["sglang-not-installed"]


@pytest.fixture
def model_shape(monkeypatch):
    """The kit's TinyModelConfig lacks ModelConfig's layer count and total-KV-heads accessor: one layer."""
    from sglang.test.kits.attention_unittest.attention_methods import dense_attention as da

    monkeypatch.setattr(da.TinyModelConfig, "num_hidden_layers", 1, raising=False)
    monkeypatch.setattr(da.TinyModelConfig, "get_total_num_kv_heads", lambda self: self.num_key_value_heads,
                        raising=False)


def write_pattern(folder, gates, sink: int, recent: int) -> str:
    import torch

    from longseq.attention_backends.core.duo_pattern import DuoPattern, save_duo_pattern

    save_duo_pattern(DuoPattern(torch.tensor(gates, dtype=torch.float64), sink, recent), folder)
    return str(folder)


# ---------------------------------------------------------------------------------------------------------
# 1. SGLang's attention kit: every KV head streaming, but sink + recent cover each context (< 64 tokens), so
#    the duo path (not the inner backend) must reproduce the kit's SDPA reference.


@pytest.mark.parametrize("case_name", _case_names())
def test_attention_kit_case_all_streaming_wide_window(case_name, longseq_env, model_shape, tmp_path):
    from sglang_kit import kit_cases, run_case

    from longseq.attention_backends.sglang.duo import TRACE, LongSeqDuoBackend
    from longseq.plugin.sglang import register

    case = {c.name: c for c in kit_cases(NAME)}[case_name]
    pattern = write_pattern(tmp_path / "p", [[0.5] * case.num_kv_heads], sink=8, recent=64)
    longseq_env(LONGSEQ_DUO_PATTERN=pattern, LONGSEQ_DUO_SPARSITY="1.0")
    register()
    before = dict(TRACE.counts)
    backend = run_case(case)  # float32, tight tolerance against the kit's reference
    assert type(backend) is LongSeqDuoBackend and backend.inner_name == "torch_native"
    assert bool(backend.mask.is_streaming.all())
    delta = {k: TRACE.counts[k] - before[k] for k in before}
    swa = case.sliding_window_size is not None  # sliding-window layers stay on the inner backend
    assert delta["duo_calls"] == (0 if swa else 1)
    assert delta["forward_calls"] == delta["backends_built"] == 1


# ---------------------------------------------------------------------------------------------------------
# 2. Duo vs the references on real SGLang pools: KV head 0 streams, KV head 1 is a retrieval head.

SINK, RECENT = 4, 24
CONTEXT, CHUNK = (150, 131), (70, 45)  # two chunked-prefill steps (the second with a cached prefix)


def run_rows(backend, layer, batch, gen):
    """Fresh random q/k/v through RadixAttention -> backend; returns (q [T, Hq, D], out [T, Hq, D])."""
    q, _, out = run_layer(backend, layer, batch, gen)
    return q.view(-1, HQ, D), out.view(-1, HQ, D)


def reference(runner, q, prefix_lens, new_lens, is_streaming):
    """Per request: its KV gathered through req_to_token, then ``duo_prefill_ref`` at the right positions."""
    import torch

    from longseq.kernels.duo_attention import duo_prefill_ref

    outs, row = [], 0
    for b, (p, n) in enumerate(zip(prefix_lens, new_lens)):
        k, v = request_kv(runner, b, p + n)
        outs.append(duo_prefill_ref(q[row:row + n], k, v, is_streaming, SINK, RECENT, D**-0.5, q_start=p))
        row += n
    return torch.cat(outs)


@pytest.mark.parametrize("kernel", ["reference", "triton"])
@pytest.mark.parametrize("sglang_page_size", [1, 16])
def test_duo_matches_reference_prefill_with_prefix_and_decode(sglang_page_size, kernel, longseq_env, model_shape,
                                                              tmp_path, monkeypatch):
    """``reference``: the CPU path. ``triton``: the CUDA path (paged view of P-slot pages, block table gathered
    per step, one launch per step), here on CPU tensors under Triton's interpreter."""
    import torch
    from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS
    from sglang.srt.model_executor.forward_batch_info import ForwardMode
    from sglang.test.kits.attention_unittest.attention_methods.dense_attention import make_loc_fn

    import longseq.attention_backends.sglang.duo as duo
    from longseq.plugin.sglang import register

    monkeypatch.setattr(duo, "MAX_QUERY_ROWS", 32)  # the prefill chunks span several query blocks
    pattern = write_pattern(tmp_path / "p", [[0.2, 0.8]], sink=SINK, recent=RECENT)
    longseq_env(LONGSEQ_DUO_PATTERN=pattern, LONGSEQ_DUO_SPARSITY="0.5")
    register()
    runner, layer = make_runner(sglang_page_size), make_layer(0)
    backend = ATTENTION_BACKENDS[NAME](runner)
    assert backend.kernel == "reference"  # CPU tensors
    tol = 1e-5
    if kernel == "triton":
        from triton_interp import import_kernels

        import_kernels("longseq.kernels.duo_attention.unified")
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        backend.kernel, tol = "triton", 1e-4  # the kernel's online softmax sums in another order
    is_streaming = torch.tensor([True, False])
    assert torch.equal(backend.mask.for_layer(0), is_streaming)

    steps = 2
    total = tuple(c + steps for c in CONTEXT)
    loc_fn = make_loc_fn("shuffled_pages", batch_size=2, seq_lens=total, prefix_lens=(0, 0),
                         page_size=sglang_page_size, max_context_len=256, seed=7)
    gen = torch.Generator().manual_seed(5)
    rest = tuple(c - h for c, h in zip(CONTEXT, CHUNK))
    before = duo.TRACE.counts["duo_calls"]
    plan = [(ForwardMode.EXTEND, (0, 0), CHUNK), (ForwardMode.EXTEND, CHUNK, rest)]
    plan += [(ForwardMode.DECODE, tuple(c + s for c in CONTEXT), (1, 1)) for s in range(steps)]
    for mode, prefix, new in plan:
        q, out = run_rows(backend, layer, make_batch(runner, mode, prefix, new, loc_fn), gen)
        expected = reference(runner, q, prefix, new, is_streaming)
        torch.testing.assert_close(out, expected, atol=tol, rtol=tol)
        dense = reference(runner, q, prefix, new, torch.tensor([False, False]))
        g = HQ // HKV  # query heads 0..g-1 use the streaming KV head, g..2g-1 the retrieval head
        torch.testing.assert_close(out[:, g:], dense[:, g:], atol=tol, rtol=tol)
        if mode.is_decode() or prefix != (0, 0):  # every query sees more than sink + recent keys: cut
            assert (out[:, :g] - dense[:, :g]).abs().amax() > 0.05
    assert duo.TRACE.counts["duo_calls"] - before == len(plan)


def test_graph_metadata_hooks_give_the_triton_decode_the_eager_result(longseq_env, model_shape, tmp_path,
                                                                      monkeypatch):
    """The CUDA path's graph hooks gather a full-width block table into a static buffer (recorded into the
    graph, re-gathered on every replay); a decode step reading it gives the eager step's output exactly. Triton's
    interpreter on CPU tensors; torch_native has no graph state, so its hooks are stubbed."""
    import torch
    from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS
    from sglang.srt.model_executor.forward_batch_info import ForwardMode
    from sglang.srt.model_executor.forward_context import ForwardContext, forward_context
    from sglang.test.kits.attention_unittest.attention_methods.dense_attention import make_loc_fn
    from triton_interp import import_kernels

    from longseq.plugin.sglang import register

    import_kernels("longseq.kernels.duo_attention.unified")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    longseq_env(LONGSEQ_DUO_PATTERN=write_pattern(tmp_path / "p", [[0.2, 0.8]], sink=SINK, recent=RECENT),
                LONGSEQ_DUO_SPARSITY="0.5")
    register()
    runner, layer = make_runner(16), make_layer(0)
    backend = ATTENTION_BACKENDS[NAME](runner)
    backend.kernel = "triton"
    loc_fn = make_loc_fn("shuffled_pages", batch_size=2, seq_lens=tuple(c + 1 for c in CONTEXT), prefix_lens=(0, 0),
                         page_size=16, max_context_len=256, seed=7)
    gen = torch.Generator().manual_seed(5)
    run_rows(backend, layer, make_batch(runner, ForwardMode.EXTEND, (0, 0), CONTEXT, loc_fn), gen)
    decode = make_batch(runner, ForwardMode.DECODE, CONTEXT, (1, 1), loc_fn)
    q, out = run_rows(backend, layer, decode, gen)
    eager_table = backend.block_table
    assert eager_table.shape == (2, -(-(max(CONTEXT) + 1) // 16))
    backend.inner.init_cuda_graph_state = lambda max_bs, max_tokens: None
    backend.inner.init_forward_metadata_in_graph = lambda fb: None
    backend.init_cuda_graph_state(4, 4)
    assert backend.graph_block_table.shape == (4, 256 // 16)
    backend.init_forward_metadata_in_graph(decode)
    assert backend.block_table.data_ptr() == backend.graph_block_table.data_ptr()
    assert torch.equal(backend.block_table[:, : eager_table.shape[1]], eager_table)
    with torch.no_grad(), forward_context(ForwardContext(attn_backend=backend)):
        again = backend.forward_decode(q.reshape(2, -1), None, None, layer, decode, save_kv_cache=False)
    torch.testing.assert_close(again.view(-1, HQ, D), out, atol=0, rtol=0)


def test_layer_without_streaming_heads_runs_inner_backend(longseq_env, model_shape, tmp_path, monkeypatch):
    """Threshold below every gate: no head streams, the inner backend runs (and dense output comes back)."""
    import torch
    from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS
    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    import longseq.attention_backends.sglang.duo as duo
    from longseq.plugin.sglang import register

    pattern = write_pattern(tmp_path / "p", [[0.2, 0.8]], sink=SINK, recent=RECENT)
    longseq_env(LONGSEQ_DUO_PATTERN=pattern, LONGSEQ_DUO_THRESHOLD="0.1")
    register()
    runner = make_runner(16)
    backend = ATTENTION_BACKENDS[NAME](runner)
    before = duo.TRACE.counts["duo_calls"]
    batch = make_batch(runner, ForwardMode.EXTEND, (0, 0), (40, 30), lambda r, pos: 16 + r * 64 + pos)
    q, out = run_rows(backend, make_layer(0), batch, torch.Generator().manual_seed(3))
    torch.testing.assert_close(out, reference(runner, q, (0, 0), (40, 30), torch.tensor([False, False])),
                               atol=1e-5, rtol=1e-5)
    assert duo.TRACE.counts["duo_calls"] == before


# ---------------------------------------------------------------------------------------------------------
# 3. Start-up errors name the pattern, the shapes or the flag to change.


@pytest.mark.parametrize(
    ("gates", "env", "message"),
    [
        ([[0.2, 0.8, 0.5]], {}, r"has 1 layers x 3 KV heads, the model has 1 x 2"),
        ([[0.2, 0.8], [0.3, 0.4]], {}, r"has 2 layers x 2 KV heads, the model has 1 x 2"),
        ([[0.2, 0.8]], {"LONGSEQ_DUO_SPARSITY": "1.5"}, r"LONGSEQ_DUO_SPARSITY=1.5 must be in \[0, 1\]"),
        ([[0.2, 0.8]], {"LONGSEQ_SGLANG_DENSE": "longseq_sparse"}, r"wraps one of SGLang's dense backends"),
        ([[0.2, 0.8]], {"LONGSEQ_ATTENTION": "duo", "LONGSEQ_DUO_MEMORY": "1"},
         r"LONGSEQ_DUO_MEMORY=1 .* is implemented for vLLM only"),
    ],
)
def test_startup_errors(gates, env, message, longseq_env, model_shape, tmp_path, monkeypatch):
    import longseq.config as config
    from longseq.config import LongSeqConfigError
    from longseq.plugin.sglang import create_duo_backend

    pattern = write_pattern(tmp_path / "p", gates, sink=SINK, recent=RECENT)
    try:
        longseq_env(LONGSEQ_DUO_PATTERN=pattern, **env)
    except LongSeqConfigError:
        monkeypatch.setattr(config, "_CACHED", None)  # as in a fresh process: the factory must report it too
    with pytest.raises(LongSeqConfigError, match=message):
        create_duo_backend(make_runner(16, max_context_len=32))


def test_startup_errors_no_pattern_and_gpu(longseq_env, model_shape, tmp_path):
    from longseq.config import LongSeqConfigError
    from longseq.plugin.sglang import create_duo_backend

    longseq_env()
    runner = make_runner(16, max_context_len=32)
    with pytest.raises(LongSeqConfigError, match="duo mode needs LONGSEQ_DUO_PATTERN"):
        create_duo_backend(runner)
    longseq_env(LONGSEQ_DUO_PATTERN=write_pattern(tmp_path / "p", [[0.2, 0.8]], sink=SINK, recent=RECENT))
    runner.device = "xpu:0"
    with pytest.raises(LongSeqConfigError, match="longseq_duo runs on CPU and CUDA, not on xpu:0"):
        create_duo_backend(runner)


def test_registered_with_registry_and_cli():
    from sglang.srt.arg_groups.choices import ATTENTION_BACKEND_CHOICES
    from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS

    from longseq.plugin.sglang import create_duo_backend, register

    register()
    register()
    assert ATTENTION_BACKENDS[NAME] is create_duo_backend and ATTENTION_BACKEND_CHOICES.count(NAME) == 1
