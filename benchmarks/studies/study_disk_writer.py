"""What about writing KV blocks to disk slows the engine thread of the same process?

A GPU prefix hit that ran while a long prompt's blocks were being written to disk was slower than with a DRAM-only
tier, by far more than the connector's own hooks take (docs/benchmarks/kv-offload.md, docs/benchmarks/archive.md).
This runs engine-like foreground work (probes) while a background writer works (variants) and reports how much
slower each probe gets, so each suspected cause is tested on its own:

probes (the engine thread's kinds of work)
  wake        delay past 0.5 ms sleeps (a thread waking needs the GIL)
  hash        vLLM-style prefix hashing: sha256 of pickled (parent, 16 tokens) for 2048 blocks (Python, GIL held)
  torch_ops   300 small tensor ops then a sync (each op releases and retakes the GIL; on CUDA if present)
  open_miss   open a block file that does not exist, in the tree the writer writes (the connector's lookup of a
              block it does not hold probes the disk like this)

variants (what runs in the background)
  idle        nothing
  store       the connector's writer: ``DiskTier.write`` (crc32 + page-cache write + rename) in a thread
  crc         crc32 of each block only, in a thread
  write       the page-cache write + rename only (no crc), in a thread
  odirect     crc32 + an O_DIRECT write (no page cache), in a thread
  process     ``DiskTier.write`` in a separate process (no GIL shared with the probes)
  spin        a pure-Python busy loop in a thread (the GIL's worst case, for scale)

    python -m benchmarks.studies.study_disk_writer [--seconds 2] [--block-mib 2] [--dir DIR]

Writes ``results/study_disk_writer.json``: per variant and probe the median time and its ratio to idle, plus the
machine's CPU-time split (user, system, iowait, steal) over the variant.
"""

from __future__ import annotations

import argparse
import hashlib
import mmap
import multiprocessing as mp
import os
import pickle
import shutil
import statistics
import tempfile
import threading
import time
import zlib


VARIANTS = ("idle", "store", "crc", "write", "odirect", "process", "spin")
PROBES = ("wake", "hash", "torch_ops", "open_miss")


# ---- probes: one unit of engine-like work, timed -------------------------------------------------
def probe_wake() -> float:
    t = time.perf_counter()
    time.sleep(0.0005)
    return time.perf_counter() - t - 0.0005


_TOKENS = [list(range(i * 16, i * 16 + 16)) for i in range(2048)]


def probe_hash() -> float:
    t, parent = time.perf_counter(), b""
    for toks in _TOKENS:
        parent = hashlib.sha256(pickle.dumps((parent, tuple(toks)))).digest()
    return time.perf_counter() - t


def make_probe_open_miss(d: str):
    """The connector's lookup of a block that is not stored: open a missing file under the writer's tree (the
    store's own path scheme, ``DiskTier.path_for``)."""
    tier, n = _disk_tier(d), [0]

    def probe() -> float:
        n[0] += 1
        path = tier.path_for(b"miss%012d" % n[0])
        t = time.perf_counter()
        try:
            open(path, "rb").close()
        except OSError:
            pass
        return time.perf_counter() - t
    return probe


def make_probe_torch_ops():
    import torch

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    x = torch.randn(64, 64, device=dev)

    def probe() -> float:
        t, y = time.perf_counter(), x
        for _ in range(300):
            y = y * 1.0001 + 0.0001
        if dev == "cuda":
            torch.cuda.synchronize()
        else:
            y.sum().item()
        return time.perf_counter() - t
    return probe


# ---- background writers ----------------------------------------------------------------------
def _disk_tier(d: str):
    from longseq.kv_offload.disk import DiskTier
    from longseq.kv_offload.fingerprint import KVFingerprint
    from longseq.kv_offload.stats import StatsRecorder

    fp = KVFingerprint(model="study", layout="writer", dtype="uint8", block_size=16)
    return DiskTier(d, fp, 2 << 30, StatsRecorder())  # 2 GiB cap: old blocks are evicted as new ones land


def _store_loop(d: str, buf, stop, counter: list) -> None:
    tier, i = _disk_tier(d), 0
    while not stop.is_set():
        tier.write(b"blk%013d" % i, buf)
        i += 1
    counter.append(i)


def _process_main(d: str, nbytes: int, stop, count) -> None:
    import torch

    buf = torch.randint(0, 256, (nbytes,), dtype=torch.uint8)
    out: list = []
    _store_loop(d, buf, stop, out)
    count.value = out[0]


def _crc_loop(view, stop, counter: list) -> None:
    i = 0
    while not stop.is_set():
        zlib.crc32(view)
        i += 1
    counter.append(i)


