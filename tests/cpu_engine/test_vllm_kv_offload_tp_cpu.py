"""``LongSeqOffloadConnector`` under tensor parallelism, on vLLM's CPU engine (TP=2: two worker processes).

Each rank stores its own heads under its own fingerprint; the scheduler (in the engine-core process) counts hits
from an index of what it sent plus every rank's disk files (``kv_offload/vllm_hits.py``), and each rank checks its
blocks when it loads them. The engine tests restart the server on the same disk directory (the reload must give the
same tokens as TP=2 without the connector) and damage one rank's copy of a block (vLLM must recompute it on every
rank: output still identical). The model is the tiny random-weight ``gqa4-d128`` preset (8 query / 2 KV heads;
SmolLM2's 3 KV heads do not split in two); its greedy output depends on the context: replacing the first block of
a prompt changes it (checked), so a wrong block would show.
"""

from __future__ import annotations

import json
import os

import pytest

from engine_utils import run_llm
from kv_fixtures import block_keys, block_path, flip_payload_byte, kv_config

BLOCK = 128  # vLLM CPU's default KV block size
MAX_TOKENS = 8
# One OpenMP thread per rank, bound explicitly (vLLM's auto-binding wants one NUMA node per rank); with a single
# allowed CPU both ranks share it.
_CPUS = sorted(os.sched_getaffinity(0))
TP_ENV = {"VLLM_CPU_OMP_THREADS_BIND": f"{_CPUS[0]}|{_CPUS[min(1, len(_CPUS) - 1)]}"}
TP_KWARGS = {"tensor_parallel_size": 2}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from longseq.models.tiny import tiny_model_path

    return tiny_model_path("gqa4-d128", str(tmp_path_factory.mktemp("tiny")))  # 8 query / 2 KV heads


@pytest.fixture(scope="module")
def prompts():
    import random

    from longseq.models.tiny import VOCAB_SIZE

    rng = random.Random(11)
    long, short = ([rng.randrange(3, VOCAB_SIZE) for _ in range(n)] for n in (1500, 700))
    other_start = [rng.randrange(3, VOCAB_SIZE) for _ in range(BLOCK)] + long[BLOCK:]  # block 0 replaced
    return [long, short, other_start]


def run(model: str, prompts, kv: dict | None) -> list[list[int]]:
    kwargs = {**TP_KWARGS, **({"kv_transfer_config": kv} if kv else {})}
    return run_llm(model, prompts, MAX_TOKENS, TP_ENV, llm_kwargs=kwargs)["tokens"]


def rank_stats(stats: str) -> list[dict]:
    return [json.load(open(f"{stats}.tp{r}")) for r in range(2)]


def fingerprints(disk_dir: str) -> dict[int, object]:
    """rank -> fingerprint of the block files in ``disk_dir`` (from the fingerprint sidecars)."""
    from longseq.kv_offload.store import KVFingerprint

    fps = [KVFingerprint.from_json(open(os.path.join(disk_dir, "fingerprints", n)).read())
           for n in os.listdir(os.path.join(disk_dir, "fingerprints"))]
    return {int(fp.layout.split(":tp")[1].split("of")[0]): fp for fp in fps}


@pytest.fixture(scope="module")
def base(tiny_model, prompts):
    return run(tiny_model, prompts, None)


