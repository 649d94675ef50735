"""The KV offload disk tier against hostile or broken cache directories (issue 17).

Invariant in every case: a lookup returns a miss or exactly the bytes that were put, never raises and never hangs;
nothing outside ``disk_dir`` is read, written, touched or deleted; the fault is counted in the store's stats.
"""

from __future__ import annotations

import json
import os
import random
import zlib

import pytest
import torch

from longseq.kv_offload import disk, disk_stats
from longseq.kv_offload.settings import KVConfigError
from longseq.kv_offload.store import BlockStore, KVFingerprint

FP = KVFingerprint("test-org/tiny", "test:hostile", "bfloat16", 16)
BLOCK_BYTES = 4096
TIB = 1 << 40


def _block(i: int) -> torch.Tensor:
    return torch.randint(0, 256, (BLOCK_BYTES,), dtype=torch.uint8, generator=torch.Generator().manual_seed(i))


def _key(i: int) -> bytes:
    return b"hostile-%04d" % i


def _store(tmp_path, block_nbytes=BLOCK_BYTES, **kw) -> BlockStore:
    kw = {"cpu_gib": 0, "disk_gib": 0.01, "async_disk_writes": False, "log_interval_s": 0} | kw
    return BlockStore(FP, disk_dir=str(tmp_path / "kv"), block_nbytes=block_nbytes, **kw)


def _assert_every_lookup_misses(store: BlockStore, key: bytes) -> None:
    """Each lookup entry point answers 'miss' (and returns at all: a FIFO would hang an ordinary open)."""
    assert store.contains(key) is False
    assert store.count_prefix_hits([key]) == 0
    assert store.fetch_prefix_to_dram([key, _key(999)]) == 0
    assert store.get(key) is None
    assert store.get(key, out=torch.empty(BLOCK_BYTES, dtype=torch.uint8)) is None


def _write_raw_block(path: str, key: bytes, payload: bytes, claimed_nbytes: int | None = None) -> None:
    """A block file with valid header and payload checksums; ``claimed_nbytes`` overrides the header's size."""
    nbytes = len(payload) if claimed_nbytes is None else claimed_nbytes
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(disk.encode_header(FP.digest(), key, nbytes, zlib.crc32(payload)))
        f.write(payload)


@pytest.mark.parametrize("block_nbytes", [BLOCK_BYTES, None], ids=["known_block_size", "unknown_block_size"])
def test_lying_header_sparse_1tib_claim_is_a_miss_without_allocating(tmp_path, block_nbytes):
    """The header claims a 1 TiB payload and the (sparse) file really is that long: rejected before any
    allocation (by the block size, or by the disk cap when the size is unknown), deleted, counted."""
    with _store(tmp_path, block_nbytes) as store:
        path = store._disk.path_for(_key(0))
        _write_raw_block(path, _key(0), b"", claimed_nbytes=TIB)
        os.truncate(path, disk.HEADER_SIZE + len(_key(0)) + TIB)
        _assert_every_lookup_misses(store, _key(0))
        assert not os.path.exists(path) and store.stats().corrupt_blocks >= 1
        store.put(_key(0), _block(0))  # the next put publishes a good block again
        assert torch.equal(store.get(_key(0)), _block(0))


def test_lying_header_size_without_sparse_tail_is_a_miss(tmp_path):
    with _store(tmp_path) as store:
        path = store._disk.path_for(_key(0))
        _write_raw_block(path, _key(0), bytes(BLOCK_BYTES), claimed_nbytes=1 << 36)
        _assert_every_lookup_misses(store, _key(0))
        assert store.stats().corrupt_blocks >= 1 and not os.path.exists(path)


