"""``longseq_dense`` under SGLang's own attention test kit on CPU, and its delegation to the inner backend."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import clean_env

pytestmark = pytest.mark.sglang
KIT = Path(__file__).with_name("sglang_kit.py")


def _case_names() -> list[str]:
    try:
        from sglang_kit import kit_cases

        return [c.name for c in kit_cases()]
    except ImportError:  # no sglang here: one placeholder, failed by conftest's _require_sglang if selected
        return ["sglang-not-installed"]


@pytest.mark.parametrize("case_name", _case_names())
def test_attention_kit_case(case_name, longseq_env):
    """Each kit case matches SGLang's SDPA reference (float32-tight), and exactly one call went through our wrapper."""
    from sglang_kit import kit_cases, run_case

    from longseq.plugin.sglang import register

    longseq_env()
    register()
    from longseq.attention_backends.sglang.dense import TRACE

    case = {c.name: c for c in kit_cases()}[case_name]
    before = dict(TRACE.counts)
    backend = run_case(case)
    assert type(backend).__name__ == "LongSeqDenseBackend" and backend.inner_name == "torch_native"
    mode = "decode_calls" if case.forward_mode.is_decode() else "extend_calls"
    assert TRACE.counts["forward_calls"] - before["forward_calls"] == 1
    assert TRACE.counts[mode] - before[mode] == 1
    assert TRACE.counts["backends_built"] - before["backends_built"] == 1
    assert "torch_native" in TRACE.inner


def test_kit_fixture_uses_wrapper_around_torch_native(longseq_env):
    import torch
    from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend
    from sglang.test.kits.attention_unittest.attention_methods.dense_attention import build_dense_attention_fixture
    from sglang_kit import NoSkipCase, kit_cases

    from longseq.attention_backends.sglang.dense import LongSeqDenseBackend
    from longseq.plugin.sglang import register

    longseq_env()
    register()
    with torch.no_grad():
        fixture = build_dense_attention_fixture(NoSkipCase(), kit_cases()[0], device="cpu", dtype=torch.float32)
    backend = fixture.backend
    assert type(backend) is LongSeqDenseBackend and backend.inner_name == "torch_native"
    assert type(backend.inner) is TorchNativeAttnBackend
    # attributes of the inner backend read through the wrapper
    assert backend.token_to_kv_pool is fixture.runner.token_to_kv_pool
    assert backend.needs_cpu_seq_lens == backend.inner.needs_cpu_seq_lens


def test_fresh_process_entry_point_kit_and_trace(tmp_path):
    """Clean interpreter: entry point registers lazily, all kit cases pass, the trace marker is exact."""
    trace = tmp_path / "trace"
    proc = subprocess.run([sys.executable, str(KIT)], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env=clean_env(LONGSEQ_TRACE_DIR=str(trace)))
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("LONGSEQ_PROBE ")]
    assert proc.returncode == 0 and lines, proc.stderr[-4000:]
    out = json.loads(lines[-1].removeprefix("LONGSEQ_PROBE "))
    assert out["before"] is False  # nothing registered it before load_plugins()
    assert out["factory"] == "longseq.plugin.sglang.create_dense_backend"
    assert out["choice_count"] == 1
    assert out["dense_imported_at_registration"] is False  # the backend module is imported by the factory only
    assert out["cases"] >= 12 and out["failures"] == {}
    assert out["counts"]["forward_calls"] == out["cases"] == out["counts"]["backends_built"]
    marker = json.loads((trace / f"sglang-longseq_dense-{out['pid']}.json").read_text())  # flushed at exit
    assert marker == {"framework": "sglang", "backend": "longseq_dense", "pid": out["pid"], "inner": ["torch_native"],
                      "technique": "dense", **out["counts"]}
    assert marker["decode_calls"] > 0 and marker["extend_calls"] > 0


