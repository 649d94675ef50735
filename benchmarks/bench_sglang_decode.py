"""Decode time per output token (TPOT) of SGLang's offline ``Engine``: SGLang's own attention backends vs
longseq's (issue 22, item 3). SGLang 0.5.15 on one H100/H200 (scripts/gpu/sglang_*.sh).

Model: Llama-3.1-8B shape, dummy weights (``load_format="dummy"``; the shape-only folder of
``benchmarks/bench_vllm_decode.py``: a config.json next to SmolLM2's tokenizer files), bf16, no tokenizer
(``skip_tokenizer_init``: prompts are token ids, the borrowed tokenizer never decodes the 128K-vocab ids),
page size 16 for every backend (``longseq_sparse`` needs a multiple of its 8-token pages; one size for all so
runs differ only in attention), radix cache on, decode CUDA graphs on (SGLang's default ``full`` decode graphs,
captured up to the largest batch), prefill graphs off (as the vLLM bench's FULL_DECODE_ONLY). Each backend runs
in its own engine process (``common.run_child``), GPU memory freed between them:
  baselines  ``--baselines`` (SGLang's ``fa3``, its Hopper default: its library comes in optional parts,
             scripts/gpu/make_sglang_fa3_parts.sh; ``triton``; ``flashinfer``)
  ours       ``longseq_sparse`` (LONGSEQ_SPARSE_* defaults: budget 2048), ``longseq_duo`` (random pattern with 50%
             of the KV heads streaming, sink 64 / recent 256: the speed depends on how many heads stream, not
             which; docs/benchmarks/duo.md), ``longseq_dense`` (wraps ``triton``: its ratio to ``triton`` is the
             wrapper's cost)
The first baseline runs first, then ours, then the other baselines (a slow FlashInfer JIT build cannot starve ours).

Method, per (context, batch), the same random-token prompts for every backend (contexts as the vLLM bench's:
129024 = 126K, so prompt + decode fits the 131072-token context):
  1. cold ``generate(max_new_tokens=1)``: the whole prefill (``prefill_s``); the prompts are now in the radix cache
  2. one untimed ``generate(SHORT)`` (this batch size's decode graph and the cached path warmed)
  3. ``--repeats`` x [``generate(SHORT)``, ``generate(LONG)``], wall clock of each synchronous call
  TPOT = (median t_LONG - median t_SHORT) / (LONG - SHORT); defaults 16 and 144, i.e. 128 decode steps.
Why a difference of two generations: both calls pay the same fixed costs (the request's round trip through
SGLang's tokenizer manager and scheduler, the prefix match, the extend of the last partial page, the first token,
the overlap scheduler filling its pipeline), so the difference holds decode steps only; it stays right even
where a prefix were not reused (both calls would pay the same prefill, only noisier). SHORT > 1 keeps the first
decode steps out too. ``cached_tokens`` of the timed calls is recorded to show they hit the cache; throughput =
batch / TPOT. Our backends' trace files (LONGSEQ_TRACE_DIR) show they were built and captured. ``--budget`` keeps
the whole run inside scripts/gpu/job.sh's 540 s (a backend that would start too late is recorded as not run).

    python -m benchmarks.bench_sglang_decode            # 129024x1,32768x8, 5 engines (estimated 7-9 min, H100)
    python -m benchmarks.bench_sglang_decode --quick    # 8192x1,4096x4, 1 repeat (smoke run)
    python -m benchmarks.bench_sglang_decode --baselines fa3 --ours longseq_sparse --profile-steps 32
        # also GPU kernel time per step by kernel, after each shape's timing (SGLang's profiler)
Writes benchmarks/results/<name>.json after every backend (a killed run keeps what finished) and prints the table
with each TPOT's ratio to each baseline. A backend that fails is recorded with its error; the exit status is then 1.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import traceback

from benchmarks.common import command_line, env_settings, shape_model, write_result
from benchmarks.sglang_common import (
    add_run_args,
    base_kwargs,
    child_env,
    finish,
    flush,
    generate,
    profile_decode,
    run_environment,
    run_in_budget,
    server_summary,
)

OURS = "longseq_sparse,longseq_duo,longseq_dense"
#: LONGSEQ_* settings per backend (the backend name selects the technique in SGLang).
OUR_ENV = {"longseq_duo": {"LONGSEQ_DUO_PATTERN": "random", "LONGSEQ_DUO_SPARSITY": "0.5"}}


def shapes_of(text: str) -> list[tuple[int, int]]:
    return [tuple(int(x) for x in s.split("x")) for s in text.split(",") if s]


def engine_kwargs(args) -> dict:
    shapes = shapes_of(args.shapes)
    batch = max(b for _, b in shapes)
    # KV pool: the largest case's prompts and decode tokens plus the warm-up (same for every backend; a smaller
    # pool also keeps longseq_sparse's page summaries, allocated after SGLang sizes its pool, well inside memory).
    pool = max(b * (c + args.long_tokens + 2 * args.page_size) for c, b in shapes) + 8192
    kw = base_kwargs(args.model_dir, args.backend, args.page_size, args.context_length, pool, batch)
    if args.mem_fraction_static:
        kw["mem_fraction_static"] = args.mem_fraction_static
    return kw


def child(args) -> None:
    """One engine (``args.backend``), every shape: prints ``RESULT <json>``."""
    import random

    from sglang.srt.entrypoints.engine import Engine

    out: dict = {"backend": args.backend, "rows": []}
    engine, t0 = None, time.perf_counter()
    try:  # every failure, start-up included, ends in the RESULT line with its error and what was measured
        engine = Engine(**engine_kwargs(args))
        out["startup_s"] = time.perf_counter() - t0
        rng = random.Random(7)
        warm = [[rng.randrange(100, 30000) for _ in range(64)]]
        generate(engine, warm, args.long_tokens)  # first-call costs (allocator, JIT of extend kernels) untimed
        for ctx, batch in shapes_of(args.shapes):
            row = {"context": ctx, "batch": batch}
            try:
                rng = random.Random(ctx * 100 + batch)
                prompts = [[rng.randrange(100, 30000) for _ in range(ctx)] for _ in range(batch)]
                row["prefill_s"] = generate(engine, prompts, 1)[0]
                generate(engine, prompts, args.short_tokens)
                short, long_ = [], []
                for _ in range(args.repeats):  # interleaved, so a drift hits both alike
                    short.append(generate(engine, prompts, args.short_tokens)[0])
                    t, meta = generate(engine, prompts, args.long_tokens)
                    long_.append(t)
                tpot = (statistics.median(long_) - statistics.median(short)) / (args.long_tokens - args.short_tokens)
                row.update(t_short_s=short, t_long_s=long_, tpot_ms=tpot * 1e3, throughput_tok_s=batch / tpot,
                           cached_tokens=[m.get("cached_tokens") for m in meta])
                print(f"[{args.backend}] {ctx}x{batch}: TPOT {tpot * 1e3:.2f} ms, prefill {row['prefill_s']:.2f} s, "
                      f"cached {min(row['cached_tokens'])}", file=sys.stderr, flush=True)
                if args.profile_steps:
                    try:
                        row["kernels_per_step"] = profile_decode(engine, prompts, args.profile_steps)
                    except Exception as e:  # noqa: BLE001 - the timing above stands without the profile
                        row["profile_error"] = f"{type(e).__name__}: {e}"
            except Exception as e:  # noqa: BLE001 - recorded; the next shape may still run
                row["error"] = f"{type(e).__name__}: {e}"
                print(f"[{args.backend}] {ctx}x{batch}: {row['error']}", file=sys.stderr, flush=True)
            out["rows"].append(row)
            row["flush"] = flush(engine)  # the next shape starts from an empty radix cache
        out["server"] = server_summary(engine)
        trace_dir = os.environ.get("LONGSEQ_TRACE_DIR")
        if trace_dir and os.path.isdir(trace_dir):
            out["traces"] = [json.load(open(os.path.join(trace_dir, f))) for f in sorted(os.listdir(trace_dir))
                             if f.endswith(".json")]
    except Exception as e:  # noqa: BLE001 - recorded with the shapes measured before it
        out["error"] = f"{type(e).__name__}: {e}"
        traceback.print_exc()
    finally:
        finish(engine, out)


def table_of(runs: dict, baselines: list[str]) -> list[dict]:
    """One row per (backend, shape) that has a TPOT, with its ratio to each baseline's TPOT at that shape."""
    base = {(b, r["context"], r["batch"]): r["tpot_ms"] for b in baselines
            for r in runs.get(b, {}).get("rows", []) if "tpot_ms" in r}
    rows = []
    for backend, res in runs.items():
        for r in res.get("rows", []):
            row = {"backend": backend, "context": r["context"], "batch": r["batch"], "tpot_ms": r.get("tpot_ms"),
                   "throughput_tok_s": r.get("throughput_tok_s"), "prefill_s": r.get("prefill_s"),
                   "error": r.get("error")}
            if row["tpot_ms"] is not None:
                row["tpot_ratio"] = {b: row["tpot_ms"] / base[(b, r["context"], r["batch"])] for b in baselines
                                     if (b, r["context"], r["batch"]) in base}
                row["throughput_ratio"] = {b: 1 / x for b, x in row["tpot_ratio"].items()}
            rows.append(row)
    return rows


