"""Hierarchical page selection (blocks, then pages: ``kernels/sparse_decode/hierarchical.py``) against the flat
``select_topk_pages``, on a GPU (issue 18, item 2).

Llama-3.1-8B layout by default (Hq=32, Hkv=8, D=128, bf16 cache), fp8 summaries, page 8, cache blocks of 128 and
64 tokens, budget 2048 tokens (``num_select`` 256 pages) with 1 sink and 4 recent pages, for 126K tokens at batch
1 and 32K at batch 8. Per (case, block size) it times, each in a CUDA graph (``--inner`` calls per graph, median
of ``--reps`` replays, inputs rotated through copies larger than 3x L2, as ``bench_sparse_kernels``):

    flat              select_topk_pages, the default dispatch
    flat_flashinfer   select_topk_pages(topk_impl="flashinfer"), when FlashInfer imports
    hier_nb<N>        select_topk_pages_hierarchical keeping N blocks, and its two parts:
    coarse_nb<N>      block scores + block top-k;   fine_nb<N>: the fused page score + select over those blocks
    block_summary_*   update_block_summary for one decode token per request and for a 4096-token prefill chunk
    page_summary_decode  update_page_summary for one decode token per request (what the block update adds to)

N runs over ``--blocks-select`` where the N blocks can hold the budget (N * ppb >= num_select).
Recall: the fraction of the flat top-k pages that the hierarchical selection also picks (all rows, ``--recall-
queries`` queries), and of the pages holding planted tokens. Keys (``make_keys``) are an AR(1) random walk with a
correlation length of ``--corr`` tokens plus white noise, RoPE-rotated (theta 500000) as the cache holds them, and
``--planted`` tokens per (request, kv head) set along that head's summed query: smooth content with position, a few
needles, as in real RoPE'd keys.

    python -m benchmarks.bench_sparse_hierarchical
Writes benchmarks/results/<name>.json (default ``sparse_hierarchical``) and prints hier/flat time ratios.
"""

from __future__ import annotations

import argparse
import math
import sys


def parse_args(argv=None):
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731

    def cases(s):  # "129024x1,32768x8" -> [(129024, 1), (32768, 8)]
        return [tuple(int(v) for v in c.split("x")) for c in s.split(",") if c]

    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_sparse_hierarchical",
                                description=__doc__.split("\n")[0])
    p.add_argument("--cases", type=cases, default=[(129024, 1), (32768, 8)], help="TOKENSxBATCH,...")
    p.add_argument("--block-sizes", type=ints, default=[128, 64])
    p.add_argument("--page-size", type=int, default=8)
    p.add_argument("--num-select", type=int, default=256, help="pages kept (budget 2048 / page 8)")
    p.add_argument("--blocks-select", type=ints, default=[16, 32, 64], help="blocks kept by the coarse step")
    p.add_argument("--sink", type=int, default=1)
    p.add_argument("--recent", type=int, default=4)
    p.add_argument("--hq", type=int, default=32)
    p.add_argument("--hkv", type=int, default=8)
    p.add_argument("--head-size", type=int, default=128)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    p.add_argument("--table-tokens", type=int, default=0, help="block table width in tokens (0: the context)")
    p.add_argument("--corr", type=float, default=256.0, help="correlation length of the keys' walk (tokens)")
    p.add_argument("--planted", type=int, default=8, help="needle tokens per (request, kv head)")
    p.add_argument("--recall-queries", type=int, default=4)
    p.add_argument("--inner", type=int, default=20)
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--name", default="sparse_hierarchical")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------ inputs
def ar1_walk(n: int, channels: int, corr: float, gen, device="cpu"):
    """``[n, channels]`` fp32 stationary AR(1) walk ``x_t = a x_{t-1} + sqrt(1 - a^2) e_t``, ``a = 1 - 1/corr``:
    unit variance, correlation ``a^lag``. Computed in chunks (a cumulative sum of ``a^-u e_u`` per chunk, short
    enough that ``a^-u`` stays small) with the carry passed between them."""
    import torch

    a = 1.0 - 1.0 / corr
    eps = torch.randn(n, channels, generator=gen, device=device) * math.sqrt(1 - a * a)
    x = torch.empty(n, channels, device=device)
    chunk = max(1, min(1024, int(8 * corr)))  # a^-chunk <= e^8
    u = torch.arange(chunk, device=device, dtype=torch.float64)
    pw, inv = (a ** u).float(), (a ** -u).float()
    prev = torch.randn(channels, generator=gen, device=device)
    for s in range(0, n, chunk):
        e = eps[s : s + chunk]
        m = e.shape[0]
        x[s : s + m] = pw[:m, None] * (a * prev[None] + torch.cumsum(inv[:m, None] * e, 0))
        prev = x[s + m - 1]
    return x


