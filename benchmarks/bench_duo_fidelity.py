"""DuoAttention vs dense through vLLM's real engine on SmolLM2-135M-Instruct: the calibrated pattern against a
random pattern at the same sparsity (the control that shows calibration matters).

Same metrics as ``bench_sparse_fidelity.py`` (``longseq.eval.study.variant_study``): teacher-forced next-token
agreement and mean KL(dense || duo) with the dense run's tokens fed to duo, free-running greedy match, passkey
retrieval. Runs on vLLM's CPU engine by default (``LONGSEQ_CPU=1``; PyTorch reference path); ``--gpu`` uses the
GPU engine (needs the GPU duo path).

    python -m benchmarks.bench_duo_fidelity --lengths 4096,4096 --passkey-lengths 4000,3000 --max-tokens 32
    python -m benchmarks.bench_duo_fidelity --quick        (one 1K prompt, one passkey, 8 tokens: a smoke run)
Writes benchmarks/results/<name>.json (``patterns``: label -> metrics; ``--out-dir`` elsewhere).
"""

from __future__ import annotations

import argparse
import tempfile


def parse_args(argv=None):
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_duo_fidelity", description=__doc__.split("\n")[0])
    p.add_argument("--lengths", type=ints, default=[4096, 4096])
    p.add_argument("--passkey-lengths", type=ints, default=[4000, 3000])
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--pattern", default="smollm2-135m-instruct")
    p.add_argument("--random-seed", type=int, default=0)
    p.add_argument("--name", default=None, help="result name (default duo_fidelity_cpu / duo_fidelity_gpu, "
                   "+ _quick with --quick)")
    p.add_argument("--out-dir", default=None, help="default benchmarks/results")
    p.add_argument("--gpu", action="store_true", help="the GPU engine instead of vLLM's CPU engine")
    p.add_argument("--quick", action="store_true", help="smoke run: --lengths 1024 --passkey-lengths 1000 "
                   "--max-tokens 8")
    args = p.parse_args(argv)
    if args.quick:
        args.lengths, args.passkey_lengths, args.max_tokens = [1024], [1000], 8
    args.name = args.name or ("duo_fidelity_gpu" if args.gpu else "duo_fidelity_cpu") + ("_quick" if args.quick else "")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    from transformers import AutoTokenizer

    from benchmarks.common import command_line, environment, report_variants, write_result
    from longseq.eval.study import duo_variants, engine_setup, variant_study
    from longseq.models.smollm2 import smollm2_path

    model = smollm2_path()
    tok = AutoTokenizer.from_pretrained(model)
    base_env, kw, dense_env = engine_setup(cpu=not args.gpu)
    with tempfile.TemporaryDirectory() as tmp:
        variants = duo_variants(args.pattern, args.sparsity, args.random_seed, tmp)
        res = variant_study(model, tok, variants, args.lengths, args.passkey_lengths, args.max_tokens, base_env,
                            kw, dense_env)
    dense_pk = res["dense"]["passkey_correct"]
    result = {"name": args.name, "command": command_line(), "env": environment(), "inputs": vars(args),
              "dense": {"passkey_correct": dense_pk}}
    result["patterns"] = report_variants(res["variants"], dense_pk)
    print(write_result(args.name, result, args.out_dir))


if __name__ == "__main__":
    main()
