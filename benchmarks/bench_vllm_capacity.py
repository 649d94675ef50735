"""Decode throughput at the largest batch each configuration fits: vLLM's default backend vs longseq settings.

For issue 21 (DuoAttention KV memory): with streaming heads keeping only sink + recent tokens, vLLM admits more
sequences at the same ``gpu_memory_utilization``; this measures what that buys in decode throughput.

Per configuration, one engine (in-process, ``VLLM_ENABLE_V1_MULTIPROCESSING=0``, on a shape-only model; ``--engine
mp`` runs the engine core in its own process as ``vllm serve`` does, so host work overlaps the GPU, and reads the
running count from vLLM's metrics and the capacity from its log line) and per context: vLLM's own capacity
estimate for a request of ``context + max_tokens`` tokens (``get_max_concurrency_for_kv_cache_config``, the
function behind its "Maximum concurrency" log line) is recorded,
and the batch is what vLLM admits (``--batch admitted``, the default): twice the estimate's distinct random prompts
are added at once and the engine is stepped until the requests its scheduler runs (its admission gate, its block
pool) all have a token and their number held for 3 steps; the others wait. ``--batch capacity`` adds the estimate,
rounded down, instead. Then ``warm`` more steps, then ``steps`` decode steps are timed (wall clock of
``LLMEngine.step``, which returns after the GPU finished the step): throughput = tokens produced / time. A window in
which any step produced fewer tokens than the batch (a preemption) is reported as such. Prefill is paid once and is
not in the window.
A context given as ``CTXxB`` runs a fixed batch ``B`` instead (``129024x1``: the time per output token at batch 1).

Example (GPU machine):
    python -m benchmarks.bench_vllm_capacity --contexts 32768,129024,129024x1 \
        --longseq-env LONGSEQ_ATTENTION=duo,LONGSEQ_DUO_PATTERN=random,LONGSEQ_DUO_MEMORY=1
Writes benchmarks/results/<name>.json and prints the table for docs/benchmarks/duo.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import sys
import time

from benchmarks.common import StackSampler, greedy_ids_params, run_child


def engine_capacity(llm, tokens: int) -> tuple[float, int]:
    """vLLM's maximum concurrency for requests of ``tokens`` tokens on this engine's KV cache (in-process engine),
    and the pool's number of blocks."""
    from vllm.v1.core.kv_cache_utils import get_max_concurrency_for_kv_cache_config

    core = llm.llm_engine.engine_core.engine_core  # InprocClient -> EngineCore
    vllm_config = llm.llm_engine.vllm_config
    model_config = vllm_config.model_config
    saved = model_config.max_model_len
    model_config.max_model_len = tokens  # the per-request size the capacity is asked for, as vLLM's log line does
    try:
        kv_cache_config = core.scheduler.kv_cache_config
        return (float(get_max_concurrency_for_kv_cache_config(vllm_config, kv_cache_config)),
                int(kv_cache_config.num_blocks))
    finally:
        model_config.max_model_len = saved


def timed_decode_window(engine, prompts: list, params, warm: int, steps: int, running=None,
                        sample_stacks: bool = False) -> dict:
    """Add ``prompts`` at once, step until the batch has formed, then ``warm`` steps, then time ``steps`` steps.

    ``running`` None: the batch is every prompt (each has a token). Else a callable giving the scheduler's number of
    running requests: more prompts than fit are added, and the batch is the requests vLLM admitted, once every
    running request has a token and the number running held for 3 steps (the rest wait for room)."""
    ids = [f"cap-{i}" for i in range(len(prompts))]
    for rid, prompt in zip(ids, prompts):
        engine.add_request(rid, prompt, params)
    produced = {rid: 0 for rid in ids}

    def step() -> int:
        new = 0
        for out in engine.step():
            if out.request_id in produced:
                n = len(out.outputs[0].token_ids)
                new += n - produced[out.request_id]
                produced[out.request_id] = n
        return new

    t0 = time.perf_counter()
    if running is None:
        while min(produced.values()) == 0:
            step()
        batch = len(ids)
    else:
        held, last = 0, -1
        while held < 3:
            step()
            batch = running()
            started = sum(n > 0 for n in produced.values())
            # batch > 0: vLLM 0.26 records its metrics only on steps with outputs, so the gauge reads 0 until a
            # first token comes (every step of a long prefill)
            held = held + 1 if batch > 0 and batch == last and started == batch else 0
            last = batch
    prefill_s = time.perf_counter() - t0
    for _ in range(warm):
        step()
    per_step = []
    sampler = StackSampler(depth=6) if sample_stacks else contextlib.nullcontext()
    with sampler:
        t0 = time.perf_counter()
        for _ in range(steps):
            per_step.append(step())
        window_s = time.perf_counter() - t0
    if sample_stacks:  # where the host spends a step (the engine runs in this thread)
        for stack, share in sampler.top(14):
            print(f"[stacks] {share:6.1%}  {stack}", file=sys.stderr, flush=True)
        print(f"[stacks] gc seconds by generation: {sampler.gc_seconds}", file=sys.stderr, flush=True)
    engine.abort_request(ids)
    while engine.has_unfinished_requests():
        engine.step()
    return {"batch": batch, "submitted": len(ids), "prefill_s": prefill_s, "window_s": window_s,
            "tokens": sum(per_step), "min_tokens_per_step": min(per_step), "max_tokens_per_step": max(per_step),
            "throughput_tok_s": sum(per_step) / window_s, "step_ms": window_s / steps * 1e3}


