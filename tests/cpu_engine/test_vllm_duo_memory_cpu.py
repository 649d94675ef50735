"""LONGSEQ_DUO_MEMORY=1 end to end on vLLM's real CPU engine (SmolLM2-135M-Instruct: 30 layers x 3 KV heads).

Each layer's attention runs as a retrieval and a streaming sublayer; the streaming heads' KV group frees every
block between the sink and the window. Checked against compute-only duo with the same mask (a pattern whose
global quantile equals the per-layer one): identical tokens and log-probs, more KV blocks in the same memory, the
same tokens when blocks are freed, evicted, reused and prefix-cached under a tiny pool, and clear start-up errors.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from engine_utils import EngineRunError, run_llm, write_one_streaming_head_pattern

pytestmark = pytest.mark.engine

MAX_TOKENS = 16


@pytest.fixture(scope="module")
def prompts(smollm2_path):
    from transformers import AutoTokenizer

    from longseq.models.prompts import make_prompts

    return make_prompts(AutoTokenizer.from_pretrained(smollm2_path), [600, 250, 40], seed=11)


@pytest.fixture(scope="module")
def pattern(tmp_path_factory) -> str:
    """One streaming KV head per layer (sparsity 1/3 picks the same heads globally and per layer, so compute-only
    duo and the split run one mask). Sink 16 + recent 64: the 600-token prompt's middle is freed."""
    return write_one_streaming_head_pattern(str(tmp_path_factory.mktemp("duo-memory") / "pattern"))


def _duo(model, prompts, pattern, memory: bool, **llm_kwargs):
    env = {"LONGSEQ_CPU": "1", "LONGSEQ_ATTENTION": "duo", "LONGSEQ_DUO_PATTERN": pattern,
           "LONGSEQ_DUO_SPARSITY": str(1 / 3)}
    if memory:
        env["LONGSEQ_DUO_MEMORY"] = "1"
    return run_llm(model, prompts, MAX_TOKENS, env, logprobs=2, llm_kwargs=llm_kwargs or None)


@pytest.fixture(scope="module")
def compute_only(smollm2_path, prompts, pattern) -> dict:
    return _duo(smollm2_path, prompts, pattern, memory=False)


def test_split_layers_give_compute_only_duo_tokens_with_more_kv_blocks(smollm2_path, prompts, pattern, compute_only):
    split = _duo(smollm2_path, prompts, pattern, memory=True)
    assert split["tokens"] == compute_only["tokens"]
    assert split["logprobs"] == compute_only["logprobs"]  # per-head math unchanged: bit for bit
    # Same KV memory: two of three heads keep full KV -> 1.5x the blocks (sink + window blocks come from the pool)
    ratio = split["num_kv_blocks"] / compute_only["num_kv_blocks"]
    assert 1.45 <= ratio <= 1.55, (split["num_kv_blocks"], compute_only["num_kv_blocks"])


def test_architecture_alias_of_llama_is_split(smollm2_path, prompts, pattern, compute_only, tmp_path):
    """A config naming ``LlamaModel`` (what a GGUF conversion writes; vLLM builds ``LlamaForCausalLM`` for it) is
    split too: the same tokens as compute-only duo with 1.5x the blocks."""
    alias = tmp_path / "llama-model-alias"
    alias.mkdir()
    for name in os.listdir(smollm2_path):
        if name != "config.json":
            os.symlink(os.path.join(smollm2_path, name), alias / name)
    config = json.load(open(os.path.join(smollm2_path, "config.json")))
    json.dump({**config, "architectures": ["LlamaModel"]}, open(alias / "config.json", "w"))
    split = _duo(str(alias), prompts, pattern, memory=True)
    assert split["tokens"] == compute_only["tokens"]
    assert 1.45 <= split["num_kv_blocks"] / compute_only["num_kv_blocks"] <= 1.55


def test_freed_evicted_reused_and_prefix_cached_blocks_keep_tokens(smollm2_path, prompts, pattern):
    """One request at a time in a pool of a few blocks: every request reuses blocks freed from the gap of the one
    before, and the repeated prompt asks the prefix cache (its gap blocks may be evicted: a shorter hit)."""
    batch = [prompts[0], prompts[1], prompts[0], prompts[2], prompts[0]]
    kw = {"max_num_seqs": 1, "num_gpu_blocks_override": 16, "max_num_batched_tokens": 256, "max_model_len": 1024}
    compute_only = _duo(smollm2_path, batch, pattern, memory=False, **kw)
    split = _duo(smollm2_path, batch, pattern, memory=True, **kw)
    assert split["tokens"] == compute_only["tokens"]
    assert split["tokens"][0] == split["tokens"][2] == split["tokens"][4]


@pytest.mark.parametrize("extra,message", [
    ({"kv_transfer_config": {"kv_connector": "LongSeqOffloadConnector", "kv_role": "kv_both"}},
     "a KV connector is configured"),
    ({"disable_hybrid_kv_cache_manager": True}, "hybrid KV cache manager is off"),
    # vLLM's Transformers modeling backend builds a class we do not split: an error, never unsplit serving
    ({"model_impl": "transformers"}, "was not split into retrieval and streaming sublayers"),
])
def test_unsupported_combinations_stop_at_startup(smollm2_path, pattern, extra, message):
    with pytest.raises(EngineRunError) as e:
        _duo(smollm2_path, [[1, 2, 3]], pattern, memory=True, **extra)
    assert message in e.value.log and "LONGSEQ_DUO_MEMORY=1" in e.value.log


def test_tp2_each_rank_splits_its_own_heads_with_compute_only_tokens(tmp_path):
    """Tensor parallelism 2 on the tiny ``mha-d64`` model (2 layers x 4 KV heads, 2 per rank): every rank streams
    one of its two heads per layer (the pattern makes the per-rank quantile equal the global one)."""
    import random

    from longseq.attention_backends.core.duo_pattern import DuoPattern, save_duo_pattern
    from longseq.models.tiny import VOCAB_SIZE, tiny_model_path

    model = tiny_model_path("mha-d64", str(tmp_path / "tiny"))
    gates = torch.tensor([[0.9, 0.1, 0.2, 0.8], [0.3, 0.7, 0.95, 0.15]], dtype=torch.float64)
    save_duo_pattern(DuoPattern(gates, sink_size=16, recent_size=64, source="tp2"), tmp_path / "pattern")
    rng = random.Random(5)
    batch = [[rng.randrange(3, VOCAB_SIZE) for _ in range(n)] for n in (900, 300)]
    cpus = sorted(os.sched_getaffinity(0))
    env = {"LONGSEQ_CPU": "1", "LONGSEQ_ATTENTION": "duo", "LONGSEQ_DUO_PATTERN": str(tmp_path / "pattern"),
           "LONGSEQ_DUO_SPARSITY": "0.5", "VLLM_CPU_OMP_THREADS_BIND": f"{cpus[0]}|{cpus[min(1, len(cpus) - 1)]}"}
    runs = [run_llm(model, batch, MAX_TOKENS, {**env, **extra}, llm_kwargs={"tensor_parallel_size": 2})
            for extra in ({}, {"LONGSEQ_DUO_MEMORY": "1"})]
    assert runs[1]["tokens"] == runs[0]["tokens"]
    assert runs[1]["num_kv_blocks"] > 1.8 * runs[0]["num_kv_blocks"]  # half the heads keep full KV: ~2x blocks
