"""GPU (vLLM 0.26 on an H100, through ../shared/gpu): dense mode gives FLASH_ATTN's greedy tokens with CUDA graphs.

Run on the GPU machine: ``source /tmp/lsq-bundle/env.sh && python -m pytest tests -m gpu``.
"""

from __future__ import annotations


import pytest

from engine_utils import read_traces, run_llm
from longseq.models.prompts import make_prompts

pytestmark = pytest.mark.gpu

MAX_TOKENS = 48
LENGTHS = [2000, 1500, 700, 200, 60, 9]
GPU_KWARGS = {"enforce_eager": False, "gpu_memory_utilization": 0.3, "max_num_seqs": 16,
              "compilation_config": {"mode": 0, "cudagraph_mode": "FULL_DECODE_ONLY"}}


@pytest.fixture(scope="module")
def prompts(smollm2_path):
    from transformers import AutoTokenizer

    return make_prompts(AutoTokenizer.from_pretrained(smollm2_path), LENGTHS, seed=1, shared_prefix=(0, 1, 1200))


@pytest.fixture(scope="module")
def flash_run(smollm2_path, prompts):
    return run_llm(smollm2_path, prompts, MAX_TOKENS, {},
                   {**GPU_KWARGS, "attention_config": {"backend": "FLASH_ATTN"}})


def test_dense_custom_backend_matches_flash_attn_with_cuda_graphs(smollm2_path, prompts, flash_run, tmp_path):
    ours = run_llm(smollm2_path, prompts, MAX_TOKENS, {"LONGSEQ_ATTENTION": "dense", "LONGSEQ_TRACE_DIR": str(tmp_path)},
                   {**GPU_KWARGS, "attention_config": {"backend": "CUSTOM"}})
    traces = [t for t in read_traces(str(tmp_path)) if t["backend"] == "cuda"]
    assert traces and max(t["num_layers"] for t in traces) == 30, traces
    assert "FULL_DECODE_ONLY" in str(ours["cudagraph_mode"]), ours["cudagraph_mode"]
    assert ours["cudagraph_mode"] == flash_run["cudagraph_mode"]
    for i, (a, b) in enumerate(zip(ours["tokens"], flash_run["tokens"])):
        assert a == b, f"prompt {i} ({LENGTHS[i]} tokens) differs"


def test_negative_control_changes_tokens_on_gpu(smollm2_path, prompts, flash_run):
    bad = run_llm(smollm2_path, prompts[3:], 8, {"LONGSEQ_DEBUG_FAULT": "skip_kv_write"},
                  {**GPU_KWARGS, "attention_config": {"backend": "CUSTOM"}})
    assert bad["tokens"] != [t[:8] for t in flash_run["tokens"][3:]]


# ------------------------------------------------------------------------------------------ sparse mode
SPARSE_KW = {**GPU_KWARGS, "dtype": "bfloat16", "seed": 0, "enable_prefix_caching": True,
             "attention_config": {"backend": "CUSTOM"}}


def _sparse_vs_dense(smollm2_path, prompts, dense_tokens, env, max_tokens):
    """Teacher-forced (dense tokens fed) and free-running sparse runs in one engine, vs dense."""
    from longseq.eval.fidelity import run_session

    res = run_session(smollm2_path, [{"prompts": prompts, "max_tokens": max_tokens, "forced": dense_tokens},
                                     {"prompts": prompts, "max_tokens": max_tokens}],
                      {"LONGSEQ_ATTENTION": "sparse", **env}, SPARSE_KW)
    return res


@pytest.fixture(scope="module")
def dense_logprob_run(smollm2_path, prompts):
    from longseq.eval.fidelity import run_generation

    return run_generation(smollm2_path, prompts, MAX_TOKENS, {"LONGSEQ_ATTENTION": "dense"}, SPARSE_KW)


def test_sparse_budget_covering_context_matches_dense_with_cuda_graphs(smollm2_path, prompts, dense_logprob_run):
    """Budget 2048 >= every request's length (<= 2000 + 48): every page is selected, so sparse decode computes
    dense attention (another summation order): teacher-forced argmax agreement and KL at float noise level."""
    from longseq.eval.fidelity import compare

    res = _sparse_vs_dense(smollm2_path, prompts, dense_logprob_run["tokens"], {"LONGSEQ_SPARSE_BUDGET": "2048"},
                           MAX_TOKENS)
    m = compare(dense_logprob_run, res["runs"][0], res["runs"][1])
    assert res["runs"][0]["tokens"] == dense_logprob_run["tokens"]  # forcing worked
    assert any(t["technique"] == "sparse" and t.get("sparse_decode_calls", 0) > 0 for t in res["trace"]), res["trace"]
    assert m["agreement"] >= 0.99 and m["mean_kl"] <= 1e-3, m


def test_sparse_small_budget_fidelity_and_negative_control(smollm2_path, prompts, dense_logprob_run):
    """Budget 1024 on prompts up to 2000 tokens (mixed batch: short requests dense-equivalent, long ones sparse):
    close to dense; budget 64 with no dense layers must change tokens (the sparse path is live under graphs)."""
    from longseq.eval.fidelity import compare

    res = _sparse_vs_dense(smollm2_path, prompts, dense_logprob_run["tokens"], {"LONGSEQ_SPARSE_BUDGET": "1024"},
                           MAX_TOKENS)
    m = compare(dense_logprob_run, res["runs"][0], res["runs"][1])
    print("budget 1024:", {k: m[k] for k in ("agreement", "mean_kl", "free_running_match")})
    assert m["agreement"] >= 0.97 and m["mean_kl"] <= 0.02, m
    low = _sparse_vs_dense(smollm2_path, prompts[:2], dense_logprob_run["tokens"][:2],
                           {"LONGSEQ_SPARSE_BUDGET": "64", "LONGSEQ_SPARSE_RECENT_PAGES": "1",
                            "LONGSEQ_SPARSE_DENSE_LAYERS": "0"}, MAX_TOKENS)
    m_low = compare({k: v[:2] for k, v in dense_logprob_run.items() if k in ("tokens", "logprobs")},
                    low["runs"][0], low["runs"][1])
    assert m_low["mean_kl"] > 10 * m["mean_kl"] and low["runs"][1]["tokens"] != dense_logprob_run["tokens"][:2], m_low