def cases(text: str) -> list[tuple[int, int | None]]:
    """``"32768,129024x1"`` -> ``[(32768, None), (129024, 1)]``: None = the largest batch that fits."""
    out = []
    for item in text.split(","):
        ctx, _, batch = item.partition("x")
        out.append((int(ctx), int(batch) if batch else None))
    return out


def child(args) -> None:
    """One engine, every context: prints a JSON line with the batch each fits and its decode throughput."""
    import random

    from vllm import LLM
    from vllm.inputs import TokensPrompt

    kwargs = dict(model=args.model_dir, load_format="dummy", dtype="bfloat16", enable_prefix_caching=True,
                  max_model_len=args.max_model_len, gpu_memory_utilization=args.gpu_memory_utilization,
                  max_num_seqs=args.max_num_seqs, seed=0,
                  compilation_config={"mode": args.compile_mode, "cudagraph_mode": args.cudagraph_mode})
    if args.num_gpu_blocks_override:
        kwargs["num_gpu_blocks_override"] = args.num_gpu_blocks_override
    if args.max_num_batched_tokens:
        kwargs["max_num_batched_tokens"] = args.max_num_batched_tokens
    if args.backend != "default":
        kwargs["attention_config"] = {"backend": args.backend}
    mp = args.engine == "mp"
    if mp:
        kwargs["disable_log_stats"] = False  # the running count comes from vLLM's metrics
    llm = LLM(**kwargs)
    engine = llm.llm_engine
    if mp:
        running_now = lambda: int(sum(m.value for m in llm.get_metrics()  # noqa: E731
                                      if m.name == "vllm:num_requests_running"))
    else:
        core = engine.engine_core.engine_core  # InprocClient -> EngineCore: the scheduler's running requests
        running_now = lambda: len(core.scheduler.running)  # noqa: E731
    # early requests decode while later ones prefill (chunked prefill): room for those steps, aborted after the window
    params = greedy_ids_params(args.max_tokens)
    rows = []
    for ctx, fixed_batch in cases(args.contexts):
        tokens = ctx + args.max_tokens
        if mp:  # the scheduler is in another process: the pool's tokens over a request's, an upper bound here (a
            # duo-memory block holds only its group's heads); vLLM's own line is in the log
            cache = engine.vllm_config.cache_config
            capacity, num_blocks = cache.num_gpu_blocks * cache.block_size / tokens, cache.num_gpu_blocks
        else:
            capacity, num_blocks = engine_capacity(llm, tokens)
        if fixed_batch:
            submit = fixed_batch
        elif args.batch == "admitted":  # twice the estimate: the batch is what the scheduler admits of them
            submit = min(math.ceil(2 * capacity) + 2, args.max_num_seqs + 2)
        else:  # vLLM's figure counts the pool's reserved null block as usable: without it a batch of exactly the
            # capacity has one request preempted
            submit = min(math.floor(capacity * (num_blocks - 1) / num_blocks), args.max_num_seqs)
        rng = random.Random(ctx * 1000 + submit)
        prompts = [TokensPrompt(prompt_token_ids=[rng.randrange(100, 30000) for _ in range(ctx)])
                   for _ in range(submit)]
        running = running_now if args.batch == "admitted" and not fixed_batch else None
        row = {"context": ctx, "request_tokens": tokens, "capacity": None if mp else capacity,
               **timed_decode_window(engine, prompts, params, args.warm, args.steps, running, args.sample_stacks)}
        batch = row["batch"]
        rows.append(row)
        cap = "-" if mp else f"{capacity:.2f}"
        print(f"[{args.backend}] ctx={ctx} capacity={cap} batch={batch} prefill={row['prefill_s']:.1f}s "
              f"step={row['step_ms']:.2f}ms throughput={row['throughput_tok_s']:.0f} tok/s "
              f"tokens/step {row['min_tokens_per_step']}-{row['max_tokens_per_step']}", file=sys.stderr, flush=True)
    kv_blocks = getattr(engine.vllm_config.cache_config, "num_gpu_blocks", None)
    print("RESULT " + json.dumps({"backend": args.backend, "kv_blocks": kv_blocks, "rows": rows}), flush=True)


