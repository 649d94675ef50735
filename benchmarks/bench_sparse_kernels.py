"""Quest sparse-decode kernels vs dense FlashAttention paged decode, one attention layer, on a GPU.

Llama-3.1-8B layout by default (Hq=32, Hkv=8, D=128, bf16, block_size=16), page_size=16, budget 2048
tokens (num_select=128 pages) with 1 sink and 4 recent pages. Per (context, batch) it times:

    score       score_pages (reads every page's min/max once)
    topk        topk_pages on those scores (Triton radix select; ``topk_torch``: torch.topk + sort)
    select      select_topk_pages = score + topk        (``select_torch``: with torch.topk)
    sparse      sparse_paged_decode over the selected pages (split-K + merge)
    sel+sparse  both, as one decode step of one layer runs them
    dense       vLLM's flash_attn_varlen_func (FA3, else FA2) over the whole context
    summary     update_page_summary for one decode token per request, and for a 4096-token prefill chunk

Timing: each op is captured in a CUDA graph ``--inner`` times back to back (decode runs under CUDA graphs
in vLLM, so launch gaps are those of a graph) and the graph is replayed ``--reps`` times; the median over
replays divided by ``--inner`` is reported. The inputs rotate among copies whose total size exceeds 3x the
L2 cache, so summaries that would fit in L2 (33.5 MB at 128K, batch 1) are read from HBM as in a real
model, where every other layer's data passes through L2 in between. ``--eager`` adds
``triton.testing.do_bench`` times (launch overheads included, L2 flushed).

Correctness is checked first: sparse decode with every page selected vs FlashAttention and vs the fp32
PyTorch reference (small size), and at each benchmark size the sparse output vs the reference on the
selected pages and the Triton top-k vs torch.topk.

Example (GPU machine):
    python benchmarks/bench_sparse_kernels.py --contexts 131072,32768 --batches 1,8
Writes benchmarks/results/sparse_kernels.json and prints a table.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # benchmarks.common when run as a script from a checkout


def parse_args(argv=None):
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--contexts", type=ints, default=[131072, 32768])
    p.add_argument("--batches", type=ints, default=[1, 8])
    p.add_argument("--num-select", type=int, default=128, help="pages kept per (request, kv head)")
    p.add_argument("--sink", type=int, default=1)
    p.add_argument("--recent", type=int, default=4)
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--hq", type=int, default=32)
    p.add_argument("--hkv", type=int, default=8)
    p.add_argument("--head-size", type=int, default=128)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    p.add_argument("--num-splits", type=int, default=None, help="sparse decode split-K (default: heuristic)")
    p.add_argument("--inner", type=int, default=20, help="calls per captured graph")
    p.add_argument("--reps", type=int, default=30, help="graph replays timed")
    p.add_argument("--eager", action="store_true", help="also time without graphs (triton do_bench)")
    p.add_argument("--skip-dense", action="store_true")
    p.add_argument("--name", default="sparse_kernels")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------ dense baseline
def dense_attention():
    """``(fn, label)``: vLLM's FlashAttention paged decode, FA3 where supported, else FA2."""
    try:
        from vllm.vllm_flash_attn import flash_attn_varlen_func
    except ImportError as e:
        return None, f"unavailable ({e})"
    version = 2
    try:
        from vllm.vllm_flash_attn.flash_attn_interface import is_fa_version_supported

        version = 3 if is_fa_version_supported(3) else 2
    except ImportError:
        pass

    def fn(q, key_cache, value_cache, block_table, seq_lens, cu_q, max_k, scale, out, fa_version=None):
        return flash_attn_varlen_func(q=q, k=key_cache, v=value_cache, max_seqlen_q=1, cu_seqlens_q=cu_q,
                                      max_seqlen_k=max_k, seqused_k=seq_lens, softmax_scale=scale,
                                      causal=True, block_table=block_table, out=out,
                                      fa_version=fa_version or version)

    return fn, f"FA{version}"


