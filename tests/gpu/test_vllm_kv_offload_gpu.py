"""LongSeqOffloadConnector on CUDA (vLLM 0.26, GPU machine).

These tests are the connector's CUDA validation (1 and 2 passed on an H200 on 2026-11-29, commit a84cd2c, and
again on 2026-11-30 with 3; 3 passed on two H200s on 2026-11-30).

1. Worker level, real CUDA streams, vLLM's own FLASH_ATTN cache layout: pages written late on the compute
   stream are saved with their final bytes; pages overwritten right after ``save`` returns are saved with
   the bytes they had; a NEW store on the same disk dir loads them into other pages bit-exactly.
2. Engine level: a first engine saves (tokens == plain run); a NEW engine loads from the same disk dir.
   Its reference is a plain engine's OWN prefix-cache hit of the same blocks (same prompts run twice in one
   engine), not the uncached run: on GPU a cached-prefix prefill runs other GEMM/attention shapes than a
   full prefill, so greedy tokens may legitimately differ from the uncached run at near-ties (the first GPU
   run diverged at the third digit of a year). Loaded bytes equal to vLLM's own bytes give identical tokens.
3. Tensor parallelism (2 GPUs): the same at TP=2, where the scheduler cannot see the ranks' stores.

Run on the GPU machine: ``python -m pytest tests/gpu/test_vllm_kv_offload_gpu.py -m gpu -q`` (~3 min).
This file is also the runner of the "same prompts twice in one engine" reference (``__main__``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

import pytest

pytestmark = pytest.mark.gpu

MAX_TOKENS = 16
LENGTHS = [1500, 900]
BLOCK = 16  # vLLM 0.26 CUDA FLASH_ATTN block size
GPU_KWARGS = {"gpu_memory_utilization": 0.3}  # eager (LLM_KWARGS): the connector runs outside the graphs


def kv_config(disk_dir: str, stats: str) -> dict:
    return {"kv_connector": "LongSeqOffloadConnector", "kv_connector_module_path": "longseq.kv_offload.vllm",
            "kv_role": "kv_both", "kv_connector_extra_config": {"cpu_gib": 1, "disk_dir": disk_dir, "disk_gib": 2,
                                                                "stats_path": stats}}


def _need_cuda():
    import torch

    if not torch.cuda.is_available():
        pytest.fail("GPU test run without a CUDA device")


# ---- 1. worker level --------------------------------------------------------------------------------------

def flash_attn_caches(num_layers: int, num_blocks: int, heads: int, head_size: int):
    """Per-layer caches in vLLM's FLASH_ATTN layout, built like vLLM builds them (shape + stride order)."""
    import torch

    from kv_fixtures import LAYOUTS, vllm_layout_cache
    from vllm.v1.attention.backends.flash_attn import FlashAttentionBackend

    shape = FlashAttentionBackend.get_kv_cache_shape(num_blocks, BLOCK, heads, head_size)
    try:  # reads vLLM's current config (connector-required layout); none is set in a bare test process
        order = FlashAttentionBackend.get_kv_cache_stride_order()
    except Exception:  # noqa: BLE001 - vLLM 0.26's default (NHD), the layout the engine test runs with
        order = LAYOUTS["fa026_nhd"][1]
    return [vllm_layout_cache(tuple(shape), tuple(order), torch.bfloat16, "cuda") for _ in range(num_layers)]


def _block_dim(cache, num_blocks: int) -> int:
    from longseq.kv_offload.vllm_worker import find_block_dim

    return find_block_dim(tuple(cache.shape), num_blocks)