@pytest.fixture
def fake_inner(monkeypatch):
    """An inner backend registered as ``longseq_test_fake`` that records what the wrapper forwards."""
    from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS
    from sglang.srt.layers.attention.base_attn_backend import AttentionBackend

    class Fake(AttentionBackend):
        needs_cpu_seq_lens = False

        def __init__(self, runner):
            self.runner, self.calls, self.custom = runner, [], 7

        def init_cuda_graph_state(self, max_bs, max_num_tokens):
            self.calls.append(("init_cuda_graph_state", max_bs, max_num_tokens))

        def get_cuda_graph_seq_len_fill_value(self):
            return 1

        def init_forward_metadata_out_graph(self, fb, in_capture=False):
            self.calls.append(("out_graph", fb, in_capture))
            self.forward_metadata = ("meta", fb)

        def init_forward_metadata_in_graph(self, fb):
            self.calls.append(("in_graph", fb))

        def forward_decode(self, q, k, v, layer, fb, save_kv_cache=True, **kw):
            return ("decode", q, save_kv_cache, kw)

        def forward_extend(self, q, k, v, layer, fb, save_kv_cache=True, **kw):
            return ("extend", q, save_kv_cache, kw)

    monkeypatch.setitem(ATTENTION_BACKENDS, "longseq_test_fake", Fake)
    return Fake


def test_wrapper_delegates_everything(fake_inner):
    from sglang.srt.layers.attention.base_attn_backend import AttentionBackend
    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    from longseq.attention_backends.sglang.dense import TRACE, LongSeqDenseBackend
    from longseq.config import LongSeqConfig

    runner = SimpleNamespace(device="cuda")
    w = LongSeqDenseBackend(runner, LongSeqConfig(sglang_dense_backend="longseq_test_fake"))
    inner = w.inner
    assert isinstance(w, AttentionBackend) and type(inner) is fake_inner and inner.runner is runner
    # every public AttentionBackend member is defined on the wrapper itself (nothing falls back to the base)
    missing = [n for n in vars(AttentionBackend) if not n.startswith("_") and n not in vars(LongSeqDenseBackend)]
    assert missing == []
    # CUDA-graph API and metadata hooks
    w.init_cuda_graph_state(8, 64)
    assert w.get_cuda_graph_seq_len_fill_value() == 1
    fb = SimpleNamespace(forward_mode=ForwardMode.DECODE)
    w.init_forward_metadata(fb)
    w.init_forward_metadata_out_graph(fb, in_capture=True)
    assert inner.calls == [("init_cuda_graph_state", 8, 64), ("out_graph", fb, False), ("in_graph", fb),
                           ("out_graph", fb, True)]
    assert w.forward_metadata == ("meta", fb)
    # class flags, extra attributes and writes go to the inner backend
    assert w.needs_cpu_seq_lens is False and w.custom == 7
    w.custom, w.forward_metadata = 8, "new"
    assert inner.custom == 8 and inner.forward_metadata == "new" and "custom" not in vars(w)
    # forward paths: counted once each, results and kwargs passed through
    before = dict(TRACE.counts)
    assert w.forward("q", "k", "v", None, fb, False, sinks="s") == ("decode", "q", False, {"sinks": "s"})
    assert w.forward_extend("q", "k", "v", None, fb) == ("extend", "q", True, {})
    assert TRACE.counts["forward_calls"] - before["forward_calls"] == 2
    assert TRACE.counts["decode_calls"] - before["decode_calls"] == 1


def test_inner_backend_choice():
    from longseq.attention_backends.sglang.dense import resolve_inner_backend
    from longseq.config import LongSeqConfigError

    assert resolve_inner_backend("auto", "cpu") == "torch_native"
    assert resolve_inner_backend("auto", "cuda") == "triton"
    assert resolve_inner_backend("auto", "cuda:1") == "triton"
    assert resolve_inner_backend("flashinfer", "cuda") == "flashinfer"
    for bad in ("nope", "longseq_dense"):
        with pytest.raises(LongSeqConfigError, match=r"LONGSEQ_SGLANG_DENSE=.*allowed values: auto, .*torch_native"):
            resolve_inner_backend(bad, "cpu")


def test_factory_reports_bad_inner_setting(longseq_env):
    from longseq.config import LongSeqConfigError
    from longseq.plugin.sglang import create_dense_backend

    longseq_env(LONGSEQ_SGLANG_DENSE="no_such_backend")
    with pytest.raises(LongSeqConfigError, match="'no_such_backend' is not an SGLang attention backend"):
        create_dense_backend(SimpleNamespace(device="cpu"))