def _write_loop(d: str, view, stop, counter: list, direct: bool) -> None:
    i, n = 0, len(view)
    if direct:  # O_DIRECT needs an aligned buffer and length: copy the block into an anonymous mmap once
        padded = (n + 4095) // 4096 * 4096
        aligned = mmap.mmap(-1, padded)
        aligned[:n] = view
    while not stop.is_set():
        path = os.path.join(d, f"w{i % 1024}.bin")  # 1024 names in rotation: bounded disk use
        if direct:
            zlib.crc32(view)
            fd = os.open(path + ".tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
            try:
                os.write(fd, aligned)
            finally:
                os.close(fd)
            os.replace(path + ".tmp", path)
        else:
            with open(path + ".tmp", "wb") as f:
                f.write(view)
            os.replace(path + ".tmp", path)
        i += 1
    counter.append(i)


def _spin_loop(stop, counter: list) -> None:
    i = 0
    while not stop.is_set():
        for _ in range(1000):
            i += 1
    counter.append(i)


class Background:
    """Runs one variant until ``stop()``; returns the number of work items it did."""

    def __init__(self, variant: str, d: str, buf) -> None:
        self.variant, self.stop_event, self.counter = variant, threading.Event(), []
        self.proc = None
        view = memoryview(buf.numpy()).cast("B")
        if variant == "process":
            ctx = mp.get_context("spawn")
            self.stop_event, self.count = ctx.Event(), ctx.Value("q", 0)
            self.proc = ctx.Process(target=_process_main, args=(d, buf.numel(), self.stop_event, self.count))
            self.proc.start()
            time.sleep(3.0)  # the child imports torch; let it reach its loop before the probes run
            return
        target = {"store": lambda: _store_loop(d, buf, self.stop_event, self.counter),
                  "crc": lambda: _crc_loop(view, self.stop_event, self.counter),
                  "write": lambda: _write_loop(d, view, self.stop_event, self.counter, False),
                  "odirect": lambda: _write_loop(d, view, self.stop_event, self.counter, True),
                  "spin": lambda: _spin_loop(self.stop_event, self.counter),
                  "idle": lambda: self.counter.append(0)}[variant]
        self.thread = threading.Thread(target=target, daemon=True)
        self.thread.start()

    def stop(self) -> int:
        self.stop_event.set()
        if self.proc is not None:
            self.proc.join(60)
            return self.count.value
        self.thread.join(60)
        return self.counter[0] if self.counter else -1


def cpu_split() -> dict:
    """Machine-wide jiffies from /proc/stat: user, system, iowait, steal (empty off Linux)."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
    except OSError:
        return {}
    return {"user": v[0] + v[1], "system": v[2], "idle": v[3], "iowait": v[4], "steal": v[7] if len(v) > 7 else 0}


def run_variant(variant: str, d: str, buf, probes: dict, seconds: float) -> dict:
    os.makedirs(d, exist_ok=True)
    c0 = cpu_split()
    bg = Background(variant, d, buf)
    c1 = cpu_split()
    res = {}
    probes = {**probes, "open_miss": make_probe_open_miss(d)}
    for name, fn in probes.items():
        times, t_end = [], time.perf_counter() + seconds
        while time.perf_counter() < t_end:
            times.append(fn())
        times.sort()
        res[name] = {"median_ms": statistics.median(times) * 1e3, "p99_ms": times[int(0.99 * len(times))] * 1e3,
                     "max_ms": times[-1] * 1e3, "n": len(times)}
    c2 = cpu_split()
    items = bg.stop()
    shutil.rmtree(d, ignore_errors=True)
    span = {k: c2[k] - c1[k] for k in c2} if c2 else {}
    tot = sum(span.values()) or 1
    return {"probes": res, "blocks_done": items, "cpu_share": {k: v / tot for k, v in span.items()},
            "startup_jiffies": {k: c1[k] - c0[k] for k in c1} if c1 else {}}


def main(argv=None) -> None:
    import torch

    from benchmarks.common import command_line, environment, write_result

    p = argparse.ArgumentParser(prog="python -m benchmarks.studies.study_disk_writer",
                                description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=2.0, help="per probe and variant")
    p.add_argument("--block-mib", type=float, default=2.0)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--dir", default=None, help="parent of the scratch directory (default: the temp dir)")
    p.add_argument("--name", default="study_disk_writer")
    args = p.parse_args(argv)
    nbytes = int(args.block_mib * 2**20)
    buf = torch.randint(0, 256, (nbytes,), dtype=torch.uint8)
    if torch.cuda.is_available():
        buf = buf.pin_memory()  # the connector's DRAM tier is pinned on CUDA
    probes = {"wake": probe_wake, "hash": probe_hash, "torch_ops": make_probe_torch_ops()}
    for fn in probes.values():  # warm-up (CUDA context, allocator, code paths)
        fn()
    root = tempfile.mkdtemp(prefix="longseq-writer-study-", dir=args.dir)
    out = {}
    try:
        for v in args.variants.split(","):
            out[v] = run_variant(v, os.path.join(root, v), buf, probes, args.seconds)
            print(v, {k: round(r["median_ms"], 3) for k, r in out[v]["probes"].items()},
                  "blocks", out[v]["blocks_done"], {k: round(s, 3) for k, s in out[v]["cpu_share"].items()},
                  flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if "idle" in out:
        base = out["idle"]["probes"]
        print(f"{'variant':>8} " + " ".join(f"{p:>10}" for p in PROBES) + "   (x of idle)")
        for v, r in out.items():
            for pn in PROBES:
                r["probes"][pn]["x_idle"] = r["probes"][pn]["median_ms"] / max(base[pn]["median_ms"], 1e-9)
            print(f"{v:>8} " + " ".join(f"{r['probes'][pn]['x_idle']:>10.2f}" for pn in PROBES))
    print("wrote", write_result(args.name, {"env": environment(), "command": command_line(), "inputs": vars(args),
                                            "variants": out}))


if __name__ == "__main__":
    main()
