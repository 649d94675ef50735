"""Sparse mode's speed/fidelity trade-off: join end-to-end decode runs with fidelity runs per setting.

A setting is ``(budget, reuse_steps)``. Speed comes from ``bench_vllm_decode`` result files (TPOT at one context and
batch, as a ratio to vLLM's default backend timed in the same run), fidelity from ``bench_sparse_fidelity`` result
files (teacher-forced agreement, mean KL, pass keys vs dense). A decode variant's empty environment means the plugin's
defaults of the commit that ran it, which a result file states in ``settings_defaults``.
"""

from __future__ import annotations

import json
import os


def _setting(env: dict, defaults: dict) -> tuple[int, int]:
    return (int(env.get("LONGSEQ_SPARSE_BUDGET", defaults["budget"])),
            int(env.get("LONGSEQ_SPARSE_REUSE_STEPS", defaults["reuse_steps"])))


def speed_points(decode_result: dict, context: int, batch: int) -> dict[tuple[int, int], list[float]]:
    """``{(budget, reuse_steps): [TPOT / default TPOT, ...]}`` for one case of one ``bench_vllm_decode`` result."""
    defaults = decode_result["settings_defaults"]
    out: dict[tuple[int, int], list[float]] = {}
    for row in decode_result["table"]:
        if (row["context"], row["batch"]) != (context, batch):
            continue
        for v in row.get("variants") or [{"longseq_env": {}, "tpot_ratio": row["tpot_ratio"]}]:
            out.setdefault(_setting(v["longseq_env"], defaults), []).append(v["tpot_ratio"])
    return out


def fidelity_points(fidelity_result: dict) -> dict[tuple[int, int], dict]:
    """``{(budget, reuse_steps): metrics}`` of a ``bench_sparse_fidelity`` result whose sweeps are named
    ``...+reuse<N>`` (one per ``--reuse-steps`` value)."""
    out = {}
    dense_pk = sum(fidelity_result["dense"]["passkey_correct"])
    for name, sweep in fidelity_result["sweeps"].items():
        n = int(name.rsplit("reuse", 1)[1]) if "reuse" in name else 1
        for budget, m in sweep["budgets"].items():
            out[(int(budget), n)] = {"agreement": m["agreement"], "mean_kl": m["mean_kl"],
                                     "passkeys": sum(m["passkey_correct"]), "passkeys_dense": dense_pk,
                                     "steps": m["steps"]}
    return out


def pareto_points(results_dir: str, decode_files: list[str], fidelity_files: list[str], context: int = 129024,
                  batch: int = 1) -> list[dict]:
    """One dict per setting measured for both speed and fidelity: budget, reuse_steps, tpot_ratio (mean over
    runs), tpot_ratios (each run), and the fidelity metrics. Sorted by budget, then reuse steps."""
    speed: dict[tuple[int, int], list[float]] = {}
    for f in decode_files:
        for k, v in speed_points(json.load(open(os.path.join(results_dir, f))), context, batch).items():
            speed.setdefault(k, []).extend(v)
    fid: dict[tuple[int, int], dict] = {}
    for f in fidelity_files:
        fid.update(fidelity_points(json.load(open(os.path.join(results_dir, f)))))
    return [{"budget": b, "reuse_steps": n, "tpot_ratio": sum(speed[(b, n)]) / len(speed[(b, n)]),
             "tpot_ratios": speed[(b, n)], **fid[(b, n)]} for b, n in sorted(set(speed) & set(fid))]


def plot_pareto(points: list[dict], title: str = ""):
    """Three panels (agreement, KL, pass keys) against TPOT / dense; returns the figure."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    metrics = (("agreement", "teacher-forced agreement", 0.99), ("mean_kl", "mean KL (nats)", 0.01),
               ("passkeys", "pass keys found", None))
    for ax, (key, label, target) in zip(axes, metrics):
        for n, marker in ((1, "o"), (2, "s"), (4, "^"), (8, "v")):
            pts = [p for p in points if p["reuse_steps"] == n]
            if not pts:
                continue
            ax.plot([p["tpot_ratio"] for p in pts], [p[key] for p in pts], marker, ms=7,
                    label=f"select every {n} step{'s' if n > 1 else ''}")
            for p in pts:
                if len(p["tpot_ratios"]) > 1:  # several runs: show their spread
                    ax.hlines(p[key], min(p["tpot_ratios"]), max(p["tpot_ratios"]), lw=1, color="gray")
                ax.annotate(str(p["budget"]), (p["tpot_ratio"], p[key]), fontsize=7, xytext=(3, 3),
                            textcoords="offset points")
        if target is not None:
            ax.axhline(target, color="gray", ls=":", lw=1)
        elif points:
            ax.axhline(points[0]["passkeys_dense"], color="gray", ls=":", lw=1)
        ax.set(xlabel="TPOT / vLLM default (126K, batch 1; lower is faster)", ylabel=label)
        ax.grid(alpha=0.3)
    axes[1].set_yscale("log")
    axes[0].legend(fontsize=7)
    fig.suptitle(title or "sparse mode: speed vs fidelity per (budget, reuse steps); dotted: targets / dense",
                 fontsize=9)
    fig.tight_layout()
    return fig
