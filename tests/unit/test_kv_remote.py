"""The remote KV tier (``longseq.kv_offload.remote``) on a real Mooncake Store, CPU and loopback only.

Every test that needs a master starts its own ``mooncake_master`` on a free 127.0.0.1 port and kills it at the end;
every wait is bounded. Two stores with separate, empty DRAM and disk tiers share blocks only through the remote
store. The Mooncake client and master come from ``longseq[remote]`` (``scripts/setup.sh`` installs them): without
them these tests fail, they do not skip.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from pathlib import Path

import pytest
import torch
from kv_fixtures import key_file, raw_mooncake_client

from longseq.config import LongSeqConfigError
from longseq.kv_offload.block_format import encode_header, encode_record
from longseq.kv_offload.mooncake_local import LocalMaster as Master
from longseq.kv_offload.mooncake_local import free_port as _free_port
from longseq.kv_offload.remote import remote_name
from longseq.kv_offload.remote_guard import CircuitBreaker
from longseq.kv_offload.server_stats import describe
from longseq.kv_offload.settings import KVConfigError
from longseq.kv_offload.store import BlockStore, KVFingerprint

FP = KVFingerprint("test-org/tiny", "test:layers=2:shape=[2,16,2,32]", "bfloat16", 16)
BLOCK_BYTES = 8192
MIB = 1 / 1024  # in GiB units
TIMEOUT_S = 0.5  # remote.timeout_s of the stores here


@pytest.fixture
def master(tmp_path):
    m = Master(tmp_path)
    m.start()
    yield m
    m.stop()


@pytest.fixture
def raw_client(master):
    """A plain Mooncake client on the same master: what anyone who can reach the master can write. It adds no
    memory to the pool (what it puts lands in the stores' segments)."""
    client = raw_mooncake_client(master)
    yield client
    client.close()


def _remote(master: Master, **overrides) -> dict:
    return {"kind": "mooncake", "master": master.address, "segment_gib": 16 * MIB, "buffer_gib": 4 * MIB,
            "timeout_s": TIMEOUT_S, **overrides}


def _store(tmp_path, name: str, master: Master | None, fp: KVFingerprint = FP, remote: dict | None = None,
           **kw) -> BlockStore:
    """A store with its own empty DRAM and disk tiers, and the master's remote tier."""
    return BlockStore(fp, cpu_gib=1 * MIB, disk_dir=str(tmp_path / name), disk_gib=0.01, block_nbytes=BLOCK_BYTES,
                      remote=remote if remote is not None else _remote(master), **kw)


@contextlib.contextmanager
def _closing(*stores: BlockStore):
    """Close ``stores`` at the end, all at once: a Mooncake client takes a second or two to leave the pool."""
    try:
        yield stores
    finally:
        threads = [threading.Thread(target=store.close) for store in stores]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)