def rope(x, pos, theta: float = 500000.0):
    """Rotate-half RoPE of ``x`` ``[n, H, D]`` at positions ``pos`` ``[n]`` (Llama's layout, no rope scaling)."""
    import torch

    d = x.shape[-1]
    freq = theta ** (-torch.arange(0, d, 2, dtype=torch.float64, device=x.device) / d)  # [D/2]
    ang = pos.double()[:, None] * freq[None]
    cos, sin = ang.cos().float()[:, None], ang.sin().float()[:, None]  # [n, 1, D/2]
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def make_keys(n: int, hkv: int, d: int, corr: float, qsum, planted: int, gen, device="cpu"):
    """Cached keys of one request, ``[n, Hkv, D]`` fp32, and the planted positions ``[Hkv, planted]`` int64.

    ``gen``: a ``torch.Generator`` on ``device``. ``qsum``: ``[Hkv, D]`` the GQA group's summed query (the direction the Quest score measures); each planted
    token is ``2 sqrt(D)`` along it, well above what any walk token scores. Planted positions avoid the first
    and last 64 tokens (the forced sink and recent pages would keep them anyway).
    """
    import torch

    k = ar1_walk(n, hkv * d, corr, gen, device).view(n, hkv, d)
    k += 0.5 * torch.randn(n, hkv, d, generator=gen, device=device)
    k = rope(k, torch.arange(n, device=device))
    lo, hi = min(64, n // 4), max(min(64, n // 4) + 1, n - 64)
    pos = torch.randint(lo, hi, (hkv, planted), generator=gen, device=device)
    unit = qsum.float() / qsum.float().norm(dim=-1, keepdim=True)
    for h in range(hkv):
        k[pos[h], h] = 2.0 * math.sqrt(d) * unit[h]
    return k, pos


class Inputs:
    """A paged cache (shuffled blocks, one spare) holding ``make_keys`` keys, its page and block summaries, and
    the queries the keys' needles were planted for.

    Fields: ``key_cache [num_blocks, block_size, Hkv, D]``, ``block_table [B, width]`` int32, ``seq_lens [B]``
    int32, ``slots [B * ctx]`` int64 (request order), ``q [B, Hq, D]``, ``page_min/page_max``, ``block_min/
    block_max`` (``summary_dtype``), ``planted_pages [B, Hkv, planted]`` int64 logical pages. Summaries come from
    the kernels on CUDA, from the references elsewhere (a CPU check of this script).
    """

    def __init__(self, ctx, batch, hq, hkv, d, block_size, page_size, dtype, summary_dtype, corr, planted, seed,
                 device="cpu", table_tokens=0):
        import torch

        from longseq.kernels.sparse_decode import hierarchical, naive, naive_hierarchical, page_summary

        gen = torch.Generator(device=device).manual_seed(seed)
        bps = -(-ctx // block_size)
        num_blocks = batch * bps + 1
        self.key_cache = torch.randn(num_blocks, block_size, hkv, d, generator=gen, device=device).to(dtype)
        perm = torch.randperm(num_blocks, generator=gen, device=device)[: batch * bps].view(batch, bps)
        width = -(-max(table_tokens, ctx) // block_size)
        pad = torch.zeros(batch, width - bps, dtype=torch.int32, device=device)
        self.block_table = torch.cat([perm.to(torch.int32), pad], 1).contiguous()
        self.seq_lens = torch.full((batch,), ctx, dtype=torch.int32, device=device)
        self.q = torch.randn(batch, hq, d, generator=gen, device=device).to(dtype)
        pos = torch.arange(ctx, device=device)
        slots = self.block_table.long()[:, pos // block_size] * block_size + pos % block_size  # [B, ctx]
        self.slots = slots.reshape(-1)
        qsum = self.q.float().view(batch, hkv, hq // hkv, d).sum(2)
        planted_pages = []
        for b in range(batch):
            keys, where = make_keys(ctx, hkv, d, corr, qsum[b], planted, gen, device)
            self.key_cache.view(-1, hkv, d)[slots[b]] = keys.to(dtype)
            planted_pages.append(where // page_size)
        self.planted_pages = torch.stack(planted_pages)
        ppb = block_size // page_size
        self.page_min, self.page_max = page_summary.allocate_page_summary(
            num_blocks, block_size, hkv, d, page_size, dtype, device, summary_dtype=summary_dtype)
        self.block_min, self.block_max = hierarchical.allocate_block_summary(num_blocks, hkv, d, summary_dtype,
                                                                             device)
        if str(device).startswith("cuda"):
            page_summary.update_page_summary(self.key_cache, self.slots, self.page_min, self.page_max, page_size)
            hierarchical.update_block_summary(self.page_min, self.page_max, self.block_min, self.block_max,
                                              self.slots, block_size, page_size)
        else:
            naive.update_page_summary_ref(self.key_cache, self.slots, self.page_min, self.page_max, page_size)
            naive_hierarchical.update_block_summary_ref(self.page_min, self.page_max, self.block_min,
                                                        self.block_max, self.slots, block_size, page_size)
        self.ppb, self.num_blocks = ppb, num_blocks


def recall(flat_ids, hier_ids) -> float:
    """Fraction of the pages in ``flat_ids`` (``[..., k]`` int, ``-1`` = none) that the same row of ``hier_ids``
    (``[..., k2]``) holds too, over all rows; 1.0 when ``flat_ids`` holds none."""
    f = flat_ids.reshape(-1, flat_ids.shape[-1]).long()
    h = hier_ids.reshape(-1, hier_ids.shape[-1]).long()
    valid = f >= 0
    hit = ((f[:, :, None] == h[:, None, :]) & valid[:, :, None]).any(-1)
    n = int(valid.sum())
    return float(hit.sum()) / n if n else 1.0


def planted_recall(ids, planted_pages) -> float:
    """Fraction of the planted pages (``[B, Hkv, n]``) that the selection ``ids`` (``[B, Hkv, k]``) holds."""
    return recall(planted_pages, ids)


def valid_blocks_select(blocks_select, num_select: int, ppb: int, forced_blocks: int) -> list[int]:
    """The block counts whose blocks can hold the budget and the forced blocks."""
    return [n for n in blocks_select if n * ppb >= num_select and n >= forced_blocks]


# ------------------------------------------------------------------------------------------ timing
def time_us(fn, inner: int, reps: int) -> tuple[float, str]:
    """Median microseconds per ``fn(i)`` in a CUDA graph (``bench_sparse_kernels.time_graph``), else eager."""
    import torch
    import triton

    from benchmarks.bench_sparse_kernels import time_graph

    rotations = fn.rotations
    try:
        return time_graph(fn, rotations, inner, reps), "cuda_graph"
    except Exception:  # noqa: BLE001 - not capturable: time it eagerly instead
        torch.cuda.synchronize()
        return triton.testing.do_bench(lambda: fn(0), warmup=25, rep=200, return_mode="median") * 1e3, "eager"


def _rotating(fn, rotations: int):
    fn.rotations = rotations
    return fn


def run_case(args, ctx: int, batch: int, block_size: int, l2_bytes: int, fi_ok: bool) -> dict:
    import torch

    from longseq.kernels.sparse_decode import hierarchical as hi
    from longseq.kernels.sparse_decode.naive_hierarchical import coarse_forced_blocks
    from longseq.kernels.sparse_decode.page_summary import update_page_summary
    from longseq.kernels.sparse_decode.select import score_pages, select_topk_pages, topk_pages

    p, k = args.page_size, args.num_select
    dt = getattr(torch, args.dtype)
    inp = Inputs(ctx, batch, args.hq, args.hkv, args.head_size, block_size, p, dt, torch.float8_e4m3fn, args.corr,
                 args.planted, seed=ctx + batch + block_size, device="cuda", table_tokens=args.table_tokens)
    ppb = block_size // p
    sink_b, recent_b = coarse_forced_blocks(args.sink, args.recent, ppb)
    nbs_list = valid_blocks_select(args.blocks_select, k, ppb, sink_b + recent_b)
    row = {"context": ctx, "batch": batch, "block_size": block_size, "pages_per_block": ppb,
           "blocks_select": nbs_list, "skipped_blocks_select": sorted(set(args.blocks_select) - set(nbs_list))}

    # Checks: the block summary kernel vs a plain min over each block's pages (every used block is full here
    # when ctx is a multiple of block_size), and recall of the flat selection and of the needles.
    used = inp.block_table[:, : -(-ctx // block_size)].reshape(-1).long()
    full = ctx % block_size == 0
    pm = inp.page_min.float().view(inp.num_blocks, ppb, args.hkv, -1)[used]
    pM = inp.page_max.float().view(inp.num_blocks, ppb, args.hkv, -1)[used]
    row["check_block_summary_exact"] = (not full) or bool(
        torch.equal(pm.amin(1), inp.block_min.float()[used]) and torch.equal(pM.amax(1), inp.block_max.float()[used]))
    flat_args = (inp.page_min, inp.page_max, inp.block_table, inp.seq_lens, p, block_size, k, args.sink, args.recent)
    gen = torch.Generator().manual_seed(1)
    queries = [inp.q] + [torch.randn(inp.q.shape, generator=gen).to(dt).cuda() for _ in range(args.recall_queries - 1)]
    flat_sel = [select_topk_pages(qq, *flat_args)[0] for qq in queries]
    row["planted_recall_flat"] = planted_recall(flat_sel[0], inp.planted_pages)
    for n in nbs_list:
        hier = [hi.select_topk_pages_hierarchical(qq, inp.page_min, inp.page_max, inp.block_min, inp.block_max,
                                                  inp.block_table, inp.seq_lens, p, block_size, k, n, args.sink,
                                                  args.recent)[0] for qq in queries]
        row[f"recall_nb{n}"] = sum(recall(f, h) for f, h in zip(flat_sel, hier)) / len(hier)
        row[f"planted_recall_nb{n}"] = planted_recall(hier[0], inp.planted_pages)
        row[f"pages_per_row_nb{n}"] = float((hier[0] >= 0).sum(-1).float().mean())

    # Rotation copies (summaries + queries) whose total exceeds 3x L2, so summaries come from HBM as in a model.
    summ_bytes = 2 * (inp.page_min.numel() + inp.block_min.numel())
    rot = max(1, min(8, math.ceil(3 * l2_bytes / summ_bytes)))
    pages = [torch.stack([inp.page_min, inp.page_max], 2).clone() for _ in range(rot)]
    blocks = [torch.stack([inp.block_min, inp.block_max], 2).clone() for _ in range(rot)]
    qs = [inp.q] + [torch.randn(inp.q.shape, generator=gen).to(dt).cuda() for _ in range(rot - 1)]
    row["rotations"] = rot
    last = inp.slots.view(batch, ctx)[:, -1].contiguous()
    chunk = inp.slots[max(0, ctx - 4096) : ctx].contiguous()

    def flat(i, **kw):
        return select_topk_pages(qs[i], pages[i][:, :, 0], pages[i][:, :, 1], inp.block_table, inp.seq_lens, p,
                                 block_size, k, args.sink, args.recent, **kw)

    def hier(i, n):
        return hi.select_topk_pages_hierarchical(qs[i], pages[i][:, :, 0], pages[i][:, :, 1], blocks[i][:, :, 0],
                                                 blocks[i][:, :, 1], inp.block_table, inp.seq_lens, p, block_size,
                                                 k, n, args.sink, args.recent)

    def coarse(i, n):
        sc = score_pages(qs[i], blocks[i][:, :, 0], blocks[i][:, :, 1], inp.block_table, inp.seq_lens, block_size,
                         block_size, sink_b, recent_b)
        return topk_pages(sc, inp.seq_lens, block_size, n)[0]

    block_ids = {n: [coarse(i, n) for i in range(rot)] for n in nbs_list}

    def fine(i, n):
        return hi.select_fine_pages(qs[i], pages[i][:, :, 0], pages[i][:, :, 1], inp.block_table, inp.seq_lens,
                                    block_ids[n][i], p, block_size, k, args.sink, args.recent)

    def block_update(i, slots):
        return hi.update_block_summary(pages[i][:, :, 0], pages[i][:, :, 1], blocks[i][:, :, 0], blocks[i][:, :, 1],
                                       slots, block_size, p)

    ops = {"flat": lambda i: flat(i)}
    if fi_ok:
        ops["flat_flashinfer"] = lambda i: flat(i, topk_impl="flashinfer")
    for n in nbs_list:
        ops[f"hier_nb{n}"] = lambda i, n=n: hier(i, n)
        ops[f"coarse_nb{n}"] = lambda i, n=n: coarse(i, n)
        ops[f"fine_nb{n}"] = lambda i, n=n: fine(i, n)
    ops["block_summary_decode"] = lambda i: block_update(i, last)
    ops["block_summary_prefill4096"] = lambda i: block_update(i, chunk)
    ops["page_summary_decode"] = lambda i: update_page_summary(inp.key_cache, last, pages[i][:, :, 0],
                                                               pages[i][:, :, 1], p)
    times, how = {}, {}
    for name, fn in ops.items():
        try:
            times[name], how[name] = time_us(_rotating(fn, rot), args.inner, args.reps)
        except Exception as e:  # noqa: BLE001 - record and go on with the other ops
            how[name] = f"failed: {e!r}"[:300]
    row["times_us"], row["timing"] = times, how
    for n in nbs_list:
        for base in ("flat", "flat_flashinfer"):
            if f"hier_nb{n}" in times and base in times:
                row[f"hier_nb{n}_over_{base}"] = times[f"hier_nb{n}"] / times[base]
    return row


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch
    import triton

    from benchmarks.common import command_line, environment, write_result
    from longseq.kernels.sparse_decode.library_topk import flashinfer_topk_available

    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    props = torch.cuda.get_device_properties(0)
    l2 = getattr(props, "L2_cache_size", 50 * 2**20)
    fi_ok = flashinfer_topk_available()
    rows, failures = [], []
    for ctx, batch in args.cases:
        for bs in args.block_sizes:
            row = run_case(args, ctx, batch, bs, l2, fi_ok)
            rows.append(row)
            t = row["times_us"]
            failures += [f"{ctx}x{batch} block {bs}: {n} {h}" for n, h in row["timing"].items()
                         if h.startswith("failed")]
            if not row["check_block_summary_exact"]:
                failures.append(f"{ctx}x{batch} block {bs}: block summaries differ from the min over pages")
            print(f"ctx={ctx} b={batch} block={bs}: " + ", ".join(f"{n}={v:.1f}us" for n, v in t.items()), flush=True)
            for n in row["blocks_select"]:
                ratio = " ".join(f"hier/{base}={row[f'hier_nb{n}_over_{base}']:.2f}x"
                                 for base in ("flat", "flat_flashinfer") if f"hier_nb{n}_over_{base}" in row)
                print(f"    nb={n:3d}: {ratio}  recall={row[f'recall_nb{n}']:.3f}  planted recall="
                      f"{row[f'planted_recall_nb{n}']:.3f} (flat {row['planted_recall_flat']:.3f})  "
                      f"pages/row={row[f'pages_per_row_nb{n}']:.1f}", flush=True)
    env = {**environment(), "triton": triton.__version__, "sms": props.multi_processor_count, "l2_bytes": l2,
           "flashinfer_topk": fi_ok}
    inputs = {k: v for k, v in vars(args).items() if k != "name"}
    path = write_result(args.name, {"benchmark": "sparse_hierarchical", "command": command_line(), "env": env,
                                    "inputs": inputs, "summary_dtype": "float8_e4m3fn", "rows": rows,
                                    "failures": failures})
    print("wrote", path)
    if failures:
        print("FAILURES:", *failures, sep="\n  ")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
