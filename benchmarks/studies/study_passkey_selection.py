"""Does sparse decode keep the pass key's pages? The Triton select vs its PyTorch reference on real queries.

The GPU fidelity run lost pass keys that dense found (docs/benchmarks/archive.md, sparse). This study replays
the answer steps offline: SmolLM2-135M-Instruct through transformers reads a passkey prompt plus the key's
tokens (teacher-forced); the post-RoPE keys of every layer go into a paged cache (identity block table), page
summaries are built, and for each answer query (the positions that predict the key's tokens), each sparse layer
(``--dense-layers`` and up) and each KV head, the pages kept by
  kernel     ``select_topk_pages`` (Triton; in the interpreter without CUDA), summaries by the Triton kernel on CUDA
  reference  ``select_topk_pages_torch`` (the CPU engine's path), summaries by ``naive.update_page_summary_ref``
are compared: same page sets, the dense attention mass each keeps (GQA group mean), and the share of the mass
on the needle's pages (the pages holding the key in the prompt) that each keeps. Prompts use the fidelity
bench's seeds (``eval.study``: passkey ``i`` of a run uses seed ``i``), so ``--lengths 6000,7600 --seeds 1,2``
rebuilds the two prompts the GPU run lost.

    python -m benchmarks.studies.study_passkey_selection --lengths 6000,7600 --seeds 1,2

Writes ``benchmarks/results/<name>.json``.
"""

from __future__ import annotations

import argparse
import os
import time


def parse_args(argv=None):
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    p = argparse.ArgumentParser(prog="python -m benchmarks.studies.study_passkey_selection",
                                description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="HF checkpoint folder (default: the SmolLM2 test model)")
    p.add_argument("--lengths", type=ints, default=[6000, 7600])
    p.add_argument("--seeds", type=ints, default=[1, 2], help="passkey prompt seeds, one per length")
    p.add_argument("--budgets", type=ints, default=[1024, 2048])
    p.add_argument("--summaries", default="cache,fp8")
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--dense-layers", type=int, default=2)
    p.add_argument("--sink-pages", type=int, default=1)
    p.add_argument("--recent-pages", type=int, default=4)
    p.add_argument("--variants", action="store_true",
                   help="only the scorer variants (PyTorch, fp32 keys): Quest group sum / group max, page 8, oracle; "
                        "needle mass kept per variant and per layer")
    p.add_argument("--name", default="passkey_selection")
    args = p.parse_args(argv)
    if len(args.seeds) != len(args.lengths):
        p.error("--seeds needs one seed per length")
    return args


def find_sub(seq: list[int], sub: list[int]) -> list[int]:
    """Start positions of ``sub`` in ``seq``."""
    n = len(sub)
    return [i for i in range(len(seq) - n + 1) if seq[i:i + n] == sub]


