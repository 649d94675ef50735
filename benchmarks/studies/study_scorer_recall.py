"""Which page scorer keeps the most attention mass at a fixed budget? Quest min/max vs a low-rank key projection.

Issue 3 asks whether a second scorer (a DSA-style low-precision or low-rank key projection) gives better recall
at the same cost than Quest's channel-wise min/max. This study answers it offline on real weights
(SmolLM2-135M-Instruct through transformers, CPU): it captures the post-RoPE queries and keys of every layer for
long prompts, and for the last ``--queries`` positions of each prompt it measures, per (layer, KV head, query),
the share of the true attention probability (summed over the GQA group) that falls on the selected pages.

Scorers (page = ``--page-size`` tokens; the sink page and ``--recent`` pages are always kept, as in the kernels):
  quest         sum_g sum_i max(q_gi min_i, q_gi max_i)            2 x D values per page
  lowrank-r     max over the page's tokens of (P^T q_sum) . (P^T k)  r values per token = r x page values per page
                P: top-r right singular vectors of the same layer/head's keys on a separate calibration prompt
  oracle        pages ranked by their true attention mass (upper bound of any scorer)
At fp8 storage, quest and lowrank-r cost the same bytes per page when ``r * page_size == 2 * D`` (r = 8 for
SmolLM2's D = 64 and page 16).

    python -m benchmarks.studies.study_scorer_recall --lengths 4096,4096 --budgets 512,1024,2048

Writes ``benchmarks/results/<name>.json``.
"""

from __future__ import annotations

import argparse
import os
import time


def parse_args(argv=None):
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    p = argparse.ArgumentParser(prog="python -m benchmarks.studies.study_scorer_recall",
                                description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="HF checkpoint folder (default: the SmolLM2 test model)")
    p.add_argument("--lengths", type=ints, default=[4096, 4096])
    p.add_argument("--budgets", type=ints, default=[512, 1024, 2048])
    p.add_argument("--ranks", type=ints, default=[8, 16])
    p.add_argument("--queries", type=int, default=32, help="last positions of each prompt used as queries")
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--recent", type=int, default=4, help="recent pages always kept")
    p.add_argument("--calib-length", type=int, default=2048)
    p.add_argument("--group-variants", action="store_true",
                   help="also combine per-query-head Quest bounds by max, logsumexp and normalized sum")
    p.add_argument("--name", default="scorer_recall")
    return p.parse_args(argv)


def capture_qk(model, ids):
    """Post-RoPE ``q [L, Hq, T, D]`` and ``k [L, Hkv, T, D]`` (fp32, on the model's device) of one forward."""
    import torch
    from transformers.models.llama import modeling_llama

    got = []
    orig = modeling_llama.apply_rotary_pos_emb

    def spy(q, k, *a, **kw):
        q2, k2 = orig(q, k, *a, **kw)
        got.append((q2[0].float().clone(), k2[0].float().clone()))
        return q2, k2

    modeling_llama.apply_rotary_pos_emb = spy
    try:
        with torch.no_grad():
            model(torch.tensor([ids], device=model.device))
    finally:
        modeling_llama.apply_rotary_pos_emb = orig
    return [g[0] for g in got], [g[1] for g in got]


