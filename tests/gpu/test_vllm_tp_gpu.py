"""Tensor parallelism (2 GPUs, vLLM 0.26): every technique keeps per-rank state for its own KV heads.

Each rank sees only its heads, so a rank must use its own slice of a duo pattern and its own page summaries.
A rank that used another rank's heads would still run, but its output would drift far from the TP=1 run; the
TP=1 vs TP=2 comparisons below (teacher-forced on the same tokens, so they compare identical inputs) catch that.

Model: the tiny random-weight ``gqa4-d128`` preset (8 query / 2 KV heads: one KV head per rank).
Run on a 2-GPU machine: ``source /tmp/lsq-bundle/env.sh && python -m pytest tests/gpu/test_vllm_tp_gpu.py -m gpu``.
"""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.gpu

MAX_TOKENS = 24
LENGTHS = [1800, 1200, 600, 40]
KW = {"enforce_eager": False, "gpu_memory_utilization": 0.3, "max_num_seqs": 8, "dtype": "bfloat16", "seed": 0,
      "enable_prefix_caching": True, "max_model_len": 4096,
      "compilation_config": {"mode": 0, "cudagraph_mode": "FULL_DECODE_ONLY"}}


@pytest.fixture(scope="module")
def two_gpus():
    import torch

    if torch.cuda.device_count() < 2:
        pytest.skip(f"needs 2 GPUs, this machine has {torch.cuda.device_count()}")


@pytest.fixture(scope="module")
def tiny(two_gpus, tmp_path_factory):
    from longseq.models.tiny import tiny_model_path

    return tiny_model_path("gqa4-d128", str(tmp_path_factory.mktemp("tiny")))


@pytest.fixture(scope="module")
def prompts(tiny):
    from transformers import AutoTokenizer

    from longseq.models.prompts import make_prompts

    return make_prompts(AutoTokenizer.from_pretrained(tiny), LENGTHS, seed=3, shared_prefix=(0, 1, 500))


def _kw(tp: int, backend: str, graphs: bool = False) -> dict:
    # The TP comparisons run eager (start-up in seconds); the dense test keeps CUDA graphs as served.
    kw = {**KW, "tensor_parallel_size": tp, "attention_config": {"backend": backend}}
    return kw if graphs else {**kw, "enforce_eager": True, "compilation_config": {"mode": 0}}


@pytest.fixture(scope="module")
def dense_tp1(tiny, prompts):
    from longseq.eval.fidelity import run_generation

    return run_generation(tiny, prompts, MAX_TOKENS, {"LONGSEQ_ATTENTION": "dense"}, _kw(1, "CUSTOM"))


def _tp1_then_tp2(model, prompts, dense: dict, env: dict) -> tuple[dict, dict, dict]:
    """The technique at TP=1 (free-running, then fed dense's tokens: one engine), then at TP=2 fed TP=1's tokens.
    Returns (TP=1 free run, TP=1 vs dense metrics, TP=2 vs TP=1 metrics)."""
    from longseq.eval.fidelity import compare, run_generation, run_session

    s = run_session(model, [{"prompts": prompts, "max_tokens": MAX_TOKENS},
                            {"prompts": prompts, "max_tokens": MAX_TOKENS, "forced": dense["tokens"]}],
                    env, _kw(1, "CUSTOM"))
    tp1, tp1_forced = s["runs"]
    tp1["trace"] = s["trace"]
    tp2 = run_generation(model, prompts, MAX_TOKENS, env, _kw(2, "CUSTOM"), forced=tp1["tokens"])
    assert tp1_forced["tokens"] == dense["tokens"] and tp2["tokens"] == tp1["tokens"]  # forcing worked
    return tp1, compare(dense, tp1_forced), compare(tp1, tp2)


def test_dense_tp2_matches_flash_attn_tp2(tiny, prompts):
    from engine_utils import run_llm

    flash = run_llm(tiny, prompts, MAX_TOKENS, {}, _kw(2, "FLASH_ATTN", graphs=True))
    ours = run_llm(tiny, prompts, MAX_TOKENS, {"LONGSEQ_ATTENTION": "dense"}, _kw(2, "CUSTOM", graphs=True))
    assert ours["tokens"] == flash["tokens"]


def test_sparse_tp2_follows_tp1(tiny, prompts, dense_tp1):
    """Budget 256 tokens (16 pages) on prompts up to 1800 tokens, no dense layers: selection matters. TP=2 fed
    TP=1's tokens must agree with it far more closely than sparse agrees with dense, in KL.

    Not in argmax agreement: on this random-weight model the logits are flat, and TP=2's different rounding flips
    near-tied page scores and then near-tied tokens. The 2026-11-29 H200 run measured TP=2 vs TP=1 agreement 0.885
    at KL 0.0088, against sparse vs dense at KL 2.30 (the old ``agreement >= 0.95`` bar failed there). A rank
    scoring another rank's heads would sit near the sparse-vs-dense KL, hundreds of times above."""
    env = {"LONGSEQ_ATTENTION": "sparse", "LONGSEQ_SPARSE_BUDGET": "256", "LONGSEQ_SPARSE_DENSE_LAYERS": "0"}
    tp1, tp1_vs_dense, tp2_vs_tp1 = _tp1_then_tp2(tiny, prompts, dense_tp1, env)
    assert any(t.get("sparse_decode_calls", 0) > 0 for t in tp1["trace"]), tp1["trace"]
    print("sparse tp1 vs dense:", tp1_vs_dense["agreement"], tp1_vs_dense["mean_kl"],
          "| tp2 vs tp1:", tp2_vs_tp1["agreement"], tp2_vs_tp1["mean_kl"])
    assert tp2_vs_tp1["mean_kl"] <= 0.02, tp2_vs_tp1
    assert tp1_vs_dense["mean_kl"] > 20 * tp2_vs_tp1["mean_kl"], (tp1_vs_dense, tp2_vs_tp1)


def test_duo_tp2_follows_tp1(tiny, prompts, dense_tp1, tmp_path):
    """A pattern with one streaming KV head per layer, on a different rank in each layer: rank 0 streams in
    layer 0, rank 1 in layer 1. TP=2 must follow TP=1 (each rank applies its own slice of the pattern)."""
    import torch

    from longseq.attention_backends.core.duo_pattern import DuoPattern, save_duo_pattern

    gates = torch.tensor([[0.1, 0.9], [0.9, 0.1]])  # [layers, kv heads]: low gate = streaming
    save_duo_pattern(DuoPattern(gates=gates, sink_size=16, recent_size=64), tmp_path / "pattern")
    env = {"LONGSEQ_ATTENTION": "duo", "LONGSEQ_DUO_PATTERN": str(tmp_path / "pattern"),
           "LONGSEQ_DUO_SPARSITY": "0.5"}
    _, tp1_vs_dense, tp2_vs_tp1 = _tp1_then_tp2(tiny, prompts, dense_tp1, env)
    print("duo tp1 vs dense:", tp1_vs_dense["agreement"], tp1_vs_dense["mean_kl"],
          "| tp2 vs tp1:", tp2_vs_tp1["agreement"], tp2_vs_tp1["mean_kl"])
    assert tp2_vs_tp1["agreement"] >= 0.95 and tp2_vs_tp1["mean_kl"] <= 0.02, tp2_vs_tp1
    assert tp1_vs_dense["mean_kl"] > 2 * tp2_vs_tp1["mean_kl"], (tp1_vs_dense, tp2_vs_tp1)
