"""Does emptying the pinned DRAM tier the old way (``DramTier.clear``: slabs freed) stall the engine's CUDA calls
while the next saves run, and does ``BlockStore.drop_dram_blocks`` (buffers kept) avoid it?

``bench_kv_offload.py``'s disk phase used ``clear`` to simulate a restart; only our disk configuration had that
phase, and only the measurements after it were slow (a 32K GPU hit, TPOT). This isolates the mechanism without an
engine: a thread ``put``s blocks into a reserved pinned tier (as the connector's save thread does) while this thread
times small CUDA ops with a sync (as the engine's steps do), after the tier was emptied each way.

    python -m benchmarks.studies.study_pinned_slab_realloc [--gib 4] [--block-mib 2]

Writes ``results/study_pinned_slab_realloc.json``. Needs CUDA.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time


def run(store, src, keys, x) -> dict:
    """Put ``keys`` from a thread; time ``x.add_(1)`` + sync here until the puts are done."""
    import torch

    done = threading.Event()
    t_put = [0.0]

    def saver() -> None:
        t = time.perf_counter()
        for k in keys:
            store.put(k, src)
        t_put[0] = time.perf_counter() - t
        done.set()

    lat = []
    th = threading.Thread(target=saver)
    th.start()
    while not done.is_set():
        t = time.perf_counter()
        x.add_(1)
        torch.cuda.synchronize()
        lat.append((time.perf_counter() - t) * 1e3)
    th.join()
    lat.sort()
    return {"put_s": t_put[0], "op_ms_median": statistics.median(lat), "op_ms_p99": lat[int(0.99 * len(lat))],
            "op_ms_max": lat[-1], "op_ms_total_over_1ms": sum(v for v in lat if v > 1.0), "ops": len(lat),
            "pinned_bytes_after": store._dram.allocator.pinned_bytes}


def main(argv=None) -> None:
    import torch

    from benchmarks.common import command_line, environment, write_result
    from longseq.kv_offload.store import BlockStore, KVFingerprint

    p = argparse.ArgumentParser(prog="python -m benchmarks.studies.study_pinned_slab_realloc",
                                description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gib", type=float, default=4.0, help="bytes put per round (a 32K Llama-8B prompt: 4.3 GB)")
    p.add_argument("--block-mib", type=float, default=2.0)
    p.add_argument("--name", default="study_pinned_slab_realloc")
    args = p.parse_args(argv)
    assert torch.cuda.is_available(), "needs CUDA (pinned memory)"
    nbytes = int(args.block_mib * 2**20)
    n = int(args.gib * 2**30) // nbytes
    src = torch.randint(0, 256, (nbytes,), dtype=torch.uint8).pin_memory()
    x = torch.zeros(1024, device="cuda")
    fp = KVFingerprint(model="study", layout="slab", dtype="uint8", block_size=16)
    out = {}
    with BlockStore(fp, cpu_gib=2 * args.gib, pin_memory=True) as store:
        t = time.perf_counter()
        reserved = store.reserve_dram(nbytes)
        out["reserve_s"], out["reserved_bytes"] = time.perf_counter() - t, reserved
        rnd = 0
        for how in ("reserved", "drop_dram_blocks", "clear", "drop_dram_blocks", "clear"):
            if how == "drop_dram_blocks":
                store.drop_dram_blocks()
            elif how == "clear":
                with store._lock:
                    store._dram.clear()  # what bench_kv_offload.py's disk phase did before
            keys = [b"r%02dk%08d" % (rnd, i) for i in range(n)]
            rnd += 1
            r = run(store, src, keys, x)
            out.setdefault(how, []).append(r)
            print(f"{how:>17}: {n} puts {r['put_s']:.2f} s; CUDA op + sync median {r['op_ms_median']:.3f} ms, "
                  f"p99 {r['op_ms_p99']:.2f} ms, max {r['op_ms_max']:.1f} ms, {r['op_ms_total_over_1ms']:.0f} ms in "
                  f"ops over 1 ms; pinned {r['pinned_bytes_after'] / 2**30:.1f} GiB", flush=True)
    print("wrote", write_result(args.name, {"env": environment(), "command": command_line(), "inputs": vars(args),
                                            "blocks_per_round": n, **out}))


if __name__ == "__main__":
    main()
