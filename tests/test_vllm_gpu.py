"""GPU (vLLM 0.26 on an H100, through ../shared/gpu): dense mode gives FLASH_ATTN's greedy tokens with CUDA graphs.

Run on the GPU machine: ``source /tmp/lsq-bundle/env.sh && python -m pytest tests -m gpu``.
"""

from __future__ import annotations

import os

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