def print_table(table: list[dict], runs: dict, baselines: list[str]) -> None:
    fmt = lambda x, p: "-" if x is None else f"{x:.{p}f}"  # noqa: E731
    print("| backend | context x batch | TPOT ms | tok/s | prefill s | " + " | ".join(f"TPOT / {b}" for b in baselines)
          + " |\n|---|---|---|---|---|" + "---|" * len(baselines))
    for r in table:
        ratios = " | ".join(fmt(r.get("tpot_ratio", {}).get(b), 3) for b in baselines)
        print(f"| {r['backend']} | {r['context']}x{r['batch']} | {fmt(r['tpot_ms'], 2)} | "
              f"{fmt(r['throughput_tok_s'], 1)} | {fmt(r['prefill_s'], 2)} | {ratios} |"
              + (f" error: {r['error'][:120]}" if r["error"] else ""))
    for backend, res in runs.items():
        if "error" in res:
            print(f"| {backend} | failed: {res['error'][:200]} |")


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_sglang_decode",
                                description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="129024x1,32768x8", help="CONTEXTxBATCH list")
    p.add_argument("--baselines", default="triton,flashinfer", help="SGLang attention backends to compare against")
    p.add_argument("--ours", default=OURS, help="longseq backends to time (empty: none)")
    p.add_argument("--longseq-env", default="", help="extra K=V,K=V for every longseq backend's engine")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--short-tokens", type=int, default=16)
    p.add_argument("--long-tokens", type=int, default=144)
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--context-length", type=int, default=131072)
    p.add_argument("--mem-fraction-static", type=float, default=None, help="default: SGLang's choice")
    p.add_argument("--quick", action="store_true", help="8192x1,4096x4, 1 repeat, 8 and 40 tokens (smoke run)")
    p.add_argument("--profile-steps", type=int, default=0,
                   help="after timing each shape, profile this many steps (SGLang's profiler): GPU kernel time per "
                        "step by kernel, in the result file (the first step is a short extend)")
    add_run_args(p, name="sglang_decode", timeout=300, unit="backend")
    p.add_argument("--backend", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.shapes, args.repeats, args.short_tokens, args.long_tokens = "8192x1,4096x4", 1, 8, 40
    if args.long_tokens <= args.short_tokens or args.repeats < 1:
        p.error("--long-tokens must exceed --short-tokens, and --repeats be >= 1")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.child:
        return child(args)
    started = time.monotonic()  # --budget counts from here (job.sh's clock started a moment before)
    args.model_dir = shape_model(args, max(131072, args.context_length))
    baselines = [b for b in args.baselines.split(",") if b]
    ours = [b for b in args.ours.split(",") if b]
    order = baselines[:1] + ours + baselines[1:]
    if not order:
        sys.exit("nothing to run: --baselines and --ours are both empty")
    extra = env_settings(args.longseq_env)
    env_info = run_environment()
    runs: dict = {}
    for backend in order:
        trace_dir = tempfile.mkdtemp(prefix="longseq-trace-")  # our backends' call counts (proof they ran)
        env = {**OUR_ENV.get(backend, {}), **extra, "LONGSEQ_TRACE_DIR": trace_dir} if backend in ours else {}
        child_args = ["--backend", backend, "--model-dir", args.model_dir, "--shapes", args.shapes,
                      "--repeats", str(args.repeats), "--short-tokens", str(args.short_tokens),
                      "--long-tokens", str(args.long_tokens), "--page-size", str(args.page_size),
                      "--context-length", str(args.context_length), "--profile-steps", str(args.profile_steps),
                      *(["--mem-fraction-static", str(args.mem_fraction_static)] if args.mem_fraction_static
                        else [])]
        runs[backend] = run_in_budget(args, started, "benchmarks.bench_sglang_decode", child_args, child_env(env),
                                      backend)
        if not runs[backend].get("error", "").startswith("not run"):
            runs[backend]["longseq_env"] = env
        shutil.rmtree(trace_dir, ignore_errors=True)
        res = runs[backend]
        print(f"{backend}: " + "; ".join(f"{r['context']}x{r['batch']} " + (
            f"TPOT {r['tpot_ms']:.2f} ms ({r['throughput_tok_s']:.1f} tok/s)" if "tpot_ms" in r else r.get("error", ""))
            for r in res.get("rows", [])) + (f" error: {res['error']}" if "error" in res else ""), flush=True)
        table = table_of(runs, baselines)
        path = write_result(args.name, {
            "benchmark": "sglang_decode", "command": command_line(), "env": env_info,
            "inputs": {"shape": args.shape, "shapes": shapes_of(args.shapes), "baselines": baselines, "ours": ours,
                       "repeats": args.repeats, "short_tokens": args.short_tokens, "long_tokens": args.long_tokens,
                       "page_size": args.page_size, "context_length": args.context_length, "quick": args.quick,
                       "profile_steps": args.profile_steps,
                       "decode_cuda_graphs": "full (SGLang default)", "prefill_cuda_graphs": False,
                       "our_env": {b: OUR_ENV.get(b, {}) for b in ours}, "longseq_env": extra},
            "runs": runs, "table": table})
    print_table(table, runs, baselines)
    print("wrote", path)
    failed = [b for b, r in runs.items() if "error" in r or any("error" in x for x in r.get("rows", []))]
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