def test_valid_crc_wrong_payload_size_is_never_a_hit(tmp_path):
    """A well-formed block of the wrong size used to count as a hit on every lookup and fail every load."""
    with _store(tmp_path) as store:
        path = store._disk.path_for(_key(1))
        _write_raw_block(path, _key(1), bytes(range(256)) * 8)  # 2 KiB, both checksums valid
        _assert_every_lookup_misses(store, _key(1))
        assert not os.path.exists(path) and store.stats().corrupt_blocks == 1
        with pytest.raises(ValueError, match="put\\(\\) of 12 bytes"):
            store.put(_key(1), torch.zeros(12, dtype=torch.uint8))  # a wrong-size put is a caller bug
        store.put(_key(1), _block(1))
        assert store.count_prefix_hits([_key(1)]) == 1 and torch.equal(store.get(_key(1)), _block(1))


@pytest.mark.timeout(30)
def test_fifo_at_a_block_path_never_hangs_a_reader(tmp_path):
    with _store(tmp_path) as store:
        path = store._disk.path_for(_key(2))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        os.mkfifo(path)
        _assert_every_lookup_misses(store, _key(2))
        assert store.stats().bad_files >= 5 and os.path.exists(path)  # counted, left alone: not a regular file
        assert disk_stats.scan(str(tmp_path / "kv"))["blocks"] == 0  # the CLI scan does not hang either
        store.put(_key(2), _block(2))  # the write renames a regular file over the FIFO
        assert os.path.isfile(path) and torch.equal(store.get(_key(2)), _block(2))


def _outside_block(tmp_path, key: bytes, store: BlockStore) -> tuple[str, str]:
    """A valid block for ``key`` outside the cache dir, at the same relative place; returns (outside root, file)."""
    outside = tmp_path / "outside"
    rel = os.path.relpath(store._disk.path_for(key), store._disk.root)
    target = os.path.join(str(outside), rel)
    _write_raw_block(target, key, _block(3).numpy().tobytes())
    os.utime(target, (1_000_000, 1_000_000))
    return str(outside), target


def _snapshot(root: str) -> dict[str, tuple[int, int]]:
    return {os.path.join(d, f): (os.stat(os.path.join(d, f)).st_size, os.stat(os.path.join(d, f)).st_mtime_ns)
            for d, _, files in os.walk(root) for f in files}


def test_symlinked_blocks_subdir_is_never_followed(tmp_path):
    """``blocks/xx`` is a symlink to a directory outside the cache: reads miss (the valid-looking block there is
    never served), writes replace the link with a real directory, nothing outside changes."""
    with _store(tmp_path) as store:
        outside, target = _outside_block(tmp_path, _key(3), store)
        xx = os.path.dirname(os.path.dirname(store._disk.path_for(_key(3))))
        os.makedirs(os.path.dirname(xx), exist_ok=True)
        os.symlink(os.path.join(outside, os.path.relpath(xx, store._disk.root)), xx)
        before = _snapshot(outside)
        _assert_every_lookup_misses(store, _key(3))
        assert store.stats().bad_files >= 1
        store.put(_key(3), _block(3))
        assert not os.path.islink(xx) and os.path.isdir(xx) and store.stats().write_errors == 0
        assert torch.equal(store.get(_key(3)), _block(3))
        store._disk.enforce_cap(shrink=True)  # eviction walks the directory: it must not reach outside either
        assert _snapshot(outside) == before


def test_symlinked_block_file_is_never_followed_or_touched(tmp_path):
    with _store(tmp_path) as store:
        outside, target = _outside_block(tmp_path, _key(3), store)
        path = store._disk.path_for(_key(3))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        os.symlink(target, path)
        before = _snapshot(outside)
        _assert_every_lookup_misses(store, _key(3))
        assert store.stats().bad_files >= 1 and os.path.islink(path)
        store.put(_key(3), _block(3))  # the write renames a regular file over the link; the target is untouched
        assert _snapshot(outside) == before and os.path.isfile(path) and not os.path.islink(path)
        assert torch.equal(store.get(_key(3)), _block(3))


