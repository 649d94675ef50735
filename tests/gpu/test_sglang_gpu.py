"""GPU (SGLang 0.5.15 through scripts/gpu/sglang_*.sh, H200): every longseq SGLang backend serving SmolLM2 (issue 22).

Each configuration is one offline ``Engine`` in its own process (``tests/support/sglang_gpu.py``). Every engine:
bf16, ``--page-size 16`` (``longseq_sparse`` needs a multiple of its 8-token pages; the references use the same
page size so runs differ only in attention), decode CUDA graphs on (SGLang's ``full`` decode graphs for batch
sizes 1/2/4/8), prefill graphs off (the vLLM GPU tests' FULL_DECODE_ONLY). The dense reference of the sparse and
duo checks is ``longseq_dense``'s own run (its tokens and top-20 log-probs), as vLLM's CUSTOM dense is there.

- dense: ``longseq_dense`` (wrapping ``triton``) against ``triton`` itself: our backend is built around
  ``triton``, decode graphs stay on, and greedy tokens are equal up to a near-tie of both runs (compare_greedy,
  tests/support/engine_utils.py: 0.25 nats); a first difference anywhere else fails.
- sparse: teacher-forced against dense (dense's tokens fed back; agreement of each step's argmax with dense's
  token, KL over dense's top 20) and free-running, on the prompts of tests/gpu/test_vllm_gpu.py (lengths
  2000..9, seed 1, 48 tokens), with its bounds: budget 2048 (covers every context) agreement >= 0.99 and KL <=
  1e-3; budget 1024 >= 0.97 and <= 0.02; the negative control there (budget 64, 1 recent page, no dense layer:
  KL > 10x budget 1024's and other tokens) shows the sparse path runs inside the replayed decode graphs.
- HiCache: ``--enable-hierarchical-cache --hicache-storage-backend dynamic`` with ``LongSeqHiCacheStorage``
  (``interface_v1``), the prompts of tests/gpu/test_vllm_kv_offload_gpu.py (1500 and 900 tokens, 16 out): after
  ``flush_cache`` SGLang reports each prefix as loaded from our backend (``cached_tokens_details``: storage
  tokens and ``storage_backend``, from the scheduler) and the tokens equal its own GPU prefix hit's exactly.
- duo: the prompts and bounds of tests/gpu/test_vllm_duo_gpu.py (seed 3, 32 tokens): a window covering every
  context is dense up to the noise of another dense kernel measured in the same run (SGLang's ``fa3`` where its
  library is installed, else ``torch_native``, teacher-forced against dense: agreement >= min(0.99, noise - 0.02),
  KL <= max(1e-3, 3 x noise)); 50% streaming
  with the default sink 64 / recent 256: agreement >= 0.85, KL <= 0.05, and its negative control (random
  pattern, every head streaming, sink 1, recent 1: KL > 10x, other tokens). ``longseq_duo`` runs longseq's
  Triton duo kernel on CUDA (tested on CPU under Triton's interpreter only, before this file first runs).

Teacher forcing runs through a custom logit processor (tests/support/sglang_gpu.py: ``ForceAndRecord``) that
records the raw top-20 log-probs before it masks; those engines add ``enable_custom_logit_processor`` and
``disable_overlap_schedule`` (numerics unchanged: the same kernels, no overlap of CPU scheduling).

Run on the GPU machine (10 engine starts of 40-65 s each; the first, about 2 min, also JIT-compiles SGLang's and
our Triton kernels; split over three calls of the device tool, see docs/benchmarks/sglang.md):
``source /tmp/lsq-bundle/env.sh && source scripts/gpu/sglang_env.sh && python -m pytest tests/gpu/test_sglang_gpu.py -m gpu -x -q``
"""

from __future__ import annotations

import json

import pytest

from engine_utils import compare_greedy
from longseq.eval.fidelity import compare
from longseq.models.prompts import make_prompts
from sglang_gpu import generate, run_sglang

pytestmark = pytest.mark.gpu

