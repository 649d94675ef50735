"""Page top-k: ours (``topk_pages``, the engine's default dispatch) against FlashInfer's radix ``top_k`` and
``torch.topk`` on the same score rows (issue 18, item 3).

Score rows ``[B, Hkv, table_pages]`` fp32 as the score kernel writes them: sink and recent pages ``+inf``, pages
past the request's length ``-inf``, the live pages ``random`` (no ties) or ``smooth`` (a random walk: top pages in
runs, as with RoPE'd keys). FlashInfer and torch see the same rows flattened to ``[B * Hkv, table_pages]``.
Every library's selection is checked to be a top-k of the row (its smallest selected score equals the k-th
largest) before it is timed. Timing: ``--inner`` calls in one CUDA graph replayed ``--reps`` times (CUDA events,
median per call); a call that cannot be captured is timed eagerly with ``triton.testing.do_bench`` and marked so.
Ours also returns the pages sorted ascending; the library calls return them unsorted, so the comparison favours
the libraries by that sort. ``ours_flashinfer_wrapper`` is ``topk_pages(..., impl="flashinfer")``
(``kernels/sparse_decode/library_topk.py``): FlashInfer's ``top_k`` plus our contract around it (pages past the
live ones to ``-1``, ``num_valid``, int32 pages in any order), the call the engine would make.

    python -m benchmarks.bench_topk_library --batches 1,8,32 --live 1024,4096,8192,16128
Writes benchmarks/results/<name>.json (default ``topk_library``).
"""

from __future__ import annotations

import argparse
import sys


def parse_args(argv=None):
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_topk_library", description=__doc__.split("\n")[0])
    p.add_argument("--table-pages", type=int, default=16384, help="row width (131072 tokens / page 8)")
    p.add_argument("--live", type=ints, default=[1024, 4096, 8192, 16128],
                   help="live pages per request (8K, 32K, 64K, 126K tokens at page 8)")
    p.add_argument("--batches", type=ints, default=[1, 8, 32])
    p.add_argument("--hkv", type=int, default=8)
    p.add_argument("--num-select", type=int, default=256, help="pages kept (budget 2048 / page 8)")
    p.add_argument("--patterns", default="random,smooth")
    p.add_argument("--inner", type=int, default=20)
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--name", default="topk_library")
    return p.parse_args(argv)


def make_scores(pattern: str, bsz: int, hkv: int, pages: int, live: int, gen):
    import torch

    if pattern == "random":
        s = torch.randn(bsz, hkv, pages, generator=gen)
    elif pattern == "smooth":
        s = torch.randn(bsz, hkv, pages, generator=gen).cumsum(-1) * 0.05
    else:
        raise ValueError(pattern)
    s[:, :, 0] = float("inf")
    s[:, :, live - 8:live] = float("inf")
    s[:, :, live:] = float("-inf")
    return s.cuda()


def is_topk(scores, idx, k: int) -> bool:
    """``idx`` ``[rows, k]`` holds a top-k of each ``scores`` row ``[rows, width]``."""
    import torch

    kth = torch.topk(scores, k, dim=-1).values[:, -1]
    got = torch.gather(scores, 1, idx.long())
    return bool(torch.equal(got.min(-1).values, kth)) and bool((idx.long().sort(-1).values.diff(dim=-1) > 0).all())


def is_topk_pages(scores, page_ids, k: int, live: int) -> bool:
    """``page_ids`` ``[rows, k]`` (``topk_pages``: ``-1`` for unused slots, any order), with the ``-1`` dropped,
    holds a top-``min(k, live)`` of each ``scores`` row (every row has ``live`` live pages)."""
    n = min(k, live)
    ok = page_ids >= 0
    if not bool((ok.sum(-1) == n).all()):
        return False
    return is_topk(scores, page_ids[ok].view(-1, n), n)


def time_us(fn, inner: int, reps: int) -> tuple[float, str]:
    import torch
    import triton

    from benchmarks.bench_sparse_kernels import time_graph

    try:
        return time_graph(lambda i: fn(), 1, inner, reps), "cuda_graph"
    except Exception:  # noqa: BLE001 - not capturable: time it eagerly instead
        torch.cuda.synchronize()
        return triton.testing.do_bench(fn, warmup=25, rep=200) * 1e3, "eager_do_bench"


LIBS = ("flashinfer_top_k", "ours_flashinfer_wrapper", "torch_topk")  # each timed call reported against ours


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from benchmarks.common import command_line, environment, write_result
    from longseq.kernels.sparse_decode import topk_pages

    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    try:
        import flashinfer
        from flashinfer.topk import top_k as fi_top_k
        fi_version = getattr(flashinfer, "__version__", "?")
    except ImportError as e:  # still time ours vs torch
        fi_top_k, fi_version = None, f"not importable: {e}"
    gen = torch.Generator().manual_seed(0)
    k, page_size = args.num_select, 8
    rows, failures = [], []
    for live in args.live:
        for bsz in args.batches:
            seq_lens = torch.full((bsz,), live * page_size, dtype=torch.int32, device="cuda")
            for pattern in args.patterns.split(","):
                scores = make_scores(pattern, bsz, args.hkv, args.table_pages, live, gen)
                flat = scores.view(bsz * args.hkv, args.table_pages)
                calls = {"ours": lambda: topk_pages(scores, seq_lens, page_size, k),
                         "torch_topk": lambda: torch.topk(flat, k, dim=-1)}
                if fi_top_k is not None:
                    calls["flashinfer_top_k"] = lambda: fi_top_k(flat, k)
                    calls["ours_flashinfer_wrapper"] = lambda: topk_pages(scores, seq_lens, page_size, k,
                                                                          impl="flashinfer")
                row = {"live_pages": live, "batch": bsz, "pattern": pattern}
                for name, fn in calls.items():
                    try:
                        out = fn()
                        if name.startswith("ours"):  # page_ids [B, Hkv, k] int32, -1 for unused slots
                            good = is_topk_pages(flat, out[0].view(bsz * args.hkv, k), k, live)
                        else:
                            good = is_topk(flat, out[1], k)
                        if not good:
                            failures.append(f"{name} is not a top-k ({pattern}, b={bsz}, live={live})")
                        row[f"{name}_us"], row[f"{name}_timing"] = time_us(fn, args.inner, args.reps)
                    except Exception as e:  # noqa: BLE001 - record and go on with the other calls
                        failures.append(f"{name} failed ({pattern}, b={bsz}, live={live}): {e!r}"[:300])
                for lib in LIBS:
                    if f"{lib}_us" in row and "ours_us" in row:
                        row[f"{lib}_over_ours"] = row[f"{lib}_us"] / row["ours_us"]
                rows.append(row)
                print(f"live={live:5d} b={bsz:2d} {pattern:6s}: " + " ".join(
                    f"{n} {row[f'{n}_us']:.1f} us" for n in calls if f"{n}_us" in row)
                      + "".join(f" | {lib}/ours {row[f'{lib}_over_ours']:.2f}x"
                                for lib in LIBS if f"{lib}_over_ours" in row),
                      flush=True)
    payload = {"benchmark": "topk_library", "command": command_line(), "env": {**environment(),
               "flashinfer": fi_version}, "inputs": {**vars(args), "page_size": page_size}, "rows": rows,
               "failures": failures}
    print("wrote", write_result(args.name, payload))
    if failures:
        print("FAILURES:", *failures, sep="\n  ")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
