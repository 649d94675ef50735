"""The disk tier's name index (``longseq.kv_offload.disk_index``): a lookup of a block that is not on disk touches
no file once the start-up scan is done; blocks written by another server show up at the next rescan; a file that
vanished (another server evicted it) is a miss and leaves the index. On CPU, no framework."""

from __future__ import annotations

import os
import time

import pytest
import torch

from longseq.kv_offload import disk
from longseq.kv_offload.disk_index import DiskNameIndex
from longseq.kv_offload.stats import StatsRecorder
from longseq.kv_offload.store import BlockStore, KVFingerprint

FP = KVFingerprint("test-org/tiny", "test:layers=2:shape=[2,16,2,32]", "bfloat16", 16)


def _block(i: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(500 + i)
    return torch.randint(0, 256, (4096,), dtype=torch.uint8, generator=g)


def _key(i: int) -> bytes:
    return b"idx-chain-%06d" % i


def _wait(pred, timeout: float = 10.0) -> None:
    t_end = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < t_end, "timed out"
        time.sleep(0.01)


def _tier(root: str, rescan_seconds: float = 60.0) -> disk.DiskTier:
    tier = disk.DiskTier(root, FP, 1 << 30, StatsRecorder(), rescan_seconds=rescan_seconds)
    _wait(lambda: tier._index.ready)  # the start-up scan runs in the background
    return tier


@pytest.fixture
def opened(monkeypatch):
    """Paths the disk module opens (its ``open`` calls), recorded."""
    paths: list[str] = []
    real_open = open

    def counting_open(path, *a, **kw):
        paths.append(str(path))
        return real_open(path, *a, **kw)
    monkeypatch.setattr(disk, "open", counting_open, raising=False)
    return paths


def test_index_unknown_until_first_scan_then_exact_and_changes_during_a_scan_win():
    idx = DiskNameIndex()
    assert not idx.ready and idx.might_hold("anything")  # unknown: the caller must look at the disk
    assert idx.begin_scan() and not idx.begin_scan()  # one scan at a time
    idx.add("written-during-scan")
    idx.discard("deleted-during-scan")
    idx.end_scan({"a", "deleted-during-scan"})  # the walk saw the deleted file and missed the new one
    assert idx.ready and len(idx) == 2
    assert idx.might_hold("a") and idx.might_hold("written-during-scan")
    assert not idx.might_hold("deleted-during-scan") and not idx.might_hold("b")
    assert idx.begin_scan()
    idx.end_scan(None)  # a failed scan keeps what was known
    assert idx.might_hold("a") and len(idx) == 2


def test_miss_opens_no_file_and_hits_still_read(tmp_path, opened):
    writer = _tier(str(tmp_path))
    for i in range(3):
        assert writer.write(_key(i), _block(i))
    reader = _tier(str(tmp_path))  # a new "server": its start-up scan finds the three files
    opened.clear()
    for i in range(3, 40):
        assert not reader.probe(_key(i))
        assert reader.read(_key(i), lambda n: torch.empty(n, dtype=torch.uint8)) is None
    assert opened == []  # 74 lookups of absent blocks, no file opened
    for i in range(3):
        assert reader.probe(_key(i))
        got = reader.read(_key(i), lambda n: torch.empty(n, dtype=torch.uint8))
        assert torch.equal(got, _block(i))
    assert len(opened) == 6


def test_block_from_another_server_is_found_at_the_next_rescan(tmp_path):
    ours = _tier(str(tmp_path), rescan_seconds=0.2)
    other = _tier(str(tmp_path))
    assert other.write(_key(7), _block(7))
    assert not ours.probe(_key(7))  # not in our index yet (the scan is recent)
    time.sleep(0.3)
    ours.probe(_key(7))  # the index is stale now: this lookup starts a background rescan
    _wait(lambda: ours.probe(_key(7)))
    got = ours.read(_key(7), lambda n: torch.empty(n, dtype=torch.uint8))
    assert torch.equal(got, _block(7))


def test_file_evicted_by_another_server_is_a_miss_and_leaves_the_index(tmp_path, opened):
    ours = _tier(str(tmp_path))
    assert ours.write(_key(1), _block(1))
    os.unlink(ours.path_for(_key(1)))  # another server's eviction
    opened.clear()
    assert ours.read(_key(1), lambda n: torch.empty(n, dtype=torch.uint8)) is None
    assert len(opened) == 1  # one failed open; the name is dropped
    assert not ours.probe(_key(1)) and len(opened) == 1


def test_our_own_evictions_and_corrupt_deletions_leave_the_index(tmp_path):
    block = _block(0).numel() + 200
    tier = disk.DiskTier(str(tmp_path), FP, 10 * block, StatsRecorder())
    _wait(lambda: tier._index.ready)
    for i in range(30):
        assert tier.write(_key(i), _block(i))
    kept = [i for i in range(30) if os.path.exists(tier.path_for(_key(i)))]
    assert 0 < len(kept) < 30
    assert len(tier._index) == len(kept)  # the cap check's evictions were taken out of the index
    path = tier.path_for(_key(kept[0]))
    with open(path, "r+b") as f:  # flip a payload byte
        f.seek(-3, 2)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0xFF]))
    assert tier.read(_key(kept[0]), lambda n: torch.empty(n, dtype=torch.uint8)) is None
    assert not os.path.exists(path) and len(tier._index) == len(kept) - 1


def test_store_lookups_of_a_fresh_prompt_touch_no_file(tmp_path, opened):
    """The scheduler's lookup of a new prompt (``count_prefix_hits``) and the DRAM-only save check: with the disk
    tier on, neither opens a file when the blocks are not there."""
    with BlockStore(FP, cpu_gib=0.01, disk_dir=str(tmp_path), disk_gib=0.1) as st:
        _wait(lambda: st._disk._index.ready)
        st.put(_key(0), _block(0))
        st.flush()
        opened.clear()
        assert st.count_prefix_hits([_key(0)] + [_key(i) for i in range(100, 164)]) == 1
        assert not st.contains(_key(200)) and st.get(_key(201)) is None
        assert opened == []