# ------------------------------------------------------------------------------------------ timing
def time_graph(fn, rotations: int, inner: int, reps: int) -> float:
    """Median microseconds per ``fn(i)`` call, ``inner`` calls (rotating ``i``) per graph replay."""
    import torch

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up (compilation, allocator) outside the capture
        for i in range(rotations):
            fn(i)
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(inner):
            fn(i % rotations)
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        graph.replay()
        e1.record()
        e1.synchronize()
        times.append(e0.elapsed_time(e1) * 1e3 / inner)
    del graph
    return statistics.median(times)


def time_eager(fn) -> float:
    import triton

    return triton.testing.do_bench(lambda: fn(0), warmup=25, rep=100, return_mode="median") * 1e3


# ------------------------------------------------------------------------------------------ inputs
class Setup:
    """A filled paged cache (shuffled blocks), its page summaries and ``rotations`` input copies."""

    def __init__(self, args, ctx: int, batch: int, l2_bytes: int, seed: int = 0):
        import torch

        from longseq.kernels.sparse_decode import allocate_page_summary, update_page_summary

        dev, dt = "cuda", getattr(torch, args.dtype)
        torch.manual_seed(seed)
        bs, p = args.block_size, args.page_size
        self.ctx, self.batch = ctx, batch
        bps = math.ceil(ctx / bs)
        num_blocks = batch * bps + 1
        kv = torch.empty(2, num_blocks, bs, args.hkv, args.head_size, dtype=dt, device=dev).normal_()
        self.key_cache, self.value_cache = kv[0], kv[1]
        perm = torch.randperm(num_blocks, device=dev)
        self.block_table = perm[: batch * bps].view(batch, bps).to(torch.int32).contiguous()
        self.seq_lens = torch.full((batch,), ctx, dtype=torch.int32, device=dev)
        pos = torch.arange(ctx, device=dev)
        self.slots = (self.block_table.long()[:, pos // bs] * bs + pos % bs).reshape(-1)  # request order
        pmin, pmax = allocate_page_summary(num_blocks, bs, args.hkv, args.head_size, p, dt, dev)
        update_page_summary(self.key_cache, self.slots, pmin, pmax, p)
        self.summary_bytes = 2 * pmin.numel() * pmin.element_size()
        # Enough copies that the rotation's summaries exceed 3x L2 (they are the bulk of the select bytes).
        self.rotations = max(1, min(8, math.ceil(3 * l2_bytes / self.summary_bytes)))
        self.page_min = [pmin] + [pmin.clone() for _ in range(self.rotations - 1)]
        self.page_max = [pmax] + [pmax.clone() for _ in range(self.rotations - 1)]
        self.q = [torch.randn(batch, args.hq, args.head_size, device=dev).to(dt) for _ in range(self.rotations)]
        self.out = torch.empty_like(self.q[0])
        self.cu_q = torch.arange(batch + 1, dtype=torch.int32, device=dev)


def run_case(args, ctx, batch, dense, dense_label, l2_bytes):
    import torch

    from longseq.kernels.sparse_decode import (naive, score_pages, select_topk_pages, sparse_paged_decode,
                                               topk_pages, update_page_summary)

    s = Setup(args, ctx, batch, l2_bytes)
    p, bs, k = args.page_size, args.block_size, args.num_select
    scale = args.head_size ** -0.5
    sel = lambda i, impl="auto": select_topk_pages(  # noqa: E731
        s.q[i], s.page_min[i], s.page_max[i], s.block_table, s.seq_lens, p, bs, k, args.sink, args.recent,
        topk_impl=impl)
    scores = [score_pages(s.q[i], s.page_min[i], s.page_max[i], s.block_table, s.seq_lens, p, bs, args.sink,
                          args.recent) for i in range(s.rotations)]
    ids = [sel(i)[0] for i in range(s.rotations)]
    # Correctness at this size: triton top-k == torch top-k (no ties in continuous scores), sparse output
    # vs the fp32 reference on the same pages.
    ids_torch = sel(0, "torch")[0]
    same_selection = bool(torch.equal(ids[0], ids_torch))
    ref = naive.sparse_paged_decode_ref(s.q[0], s.key_cache, s.value_cache, s.block_table, s.seq_lens, ids[0],
                                        p, scale)
    got = sparse_paged_decode(s.q[0], s.key_cache, s.value_cache, s.block_table, s.seq_lens, ids[0], p, scale,
                              num_splits=args.num_splits)
    err = float((got.double() - ref.double()).norm() / ref.double().norm())

    last_slots = s.slots.view(batch, ctx)[:, -1].contiguous()  # one decode token per request
    chunk_slots = s.slots[max(0, ctx - 4096) : ctx].contiguous()  # a 4096-token prefill chunk
    ops = {
        "score": lambda i: score_pages(s.q[i], s.page_min[i], s.page_max[i], s.block_table, s.seq_lens, p, bs,
                                       args.sink, args.recent, out=scores[i]),
        "topk": lambda i: topk_pages(scores[i], s.seq_lens, p, k, impl="triton"),
        "topk_torch": lambda i: topk_pages(scores[i], s.seq_lens, p, k, impl="torch"),
        "select": lambda i: sel(i),
        "select_torch": lambda i: sel(i, "torch"),
        "sparse": lambda i: sparse_paged_decode(s.q[i], s.key_cache, s.value_cache, s.block_table, s.seq_lens,
                                                ids[i], p, scale, out=s.out, num_splits=args.num_splits),
        "sel+sparse": lambda i: sparse_paged_decode(s.q[i], s.key_cache, s.value_cache, s.block_table,
                                                    s.seq_lens, sel(i)[0], p, scale, out=s.out,
                                                    num_splits=args.num_splits),
        "summary_decode": lambda i: update_page_summary(s.key_cache, last_slots, s.page_min[i], s.page_max[i], p),
        "summary_prefill4096": lambda i: update_page_summary(s.key_cache, chunk_slots, s.page_min[i],
                                                             s.page_max[i], p),
    }
    if dense is not None:
        ops["dense"] = lambda i: dense(s.q[i], s.key_cache, s.value_cache, s.block_table, s.seq_lens, s.cu_q,
                                       ctx, scale, s.out)
    times, eager = {}, {}
    for name, fn in ops.items():
        try:
            times[name] = time_graph(fn, s.rotations, args.inner, args.reps)
        except Exception as e:  # a baseline that cannot be captured is timed eagerly (noted)
            print(f"  {name}: graph capture failed ({type(e).__name__}: {e}); timing eagerly", file=sys.stderr)
            times[name] = time_eager(fn)
            eager[name + "_note"] = "graph capture failed; eager time"
        if args.eager:
            eager[name] = time_eager(fn)
    hkv, d, es = args.hkv, args.head_size, s.key_cache.element_size()
    dense_bytes = 2 * batch * ctx * hkv * d * es
    sparse_bytes = s.summary_bytes + 2 * batch * hkv * min(k * p, ctx) * d * es
    row = {"context": ctx, "batch": batch, "rotations": s.rotations, "times_us": times,
           "eager_times_us": eager or None, "dense": dense_label,
           "ratio_dense_over_select_sparse": times["dense"] / times["sel+sparse"] if "dense" in times else None,
           "bytes": {"dense": dense_bytes, "select_sparse": sparse_bytes, "summaries": s.summary_bytes},
           "bytes_model_ratio": dense_bytes / sparse_bytes,
           "achieved_GBps": {"score": s.summary_bytes / times["score"] / 1e3,
                             **({"dense": dense_bytes / times["dense"] / 1e3} if "dense" in times else {})},
           "check": {"triton_topk_equals_torch": same_selection, "sparse_vs_ref_rel_err": err}}
    s = ops = None  # free this size's cache before the next one
    torch.cuda.empty_cache()
    return row


def check_dense_equivalence(args, dense) -> dict:
    """Small size: every page selected, sparse decode == FlashAttention == fp32 reference."""
    import torch

    from longseq.kernels.sparse_decode import dense_page_ids, naive, select_topk_pages, sparse_paged_decode

    ctx, batch = 4096 + 7, 2
    s = Setup(args, ctx, batch, l2_bytes=0)
    s.seq_lens[1] = ctx - 1000  # a shorter request, with a partial last page
    p, bs = args.page_size, args.block_size
    scale = args.head_size ** -0.5
    max_pages = s.block_table.shape[1] * bs // p
    ids, nv = select_topk_pages(s.q[0], s.page_min[0], s.page_max[0], s.block_table, s.seq_lens, p, bs, max_pages,
                                args.sink, args.recent)
    all_ids = dense_page_ids(s.block_table, s.seq_lens, p, bs, args.hkv)
    res = {"selection_is_all_pages": bool(torch.equal(ids, all_ids))}
    got = sparse_paged_decode(s.q[0], s.key_cache, s.value_cache, s.block_table, s.seq_lens, ids, p, scale)
    ref = naive.sparse_paged_decode_ref(s.q[0], s.key_cache, s.value_cache, s.block_table, s.seq_lens, all_ids,
                                        p, scale)
    rel = lambda a, b: float((a.double() - b.double()).norm() / b.double().norm())  # noqa: E731
    res["sparse_vs_fp32_ref_rel_err"] = rel(got, ref)
    if dense is not None:
        fa = dense(s.q[0], s.key_cache, s.value_cache, s.block_table, s.seq_lens, s.cu_q, ctx, scale,
                   torch.empty_like(s.q[0]))
        res["sparse_vs_fa_rel_err"] = rel(got, fa)
        res["fa_vs_fp32_ref_rel_err"] = rel(fa, ref)
    res["ok"] = res["selection_is_all_pages"] and res["sparse_vs_fp32_ref_rel_err"] < 1e-2 and \
        res.get("sparse_vs_fa_rel_err", 0) < 1e-2
    return res


def main(argv=None) -> None:
    args = parse_args(argv)
    import torch
    import triton

    from benchmarks.common import command_line, environment, write_result

    assert torch.cuda.is_available(), "needs a CUDA GPU"
    props = torch.cuda.get_device_properties(0)
    l2 = getattr(props, "L2_cache_size", 50 * 2**20)
    dense, dense_label = (None, "skipped") if args.skip_dense else dense_attention()
    print(f"dense baseline: {dense_label}", flush=True)
    check = check_dense_equivalence(args, dense)
    print(f"dense-equivalence check: {check}", flush=True)
    rows = []
    for ctx in args.contexts:
        for batch in args.batches:
            row = run_case(args, ctx, batch, dense, dense_label, l2)
            rows.append(row)
            print(f"ctx={ctx} batch={batch}: " + ", ".join(f"{k}={v:.1f}us" for k, v in row["times_us"].items()),
                  flush=True)
    env = environment()
    env["triton"] = triton.__version__
    env["sms"] = props.multi_processor_count
    env["l2_bytes"] = l2
    inputs = {k: v for k, v in vars(args).items() if k != "name"}
    path = write_result(args.name, {"benchmark": "sparse_kernels", "command": command_line(), "env": env,
                                    "inputs": inputs, "dense_baseline": dense_label,
                                    "dense_equivalence_check": check, "rows": rows})
    cols = ["score", "topk", "topk_torch", "select", "select_torch", "sparse", "sel+sparse", "dense",
            "summary_decode", "summary_prefill4096"]
    print(f"\nmicroseconds per layer call (CUDA graph replay, median); dense = {dense_label}; "
          f"budget {args.num_select} pages x {args.page_size} tokens")
    print("| context | batch | " + " | ".join(cols) + " | dense/(sel+sparse) | bytes model |")
    print("|---|---|" + "---|" * (len(cols) + 2))
    for r in rows:
        t = r["times_us"]
        ratio = r["ratio_dense_over_select_sparse"]
        print(f"| {r['context']} | {r['batch']} | " + " | ".join(f"{t[c]:.1f}" if c in t else "-" for c in cols)
              + (f" | {ratio:.2f}" if ratio else " | -") + f" | {r['bytes_model_ratio']:.1f} |")
    print(f"checks: dense-equivalence ok={check['ok']}; per size: "
          + "; ".join(f"{r['context']}x{r['batch']}: topk==torch {r['check']['triton_topk_equals_torch']}, "
                      f"sparse err {r['check']['sparse_vs_ref_rel_err']:.1e}" for r in rows))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
