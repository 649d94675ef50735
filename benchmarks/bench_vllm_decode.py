"""Time per output token (TPOT) and time to first token (TTFT) of a longseq mode vs vLLM's default backend.

Both run in the same invocation, each in its own engine process, on a shape-only model (random weights,
``load_format="dummy"``). Method: prefix caching on; per context and batch, a cold run
with ``max_tokens=1`` gives TTFT (the whole prefill); then, with the prompts cached, the median of
``max_tokens=1`` and of ``max_tokens=257`` runs; TPOT = (t257 - t1) / 256. Each time is the wall clock
of one synchronous ``LLM.generate`` call (it returns after the GPU finished), after a warm-up call.

Example (GPU machine):
    python -m benchmarks.bench_vllm_decode --contexts 8192,32768,129024 --batches 1 --mode dense
Writes benchmarks/results/<name>.json and prints the table for docs/benchmarks/<technique>.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

from benchmarks.common import greedy_ids_params, run_child


def child(args) -> None:
    """One engine, every (context, batch): prints a JSON line with the timings."""
    import random

    from vllm import LLM
    from vllm.inputs import TokensPrompt

    kwargs = dict(model=args.model_dir, load_format="dummy", dtype="bfloat16", enable_prefix_caching=True,
                  max_model_len=args.max_model_len, gpu_memory_utilization=args.gpu_memory_utilization,
                  max_num_seqs=max(b for _, b in cases(args)), seed=0,
                  compilation_config={"mode": 0, "cudagraph_mode": args.cudagraph_mode})
    if args.backend != "default":
        kwargs["attention_config"] = {"backend": args.backend}
    t0 = time.perf_counter()
    llm = LLM(**kwargs)
    startup = time.perf_counter() - t0
    one, many = greedy_ids_params(1), greedy_ids_params(args.decode_tokens + 1)

    def timed(prompts, params) -> float:
        t = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)
        return time.perf_counter() - t

    warm = [TokensPrompt(prompt_token_ids=[random.Random(7).randrange(100, 30000) for _ in range(64)])]
    timed(warm, many)  # warm-up: first-call costs (allocator, sampler) out of the measurements
    rows = []
    for ctx, batch in cases(args):
        rng = random.Random(ctx * 100 + batch)
        prompts = [TokensPrompt(prompt_token_ids=[rng.randrange(100, 30000) for _ in range(ctx)])
                   for _ in range(batch)]
        ttft = timed(prompts, one)
        t1 = [timed(prompts, one) for _ in range(args.repeats)]
        tn = [timed(prompts, many) for _ in range(args.repeats)]
        tpot = (statistics.median(tn) - statistics.median(t1)) / args.decode_tokens
        rows.append({"context": ctx, "batch": batch, "ttft_s": ttft, "t1_s": t1, "t_many_s": tn,
                     "tpot_ms": tpot * 1e3, "throughput_tok_s": batch / tpot})
        print(f"[{args.backend}] ctx={ctx} batch={batch} ttft={ttft:.3f}s tpot={tpot * 1e3:.2f}ms",
              file=sys.stderr, flush=True)
        if args.profile_steps:
            profiled = greedy_ids_params(args.profile_steps + 1)
            rows[-1]["kernels_per_step"] = profile_kernels(lambda: timed(prompts, profiled), args.profile_steps)
    kv_blocks = getattr(llm.llm_engine.vllm_config.cache_config, "num_gpu_blocks", None)
    print("RESULT " + json.dumps({"backend": args.backend, "startup_s": startup, "kv_blocks": kv_blocks,
                                  "rows": rows}), flush=True)


def profile_kernels(run, steps: int, top: int = 25) -> list[dict]:
    """GPU kernel time per decode step, by kernel name, of one ``run()`` with ``steps`` decode steps (torch
    profiler; the engine must run in this process: ``VLLM_ENABLE_V1_MULTIPROCESSING=0``). The prefill of a
    cached prompt and the first token are included once; with ``steps`` >> 1 they are a small share."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        run()
        torch.cuda.synchronize()
    rows = []
    for ev in prof.key_averages():
        dev_us = getattr(ev, "self_device_time_total", None)
        if dev_us is None:
            dev_us = getattr(ev, "self_cuda_time_total", 0.0)
        if dev_us > 0:
            rows.append({"kernel": ev.key[:120], "us_per_step": round(dev_us / steps, 2),
                         "calls_per_step": round(ev.count / steps, 2)})
    rows.sort(key=lambda r: -r["us_per_step"])
    total = sum(r["us_per_step"] for r in rows)
    # Host side: graph replays vs single launches tell whether decode ran in a CUDA graph; the busiest CPU ops
    # tell where a step's host time goes.
    host = sorted(((ev.self_cpu_time_total / steps, ev.count / steps, ev.key[:100]) for ev in prof.key_averages()
                   if ev.self_cpu_time_total > 0), reverse=True)
    for us, calls, key in host[:12]:
        print(f"[prof-host] {us:9.1f} us  x{calls:6.1f}  {key}", file=sys.stderr)
    print(f"[prof] profiled {steps} steps: {total:.0f} us of GPU kernels per step; top:", file=sys.stderr)
    for r in rows[:top]:
        print(f"[prof] {r['us_per_step']:9.1f} us  x{r['calls_per_step']:6.1f}  {r['kernel']}", file=sys.stderr)
    return [{"total_us_per_step": round(total, 1)}] + rows[:top]