def vllm_line_concurrency(run: dict) -> float | None:
    """The figure of vLLM's "Maximum concurrency for N tokens per request: X x" log line of one run (N = the
    engine's max_model_len), or None."""
    for line in reversed(run.get("log_lines", [])):
        hit = re.search(r"per request: ([0-9.]+)x", line)
        if hit:
            return float(hit.group(1))
    return None


def run_config(args, backend: str, env: dict) -> dict:
    child_args = ["--backend", backend, "--model-dir", args.model_dir,
                  "--contexts", args.contexts, "--batch", args.batch, "--engine", args.engine, "--warm", str(args.warm),
                  "--steps", str(args.steps), "--max-tokens", str(args.max_tokens),
                  "--max-model-len", str(args.max_model_len),
                  "--max-num-seqs", str(args.max_num_seqs),
                  "--num-gpu-blocks-override", str(args.num_gpu_blocks_override),
                  "--max-num-batched-tokens", str(args.max_num_batched_tokens),
                  "--gpu-memory-utilization", str(args.gpu_memory_utilization), "--cudagraph-mode", args.cudagraph_mode,
                  "--compile-mode", str(args.compile_mode), *(["--sample-stacks"] if args.sample_stacks else [])]
    if args.engine == "inproc":  # the capacity is read from the in-process scheduler
        env = {**env, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    return run_child("benchmarks.bench_vllm_capacity", child_args, env, backend, grep="Maximum concurrency")


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_vllm_capacity",
                                description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--contexts", default="32768,129024",
                   help="comma list of CTX (the largest batch that fits) or CTXxB (a fixed batch B, e.g. 129024x1 "
                        "for TPOT at batch 1)")
    p.add_argument("--batch", choices=("capacity", "admitted"), default="admitted",
                   help="admitted: add twice the estimate's requests, time the ones vLLM's scheduler runs at once "
                        "(its admission gate and block pool decide); capacity: add vLLM's estimate, rounded down")
    p.add_argument("--longseq-env", action="append", required=False, default=None,
                   help="K=V,K=V environment of one longseq configuration (LONGSEQ_ATTENTION included); repeat it "
                        "for several, each timed against the same default run")
    p.add_argument("--shape", default="llama-3.1-8b")
    p.add_argument("--model-dir", default=None, help="shape-only model folder (written if missing)")
    p.add_argument("--tokenizer-from", default=os.environ.get("LONGSEQ_TEST_MODEL"))
    p.add_argument("--warm", type=int, default=8, help="decode steps after every request has its first token")
    p.add_argument("--steps", type=int, default=64, help="timed decode steps")
    p.add_argument("--max-tokens", type=int, default=512,
                   help="each request's token limit (the batch is the capacity for context + this); must exceed the "
                        "steps the first requests decode while the last ones prefill, plus warm + steps")
    p.add_argument("--max-model-len", type=int, default=131072)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--max-num-batched-tokens", type=int, default=0,
                   help="vLLM's prefill chunk (0: its default); windowed KV groups reserve a chunk per request, so "
                        "the duo memory saving shrinks as it grows")
    p.add_argument("--num-gpu-blocks-override", type=int, default=0,
                   help="a fixed KV pool of this many blocks (small CPU runs; 0: sized by vLLM)")
    p.add_argument("--cudagraph-mode", default="FULL_DECODE_ONLY")
    p.add_argument("--compile-mode", type=int, default=0,
                   help="vLLM compilation mode: 0 no torch.compile (starts in about a minute), 3 vllm serve's default")
    p.add_argument("--ours-backend", default="CUSTOM",
                   help="attention backend of the longseq runs (CUSTOM on CUDA; 'default' on vLLM's CPU engine)")
    p.add_argument("--engine", choices=("inproc", "mp"), default="inproc",
                   help="inproc: the engine core in the bench's process (vLLM's capacity function, the scheduler's "
                        "running list; step times include the host work); mp: in its own process, as vllm serve runs "
                        "it (host work overlaps the GPU; running count from vLLM's metrics, capacity from its log)")
    p.add_argument("--skip-default", action="store_true", help="run only the longseq settings (diagnostics)")
    p.add_argument("--sample-stacks", action="store_true",
                   help="print where the host spends the timed window (the engine's thread, sampled)")
    p.add_argument("--name", default="vllm_capacity", help="results file name")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--backend", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.child:
        return child(args)
    from benchmarks.common import (command_line, env_settings, env_without_longseq, environment, shape_model,
                                   write_result)

    args.model_dir = shape_model(args, args.max_model_len)
    base_env = env_without_longseq("LONGSEQ_TEST_MODEL")
    extras = [env_settings(e) for e in (args.longseq_env or [])]
    if not extras:
        raise SystemExit("give at least one --longseq-env configuration")
    if args.skip_default:
        for extra in extras:
            print("RESULT-ONLY " + json.dumps({"longseq_env": extra,
                                               **run_config(args, args.ours_backend, {**base_env, **extra})}))
        return
    default = run_config(args, "default", {**base_env, "VLLM_PLUGINS": ""})  # vLLM alone, no plugin loaded
    runs = [run_config(args, args.ours_backend, {**base_env, **extra}) for extra in extras]
    table = []
    for i, d in enumerate(default["rows"]):
        for extra, r in zip(extras, runs):
            o = r["rows"][i]
            table.append({"context": d["context"], "longseq_env": extra,
                          "default_batch": d["batch"], "longseq_batch": o["batch"],
                          # vLLM's estimate for this context (in-process), else its log line (max_model_len)
                          "default_capacity": d["capacity"] or vllm_line_concurrency(default),
                          "longseq_capacity": o["capacity"] or vllm_line_concurrency(r),
                          "batch_ratio": o["batch"] / d["batch"],
                          "default_throughput_tok_s": d["throughput_tok_s"],
                          "longseq_throughput_tok_s": o["throughput_tok_s"],
                          "throughput_ratio": o["throughput_tok_s"] / d["throughput_tok_s"],
                          "default_step_ms": d["step_ms"], "longseq_step_ms": o["step_ms"],
                          "preempted": o["min_tokens_per_step"] < o["batch"] or d["min_tokens_per_step"] < d["batch"]})
            caps = (table[-1]["default_capacity"], table[-1]["longseq_capacity"])
            table[-1]["capacity_ratio"] = caps[1] / caps[0] if all(caps) else None
    path = write_result(args.name, {"benchmark": "vllm_capacity", "command": command_line(), "env": environment(),
                                    "inputs": {"shape": args.shape, "contexts": args.contexts, "batch": args.batch,
                                               "engine": args.engine, "warm": args.warm, "steps": args.steps,
                                               "max_tokens": args.max_tokens, "max_model_len": args.max_model_len,
                                               "max_num_batched_tokens": args.max_num_batched_tokens or "default",
                                               "gpu_memory_utilization": args.gpu_memory_utilization,
                                               "cudagraph_mode": args.cudagraph_mode, "compile_mode": args.compile_mode},
                                    "longseq_envs": extras, "default": default, "longseq_runs": runs,
                                    "table": table})
    print("| context | setting | default batch | longseq batch | batch ratio | capacity ratio | default step ms | "
          "longseq step ms | default tok/s | longseq tok/s | throughput ratio |\n|---|---|---|---|---|---|---|---|---|---|---|")
    for r in table:
        env = ",".join(f"{k}={v}" for k, v in r["longseq_env"].items())
        print(f"| {r['context']} | {env} | {r['default_batch']} | {r['longseq_batch']} | {r['batch_ratio']:.2f}x | "
              f"{'-' if r['capacity_ratio'] is None else format(r['capacity_ratio'], '.2f') + 'x'} | "
              f"{r['default_step_ms']:.2f} | {r['longseq_step_ms']:.2f} | {r['default_throughput_tok_s']:.0f} | "
              f"{r['longseq_throughput_tok_s']:.0f} | {r['throughput_ratio']:.2f}x |")
    for label, r in [("default", default)] + [(f"longseq {extra}", r) for extra, r in zip(extras, runs)]:
        print(f"  KV capacity, {label}: {r.get('kv_blocks')} blocks; {' | '.join(r.get('log_lines', [])) or '-'}")
    print("wrote", path)


if __name__ == "__main__":
    main()