def test_any_exception_on_the_lookup_path_is_a_counted_miss(tmp_path, monkeypatch):
    with _store(tmp_path) as store:
        store.put(_key(4), _block(4))

        def boom(*a, **k):
            raise RuntimeError("simulated failure below the store")

        monkeypatch.setattr(store._disk, "probe", boom)
        monkeypatch.setattr(disk, "read_header", boom)
        _assert_every_lookup_misses(store, _key(4))
        assert store.stats().lookup_errors == 3  # contains twice, then the read that deletes the file
        assert not os.path.exists(store._disk.path_for(_key(4)))  # the regular file that failed is deleted
    from longseq.kv_offload.vllm_hits import StoreHits

    class Broken:
        def fetch_prefix_to_dram(self, keys):
            raise MemoryError("simulated")

        def count_prefix_hits(self, keys):
            return len(keys)

        def record_lookup_error(self, where, err):
            self.recorded = where

    broken = Broken()
    assert StoreHits(broken).count([_key(0)]) == 0 and broken.recorded == "scheduler hit count"


def test_allocation_failure_for_a_block_is_a_miss_and_the_file_goes(tmp_path, monkeypatch):
    """What a huge claimed size used to do (torch raising RuntimeError on allocation), forced here."""
    with _store(tmp_path) as store:
        store.put(_key(5), _block(5))
        path = store._disk.path_for(_key(5))
        real_empty = torch.empty

        def failing_empty(*a, **k):
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory (simulated)")

        monkeypatch.setattr(torch, "empty", failing_empty)
        assert store.fetch_prefix_to_dram([_key(5)]) == 0
        monkeypatch.setattr(torch, "empty", real_empty)
        assert store.stats().lookup_errors == 1 and not os.path.exists(path)


def _mutate(raw: bytes, rnd: random.Random) -> bytes:
    """One random damage: a header field rewritten (sizes and key length included), a truncation, or bytes flipped."""
    kind = rnd.randrange(4)
    if kind == 0:  # rewrite one header field with a random value, keeping the header checksum valid
        fields = list(disk.HEADER.unpack(raw[:disk.HEADER_SIZE]))
        i = rnd.choice([1, 2, 4, 5, 6])
        fields[i] = rnd.choice([0, 1, BLOCK_BYTES - 1, BLOCK_BYTES + 1, 1 << 40, (1 << 64) - 1 if i == 5 else 2**31,
                                rnd.getrandbits(16 if i in (1, 2) else 32)])
        fields[i] &= (1 << {1: 16, 2: 16, 4: 32, 5: 64, 6: 32}[i]) - 1
        head = disk.HEADER.pack(*fields)
        key = raw[disk.HEADER_SIZE:disk.HEADER_SIZE + len(_key(0))]
        crc = zlib.crc32(key, zlib.crc32(head[:-4]))
        return head[:-4] + crc.to_bytes(4, "little") + raw[disk.HEADER_SIZE:]
    if kind == 1:
        return raw[:rnd.randrange(len(raw))]
    if kind == 2:
        return raw + bytes(rnd.randrange(1, 64))
    out = bytearray(raw)
    for _ in range(rnd.randrange(1, 4)):
        out[rnd.randrange(len(out))] ^= 1 << rnd.randrange(8)
    return bytes(out)


@pytest.mark.parametrize("block_nbytes", [BLOCK_BYTES, None], ids=["known_block_size", "unknown_block_size"])
def test_random_header_fields_and_truncations_give_a_miss_or_the_exact_bytes(tmp_path, block_nbytes):
    """Seeded fuzz over damaged block files: every lookup returns None or exactly the bytes that were put."""
    rnd = random.Random(17)
    with _store(tmp_path, block_nbytes) as store:
        store.put(_key(0), _block(0))
        path = store._disk.path_for(_key(0))
        good = open(path, "rb").read()
        misses = 0
        for _ in range(200):
            with open(path, "wb") as f:
                f.write(_mutate(good, rnd))
            got = store.get(_key(0))
            assert got is None or torch.equal(got, _block(0))
            assert store.fetch_prefix_to_dram([_key(0)]) in (0, 1)
            misses += got is None
            store.drop_dram_blocks()
        assert misses > 100


