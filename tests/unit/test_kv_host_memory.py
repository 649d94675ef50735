"""Block-sized host buffers are returned to the OS when freed, so store churn does not grow RSS."""

import mmap
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from longseq.kv_offload.dram import MMAP_MIN_BYTES, HostBufferAllocator, host_bytes

_CHURN = textwrap.dedent("""
    import glob, random, sys, tempfile, threading, time
    import torch
    from longseq.kv_offload.fingerprint import KVFingerprint
    from longseq.kv_offload.store import BlockStore

    def rss_mib():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096 >> 20

    NB, N = 3 << 20, int(sys.argv[1])
    src = torch.randint(0, 255, (NB,), dtype=torch.uint8)
    base = rss_mib()
    d = tempfile.mkdtemp()
    st = BlockStore(KVFingerprint("m", "l", "float32", 16), cpu_gib=0.02, disk_dir=d, disk_gib=0.3,
                    block_nbytes=NB, log_interval_s=0, max_pending_write_gib=0.05)
    keys, stop = [], False

    def reader():  # prefix fetches on the store's read pool and gets, as the connector's lookups do
        rng = random.Random(2)
        while not stop:
            if len(keys) > 10:
                i = rng.randrange(len(keys) - 8)
                st.fetch_prefix_to_dram(keys[i:i + 8])
                st.get(keys[i])
            time.sleep(0.001)

    def corrupter():  # truncated files make reads fail half-way
        rng = random.Random(1)
        while not stop:
            files = glob.glob(d + "/blocks/*/*")
            if files:
                try:
                    with open(rng.choice(files), "r+b") as f:
                        f.truncate(rng.randrange(NB))
                except OSError:
                    pass
            time.sleep(0.01)

    threads = [threading.Thread(target=reader), threading.Thread(target=corrupter)]
    for t in threads:
        t.start()
    for n in range(N):
        keys.append(n.to_bytes(8, "little") * 4)
        st.put(keys[-1], src)
    stop = True
    for t in threads:
        t.join()
    st.flush()
    print(base, rss_mib())  # the store is still open: its DRAM tier (20 MiB) is held
""")


def test_large_host_buffers_are_their_own_mapping_and_small_ones_are_not():
    big = host_bytes(MMAP_MIN_BYTES)
    assert big.dtype == torch.uint8 and big.numel() == MMAP_MIN_BYTES and big.is_contiguous()
    big.fill_(7)  # writable
    assert int(big[-1]) == 7
    small = host_bytes(MMAP_MIN_BYTES - 1)
    assert small.numel() == MMAP_MIN_BYTES - 1
    with open("/proc/self/maps") as f:
        maps = f.read()
    start = big.data_ptr()
    # an anonymous mapping starts exactly at the buffer (mmap is page aligned)
    assert start % mmap.PAGESIZE == 0
    assert any(int(line.split("-")[0], 16) == start for line in maps.splitlines())


def test_pageable_dram_allocator_uses_mapped_buffers():
    alloc = HostBufferAllocator(pin_memory=False, max_free_bytes=0)
    buf = alloc.alloc(2 * MMAP_MIN_BYTES)
    assert buf.numel() == 2 * MMAP_MIN_BYTES and buf.data_ptr() % mmap.PAGESIZE == 0


@pytest.mark.timeout(300)
@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="RSS is read from /proc (Linux)")
def test_store_churn_across_threads_does_not_grow_rss():
    """Saves, prefix fetches on the read pool, gets and corrupted files over 400 blocks of 3 MiB (1.2 GiB
    through a 20 MiB DRAM tier and a 300 MiB disk tier): RSS after the churn stays within 64 MiB of RSS after
    before the store, plus its 20 MiB DRAM tier, plus 64 MiB. Through malloc, glibc's per-thread arenas kept
    hundreds of MiB of freed blocks."""
    out = subprocess.run([sys.executable, "-c", _CHURN, "400"], capture_output=True, text=True, timeout=280)
    assert out.returncode == 0, out.stderr[-3000:]
    base, end = map(int, out.stdout.split()[-2:])
    assert end - base < 20 + 64, f"RSS grew from {base} MiB to {end} MiB over the churn"
