"""Does the store's disk writer thread keep other threads of the process (the engine thread) from the GIL?

On the H200 a GPU prefix hit that ran while a 32K prompt's blocks were being written to disk took 0.14-0.22 s
against 0.058 s with a DRAM-only tier (``results/kv_offload_direct.json``), while the connector's own hooks took
~5 ms of it. One suspect is GIL hand-offs between the writer thread and the engine thread. This measures how
late a thread wakes from 0.5 ms sleeps (waking needs the GIL) with the process idle and while the store writes
blocks to disk.

    python benchmarks/study_disk_writer_gil.py [--blocks 768] [--block-mib 2]

Writes ``results/study_disk_writer_gil.json``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))


def wake_delays_ms(seconds: float) -> dict:
    """Delay (ms) past each 0.5 ms sleep, over ``seconds``: median, p99, max."""
    d, t_end = [], time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        t = time.perf_counter()
        time.sleep(0.0005)
        d.append((time.perf_counter() - t - 0.0005) * 1e3)
    d.sort()
    return {"median": statistics.median(d), "p99": d[int(0.99 * len(d))], "max": d[-1], "n": len(d)}


def main(argv=None) -> None:
    import torch

    from benchmarks.common import command_line, environment, write_result
    from longseq.kv_offload.store import BlockStore, KVFingerprint

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--blocks", type=int, default=768)
    p.add_argument("--block-mib", type=float, default=2.0)
    p.add_argument("--seconds", type=float, default=1.0)
    p.add_argument("--name", default="study_disk_writer_gil")
    args = p.parse_args(argv)
    nbytes = int(args.block_mib * 2**20)
    fp = KVFingerprint(model="study", layout="gil", dtype="uint8", block_size=16)
    src = torch.randint(0, 256, (nbytes,), dtype=torch.uint8)
    out = {"idle_before": wake_delays_ms(args.seconds)}
    d = tempfile.mkdtemp(prefix="longseq-gil-")
    try:
        with BlockStore(fp, cpu_gib=(args.blocks + 1) * nbytes / 2**30, disk_dir=d,
                        disk_gib=4 * args.blocks * nbytes / 2**30) as st:
            for i in range(args.blocks):
                st.put(b"blk%013d" % i, src)  # into DRAM now; the writer thread writes them to disk
            out["while_writing"] = wake_delays_ms(args.seconds)
            out["writer_still_busy_after"] = st._pending_bytes > 0
            st.flush()
    finally:
        shutil.rmtree(d, ignore_errors=True)
    out["idle_after"] = wake_delays_ms(args.seconds)
    for k in ("idle_before", "while_writing", "idle_after"):
        r = out[k]
        print(f"{k:>14}: wake-up delay median {r['median']:.3f} ms, p99 {r['p99']:.2f} ms, max {r['max']:.2f} ms")
    if not out["writer_still_busy_after"]:
        print("the writer finished before the timing ended: use more --blocks")
    print("wrote", write_result(args.name, {"env": environment(), "command": command_line(), "inputs": vars(args),
                                            **out}))


if __name__ == "__main__":
    main()