def page_reduce(x, page_size, op):
    """``[..., T]`` -> ``[..., ceil(T / page)]`` by ``op`` (``amax``/``sum``) over each page's tokens."""
    import torch

    t = x.shape[-1]
    n = -(-t // page_size)
    pad = n * page_size - t
    fill = float("-inf") if op == "amax" else 0.0
    xp = torch.nn.functional.pad(x, (0, pad), value=fill)
    xp = xp.view(*x.shape[:-1], n, page_size)
    return xp.amax(-1) if op == "amax" else xp.sum(-1)


def recall_for_layer(q, k, bases, args):
    """Mean kept attention mass per (scorer, budget) over KV heads and query positions of one layer."""
    import torch

    hq, t_all, d = q.shape
    hkv = k.shape[0]
    g = hq // hkv
    p = args.page_size
    out = {}
    for t in range(t_all - args.queries, t_all):
        n_pages = -(-(t + 1) // p)
        keys = k[:, : t + 1]  # [Hkv, t+1, D]
        qt = q[:, t].view(hkv, g, d)  # [Hkv, G, D]
        logits = torch.einsum("hgd,htd->hgt", qt, keys) / d**0.5
        probs = torch.softmax(logits, -1).sum(1) / g  # [Hkv, t+1] mass per token (mean over the group)
        mass = page_reduce(probs, p, "sum")  # [Hkv, n_pages]
        kp = torch.nn.functional.pad(keys, (0, 0, 0, n_pages * p - t - 1))
        kp = kp.view(hkv, n_pages, p, d)
        # Pad rows of the last page must not raise the min/max: fill them with a real key of the page.
        last_valid = (t + 1) - (n_pages - 1) * p
        kp[:, -1, last_valid:] = kp[:, -1, :1]
        kmin, kmax = kp.amin(2), kp.amax(2)
        q_pos, q_neg = qt.clamp(min=0).sum(1), qt.clamp(max=0).sum(1)  # [Hkv, D]
        scores = {"quest": (kmax * q_pos[:, None]).sum(-1) + (kmin * q_neg[:, None]).sum(-1), "oracle": mass}
        if args.group_variants:
            # Per query head bounds [Hkv, G, n_pages], combined over the GQA group in other ways than the sum.
            per_head = (torch.einsum("hgd,hpd->hgp", qt.clamp(min=0), kmax)
                        + torch.einsum("hgd,hpd->hgp", qt.clamp(max=0), kmin)) / d**0.5
            scores["quest-max"] = per_head.amax(1)
            scores["quest-lse"] = per_head.logsumexp(1)
            scores["quest-lse-norm"] = (per_head - per_head.amax(-1, keepdim=True)).exp().sum(1)
        q_sum = qt.sum(1)  # [Hkv, D]
        for r, basis in bases.items():  # basis [Hkv, D, r]
            qr = torch.einsum("hd,hdr->hr", q_sum, basis)
            kr = torch.einsum("htd,hdr->htr", keys, basis)
            tok = torch.einsum("hr,htr->ht", qr, kr)
            scores[f"lowrank-{r}"] = page_reduce(tok, p, "amax")
        forced = torch.zeros(n_pages, dtype=torch.bool)
        forced[0] = True
        forced[max(n_pages - args.recent, 0):] = True
        for name, s in scores.items():
            s = s.masked_fill(forced[None], float("inf"))
            for budget in args.budgets:
                k_sel = min(budget // p, n_pages)
                idx = s.topk(k_sel, dim=-1).indices
                kept = mass.gather(-1, idx).sum(-1)  # [Hkv]
                out.setdefault((name, budget), []).append(kept)
    import torch as _t

    return {key: _t.stack(v).mean().item() for key, v in out.items()}


def main(argv=None) -> None:
    args = parse_args(argv)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from benchmarks.common import command_line, environment, write_result
    from longseq.models.prompts import make_prompts

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    if args.model is None:
        from longseq.models.smollm2 import smollm2_path

        args.model = smollm2_path()
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, torch_dtype=torch.float32, attn_implementation="sdpa")
    model.eval()
    t0 = time.time()
    calib = make_prompts(tok, [args.calib_length], seed=99)[0]
    _, kc = capture_qk(model, calib)
    bases = {}  # layer -> {r: [Hkv, D, r]}
    for li, kl in enumerate(kc):
        _, _, vh = torch.linalg.svd(kl, full_matrices=False)  # kl [Hkv, T, D] -> vh [Hkv, D, D]
        bases[li] = {r: vh[:, :r].transpose(1, 2).contiguous() for r in args.ranks}
    prompts = make_prompts(tok, args.lengths, seed=7)
    sums, n = {}, 0
    for ids in prompts:
        qs, ks = capture_qk(model, ids)
        for li, (q, k) in enumerate(zip(qs, ks)):
            for key, v in recall_for_layer(q, k, bases[li], args).items():
                sums[key] = sums.get(key, 0.0) + v
            n += 1
        print(f"prompt of {len(ids)} tokens done ({time.time() - t0:.0f} s)", flush=True)
    table = {f"{name}@{budget}": round(v / n, 5) for (name, budget), v in sorted(sums.items())}
    d = model.config.hidden_size // model.config.num_attention_heads
    rows = []
    for name in sorted({k[0] for k in sums}):
        per_page = 2 * d if name.startswith("quest") else (int(name.split("-")[1]) * args.page_size if "-" in name else None)
        rows.append({"scorer": name, "values_per_page": per_page,
                     **{f"recall@{b}": round(sums[(name, b)] / n, 5) for b in args.budgets}})
    print(f"{'scorer':<12} {'vals/page':>9} " + " ".join(f"{'recall@' + str(b):>12}" for b in args.budgets))
    for r in rows:
        print(f"{r['scorer']:<12} {str(r['values_per_page']):>9} "
              + " ".join(f"{r[f'recall@{b}']:>12.4f}" for b in args.budgets))
    path = write_result(args.name, {"benchmark": "scorer_recall", "command": command_line(), "env": environment(),
                                    "inputs": {k: v for k, v in vars(args).items() if k != "name"},
                                    "rows": rows, "table": table, "seconds": round(time.time() - t0, 1)})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
