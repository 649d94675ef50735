"""End to end on vLLM: a reduced-depth Kimi-Linear-48B-shaped model with its KDA layers on longseq's kernels
(``LONGSEQ_KDA=1``) vs vLLM's built-in KDA kernels (``LONGSEQ_KDA=0``: vLLM alone). Prefill throughput and decode
time per output token.

Routing of the longseq engine: steps with prefills run vLLM's own KDA forward (longseq has no chunk prefill
kernel), so the prefill rows measure the plugin's overhead (the two should match) and the decode rows our recurrent
kernel.

Both run in the same invocation, each in its own engine process (baseline with ``VLLM_PLUGINS=""``), on
``longseq.models.kimi_linear``'s ``kimi-linear-48b`` shape (real hidden size, heads, MLA, MoE; ``--layers`` deep,
3 KDA : 1 MLA; dummy weights), bf16, CUDA graphs for decode, prefix caching off. Each time is the wall clock of
one synchronous ``LLM.generate`` call after a warm-up call; the median of ``--repeats`` is kept.
* prefill: one prompt of each ``--prefill`` length, ``max_tokens=1``: tokens/s = length / time.
* decode: ``--batches`` prompts of ``--decode-context`` tokens; TPOT = (t(N+1 tokens) - t(1 token)) / N.

    python -m benchmarks.bench_vllm_kda            # full
    python -m benchmarks.bench_vllm_kda --quick    # short shapes, one repeat (engine starts dominate)
Writes benchmarks/results/vllm_kda.json (vllm_kda_quick.json with --quick) and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time

from benchmarks.common import env_without_longseq, greedy_ids_params, run_child


def child(args) -> None:
    """One engine: prints ``RESULT {json}`` with every timing."""
    from vllm import LLM
    from vllm.inputs import TokensPrompt

    t0 = time.perf_counter()
    llm = LLM(model=args.model_dir, load_format="dummy", dtype="bfloat16", enable_prefix_caching=False, seed=0,
              max_model_len=args.max_model_len, gpu_memory_utilization=args.gpu_memory_utilization,
              max_num_seqs=max(args.batches), max_num_batched_tokens=max(args.prefill + [8192]),
              compilation_config={"mode": 0, "cudagraph_mode": "FULL_DECODE_ONLY",
                                  "cudagraph_capture_sizes": sorted({1, 2, 4, 8, *args.batches})})
    startup = time.perf_counter() - t0
    rng = random.Random(0)

    def prompts(n: int, length: int):
        return [TokensPrompt(prompt_token_ids=[rng.randrange(100, 40000) for _ in range(length)]) for _ in range(n)]

    def timed(ps, max_tokens: int) -> float:
        params = greedy_ids_params(max_tokens)
        t = time.perf_counter()
        llm.generate(ps, params, use_tqdm=False)
        return time.perf_counter() - t

    timed(prompts(2, 512), 16)  # warm-up: allocator, sampler, first kernel launches/autotuning
    prefill, decode = [], []
    for length in args.prefill:
        ps = prompts(1, length)
        timed(ps, 1)
        times = [timed(ps, 1) for _ in range(args.repeats)]
        prefill.append({"tokens": length, "times_s": times, "tokens_per_s": length / statistics.median(times)})
        print(f"[{args.label}] prefill {length}: {prefill[-1]['tokens_per_s']:.0f} tok/s", file=sys.stderr, flush=True)
    for batch in args.batches:
        ps = prompts(batch, args.decode_context)
        timed(ps, 9)  # warm-up with decode steps at this batch size (lazy compiles / first graph replays)
        t1 = [timed(ps, 1) for _ in range(args.repeats)]
        tn = [timed(ps, args.decode_tokens + 1) for _ in range(args.repeats)]
        tpot = (statistics.median(tn) - statistics.median(t1)) / args.decode_tokens
        decode.append({"batch": batch, "context": args.decode_context, "t1_s": t1, "t_many_s": tn,
                       "tpot_ms": tpot * 1e3, "tokens_per_s": batch / tpot})
        print(f"[{args.label}] decode batch {batch}: TPOT {tpot * 1e3:.2f} ms", file=sys.stderr, flush=True)
    print("RESULT " + json.dumps({"label": args.label, "startup_s": startup, "prefill": prefill, "decode": decode}),
          flush=True)


def run_engine(args, label: str, env: dict) -> dict:
    """``--child`` in a fresh process with ``env``; its RESULT line."""
    child_args = ["--label", label, "--model-dir", args.model_dir,
                  "--prefill", ",".join(map(str, args.prefill)), "--batches", ",".join(map(str, args.batches)),
                  "--decode-context", str(args.decode_context), "--decode-tokens", str(args.decode_tokens),
                  "--repeats", str(args.repeats), "--max-model-len", str(args.max_model_len),
                  "--gpu-memory-utilization", str(args.gpu_memory_utilization)]
    return run_child("benchmarks.bench_vllm_kda", child_args, env, label)


def parse_args(argv=None):
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_vllm_kda", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="short shapes and one repeat (smoke run)")
    p.add_argument("--layers", type=int, default=4, help="model depth (3 KDA : 1 MLA)")
    p.add_argument("--prefill", type=ints, default=[8192, 32768], help="prefill prompt lengths")
    p.add_argument("--batches", type=ints, default=[1, 16], help="decode batch sizes")
    p.add_argument("--decode-context", type=int, default=2048, help="prompt tokens per decode request")
    p.add_argument("--decode-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.6)
    p.add_argument("--model-dir", default=None, help="a written Kimi-Linear shape folder (default: build one)")
    p.add_argument("--name", default=None, help="result name (default vllm_kda[_quick])")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--label", default="", help=argparse.SUPPRESS)
    p.add_argument("--max-model-len", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick and not args.child:
        args.prefill, args.batches, args.decode_tokens, args.repeats = [4096], [1, 16], 32, 1
    if args.max_model_len is None:
        args.max_model_len = max(args.prefill + [args.decode_context + args.decode_tokens + 1]) + 16
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.child:
        return child(args)
    from benchmarks.common import command_line, environment, write_result

    if args.model_dir is None:
        from longseq.models.kimi_linear import write_kimi_linear_model

        args.model_dir = write_kimi_linear_model(os.path.join(tempfile.gettempdir(), f"longseq-kimi48b-{args.layers}l"),
                                                 "kimi-linear-48b", args.layers, max_model_len=args.max_model_len)
    base_env = env_without_longseq("LONGSEQ_TEST_MODEL")
    vllm_kda = run_engine(args, "vllm", {**base_env, "VLLM_PLUGINS": ""})  # vLLM alone: its own KDA kernels
    with tempfile.TemporaryDirectory() as trace_dir:  # proof that the engine ran our layer (vLLM falls back silently)
        ours = run_engine(args, "longseq", {**base_env, "LONGSEQ_KDA": "1", "LONGSEQ_TRACE_DIR": trace_dir})
        traces = [json.load(open(os.path.join(trace_dir, f))) for f in os.listdir(trace_dir) if f.endswith(".json")]
    kda_layers = sum(1 for i in range(1, args.layers + 1) if i % 4)
    if not any(t["backend"] == "kda" and t["num_layers"] == kda_layers for t in traces):
        raise SystemExit(f"LONGSEQ_KDA=1 engine did not run longseq's KDA layer on {kda_layers} layers: {traces}")
    if not sum(t.get("framework_prefill_calls", 0) for t in traces if t["backend"] == "kda"):
        raise SystemExit(f"LONGSEQ_KDA=1: no framework_prefill_calls in the trace: {traces}")
    table = {
        "prefill": [{"tokens": v["tokens"], "vllm_tok_s": v["tokens_per_s"], "longseq_tok_s": o["tokens_per_s"],
                     "speedup": o["tokens_per_s"] / v["tokens_per_s"]} for v, o in zip(vllm_kda["prefill"], ours["prefill"])],
        "decode": [{"batch": v["batch"], "vllm_tpot_ms": v["tpot_ms"], "longseq_tpot_ms": o["tpot_ms"],
                    "speedup": v["tpot_ms"] / o["tpot_ms"]} for v, o in zip(vllm_kda["decode"], ours["decode"])],
    }
    name = args.name or ("vllm_kda" + ("_quick" if args.quick else ""))
    path = write_result(name, {
        "benchmark": "vllm_kda", "command": command_line(), "env": environment(),
        "inputs": {"shape": "kimi-linear-48b", "layers": args.layers, "prefill": args.prefill, "batches": args.batches,
                   "decode_context": args.decode_context, "decode_tokens": args.decode_tokens, "repeats": args.repeats,
                   "longseq_kda_prefill": "framework",
                   "dtype": "bfloat16", "cudagraph_mode": "FULL_DECODE_ONLY", "prefix_caching": False},
        "vllm": vllm_kda, "longseq": ours, "longseq_trace": traces, "table": table})
    print("LONGSEQ_KDA=0 (vLLM) vs LONGSEQ_KDA=1 (prefill on vLLM's chunk kernel, decode on longseq's)")
    print("| prefill tokens | vLLM KDA tok/s | longseq KDA tok/s | speedup |\n|---|---|---|---|")
    for r in table["prefill"]:
        print(f"| {r['tokens']} | {r['vllm_tok_s']:.0f} | {r['longseq_tok_s']:.0f} | {r['speedup']:.3f} |")
    print(f"\n| decode batch (ctx {args.decode_context}) | vLLM KDA TPOT ms | longseq KDA TPOT ms | speedup |\n"
          "|---|---|---|---|")
    for r in table["decode"]:
        print(f"| {r['batch']} | {r['vllm_tpot_ms']:.2f} | {r['longseq_tpot_ms']:.2f} | {r['speedup']:.3f} |")
    print("wrote", path)


if __name__ == "__main__":
    main()
