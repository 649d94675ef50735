"""How fast does a HiCache storage backend put stored pages back into SGLang's host KV pool, on the CPU alone?

The GPU bench (``benchmarks/bench_sglang_hicache.py``) times a 32K prefix reloaded after ``flush_cache``, where the
storage read is one part of the TTFT. This study times only that part: the call SGLang's prefetch thread makes for
one batch of pages (ours: ``batch_get_v1`` into the pool's own slots; SGLang's ``file`` backend: its generic path,
``batch_get`` into flat pages then ``set_from_flat_data_page``), on a real SGLang host pool class holding CPU
tensors (as ``tests/sglang/test_sglang_kv_offload.py`` builds it), with the Llama-3.1-8B page of the GPU bench:
64 tokens x 32 layers x 8 KV heads x 128 x bf16, K and V = 8 MiB per page, ``page_first`` layout.

configs
  file          SGLang's ``HiCacheFile`` (one file per page, ``readinto`` a flat page, no checksum)
  ours          ``LongSeqHiCacheStorage`` with its DRAM tier (the pages were stored in this process)
  ours-disk     ``LongSeqHiCacheStorage`` without a DRAM tier: each page is read from its file and its crc32 checked
Each ours config runs with the store's read threads (``READ_THREADS``) and with one thread (``-1t``, how
``batch_get_v1`` read before it used them). Files are read through the page cache, as the GPU bench does
(``--cold-files`` drops them from it first with ``posix_fadvise``).

    .venv-sglang/bin/python -m benchmarks.studies.study_hicache_read [--pages 64] [--repeats 5] [--cold-files]

Writes ``results/study_hicache_read.json``: per config the median seconds per batch, GB/s and the ratio to ``file``.
Every read is checked against the stored pages (a sample of bytes per page).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time

import torch

from benchmarks.common import command_line, environment, write_result

PAGE_TOKENS, LAYERS, KV_HEADS, HEAD_DIM = 64, 32, 8, 128
CONFIGS = ("file", "ours", "ours-1t", "ours-disk", "ours-disk-1t")


def host_pool(pages: int, seed: int):
    """SGLang's ``MHATokenToKVPoolHost`` with CPU tensors, ``page_first``, random bf16 contents."""
    from sglang.srt.mem_cache.pool_host.mha import MHATokenToKVPoolHost

    size = pages * PAGE_TOKENS
    pool = object.__new__(MHATokenToKVPoolHost)
    pool.head_dim, pool.head_num = HEAD_DIM, KV_HEADS
    g = torch.Generator().manual_seed(seed)
    pool.kv_buffer = torch.randint(-2**15, 2**15, (2, size, LAYERS, KV_HEADS, HEAD_DIM), generator=g,
                                   dtype=torch.int16).view(torch.bfloat16)
    pool.layout, pool.page_size, pool.page_num, pool.size = "page_first", PAGE_TOKENS, pages, size
    pool.layer_num, pool.dtype, pool.device, pool.pin_memory = LAYERS, torch.bfloat16, "cpu", False
    return pool


def storage_config(extra: dict):
    from sglang.srt.mem_cache.hicache_storage import HiCacheStorageConfig

    return HiCacheStorageConfig(tp_rank=0, tp_size=1, pp_rank=0, pp_size=1, attn_cp_rank=0, attn_cp_size=1,
                                is_mla_model=False, enable_storage_metrics=False, is_page_first_layout=True,
                                model_name="study/llama-3.1-8b-shape", extra_config=dict(extra))


def slots(first_page: int, pages: int) -> torch.Tensor:
    return torch.arange(first_page * PAGE_TOKENS, (first_page + pages) * PAGE_TOKENS)


def page_sample(pool, page: int) -> torch.Tensor:
    """A few KiB of each of the page's K and V runs, as int16 bits (random bits include NaNs): enough to tell
    pages apart."""
    return torch.cat([pool.kv_buffer[kv, page * PAGE_TOKENS: page * PAGE_TOKENS + 2].reshape(-1) for kv in (0, 1)
                      ]).view(torch.int16)