def cases(args) -> list[tuple[int, int]]:
    """(context, batch) pairs: ``--cases``, else every context with every batch size."""
    if args.cases:
        return [tuple(int(x) for x in c.split("x")) for c in args.cases.split(",")]
    return [(c, b) for c in args.contexts for b in args.batches]


def run_backend(args, backend: str, env: dict) -> dict:
    child_args = ["--backend", backend, "--model-dir", args.model_dir,
                  "--contexts", ",".join(map(str, args.contexts)), "--batches", ",".join(map(str, args.batches)),
                  *(["--cases", args.cases] if args.cases else []), "--repeats", str(args.repeats),
                  "--decode-tokens", str(args.decode_tokens), "--max-model-len", str(args.max_model_len),
                  "--gpu-memory-utilization", str(args.gpu_memory_utilization),
                  "--cudagraph-mode", args.cudagraph_mode, "--profile-steps", str(args.profile_steps)]
    if args.profile_steps:
        env = {**env, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}  # the profiler must see the engine's GPU work
    # vLLM's own capacity line (issue 21 compares it between dense and LONGSEQ_DUO_MEMORY=1)
    return run_child("benchmarks.bench_vllm_decode", child_args, env, backend, grep="Maximum concurrency")


def plot(result: dict, path: str) -> str:
    """TPOT vs context (log2 x) per batch size, vLLM default and longseq, from a result file."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mode = result["inputs"]["mode"]
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for batch in sorted({r["batch"] for r in result["table"]}):
        rows = sorted((r for r in result["table"] if r["batch"] == batch), key=lambda r: r["context"])
        x = [r["context"] for r in rows]
        ax.plot(x, [r["default_tpot_ms"] for r in rows], "o--", label=f"vLLM default, batch {batch}")
        if rows and rows[0].get("variants"):
            for i, v in enumerate(rows[0]["variants"]):
                env = ",".join(f"{k.removeprefix('LONGSEQ_SPARSE_').lower()}={val}"
                               for k, val in v["longseq_env"].items())
                ax.plot(x, [r["variants"][i]["tpot_ms"] for r in rows], "o-", label=f"{mode} {env}, batch {batch}")
        else:
            ax.plot(x, [r["longseq_tpot_ms"] for r in rows], "o-", label=f"longseq {mode}, batch {batch}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("time per output token (ms)")
    ax.set_title(f"{result['inputs']['shape']}, {result['env'].get('device')}", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_vllm_decode",
                                description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    p.add_argument("--contexts", type=ints, default=[8192, 32768, 129024])
    p.add_argument("--batches", type=ints, default=[1])
    p.add_argument("--cases", default=None,
                   help="CTXxBATCH list instead of every (context, batch), e.g. 32768x1,129024x1,32768x8")
    p.add_argument("--skip-default", action="store_true", help="time only the longseq run (diagnostics)")
    p.add_argument("--longseq-env", action="append", default=None,
                   help="extra K=V,K=V environment of the longseq run; repeat it to time several longseq settings "
                        "(one engine each) against the same default run")
    p.add_argument("--mode", default="dense", help="LONGSEQ_ATTENTION for the longseq run")
    p.add_argument("--shape", default="llama-3.1-8b")
    p.add_argument("--model-dir", default=None, help="shape-only model folder (written if missing)")
    p.add_argument("--tokenizer-from", default=os.environ.get("LONGSEQ_TEST_MODEL"))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--decode-tokens", type=int, default=256)
    p.add_argument("--max-model-len", type=int, default=131072)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--cudagraph-mode", default="FULL_DECODE_ONLY")
    p.add_argument("--profile-steps", type=int, default=0,
                   help="after timing each case, profile this many decode steps: GPU kernel time per step by kernel")
    p.add_argument("--name", default=None,
                   help="results file name (default: vllm_decode_<mode>_<shape>; with --skip-default: only when given)")
    p.add_argument("--plot", default=None, metavar="RESULT_JSON", help="only draw <RESULT_JSON>.png from a result file")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--backend", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.child:
        return child(args)
    if args.plot:
        print(plot(json.load(open(args.plot)), args.plot[:-5] + ".png"))
        return
    from benchmarks.common import (command_line, env_settings, env_without_longseq, environment, shape_model,
                                   write_result)

    args.model_dir = shape_model(args, args.max_model_len)
    base_env = env_without_longseq("LONGSEQ_TEST_MODEL")
    extras = [env_settings(e) for e in (args.longseq_env or [""])]
    if args.skip_default:  # longseq settings only: each one's TPOT against the first setting's
        runs = []
        for extra in extras:
            runs.append(run_backend(args, "CUSTOM", {**base_env, "LONGSEQ_ATTENTION": args.mode, **extra}))
            print("RESULT-ONLY " + json.dumps({"longseq_env": extra, **runs[-1]}), flush=True)
        table = [{"context": row["context"], "batch": row["batch"], "variants": [
            {"longseq_env": extra, "tpot_ms": r["rows"][i]["tpot_ms"],
             "tpot_ratio_to_first": r["rows"][i]["tpot_ms"] / row["tpot_ms"]} for extra, r in zip(extras, runs)]}
            for i, row in enumerate(runs[0]["rows"])]
        for r in table:
            for v in r["variants"]:
                print(f"  {r['context']}x{r['batch']} {v['longseq_env']}: TPOT {v['tpot_ms']:.2f} ms, "
                      f"{v['tpot_ratio_to_first']:.3f}x the first setting's")
        if args.name:
            print("wrote", write_result(args.name, {
                "benchmark": "vllm_decode", "command": command_line(), "env": environment(),
                "inputs": {"mode": args.mode, "shape": args.shape, "cases": cases(args), "repeats": args.repeats,
                           "decode_tokens": args.decode_tokens, "cudagraph_mode": args.cudagraph_mode,
                           "compile_mode": 0, "profile_steps": args.profile_steps},
                "longseq_envs": extras, "default": None, "longseq_runs": runs, "table": table}))
        return
    default = run_backend(args, "default", {**base_env, "VLLM_PLUGINS": ""})  # vLLM alone, no plugin loaded
    runs = [run_backend(args, "CUSTOM", {**base_env, "LONGSEQ_ATTENTION": args.mode, **extra}) for extra in extras]
    ours = runs[0]
    table = []
    for i, d in enumerate(default["rows"]):
        o = ours["rows"][i]
        table.append({"context": d["context"], "batch": d["batch"],
                      "default_tpot_ms": d["tpot_ms"], "longseq_tpot_ms": o["tpot_ms"],
                      "tpot_ratio": o["tpot_ms"] / d["tpot_ms"],
                      "default_ttft_s": d["ttft_s"], "longseq_ttft_s": o["ttft_s"],
                      "ttft_ratio": o["ttft_s"] / d["ttft_s"]})
        if len(runs) > 1:  # every setting's TPOT against the same default run
            table[-1]["variants"] = [{"longseq_env": extra, "tpot_ms": r["rows"][i]["tpot_ms"],
                                      "tpot_ratio": r["rows"][i]["tpot_ms"] / d["tpot_ms"],
                                      "throughput_ratio": d["tpot_ms"] / r["rows"][i]["tpot_ms"]}
                                     for extra, r in zip(extras, runs)]
    name = args.name or f"vllm_decode_{args.mode}_{args.shape}"
    path = write_result(name, {"benchmark": "vllm_decode", "command": command_line(), "env": environment(),
                               "inputs": {"mode": args.mode, "shape": args.shape, "cases": cases(args), "repeats": args.repeats,
                                          "decode_tokens": args.decode_tokens,
                                          "cudagraph_mode": args.cudagraph_mode, "compile_mode": 0},
                               "longseq_envs": extras, "default": default, "longseq": ours,
                               **({"longseq_runs": runs} if len(runs) > 1 else {}), "table": table})
    print(f"| context | batch | default TPOT ms | longseq ({args.mode}) TPOT ms | ratio | default TTFT s | "
          "longseq TTFT s | ratio |\n|---|---|---|---|---|---|---|---|")
    for r in table:
        print(f"| {r['context']} | {r['batch']} | {r['default_tpot_ms']:.2f} | {r['longseq_tpot_ms']:.2f} | "
              f"{r['tpot_ratio']:.3f} | {r['default_ttft_s']:.3f} | {r['longseq_ttft_s']:.3f} | {r['ttft_ratio']:.3f} |")
    for r in table:
        for v in r.get("variants", []):
            print(f"  {r['context']}x{r['batch']} {v['longseq_env']}: TPOT {v['tpot_ms']:.2f} ms, ratio "
                  f"{v['tpot_ratio']:.3f} (throughput {v['throughput_ratio']:.2f}x)")
    for label, r in [("default", default)] + [(f"longseq {extra}", r) for extra, r in zip(extras, runs)]:
        print(f"  KV capacity, {label}: {r.get('kv_blocks')} blocks; {' | '.join(r.get('log_lines', [])) or '-'}")
    print("wrote", path)
    try:
        print("plot", plot(json.load(open(path)), path[:-5] + ".png"))
    except ImportError as e:
        print(f"no plot: {e}")


if __name__ == "__main__":
    main()
