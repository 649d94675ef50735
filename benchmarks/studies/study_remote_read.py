"""What bounds reading KV blocks from a Mooncake Store over TCP loopback?

The remote tier reads a block as ``get_size`` + ``get`` (a fresh ``bytes``), then checks and copies it. This study
starts a ``mooncake_master`` and a memory node on 127.0.0.1 (``longseq.kv_offload.mooncake_local``), puts
``--records`` records of ``--record-bytes`` (a Llama-3.1-8B block of 16 tokens plus a header) into the node, and
reads all of them back from a client that lends no memory (so every read crosses TCP), each of these ways:

1. ``per-record get``: ``get_size`` + ``get`` per record, one after the other (the tier's path today);
2. ``get_batch`` of ``--chunk`` names at a time;
3. ``batch_get_into`` of ``--chunk`` names into one registered buffer, from T threads (``--threads``) sharing one
   client, and from T threads with a client each (each registers the buffer);
4. the raw TCP loopback ceiling without Mooncake: Python sockets, a sender and a receiver thread (``recv_into`` a
   preallocated buffer) per stream, ``--streams`` streams; and one ``numpy`` memcpy of the same bytes.

Every measurement moves the same bytes, after an untimed pass over all records and its own warm-up chunk, and
prints total bytes, median seconds of ``--repeats`` runs, and GB/s.

    python -m benchmarks.studies.study_remote_read [--records 1024] [--chunk 64] [--threads 1,4,8] [--out-dir DIR]

Writes ``<out-dir>/remote_read_study.json`` (default ``benchmarks/results``). Needs ``longseq[remote]``; no GPU.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import tempfile
import threading
import time

import numpy as np

MIB = 1 << 20


def run_bounded(fns: list, timeout: float, what: str) -> list:
    """Every ``fn`` in its own daemon thread, all at once, within ``timeout`` seconds in all: a hung Mooncake call
    or socket then fails one measurement instead of hanging the run."""
    out, errs = [None] * len(fns), []

    def job(i: int) -> None:
        try:
            out[i] = fns[i]()
        except BaseException as e:  # re-raised below, in the caller's thread
            errs.append(e)
    jobs = [threading.Thread(target=job, args=(i,), daemon=True) for i in range(len(fns))]
    for j in jobs:
        j.start()
    deadline = time.monotonic() + timeout
    for j in jobs:
        j.join(max(0.0, deadline - time.monotonic()))
        if j.is_alive():
            raise TimeoutError(f"{what} did not finish within {timeout} s")
    if errs:
        raise errs[0]
    return out


def open_client(master, buffer_bytes: int, base: int, nbytes: int):
    """A client on ``master`` that lends no memory (every record then lives in the pool node and each read crosses
    TCP), with ``nbytes`` at ``base`` registered; ``buffer_bytes`` is its transfer buffer, which get / get_batch
    copy out of, so it must fit one chunk."""
    from mooncake.store import MooncakeDistributedStore

    client = MooncakeDistributedStore()
    status = client.setup("127.0.0.1", "P2PHANDSHAKE", 0, buffer_bytes, "tcp", "", master.address)
    if status != 0 or client.register_buffer(base, nbytes) != 0:
        raise RuntimeError(f"Mooncake client set-up returned {status}, or register_buffer failed")
    return client


def chunks(seq, n: int):
    return [seq[i:i + n] for i in range(0, len(seq), n)]


def read_per_record(client, names, rb: int) -> None:
    for name in names:
        size = client.get_size(name)
        if size != rb or len(client.get(name)) != size:
            raise RuntimeError(f"{name}: get_size {size}, expected {rb}")


def read_get_batch(client, names, rb: int, chunk: int) -> None:
    for part in chunks(names, chunk):
        got = client.get_batch(part)
        if [len(b) for b in got] != [rb] * len(part):
            raise RuntimeError(f"get_batch returned sizes {sorted({len(b) for b in got})}, expected {rb}")


def transfer(op, names, idx, base: int, rb: int, chunk: int, ok: int) -> None:
    """``op`` (a client's batch_get_into or batch_put_from) of record ``idx[i]`` at its slot of the buffer."""
    for part in chunks(list(idx), chunk):
        st = op([names[i] for i in part], [base + i * rb for i in part], [rb] * len(part))
        if any(s != ok for s in st):
            raise RuntimeError(f"{op.__name__} statuses {sorted(set(st))}, expected {ok}")


def check_headers(buf: np.ndarray, idx) -> None:
    heads = buf[idx, :8].copy().view("<u8").ravel()
    if not np.array_equal(heads, np.asarray(idx, dtype=np.uint64)):
        raise RuntimeError("records read into the buffer do not carry their own index")


def raw_tcp(total: int, streams: int, rb: int, timeout: float) -> None:
    """Stream ``total`` bytes over ``streams`` loopback connections, both ends threads of this process: the socket
    calls release the GIL, so this is the kernel's loopback cost, which Mooncake's TCP transport pays as well."""
    per = total // streams
    with socket.socket() as lst:
        lst.bind(("127.0.0.1", 0))
        lst.listen(streams)
        lst.settimeout(timeout)
        pairs = []
        try:
            for _ in range(streams):
                tx = socket.create_connection(lst.getsockname(), timeout=timeout)
                rx, _ = lst.accept()
                rx.settimeout(timeout)
                pairs.append((tx, rx))

            def send(s) -> None:
                view, left = memoryview(np.ones(rb, dtype=np.uint8)), per
                while left:
                    n = min(rb, left)
                    s.sendall(view[:n])
                    left -= n

            def recv(s) -> None:
                view, left = memoryview(bytearray(rb)), per
                while left:
                    n = s.recv_into(view[:min(rb, left)])
                    if n == 0:
                        raise ConnectionError("sender closed early")
                    left -= n
            run_bounded([lambda s=tx: send(s) for tx, _ in pairs] + [lambda s=rx: recv(s) for _, rx in pairs],
                        timeout, f"raw TCP x{streams}")
        finally:
            for tx, rx in pairs:
                tx.close()
                rx.close()


def main(argv=None) -> None:
    from benchmarks.common import command_line, environment, write_result
    from longseq.kv_offload.mooncake_local import LocalMaster, LocalPoolNode

    p = argparse.ArgumentParser(prog="python -m benchmarks.studies.study_remote_read", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--records", type=int, default=1024)
    p.add_argument("--record-bytes", type=int, default=2 * MIB + 64, help="a 2 MiB KV block plus its header")
    p.add_argument("--chunk", type=int, default=64, help="names per get_batch / batch_get_into call")
    p.add_argument("--threads", default="1,4,8", help="reader threads for batch_get_into")
    p.add_argument("--streams", default="1,4", help="parallel connections of the raw TCP ceiling")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (the median is reported)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds any one run may take")
    p.add_argument("--name", default="remote_read_study")
    p.add_argument("--out-dir", default=None)
    args = p.parse_args(argv)
    os.environ.setdefault("MC_LOG_LEVEL", "WARNING")  # read at set-up; Mooncake's INFO lines would drown the table
    rb, n = args.record_bytes, args.records
    total = rb * n
    threads = sorted({int(t) for t in args.threads.split(",")})
    names = [f"study-remote-read-{i}" for i in range(n)]
    results, errors = [], []

    def fail(label: str, e: Exception) -> None:
        errors.append({"measurement": label, "error": f"{type(e).__name__}: {e}"})
        print(f"{label:44s} FAILED {type(e).__name__}: {e}", flush=True)

    def measure(label: str, fns: list, warm: list, nbytes: int = total, check=None) -> None:
        """Run ``warm``, then ``--repeats`` times, timed, ``fns`` (each in its own thread, all at once), then
        ``check``; the median time counts (a shared machine's other jobs hit single runs)."""
        try:
            run_bounded(warm, args.timeout, f"{label} warm-up")
            each = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                run_bounded(fns, args.timeout, label)
                each.append(time.perf_counter() - t0)
            if check is not None:
                check()
        except Exception as e:
            return fail(label, e)
        s = statistics.median(each)
        results.append({"measurement": label, "bytes": nbytes, "seconds": s, "gb_per_s": nbytes / s / 1e9,
                        "seconds_each": each})
        print(f"{label:44s} {nbytes / 1e9:7.3f} GB {s:8.3f} s {nbytes / s / 1e9:7.2f} GB/s", flush=True)

    tmp = tempfile.mkdtemp(prefix="longseq-remote-study-")
    master, pool, clients = LocalMaster(tmp), None, []
    buf = np.zeros((n, rb), dtype=np.uint8)
    base, everything = buf.ctypes.data, list(range(n))
    try:
        master.start()
        # Headroom over the records: the pool allocates in its own slab sizes.
        pool = LocalPoolNode(master, int(total * 1.25) + 256 * MIB, tmp)
        clients += run_bounded([lambda: open_client(master, args.chunk * rb + 64 * MIB, base, buf.nbytes)], 60,
                               "client set-up")
        c0 = clients[0]
        buf[:] = np.random.default_rng(0).integers(0, 256, rb, dtype=np.uint8)
        buf[:, :8] = np.arange(n, dtype="<u8").view(np.uint8).reshape(n, 8)
        run_bounded([lambda: transfer(c0.batch_put_from, names, everything, base, rb, args.chunk, 0)],
                    args.timeout, "put")
        buf[:] = 0
        run_bounded([lambda: transfer(c0.batch_get_into, names, everything, base, rb, args.chunk, rb)],
                    args.timeout, "warm-up")
        check_headers(buf, everything)

        measure("per-record get_size+get", [lambda: read_per_record(c0, names, rb)],
                [lambda: read_per_record(c0, names[:args.chunk], rb)])
        measure(f"get_batch x{args.chunk}", [lambda: read_get_batch(c0, names, rb, args.chunk)],
                [lambda: read_get_batch(c0, names[:args.chunk], rb, args.chunk)])
        try:
            # The binding is documented thread-safe, but threads may still serialise on one client's locks or
            # transfer engine: a client per thread shows whether they do.
            for _ in range(max(threads) - 1):
                clients += run_bounded([lambda: open_client(master, 16 * MIB, base, buf.nbytes)], 60, "set-up")
        except Exception as e:
            fail("extra client set-up", e)
        for mode in ("shared client", "client per thread"):
            for t in threads:
                if mode == "client per thread" and (t == 1 or len(clients) < t):
                    continue  # one thread: the same as on the shared client
                parts = [[int(i) for i in a] for a in np.array_split(np.arange(n), t)]
                who = clients[:t] if mode == "client per thread" else [c0] * t
                fns = [lambda c=c, ix=ix: transfer(c.batch_get_into, names, ix, base, rb, args.chunk, rb)
                       for c, ix in zip(who, parts)]
                warm = [lambda c=c, ix=ix: transfer(c.batch_get_into, names, ix[:args.chunk], base, rb, args.chunk,
                                                    rb) for c, ix in zip(who, parts)]
                buf[:] = 0
                measure(f"batch_get_into x{args.chunk}, {t} thr, {mode}", fns, warm,
                        check=lambda: check_headers(buf, everything))
        for s in sorted({int(x) for x in args.streams.split(",")}):
            measure(f"raw TCP loopback, {s} stream(s)", [lambda s=s: raw_tcp(total, s, rb, args.timeout)],
                    [lambda s=s: raw_tcp(64 * MIB, s, rb, args.timeout)], nbytes=total - total % s)
        dst = np.empty_like(buf)
        measure("numpy memcpy, 1 thread", [lambda: np.copyto(dst, buf)], [lambda: np.copyto(dst, buf)])
        del dst
    finally:
        for i, c in enumerate(clients):
            try:
                run_bounded([lambda c=c: (c.unregister_buffer(base), c.close())], 30, f"client {i} close")
            except Exception as e:
                print(f"client {i} close: {type(e).__name__}: {e}", flush=True)
        if pool is not None:
            pool.stop()
        master.stop()
        shutil.rmtree(tmp, ignore_errors=True)

    print(f"\n{'measurement':44s} {'GB':>7s} {'s':>8s} {'GB/s':>7s}")
    for r in results:
        print(f"{r['measurement']:44s} {r['bytes'] / 1e9:7.3f} {r['seconds']:8.3f} {r['gb_per_s']:7.2f}")
    payload = {"env": environment(), "command": command_line(),
               "config": {"records": n, "record_bytes": rb, "chunk": args.chunk, "threads": threads,
                          "transport": "tcp, 127.0.0.1, P2PHANDSHAKE; reader clients lend no memory",
                          "clients": "shared: one client for all threads; per thread: one client each, "
                                     "each registering the same buffer",
                          "repeats": args.repeats, "cpus": os.cpu_count(),
                          "mooncake_env": {k: v for k, v in os.environ.items() if k.startswith("MC_")}},
               "results": results, "errors": errors}
    print("wrote", write_result(args.name, payload, args.out_dir))


if __name__ == "__main__":
    main()
