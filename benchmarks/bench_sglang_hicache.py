"""Time to first token (TTFT) of a long prompt whose KV comes back from SGLang's HiCache storage tier (L3) after
``flush_cache()``: longseq's storage backend vs SGLang's own ``file`` backend vs recomputing it (issue 22,
item 3). SGLang 0.5.15 on one H100/H200 (scripts/gpu/sglang_*.sh).

Model and engine as ``bench_sglang_decode`` (Llama-3.1-8B shape, dummy weights, bf16, token-id prompts, decode
graphs only) with the ``--attention-backend`` (default ``triton``; SGLang's Hopper default ``fa3`` needs the optional
parts of scripts/gpu/make_sglang_fa3_parts.sh) and ``--page-size`` (default 64: one stored object per 64 tokens, 8 MiB here, in every configuration;
SGLang's HiCache examples use 64). One engine
process per configuration:
  recompute  no hierarchical cache: after the flush the whole prompt is prefilled again
  file       ``enable_hierarchical_cache``, ``hicache_storage_backend="file"`` (its folder: a fresh temp dir through
             SGLANG_HICACHE_FILE_BACKEND_STORAGE_DIR)
  ours       ``enable_hierarchical_cache``, ``hicache_storage_backend="dynamic"`` with ``LongSeqHiCacheStorage``
             (``interface_v1``; a DRAM tier of ``--cpu-gib`` and a disk tier in a fresh temp dir, as
             tests/gpu/test_sglang_gpu.py)
  ours-disk  ours without the DRAM tier: the pages come back from its disk files, as ``file``'s do
Every storage configuration uses ``hicache_storage_prefetch_policy="wait_complete"`` (the request waits for the
whole prefix, so the time is a full reload, never a partly recomputed one) and SGLang's default write-through.

Method, in each engine, for one prompt of ``--context`` random tokens (the same for every configuration):
  cold       ``generate(max_new_tokens=1)`` of the new prompt: TTFT with a full prefill
  gpu_hit    the same again: SGLang's GPU radix-cache hit
  (storage)  wait until the backend's folder holds the prompt's pages (``*.bin`` files for ``file``, ``*.kvb`` block
             files for ours) and their count stopped growing: a flush while they are written would cancel backups
  after_flush  ``--repeats`` x [``flush_cache()`` (GPU radix cache and host pool emptied; L3 keeps its pages), the
             same prompt again]: TTFT with the prefix loaded from the storage backend (recompute: prefilled again;
             the flush also empties torch's allocator cache, alike in every configuration)
Each time is the wall clock of one synchronous ``Engine.generate``. The tokens SGLang reports as loaded from storage
(``meta_info["cached_tokens_details"]``) are recorded with each reload. ``--cold-files`` drops the storage
files from the OS page cache before each reload (otherwise ``file`` and ``ours-disk`` read recently written,
cached files); ours reads its DRAM tier first anyway.

    python -m benchmarks.bench_sglang_hicache            # 32K prompt, 4 engines (estimated 4-6 min, H100)
    python -m benchmarks.bench_sglang_hicache --quick    # 4K prompt, 1 repeat (smoke run)
Writes benchmarks/results/<name>.json after every configuration and prints the table with the speed-ups.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
import traceback

from benchmarks.common import command_line, shape_model, write_result
from benchmarks.sglang_common import (
    add_run_args,
    base_kwargs,
    child_env,
    finish,
    flush,
    generate,
    run_environment,
    run_in_budget,
    server_summary,
)

CONFIGS = ("recompute", "file", "ours", "ours-disk")
SUFFIX = {"file": ".bin", "ours": ".kvb", "ours-disk": ".kvb"}  # one file per stored page
WARM_TOKENS = 512


def storage_files(folder: str, suffix: str) -> list[str]:
    return [os.path.join(d, f) for d, _, files in os.walk(folder) for f in files if f.endswith(suffix)]


def wait_for_files(folder: str, suffix: str, want: int, timeout: float, settle: float = 2.0) -> dict:
    """Until ``folder`` holds at least ``want`` files ending in ``suffix`` and their count has not changed for
    ``settle`` seconds (written files are renamed into place, so a counted file is complete)."""
    t0 = time.monotonic()
    count, last, since = 0, -1, t0
    while time.monotonic() - t0 < timeout:
        count = len(storage_files(folder, suffix))
        if count != last:
            last, since = count, time.monotonic()
        elif count >= want and time.monotonic() - since >= settle:
            return {"files": count, "wait_s": time.monotonic() - t0}
        time.sleep(0.2)
    raise TimeoutError(f"{folder}: {count} {suffix} files after {timeout:.0f} s, expected >= {want}")


def engine_kwargs(args) -> dict:
    # KV pool: the prompt twice over; SGLang's host pool (L2) is twice the device pool (its default hicache_ratio)
    kw = base_kwargs(args.model_dir, args.attention_backend, args.page_size, min(131072, args.context + 4096),
                     2 * args.context + 8192, 1)
    if args.config == "recompute":
        return kw
    kw.update(enable_hierarchical_cache=True, hicache_storage_prefetch_policy="wait_complete")
    if args.config == "file":
        kw["hicache_storage_backend"] = "file"  # its folder comes from the environment (main)
    else:
        cpu_gib = args.cpu_gib if args.config == "ours" else 0
        disk_gib = max(2 * args.cpu_gib, 16)
        extra = {"backend_name": "longseq", "module_path": "longseq.kv_offload.sglang",
                 "class_name": "LongSeqHiCacheStorage", "interface_v1": 1, "cpu_gib": cpu_gib,
                 "disk_dir": args.storage_dir, "disk_gib": disk_gib,
                 "write_queue_gib": disk_gib}  # SGLang backs up the whole prompt in one burst
        kw.update(hicache_storage_backend="dynamic", hicache_storage_backend_extra_config=json.dumps(extra))
    return kw


def child(args) -> None:
    """One engine (``args.config``): prints ``RESULT <json>``."""
    from sglang.srt.entrypoints.engine import Engine

    out: dict = {"config": args.config}
    engine, t0 = None, time.perf_counter()
    try:  # every failure, start-up included, ends in the RESULT line with its error and what was measured
        engine = Engine(**engine_kwargs(args))
        out["startup_s"] = time.perf_counter() - t0
        rng = random.Random(1)
        warm = [[rng.randrange(100, 30000) for _ in range(WARM_TOKENS)]]
        for _ in range(2):  # first-call costs (JIT, allocator) and the cached path, untimed
            generate(engine, warm, 1)
        prompt = [[rng.randrange(100, 30000) for _ in range(args.context)]]
        out["cold_s"] = generate(engine, prompt, 1)[0]
        out["gpu_hit_s"], meta = generate(engine, prompt, 1)
        out["gpu_hit_cached_tokens"] = meta[0].get("cached_tokens")
        if args.config != "recompute":
            # SGLang stores whole pages of what it cached (the warm-up prompt's too): at least one page less than
            # each prompt's, whether a page is one file or two
            want = max(1, args.context // args.page_size - 1) + max(0, WARM_TOKENS // args.page_size - 1)
            out["stored"] = wait_for_files(args.storage_dir, SUFFIX[args.config], want, args.store_timeout)
            print(f"[{args.config}] stored {out['stored']}", file=sys.stderr, flush=True)
        out.update(after_flush_s=[], flushes=[], after_flush_meta=[])
        for _ in range(args.repeats):
            out["flushes"].append(flush(engine))
            if not out["flushes"][-1]["success"]:
                raise RuntimeError("flush_cache() kept failing: the next run would be a GPU hit")
            if args.cold_files and args.config != "recompute":
                from benchmarks.bench_kv_offload import drop_page_cache

                drop_page_cache(storage_files(args.storage_dir, SUFFIX[args.config]))
            t, meta = generate(engine, prompt, 1)
            out["after_flush_s"].append(t)
            out["after_flush_meta"].append(json.loads(json.dumps(meta[0], default=str)))
        out["after_flush_median_s"] = statistics.median(out["after_flush_s"])
        details = [m.get("cached_tokens_details") or {} for m in out["after_flush_meta"]]
        out["storage_tokens"] = [d.get("storage") if isinstance(d, dict) else None for d in details]
        print(f"[{args.config}] cold {out['cold_s']:.3f} s, GPU hit {out['gpu_hit_s']:.3f} s, after flush "
              f"{out['after_flush_s']} s, storage tokens {out['storage_tokens']}", file=sys.stderr, flush=True)
        out["server"] = server_summary(engine)
    except Exception as e:  # noqa: BLE001 - recorded with what was measured before it
        out["error"] = f"{type(e).__name__}: {e}"
        traceback.print_exc()
    finally:
        finish(engine, out)


def table_of(runs: dict) -> list[dict]:
    """Per configuration: its times, and the speed-up of its after-flush TTFT over recompute's and over file's."""
    def base(name):
        return runs.get(name, {}).get("after_flush_median_s")

    rows = []
    for config, r in runs.items():
        t = r.get("after_flush_median_s")
        rows.append({"config": config, "cold_s": r.get("cold_s"), "gpu_hit_s": r.get("gpu_hit_s"), "after_flush_s": t,
                     "storage_tokens": min(r.get("storage_tokens") or [None], key=lambda x: x or 0),
                     "speedup_vs_recompute": base("recompute") / t if t and base("recompute") else None,
                     "speedup_vs_file": base("file") / t if t and base("file") else None, "error": r.get("error")})
    return rows


def print_table(table: list[dict]) -> None:
    fmt = lambda x, p: "-" if x is None else f"{x:.{p}f}"  # noqa: E731
    print("| config | cold TTFT s | GPU hit s | after flush s | tokens from storage | x recompute | x file |\n"
          "|---|---|---|---|---|---|---|")
    for r in table:
        print(f"| {r['config']} | {fmt(r['cold_s'], 3)} | {fmt(r['gpu_hit_s'], 3)} | {fmt(r['after_flush_s'], 3)} | "
              f"{r['storage_tokens'] if r['storage_tokens'] is not None else '-'} | "
              f"{fmt(r['speedup_vs_recompute'], 2)} | {fmt(r['speedup_vs_file'], 2)} |"
              + (f" error: {r['error'][:160]}" if r["error"] else ""))


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_sglang_hicache",
                                description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--context", type=int, default=32768, help="prompt tokens")
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"any of {', '.join(CONFIGS)}")
    p.add_argument("--repeats", type=int, default=3, help="flush + reload rounds (median)")
    p.add_argument("--attention-backend", default="triton")
    p.add_argument("--page-size", type=int, default=64)
    p.add_argument("--cpu-gib", type=float, default=8.0, help="ours: DRAM tier (GiB); the disk tier gets max(2x, 16)")
    p.add_argument("--disk-parent", default=None, help="folder for the storage folders (default: the temp dir)")
    p.add_argument("--cold-files", action="store_true",
                   help="drop the storage files from the page cache before each reload")
    p.add_argument("--store-timeout", type=float, default=120, help="seconds to wait for the pages to be stored")
    p.add_argument("--quick", action="store_true", help="4K prompt, 1 repeat (smoke run)")
    add_run_args(p, name="sglang_hicache", timeout=240, unit="configuration")
    p.add_argument("--config", default=None, help=argparse.SUPPRESS)
    p.add_argument("--storage-dir", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.context, args.repeats = 4096, 1
    args.configs = [c for c in args.configs.split(",") if c]
    if not args.configs or not set(args.configs) <= set(CONFIGS):
        p.error(f"--configs: a list of {', '.join(CONFIGS)}")
    if args.repeats < 1 or args.context // args.page_size < 2:
        p.error("--repeats must be >= 1 and --context at least two pages")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.child:
        return child(args)
    started = time.monotonic()  # --budget counts from here (job.sh's clock started a moment before)
    args.model_dir = shape_model(args)
    env_info = run_environment()
    runs: dict = {}
    for config in args.configs:
        folder = tempfile.mkdtemp(prefix=f"longseq-hicache-{config}-", dir=args.disk_parent)
        env = {"SGLANG_HICACHE_FILE_BACKEND_STORAGE_DIR": folder} if config == "file" else {}
        child_args = ["--config", config, "--model-dir", args.model_dir, "--context", str(args.context),
                      "--repeats", str(args.repeats), "--attention-backend", args.attention_backend,
                      "--page-size", str(args.page_size), "--cpu-gib", str(args.cpu_gib),
                      "--store-timeout", str(args.store_timeout), "--storage-dir", folder,
                      *(["--cold-files"] if args.cold_files else [])]
        runs[config] = run_in_budget(args, started, "benchmarks.bench_sglang_hicache", child_args, child_env(env),
                                     config)
        shutil.rmtree(folder, ignore_errors=True)
        r = runs[config]
        print(f"{config}: " + (f"error {r['error']}" if "error" in r else
              f"cold {r['cold_s']:.3f} s, GPU hit {r['gpu_hit_s']:.3f} s, after flush "
              f"{r['after_flush_median_s']:.3f} s (storage tokens {r['storage_tokens']})"), flush=True)
        table = table_of(runs)
        path = write_result(args.name, {
            "benchmark": "sglang_hicache", "command": command_line(), "env": env_info,
            "inputs": {"shape": args.shape, "context": args.context, "configs": args.configs, "repeats": args.repeats,
                       "attention_backend": args.attention_backend, "page_size": args.page_size,
                       "cpu_gib": args.cpu_gib, "cold_files": args.cold_files, "quick": args.quick,
                       "prefetch_policy": "wait_complete"},
            "runs": runs, "table": table})
    print_table(table)
    print("wrote", path)
    failed = [c for c, r in runs.items() if "error" in r]
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
