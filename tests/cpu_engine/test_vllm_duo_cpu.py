"""Duo mode end to end on vLLM's real CPU engine (SmolLM2-135M-Instruct: 30 layers x 3 KV heads).

Streaming heads see sink + recent tokens only. Checks that the engine runs our DuoAttention path, that it
reduces to dense when nothing is cut (all heads retrieval, or a window covering the context), that a small window
changes the output (negative control), and that a pattern of the wrong shape stops the engine at start-up with a
clear message. "Reduces to dense" means the same greedy tokens up to, at most, a split where dense's own top-2
log-probs nearly tie (``engine_utils.compare_greedy``): the duo reference (fp32 einsum + softmax) and the dense
torch path (fp32 SDPA) sum in another order, and on a CPU with AVX-512/AMX that flipped a near-tie of one prompt
(2026-11-30), where earlier CPUs gave identical tokens.
"""

from __future__ import annotations

import pytest

from engine_utils import EngineRunError, compare_greedy, read_traces, run_llm

pytestmark = pytest.mark.engine

MAX_TOKENS = 16
#: Log-prob agreement required before any split (both paths fp32 attention; bf16 logits differ by an ulp or so).
LOGPROB_TOL = 0.2


@pytest.fixture(scope="module")
def prompts(smollm2_path):
    from transformers import AutoTokenizer

    from longseq.models.prompts import make_prompts

    return make_prompts(AutoTokenizer.from_pretrained(smollm2_path), [600, 250, 40], seed=11)


@pytest.fixture(scope="module")
def dense(smollm2_path, prompts):
    return run_llm(smollm2_path, prompts, MAX_TOKENS, {"LONGSEQ_CPU": "1", "LONGSEQ_CPU_KERNEL": "torch"},
                   logprobs=2)


def _pattern(tmp_path, layers=30, kv_heads=3, seed=0, sink=64, recent=256) -> str:
    from longseq.attention_backends.core.duo_pattern import random_pattern, save_duo_pattern

    path = tmp_path / f"pattern-{layers}x{kv_heads}-{sink}-{recent}"
    save_duo_pattern(random_pattern(layers, kv_heads, seed, sink_size=sink, recent_size=recent), path)
    return str(path)


def _duo(smollm2_path, prompts, pattern, trace_dir, **env):
    return run_llm(smollm2_path, prompts, MAX_TOKENS, {"LONGSEQ_CPU": "1", "LONGSEQ_ATTENTION": "duo",
                                                       "LONGSEQ_DUO_PATTERN": pattern,
                                                       "LONGSEQ_TRACE_DIR": str(trace_dir), **env}, logprobs=2)


def test_duo_with_nothing_cut_is_dense(smollm2_path, prompts, dense, tmp_path):
    """Half the heads streaming, but sink + window cover every context: dense tokens, through the duo path."""
    pattern = _pattern(tmp_path, sink=64, recent=4096)
    out = _duo(smollm2_path, prompts, pattern, tmp_path / "trace", LONGSEQ_DUO_SPARSITY="0.5")
    traces = read_traces(str(tmp_path / "trace"))
    assert max(t["duo_calls"] for t in traces) > 0 and max(t["num_layers"] for t in traces) == 30, traces
    report = compare_greedy(dense, out)  # raises unless every difference starts at a near-tie of dense
    assert report["max_logprob_diff"] < LOGPROB_TOL, report  # and up to there the same distribution


def test_duo_small_window_changes_tokens_all_retrieval_does_not(smollm2_path, prompts, dense, tmp_path):
    pattern = _pattern(tmp_path, sink=4, recent=32)
    # Same batch as the dense run: vLLM's GEMMs round differently at another batch size.
    cut = _duo(smollm2_path, prompts, pattern, tmp_path / "t1", LONGSEQ_DUO_SPARSITY="1.0")
    assert cut["tokens"][0] != dense["tokens"][0]  # negative control: the 600-token prompt loses its middle
    with pytest.raises(AssertionError, match="parts at step"):
        compare_greedy(dense, cut)  # ... and not at a near-tie: a real difference
    full = _duo(smollm2_path, prompts, pattern, tmp_path / "t2", LONGSEQ_DUO_SPARSITY="0")
    report = compare_greedy(dense, full)  # no streaming head: dense
    assert report["max_logprob_diff"] < LOGPROB_TOL, report


def test_pattern_of_wrong_shape_stops_engine_at_startup(smollm2_path, tmp_path):
    pattern = _pattern(tmp_path, layers=24, kv_heads=4)
    with pytest.raises(EngineRunError) as e:
        _duo(smollm2_path, [[1, 2, 3]], pattern, tmp_path / "trace")
    assert "has 24 layers x 4 KV heads, the model has 30 x 3" in e.value.log