def _block(i: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(5000 + i)
    return torch.randint(0, 256, (BLOCK_BYTES,), dtype=torch.uint8, generator=g)


def _key(i: int) -> bytes:
    return b"chain-%06d" % i


def _record(fp: KVFingerprint, key: bytes, payload: torch.Tensor, auth=None) -> bytes:
    return b"".join(bytes(c) for c in encode_record(fp.digest(), key, memoryview(payload.numpy()), auth))


def _disk_files(store_dir: Path) -> list[Path]:
    return [p for p in (store_dir / "blocks").rglob("*") if p.is_file()]


def test_a_block_put_by_one_store_is_read_by_another_through_the_remote_tier(tmp_path, master):
    with _closing(_store(tmp_path, "a", master), _store(tmp_path, "b", master)) as (a, b):
        for i in range(3):
            a.put(_key(i), _block(i))
        a.put(_key(50), _block(50), write_to_disk=False)  # DRAM only: none of the shared tiers
        a.flush(10)
        assert a.stats().remote.blocks_written == 3 and a.stats().remote_up is True
        assert b.contains(_key(1)) and not b.contains(_key(9)) and not b.contains(_key(50))
        assert b.count_prefix_hits([_key(0), _key(1), _key(2), _key(9), _key(0)]) == 3
        assert not _disk_files(tmp_path / "b") and not b.in_dram(_key(0))  # B's own tiers are empty
        assert torch.equal(b.get(_key(0)), _block(0))
        out = torch.empty(BLOCK_BYTES // 2, dtype=torch.bfloat16)  # any dtype: the bytes land in it
        assert b.get(_key(1), out=out) is out and torch.equal(out.view(torch.uint8), _block(1))
        assert b.in_dram(_key(0)) and b.in_dram(_key(1))  # promoted like a disk hit
        assert b.fetch_prefix_to_dram([_key(0), _key(1), _key(2), _key(9)]) == 3
        assert torch.equal(b.get(_key(2)), _block(2))
        s = b.stats()
        assert (s.remote.hits, s.remote_failed_checks, s.remote_errors) == (3, 0, 0)
        assert s.dram.hits == 1 and s.remote_lookups >= 3
        assert "remote up" in s.summary() and s.remote_counters()["hits"] == 3
        printed = describe({"pid": 1, "store": {"dram_hits": s.dram.hits, "remote": s.remote_counters()}})
        assert printed[-1].startswith("  remote: up, 0 blocks put, 0 puts dropped") and "3 hits" in printed[-1]
        assert not _disk_files(tmp_path / "b")  # remote hits are not copied to B's disk


def test_keyed_stores_share_tagged_blocks_and_refuse_untagged_ones(tmp_path, master):
    key_path = key_file(tmp_path / "kv.key")
    with _closing(_store(tmp_path, "a", master, auth_key_file=key_path),
                  _store(tmp_path, "b", master, auth_key_file=key_path), _store(tmp_path, "plain", master)) as stores:
        a, b, plain = stores
        a.put(_key(0), _block(0))
        plain.put(_key(1), _block(1))  # no tag: a keyed reader must refuse it
        a.flush(10)
        plain.flush(10)
        assert torch.equal(b.get(_key(0)), _block(0))
        assert torch.equal(plain.get(_key(0)), _block(0))  # a keyless reader checks the CRC of tagged records
        assert b.get(_key(1)) is None
        assert b.stats().remote_failed_checks == 1


def test_hostile_remote_records_are_counted_misses_and_removed(tmp_path, master, raw_client):
    good = _record(FP, _key(0), _block(0))
    flipped = bytearray(good)
    flipped[-100] ^= 0xFF
    header_crc_broken = bytearray(good)
    header_crc_broken[30] ^= 0x01
    hostile = {
        "garbage of the right size": os.urandom(len(good)),
        "flipped payload byte": bytes(flipped),
        "flipped header byte": bytes(header_crc_broken),
        "truncated": good[:-1],
        "a valid header claiming 1 TiB": encode_header(FP.digest(), _key(0), 1 << 40, 0) + good[-BLOCK_BYTES:],
        "another key's record": _record(FP, _key(7), _block(7)),
        "a payload of another size": _record(FP, _key(0), torch.zeros(BLOCK_BYTES - 8, dtype=torch.uint8)),
        "larger than the transfer buffer": b"\0" * (5 << 20),
        "one byte": b"\0",
    }
    name = remote_name(FP.digest(), _key(0))
    with _store(tmp_path, "b", master) as b:
        for n, (what, record) in enumerate(hostile.items(), start=1):
            assert raw_client.put(name, record) == 0, what
            assert b.count_prefix_hits([_key(0)]) == 1, what  # present; its record is checked when read
            assert b.get(_key(0)) is None, what
            b.flush(10)  # the writer removes the bad object, so that a good put can replace it
            s = b.stats()
            assert (s.remote_failed_checks, s.remote.hits, s.lookup_errors) == (n, 0, 0), what
            assert raw_client.is_exist(name) == 0, what
            assert b.fetch_prefix_to_dram([_key(0)]) == 0, what
        with _store(tmp_path, "a", master) as a:
            a.put(_key(0), _block(0))
            a.flush(10)
            assert torch.equal(b.get(_key(0)), _block(0))
        assert b.stats().remote_errors == 0


def test_another_fingerprints_blocks_never_match(tmp_path, master, raw_client):
    other = KVFingerprint(FP.model, FP.layout, "float16", 16)
    with _closing(_store(tmp_path, "a", master), _store(tmp_path, "c", master, fp=other)) as (a, c):
        a.put(_key(0), _block(0))
        a.flush(10)
        assert not c.contains(_key(0)) and c.get(_key(0)) is None  # another name: a plain miss
        record = raw_client.get(remote_name(FP.digest(), _key(0)))
        assert len(record) > BLOCK_BYTES
        assert raw_client.put(remote_name(other.digest(), _key(0)), record) == 0  # A's record under C's name
        assert c.get(_key(0)) is None
        assert c.stats().remote_failed_checks == 1


def test_a_dead_master_costs_bounded_misses_and_the_tier_comes_back(tmp_path, master):
    with _closing(_store(tmp_path, "a", master), _store(tmp_path, "b", master)) as (a, b):
        a.put(_key(0), _block(0))
        a.flush(10)
        assert torch.equal(b.get(_key(0)), _block(0))
        b.put(_key(100), _block(100))  # B's own block: local tiers must keep it through the outage
        b.flush(10)
        master.stop()
        t0 = time.monotonic()
        slowest = 0.0
        for i in range(1, 21):
            t = time.monotonic()
            assert b.count_prefix_hits([_key(i), _key(i + 1)]) == 0
            assert b.get(_key(i)) is None and not b.contains(_key(i))
            a.put(_key(1000 + i), _block(i))  # never blocks, never raises
            slowest = max(slowest, time.monotonic() - t)
        took = time.monotonic() - t0
        # One call waits at most timeout_s; after the first failure the tier is skipped until its retry.
        assert slowest < 3 * TIMEOUT_S + 0.5 and took < 8 * TIMEOUT_S + 2, (slowest, took)
        assert torch.equal(b.get(_key(100)), _block(100))  # local tiers lose nothing
        s = b.stats()
        assert s.remote_up is False and s.remote_errors >= 1 and s.remote.hits == 1 and s.lookup_errors == 0
        assert "remote DOWN" in s.summary()

        master.start()  # same port, empty index: blocks written before the restart are gone
        deadline, i, got = time.monotonic() + 40, 2000, None
        while got is None and time.monotonic() < deadline:
            i += 1
            a.put(_key(i), _block(i))
            a.flush(5)
            got = b.get(_key(i))
            if got is None:
                time.sleep(0.3)
        assert got is not None, f"the remote tier did not come back within 40 s: {a.stats().summary()}"
        assert torch.equal(got, _block(i))
        assert a.stats().remote_up and b.stats().remote_up


def test_puts_never_wait_for_the_remote_writer(tmp_path, master):
    """Each remote write made to take 0.2 s: 200 puts in series would take 40 s; queued and dropped, they take
    what the local copies take (the bound leaves room for a loaded 2-core machine)."""
    with _store(tmp_path, "a", master, remote=_remote(master, queue_blocks=1, timeout_s=1.0)) as a:
        client = a._remote.client
        slow_put = client.put

        def put_slowly(*args, **kwargs):
            time.sleep(0.2)
            return slow_put(*args, **kwargs)

        client.put = put_slowly
        t0 = time.monotonic()
        for i in range(200):
            a.put(_key(i), _block(i % 4))
        took = time.monotonic() - t0
        a.flush(10)
        s = a.stats()
        assert s.remote.blocks_written + s.remote_put_dropped == 200 and s.remote.blocks_written >= 1
        assert s.remote_put_dropped > 0  # the queue of one block was full: dropped, not waited for
        assert took < 20, took  # not 200 x 0.2 s
        assert all(a.get(_key(i)) is not None for i in range(190, 200))  # DRAM kept what the remote dropped


@pytest.mark.parametrize("remote, match", [
    ({"kind": "redis", "master": "127.0.0.1:1"}, r"remote\.kind must be one of \['mooncake'\], got 'redis'"),
    ({"kind": "mooncake", "master": "localhost"}, r"remote\.master must be \"HOST:PORT\""),
    ({"kind": "mooncake", "master": "10.0.0.1:99999"}, r"remote\.master must be \"HOST:PORT\""),
    ({"kind": "mooncake"}, r"remote\.master must be \"HOST:PORT\".*got None"),
    ({"kind": "mooncake", "master": "h:1", "segment_gb": 1}, r"unknown remote key\(s\) \['segment_gb'\]"),
    ({"kind": "mooncake", "master": "h:1", "timeout_s": float("nan")}, r"remote\.timeout_s must be"),
    ({"kind": "mooncake", "master": "h:1", "queue_blocks": 0}, r"remote\.queue_blocks must be"),
    ({"kind": "mooncake", "master": "h:1", "buffer_gib": 1e-6}, r"remote\.buffer_gib=1e-06 is smaller than one"),
    ({"kind": "mooncake", "master": "h:1", "protocol": "udp"}, r"remote\.protocol must be one of"),
    ("mooncake://h:1", r"remote must be an object"),
])
def test_config_errors_name_the_key(tmp_path, remote, match):
    with pytest.raises(LongSeqConfigError, match=match):
        BlockStore(FP, cpu_gib=1 * MIB, block_nbytes=BLOCK_BYTES, remote=remote)


def test_an_unreachable_master_stops_start_up_unless_the_tier_is_optional(tmp_path, caplog):
    dead = f"127.0.0.1:{_free_port()}"  # nothing listens there
    remote = {"kind": "mooncake", "master": dead, "segment_gib": 16 * MIB, "buffer_gib": 4 * MIB}
    t0 = time.monotonic()
    with pytest.raises(KVConfigError, match=rf"remote\.master='{dead}' is not reachable.*remote_optional: true"):
        _store(tmp_path, "a", None, remote=remote)
    with pytest.raises(KVConfigError, match=r"remote_optional must be true or false"):
        _store(tmp_path, "a", None, remote=remote, remote_optional="yes")
    with caplog.at_level(logging.WARNING, logger="longseq.kv_offload"):
        with _store(tmp_path, "a", None, remote=remote, remote_optional=True) as store:
            store.put(_key(0), _block(0))
            assert torch.equal(store.get(_key(0)), _block(0))
            s = store.stats()
            assert s.remote is None and s.remote_up is None and "remote" not in s.summary()
            assert s.remote_counters() == {} and describe({"store": {}})[-1] == "  remote: off"
    assert time.monotonic() - t0 < 15
    assert any("is not reachable" in r.getMessage() and "serving without the remote tier" in r.getMessage()
               for r in caplog.records)


def test_the_circuit_breaker_backs_off_doubling_and_retries_once_at_a_time():
    now = [0.0]
    breaker = CircuitBreaker(min_s=1.0, max_s=30.0, trial_s=0.5, clock=lambda: now[0])
    assert breaker.allow() and breaker.up
    assert breaker.failed() == (True, 1.0)
    assert breaker.failed() == (False, 1.0)  # a straggler from before the trip: no extra backoff
    assert not breaker.allow() and breaker.skipping()
    waits = []
    for _ in range(7):
        now[0] += waits[-1] if waits else 1.0
        assert breaker.allow() and not breaker.allow()  # one trial; the others keep skipping
        waits.append(breaker.failed()[1])
    assert waits == [2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]
    now[0] += 30.0
    assert breaker.allow() and breaker.succeeded() and breaker.up and breaker.allow()
    assert breaker.failed() == (True, 1.0)  # back to the shortest backoff


def test_a_scheduler_without_the_stores_counts_blocks_every_rank_holds_on_disk_or_remotely(tmp_path, master,
                                                                                          raw_client):
    """Tensor parallelism: the scheduler (another process) asks the master whether each rank's record exists
    (``RemoteProbe``), and a rank may hold one block on disk and the next only remotely. A dead master leaves the
    disk hits, within the time bound."""
    import dataclasses

    from kv_fixtures import block_path
    from longseq.kv_offload.remote_probe import RemoteProbe
    from longseq.kv_offload.settings import remote_setting
    from longseq.kv_offload.vllm_hits import KeyIndexHits, RankInfo

    fps = [dataclasses.replace(FP, layout=f"{FP.layout}:tp={r}/2") for r in range(2)]
    disk = tmp_path / "tp"  # one directory, one fingerprint per rank, as the ranks' stores share it
    keys = [_key(i) for i in range(6)]
    with _closing(*(BlockStore(fp, cpu_gib=1 * MIB, disk_dir=str(disk), disk_gib=0.01, block_nbytes=BLOCK_BYTES,
                               remote=_remote(master)) for fp in fps)) as ranks:
        for store in ranks:
            for i, k in enumerate(keys[:5]):
                store.put(k, _block(i))
            store.flush(10)
        gone = [(0, 2, "disk"), (1, 3, "remote"), (0, 4, "disk"), (0, 4, "remote")]
        for rank, i, where in gone:
            if where == "disk":
                os.unlink(block_path(str(disk), fps[rank], keys[i]))
            else:
                assert raw_client.remove(remote_name(fps[rank].digest(), keys[i]), True) == 0
        # the records live in the ranks' segments: the stores stay open while the scheduler asks
        infos = [RankInfo(r, fps[r].to_json(), 0, BLOCK_BYTES) for r in range(2)]
        probe = RemoteProbe.open(remote_setting("test", "remote", _remote(master)), False, "test")
        assert KeyIndexHits(infos, remote=probe).count(keys) == 3  # remote only: rank 1 lacks block 3
        hits = KeyIndexHits(infos, str(disk), 0.01, remote=probe)
        # blocks 0-1 on both disks; 2: rank 0 remote, rank 1 disk; 3: rank 0 both, rank 1 disk; 4: rank 0 none
        assert hits.count(keys) == 4
        assert probe.counters() == {"up": True, "lookups": 2 * 6 + 2 * 4, "errors": 0}
        master.stop()
        t0 = time.monotonic()
        assert [hits.count(keys) for _ in range(10)] == [2] * 10  # the disk hits remain
        assert time.monotonic() - t0 < 3 * TIMEOUT_S + 2
        assert probe.counters()["up"] is False and probe.counters()["errors"] >= 1
        hits.close()


def test_the_scheduler_probe_refuses_a_dead_master_at_start_up_unless_the_tier_is_optional():
    from longseq.kv_offload.remote_probe import RemoteProbe
    from longseq.kv_offload.settings import remote_setting

    settings = remote_setting("LongSeqOffloadConnector", "remote",
                              {"kind": "mooncake", "master": f"127.0.0.1:{_free_port()}"})
    with pytest.raises(KVConfigError, match=r"LongSeqOffloadConnector: remote\.master='127\.0\.0\.1:\d+' is not"):
        RemoteProbe.open(settings, False, "LongSeqOffloadConnector")
    assert RemoteProbe.open(settings, True, "LongSeqOffloadConnector") is None
    assert RemoteProbe.open(None, False, "LongSeqOffloadConnector") is None


def test_a_long_prompts_blocks_all_reach_the_remote_store_through_a_queue_of_keys(tmp_path, master):
    """500 blocks put at once (a long prompt's save) through a DRAM tier of 128: only keys wait, and the writer
    copies each block from DRAM, or from disk once DRAM evicted it; every block arrives exactly."""
    with _closing(_store(tmp_path, "a", master), _store(tmp_path, "b", master)) as (a, b):
        for i in range(500):
            a.put(_key(i), _block(i))
        a.flush(60)
        s = a.stats()
        assert (s.remote.blocks_written, s.remote_put_dropped) == (500, 0), s.summary()
        assert all(torch.equal(b.get(_key(i)), _block(i)) for i in range(0, 500, 7))


def test_a_block_no_local_tier_holds_any_more_is_dropped_never_garbage(tmp_path, master):
    """DRAM only, 4 blocks, a writer slowed to 0.1 s a block: most blocks are evicted before their turn and are
    dropped (counted); every block that was written holds its own bytes."""
    four_blocks = 4 * BLOCK_BYTES / (1 << 30)
    with BlockStore(FP, cpu_gib=four_blocks, block_nbytes=BLOCK_BYTES, remote=_remote(master, timeout_s=1.0)) as a:
        put = a._remote.client.put

        def put_slowly(*args, **kwargs):
            time.sleep(0.1)
            return put(*args, **kwargs)

        a._remote.client.put = put_slowly
        for i in range(40):
            a.put(_key(i), _block(i))
        a.flush(30)
        s = a.stats()
        assert s.remote.blocks_written + s.remote_put_dropped == 40 and s.remote_put_dropped > 0, s.summary()
        with _store(tmp_path, "b", master) as b:
            written = [i for i in range(40) if b.contains(_key(i))]
            assert len(written) == s.remote.blocks_written
            assert all(torch.equal(b.get(_key(i)), _block(i)) for i in written)


def test_a_store_without_local_tiers_writes_private_copies(tmp_path, master):
    with _closing(BlockStore(FP, cpu_gib=0, block_nbytes=BLOCK_BYTES, remote=_remote(master)),
                  _store(tmp_path, "b", master)) as (a, b):
        for i in range(5):
            a.put(_key(i), _block(i))
        a.flush(10)
        assert a.stats().remote.blocks_written == 5
        assert all(torch.equal(b.get(_key(i)), _block(i)) for i in range(5))
