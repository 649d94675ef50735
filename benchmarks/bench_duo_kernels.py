"""DuoAttention kernels vs dense FlashAttention, one attention layer, on a GPU.

Llama-3.1-8B layout by default (Hq=32, Hkv=8, D=128, bf16, block_size=16), half the KV heads streaming
(chosen at random, seeded), sink 64 + recent 256. Times, per case:

decode (one query per request, context ``C``, batch ``B``; CUDA-graph timing as in bench_sparse_kernels.py:
each op captured ``--inner`` times back to back, median replay / inner; inputs rotate among copies > 3x L2):
    fa_dense     vLLM's flash_attn_varlen_func (FA3, else FA2) over all heads: the baseline
    duo          longseq's Triton DuoAttention kernel, all heads in one launch (+ split merge): what the vLLM
                 backend runs for decode-only steps
    duo_0pct     the same kernel with no streaming head (its cost as a dense kernel, vs fa_dense)
    hybrid       FA on the runs of retrieval heads + the Triton kernel on the streaming heads only (what the
                 backend runs for steps with prefill rows), for comparison
prefill (one request of ``P`` tokens, causal, keys in the paged cache; ``triton.testing.do_bench``):
    fa_dense     FlashAttention over all heads
    hybrid       FA on the retrieval-head runs + the Triton kernel on the streaming heads (the backend's path)
    duo          the Triton kernel on all heads (``--variants`` only, and only up to 32K: slow by design)

``--variants`` adds, for decode: split counts (``duo_s*``), a grid of key tiles x warps x pipeline stages
(``duo_t{tile}_w{warps}_st{stages}``, applied in ``unified.DECODE_TUNING``), the register multiply-and-sum decode
(``duo_fma_t{tile}_w{warps}``: ``DECODE_TUNING["use_dot"] = False``), the explicit next-tile prefetch (``*_pf``:
``DECODE_TUNING["prefetch"] = True``), and ``hybrid_s32`` (the hybrid with
FlashAttention's splits fixed at 32 as vLLM does under CUDA graphs: what ``LONGSEQ_DUO_HYBRID_DECODE_BATCH``
switches decode to); each decode row reports its fastest variant (``best``). Variants run at the contexts of
``--variant-contexts`` (default 126K), at most ``--budget-s`` seconds per decode case (compiles included; the
rest is listed as not timed), so a ``--variants`` run stays bounded.
Correctness first (small sizes): duo and hybrid vs the fp32 reference, duo_0pct vs FlashAttention.

    python -m benchmarks.bench_duo_kernels                 # 32K and 126K, batch 1 and 8, prefill 32K and 126K
    python -m benchmarks.bench_duo_kernels --quick         # a few seconds: 8K decode, 8K prefill
Writes benchmarks/results/duo_kernels.json (``--name``) and prints the ratios.
"""

from __future__ import annotations

import argparse
import math
import time
import types


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_duo_kernels", description=__doc__.split("\n")[0])
    p.add_argument("--contexts", default="32768,129024", help="decode context lengths (comma-separated)")
    p.add_argument("--batches", default="1,8", help="decode batch sizes")
    p.add_argument("--prefill", default="32768,129024", help="prefill lengths ('' = none)")
    p.add_argument("--hq", type=int, default=32)
    p.add_argument("--hkv", type=int, default=8)
    p.add_argument("--head-size", type=int, default=128)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--sink", type=int, default=64)
    p.add_argument("--recent", type=int, default=256)
    p.add_argument("--streaming", type=float, default=0.5, help="fraction of KV heads that stream")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--inner", type=int, default=20)
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--variants", action="store_true", help="also time split/warp/stage alternatives")
    p.add_argument("--variant-contexts", default="129024",
                   help="decode contexts that get the --variants (comma-separated; '' = all)")
    p.add_argument("--budget-s", type=float, default=70.0,
                   help="--variants: stop timing (and compiling) a decode case's variants after this many seconds")
    p.add_argument("--quick", action="store_true", help="8K decode at batch 1 and 8K prefill, few reps")
    p.add_argument("--name", default="duo_kernels")
    args = p.parse_args(argv)
    if args.quick:
        args.contexts, args.batches, args.prefill, args.inner, args.reps = "8192", "1", "8192", 5, 5
    to_ints = lambda s: [int(x) for x in s.split(",") if x.strip()]  # noqa: E731
    args.contexts, args.batches, args.prefill = to_ints(args.contexts), to_ints(args.batches), to_ints(args.prefill)
    args.variant_contexts = to_ints(args.variant_contexts) or args.contexts
    if args.quick:
        args.variant_contexts = args.contexts
    return args


