"""Top-k page selection on a GPU: rows split over several programs (``topk_split.py``) vs one program per row.

Needs only torch and triton (no vLLM). Score rows ``[B, Hkv, pages]`` fp32 as the score kernel writes them, in three
patterns: ``random`` (continuous, no ties), ``ties`` (8 distinct values: what fp8 page summaries of a dummy-weight
model give, the in-engine case, slower than random rows: docs/benchmarks/sparse.md) and ``smooth`` (a random walk
along the row: top pages cluster, as with RoPE'd keys). Every variant's selection is checked equal to the
one-program select first; each split size is timed with a second merge launch and with the merge fused into the last
segment program (``..._fused``). Timing: ``--inner`` calls captured in one CUDA graph, replayed ``--reps`` times
after warm-up on a side stream (CUDA events); median per call.

    python -m benchmarks.bench_topk_split --pages 8192 --batches 1,8
Writes benchmarks/results/<name>.json (default ``topk_split``).
"""

from __future__ import annotations

import argparse
import sys


def parse_args(argv=None):
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_topk_split", description=__doc__.split("\n")[0])
    p.add_argument("--pages", type=int, default=8192, help="row width (block table pages: 131072 tokens / 16)")
    p.add_argument("--live", type=ints, default=[8064, 2048], help="live pages per request (126K, 32K tokens)")
    p.add_argument("--batches", type=ints, default=[1, 8])
    p.add_argument("--hkv", type=int, default=8)
    p.add_argument("--num-select", type=int, default=128)
    p.add_argument("--segments", type=ints, default=[512, 1024, 2048], help="segment sizes to time")
    p.add_argument("--patterns", default="random,ties,smooth")
    p.add_argument("--inner", type=int, default=20)
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--name", default="topk_split")
    return p.parse_args(argv)


def make_scores(pattern: str, bsz: int, hkv: int, pages: int, live: int, gen):
    import torch

    if pattern == "random":
        s = torch.randn(bsz, hkv, pages, generator=gen)
    elif pattern == "ties":
        s = torch.randint(0, 8, (bsz, hkv, pages), generator=gen).float() * 0.125
    elif pattern == "smooth":
        s = torch.randn(bsz, hkv, pages, generator=gen).cumsum(-1) * 0.05
    else:
        raise ValueError(pattern)
    s[:, :, 0] = float("inf")
    s[:, :, live - 4:live] = float("inf")
    s[:, :, live:] = float("-inf")
    return s.cuda()


def graph_time_us(fn, inner: int, reps: int) -> float:
    """Median microseconds per ``fn()`` call: ``inner`` calls per CUDA graph replay (``bench_sparse_kernels``)."""
    from benchmarks.bench_sparse_kernels import time_graph

    return time_graph(lambda i: fn(), 1, inner, reps)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from benchmarks.common import command_line, environment, write_result
    from longseq.kernels.sparse_decode import topk_pages
    from longseq.kernels.sparse_decode.topk_split import topk_pages_split

    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    gen = torch.Generator().manual_seed(0)
    k, page_size = args.num_select, 16
    rows, failures = [], []
    for live in args.live:
        for bsz in args.batches:
            seq_lens = torch.full((bsz,), live * page_size, dtype=torch.int32, device="cuda")
            for pattern in args.patterns.split(","):
                scores = make_scores(pattern, bsz, args.hkv, args.pages, live, gen)
                one = topk_pages(scores, seq_lens, page_size, k, impl="triton", segment_pages=0)[0]
                ref = torch.topk(scores, k, dim=-1).values.min(-1).values  # k-th largest per row
                got_min = torch.gather(scores, 2, one.long()).min(-1).values
                if not torch.equal(got_min, ref):
                    failures.append(f"one-program select is not a top-k ({pattern}, b={bsz}, live={live})")
                row = {"live_pages": live, "batch": bsz, "pattern": pattern,
                       "one_program_us": graph_time_us(
                           lambda: topk_pages(scores, seq_lens, page_size, k, impl="triton", segment_pages=0),
                           args.inner, args.reps)}
                for seg in args.segments:
                    ids = topk_pages(scores, seq_lens, page_size, k, impl="triton", segment_pages=seg)[0]
                    if not torch.equal(ids, one):
                        failures.append(f"split {seg} != one-program ({pattern}, b={bsz}, live={live})")
                    row[f"split{seg}_us"] = graph_time_us(
                        lambda seg=seg: topk_pages(scores, seq_lens, page_size, k, impl="triton", segment_pages=seg),
                        args.inner, args.reps)
                    ids = topk_pages_split(scores, seq_lens, page_size, k, segment_pages=seg, fused_merge=True)[0]
                    if not torch.equal(ids, one):
                        failures.append(f"split{seg}_fused != one-program ({pattern}, b={bsz}, live={live})")
                    row[f"split{seg}_fused_us"] = graph_time_us(
                        lambda seg=seg: topk_pages_split(scores, seq_lens, page_size, k, segment_pages=seg,
                                                         fused_merge=True), args.inner, args.reps)
                variants = [f"split{s}" for s in args.segments] + [f"split{s}_fused" for s in args.segments]
                best = min(variants, key=lambda v: row[f"{v}_us"])
                row["best_split"] = best
                row["ratio_one_over_best_split"] = row["one_program_us"] / row[f"{best}_us"]
                rows.append(row)
                print(f"live={live} b={bsz} {pattern:6s}: one program {row['one_program_us']:.1f} us | "
                      + " ".join(f"split{s} {row[f'split{s}_us']:.1f}/{row[f'split{s}_fused_us']:.1f}f"
                                 for s in args.segments)
                      + f" | best {best}, one/best {row['ratio_one_over_best_split']:.2f}x", flush=True)
    payload = {"benchmark": "topk_split", "command": command_line(), "env": environment(),
               "inputs": {**vars(args), "page_size": page_size}, "rows": rows, "failures": failures}
    print("wrote", write_result(args.name, payload))
    if failures:
        print("FAILURES:", *failures, sep="\n  ")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
