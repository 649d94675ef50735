"""LongSeqOffloadConnector on CUDA (vLLM 0.26, GPU machine): SmolLM2 saves, a NEW engine process loads from
the same disk dir and gives identical greedy tokens; a second prompt reloads from the CPU tier in-process
after ``reset_prefix_cache()``."""

from __future__ import annotations

import json

import pytest

from engine_utils import run_llm
from longseq.models.prompts import make_prompts

pytestmark = pytest.mark.gpu

MAX_TOKENS = 16
LENGTHS = [1500, 900]
GPU_KWARGS = {"gpu_memory_utilization": 0.3}  # eager (LLM_KWARGS): the connector runs outside the graphs


def kv_config(disk_dir: str, stats: str) -> dict:
    return {"kv_connector": "LongSeqOffloadConnector", "kv_connector_module_path": "longseq.kv_offload.vllm",
            "kv_role": "kv_both", "kv_connector_extra_config": {"cpu_gib": 1, "disk_dir": disk_dir, "disk_gib": 2,
                                                                "stats_path": stats}}


@pytest.fixture(scope="module")
def prompts(smollm2_path):
    from transformers import AutoTokenizer

    return make_prompts(AutoTokenizer.from_pretrained(smollm2_path), LENGTHS, seed=3)


def test_save_then_load_in_a_new_engine_gives_identical_tokens(smollm2_path, prompts, tmp_path):
    import torch

    if not torch.cuda.is_available():
        pytest.fail("GPU test run without a CUDA device")
    disk = str(tmp_path / "kv")
    base = run_llm(smollm2_path, prompts, MAX_TOKENS, {}, llm_kwargs=GPU_KWARGS)
    first = run_llm(smollm2_path, prompts, MAX_TOKENS, {},
                    llm_kwargs={**GPU_KWARGS, "kv_transfer_config": kv_config(disk, str(tmp_path / "s1.json"))})
    s1 = json.load(open(tmp_path / "s1.json"))
    second = run_llm(smollm2_path, prompts, MAX_TOKENS, {},
                     llm_kwargs={**GPU_KWARGS, "kv_transfer_config": kv_config(disk, str(tmp_path / "s2.json"))})
    s2 = json.load(open(tmp_path / "s2.json"))
    assert first["tokens"] == base["tokens"]
    assert s1["saved_blocks"] > 0 and s1["loaded_tokens"] == 0
    assert second["tokens"] == base["tokens"]
    # vLLM CUDA block size 16: every full block but the one holding each prompt's last token.
    block = 16
    assert s2["loaded_tokens"] == sum((n - 1) // block * block for n in LENGTHS), s2
    assert s2["store"]["corrupt_blocks"] == 0