@pytest.fixture(scope="module")
def saved(tiny_model, prompts, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("kv-tp-save")
    disk, stats = str(tmp / "kv"), str(tmp / "save.json")
    return disk, run(tiny_model, prompts, kv_config(disk, stats)), stats


@pytest.mark.engine
def test_each_rank_saves_its_own_blocks_and_output_matches_tp2_without_connector(saved, base, prompts):
    disk, tokens, stats = saved
    assert base[0] != base[2]  # the output depends on block 0's KV: a wrong block would change it
    assert tokens == base
    full_blocks = sum(len(p) // BLOCK for p in prompts)
    for r, s in enumerate(rank_stats(stats)):
        assert s["rank"] == r and s["saved_blocks"] == full_blocks, s
    fps = fingerprints(disk)
    assert sorted(fps) == [0, 1] and fps[0].digest() != fps[1].digest()  # one namespace per rank's heads
    assert all(f"tp{r}of2" in fps[r].layout for r in (0, 1))


@pytest.fixture(scope="module")
def reloaded(tiny_model, prompts, saved, tmp_path_factory):
    disk, _, _ = saved
    stats = str(tmp_path_factory.mktemp("kv-tp-reload") / "reload.json")
    return run(tiny_model, prompts, kv_config(disk, stats)), stats


@pytest.mark.engine
def test_restarted_tp2_server_loads_every_rank_from_disk_with_identical_output(reloaded, base, prompts):
    tokens, stats = reloaded
    assert tokens == base
    hit_blocks = sum((len(p) - 1) // BLOCK for p in prompts)  # the last prompt token is always computed
    sched = json.load(open(stats))
    assert sched["ranks"] == 2 and sched["hit_tokens"] == hit_blocks * BLOCK, sched
    for s in rank_stats(stats):
        assert s["loaded_blocks"] == hit_blocks and s["load_failed_blocks"] == 0, s


@pytest.mark.engine
def test_a_block_damaged_on_one_rank_is_recomputed_on_every_rank(tiny_model, prompts, saved, reloaded, base,
                                                                    tmp_path):
    """Rank 1's copy of block 3 of the long prompt gets a flipped payload byte (its header still passes the
    scheduler's probe). Rank 1 fails it at load time; vLLM recomputes from there on both ranks, and the scheduler
    sends the recomputed blocks for saving again: the next server loads every block on both ranks."""
    disk, _, _ = saved
    flip_payload_byte(block_path(disk, fingerprints(disk)[1], block_keys(prompts[0])[3]))
    stats = str(tmp_path / "damaged.json")
    assert run(tiny_model, prompts, kv_config(disk, stats)) == base
    r0, r1 = rank_stats(stats)
    assert r1["load_failed_blocks"] >= 1 and r1["store"]["corrupt_blocks"] == 1, r1
    assert r0["load_failed_blocks"] == 0 and r0["loaded_blocks"] > r1["loaded_blocks"], (r0, r1)
    assert r1["saved_blocks"] >= 1, r1  # the recomputed block 3 (and later ones rank 1 could not load) again
    stats = str(tmp_path / "after.json")
    assert run(tiny_model, prompts, kv_config(disk, stats)) == base
    hit_blocks = sum((len(p) - 1) // BLOCK for p in prompts)
    for s in rank_stats(stats):
        assert s["loaded_blocks"] == hit_blocks and s["load_failed_blocks"] == 0, s


@pytest.fixture(scope="module")
def remote_pool(tmp_path_factory):
    """A Mooncake master and a memory node (``mooncake_client``) that holds the pool: the engines lend none, so
    their blocks outlive them."""
    from longseq.kv_offload.mooncake_local import LocalMaster, LocalPoolNode

    tmp = tmp_path_factory.mktemp("kv-tp-remote")
    master = LocalMaster(tmp)
    master.start()
    pool = None
    try:
        pool = LocalPoolNode(master, 128 << 20, tmp)
        yield master, tmp
    finally:
        if pool is not None:
            pool.stop()
        master.stop()


@pytest.mark.engine
def test_tp2_engines_share_every_ranks_blocks_through_the_remote_store(tiny_model, prompts, base, remote_pool):
    """Engine A (TP=2) saves; engine B (TP=2, its own empty disk dir) loads every rank's blocks from the remote
    store: its scheduler asks the master whether each rank's record exists (``RemoteProbe``)."""
    master, tmp = remote_pool
    remote = {"kind": "mooncake", "master": master.address, "segment_gib": 0, "buffer_gib": 1 / 64,
              "timeout_s": 1.0}
    a_stats, b_stats = str(tmp / "a.json"), str(tmp / "b.json")
    assert run(tiny_model, prompts, kv_config(str(tmp / "a-kv"), a_stats, remote=remote)) == base
    full_blocks = sum(len(p) // BLOCK for p in prompts)
    for s in rank_stats(a_stats):
        assert s["store"]["remote"]["puts"] == full_blocks, s["store"]["remote"]
    assert run(tiny_model, prompts, kv_config(str(tmp / "b-kv"), b_stats, remote=remote)) == base
    hit_blocks = sum((len(p) - 1) // BLOCK for p in prompts)
    sched = json.load(open(b_stats))
    assert sched["hit_tokens"] == hit_blocks * BLOCK, sched
    assert sched["remote_probe"]["lookups"] > 0 and sched["remote_probe"]["errors"] == 0, sched
    for s in rank_stats(b_stats):
        assert s["loaded_blocks"] == hit_blocks and s["load_failed_blocks"] == 0, s
        assert s["store"]["disk_hits"] == 0 and s["store"]["remote"]["hits"] == hit_blocks, s["store"]


# ---- without an engine: the scheduler's index and a rank's load-time checks ------------------------------------

def _rank_store(tmp_path, rank: int):
    from longseq.kv_offload.store import BlockStore, KVFingerprint

    fp = KVFingerprint(model="unit", layout=f"test:tp{rank}of2", dtype="bfloat16", block_size=16)
    return BlockStore(fp, cpu_gib=0.01, disk_dir=str(tmp_path), disk_gib=0.01)


def _block():
    import torch

    return torch.randint(0, 255, (4096,), dtype=torch.uint8)


def test_index_counts_sent_keys_then_blocks_every_rank_has_on_disk(tmp_path):
    from longseq.kv_offload.vllm_hits import KeyIndexHits, RankInfo

    keys = [bytes([i]) * 16 for i in range(6)]
    stores = [_rank_store(tmp_path, r) for r in (0, 1)]
    for r, s in enumerate(stores):
        for k in keys[2:5] if r == 0 else keys[2:4]:  # block 4 only on rank 0's disk
            s.put(k, _block())
        s.flush()
    ranks = [RankInfo(r, s.fingerprint.to_json(), dram_blocks=3 + r) for r, s in enumerate(stores)]
    hits = KeyIndexHits(ranks, str(tmp_path), 0.01)
    assert hits.capacity == 3  # the smallest rank's DRAM tier
    assert hits.count(keys) == 0  # block 0: never sent, no file
    hits.sent(keys[:2])
    assert hits.count(keys) == 4  # 0-1 from the index, 2-3 on both ranks' disks, 4 on rank 0's only
    assert hits.in_dram_batch(keys[:3]) == [True, True, False]
    hits.sent([keys[5], keys[4]])  # capacity 3: the oldest sent key (0; 1 was touched by the count) goes
    assert keys[0] not in hits and all(k in hits for k in (keys[1], keys[4], keys[5]))
    no_disk = KeyIndexHits(ranks)
    assert no_disk.count(keys[2:]) == 0 and no_disk.disks == []
    for s in stores:
        s.close()


def test_rank_loads_its_usable_prefix_and_reports_the_rest_as_load_errors(tmp_path):
    """A transfer the scheduler could not check (``checked=False``): the rank pulls its disk blocks into DRAM,
    loads up to its first missing or corrupt block and reports that block and every later one."""
    import torch

    from longseq.kv_offload.vllm_scheduler import BlockTransfer
    from longseq.kv_offload.vllm_worker import OffloadWorker

    B, H, N, D = 8, 2, 16, 8
    src = [torch.randn(B, H, N, 2 * D).to(torch.bfloat16) for _ in range(2)]
    dst = [torch.zeros(B, H, N, 2 * D, dtype=torch.bfloat16) for _ in range(2)]
    keys = [bytes([i + 1]) * 16 for i in range(4)]
    with _rank_store(tmp_path, 1) as store:
        saver = OffloadWorker(src, B)
        saver.attach(store)
        saver.save([BlockTransfer("r", [0, 1, 3], [keys[0], keys[1], keys[3]])])  # keys[2] never saved
        saver.drain()
    with _rank_store(tmp_path, 1) as store:  # restarted: everything on disk only
        loader = OffloadWorker(dst, B)
        loader.attach(store)
        loader.load([BlockTransfer("r", [4, 5, 6, 7], keys, checked=False)], block_size=N)
        assert loader.load_errors == {6, 7} and loader.counters["loaded_blocks"] == 2
        assert loader.counters["load_failed_blocks"] == 2 and store.in_dram(keys[3])  # read, but after the gap
    for s_, d_ in zip(src, dst):
        assert torch.equal(d_[4], s_[0]) and torch.equal(d_[5], s_[1])
        assert not d_[6].any() and not d_[7].any()


def test_a_block_that_failed_to_load_is_forgotten_and_saved_again_after_recompute():
    """A rank lost block 1 (say, its save was dropped): the load fails there, vLLM recomputes from block 1, and the
    scheduler must stop counting blocks 1+ and send them for saving again, or every later hit would fail too."""
    from longseq.kv_offload.vllm_hits import KeyIndexHits, RankInfo
    from longseq.kv_offload.vllm_scheduler import OffloadScheduler
    from kv_fixtures import FakeRequest, fake_step

    hits = KeyIndexHits([RankInfo(0, "{}", 100), RankInfo(1, "{}", 100)])
    sch = OffloadScheduler(hits, block_size=16)
    tokens = list(range(2000, 2000 + 70))  # 4 full blocks + 6
    first = FakeRequest("a", tokens)
    sch.track(first)
    _, saves = sch.build_step(fake_step(new=[("a", [1, 2, 3, 4, 5], 0)], sched={"a": 70}))
    keys = saves[0].keys
    assert len(keys) == 4 and all(k in hits for k in keys)
    sch.finished(first)
    again = FakeRequest("b", tokens)
    assert sch.num_new_matched_tokens(again, 0) == 64
    sch.after_alloc(again, [6, 7, 8, 9, 10], 64)
    loads, saves = sch.build_step(fake_step(new=[("b", [6, 7, 8, 9, 10], 64)], sched={"b": 6}))
    assert [t.block_ids for t in loads] == [[6, 7, 8, 9]] and not saves
    sch.load_failed({7})  # what update_connector_output passes on from the ranks' union of load errors
    assert keys[0] in hits and not any(k in hits for k in keys[1:])
    # vLLM recomputes from block 1 (tokens 16..69); the recomputed full blocks are saved again
    _, saves = sch.build_step(fake_step(cached=[("b", None, 16)], sched={"b": 54}))
    assert [(t.block_ids, t.keys) for t in saves] == [([7, 8, 9], keys[1:])]
    assert sch.num_new_matched_tokens(FakeRequest("c", tokens), 0) == 64