PAGE = 16
TOP_K = 20
LENGTHS = [2000, 1500, 700, 200, 60, 9]
SPARSE_TOKENS, DUO_TOKENS, KV_TOKENS = 48, 32, 16
KV_LENGTHS = [1500, 900]
ENGINE_KW = {"dtype": "bfloat16", "page_size": PAGE, "mem_fraction_static": 0.2, "max_total_tokens": 32768,
             "random_seed": 0, "disable_cuda_graph": False, "disable_prefill_cuda_graph": True,
             "cuda_graph_bs_decode": [1, 2, 4, 8], "log_level": "warning"}
FORCED_KW = {**ENGINE_KW, "enable_custom_logit_processor": True, "disable_overlap_schedule": True}


def _noise_backend() -> tuple[str, dict]:
    """Another exact dense kernel (the vLLM duo test used TRITON_ATTN vs FLASH_ATTN): SGLang's ``fa3`` where its
    library is installed (the GPU bundle carries it in optional parts, scripts/gpu/make_sglang_fa3_parts.sh), else
    SGLang's SDPA path, which captures no CUDA graphs and loops over requests in Python (slow). FlashInfer would
    JIT-build."""
    import importlib.util
    import os

    spec = importlib.util.find_spec("sgl_kernel")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        if os.path.exists(os.path.join(folder, "flash_ops.abi3.so")):
            return "fa3", {}
    return "torch_native", {"disable_cuda_graph": True}


NOISE_BACKEND, NOISE_KW = _noise_backend()
DUO_ENV = {"LONGSEQ_DUO_PATTERN": "smollm2-135m-instruct"}
KEYS = ("agreement", "mean_kl", "max_kl", "free_running_match")


@pytest.fixture(scope="module")
def prompts(smollm2_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_path)
    return {"sparse": make_prompts(tok, LENGTHS, seed=1, shared_prefix=(0, 1, 1200)),
            "duo": make_prompts(tok, LENGTHS, seed=3, shared_prefix=(0, 1, 1200)),
            "kv": make_prompts(tok, KV_LENGTHS, seed=5)}


@pytest.fixture(scope="module")
def dense(smollm2_path, prompts):
    """``longseq_dense``'s greedy tokens and top-20 log-probs on the sparse and the duo prompt sets (one engine)."""
    res = run_sglang(smollm2_path, [generate(prompts["sparse"], SPARSE_TOKENS, TOP_K),
                                    generate(prompts["duo"], DUO_TOKENS, TOP_K)],
                     {}, {**ENGINE_KW, "attention_backend": "longseq_dense"})
    print("longseq_dense: load", round(res["load_s"], 1), "s, server", res["server"])
    return {"sparse": res["ops"][0], "duo": res["ops"][1], "server": res["server"], "traces": res["traces"]}


def _subset(run: dict, n: int) -> dict:
    return {k: run[k][:n] for k in ("tokens", "logprobs")}


def _forced_session(model, prompts, base, max_tokens, env, backend, engine_kw=None, free_running=True):
    """Teacher-forced (``base``'s tokens fed) then free-running, one engine; metrics against ``base``."""
    ops = [generate(prompts, max_tokens, TOP_K, forced=base["tokens"])]
    if free_running:
        ops.append(generate(prompts, max_tokens))
    res = run_sglang(model, ops, env, {**FORCED_KW, **(engine_kw or {}), "attention_backend": backend})
    forced, free = res["ops"] if free_running else (res["ops"][0], None)
    assert forced["tokens"] == base["tokens"]  # forcing worked
    return compare(base, forced, free), res


def _trace_max(res: dict, backend: str, key: str) -> int:
    return max((t.get(key, 0) for t in res["traces"] if t["backend"] == backend), default=0)


def test_dense_gives_triton_tokens_with_decode_cuda_graphs(smollm2_path, prompts, dense):
    """``longseq_dense`` is a transparent proxy: SGLang builds it, it builds ``triton`` inside, decode CUDA graphs
    stay on (captured through our forwarded hooks), and the tokens are ``triton``'s up to near-ties."""
    triton = run_sglang(smollm2_path, [generate(prompts["sparse"], SPARSE_TOKENS, TOP_K)], {},
                        {**ENGINE_KW, "attention_backend": "triton"})
    print("triton: load", round(triton["load_s"], 1), "s, server", triton["server"])
    assert dense["server"]["decode_graph"] == "full" == triton["server"]["decode_graph"], (dense["server"],
                                                                                          triton["server"])
    traces = [t for t in dense["traces"] if t["backend"] == "longseq_dense"]
    assert traces and traces[0]["inner"] == ["triton"], traces
    assert max(t["decode_calls"] for t in traces) > 0, traces  # our forward_decode ran (graph capture)
    report = compare_greedy(triton["ops"][0], dense["sparse"])
    print("longseq_dense vs triton:", report)


