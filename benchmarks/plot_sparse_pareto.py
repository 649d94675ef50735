"""Sparse mode's Pareto plot: TPOT at 126K batch 1 (vs vLLM's default, same run) against fidelity at 4K-8K (vs
dense) for each (budget, reuse steps) measured both ways, from the result files in benchmarks/results/.

    python -m benchmarks.plot_sparse_pareto
Writes benchmarks/results/sparse_pareto.json (the joined points) and sparse_pareto.png.
"""

from __future__ import annotations

import argparse
import json
import os

DECODE = ["vllm_decode_sparse_budgets.json", "vllm_decode_sparse_reuse_budgets.json"]
FIDELITY = ["sparse_fidelity_gpu_reuse.json", "sparse_fidelity_gpu_budgets.json"]


def main(argv=None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from longseq.eval.pareto import pareto_points, plot_pareto

    p = argparse.ArgumentParser(prog="python -m benchmarks.plot_sparse_pareto", description=__doc__.split("\n")[0])
    p.add_argument("--results", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = p.parse_args(argv)
    points = pareto_points(args.results, DECODE, FIDELITY)
    for q in points:
        print(f"budget {q['budget']:5d} N={q['reuse_steps']}: TPOT {q['tpot_ratio']:.3f}x "
              f"(runs {', '.join(f'{r:.3f}' for r in q['tpot_ratios'])}) agreement {q['agreement']:.4f} "
              f"KL {q['mean_kl']:.4f} pass keys {q['passkeys']}/{q['passkeys_dense']}")
    json.dump({"decode_files": DECODE, "fidelity_files": FIDELITY, "points": points},
              open(os.path.join(args.results, "sparse_pareto.json"), "w"), indent=1)
    plot_pareto(points, "sparse mode on an H200: TPOT at 126K batch 1 (Llama-3.1-8B shape) vs fidelity at 4K-8K "
                "(SmolLM2-135M); dotted: targets / dense").savefig(os.path.join(args.results, "sparse_pareto.png"),
                                                                    dpi=110)
    print("wrote", os.path.join(args.results, "sparse_pareto.png"))


if __name__ == "__main__":
    main()
