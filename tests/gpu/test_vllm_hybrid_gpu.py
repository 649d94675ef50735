"""GPU (vLLM 0.26): hybrid models under CUDA graphs, as ``tests/cpu_engine/test_vllm_hybrid_cpu.py`` on CPU.

Windowed layers stay on FlashAttention with their window in every mode; sparse and duo run on the global layers.
"""

from __future__ import annotations

import random

import pytest

from engine_utils import compare_greedy, read_traces, run_llm

pytestmark = pytest.mark.gpu

MAX_TOKENS = 12
LENGTHS = [300, 150, 40]
KW = {"enforce_eager": False, "gpu_memory_utilization": 0.2, "max_num_seqs": 4, "dtype": "bfloat16",
      "compilation_config": {"mode": 0, "cudagraph_mode": "FULL_DECODE_ONLY", "cudagraph_capture_sizes": [1, 2, 4]}}
SPARSE_ENV = {"LONGSEQ_ATTENTION": "sparse", "LONGSEQ_SPARSE_BUDGET": "64", "LONGSEQ_SPARSE_PAGE_SIZE": "16",
              "LONGSEQ_SPARSE_RECENT_PAGES": "2"}
DUO_ENV = {"LONGSEQ_ATTENTION": "duo", "LONGSEQ_DUO_PATTERN": "random:0", "LONGSEQ_DUO_SPARSITY": "1.0",
           "LONGSEQ_DUO_SINK": "16", "LONGSEQ_DUO_RECENT": "512"}


def _prompts() -> list[list[int]]:
    rng = random.Random(0)
    return [[rng.randrange(3, 500) for _ in range(n)] for n in LENGTHS]


def _run(model: str, backend: str, env: dict, tmp_path=None, logprobs=None) -> tuple[dict, dict | None]:
    env = {**env, **({"LONGSEQ_TRACE_DIR": str(tmp_path)} if tmp_path else {})}
    out = run_llm(model, _prompts(), MAX_TOKENS, env, {**KW, "attention_config": {"backend": backend}},
                  logprobs=logprobs)
    traces = [t for t in read_traces(str(tmp_path)) if t["backend"] == "cuda"] if tmp_path else []
    return out, (max(traces, key=lambda t: t["forward_calls"]) if traces else None)


@pytest.fixture(scope="module")
def gemma3():
    from longseq.models.tiny import tiny_model_path

    return tiny_model_path("gemma3-hybrid")


@pytest.fixture(scope="module")
def gemma3_flash(gemma3):
    return _run(gemma3, "FLASH_ATTN", {}, logprobs=2)[0]


def test_gemma3_hybrid_dense_matches_flash_attn(gemma3, gemma3_flash, tmp_path):
    out, trace = _run(gemma3, "CUSTOM", {"LONGSEQ_ATTENTION": "dense"}, tmp_path)
    assert trace is not None and trace["num_layers"] == 6
    assert "FULL_DECODE_ONLY" in str(out["cudagraph_mode"])
    assert out["tokens"] == gemma3_flash["tokens"]


def test_gemma3_hybrid_sparse_and_duo_on_the_global_layer(gemma3, gemma3_flash, tmp_path):
    out, trace = _run(gemma3, "CUSTOM", SPARSE_ENV, tmp_path / "sparse")
    assert trace["sparse_decode_calls"] > 0 and all(len(t) == MAX_TOKENS for t in out["tokens"])
    assert out["tokens"][2] == gemma3_flash["tokens"][2]  # within the budget: dense's tokens
    out, trace = _run(gemma3, "CUSTOM", DUO_ENV, tmp_path / "duo")
    assert trace["duo_calls"] > 0
    cmp = compare_greedy(gemma3_flash, out)
    assert cmp["identical"] + len(cmp["near_tie_splits"]) == len(LENGTHS), cmp


@pytest.mark.parametrize("preset", ["gemma2-softcap", "gptoss-sinks"])
def test_soft_cap_and_sinks_dense_matches_flash_attn_and_techniques_apply_them(preset, tmp_path):
    """Soft-capped (Gemma 2) and sink (gpt-oss) global layers: dense gives FLASH_ATTN's tokens; sparse with a budget
    covering every prompt and duo with sink + recent covering it give them up to near-ties (our Triton kernels
    apply the soft-cap and sinks, FlashAttention the prefill and duo's retrieval heads)."""
    from longseq.models.tiny import tiny_model_path

    model = tiny_model_path(preset)
    flash = _run(model, "FLASH_ATTN", {}, logprobs=2)[0]
    ours = _run(model, "CUSTOM", {"LONGSEQ_ATTENTION": "dense"})[0]
    assert ours["tokens"] == flash["tokens"]
    # LONGSEQ_SPARSE_DENSE_LAYERS=0: gpt-oss's tiny model has 2 layers, and the default keeps layers 0-1 dense
    for name, env, counter in [("sparse", {**SPARSE_ENV, "LONGSEQ_SPARSE_BUDGET": "512",
                                           "LONGSEQ_SPARSE_DENSE_LAYERS": "0"}, "sparse_decode_calls"),
                               # one retrieval, one streaming KV head: FlashAttention (softcap, s_aux) on the first
                               ("duo", {**DUO_ENV, "LONGSEQ_DUO_SPARSITY": "0.5"}, "duo_calls")]:
        out, trace = _run(model, "CUSTOM", env, tmp_path / name)
        assert trace[counter] > 0, (name, trace)
        cmp = compare_greedy(flash, out)
        assert cmp["identical"] + len(cmp["near_tie_splits"]) == len(LENGTHS), (name, cmp)
        assert cmp["identical"] >= len(LENGTHS) - 1, (name, cmp)
