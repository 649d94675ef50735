"""DuoAttention vs dense through vLLM's real engine on SmolLM2-135M-Instruct: the calibrated pattern against a
random pattern at the same sparsity (the control that shows calibration matters).

Same metrics as ``bench_sparse_fidelity.py`` (``longseq.eval``): teacher-forced next-token agreement and mean
KL(dense || duo) with the dense run's tokens fed to duo, free-running greedy match, passkey retrieval.
Duo runs on vLLM's CPU engine only in this release (``LONGSEQ_CPU=1``; PyTorch reference path).

    python benchmarks/bench_duo_fidelity.py --lengths 4096,4096 --passkey-lengths 4000,3000 --max-tokens 32
Writes benchmarks/results/<name>.json.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

CPU_ENV = {"LONGSEQ_CPU": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "2",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
CPU_KW = {"dtype": "bfloat16", "max_model_len": 8192, "enforce_eager": True, "seed": 0,
          "enable_prefix_caching": True, "max_num_batched_tokens": 4096}


def main(argv=None) -> None:
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lengths", type=ints, default=[4096, 4096])
    p.add_argument("--passkey-lengths", type=ints, default=[4000, 3000])
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--pattern", default="smollm2-135m-instruct")
    p.add_argument("--random-seed", type=int, default=0)
    p.add_argument("--name", default="duo_fidelity_cpu")
    args = p.parse_args(argv)

    from transformers import AutoTokenizer

    from benchmarks.common import command_line, environment, write_result
    from longseq.attention_backends.core.duo import load_duo_pattern, random_pattern, save_duo_pattern
    from longseq.eval.fidelity import compare, run_session
    from longseq.eval.passkey import passkey_found, passkey_prompt
    from longseq.models.prompts import make_prompts
    from longseq.models.smollm2 import smollm2_path

    model = smollm2_path()
    tok = AutoTokenizer.from_pretrained(model)
    prompts = make_prompts(tok, args.lengths, seed=0)
    pk = [passkey_prompt(tok, n, seed=i) for i, n in enumerate(args.passkey_lengths)]
    runs = [{"prompts": prompts, "max_tokens": args.max_tokens}, {"prompts": [x for x, _ in pk], "max_tokens": 8}]
    found = lambda run: [passkey_found(t, k) for t, (_, k) in zip(run["texts"], pk)]  # noqa: E731
    dense = run_session(model, runs, {**CPU_ENV, "LONGSEQ_ATTENTION": "dense", "LONGSEQ_CPU_KERNEL": "torch"}, CPU_KW)
    d_run = dense["runs"][0]
    calibrated = load_duo_pattern(args.pattern)
    result = {"name": args.name, "command": command_line(), "env": environment(), "inputs": vars(args),
              "dense": {"passkey_correct": found(dense["runs"][1])}, "patterns": {}}
    with tempfile.TemporaryDirectory() as tmp:
        rnd = os.path.join(tmp, "random")
        save_duo_pattern(random_pattern(calibrated.num_layers, calibrated.num_kv_heads, args.random_seed,
                                        calibrated.sink_size, calibrated.recent_size), rnd)
        for label, pattern in (("calibrated", args.pattern), ("random", rnd)):
            env = {**CPU_ENV, "LONGSEQ_ATTENTION": "duo", "LONGSEQ_DUO_PATTERN": pattern,
                   "LONGSEQ_DUO_SPARSITY": str(args.sparsity)}
            res = run_session(model, [{**runs[0], "forced": d_run["tokens"]}, runs[0], runs[1]], env, CPU_KW)
            if res["runs"][0]["tokens"] != d_run["tokens"]:
                raise RuntimeError("teacher forcing failed")
            m = compare(d_run, res["runs"][0], res["runs"][1])
            m["passkey_correct"] = found(res["runs"][2])
            result["patterns"][label] = m
            print(f"{label}: agreement {m['agreement']:.4f} mean KL {m['mean_kl']:.4f} free-running "
                  f"{m['free_running_match']:.3f} passkey {sum(m['passkey_correct'])}/{len(pk)} "
                  f"(dense {sum(result['dense']['passkey_correct'])})", flush=True)
    print(write_result(args.name, result))


if __name__ == "__main__":
    main()
