"""Reload speed of the KV offload connector's load path, without an engine: stored blocks in the store's pinned
DRAM tier -> vLLM 0.26 FlashAttention page layout on the GPU (Llama-3.1-8B: 32 layers, 8 KV heads, d128, block 16,
bf16: 2 MiB per block), against a single pinned host-to-device copy of the same bytes (the ceiling).

    python -m benchmarks.bench_kv_reload [--contexts 8192,32768] [--repeats 10]

Paths, each through ``OffloadWorker.load`` (what the engine thread waits for, synchronous):
  copy    per-block ``cudaMemcpyAsync`` into a staging tensor + one ``index_copy_`` per layer (``load_kernel: copy``)
  direct  one kernel reading the pinned DRAM buffers (``load_kernel: auto``, the default on CUDA)
and the direct kernel alone (CUDA events) over a sweep of tile sizes. Every path's pages are checked against
the saved bytes. Writes ``results/<name>.json``.
"""

from __future__ import annotations

import argparse
import statistics
import time


LAYERS, HEADS, HEAD_DIM, BLOCK = 32, 8, 128, 16


def caches(num_blocks: int):
    """vLLM 0.26 FlashAttention per-layer caches: logical ``[B, H, 16, 2D]`` stored as ``[B, 16, H, 2D]``."""
    import torch

    return [torch.empty(num_blocks, BLOCK, HEADS, 2 * HEAD_DIM, dtype=torch.bfloat16, device="cuda")
            .permute(0, 2, 1, 3) for _ in range(LAYERS)]


def main(argv=None) -> None:
    import torch

    from benchmarks.common import command_line, cuda_event_seconds, environment, pinned_h2d_seconds, write_result
    from longseq.kernels.kv_block_copy import scatter_host_blocks
    from longseq.kv_offload.store import BlockStore, KVFingerprint
    from longseq.kv_offload.vllm_scheduler import BlockTransfer
    from longseq.kv_offload.vllm_worker import OffloadWorker

    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_kv_reload",
                                description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--contexts", type=lambda s: [int(x) for x in s.split(",")], default=[8192, 32768])
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--name", default="kv_reload")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    max_blocks = max(args.contexts) // BLOCK
    num_blocks = 2 * max_blocks + 8
    src = caches(num_blocks)
    for t in src:
        t.copy_(torch.randn(t.shape, device="cuda"))
    block_bytes = LAYERS * HEADS * BLOCK * 2 * HEAD_DIM * 2
    fp = KVFingerprint(model="bench", layout="fa026", dtype="bfloat16", block_size=BLOCK)
    store = BlockStore(fp, cpu_gib=(max_blocks + 8) * block_bytes / 2**30)
    saver = OffloadWorker(src, num_blocks)
    saver.attach(store, load_kernel="copy")  # pins the DRAM tier up front
    keys = [b"blk%07d" % i for i in range(max_blocks)]
    for s0 in range(0, max_blocks, 256):  # pages 0.. -> store, in steps the save queue never drops
        saver.save([BlockTransfer("bench", list(range(s0, min(s0 + 256, max_blocks))), keys[s0:s0 + 256])])
        saver.drain()
    assert saver.counters["saved_blocks"] == max_blocks, saver.counters

    workers = {}
    for path, kernel in (("copy", "copy"), ("direct", "auto")):
        dst = caches(num_blocks)
        w = OffloadWorker(dst, num_blocks)
        w.attach(store, pin_at_start=False, load_kernel=kernel)
        assert (w._direct is not None) == (kernel == "auto"), f"direct kernel unavailable for {path}"
        workers[path] = (w, dst)

    out = {"env": environment(), "command": command_line(),
           "inputs": {"layers": LAYERS, "kv_heads": HEADS, "head_dim": HEAD_DIM, "block_size": BLOCK,
                      "dtype": "bfloat16", "block_bytes": block_bytes, "layout": "vLLM 0.26 FLASH_ATTN (NHD)",
                      "repeats": args.repeats}, "rows": []}
    for ctx in args.contexts:
        n = ctx // BLOCK
        nbytes = n * block_bytes
        targets = list(range(num_blocks - 1, num_blocks - 1 - n, -1))  # other pages, reversed
        row = {"context": ctx, "blocks": n, "bytes": nbytes}
        ts = pinned_h2d_seconds(nbytes, args.repeats)  # the ceiling: one pinned copy of the same bytes
        row["h2d_pinned_s_each"] = ts
        row["h2d_pinned_gbps"] = nbytes / statistics.median(ts) / 1e9
        for path, (w, dst) in workers.items():
            ts = []
            for r in range(args.repeats + 2):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                w.load([BlockTransfer("r", targets, keys[:n])], block_size=BLOCK)
                ts.append(time.perf_counter() - t0)
            ok = all(torch.equal(dl[targets].view(torch.int16), sl[:n].view(torch.int16)) for dl, sl in zip(dst, src))
            assert ok, f"{path}: loaded pages differ from the saved ones"
            for dl in dst:
                dl.zero_()
            row[f"{path}_s_each"] = ts[2:]
            row[f"{path}_gbps"] = nbytes / statistics.median(ts[2:]) / 1e9
            row[f"{path}_pct_of_h2d"] = 100 * row[f"{path}_gbps"] / row["h2d_pinned_gbps"]
        # the kernel alone over tile sizes: all blocks are in DRAM, addresses taken once (CUDA events)
        w, dst = workers["direct"]
        bufs = []
        store.read_dram_batch(keys[:n], block_bytes, lambda b: bufs.extend(b), pinned_only=True)
        addrs = torch.tensor([b.data_ptr() for b in bufs], device="cuda")
        ids = torch.tensor(targets, device="cuda")
        sweep = {}
        for bw in (256, 512, 1024, 2048, 4096):
            for nw in (2, 4, 8):
                ts = cuda_event_seconds(lambda: scatter_host_blocks(w._direct.layout, ids, addrs,
                                                                    w._direct.layer_bases, block_words=bw,
                                                                    num_warps=nw), args.repeats, warmup=2)
                sweep[f"{bw}x{nw}"] = nbytes / statistics.median(ts) / 1e9
        row["kernel_gbps_by_tile"] = sweep
        best = max(sweep, key=sweep.get)
        row["kernel_best_tile"], row["kernel_best_gbps"] = best, sweep[best]
        out["rows"].append(row)
        print(f"{ctx:>6} tokens ({nbytes / 2**30:.2f} GiB): pinned H2D {row['h2d_pinned_gbps']:.1f} GB/s | "
              f"copy {row['copy_gbps']:.1f} GB/s ({row['copy_pct_of_h2d']:.0f}%) | direct {row['direct_gbps']:.1f}"
              f" GB/s ({row['direct_pct_of_h2d']:.0f}%) | direct/copy {row['direct_gbps'] / row['copy_gbps']:.2f}x"
              f" | kernel alone best {best} {sweep[best]:.1f} GB/s", flush=True)
    store.close()
    print("wrote", write_result(args.name, out))


if __name__ == "__main__":
    main()