def test_sparse_budget_covering_context_matches_dense(smollm2_path, prompts, dense):
    """Budget 2048 >= every request's length (<= 2000 + 48): every page is selected, so sparse decode computes
    dense attention in another summation order: agreement and KL at rounding level."""
    m, res = _forced_session(smollm2_path, prompts["sparse"], dense["sparse"], SPARSE_TOKENS,
                             {"LONGSEQ_SPARSE_BUDGET": "2048"}, "longseq_sparse")
    print("sparse budget 2048:", {k: m[k] for k in KEYS})
    assert _trace_max(res, "longseq_sparse", "sparse_decode_calls") > 0, res["traces"]
    assert res["server"]["decode_graph"] == "full", res["server"]
    assert m["agreement"] >= 0.99 and m["mean_kl"] <= 1e-3, m


def test_sparse_small_budget_fidelity_and_negative_control(smollm2_path, prompts, dense):
    """Budget 1024 on prompts up to 2000 tokens (mixed batch: short requests dense-equivalent, long ones sparse):
    close to dense. Budget 64 with no dense layer must move the distribution and the tokens: the sparse kernels
    run in the replayed decode graphs (the trace counts only Python calls, i.e. the capture)."""
    m, _ = _forced_session(smollm2_path, prompts["sparse"], dense["sparse"], SPARSE_TOKENS,
                           {"LONGSEQ_SPARSE_BUDGET": "1024"}, "longseq_sparse")
    print("sparse budget 1024:", {k: m[k] for k in KEYS})
    assert m["agreement"] >= 0.97 and m["mean_kl"] <= 0.02, m
    low, _ = _forced_session(smollm2_path, prompts["sparse"][:2], _subset(dense["sparse"], 2), SPARSE_TOKENS,
                             {"LONGSEQ_SPARSE_BUDGET": "64", "LONGSEQ_SPARSE_RECENT_PAGES": "1",
                              "LONGSEQ_SPARSE_DENSE_LAYERS": "0"}, "longseq_sparse")
    print("sparse budget 64 (negative control):", {k: low[k] for k in KEYS})
    assert low["mean_kl"] > 10 * m["mean_kl"] and low["free_running_match"] < 1.0, low


