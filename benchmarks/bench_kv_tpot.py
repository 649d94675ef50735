"""Time per output token with longseq's KV offload connector on (no hits) vs vLLM without a connector.

Each configuration runs in its own engine process: ``plain`` (no connector), ``ours-dram`` (connector, DRAM
tier only), ``ours-disk`` (connector, DRAM + disk). Per repeat, a fresh random prompt is prefilled (its blocks
are saved by the connector), the saves are given ``--settle-s`` seconds to finish, then
TPOT = (t(1 + N tokens) - t(1 token)) / N on that prompt, both runs starting from vLLM's own prefix-cache hit,
so neither contains a prefill. The median over repeats after the first is reported, with every time.

    python -m benchmarks.bench_kv_tpot                               # CPU: SmolLM2 (real weights), minutes
    python -m benchmarks.bench_kv_tpot --model PATH --prompt-tokens 8192   # GPU: any model
    python -m benchmarks.bench_kv_tpot --model /tmp/longseq-shape-llama-3.1-8b --load-format dummy \
        --prompt-tokens 8192 --max-model-len 16384 --cpu-gib 16     # GPU: the shape model bench_kv_offload writes

Writes ``benchmarks/results/<--name>.json`` (default ``kv_tpot_cpu`` / ``kv_tpot_gpu``) and prints the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import sys
import time

from benchmarks.common import run_child


CONFIGS = ("plain", "ours-dram", "ours-disk")


def child(args) -> None:
    from vllm import LLM
    from vllm.inputs import TokensPrompt

    from benchmarks.common import greedy_ids_params, longseq_kv_transfer_config

    kw = dict(model=args.model, dtype="bfloat16", enable_prefix_caching=True, max_model_len=args.max_model_len,
              seed=0, enforce_eager=args.enforce_eager, load_format=args.load_format)
    disk_dir = None
    if args.config != "plain":
        kw["kv_transfer_config"], disk_dir = longseq_kv_transfer_config(args.cpu_gib, args.config == "ours-disk")
    llm = LLM(**kw)
    one, many = greedy_ids_params(1), greedy_ids_params(args.decode_tokens + 1)
    rng = random.Random(0)
    tpot_ms = []
    for r in range(args.repeats + 1):
        prompt = TokensPrompt(prompt_token_ids=[rng.randrange(100, 30000) for _ in range(args.prompt_tokens)])
        llm.generate([prompt], one, use_tqdm=False)  # prefill: the connector saves this prompt's blocks
        time.sleep(args.settle_s)
        t = time.perf_counter()
        llm.generate([prompt], one, use_tqdm=False)
        t1 = time.perf_counter() - t
        t = time.perf_counter()
        llm.generate([prompt], many, use_tqdm=False)
        tn = time.perf_counter() - t
        tpot_ms.append((tn - t1) / args.decode_tokens * 1e3)
        print(f"[{args.config}] repeat {r}: TPOT {tpot_ms[-1]:.2f} ms", file=sys.stderr, flush=True)
    if disk_dir:
        shutil.rmtree(disk_dir, ignore_errors=True)
    print("RESULT " + json.dumps({"config": args.config, "tpot_ms_each": tpot_ms,
                                  "tpot_ms": statistics.median(tpot_ms[1:])}), flush=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_kv_tpot",
                                description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model path (default: SmolLM2-135M-Instruct built from the GGUF)")
    p.add_argument("--prompt-tokens", type=int, default=1024)
    p.add_argument("--decode-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=4, help="timed repeats (one more runs first as warm-up)")
    p.add_argument("--settle-s", type=float, default=2.0, help="seconds for the prompt's saves to finish")
    p.add_argument("--cpu-gib", type=float, default=1.0)
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs / compilation (always on CPU)")
    p.add_argument("--load-format", default="auto", help="'dummy': random weights (a shape-only model folder)")
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--name", default=None)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--config", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.configs = args.configs.split(",")
    if "plain" not in args.configs or not set(args.configs) <= set(CONFIGS):
        p.error(f"--configs: plain and any of {CONFIGS[1:]}")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.child:
        return child(args)
    import torch

    from benchmarks.common import command_line, environment, write_result

    gpu = torch.cuda.is_available()
    if args.model is None:
        from longseq.models.smollm2 import smollm2_path

        args.model = smollm2_path()
    if not gpu:
        args.enforce_eager = True
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "HF_HUB_OFFLINE": "1"}
    if not gpu:
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    res = {}
    for c in args.configs:
        child_args = ["--config", c, "--model", args.model,
                      "--prompt-tokens", str(args.prompt_tokens), "--decode-tokens", str(args.decode_tokens),
                      "--repeats", str(args.repeats), "--settle-s", str(args.settle_s), "--cpu-gib", str(args.cpu_gib),
                      "--max-model-len", str(args.max_model_len), "--load-format", args.load_format]
        if args.enforce_eager:
            child_args += ["--enforce-eager"]
        res[c] = run_child("benchmarks.bench_kv_tpot", child_args, env, c)
    ratios = {c: res[c]["tpot_ms"] / res["plain"]["tpot_ms"] for c in res if c != "plain"}
    path = write_result(args.name or ("kv_tpot_gpu" if gpu else "kv_tpot_cpu"), {
        "benchmark": "kv_tpot", "command": command_line(), "env": environment(),
        "inputs": {"model": os.path.basename(args.model.rstrip("/")), "prompt_tokens": args.prompt_tokens,
                   "decode_tokens": args.decode_tokens, "repeats": args.repeats, "settle_s": args.settle_s,
                   "cpu_gib": args.cpu_gib, "enforce_eager": args.enforce_eager, "load_format": args.load_format},
        "runs": res, "tpot_ratio_vs_plain": ratios})
    print("| config | TPOT ms (median) | vs plain | each repeat (ms) |\n|---|---|---|---|")
    for c, r in res.items():
        print(f"| {c} | {r['tpot_ms']:.2f} | {r['tpot_ms'] / res['plain']['tpot_ms']:.3f}x | "
              + ", ".join(f"{t:.1f}" for t in r["tpot_ms_each"]) + " |")
    print("wrote", path)


if __name__ == "__main__":
    main()