@pytest.mark.parametrize("load_kernel", ["auto", "copy"])
def test_worker_saves_final_bytes_under_stream_races_and_a_new_store_loads_them_bit_exactly(load_kernel, tmp_path):
    """Loads run through the direct-read kernel (``auto``: the DRAM half; the disk half falls back to per-block
    copies) and through per-block copies only (``copy``)."""
    import torch

    from longseq.kv_offload.store import BlockStore, KVFingerprint
    from longseq.kv_offload.vllm_scheduler import BlockTransfer
    from longseq.kv_offload.vllm_worker import OffloadWorker

    _need_cuda()
    L, B, H, D = 4, 64, 3, 64
    fp = KVFingerprint(model="unit", layout="gpu-test", dtype="bfloat16", block_size=BLOCK)
    src = flash_attn_caches(L, B, H, D)
    bd = _block_dim(src[0], B)
    saved_ids = list(range(8, 40))  # 32 pages
    with BlockStore(fp, cpu_gib=0.5, disk_dir=str(tmp_path), disk_gib=1) as store:
        w = OffloadWorker(src, B)
        w.attach(store)
        # Compute stream: a long kernel, THEN the "forward" writes the pages; save() is called right away.
        torch.cuda._sleep(200_000_000)
        for t in src:
            t.copy_(torch.randn(t.shape, device="cuda"))
        want = [t.clone() for t in src]  # on the compute stream: the bytes the forward wrote
        w.save([BlockTransfer("r1", saved_ids[:20], [b"k%d" % i for i in saved_ids[:20]]),
                BlockTransfer("r2", saved_ids[20:], [b"k%d" % i for i in saved_ids[20:]])])
        for t in src:  # vLLM reuses the pages right away (preemption): the save must not see this
            t.fill_(7.0)
        w.drain()
        assert w.counters["saved_blocks"] == 32 and w.counters["dropped_save_blocks"] == 0
        torch.cuda.synchronize()
        assert w.finished_sending({"r1", "r2"}) == {"r1", "r2"}
    dst = flash_attn_caches(L, B, H, D)
    targets = [B - 1 - i for i in range(32)]  # other pages, reversed order
    with BlockStore(fp, cpu_gib=0.5, disk_dir=str(tmp_path), disk_gib=1) as store:  # the new engine
        loader = OffloadWorker(dst, B)
        loader.attach(store, load_kernel=load_kernel)
        assert (loader._direct is not None) == (load_kernel == "auto")
        assert all(store.contains(b"k%d" % i) and not store.in_dram(b"k%d" % i) for i in saved_ids)
        for i in saved_ids[:16]:  # as the scheduler's check does: read from disk into (pinned) DRAM first;
            assert store.get(b"k%d" % i) is not None  # the other 16 take the worker's own disk-read path
        loader.load([BlockTransfer("r3", targets, [b"k%d" % i for i in saved_ids])], block_size=BLOCK)
        torch.cuda.synchronize()
    assert loader.counters["loaded_blocks"] == 32 and not loader.load_errors
    for s_, d_ in zip(want, dst):
        for i, t in zip(saved_ids, targets):
            assert torch.equal(d_.select(bd, t), s_.select(bd, i)), (i, t)
        others = sorted(set(range(B)) - set(targets))
        assert not d_.index_select(bd, torch.tensor(others, device="cuda")).any()


# ---- 2. engine level --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def prompts(smollm2_path):
    from transformers import AutoTokenizer

    from longseq.models.prompts import make_prompts

    return make_prompts(AutoTokenizer.from_pretrained(smollm2_path), LENGTHS, seed=3)


def run_twice_in_one_engine(model: str, prompts: list[list[int]], llm_kwargs: dict | None = None) -> dict:
    """Plain engine (prefix caching on): prompts once (1 token, fills vLLM's cache), then again: the second
    pass is vLLM's own GPU prefix-cache hit of (n-1)//16 blocks per prompt, the numerics ours must match."""
    from engine_utils import LLM_KWARGS, clean_env

    with tempfile.TemporaryDirectory() as tmp:
        spec, out = os.path.join(tmp, "spec.json"), os.path.join(tmp, "out.json")
        json.dump({"model": model, "prompts": prompts,
                   "llm_kwargs": {**LLM_KWARGS, **GPU_KWARGS, **(llm_kwargs or {})}}, open(spec, "w"))
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), spec, out], env=clean_env({}), cwd=tmp,
                              capture_output=True, text=True, timeout=900)
        if proc.returncode != 0 or not os.path.exists(out):
            log = (proc.stdout + proc.stderr)[-4000:]
            raise RuntimeError(f"reference engine failed (exit {proc.returncode}):\n{log}")
        return json.load(open(out))


