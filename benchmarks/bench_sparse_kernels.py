"""Quest sparse-decode kernels vs dense FlashAttention paged decode, one attention layer, on a GPU.

Llama-3.1-8B layout by default (Hq=32, Hkv=8, D=128, bf16, block_size=16), page_size=16, budget 2048
tokens (num_select=128 pages) with 1 sink and 4 recent pages; page summaries in fp8 e4m3 (the default of
``allocate_page_summary``). Per (context, batch) it times the library defaults:

    score       score_pages (reads every page's min/max once)
    topk        topk_pages on those scores (Triton: group-max candidate filter + radix select;
                ``topk_torch``: torch.topk + sort)
    select      select_topk_pages = score + top-k, one fused launch  (``select_torch``: score, then torch.topk)
    sparse      sparse_paged_decode over the selected pages (split-K, merge fused into the split kernel)
    sel+sparse  both, as one decode step of one layer runs them
    dense       vLLM's flash_attn_varlen_func (FA3, else FA2) over the whole context
    summary     update_page_summary for one decode token per request, and for a 4096-token prefill chunk

``--variants`` adds the alternatives, each as its own column: ``sel+sparse_prev`` (the previous version:
bf16 summaries, separate whole-row top-k and split merge), bf16 summaries (``score_bf16``, ``select_bf16*``),
unfused launches (``select_unfused``, ``sparse_unfused``), score tile sizes (``score_bn*``), top-k candidate
caps and warps (``topk_*``, ``select_fused_*``), and split counts / warps / pipeline stages of the sparse
decode (``sparse_s*``, ``sparse_w8``, ``sparse_st*``).

Timing: each op is captured in a CUDA graph ``--inner`` times back to back (decode runs under CUDA graphs
in vLLM, so launch gaps are those of a graph) and the graph is replayed ``--reps`` times; the median over
replays divided by ``--inner`` is reported. The inputs rotate among copies whose total size exceeds 3x the
L2 cache (per summary dtype), so summaries that would fit in L2 (16.8 MB in fp8 at 128K, batch 1) are read
from HBM as in a real model, where every other layer's data passes through L2 in between. ``--eager`` adds
``triton.testing.do_bench`` times (launch overheads included, L2 flushed).

Correctness is checked first: sparse decode with every page selected vs FlashAttention and vs the fp32
PyTorch reference (small size); and at each benchmark size the filtered Triton top-k vs torch.topk, fused vs
unfused selection, fp8 scores >= bf16 scores (outward rounding keeps the bound), the overlap of the fp8 and
bf16 selections, the sparse output vs the reference on the selected pages, and fused vs separate merge.

Example (GPU machine):
    python -m benchmarks.bench_sparse_kernels --contexts 131072,32768 --batches 1,8 --variants
Writes benchmarks/results/sparse_kernels.json and prints a table. ``TRITON_INTERPRET=1 ... --smoke
--contexts 2048 --batches 2 --hq 8 --hkv 2 --head-size 64 --num-select 8 --variants`` runs every op once on
the CPU (a check of this script).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys


def parse_args(argv=None):
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_sparse_kernels", description=__doc__.split("\n")[0])
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
    p.add_argument("--table-tokens", type=int, default=0,
                   help="block table width in tokens, as the engine's max_model_len makes it (0: the context)")
    p.add_argument("--key-pattern", default="random", choices=["random", "smooth"],
                   help="smooth: page scores drift with position (runs of top pages), as in a real engine")
    p.add_argument("--num-splits", type=int, default=None, help="sparse decode split-K (default: heuristic)")
    p.add_argument("--inner", type=int, default=20, help="calls per captured graph")
    p.add_argument("--reps", type=int, default=30, help="graph replays timed")
    p.add_argument("--eager", action="store_true", help="also time without graphs (triton do_bench)")
    p.add_argument("--skip-dense", action="store_true")
    p.add_argument("--variants", action="store_true",
                   help="also time the alternatives (bf16 summaries, unfused launches, top-k/split/warp settings)")
    p.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)  # CPU interpreter run of every op
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
    """A filled paged cache (shuffled blocks), its page summaries in fp8 (the default) and in the cache dtype,
    and input copies to rotate through (per summary dtype: enough that they exceed 3x the L2 cache)."""

    def __init__(self, args, ctx: int, batch: int, l2_bytes: int, seed: int = 0, dev: str = "cuda"):
        import torch

        from longseq.kernels.sparse_decode import allocate_page_summary, update_page_summary

        dt = getattr(torch, args.dtype)
        torch.manual_seed(seed)
        bs, p = args.block_size, args.page_size
        self.ctx, self.batch = ctx, batch
        bps = math.ceil(ctx / bs)
        num_blocks = batch * bps + 1
        kv = torch.empty(2, num_blocks, bs, args.hkv, args.head_size, dtype=dt, device=dev).normal_()
        if args.key_pattern == "smooth":
            # Scores that drift slowly with position (as RoPE makes them): a fixed direction per kv head scaled
            # by a slow wave over the context. Top pages then come in runs, the hard case for the top-k filter.
            u = torch.randn(args.hkv, args.head_size, device=dev)
            t = torch.arange(num_blocks * bs, device=dev, dtype=torch.float32).view(num_blocks, bs)
            wave = 2.0 * torch.sin(t * (2 * math.pi / 9000.0))
            kv[0] += (wave[:, :, None, None] * u[None, None]).to(dt)
        self.key_cache, self.value_cache = kv[0], kv[1]
        perm = torch.randperm(num_blocks, device=dev)
        self.block_table = perm[: batch * bps].view(batch, bps).to(torch.int32)
        width = math.ceil(max(args.table_tokens, ctx) / bs)  # vLLM's table is max_model_len wide
        pad = torch.zeros(batch, width - bps, dtype=torch.int32, device=dev)
        self.block_table = torch.cat([self.block_table, pad], dim=1).contiguous()
        self.seq_lens = torch.full((batch,), ctx, dtype=torch.int32, device=dev)
        pos = torch.arange(ctx, device=dev)
        self.slots = (self.block_table.long()[:, pos // bs] * bs + pos % bs).reshape(-1)  # request order
        self.summary_bytes, self.rot, self.page_min, self.page_max = {}, {}, {}, {}
        for name, sdt in (("fp8", torch.float8_e4m3fn), ("bf16", dt)):
            pmin, pmax = allocate_page_summary(num_blocks, bs, args.hkv, args.head_size, p, dt, dev,
                                               summary_dtype=sdt)
            update_page_summary(self.key_cache, self.slots, pmin, pmax, p)
            self.summary_bytes[name] = 2 * pmin.numel() * pmin.element_size()
            n = max(1, min(8, math.ceil(3 * l2_bytes / self.summary_bytes[name])))
            self.rot[name] = n
            # Copies keep the interleaved [pages, Hkv, 2, D] layout of allocate_page_summary.
            bufs = [pmin] + [torch.stack([pmin, pmax], dim=2).clone() for _ in range(n - 1)]
            self.page_min[name] = [pmin] + [b[:, :, 0] for b in bufs[1:]]
            self.page_max[name] = [pmax] + [b[:, :, 1] for b in bufs[1:]]
        self.rotations = max(self.rot.values())
        self.q = [torch.randn(batch, args.hq, args.head_size, device=dev).to(dt) for _ in range(self.rotations)]
        self.out = torch.empty_like(self.q[0])
        self.cu_q = torch.arange(batch + 1, dtype=torch.int32, device=dev)


def run_case(args, ctx, batch, dense, dense_label, l2_bytes, dev="cuda", timer=None):
    import torch

    from longseq.kernels.sparse_decode import (naive, score_pages, select_topk_pages, sparse_paged_decode,
                                               topk_pages, update_page_summary)

    s = Setup(args, ctx, batch, l2_bytes, dev=dev)
    p, bs, k = args.page_size, args.block_size, args.num_select
    scale = args.head_size ** -0.5
    rot8, rot16 = s.rot["fp8"], s.rot["bf16"]

    def sel(i, summ="fp8", **kw):
        return select_topk_pages(s.q[i], s.page_min[summ][i % s.rot[summ]], s.page_max[summ][i % s.rot[summ]],
                                 s.block_table, s.seq_lens, p, bs, k, args.sink, args.recent, **kw)

    def score(i, summ="fp8", out=None, **kw):
        return score_pages(s.q[i], s.page_min[summ][i % s.rot[summ]], s.page_max[summ][i % s.rot[summ]],
                           s.block_table, s.seq_lens, p, bs, args.sink, args.recent, out=out, **kw)

    def sparse(i, ids, **kw):
        kw.setdefault("num_splits", args.num_splits)
        return sparse_paged_decode(s.q[i], s.key_cache, s.value_cache, s.block_table, s.seq_lens, ids, p, scale,
                                   out=s.out, **kw)

    scores = [score(i) for i in range(rot8)]
    ids = [sel(i)[0] for i in range(rot8)]
    # Correctness at this size (continuous scores: no ties): the filtered triton top-k == torch.topk, fused ==
    # unfused, fp8 scores >= bf16 scores (outward rounding), the sparse output vs the fp32 reference, fused
    # merge == separate merge; and how much of the bf16-summary selection the fp8 one keeps.
    ids_torch = topk_pages(scores[0], s.seq_lens, p, k, impl="torch")[0]
    ids_unfused = sel(0, fused=False)[0]
    ids_bf16 = sel(0, "bf16")[0]
    sc16 = score(0, "bf16")
    fin = torch.isfinite(sc16)
    bound_gap = float(((scores[0] - sc16)[fin] / sc16[fin].abs().clamp_min(1)).min())
    overlap = float(sum(len(set(a.tolist()) & set(b.tolist())) for a, b in
                        zip(ids[0].reshape(-1, k).cpu(), ids_bf16.reshape(-1, k).cpu())) / ids[0].numel())
    ref = naive.sparse_paged_decode_ref(s.q[0], s.key_cache, s.value_cache, s.block_table, s.seq_lens, ids[0],
                                        p, scale)
    got = sparse(0, ids[0]).clone()
    got_unfused = sparse(0, ids[0], fuse_merge=False).clone()
    err = float((got.double() - ref.double()).norm() / ref.double().norm())
    check = {"triton_topk_equals_torch": bool(torch.equal(ids[0], ids_torch)),
             "fused_select_equals_unfused": bool(torch.equal(ids[0], ids_unfused)),
             "fp8_score_minus_bf16_score_min_rel": bound_gap,
             "fp8_bf16_selection_overlap": overlap,
             "sparse_vs_ref_rel_err": err,
             "fused_merge_vs_separate_max_abs_diff": float((got.float() - got_unfused.float()).abs().max())}
    check["ok"] = (check["triton_topk_equals_torch"] and check["fused_select_equals_unfused"]
                   and bound_gap > -1e-4 and err < 1e-2 and check["fused_merge_vs_separate_max_abs_diff"] < 1e-2)

    last_slots = s.slots.view(batch, ctx)[:, -1].contiguous()  # one decode token per request
    chunk_slots = s.slots[max(0, ctx - 4096) : ctx].contiguous()  # a 4096-token prefill chunk
    sc16_buf = [torch.empty_like(scores[0]) for _ in range(rot16)]
    # name -> (fn(i), rotations). Main columns first (the defaults), then the variants (--variants).
    ops = {
        "score": (lambda i: score(i, out=scores[i]), rot8),
        "topk": (lambda i: topk_pages(scores[i], s.seq_lens, p, k, impl="triton"), rot8),
        "topk_torch": (lambda i: topk_pages(scores[i], s.seq_lens, p, k, impl="torch"), rot8),
        "select": (lambda i: sel(i), rot8),
        "select_torch": (lambda i: sel(i, topk_impl="torch"), rot8),
        "sparse": (lambda i: sparse(i, ids[i]), rot8),
        "sel+sparse": (lambda i: sparse(i, sel(i)[0]), rot8),
        "summary_decode": (lambda i: update_page_summary(s.key_cache, last_slots, s.page_min["fp8"][i],
                                                         s.page_max["fp8"][i], p), rot8),
        "summary_prefill4096": (lambda i: update_page_summary(s.key_cache, chunk_slots, s.page_min["fp8"][i],
                                                              s.page_max["fp8"][i], p), rot8),
    }
    if dense is not None:
        ops["dense"] = (lambda i: dense(s.q[i], s.key_cache, s.value_cache, s.block_table, s.seq_lens, s.cu_q,
                                        ctx, scale, s.out), rot8)
    if args.variants:
        V = {
            # the previous version: bf16 summaries, separate top-k over whole rows, separate split merge
            "sel+sparse_prev": (lambda i: sparse(i, sel(i, "bf16", fused=False, candidate_cap=0, topk_num_warps=16)[0],
                                                 fuse_merge=False), rot16),
            "score_bf16": (lambda i: score(i, "bf16", out=sc16_buf[i]), rot16),
            "score_bn128": (lambda i: score(i, out=scores[i], block_n=128), rot8),
            "score_bn32": (lambda i: score(i, out=scores[i], block_n=32), rot8),
            "topk_full": (lambda i: topk_pages(scores[i], s.seq_lens, p, k, impl="triton", candidate_cap=0,
                                              num_warps=16), rot8),
            "topk_w8": (lambda i: topk_pages(scores[i], s.seq_lens, p, k, impl="triton", num_warps=8), rot8),
            "topk_w16": (lambda i: topk_pages(scores[i], s.seq_lens, p, k, impl="triton", num_warps=16), rot8),
            "topk_cap512": (lambda i: topk_pages(scores[i], s.seq_lens, p, k, impl="triton", candidate_cap=512),
                            rot8),
            "topk_cap2048": (lambda i: topk_pages(scores[i], s.seq_lens, p, k, impl="triton", candidate_cap=2048),
                             rot8),
            "select_unfused": (lambda i: sel(i, fused=False), rot8),
            "select_bf16": (lambda i: sel(i, "bf16"), rot16),
            "select_bf16_unfused": (lambda i: sel(i, "bf16", fused=False), rot16),
            "select_fused_w8": (lambda i: sel(i, fused=True, topk_num_warps=8), rot8),
            "select_fused_w16": (lambda i: sel(i, fused=True, topk_num_warps=16), rot8),
            "select_fused_w16_bn128": (lambda i: sel(i, fused=True, topk_num_warps=16, score_block_n=128), rot8),
            "select_fused_w16_bn32": (lambda i: sel(i, fused=True, topk_num_warps=16, score_block_n=32), rot8),
            "sparse_unfused": (lambda i: sparse(i, ids[i], fuse_merge=False), rot8),
            "sparse_w8": (lambda i: sparse(i, ids[i], num_warps=8), rot8),
            "sparse_st1": (lambda i: sparse(i, ids[i], num_stages=1), rot8),
            "sparse_st2": (lambda i: sparse(i, ids[i], num_stages=2), rot8),
        }
        for n in (4, 8, 16, 32):
            V[f"sparse_s{n}"] = (lambda i, n=n: sparse(i, ids[i], num_splits=n), rot8)
            V[f"sparse_s{n}_w8"] = (lambda i, n=n: sparse(i, ids[i], num_splits=n, num_warps=8), rot8)
        ops.update(V)
    times, eager = {}, {}
    for name, (fn, rotations) in ops.items():
        if timer is not None:  # smoke test: run once
            fn(0)
            times[name] = 0.0
            continue
        try:
            times[name] = time_graph(fn, rotations, args.inner, args.reps)
        except Exception as e:  # a baseline that cannot be captured is timed eagerly (noted)
            print(f"  {name}: graph capture failed ({type(e).__name__}: {e}); timing eagerly", file=sys.stderr)
            times[name] = time_eager(fn)
            eager[name + "_note"] = "graph capture failed; eager time"
        if args.eager:
            eager[name] = time_eager(fn)
    hkv, d, es = args.hkv, args.head_size, s.key_cache.element_size()
    dense_bytes = 2 * batch * ctx * hkv * d * es
    kv_sel_bytes = 2 * batch * hkv * min(k * p, ctx) * d * es
    sparse_bytes = s.summary_bytes["fp8"] + kv_sel_bytes
    row = {"context": ctx, "batch": batch, "rotations": s.rot, "times_us": times,
           "eager_times_us": eager or None, "dense": dense_label,
           "ratio_dense_over_select_sparse": times["dense"] / times["sel+sparse"]
           if "dense" in times and times["sel+sparse"] else None,
           "bytes": {"dense": dense_bytes, "select_sparse": sparse_bytes, "summaries": s.summary_bytes["fp8"],
                     "summaries_bf16": s.summary_bytes["bf16"], "kv_selected": kv_sel_bytes},
           "bytes_model_ratio": dense_bytes / sparse_bytes,
           "check": check}
    if times.get("score"):
        row["achieved_GBps"] = {"score": s.summary_bytes["fp8"] / times["score"] / 1e3,
                                "sparse": kv_sel_bytes / times["sparse"] / 1e3}
        if times.get("score_bf16"):
            row["achieved_GBps"]["score_bf16"] = s.summary_bytes["bf16"] / times["score_bf16"] / 1e3
        if "dense" in times:
            row["achieved_GBps"]["dense"] = dense_bytes / times["dense"] / 1e3
    s = ops = None  # free this size's cache before the next one
    if dev == "cuda":
        torch.cuda.empty_cache()
    return row


def check_dense_equivalence(args, dense, dev="cuda") -> dict:
    """Small size: every page selected, sparse decode == FlashAttention == fp32 reference."""
    import torch

    from longseq.kernels.sparse_decode import dense_page_ids, naive, select_topk_pages, sparse_paged_decode

    ctx, batch = (4096 + 7, 2) if dev == "cuda" else (300 + 7, 2)
    s = Setup(args, ctx, batch, l2_bytes=0, dev=dev)
    s.seq_lens[1] = ctx - ctx // 4  # a shorter request, with a partial last page
    p, bs = args.page_size, args.block_size
    scale = args.head_size ** -0.5
    max_pages = s.block_table.shape[1] * bs // p
    ids, nv = select_topk_pages(s.q[0], s.page_min["fp8"][0], s.page_max["fp8"][0], s.block_table, s.seq_lens, p,
                                bs, max_pages, args.sink, args.recent)
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


MAIN_COLS = ["score", "topk", "topk_torch", "select", "select_torch", "sparse", "sel+sparse", "dense",
             "summary_decode", "summary_prefill4096"]


def print_tables(rows, dense_label, args) -> None:
    print(f"\nmicroseconds per layer call (CUDA graph replay, median); dense = {dense_label}; "
          f"budget {args.num_select} pages x {args.page_size} tokens; summaries fp8 e4m3")
    print("| context | batch | " + " | ".join(MAIN_COLS) + " | dense/(sel+sparse) | bytes model |")
    print("|---|---|" + "---|" * (len(MAIN_COLS) + 2))
    for r in rows:
        t = r["times_us"]
        ratio = r["ratio_dense_over_select_sparse"]
        print(f"| {r['context']} | {r['batch']} | " + " | ".join(f"{t[c]:.1f}" if c in t else "-" for c in MAIN_COLS)
              + (f" | {ratio:.2f}" if ratio else " | -") + f" | {r['bytes_model_ratio']:.1f} |")
    var_cols = [c for c in rows[0]["times_us"] if c not in MAIN_COLS] if rows else []
    if var_cols:
        print("\nvariants (same units; the default of each family is in the table above)")
        for r in rows:
            t = r["times_us"]
            print(f"ctx={r['context']} b={r['batch']}: " + ", ".join(f"{c}={t[c]:.1f}" for c in var_cols))
    print("checks: " + "; ".join(f"{r['context']}x{r['batch']}: " + ", ".join(
        f"{k}={v:.2e}" if isinstance(v, float) else f"{k}={v}" for k, v in r["check"].items()) for r in rows))


def main(argv=None) -> None:
    args = parse_args(argv)
    import torch
    import triton

    from benchmarks.common import command_line, environment, write_result

    if args.smoke:  # CPU: every op once at toy sizes in Triton's interpreter (a check of this script only)
        for ctx in args.contexts:
            for batch in args.batches:
                row = run_case(args, ctx, batch, None, "skipped", 0, dev="cpu", timer="smoke")
                print(ctx, batch, row["check"])
        print(check_dense_equivalence(args, None, dev="cpu"))
        return
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
    inputs = {k: v for k, v in vars(args).items() if k not in ("name", "smoke")}
    path = write_result(args.name, {"benchmark": "sparse_kernels", "command": command_line(), "env": env,
                                    "inputs": inputs, "summary_dtype": "float8_e4m3fn",
                                    "dense_baseline": dense_label,
                                    "dense_equivalence_check": check, "rows": rows})
    print_tables(rows, dense_label, args)
    print(f"dense-equivalence ok={check['ok']}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