def needle_pages(tok, ids: list[int], key: str, page_size: int) -> set[int]:
    """Pages of the prompt holding the key's digits (both mentions), found by re-tokenizing the key in the
    contexts the needle sentence gives it."""
    pages = set()
    for text in (f" {key}", f"{key}", f" {key}."):
        sub = tok(text, add_special_tokens=False)["input_ids"]
        for s in find_sub(ids, sub):
            pages.update(range(s // page_size, (s + len(sub) - 1) // page_size + 1))
    return pages


def paged_layer(k, block_size: int, cache_dtype, device):
    """``k [Hkv, T, D]`` -> key cache ``[num_blocks, block_size, Hkv, D]`` (identity table), slot mapping."""
    import torch

    hkv, t, d = k.shape
    nblk = -(-t // block_size)
    cache = torch.zeros(nblk, block_size, hkv, d, dtype=cache_dtype, device=device)
    cache.view(-1, hkv, d)[:t] = k.transpose(0, 1).to(cache_dtype)
    return cache, torch.arange(t, dtype=torch.int64, device=device), nblk


def token_probs(q_all, k_all, t: int):
    """Dense attention of query position ``t`` over keys ``0..t``, mean over each GQA group: ``[Hkv, t+1]`` fp32."""
    import torch

    hq, hkv, d = q_all.shape[0], k_all.shape[0], k_all.shape[2]
    qt = q_all[:, t].view(hkv, hq // hkv, d).float()
    return torch.softmax(torch.einsum("hgd,htd->hgt", qt, k_all[:, : t + 1].float()) / d**0.5, -1).mean(1)


def variant_needle_kept(q_all, k_all, queries, needle, budget, args):
    """Needle mass kept per scorer variant for one layer: {variant: (kept, total)} summed over heads/queries."""
    import torch

    from benchmarks.studies.study_scorer_recall import page_reduce

    hq, hkv, d = q_all.shape[0], k_all.shape[0], k_all.shape[2]
    out = {}
    for t in queries:
        qt = q_all[:, t].view(hkv, hq // hkv, d).float()
        keys = k_all[:, : t + 1].float()
        probs = token_probs(q_all, k_all, t)
        for p in (args.page_size, args.page_size // 2):
            n_pages = -(-(t + 1) // p)
            mass = page_reduce(probs, p, "sum")  # [Hkv, n_pages]
            kp = torch.nn.functional.pad(keys, (0, 0, 0, n_pages * p - t - 1)).view(hkv, n_pages, p, d)
            last = (t + 1) - (n_pages - 1) * p
            kp[:, -1, last:] = kp[:, -1, :1]
            kmin, kmax = kp.amin(2), kp.amax(2)
            per_head = (torch.einsum("hgd,hpd->hgp", qt.clamp(min=0), kmax)
                        + torch.einsum("hgd,hpd->hgp", qt.clamp(max=0), kmin))  # [Hkv, G, pages]
            scores = {f"quest_sum_p{p}": per_head.sum(1), f"quest_max_p{p}": per_head.amax(1)}
            if p == args.page_size:
                scores["oracle"] = mass
            nd = sorted({tok_pos // p for pg in needle for tok_pos in range(pg * args.page_size,
                                                                             (pg + 1) * args.page_size)
                         if tok_pos // p < n_pages})
            forced = torch.zeros(n_pages, dtype=torch.bool, device=mass.device)
            forced[: args.sink_pages * args.page_size // p] = True
            forced[max(n_pages - args.recent_pages * args.page_size // p, 0):] = True
            for name, sc in scores.items():
                idx = sc.masked_fill(forced[None], float("inf")).topk(min(budget // p, n_pages), -1).indices
                keep = torch.zeros_like(mass, dtype=torch.bool).scatter_(1, idx, True)
                kept = float((mass[:, nd] * keep[:, nd]).sum()) if nd else 0.0
                tot = float(mass[:, nd].sum()) if nd else 0.0
                a, b = out.get(name, (0.0, 0.0))
                out[name] = (a + kept, b + tot)
    return out


def run_variants(args, tok, model, capture_qk, passkey_prompt) -> list[dict]:
    rows = []
    for length, seed in zip(args.lengths, args.seeds):
        ids, key = passkey_prompt(tok, length, seed=seed)
        full = ids + tok(" " + key, add_special_tokens=False)["input_ids"]
        qs, ks = capture_qk(model, full)
        needle = needle_pages(tok, ids, key, args.page_size)
        queries = list(range(len(ids) - 1, len(full) - 1))
        for budget in args.budgets:
            total, per_layer = {}, {}
            for li in range(args.dense_layers, len(qs)):
                for name, (kept, tot) in variant_needle_kept(qs[li], ks[li], queries, needle, budget, args).items():
                    a, b = total.get(name, (0.0, 0.0))
                    total[name] = (a + kept, b + tot)
                    per_layer.setdefault(name, []).append(round(kept / max(tot, 1e-12), 3))
            row = {"length": len(ids), "seed": seed, "budget": budget,
                   "needle_mass_kept": {n: round(a / max(b, 1e-12), 4) for n, (a, b) in total.items()},
                   "needle_mass_kept_per_layer": per_layer, "first_layer": args.dense_layers}
            rows.append(row)
            print(f"{len(ids)} tokens seed {seed} budget {budget}: needle mass kept "
                  + ", ".join(f"{n} {v:.3f}" for n, v in row["needle_mass_kept"].items()), flush=True)
            worst = sorted(range(len(per_layer["quest_sum_p16"])), key=lambda i: per_layer["quest_sum_p16"][i])[:5]
            print("  worst layers (quest_sum_p16): "
                  + ", ".join(f"{args.dense_layers + i}: {per_layer['quest_sum_p16'][i]:.2f}" for i in worst))
    return rows


def main(argv=None) -> None:
    args = parse_args(argv)
    import torch

    cuda = torch.cuda.is_available()
    if not cuda:  # before any kernel module is imported: triton.jit reads it at decoration time
        os.environ["TRITON_INTERPRET"] = "1"
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from benchmarks.common import command_line, environment, write_result
    from benchmarks.studies.study_scorer_recall import capture_qk, page_reduce
    from longseq.eval.passkey import passkey_prompt
    from longseq.kernels.sparse_decode import naive
    from longseq.kernels.sparse_decode.page_summary import FP8, allocate_page_summary, update_page_summary
    from longseq.kernels.sparse_decode.select import select_topk_pages
    from longseq.kernels.sparse_decode.torch_ops import select_topk_pages_torch

    dev = "cuda" if cuda else "cpu"
    if args.model is None:
        from longseq.models.smollm2 import smollm2_path

        args.model = smollm2_path()
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, torch_dtype=torch.bfloat16 if cuda else torch.float32,
                                                 attn_implementation="sdpa").to(dev).eval()
    p, block = args.page_size, 16
    t0 = time.time()
    if args.variants:
        rows = run_variants(args, tok, model, capture_qk, passkey_prompt)
        path = write_result(args.name, {"benchmark": "passkey_selection_variants", "command": command_line(),
                                        "env": environment(), "inputs": {k: v for k, v in vars(args).items()
                                                                         if k != "name"},
                                        "device": dev, "rows": rows, "seconds": round(time.time() - t0, 1)})
        print(f"wrote {path}")
        return
    prompts = []
    for length, seed in zip(args.lengths, args.seeds):
        ids, key = passkey_prompt(tok, length, seed=seed)
        answer = tok(" " + key, add_special_tokens=False)["input_ids"]
        full = ids + answer
        qs, ks = capture_qk(model, full)  # q [L, Hq, T, D], k [L, Hkv, T, D], fp32 on CPU
        needle = needle_pages(tok, ids, key, p)
        queries = list(range(len(ids) - 1, len(full) - 1))  # positions that predict the key's tokens
        rows = []
        for summary in args.summaries.split(","):
            for budget in args.budgets:
                agg = dict(same_sets=0, rows=0, mass_ref=0.0, mass_kernel=0.0, needle_mass=0.0,
                           needle_ref=0.0, needle_kernel=0.0)
                for li in range(args.dense_layers, len(qs)):
                    q_all, k_all = qs[li], ks[li]
                    hkv, d = k_all.shape[0], k_all.shape[2]
                    cache_k, slots, nblk = paged_layer(k_all, block, torch.bfloat16, dev)
                    sdt = FP8 if summary == "fp8" else torch.bfloat16
                    sums = {}
                    for who in ("ref", "kernel"):
                        pmin, pmax = allocate_page_summary(nblk, block, hkv, d, p, torch.bfloat16, dev, sdt)
                        if who == "kernel" and cuda:
                            update_page_summary(cache_k, slots, pmin, pmax, p)
                        else:
                            naive.update_page_summary_ref(cache_k, slots, pmin, pmax, p)
                        sums[who] = (pmin, pmax)
                    q = torch.stack([q_all[:, t] for t in queries]).to(torch.bfloat16).to(dev)  # [B, Hq, D]
                    seq_lens = torch.tensor([t + 1 for t in queries], dtype=torch.int32, device=dev)
                    table = torch.arange(nblk, dtype=torch.int32, device=dev).expand(len(queries), nblk).contiguous()
                    sel = dict(ref=select_topk_pages_torch(q, *sums["ref"], table, seq_lens, p, block, budget // p,
                                                           args.sink_pages, args.recent_pages)[0],
                               kernel=select_topk_pages(q, *sums["kernel"], table, seq_lens, p, block, budget // p,
                                                        args.sink_pages, args.recent_pages)[0])
                    for bi, t in enumerate(queries):
                        n_pages = -(-(t + 1) // p)
                        mass = page_reduce(token_probs(q_all, k_all, t), p, "sum")  # [Hkv, n_pages]
                        nd = sorted(x for x in needle if x < n_pages)
                        for h in range(hkv):
                            got = {}
                            for who in ("ref", "kernel"):
                                ids_ = sel[who][bi, h].cpu().long()
                                got[who] = set(ids_[ids_ >= 0].tolist())
                            agg["rows"] += 1
                            agg["same_sets"] += got["ref"] == got["kernel"]
                            agg["mass_ref"] += float(mass[h, sorted(got["ref"])].sum())
                            agg["mass_kernel"] += float(mass[h, sorted(got["kernel"])].sum())
                            if nd:
                                agg["needle_mass"] += float(mass[h, nd].sum())
                                agg["needle_ref"] += float(mass[h, [x for x in nd if x in got["ref"]]].sum())
                                agg["needle_kernel"] += float(mass[h, [x for x in nd if x in got["kernel"]]].sum())
                n = max(agg["rows"], 1)
                nm = max(agg["needle_mass"], 1e-12)
                row = {"length": len(ids), "seed": seed, "summary": summary, "budget": budget,
                       "needle_pages": sorted(needle), "same_page_sets": agg["same_sets"] / n,
                       "mass_kept_reference": agg["mass_ref"] / n, "mass_kept_kernel": agg["mass_kernel"] / n,
                       "needle_mass_kept_reference": agg["needle_ref"] / nm,
                       "needle_mass_kept_kernel": agg["needle_kernel"] / nm, "rows": agg["rows"]}
                rows.append(row)
                print(f"{len(ids)} tokens seed {seed} {summary:5s} budget {budget}: same sets "
                      f"{row['same_page_sets']:.3f}, mass kept ref {row['mass_kept_reference']:.3f} / kernel "
                      f"{row['mass_kept_kernel']:.3f}, needle mass kept ref {row['needle_mass_kept_reference']:.3f} / "
                      f"kernel {row['needle_mass_kept_kernel']:.3f} ({time.time() - t0:.0f} s)", flush=True)
        prompts.append({"length": len(ids), "seed": seed, "key": key, "rows": rows})
    path = write_result(args.name, {"benchmark": "passkey_selection", "command": command_line(),
                                    "env": environment(), "inputs": {k: v for k, v in vars(args).items()
                                                                     if k != "name"},
                                    "device": dev, "prompts": prompts, "seconds": round(time.time() - t0, 1)})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