def streaming_mask(args, dev):
    """``[Hkv]`` bool: ``round(streaming * Hkv)`` heads chosen at random (seeded)."""
    import torch

    g = torch.Generator().manual_seed(args.seed)
    k = int(round(args.streaming * args.hkv))
    mask = torch.zeros(args.hkv, dtype=torch.bool)
    mask[torch.randperm(args.hkv, generator=g)[:k]] = True
    return mask.to(dev)


class Cache:
    """Paged K/V caches ``[num_blocks, block_size, Hkv, D]`` (one tensor per kind, as vLLM's K/V views) for
    ``batch`` requests of ``ctx`` tokens in shuffled blocks; ``copies`` independent copies to rotate through."""

    def __init__(self, args, ctx: int, batch: int, copies: int, dtype, dev="cuda"):
        import torch

        bs = args.block_size
        per_req = math.ceil(ctx / bs)
        num_blocks = per_req * batch
        self.kv = [(torch.randn(num_blocks, bs, args.hkv, args.head_size, device=dev, dtype=dtype),
                    torch.randn(num_blocks, bs, args.hkv, args.head_size, device=dev, dtype=dtype))
                   for _ in range(copies)]
        self.block_table = torch.randperm(num_blocks, device=dev).to(torch.int32).view(batch, per_req)
        self.seq_lens = torch.full((batch,), ctx, dtype=torch.int32, device=dev)
        self.bytes = 2 * num_blocks * bs * args.hkv * args.head_size * torch.finfo(dtype).bits // 8


def flash_meta(qsl, max_q, seq_lens, max_k, block_table):
    """The FlashAttention metadata fields ``flash_retrieval_heads`` reads."""
    return types.SimpleNamespace(query_start_loc=qsl, max_query_len=max_q, seq_lens=seq_lens, max_seq_len=max_k,
                                 block_table=block_table, max_num_splits=0)


def ops(args, cache, q, qsl, max_q, ctx, mask, fa, fa_label, out):
    """``{name: fn(i)}`` for copy ``i`` of the cache."""
    import torch

    from longseq.attention_backends.vllm.flash import flash_retrieval_heads
    from longseq.kernels.duo_attention.unified import default_num_splits, duo_paged_attention, retrieval_head_runs

    scale = args.head_size ** -0.5
    bt, sl = cache.block_table, cache.seq_lens
    batch = sl.shape[0]
    none = torch.zeros_like(mask)
    runs = retrieval_head_runs(mask.cpu())
    streaming_heads = mask.nonzero().squeeze(1).to(torch.int32)
    n_retr = int((~mask).sum())
    meta = flash_meta(qsl, max_q, sl, ctx, bt)
    version = int(fa_label[-1]) if fa else None

    def duo(m, **kw):
        return lambda i: duo_paged_attention(q, *cache.kv[i], bt, qsl, sl, m, args.sink, args.recent, scale, max_q,
                                             out=out, **kw)

    def fa_dense(i):
        fa(q, *cache.kv[i], bt, sl, qsl, ctx, scale, out, max_q=max_q)

    def hybrid(i):
        flash_retrieval_heads(q, *cache.kv[i], out, runs, meta, scale, version)
        duo_paged_attention(q, *cache.kv[i], bt, qsl, sl, mask, args.sink, args.recent, scale, max_q, out=out,
                            kv_heads=streaming_heads, num_splits=1)

    res = {}
    if fa:
        res["fa_dense"] = fa_dense
        res["hybrid"] = hybrid
    if max_q == 1:
        res["duo"] = duo(mask, num_splits=default_num_splits(batch, max(n_retr, 1), q.device))
        res["duo_0pct"] = duo(none, num_splits=default_num_splits(batch, args.hkv, q.device))
        if args.variants and ctx in args.variant_contexts:
            splits = default_num_splits(batch, max(n_retr, 1), q.device)
            if fa:  # the engine's hybrid decode under CUDA graphs: vLLM fixes FlashAttention's splits at 32
                meta32 = flash_meta(qsl, max_q, sl, ctx, bt)
                meta32.max_num_splits = 32

                def hybrid_s32(i):
                    flash_retrieval_heads(q, *cache.kv[i], out, runs, meta32, scale, version)
                    duo_paged_attention(q, *cache.kv[i], bt, qsl, sl, mask, args.sink, args.recent, scale, max_q,
                                        out=out, kv_heads=streaming_heads, num_splits=1)

                res["hybrid_s32"] = hybrid_s32
            for s in (8, 16, 32, 64, 128):
                if s != splits:
                    res[f"duo_s{s}"] = duo(mask, num_splits=s)
            for tn, w, st in PREFETCH_GRID:
                res[f"duo_t{tn}_w{w}_st{st}_pf"] = duo(mask, num_splits=splits, tile_n=tn, num_warps=w, num_stages=st,
                                                       prefetch=True)
            for tn, w in FMA_GRID:
                for pf in (False, True):
                    res[f"duo_fma_t{tn}_w{w}" + ("_pf" if pf else "")] = duo(
                        mask, num_splits=splits, tile_n=tn, num_warps=w, use_dot=False, prefetch=pf)
            for tn, w, st in TUNING_GRID:
                res[f"duo_t{tn}_w{w}_st{st}"] = duo(mask, num_splits=splits, tile_n=tn, num_warps=w, num_stages=st)
    elif args.variants and ctx <= 32768:
        res["duo"] = duo(mask)
    return res


