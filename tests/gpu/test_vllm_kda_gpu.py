"""GPU (vLLM 0.26, H200): a tiny random-weight Kimi-Linear (3 KDA layers + 1 MLA) generates vLLM's own greedy
tokens when its KDA layers run on longseq's kernels (``LONGSEQ_KDA=1``), with CUDA graphs for decode.
Routing: steps with prefills run vLLM's own KDA ``_forward``, decode steps longseq's recurrent kernel; the trace
proves both happened.

Weights: vLLM's dummy load, then every non-MLA weight redrawn (``longseq.models.kimi_linear.randomize_weights``)
so logits spread and the KDA layers carry signal. Ours and vLLM's KDA decode kernels round differently, so a
greedy run may legitimately part where vLLM's own top-2 logprobs nearly tie: the test requires identical tokens
up to such a near-tie (gap < ``engine_utils.TIE_NATS``) reached only after several identical steps, the same logprobs up to
``LOGPROB_TOL`` before it, and at least half of the prompts identical to the end: a gap of 0.0 is a tie any
rounding flips, while a wrong state parts at the first decode step (the run behind this bar: docs/benchmarks/kda.md).
It also proves our layer ran (trace markers from the 3 KDA layers) and that a broken variant (recurrent state never
written) changes the tokens.

Run on the GPU machine: ``source /tmp/lsq-bundle/env.sh && python -m pytest tests/gpu/test_vllm_kda_gpu.py -m gpu -q``
(three engine starts; ``-k paged_state_pool`` alone starts none).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

import pytest

from engine_utils import EngineRunError, clean_env, compare_greedy, read_traces

pytestmark = pytest.mark.gpu

MAX_TOKENS = 32
LENGTHS = [1500, 700, 130, 17]  # mixed prefill lengths (several chunks of 64, and a partial one), batch 4 decode
LOGPROB_TOL = 0.2
MIN_STEPS_BEFORE_SPLIT = 8  # a wrong recurrent state shows at once; rounding needs many steps to reach a tie
LLM_KWARGS = {"dtype": "bfloat16", "max_model_len": 4096, "gpu_memory_utilization": 0.3, "max_num_seqs": 8,
              "enable_prefix_caching": False, "seed": 0,
              "compilation_config": {"mode": 0, "cudagraph_mode": "FULL_DECODE_ONLY"}}


def run_kimi(model: str, prompts, env: dict, max_tokens: int = MAX_TOKENS) -> dict:
    """``longseq.models.kimi_linear run`` in a fresh process (registries clean, env as a user would set it)."""
    with tempfile.TemporaryDirectory() as tmp:
        spec, out = os.path.join(tmp, "spec.json"), os.path.join(tmp, "out.json")
        json.dump({"model": model, "prompts": prompts, "max_tokens": max_tokens, "llm_kwargs": LLM_KWARGS,
                   "randomize_seed": 0, "logprobs": 2}, open(spec, "w"))
        proc = subprocess.run([sys.executable, "-m", "longseq.models.kimi_linear", "run", spec, out], cwd=tmp,
                              env=clean_env({"VLLM_ALLOW_INSECURE_SERIALIZATION": "1", **env}),
                              capture_output=True, text=True, timeout=900)
        if proc.returncode != 0 or not os.path.exists(out):
            raise EngineRunError(proc.returncode, proc.stdout + proc.stderr)
        return json.load(open(out))


@pytest.fixture(scope="module")
def kimi_tiny(tmp_path_factory):
    from longseq.models.kimi_linear import write_kimi_linear_model

    return write_kimi_linear_model(str(tmp_path_factory.mktemp("kimi-tiny")), "tiny", max_model_len=4096)


@pytest.fixture(scope="module")
def prompts():
    import random

    rng = random.Random(3)
    return [[rng.randrange(100, 40000) for _ in range(n)] for n in LENGTHS]


@pytest.fixture(scope="module")
def vllm_run(kimi_tiny, prompts):
    return run_kimi(kimi_tiny, prompts, {"VLLM_PLUGINS": ""})  # vLLM alone: its own KDA kernels


def test_decode_matches_vllm_kernels_on_paged_state_pool():
    """Kernel level, seconds: our 0.26 decode step (``kda_decode``, gate fused in) vs vLLM 0.26's own decode calls
    (vendored ``fused_kda_gate`` then ``fused_recurrent_kda``) on Kimi-Linear-48B's shapes, with the state pool as
    vLLM's KV cache gives it (``as_strided`` views of raw pages: slot stride = page size, conv state in front,
    padding behind), the null slot 0 and CUDA-graph padding in the indices. Same outputs for the real decodes, same
    bytes in every page. Regression for slots addressed at ``H*V*K`` instead of the pool's slot stride."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from vllm.third_party.flash_linear_attention.ops.kda import fused_kda_gate, fused_recurrent_kda

    from longseq.attention_backends.vllm.kda import kda_decode

    H, D, W, slots, dev = 32, 128, 4, 12, "cuda"
    gen = torch.Generator(device=dev).manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=gen, device=dev)  # noqa: E731
    conv_numel = 3 * H * D * (W - 1)
    page = conv_numel + H * D * D + 4096
    raw = rnd(slots * page) * 0.1
    pool = torch.as_strided(raw, (slots, H, D, D), (page, D * D, D, 1), conv_numel)
    idx = torch.tensor([3, 1, 11, 7, 0, 0], dtype=torch.int32, device=dev)  # 4 decodes, graph-padded to 6
    n, nd = idx.numel(), 4
    cu = torch.arange(n + 1, dtype=torch.int32, device=dev)[: nd + 1]
    q, k, v = (rnd(1, n, H, D).bfloat16() for _ in range(3))
    g1 = rnd(1, n, H, D).bfloat16()
    beta = rnd(1, n, H).sigmoid()
    A_log, dt_bias = rnd(1, 1, H, 1) * 0.5, rnd(H * D) * 0.5

    raw_vllm, before = raw.clone(), pool[idx[:nd].long()].clone()
    pool_vllm = torch.as_strided(raw_vllm, pool.shape, pool.stride(), pool.storage_offset())
    g = fused_kda_gate(g1.flatten(-2)[0], A_log, D, g_bias=dt_bias).unsqueeze(0)
    o_vllm, _ = fused_recurrent_kda(q=q, k=k, v=v, g=g, beta=beta, initial_state=pool_vllm,
                                    use_qk_l2norm_in_kernel=True, cu_seqlens=cu, ssm_state_indices=idx)
    o = kda_decode(q, k, v, g1, beta, A_log, dt_bias, pool, idx, cu)
    torch.cuda.synchronize()
    torch.testing.assert_close(o[0, :nd].float(), o_vllm[0, :nd].float(), atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(raw, raw_vllm, atol=1e-3, rtol=1e-3)
    assert (pool[idx[:nd].long()] - before).abs().amax(dim=(1, 2, 3)).gt(0).all()  # every real slot was updated


def test_kda_kernels_give_vllm_greedy_tokens(kimi_tiny, prompts, vllm_run, tmp_path):
    ours = run_kimi(kimi_tiny, prompts, {"LONGSEQ_KDA": "1", "LONGSEQ_TRACE_DIR": str(tmp_path)})
    traces = [t for t in read_traces(str(tmp_path)) if t["backend"] == "kda"]
    assert traces and max(t["num_layers"] for t in traces) == 3, traces
    assert sum(t["forward_calls"] for t in traces) > 0, traces  # decode on our kernel
    assert sum(t.get("framework_prefill_calls", 0) for t in traces) > 0, traces  # prefill on vLLM's
    assert vllm_run["redrawn"] == ours["redrawn"] and vllm_run["redrawn"][0] > 0
    report = compare_greedy(vllm_run, ours)
    print("KDA ours vs vLLM:", report)
    assert report["max_logprob_diff"] <= LOGPROB_TOL, report
    assert 2 * report["identical"] >= len(LENGTHS), report
    assert all(split["step"] >= MIN_STEPS_BEFORE_SPLIT for split in report["near_tie_splits"]), report


def test_broken_kda_state_changes_tokens(kimi_tiny, prompts, vllm_run):
    """Negative control: with the recurrent state never written (neither by vLLM's prefill, undone, nor by our
    decode), the KDA layers forget the prompt."""
    bad = run_kimi(kimi_tiny, prompts, {"LONGSEQ_KDA": "1", "LONGSEQ_DEBUG_FAULT": "skip_kv_write"}, max_tokens=8)
    assert bad["tokens"] != [t[:8] for t in vllm_run["tokens"]]