def test_store_config_refuses_nonfinite_empty_and_tiny_values(tmp_path):
    for bad in (float("inf"), float("nan"), json.loads('{"x": Infinity}')["x"], -1, "4", True):
        with pytest.raises(KVConfigError, match="cpu_gib must be a number"):
            BlockStore(FP, cpu_gib=bad)
        with pytest.raises(KVConfigError, match="disk_gib must be a number"):
            BlockStore(FP, cpu_gib=0, disk_dir=str(tmp_path), disk_gib=bad)
    for empty in ("", "   "):
        with pytest.raises(KVConfigError, match="disk_dir must be a non-empty path"):
            BlockStore(FP, cpu_gib=0, disk_dir=empty, disk_gib=1)
    with pytest.raises(KVConfigError, match="disk_dir='~no-such-user-longseq/kv': cannot expand"):
        BlockStore(FP, cpu_gib=0, disk_dir="~no-such-user-longseq/kv", disk_gib=1)
    with pytest.raises(KVConfigError, match=r"cpu_gib=1e-06 is smaller than one KV block \(4096 bytes\)"):
        BlockStore(FP, cpu_gib=1e-6, block_nbytes=BLOCK_BYTES)
    with pytest.raises(KVConfigError, match=r"disk_gib=1e-06 is smaller than one KV block file"):
        BlockStore(FP, cpu_gib=0, disk_dir=str(tmp_path), disk_gib=1e-6, block_nbytes=BLOCK_BYTES)


def test_store_expands_tilde_in_disk_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    with BlockStore(FP, cpu_gib=0, disk_dir="~/kvcache", disk_gib=0.01, async_disk_writes=False) as store:
        store.put(_key(0), _block(0))
        assert store._disk.root == str(tmp_path / "kvcache") and not os.path.exists(os.path.join(os.getcwd(), "~"))
        assert torch.equal(store.get(_key(0)), _block(0))


def test_vllm_extra_config_rules(tmp_path, monkeypatch):
    pytest.importorskip("vllm")
    from longseq.kv_offload.vllm import OffloadConfigError, open_store, parse_extra_config

    for key in ("cpu_gib", "disk_gib"):
        for bad in (float("inf"), float("nan"), json.loads('{"x": -Infinity}')["x"]):
            with pytest.raises(OffloadConfigError, match=f"LongSeqOffloadConnector: {key} must be a number"):
                parse_extra_config({"disk_dir": str(tmp_path), key: bad})
    for key in ("disk_dir", "stats_path"):
        with pytest.raises(OffloadConfigError, match=f"{key} must be a non-empty path"):
            parse_extra_config({key: ""})
    monkeypatch.setenv("HOME", str(tmp_path))
    assert parse_extra_config({"disk_dir": "~/kv"})["disk_dir"] == str(tmp_path / "kv")
    with pytest.raises(OffloadConfigError, match="disk_dir='~no-such-user-longseq': cannot expand"):
        parse_extra_config({"disk_dir": "~no-such-user-longseq"})
    with pytest.raises(OffloadConfigError, match="must be a JSON object"):
        parse_extra_config(["cpu_gib", 1])
    with pytest.raises(OffloadConfigError, match=r"LongSeqOffloadConnector: cpu_gib=1e-06 is smaller than one KV"):
        open_store(parse_extra_config({"cpu_gib": 1e-6}), FP, BLOCK_BYTES)
    with pytest.raises(OffloadConfigError, match=r"LongSeqOffloadConnector: disk_gib=1e-06 is smaller than one KV"):
        open_store(parse_extra_config({"cpu_gib": 0, "disk_dir": str(tmp_path), "disk_gib": 1e-6}), FP,
                   BLOCK_BYTES)
    with open_store(parse_extra_config({"cpu_gib": 0.001, "disk_dir": str(tmp_path / "ok"), "disk_gib": 0.01}),
                    FP, BLOCK_BYTES) as store:
        assert store.block_nbytes == BLOCK_BYTES and store._disk.block_nbytes == BLOCK_BYTES