#: Decode kernel configurations ``(tile_n, num_warps, num_stages)`` timed by ``--variants`` (default splits).
TUNING_GRID = [(tn, w, st) for tn in (64, 128) for w in (4, 8) for st in (2, 3, 4)]
#: ``(tile_n, num_warps)`` of the register multiply-and-sum decode (``use_dot=False``) timed by ``--variants``.
FMA_GRID = [(tn, w) for tn in (16, 32, 64) for w in (4, 8)]
#: ``(tile_n, num_warps, num_stages)`` timed with the explicit next-tile prefetch (``prefetch=True``, ``*_pf``).
PREFETCH_GRID = [(tn, w, st) for tn in (64, 128) for w in (4, 8) for st in (1, 2)]


def best_plan(row) -> dict:
    """The fastest duo decode variant of a row (one-launch kernel configs and the hybrid), and its ratio."""
    times = {k: v for k, v in row["times_us"].items() if k.startswith(("duo", "hybrid")) and k != "duo_0pct"}
    name = min(times, key=times.get)
    best = {"variant": name, "us": times[name]}
    if "fa_dense" in row["times_us"]:
        best["ratio_vs_fa_dense"] = times[name] / row["times_us"]["fa_dense"]
    return best


def dense_fa():
    """``(fn, label)``: vLLM's FlashAttention (FA3 where supported) over a paged cache, any query lengths."""
    from benchmarks.bench_sparse_kernels import dense_attention

    base, label = dense_attention()
    if base is None:
        return None, label
    from vllm.vllm_flash_attn import flash_attn_varlen_func

    version = int(label[-1])

    def fn(q, key_cache, value_cache, block_table, seq_lens, cu_q, max_k, scale, out, max_q=1):
        return flash_attn_varlen_func(q=q, k=key_cache, v=value_cache, max_seqlen_q=max_q, cu_seqlens_q=cu_q,
                                      max_seqlen_k=max_k, seqused_k=seq_lens, softmax_scale=scale, causal=True,
                                      block_table=block_table, out=out, fa_version=version)

    return fn, label


def check(args, fa, fa_label, dev="cuda"):
    """Relative max errors at small sizes (a decode batch, a prefill): duo and hybrid vs the fp32 reference;
    duo_0pct and FlashAttention vs the reference with no streaming head."""
    import torch

    from longseq.kernels.duo_attention import duo_paged_attention_ref
    from longseq.kernels.duo_attention.unified import duo_paged_attention

    dt, scale = torch.bfloat16, args.head_size ** -0.5
    res = {}
    mask = streaming_mask(args, dev)
    none = torch.zeros_like(mask)
    for name, ctx, batch, max_q in (("decode", 3000, 3, 1), ("prefill", 1500, 1, 1500)):
        cache = Cache(args, ctx, batch, 1, dt, dev)
        nq = batch * max_q
        q = torch.randn(nq, args.hq, args.head_size, device=dev, dtype=dt)
        qsl = torch.arange(0, nq + 1, max_q, device=dev, dtype=torch.int32)
        bt, sl = cache.block_table, cache.seq_lens
        refs = {m is none: duo_paged_attention_ref(q, *cache.kv[0], bt, qsl.cpu(), sl, m, args.sink, args.recent,
                                                   scale).float() for m in (mask, none)}
        out = torch.zeros_like(q)
        fns = ops(args, cache, q, qsl, max_q, ctx, mask, fa, fa_label, out)
        fns["duo"] = lambda i: duo_paged_attention(q, *cache.kv[i], bt, qsl, sl, mask, args.sink, args.recent,
                                                   scale, max_q, out=out)
        for op, fn in fns.items():
            if op.startswith("duo_") and op != "duo_0pct":
                continue  # variants: same kernel
            out.zero_()
            fn(0)
            want = refs[op in ("duo_0pct", "fa_dense")]
            res[f"{name}_{op}_rel_err"] = ((out.float() - want).abs().max() / want.abs().max()).item()
    res["ok"] = all(v < 2e-2 for k, v in res.items() if k.endswith("rel_err"))
    return res