def test_save_then_load_in_a_new_engine_matches_vllms_own_prefix_hit(smollm2_path, prompts, tmp_path):
    from engine_utils import run_llm

    _need_cuda()
    disk = str(tmp_path / "kv")
    base = run_llm(smollm2_path, prompts, MAX_TOKENS, {}, llm_kwargs=GPU_KWARGS)
    native_hit = run_twice_in_one_engine(smollm2_path, prompts)
    first = run_llm(smollm2_path, prompts, MAX_TOKENS, {},
                    llm_kwargs={**GPU_KWARGS, "kv_transfer_config": kv_config(disk, str(tmp_path / "s1.json"))})
    s1 = json.load(open(tmp_path / "s1.json"))
    second = run_llm(smollm2_path, prompts, MAX_TOKENS, {},
                     llm_kwargs={**GPU_KWARGS, "kv_transfer_config": kv_config(disk, str(tmp_path / "s2.json"))})
    s2 = json.load(open(tmp_path / "s2.json"))
    print(f"native prefix hit == uncached run: {native_hit['tokens'] == base['tokens']}; "
          f"ours == native hit: {second['tokens'] == native_hit['tokens']}; ours == uncached: "
          f"{second['tokens'] == base['tokens']}")
    assert first["tokens"] == base["tokens"]  # saving never changes what the engine computes
    assert s1["saved_blocks"] > 0 and s1["loaded_tokens"] == 0
    # every full block but the one holding each prompt's last token
    assert s2["loaded_tokens"] == sum((n - 1) // BLOCK * BLOCK for n in LENGTHS), s2
    assert s2["store"]["corrupt_blocks"] == 0
    hit_tokens = [(n - 1) // BLOCK * BLOCK for n in LENGTHS]
    assert native_hit["cached_tokens"] == hit_tokens, native_hit  # the reference really is a prefix hit
    assert second["tokens"] == native_hit["tokens"]


def test_tp2_each_rank_saves_and_a_new_engine_loads_like_vllms_own_prefix_hit(tmp_path):
    """TP=2: each rank stores its own KV head under its own fingerprint; the scheduler (another process) counts
    hits from its index and both ranks' disk files; a new TP=2 engine loads every rank's blocks and gives vLLM's
    own prefix-hit tokens. Model: the tiny ``gqa4-d128`` preset (2 KV heads: one per rank)."""
    import random

    import torch

    from engine_utils import run_llm
    from longseq.models.tiny import VOCAB_SIZE, tiny_model_path

    _need_cuda()
    if torch.cuda.device_count() < 2:
        pytest.skip(f"needs 2 GPUs, this machine has {torch.cuda.device_count()}")
    model = tiny_model_path("gqa4-d128", str(tmp_path / "tiny"))
    rng = random.Random(5)
    prompts = [[rng.randrange(3, VOCAB_SIZE) for _ in range(n)] for n in LENGTHS]
    tp = {"tensor_parallel_size": 2}
    disk, s1, s2 = str(tmp_path / "kv"), str(tmp_path / "s1.json"), str(tmp_path / "s2.json")
    native_hit = run_twice_in_one_engine(model, prompts, tp)
    first = run_llm(model, prompts, MAX_TOKENS, {},
                    llm_kwargs={**GPU_KWARGS, **tp, "kv_transfer_config": kv_config(disk, s1)})
    second = run_llm(model, prompts, MAX_TOKENS, {},
                     llm_kwargs={**GPU_KWARGS, **tp, "kv_transfer_config": kv_config(disk, s2)})
    hit_tokens = [(n - 1) // BLOCK * BLOCK for n in LENGTHS]
    assert native_hit["cached_tokens"] == hit_tokens, native_hit
    ranks1 = [json.load(open(f"{s1}.tp{r}")) for r in range(2)]
    ranks2 = [json.load(open(f"{s2}.tp{r}")) for r in range(2)]
    sched2 = json.load(open(s2))
    print(f"TP=2 first == reference: {first['tokens'] == native_hit['tokens']}; reload == reference: "
          f"{second['tokens'] == native_hit['tokens']}; scheduler {sched2}; ranks {ranks2}")
    assert all(r["saved_blocks"] > 0 and r["loaded_tokens"] == 0 for r in ranks1), ranks1
    assert sched2["ranks"] == 2 and sched2["hit_tokens"] == sum(hit_tokens), sched2
    assert all(r["loaded_tokens"] == sum(hit_tokens) and r["load_failed_blocks"] == 0 for r in ranks2), ranks2
    assert second["tokens"] == native_hit["tokens"]


def _reference_main(spec_path: str, out_path: str) -> None:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    spec = json.load(open(spec_path))
    llm = LLM(model=spec["model"], **spec["llm_kwargs"])
    prompts = [TokensPrompt(prompt_token_ids=p) for p in spec["prompts"]]
    llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=1), use_tqdm=False)
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True),
                        use_tqdm=False)
    json.dump({"tokens": [list(o.outputs[0].token_ids) for o in outs],
               "cached_tokens": [o.num_cached_tokens for o in outs]}, open(out_path, "w"))


if __name__ == "__main__":
    _reference_main(sys.argv[1], sys.argv[2])