def test_hicache_storage_reloads_prefix_after_flush_with_identical_tokens(smollm2_path, prompts, tmp_path):
    """One engine; per prompt: a cold run, the same prompt again (SGLang's own GPU radix-cache hit), then after
    ``flush_cache`` (GPU radix cache and host pool emptied; our store keeps its pages) the same prompt a third
    time. SGLang reports the third run's prefix as loaded from the storage tier by ``LongSeqHiCacheStorage``,
    as long as the GPU hit before; its tokens are the GPU hit's exactly (same extend shapes, the same KV bytes).
    The cold run is a full prefill (other GEMM shapes): it may part from the cached runs only at a near-tie."""
    disk = tmp_path / "kv"
    extra = {"backend_name": "longseq", "module_path": "longseq.kv_offload.sglang",
             "class_name": "LongSeqHiCacheStorage", "interface_v1": 1, "cpu_gib": 1, "disk_dir": str(disk),
             "disk_gib": 2}
    kw = {**ENGINE_KW, "attention_backend": "triton", "enable_hierarchical_cache": True,
          "hicache_storage_backend": "dynamic", "hicache_storage_backend_extra_config": json.dumps(extra),
          "hicache_storage_prefetch_policy": "wait_complete"}
    ps = prompts["kv"]
    rounds = [[generate([p], KV_TOKENS, TOP_K) for p in ps] for _ in range(3)]
    ops = [*rounds[0], *rounds[1], {"op": "wait_blocks", "dir": str(disk), "count": sum(len(p) // PAGE for p in ps)},
           {"op": "flush"}, *rounds[2]]
    res = run_sglang(smollm2_path, ops, {}, kw)
    out = res["ops"]
    n = len(ps)
    cold, gpu_hit, flush, reloaded = out[:n], out[n:2 * n], out[2 * n + 1], out[2 * n + 2:]
    print("hicache: load", round(res["load_s"], 1), "s; blocks", out[2 * n], "; flush", flush)
    assert flush["success"], flush
    for i in range(n):
        hit, again = gpu_hit[i]["meta"][0], reloaded[i]["meta"][0]
        print(f"prompt {i} ({len(ps[i])} tokens): GPU hit {hit}; after flush {again}")
        details = again["cached_tokens_details"] or {}
        full_pages = len(ps[i]) // PAGE * PAGE  # SGLang caches whole pages and recomputes at least one token
        assert full_pages - PAGE <= hit["cached_tokens"] <= full_pages, hit
        assert details.get("storage_backend") == "LongSeqHiCacheStorage", again
        assert details.get("storage") == hit["cached_tokens"] == again["cached_tokens"], (hit, again)
        assert details.get("device") == 0, again  # nothing left on the GPU after the flush
        assert reloaded[i]["tokens"] == gpu_hit[i]["tokens"], (i, reloaded[i]["tokens"], gpu_hit[i]["tokens"])
        print("  cold vs reloaded:", compare_greedy(cold[i], reloaded[i]))


def _duo_session(smollm2_path, prompts, base, env):
    """``_forced_session`` for ``longseq_duo``."""
    return _forced_session(smollm2_path, prompts, base, DUO_TOKENS, {**DUO_ENV, **env}, "longseq_duo")


def test_duo_window_covering_context_is_dense(smollm2_path, prompts, dense):
    """Sparsity 0.5 with a window covering every context: the duo kernels compute dense attention, so they may
    differ from dense only as much as another dense kernel does (``NOISE_BACKEND`` vs triton, teacher-forced, same
    run)."""
    m, res = _duo_session(smollm2_path, prompts["duo"], dense["duo"],
                          {"LONGSEQ_DUO_SPARSITY": "0.5", "LONGSEQ_DUO_SINK": "64", "LONGSEQ_DUO_RECENT": "8192"})
    noise, _ = _forced_session(smollm2_path, prompts["duo"], dense["duo"], DUO_TOKENS, {}, NOISE_BACKEND, NOISE_KW,
                               free_running=False)  # only its teacher-forced metrics bound the duo run
    print("duo window covers context:", {k: m.get(k) for k in KEYS})
    print(f"noise floor ({NOISE_BACKEND} vs triton, teacher-forced):", {k: noise.get(k) for k in KEYS})
    assert _trace_max(res, "longseq_duo", "duo_calls") > 0, res["traces"]
    assert m["agreement"] >= min(0.99, noise["agreement"] - 0.02), (m, noise)
    assert m["mean_kl"] <= max(1e-3, 3 * noise["mean_kl"]), (m, noise)


def test_duo_half_streaming_fidelity_and_negative_control(smollm2_path, prompts, dense):
    """50% streaming heads with the default sink/recent sizes on prompts up to 2000 tokens: close to dense; every
    head streaming over a random pattern with sink 1 / recent 1 must move the distribution and the tokens."""
    m, res = _duo_session(smollm2_path, prompts["duo"], dense["duo"], {"LONGSEQ_DUO_SPARSITY": "0.5"})
    print("duo 50% streaming, sink 64, recent 256:", {k: m[k] for k in KEYS})
    assert _trace_max(res, "longseq_duo", "duo_calls") > 0, res["traces"]
    assert m["agreement"] >= 0.85 and m["mean_kl"] <= 0.05, m
    bad, _ = _duo_session(smollm2_path, prompts["duo"][:2], _subset(dense["duo"], 2),
                          {"LONGSEQ_DUO_PATTERN": "random", "LONGSEQ_DUO_SPARSITY": "1.0", "LONGSEQ_DUO_SINK": "1",
                           "LONGSEQ_DUO_RECENT": "1"})
    assert bad["mean_kl"] > 10 * max(m["mean_kl"], 1e-3) and bad["free_running_match"] < 1.0, bad
