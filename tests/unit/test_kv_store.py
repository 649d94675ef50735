"""The KV offload block store (``longseq.kv_offload``): tiers, eviction, sharing and fault handling, on CPU.

Every fault case ends the same way: the bad block is a miss (never data), it is counted, and the store keeps
serving correct bytes afterwards.
"""

from __future__ import annotations

import errno
import glob
import logging
import multiprocessing
import os
import random
import resource
import signal
import subprocess
import sys

import pytest
import torch

from longseq.kv_offload import disk
from longseq.kv_offload.store import BlockStore, KVFingerprint

FP = KVFingerprint("test-org/tiny", "test:layers=2:shape=[2,16,2,32]", "bfloat16", 16)
BLOCK_SHAPE = (2, 2, 16, 2, 32)  # 8 KiB in bf16
BLOCK_BYTES = 2 * 2 * 16 * 2 * 32 * 2
KIB = 1 / (1 << 20)  # in GiB units: cpu_gib=n * KIB holds n KiB


def _block(i: int, dtype=torch.bfloat16) -> torch.Tensor:
    """Deterministic random block for key i (content-addressed: same key, same bytes, in every process)."""
    g = torch.Generator().manual_seed(1000 + i)
    x = torch.randn(BLOCK_SHAPE, generator=g) * 3
    return x.to(dtype)


def _key(i: int) -> bytes:
    return b"chain-%06d" % i


def _files(d) -> list[str]:
    return sorted(glob.glob(os.path.join(str(d), "blocks", "*", "*", "*.kvb")))


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float8_e4m3fn])
def test_roundtrip_every_dtype_dram_and_disk(tmp_path, dtype):
    fp = KVFingerprint(FP.model, FP.layout, str(dtype).removeprefix("torch."), 16)
    data = _block(1, dtype)
    with BlockStore(fp, cpu_gib=1 * KIB * 1024, disk_dir=str(tmp_path), disk_gib=0.01) as store:
        store.put(b"k", data)
        got = store.get(b"k")
        assert got.dtype == torch.uint8 and torch.equal(got, _bytes(data))
        out = torch.empty_like(data)
        assert store.get(b"k", out=out) is out and torch.equal(_bytes(out), _bytes(data))
        assert store.stats().dram.hits == 2
    with BlockStore(fp, cpu_gib=0, disk_dir=str(tmp_path), disk_gib=0.01) as fresh:  # disk only
        out = torch.empty_like(data)
        assert fresh.get(b"k", out=out) is out and torch.equal(_bytes(out), _bytes(data))
        assert fresh.stats().disk.hits == 1


def _pieces(sizes):
    """Separate byte runs (like one page's K and V in SGLang's host pool), filled with a marker value."""
    return [torch.full((n,), 0xA5, dtype=torch.uint8) for n in sizes]


