"""The KV offload connector's vLLM halves without an engine: config parsing, the worker's copies through the
store in every vLLM cache layout, and the scheduler's bookkeeping on stand-in requests."""

from __future__ import annotations

import pytest

from kv_fixtures import LAYOUTS, FakeRequest, fake_step, unit_store, block_path, logical_block, vllm_layout_cache


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
    # the disk write-behind queue: the DRAM tier's size (at least 1 GiB) unless set
    assert parse_extra_config({"cpu_gib": 8})["write_queue_gib"] == 8.0
    assert parse_extra_config({"cpu_gib": 0, "disk_dir": "/tmp/x"})["write_queue_gib"] == 1.0
    assert parse_extra_config({"write_queue_gib": 6})["write_queue_gib"] == 6.0
    for bad in (0, -1, "8", float("inf"), True):
        with pytest.raises(OffloadConfigError, match="write_queue_gib must be"):
            parse_extra_config({"write_queue_gib": bad})


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
    with unit_store(tmp_path) as store:
        saver = OffloadWorker(src, B)
        saver.attach(store)
        saver.save([BlockTransfer("r1", [1, 3], [b"k1", b"k3"]), BlockTransfer("r2", [6], [b"k6"])])
        saver.drain()
        assert saver.counters["saved_blocks"] == 3
        assert saver.finished_sending({"r1", "r2", "other"}) == {"r1", "r2"}
    with unit_store(tmp_path) as store:  # the new engine: nothing in DRAM, blocks come from disk
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

    with unit_store(tmp_path) as store:
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
        with unit_store() as store:
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


def test_trust_settings_are_validated_and_reach_the_store(tmp_path):
    """``shared_group`` and ``auth_key_file`` (issue 17): checked when the config is parsed, each error naming the
    setting; a store opened from the config writes tagged blocks with group-shared modes."""
    import grp
    import os
    import stat

    import torch

    from kv_fixtures import key_file
    from longseq.kv_offload import disk
    from longseq.kv_offload.store import KVFingerprint
    from longseq.kv_offload.vllm import OffloadConfigError, open_store, parse_extra_config

    assert parse_extra_config({})["shared_group"] is False and parse_extra_config({})["auth_key_file"] is None
    group = grp.getgrgid(os.getegid()).gr_name
    assert parse_extra_config({"shared_group": group})["shared_group"] == group
    for bad in ("no-such-group-longseq", 1, ""):
        with pytest.raises(OffloadConfigError, match="LongSeqOffloadConnector: shared_group"):
            parse_extra_config({"shared_group": bad})
    with pytest.raises(OffloadConfigError, match="auth_key_file=.* does not exist"):
        parse_extra_config({"auth_key_file": str(tmp_path / "missing")})
    loose = key_file(tmp_path / "loose", mode=0o644)
    with pytest.raises(OffloadConfigError, match="LongSeqOffloadConnector: auth_key_file=.*accessible by group"):
        parse_extra_config({"auth_key_file": loose})
    with pytest.raises(OffloadConfigError, match="auth_key_file must be a non-empty path"):
        parse_extra_config({"auth_key_file": 7})
    with pytest.raises(OffloadConfigError, match=r"unknown kv_connector_extra_config key\(s\) \['auth_key'\]"):
        parse_extra_config({"auth_key": "secret"})
    cfg = parse_extra_config({"cpu_gib": 0.01, "disk_dir": str(tmp_path / "kv"), "disk_gib": 0.01,
                              "shared_group": True, "auth_key_file": key_file(tmp_path / "key")})
    store = open_store(cfg, KVFingerprint("m", "l", "bfloat16", 16), 64)
    store.put(b"k", torch.arange(64, dtype=torch.uint8))
    store.close()
    path = store._disk.path_for(b"k")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o660
    with open(path, "rb") as f:
        assert disk.HEADER.unpack(f.read(disk.HEADER_SIZE))[1] == disk.TAGGED_VERSION


def test_scheduler_counts_verified_prefix_hits_and_saves_each_full_block_once(tmp_path):
    import torch

    from longseq.kv_offload.vllm_scheduler import OffloadScheduler, chain_keys, request_seed

    store = unit_store(tmp_path)
    sch = OffloadScheduler(store, block_size=16)
    tokens = list(range(1000, 1000 + 70))  # 4 full blocks + 6 tokens
    keys = chain_keys(tokens, 16, 4, request_seed(FakeRequest("x", [])))
    assert keys == chain_keys(list(tokens), 16, 4, request_seed(FakeRequest("y", [])))  # stable, request-independent
    for k in keys[:3]:
        store.put(k, torch.ones(64, dtype=torch.uint8))
    req = FakeRequest("a", tokens)
    assert sch.num_new_matched_tokens(req, 0) == 48  # 3 stored blocks
    assert sch.num_new_matched_tokens(req, 16) == 32  # beyond vLLM's own prefix hit
    sch.after_alloc(req, [7, 8, 9, 10, 11], 32)
    loads, saves = sch.build_step(fake_step(new=[("a", [7, 8, 9, 10, 11], 48)], sched={"a": 22}))
    assert [(t.block_ids, t.keys) for t in loads] == [([8, 9], keys[1:3])]
    assert [(t.block_ids, t.keys) for t in saves] == [([10], [keys[3]])]  # block 3 became full, 0-2 are stored
    tokens.extend(range(10))  # decode: 80 tokens -> block 4 full once its last token's KV is written
    loads, saves = sch.build_step(fake_step(cached=[("a", None, 70)], sched={"a": 1}))
    assert not loads and not saves
    loads, saves = sch.build_step(fake_step(cached=[("a", [12], 79)], sched={"a": 1}))
    assert [(t.block_ids, t.keys) for t in saves] == [([11], chain_keys(tokens, 16, 5, request_seed(req))[4:])]
    assert sch.finished(req) is True and sch.finished(FakeRequest("never-seen", tokens)) is False
    store.close()


