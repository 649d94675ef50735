"""Hybrid models (sliding-window and global layers) end to end on vLLM's real CPU engine, every mode.

``tiny-gemma3-hybrid`` (``longseq.models.tiny``): the Gemma-3 layout, 5 of 6 layers windowed (64 tokens), MQA,
head_dim 256, random weights; ``tiny-gemma2-softcap``: windowed and global layers alternating, attention logits
soft-capped; ``tiny-gptoss-sinks``: the gpt-oss layout (learned sinks on every layer, MoE). Windowed layers keep
their window and vLLM's kernel in every mode; sparse and duo apply to the global layers only, with the layer's
soft-cap and sinks. Prompts are longer than the window so that it matters.
"""

from __future__ import annotations

import random

import pytest

from engine_utils import compare_greedy, read_traces, run_llm

pytestmark = pytest.mark.engine

MAX_TOKENS = 12
LENGTHS = [300, 150, 40]
SPARSE_ENV = {"LONGSEQ_ATTENTION": "sparse", "LONGSEQ_SPARSE_BUDGET": "64", "LONGSEQ_SPARSE_PAGE_SIZE": "16",
              "LONGSEQ_SPARSE_RECENT_PAGES": "2"}


def _prompts() -> list[list[int]]:
    rng = random.Random(0)
    return [[rng.randrange(3, 500) for _ in range(n)] for n in LENGTHS]


@pytest.fixture(scope="module")
def gemma3():
    from longseq.models.tiny import tiny_model_path

    return tiny_model_path("gemma3-hybrid")


@pytest.fixture(scope="module")
def gemma3_builtin(gemma3):
    return run_llm(gemma3, _prompts(), MAX_TOKENS, {}, logprobs=2)


def _ours(model: str, env: dict[str, str], tmp_path) -> tuple[dict, dict]:
    trace = str(tmp_path)
    out = run_llm(model, _prompts(), MAX_TOKENS, {"LONGSEQ_CPU": "1", "LONGSEQ_TRACE_DIR": trace, **env})
    traces = [t for t in read_traces(trace) if t["backend"] == "cpu"]
    assert traces, "the engine did not run our backend"
    return out, max(traces, key=lambda t: t["forward_calls"])


def test_gemma3_hybrid_dense_is_token_identical_to_builtin(gemma3, gemma3_builtin, tmp_path):
    out, trace = _ours(gemma3, {"LONGSEQ_ATTENTION": "dense"}, tmp_path)
    cmp = compare_greedy(gemma3_builtin, out, tie_nats=0.0)
    assert cmp["identical"] == len(LENGTHS), cmp
    assert trace["num_layers"] == 6 and trace["technique"] == "dense"


def test_gemma3_hybrid_sparse_runs_on_the_global_layer_only(gemma3, gemma3_builtin, tmp_path):
    """One global layer of six is sparse: one sparse decode call per decode step (the windowed layers keep
    vLLM's kernel). The 40-token prompt fits the 64-token budget, so its tokens are dense's."""
    out, trace = _ours(gemma3, SPARSE_ENV, tmp_path)
    assert all(len(t) == MAX_TOKENS for t in out["tokens"])
    assert out["tokens"][2] == gemma3_builtin["tokens"][2]
    assert trace["num_layers"] == 6
    # decode steps: at most one call per step for the one global layer; none from the five windowed ones
    assert 0 < trace["sparse_decode_calls"] <= (MAX_TOKENS - 1) * len(LENGTHS)


def test_gemma3_hybrid_duo_pattern_covers_the_global_layers(gemma3, gemma3_builtin, tmp_path):
    """A random pattern is built for the 1 global layer x 1 KV head; prompts within sink + recent give dense's
    tokens (the streaming head still sees every token)."""
    out, trace = _ours(gemma3, {"LONGSEQ_ATTENTION": "duo", "LONGSEQ_DUO_PATTERN": "random:0",
                                "LONGSEQ_DUO_SPARSITY": "1.0", "LONGSEQ_DUO_SINK": "16",
                                "LONGSEQ_DUO_RECENT": "512"}, tmp_path)
    assert trace["duo_calls"] > 0
    cmp = compare_greedy(gemma3_builtin, out)
    assert cmp["identical"] + len(cmp["near_tie_splits"]) == len(LENGTHS), cmp


@pytest.mark.parametrize("preset,technique,counter", [
    # soft-capped global layers; the 512-token budget covers every prompt, so sparse must give dense's tokens
    ("gemma2-softcap", {**SPARSE_ENV, "LONGSEQ_SPARSE_BUDGET": "512"}, "sparse_decode_calls"),
    # gpt-oss: sinks on every layer; sink + recent cover every prompt, so duo must give dense's tokens
    ("gptoss-sinks", {"LONGSEQ_ATTENTION": "duo", "LONGSEQ_DUO_PATTERN": "random:0", "LONGSEQ_DUO_SPARSITY": "1.0",
                      "LONGSEQ_DUO_SINK": "16", "LONGSEQ_DUO_RECENT": "512"}, "duo_calls"),
])
def test_soft_cap_and_sinks_in_every_mode(preset, technique, counter, tmp_path):
    """Dense mode serves the feature with vLLM's kernel (the built-in tokens); our PyTorch path applies it too
    (``LONGSEQ_CPU_KERNEL=torch``, then the technique on the global layers): the built-in tokens up to near-ties."""
    from longseq.models.tiny import tiny_model_path

    model = tiny_model_path(preset)
    builtin = run_llm(model, _prompts(), MAX_TOKENS, {}, logprobs=2)
    out, _ = _ours(model, {"LONGSEQ_ATTENTION": "dense"}, tmp_path / "dense")
    cmp = compare_greedy(builtin, out, tie_nats=0.0)
    assert cmp["identical"] == len(LENGTHS), cmp
    for name, env in [("torch", {"LONGSEQ_CPU_KERNEL": "torch"}), ("technique", technique)]:
        out, trace = _ours(model, env, tmp_path / name)
        cmp = compare_greedy(builtin, out)
        assert cmp["identical"] + len(cmp["near_tie_splits"]) == len(LENGTHS), (name, cmp)
        assert cmp["identical"] >= len(LENGTHS) - 1, (name, cmp)
    assert trace[counter] > 0
