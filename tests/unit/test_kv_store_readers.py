"""DRAM hits are copied out without the store's lock (SGLang's read threads copy pages in parallel); a buffer
evicted while it is read goes back to the allocator once, after its last reader (never to a new block while it
is still being read)."""

from __future__ import annotations

import threading

import pytest
import torch

from longseq.kv_offload import store as store_module
from longseq.kv_offload.store import BlockStore
from test_kv_store import BLOCK_BYTES, FP, _block, _bytes, _key

CAP = 32 * BLOCK_BYTES / (1 << 30)  # 32 blocks: the pageable allocator keeps recycled buffers at this size


def _free_ptrs(store: BlockStore) -> list[int]:
    return [b.data_ptr() for b in store._dram.allocator._free.get(BLOCK_BYTES, [])]


class _HeldCopy:
    """Replaces the store's copy-out: the first call waits inside until ``release()``."""

    def __init__(self, monkeypatch):
        self.inside, self.go, self._real = threading.Event(), threading.Event(), store_module._copy_out
        monkeypatch.setattr(store_module, "_copy_out", self)

    def __call__(self, dst, buf):
        if not self.inside.is_set():
            self.inside.set()
            assert self.go.wait(10)
        return self._real(dst, buf)

    def release(self) -> None:
        self.go.set()


def _read_in_thread(store: BlockStore, key: bytes) -> tuple[threading.Thread, list]:
    out: list = []
    t = threading.Thread(target=lambda: out.append(store.get(key)))
    t.start()
    return t, out


def test_dram_hits_are_copied_out_in_parallel(monkeypatch):
    """Both readers must be inside the copy at once: a copy under the lock would break the barrier (a miss)."""
    barrier, real = threading.Barrier(2, timeout=10), store_module._copy_out

    def copy_out(dst, buf):
        barrier.wait()
        return real(dst, buf)

    with BlockStore(FP, cpu_gib=CAP) as store:
        for i in range(2):
            store.put(_key(i), _block(i))
        monkeypatch.setattr(store_module, "_copy_out", copy_out)
        got = store.read_parallel(lambda i: store.get(_key(i)), [0, 1])
        assert all(g is not None and torch.equal(g, _bytes(_block(i))) for i, g in enumerate(got))
        assert store.stats().dram.hits == 2


def test_block_dropped_while_read_is_recycled_after_its_last_reader(monkeypatch):
    with BlockStore(FP, cpu_gib=CAP) as store:
        store.put(_key(0), _block(0))
        store.put(_key(1), _block(1))
        buf0, buf1 = store._dram.peek(_key(0)), store._dram.peek(_key(1))
        store.forget([_key(1)])  # nobody reads it: recycled at once
        assert _free_ptrs(store) == [buf1.data_ptr()]
        held = _HeldCopy(monkeypatch)
        t, out = _read_in_thread(store, _key(0))
        assert held.inside.wait(10)
        store.forget([_key(0)])  # dropped mid-read: kept out of the allocator
        assert buf0.data_ptr() not in _free_ptrs(store)
        for i in (2, 3):  # new blocks: the recycled buffer, then a fresh one, never the one being read
            store.put(_key(i), _block(i))
            assert store._dram.peek(_key(i)).data_ptr() != buf0.data_ptr()
        held.release()
        t.join(10)
        assert torch.equal(out[0], _bytes(_block(0)))
        assert _free_ptrs(store) == [buf0.data_ptr()]  # back once, after the read
        assert not store._reading


@pytest.mark.parametrize("writer_first", [True, False])
def test_block_queued_for_disk_and_read_when_evicted_is_recycled_once(tmp_path, monkeypatch, writer_first):
    """Evicted while both the disk writer and a reader hold it: whichever finishes last gives it back, once."""
    with BlockStore(FP, cpu_gib=CAP, disk_dir=str(tmp_path), disk_gib=0.01) as store:
        writing, write_go, real_write = threading.Event(), threading.Event(), store._disk.write

        def slow_write(key, buf):
            writing.set()
            assert write_go.wait(10)
            return real_write(key, buf)

        monkeypatch.setattr(store._disk, "write", slow_write)
        store.put(_key(0), _block(0))
        assert writing.wait(10)
        buf0 = store._dram.peek(_key(0))
        held = _HeldCopy(monkeypatch)
        t, out = _read_in_thread(store, _key(0))
        assert held.inside.wait(10)
        with store._lock:
            store._dram.discard(_key(0))  # an eviction
        first, second = (write_go.set, held.release) if writer_first else (held.release, write_go.set)
        first()
        if writer_first:
            store.flush()
        else:
            t.join(10)
        assert buf0.data_ptr() not in _free_ptrs(store)  # the other one still holds it
        second()
        store.flush()
        t.join(10)
        assert torch.equal(out[0], _bytes(_block(0)))
        assert _free_ptrs(store).count(buf0.data_ptr()) == 1
        assert not store._reading and store.stats().disk.blocks_written == 1