def drop_page_cache(folder: str) -> None:
    for d, _, files in os.walk(folder):
        for f in files:
            fd = os.open(os.path.join(d, f), os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def make_backend(config: str, folder: str, pool, cpu_gib: float):
    if config == "file":
        from sglang.srt.mem_cache.hicache_storage import HiCacheFile

        backend = HiCacheFile(storage_config({}), file_path=folder)
        backend.register_mem_pool_host(pool)
        return backend
    from longseq.kv_offload.sglang import LongSeqHiCacheStorage

    extra = {"interface_v1": 1, "cpu_gib": 0 if "disk" in config else cpu_gib,
             "disk_dir": folder, "disk_gib": 64}
    backend = LongSeqHiCacheStorage(storage_config(extra))
    backend.register_mem_pool_host(pool)
    return backend


def store_pages(config: str, backend, pool, keys: list[str]) -> None:
    if config == "file":
        pages = [pool.get_data_page(i * PAGE_TOKENS, flat=True) for i in range(len(keys))]
        assert backend.batch_set(keys, pages)
        return
    assert all(backend.batch_set_v1(keys, slots(0, len(keys))))
    backend.store.flush()  # every page on disk before timing (the DRAM config keeps its copies too)


def read_pages(config: str, backend, pool, keys: list[str], first_page: int) -> int:
    """One prefetch batch into slots from ``first_page`` on; returns the pages read."""
    if config == "file":  # SGLang's HiCacheController._generic_page_get
        got = backend.batch_get(keys, [pool.get_dummy_flat_data_page() for _ in keys])
        n = 0
        for i, page in enumerate(got):
            if page is None:
                break
            pool.set_from_flat_data_page((first_page + i) * PAGE_TOKENS, page)
            n += 1
        return n
    ok = backend.batch_get_v1(keys, slots(first_page, len(keys)))
    return ok.index(False) if False in ok else len(ok)


def run_config(config: str, pages: int, repeats: int, cold: bool, cpu_gib: float) -> dict:
    import longseq.kv_offload.store as store_mod

    threads = 1 if config.endswith("-1t") else store_mod.READ_THREADS
    saved, store_mod.READ_THREADS = store_mod.READ_THREADS, threads
    folder = tempfile.mkdtemp(prefix=f"hicache-study-{config}-")
    pool = host_pool(2 * pages, seed=1)  # pages [0, pages) are stored, [pages, 2 * pages) receive them
    keys = [f"{i + 1:064x}" for i in range(pages)]
    try:
        backend = make_backend(config, folder, pool, cpu_gib)
        store_pages(config, backend, pool, keys)
        times = []
        for _ in range(repeats):
            pool.kv_buffer[:, pages * PAGE_TOKENS:].zero_()
            if cold:
                drop_page_cache(folder)
            t = time.perf_counter()
            n = read_pages(config, backend, pool, keys, pages)
            times.append(time.perf_counter() - t)
            assert n == pages, f"{config}: {n} of {pages} pages read"
            for i in range(pages):
                assert torch.equal(page_sample(pool, pages + i), page_sample(pool, i)), f"{config}: page {i} differs"
        if hasattr(backend, "close"):
            backend.close()
    finally:
        store_mod.READ_THREADS = saved
        shutil.rmtree(folder, ignore_errors=True)
    nbytes = pages * pool.get_dummy_flat_data_page().nbytes
    med = statistics.median(times)
    return {"config": config, "threads": threads if config != "file" else 1, "times_s": times, "median_s": med,
            "gb_s": nbytes / med / 1e9, "bytes": nbytes}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pages", type=int, default=64, help="pages per batch (8 MiB each)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--cold-files", action="store_true", help="drop the stored files from the page cache first")
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--name", default="study_hicache_read")
    args = p.parse_args()
    configs = [c for c in args.configs.split(",") if c]
    unknown = sorted(set(configs) - set(CONFIGS))
    if unknown:
        raise SystemExit(f"unknown config(s) {unknown}; choose from {', '.join(CONFIGS)}")
    import sglang

    cpu_gib = 2 * args.pages * 8 / 1024 + 0.25
    rows = [run_config(c, args.pages, args.repeats, args.cold_files, cpu_gib) for c in configs]
    base = next((r["median_s"] for r in rows if r["config"] == "file"), None)
    print(f"| config | threads | median s per {args.pages} pages | GB/s | x file |")
    print("|---|---|---|---|---|")
    for r in rows:
        r["speedup_vs_file"] = base / r["median_s"] if base else None
        ratio = f"{r['speedup_vs_file']:.2f}" if base else "-"
        print(f"| {r['config']} | {r['threads']} | {r['median_s']:.3f} | {r['gb_s']:.2f} | {ratio} |")
    env = {**environment(), "sglang": sglang.__version__}
    path = write_result(args.name, {"benchmark": "study_hicache_read", "command": command_line(), "env": env,
                                    "inputs": {"pages": args.pages, "repeats": args.repeats,
                                               "cold_files": args.cold_files, "page_tokens": PAGE_TOKENS,
                                               "layers": LAYERS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM,
                                               "dtype": "bfloat16", "layout": "page_first"},
                                    "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