def test_get_into_pieces_from_dram_disk_and_staging(tmp_path):
    data = _bytes(_block(1))
    sizes = (BLOCK_BYTES // 2 - 64, 64, BLOCK_BYTES // 2)
    with BlockStore(FP, cpu_gib=0.001, disk_dir=str(tmp_path), disk_gib=0.01) as store:
        store.put(b"k", _block(1))
        pieces = _pieces(sizes)
        assert store.get(b"k", out=pieces) is pieces  # a DRAM hit, copied straight into the pieces
        assert torch.equal(torch.cat(pieces), data) and store.stats().dram.hits == 1
        assert store.get(b"k", out=_pieces((BLOCK_BYTES, 1))) is None  # one byte too many: a miss, not data
        store.flush()
    with BlockStore(FP, cpu_gib=0.001, disk_dir=str(tmp_path), disk_gib=0.01) as fresh:  # only on disk
        staging = torch.zeros(BLOCK_BYTES, dtype=torch.uint8)
        pieces = _pieces(sizes)
        assert fresh.get(b"k", out=pieces, staging=staging) is pieces
        assert torch.equal(torch.cat(pieces), data) and torch.equal(staging, data)  # read into the staging buffer
        assert fresh.stats().disk.hits == 1
        pieces = _pieces(sizes)
        assert fresh.get(b"k", out=pieces) is pieces and torch.equal(torch.cat(pieces), data)  # promoted to DRAM
        assert fresh.stats().dram.hits == 1
    with BlockStore(FP, cpu_gib=0, disk_dir=str(tmp_path), disk_gib=0.01) as no_dram:  # wrong-size staging: a new one
        pieces = _pieces(sizes)
        assert no_dram.get(b"k", out=pieces, staging=torch.zeros(8, dtype=torch.uint8)) is pieces
        assert torch.equal(torch.cat(pieces), data)
        (path,) = _files(tmp_path)
        _flip(-5)(path)  # a damaged payload never reaches the pieces' owner as data
        assert no_dram.get(b"k", out=_pieces(sizes), staging=torch.zeros(BLOCK_BYTES, dtype=torch.uint8)) is None
        assert no_dram.stats().corrupt_blocks == 1


def test_lru_eviction_by_bytes_then_disk_hit(tmp_path):
    cap = 3 * BLOCK_BYTES / (1 << 30)  # DRAM holds exactly three blocks
    with BlockStore(FP, cpu_gib=cap) as dram_only:
        for i in range(3):
            dram_only.put(_key(i), _block(i))
        assert dram_only.get(_key(0)) is not None  # 0 is now the most recent; 1 is the LRU
        dram_only.put(_key(3), _block(3))
        assert dram_only.get(_key(1)) is None
        assert all(torch.equal(dram_only.get(_key(i)), _bytes(_block(i))) for i in (0, 2, 3))
        s = dram_only.stats()
        assert s.dram.evictions == 1 and s.dram_blocks == 3 and s.dram_bytes == 3 * BLOCK_BYTES
    with BlockStore(FP, cpu_gib=cap, disk_dir=str(tmp_path), disk_gib=0.01) as store:
        for i in range(5):
            store.put(_key(i), _block(i))
        store.flush()
        assert store.count_prefix_hits([_key(i) for i in range(6)]) == 5
        assert torch.equal(store.get(_key(0)), _bytes(_block(0)))  # evicted from DRAM, read from disk
        s = store.stats()
        # 2 evictions by puts 3 and 4, 1 by promoting block 0 from disk into DRAM
        assert s.dram.evictions == 3 and s.disk.hits == 1 and s.disk.blocks_written == 5
        assert store.get(_key(0)) is not None and store.stats().dram.hits == 1  # promoted into DRAM


def test_second_store_on_same_dir_hits_and_other_fingerprint_misses(tmp_path):
    with BlockStore(FP, cpu_gib=0.001, disk_dir=str(tmp_path), disk_gib=0.01) as a:
        for i in range(4):
            a.put(_key(i), _block(i))
    with BlockStore(FP, cpu_gib=0.001, disk_dir=str(tmp_path), disk_gib=0.01) as b:  # a new "server"
        assert b.count_prefix_hits([_key(i) for i in range(4)]) == 4
        assert torch.equal(b.get(_key(2)), _bytes(_block(2)))
    other = KVFingerprint("test-org/other", FP.layout, FP.dtype, FP.block_size)
    with BlockStore(other, cpu_gib=0.001, disk_dir=str(tmp_path), disk_gib=0.01) as c:
        assert c.count_prefix_hits([_key(0)]) == 0 and c.get(_key(0)) is None


def _truncate(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 1)


def _flip(offset):
    def flip(path):
        with open(path, "r+b") as f:
            f.seek(offset if offset >= 0 else os.path.getsize(path) + offset)
            b = f.read(1)
            f.seek(-1, 1)
            f.write(bytes([b[0] ^ 0x01]))
    return flip


@pytest.mark.parametrize("fault,damage", [("truncated", _truncate), ("payload_byte", _flip(-5)),
                                          ("header_byte", _flip(30)), ("key_byte", _flip(disk.HEADER_SIZE + 2))])
def test_damaged_block_is_a_miss_then_rewritten(tmp_path, fault, damage, caplog):
    with BlockStore(FP, cpu_gib=0, disk_dir=str(tmp_path), disk_gib=0.01) as store:
        store.put(_key(0), _block(0))
        store.flush()
        (path,) = _files(tmp_path)
        damage(path)
        out = torch.zeros(BLOCK_SHAPE, dtype=torch.bfloat16)
        with caplog.at_level(logging.WARNING, logger="longseq.kv_offload"):
            assert store.get(_key(0), out=out) is None
        assert store.stats().corrupt_blocks == 1 and "failed a check" in caplog.text
        assert not os.path.exists(path) and not store.contains(_key(0))  # removed: it was still the same file
        store.put(_key(0), _block(0))  # the next put writes a good block again
        store.flush()
        assert torch.equal(store.get(_key(0), out=out), _block(0))


def test_block_of_another_model_at_our_name_is_a_miss(tmp_path):
    other = KVFingerprint("test-org/other", FP.layout, FP.dtype, FP.block_size)
    with BlockStore(other, cpu_gib=0, disk_dir=str(tmp_path), disk_gib=0.01) as theirs:
        theirs.put(_key(0), _block(9))
    with BlockStore(FP, cpu_gib=0, disk_dir=str(tmp_path), disk_gib=0.01) as ours:
        ours.put(_key(0), _block(0))
        ours.flush()
        mine = ours._disk.path_for(_key(0))
        (foreign,) = [p for p in _files(tmp_path) if p != mine]
        os.replace(foreign, mine)  # the file name is ours, the header says another fingerprint
        assert not ours.contains(_key(0)) and ours.get(_key(0)) is None
        assert ours.stats().corrupt_blocks == 1


def test_disk_cap_evicts_oldest(tmp_path):
    cap_gib = 10 * (BLOCK_BYTES + 100) / (1 << 30)  # room for ~10 blocks with their headers
    with BlockStore(FP, cpu_gib=0, disk_dir=str(tmp_path), disk_gib=cap_gib, async_disk_writes=False) as store:
        for i in range(30):
            store.put(_key(i), _block(i))
            os.utime(store._disk.path_for(_key(i)), ns=(i * 10**9, i * 10**9))  # distinct mtimes: 0 oldest
        total = sum(os.path.getsize(p) for p in _files(tmp_path))
        assert total <= cap_gib * (1 << 30) and store.stats().disk.evictions >= 20
        assert store.contains(_key(29)) and not store.contains(_key(0))
        assert torch.equal(store.get(_key(29)), _bytes(_block(29)))


def test_enospc_is_counted_logged_once_and_dram_keeps_serving(tmp_path, monkeypatch, caplog):
    """Simulated ENOSPC (monkeypatched writer): no file is published, the error is logged once and counted."""
    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device (simulated)")

    monkeypatch.setattr(disk, "write_atomic", full)
    with caplog.at_level(logging.WARNING, logger="longseq.kv_offload"):
        with BlockStore(FP, cpu_gib=0.01, disk_dir=str(tmp_path), disk_gib=0.01) as store:
            for i in range(3):
                store.put(_key(i), _block(i))
            store.flush()
            # 1 + 3: the fingerprint sidecar at startup, then each block (each retries the sidecar first)
            assert store.stats().write_errors == 4 and _files(tmp_path) == []
            assert all(torch.equal(store.get(_key(i)), _bytes(_block(i))) for i in range(3))
    assert caplog.text.count("disk full") == 1


def test_real_write_failure_midway_publishes_nothing(tmp_path):
    """A real failing write(2): RLIMIT_FSIZE below the block size makes the kernel refuse the write part-way
    (EFBIG, the same path as a disk filling up mid-file). No partial block or temp file is left behind."""
    with BlockStore(FP, cpu_gib=0.01, disk_dir=str(tmp_path), disk_gib=0.01, async_disk_writes=False) as store:
        old_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
        old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        try:
            resource.setrlimit(resource.RLIMIT_FSIZE, (BLOCK_BYTES // 2, old_limit[1]))
            store.put(_key(0), _block(0))
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
            signal.signal(signal.SIGXFSZ, old_handler)
        assert store.stats().write_errors == 1
        assert glob.glob(os.path.join(str(tmp_path), "blocks", "*", "*", "*")) == []
        assert torch.equal(store.get(_key(0)), _bytes(_block(0)))  # DRAM still has it
        store.put(_key(1), _block(1))  # and the disk works again once there is room
        assert len(_files(tmp_path)) == 1


def test_unwritable_dir_real_enotdir(tmp_path):
    """disk_dir below a regular file: a real OS error even for root (chmod would not stop root)."""
    (tmp_path / "afile").write_text("x")
    with BlockStore(FP, cpu_gib=0.01, disk_dir=str(tmp_path / "afile" / "kv"), disk_gib=0.01) as store:
        store.put(_key(0), _block(0))
        store.flush()
        assert store.stats().write_errors >= 1
        assert torch.equal(store.get(_key(0)), _bytes(_block(0)))


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions; "
                    "test_unwritable_dir_real_enotdir covers a real write failure as root")
def test_read_only_dir_still_serves_reads(tmp_path):
    with BlockStore(FP, cpu_gib=0, disk_dir=str(tmp_path), disk_gib=0.01) as writer:
        writer.put(_key(0), _block(0))
    for root, dirs, _ in os.walk(tmp_path):
        for d in dirs:
            os.chmod(os.path.join(root, d), 0o555)
    os.chmod(tmp_path, 0o555)
    try:
        with BlockStore(FP, cpu_gib=0, disk_dir=str(tmp_path), disk_gib=0.01) as reader:
            assert torch.equal(reader.get(_key(0)), _bytes(_block(0)))
            reader.put(_key(1), _block(1))
            reader.flush()
            assert reader.stats().write_errors == 1 and reader.get(_key(1)) is None
    finally:
        for root, dirs, _ in os.walk(tmp_path):
            os.chmod(root, 0o755)


def _server(root: str, seed: int, n: int, conn) -> None:
    """One 'server': writes n blocks (in its own order) and reads random earlier ones back."""
    torch.set_num_threads(1)  # a forked child must not reuse the parent's OpenMP pool
    rnd = random.Random(seed)
    order = list(range(n))
    rnd.shuffle(order)
    hits = wrong = 0
    cap_gib = (n // 3) * (BLOCK_BYTES + 100) / (1 << 30)  # both servers evict each other's files
    with BlockStore(FP, cpu_gib=0, disk_dir=root, disk_gib=cap_gib, log_interval_s=0) as store:
        for step, i in enumerate(order):
            store.put(_key(i), _block(i))
            j = order[rnd.randrange(step + 1)]
            got = store.get(_key(j))
            if got is not None:
                hits += 1
                wrong += not torch.equal(got, _bytes(_block(j)))
        store.flush()  # the disk writer is async: count the evictions its last writes cause too
        s = store.stats(log_summary=False)
        conn.send((hits, wrong, s.corrupt_blocks, s.disk.evictions))


def test_two_servers_share_one_dir(tmp_path):
    ctx = multiprocessing.get_context("fork")  # fork: no second torch import (CPU time budget)
    pipes, procs = [], []
    for seed in (1, 2):
        parent, child = ctx.Pipe()
        p = ctx.Process(target=_server, args=(str(tmp_path), seed, 240, child))
        p.start()
        pipes.append(parent)
        procs.append(p)
    results = [c.recv() for c in pipes]
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    for hits, wrong, corrupt, _ in results:
        assert wrong == 0 and corrupt == 0  # every block read equals what was written, none torn
        assert hits > 0
    assert sum(r[0] for r in results) > 240  # most reads are served, from disk (cpu_gib=0)
    assert sum(r[3] for r in results) > 0  # the cap made them evict files the other one reads


def test_config_errors_are_clear():
    with pytest.raises(ValueError, match="disk_gib must be > 0 when disk_dir is set"):
        BlockStore(FP, cpu_gib=1, disk_dir="/tmp/x")
    with pytest.raises(ValueError, match="block_size must be a positive int"):
        KVFingerprint("m", "l", "bfloat16", 0)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="pin_memory=True needs a CUDA device"):
            BlockStore(FP, cpu_gib=1, pin_memory=True)
    with BlockStore(FP, cpu_gib=0.001) as store:
        with pytest.raises(TypeError, match="block key must be non-empty bytes"):
            store.put("str-key", _block(0))
        store.put(b"a", _block(0))
        with pytest.raises(ValueError, match="must be contiguous"):
            store.get(b"a", out=torch.empty(64, 64, dtype=torch.bfloat16).t())
        assert store.get(b"a", out=torch.empty(3, dtype=torch.uint8)) is None  # wrong size: a miss


def test_stats_log_line_and_cli(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="longseq.kv_offload"):
        with BlockStore(FP, cpu_gib=0.001, disk_dir=str(tmp_path), disk_gib=0.01) as store:
            for i in range(3):
                store.put(_key(i), _block(i))
            store.get(_key(0))
            store.flush()
            store.stats()
    assert "dram: 1 hit/0 miss" in caplog.text and "GB/s" in caplog.text
    _flip(-3)(_files(tmp_path)[0])
    cli = [sys.executable, "-c", "from longseq.plugin.cli import main; raise SystemExit(main())"]
    res = subprocess.run(cli + ["kv", "stats", str(tmp_path), "--verify"], capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 1, res.stderr  # 1: corrupt files found
    assert "3 blocks" in res.stdout and "model=test-org/tiny dtype=bfloat16 block_size=16" in res.stdout
    assert "corrupt files: 1" in res.stdout and "payload checksum mismatch" in res.stdout
    from longseq.kv_offload.disk_stats import scan

    report = scan(str(tmp_path))  # headers only: the flipped payload byte is not seen without verify
    assert report["blocks"] == 3 and report["fingerprints"][0]["blocks"] == 3 and report["corrupt"] == []


def test_periodic_summary_is_logged_from_get_and_put(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="longseq.kv_offload"):
        with BlockStore(FP, cpu_gib=0.001, disk_dir=str(tmp_path), disk_gib=0.01, log_interval_s=1e-9) as store:
            store.put(_key(0), _block(0))
            assert store.get(_key(0)) is not None  # DRAM hit path
            assert store.get(_key(1)) is None  # DRAM miss + disk miss path
    assert caplog.text.count("kv store: dram:") >= 3  # put, two gets (+ close)


def test_dram_batch_copy_and_residency(tmp_path):
    with BlockStore(FP, cpu_gib=2 * BLOCK_BYTES / (1 << 30), disk_dir=str(tmp_path), disk_gib=0.01) as store:
        for i in range(3):
            store.put(_key(i), _block(i))
        store.flush()
        assert [store.in_dram(_key(i)) for i in range(3)] == [False, True, True]  # 0 was evicted (disk only)
        outs = torch.zeros((3, *BLOCK_SHAPE), dtype=torch.bfloat16)
        assert store.get_dram_batch([_key(i) for i in range(3)], list(outs)) == [False, True, True]
        assert torch.equal(outs[1], _block(1)) and torch.equal(outs[2], _block(2)) and not outs[0].any()
        s = store.stats(log_summary=False)
        assert (s.dram.hits, s.dram.misses, s.dram.bytes_read) == (2, 1, 2 * BLOCK_BYTES)
        store.put(_key(7), _block(7), write_to_disk=False)  # DRAM only
        store.flush()
        assert store.in_dram(_key(7)) and not os.path.exists(store._disk.path_for(_key(7)))


def test_read_dram_batch_hands_out_buffers_under_the_lock(tmp_path):
    """``read_dram_batch`` (the direct-read load path) gets the stored buffers themselves, None for a block not
    in DRAM, of another size, or (``pinned_only``) not pinned; the lock is held while it reads."""
    with BlockStore(FP, cpu_gib=2 * BLOCK_BYTES / (1 << 30), disk_dir=str(tmp_path), disk_gib=0.01) as store:
        for i in range(3):
            store.put(_key(i), _block(i))
        store.flush()
        seen = []

        def read(bufs):
            assert store._lock.locked()
            seen.append([None if b is None else b.view(torch.bfloat16).view(BLOCK_SHAPE).clone() for b in bufs])

        keys = [_key(i) for i in range(3)]
        assert store.read_dram_batch(keys, BLOCK_BYTES, read) == [False, True, True]  # 0 was evicted to disk
        assert seen[0][0] is None and torch.equal(seen[0][1], _block(1)) and torch.equal(seen[0][2], _block(2))
        assert store.read_dram_batch(keys, BLOCK_BYTES + 2, read) == [False] * 3
        assert store.read_dram_batch(keys, BLOCK_BYTES, read, pinned_only=True) == [False] * 3  # pageable tier
        s = store.stats(log_summary=False)
        assert (s.dram.hits, s.dram.misses) == (2, 7)


@pytest.mark.gpu
def test_pinned_dram_tier_with_cuda_tensors(tmp_path):
    """On the GPU machine: pinned DRAM buffers (the default with CUDA), puts from CUDA tensors, batched
    non-blocking copies back to the GPU, buffers recycled after eviction stay pinned."""
    assert torch.cuda.is_available(), "this test runs on the GPU machine"
    dev = torch.device("cuda")
    cap = 4 * BLOCK_BYTES / (1 << 30)
    # synchronous disk writes: an evicted buffer is never still queued, so the one slab is always enough
    with BlockStore(FP, cpu_gib=cap, disk_dir=str(tmp_path), disk_gib=0.01, async_disk_writes=False) as store:
        assert store.pin_memory
        blocks = [_block(i).to(dev) for i in range(8)]
        for i, b in enumerate(blocks):
            store.put(_key(i), b)
        assert all(buf.is_pinned() for buf in store._dram._blocks.values())
        assert store._dram.allocator.pinned_bytes == 4 * BLOCK_BYTES  # one exact slab, pieces recycled
        stage = torch.zeros((4, *BLOCK_SHAPE), dtype=torch.bfloat16, device=dev)
        keys = [_key(i) for i in range(4, 8)]
        assert store.get_dram_batch(keys, list(stage), synchronize=torch.cuda.current_stream().synchronize) == \
            [True] * 4
        assert all(torch.equal(stage[j], blocks[4 + j]) for j in range(4))
        store.flush()
        host = torch.empty(BLOCK_SHAPE, dtype=torch.bfloat16, pin_memory=True)
        assert torch.equal(store.get(_key(0), out=host).to(dev), blocks[0])  # evicted: from disk


def test_slab_allocator_exact_pieces_and_reuse():
    """Pinned mode carves exact-size pieces from power-of-two slabs (torch's pinned allocator would round each
    block up to a power of two). The carving runs the same with pageable memory, so it is tested on CPU."""
    from longseq.kv_offload.dram import HostBufferAllocator

    alloc = HostBufferAllocator(pin_memory=False, max_free_bytes=0, use_slabs=True, slab_bytes=8192)
    pieces = [alloc.alloc(3000) for _ in range(4)]  # 2 pieces per 8 KiB slab
    assert alloc.pinned_bytes == 2 * 8192 and all(p.numel() == 3000 for p in pieces)
    for i, p in enumerate(pieces):
        p.fill_(i)
    assert [int(p[0]) for p in pieces] == [0, 1, 2, 3] and [int(p[-1]) for p in pieces] == [0, 1, 2, 3]
    alloc.release(pieces[3])
    again = alloc.alloc(3000)
    assert again.data_ptr() == pieces[3].data_ptr() and alloc.pinned_bytes == 2 * 8192  # reused, no new slab
    big = alloc.alloc(10000)  # larger than a slab: its own power-of-two slab
    assert big.numel() == 10000 and alloc.pinned_bytes == 2 * 8192 + 16384


def test_reserve_carves_the_whole_tier_up_front_and_puts_allocate_nothing_more():
    """``reserve_dram`` (the vLLM worker calls it at start-up on CUDA) allocates every piece the tier can hold,
    in few large slabs and never beyond the tier; later puts and evictions then reuse those pieces. Pageable
    slabs behave the same as pinned ones, so this runs on CPU."""
    from longseq.kv_offload.dram import HostBufferAllocator

    n_fit = 11  # not a power of two: the last slabs are smaller
    with BlockStore(FP, cpu_gib=n_fit * BLOCK_BYTES / (1 << 30)) as store:
        alloc = store._dram.allocator = HostBufferAllocator(False, 0, use_slabs=True, slab_bytes=2 * BLOCK_BYTES)
        sizes = []
        real_add = alloc.add_slab
        alloc.add_slab = lambda slab, n: (sizes.append(slab.numel()), real_add(slab, n))[1]
        added = store.reserve_dram(BLOCK_BYTES)
        assert added == sum(sizes) == alloc.pinned_bytes
        assert sorted(sizes, reverse=True) == [8 * BLOCK_BYTES, 2 * BLOCK_BYTES, BLOCK_BYTES]  # 11 = 8 + 2 + 1
        assert added == n_fit * BLOCK_BYTES  # BLOCK_BYTES is a power of two: nothing beyond the tier
        assert store.reserve_dram(BLOCK_BYTES) == 0  # already reserved
        for i in range(3 * n_fit):  # fill, evict, refill: no new slab
            store.put(_key(i), _block(i))
        assert alloc.pinned_bytes == added and len(sizes) == 3
        assert all(torch.equal(store.get(_key(i)), _bytes(_block(i))) for i in range(2 * n_fit, 3 * n_fit))
        store.drop_dram_blocks()  # emptied, as after a restart: the pieces stay for the next puts
        assert len(store._dram) == 0 and store.get(_key(3 * n_fit - 1)) is None
        for i in range(3 * n_fit, 4 * n_fit):
            store.put(_key(i), _block(i))
        assert alloc.pinned_bytes == added and len(sizes) == 3
        assert all(torch.equal(store.get(_key(i)), _bytes(_block(i))) for i in range(3 * n_fit, 4 * n_fit))
    with BlockStore(FP, cpu_gib=n_fit * BLOCK_BYTES / (1 << 30)) as store:  # default pageable tier: nothing to do
        assert store.reserve_dram(BLOCK_BYTES) == 0


def test_buffers_evicted_while_queued_for_disk_are_recycled(tmp_path, monkeypatch):
    """A block evicted from DRAM before the writer wrote it keeps its buffer until written; then the buffer
    goes back to the allocator (with pinned slabs, a lost piece would be pinned memory leaked for good)."""
    from longseq.kv_offload.dram import HostBufferAllocator

    with BlockStore(FP, cpu_gib=2 * BLOCK_BYTES / (1 << 30), disk_dir=str(tmp_path), disk_gib=0.1) as store:
        store._dram.allocator = HostBufferAllocator(False, 0, use_slabs=True, slab_bytes=4 * BLOCK_BYTES)
        real_write = disk.write_atomic
        gate = __import__("threading").Event()
        monkeypatch.setattr(disk, "write_atomic", lambda *a, **k: (gate.wait(10), real_write(*a, **k)))
        for i in range(12):  # all 12 queued (writer blocked), 10 of them evicted from DRAM meanwhile
            store.put(_key(i), _block(i))
        held = store._dram.allocator.pinned_bytes
        assert held == 3 * 4 * BLOCK_BYTES  # 12 live buffers: 2 in DRAM + 10 only in the write queue
        gate.set()
        store.flush()
        for i in range(12, 24):  # the 10 recycled pieces serve the next blocks: no new slab
            store.put(_key(i), _block(i))
        store.flush()
        assert store._dram.allocator.pinned_bytes == held
        assert all(torch.equal(store.get(_key(i)), _bytes(_block(i))) for i in range(24))


def _watch_slab_allocations(store) -> tuple[object, list[bool]]:
    """Give ``store`` a slab allocator (4 blocks per slab) that records whether the lock is held at each new slab."""
    from longseq.kv_offload.dram import HostBufferAllocator

    alloc = store._dram.allocator = HostBufferAllocator(False, 0, use_slabs=True, slab_bytes=4 * BLOCK_BYTES)
    lock_held: list[bool] = []
    real_new_slab = alloc.new_slab
    alloc.new_slab = lambda n: (lock_held.append(store._lock.locked()), real_new_slab(n))[1]
    return alloc, lock_held


def test_new_pinned_slabs_are_allocated_outside_the_store_lock(tmp_path):
    """A slab allocation (cudaHostAlloc, ~10-20 ms per 64 MiB on the GPU machine) must not hold the lock that
    the engine thread's lookups take; the slab count stays that of the in-lock allocator (one per 4 blocks)."""
    cap = 8 * BLOCK_BYTES / (1 << 30)
    with BlockStore(FP, cpu_gib=cap, disk_dir=str(tmp_path), disk_gib=0.1) as store:
        alloc, lock_held = _watch_slab_allocations(store)
        for i in range(8):
            store.put(_key(i), _block(i))
        assert lock_held == [False, False]  # two slabs of 4 pieces for 8 blocks, both outside the lock
        assert alloc.pinned_bytes == 2 * 4 * BLOCK_BYTES
        store.flush()
    with BlockStore(FP, cpu_gib=cap, disk_dir=str(tmp_path), disk_gib=0.1) as store:  # disk hits, promoted
        alloc, lock_held = _watch_slab_allocations(store)
        assert all(torch.equal(store.get(_key(i)), _bytes(_block(i))) for i in range(8))
        assert lock_held == [False, False] and store.stats(log_summary=False).disk.hits == 8


def test_copy_bytes_host_to_host_is_exact_and_other_cases_fall_back_to_torch():
    """``copy_bytes`` (the store's copy on background threads: numpy, no OpenMP team) gives exactly torch's
    result host to host, and leaves other dtypes/shapes to ``copy_`` (which still checks them)."""
    from longseq.kv_offload.dram import copy_bytes

    src = torch.randint(0, 256, (4099,), dtype=torch.uint8)
    dst = torch.zeros(4099, dtype=torch.uint8)
    assert copy_bytes(dst, src) is dst and torch.equal(dst, src)
    half = torch.randn(33, dtype=torch.bfloat16)  # numpy has no bfloat16: torch copies it
    out = torch.zeros(33, dtype=torch.bfloat16)
    assert torch.equal(copy_bytes(out, half), half)
    with pytest.raises(RuntimeError):  # a size mismatch is an error, never a partial copy
        copy_bytes(torch.zeros(3, dtype=torch.uint8), torch.zeros(4, 2, dtype=torch.uint8))