def test_scheduler_stops_counting_at_a_corrupt_disk_block(tmp_path):
    import torch

    from longseq.kv_offload.vllm_scheduler import OffloadScheduler, chain_keys, request_seed

    tokens = list(range(500, 500 + 100))  # 6 full blocks
    keys = chain_keys(tokens, 16, 6, request_seed(FakeRequest("x", [])))
    with unit_store(tmp_path) as writer:
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
    with unit_store(tmp_path) as reader:  # a new process: empty DRAM tier, same dir
        sch = OffloadScheduler(reader, block_size=16)
        assert sch.num_new_matched_tokens(FakeRequest("a", tokens), 0) == 3 * 16  # blocks 0-2 read and verified
        s = reader.stats(log_summary=False)
        assert s.corrupt_blocks == 1 and s.disk.hits >= 3


def test_a_block_lost_from_the_store_is_saved_again_by_the_next_request(tmp_path):
    """A hot prefix whose block file was deleted (or damaged, then deleted by a failed check) after its save: the next
    request's lookup misses it, recomputes it and must save it again, although another request sent the same key
    for saving a moment ago (found by the soak, docs/benchmarks/kv-offload.md)."""
    import os

    import torch

    from longseq.kv_offload.store import BlockStore
    from longseq.kv_offload.vllm_scheduler import OffloadScheduler, chain_keys, request_seed

    tokens = list(range(700, 700 + 40))  # 2 full blocks
    keys = chain_keys(tokens, 16, 2, request_seed(FakeRequest("x", [])))
    fp = unit_store().fingerprint
    with BlockStore(fp, cpu_gib=0, disk_dir=str(tmp_path), disk_gib=0.01) as store:  # disk only: a deleted file is gone
        sch = OffloadScheduler(store, block_size=16)
        first = FakeRequest("a", tokens)
        assert sch.num_new_matched_tokens(first, 0) == 0
        _, saves = sch.build_step(fake_step(new=[("a", [1, 2, 3], 0)], sched={"a": 40}))
        assert [t.keys for t in saves] == [keys]
        for k in keys:  # the worker's saves
            store.put(k, torch.randint(0, 255, (4096,), dtype=torch.uint8))
        store.flush()
        sch.finished(first)
        os.unlink(block_path(str(tmp_path), store.fingerprint, keys[1]))  # a hostile user deletes block 1
        again = FakeRequest("b", tokens)
        assert sch.num_new_matched_tokens(again, 0) == 16  # block 0 still there, block 1 lost
        sch.after_alloc(again, [4, 5, 6], 16)
        loads, saves = sch.build_step(fake_step(new=[("b", [4, 5, 6], 16)], sched={"b": 24}))
        assert [t.keys for t in loads] == [keys[:1]]
        assert [(t.block_ids, t.keys) for t in saves] == [([5], keys[1:])]  # saved again, not skipped as "recent"


def test_save_check_asks_dram_only_and_re_saves_disk_only_blocks(tmp_path, monkeypatch):
    """Deciding which blocks of a step to save opens no file (it ran on the engine thread once per new block:
    ~16 ms for a 32K prompt on the H200). A block found only on disk is saved again: it lands in DRAM, and the disk
    writer finds the file already there and only refreshes it."""
    import torch

    from longseq.kv_offload import disk
    from longseq.kv_offload.vllm_scheduler import OffloadScheduler, chain_keys, request_seed

    tokens = list(range(300, 300 + 40))  # 2 full blocks
    keys = chain_keys(tokens, 16, 2, request_seed(FakeRequest("x", [])))
    with unit_store(tmp_path) as writer:
        writer.put(keys[0], torch.randint(0, 255, (4096,), dtype=torch.uint8))
        writer.flush()
    with unit_store(tmp_path) as store:  # a restarted server: block 0 on disk only
        opened: list[str] = []
        real_open = open
        monkeypatch.setattr(disk, "open", lambda p, *a, **k: (opened.append(p), real_open(p, *a, **k))[1],
                            raising=False)
        sch = OffloadScheduler(store, block_size=16)
        req = FakeRequest("a", tokens)
        sch.track(req)
        loads, saves = sch.build_step(fake_step(new=[("a", [4, 5, 6], 0)], sched={"a": 40}))
        assert opened == []
        assert not loads and [(t.block_ids, t.keys) for t in saves] == [([4, 5], keys)]
        n_files = len(list((tmp_path / "blocks").rglob("*.kvb")))
        store.put(keys[0], torch.randint(0, 255, (4096,), dtype=torch.uint8))  # the worker's save of block 0
        store.flush()
        assert store.in_dram(keys[0]) and len(list((tmp_path / "blocks").rglob("*.kvb"))) == n_files == 1