def main(argv=None) -> None:
    args = parse_args(argv)
    import torch
    import triton

    from benchmarks.bench_sparse_kernels import time_graph
    from benchmarks.common import command_line, environment, write_result

    assert torch.cuda.is_available(), "needs a CUDA GPU"
    props = torch.cuda.get_device_properties(0)
    l2 = getattr(props, "L2_cache_size", 50 * 2**20)
    fa, fa_label = dense_fa()
    print(f"dense baseline: {fa_label}", flush=True)
    correctness = check(args, fa, fa_label)
    print(f"correctness: {correctness}", flush=True)
    mask = streaming_mask(args, "cuda")
    dt = torch.bfloat16
    rows = []
    for ctx in args.contexts:
        for batch in args.batches:
            probe = Cache(args, 16, 1, 1, dt)  # bytes per token without allocating the full cache twice
            bytes_one = probe.bytes // 16 * ctx * batch
            copies = max(1, math.ceil(3 * l2 / bytes_one))
            cache = Cache(args, ctx, batch, copies, dt)
            q = torch.randn(batch, args.hq, args.head_size, device="cuda", dtype=dt)
            qsl = torch.arange(batch + 1, device="cuda", dtype=torch.int32)
            out = torch.empty_like(q)
            times, case_start = {}, time.monotonic()
            for name, fn in ops(args, cache, q, qsl, 1, ctx, mask, fa, fa_label, out).items():
                variant = name not in ("fa_dense", "duo", "duo_0pct", "hybrid")
                if variant and time.monotonic() - case_start > args.budget_s:
                    print(f"  {name}: not timed (--budget-s {args.budget_s:.0f} spent)", flush=True)
                    continue
                try:
                    times[name] = time_graph(fn, copies, args.inner, args.reps)
                except Exception as e:  # a tuning variant over the SM's resources (shared memory): skip it
                    if not variant:
                        raise
                    torch.cuda.synchronize()
                    print(f"  {name}: skipped ({type(e).__name__}: {str(e).splitlines()[0][:120]})", flush=True)
            rows.append(_row("decode", ctx, batch, times, cache.bytes))
            rows[-1]["best"] = best_plan(rows[-1])
            print(_line(rows[-1]), flush=True)
            print(f"  best: {rows[-1]['best']}", flush=True)
            del cache
            torch.cuda.empty_cache()
    for n in args.prefill:
        cache = Cache(args, n, 1, 1, dt)
        q = torch.randn(n, args.hq, args.head_size, device="cuda", dtype=dt)
        qsl = torch.tensor([0, n], device="cuda", dtype=torch.int32)
        out = torch.empty_like(q)
        times = {name: triton.testing.do_bench(lambda fn=fn: fn(0), warmup=2 if n > 40000 else 25,
                                               rep=10 if n > 40000 else 100, return_mode="median") * 1e3
                 for name, fn in ops(args, cache, q, qsl, n, n, mask, fa, fa_label, out).items()}
        rows.append(_row("prefill", n, 1, times, cache.bytes))
        print(_line(rows[-1]), flush=True)
        del cache, q, out
        torch.cuda.empty_cache()
    env = environment()
    env.update(triton=triton.__version__, sms=props.multi_processor_count, l2_bytes=l2)
    inputs = {k: v for k, v in vars(args).items() if k != "name"}
    inputs["streaming_heads"] = mask.nonzero().squeeze(1).tolist()
    path = write_result(args.name, {"benchmark": "duo_kernels", "command": command_line(), "env": env,
                                    "inputs": inputs, "dense_baseline": fa_label, "correctness": correctness,
                                    "rows": rows})
    print(f"correctness ok={correctness['ok']}; wrote {path}")


def _row(kind, ctx, batch, times, kv_bytes):
    row = {"kind": kind, "context": ctx, "batch": batch, "kv_bytes": kv_bytes, "times_us": times}
    if "fa_dense" in times:
        row["ratio_vs_fa_dense"] = {k: v / times["fa_dense"] for k, v in times.items() if k != "fa_dense"}
    return row


def _line(row) -> str:
    t = ", ".join(f"{k}={v:.1f}us" for k, v in row["times_us"].items())
    r = ", ".join(f"{k}={v:.3f}x" for k, v in row.get("ratio_vs_fa_dense", {}).items())
    return f"{row['kind']} ctx={row['context']} batch={row['batch']}: {t}  | ratio to FA dense: {r}"


if __name__ == "__main__":
    main()
