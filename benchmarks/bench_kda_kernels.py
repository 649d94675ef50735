"""KDA kernels (longseq.kernels.kda) vs fla 0.6.0 (Triton path, FLA_FLASH_KDA=0), one layer, on a GPU.

Kimi-Linear-48B's KDA shape: H=32, K=V=128, bf16 q/k/v, fp32 gate and state (V-first ``[N, H, V, K]``, fla
called with ``state_v_first=True`` so both read and write the same layout).

    prefill   fla's chunk_kda alone (the frameworks' prefill kernel; longseq has none), as a baseline: T in
              {8K, 32K, 64K} single sequence, plus a varlen batch (8 sequences, 32K tokens), gate precomputed
              (fused_kda_gate), q/k L2-normalized in the kernel, initial + final state (vLLM's call). Also the
              fused-gate call (``use_gate_in_kernel``) at 32K.
    decode    fused_recurrent_kda, one token per sequence, batch in {1, 16, 64}; ours updates the state pool
              in place at ``ssm_state_indices`` (as vLLM calls it), fla's public API writes a new final state
              (same bytes). Effective GB/s counts the state only: 2 x B x H x K x V x 4 bytes (read + write),
              against a device copy bandwidth (torch copy of 2 GiB) measured in the same run.

Timing: ``triton.testing.do_bench`` (median, after its warm-up; L2 flushed between calls; launch included);
decode also from a CUDA graph (``do_bench_cudagraph``, as vLLM replays decode: kernel time, no launch cost).
Decode variants (``--variants``, default on; at batches 1 and 16, CUDA-graph time): ours with the raw gate and
raw beta computed in the kernel (``fused_gate``: how the vLLM 0.26 and SGLang adapters call it, one launch), and
each ``(BV, num_warps)`` tile of ``DECODE_TILE_GRID`` forced through ``fused_recurrent.DECODE_TILE``; the fastest
is printed per batch (to pick ``_pick_tile``'s choice from one GPU run).
Correctness first, at every decode size: ours vs fla, max abs diff of outputs and final states printed; the
script exits non-zero if any is off.

    python -m benchmarks.bench_kda_kernels                 # prefill and decode
    python -m benchmarks.bench_kda_kernels --quick         # T=8K, batch 1 only
    python -m benchmarks.bench_kda_kernels --prefill "" --varlen 0 --name kda_kernels_decode   # decode only
Writes benchmarks/results/kda_kernels.json (``--name``).
"""

from __future__ import annotations

import argparse
import itertools
import os

os.environ.setdefault("FLA_FLASH_KDA", "0")  # fla's Triton path: must be set before fla is imported


H, K, V = 32, 128, 128
DEV = "cuda"
DTYPE = "bfloat16"  # q/k/v
TARGET_DECODE = {1: 3.0, 16: 3.0, 64: 1.0}
DECODE_TILE_GRID = [(bv, w) for bv in (8, 16, 32) for w in (1, 2, 4)]
VARIANT_BATCHES = (1, 16)


def parse_args(argv=None):
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731 - "" = none (e.g. --prefill "": decode only)
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_kda_kernels", description=__doc__.split("\n")[0])
    p.add_argument("--prefill", type=ints, default=[8192, 32768, 65536], help="single-sequence prefill lengths")
    p.add_argument("--varlen", type=int, default=32768, help="total tokens of the 8-sequence varlen batch (0: off)")
    p.add_argument("--batches", type=ints, default=[1, 16, 64], help="decode batch sizes")
    p.add_argument("--quick", action="store_true", help="T=8K prefill and batch-1 decode only (a few seconds)")
    p.add_argument("--tol", type=float, default=5e-2, help="max abs diff vs fla, relative to fla's max |value|")
    p.add_argument("--variants", action=argparse.BooleanOptionalAction, default=True,
                   help=f"time decode tile variants and the fused-gate call at batches {VARIANT_BATCHES}")
    p.add_argument("--name", default="kda_kernels")
    args = p.parse_args(argv)
    if args.quick:
        args.prefill, args.varlen, args.batches = [8192], 0, [1]
    return args


def bench_us(fn) -> float:
    import triton

    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3


def bench_graph_us(fn) -> float | None:
    """Median microseconds per call replayed from a CUDA graph (as vLLM runs decode): no launch overhead."""
    import triton

    try:
        return triton.testing.do_bench_cudagraph(fn, rep=50, return_mode="median") * 1e3
    except Exception as e:  # noqa: BLE001 - a call that cannot be captured is reported, not fatal
        print(f"  (CUDA graph timing failed: {type(e).__name__}: {e})", flush=True)
        return None


def copy_bandwidth_gbs() -> float:
    """Device copy bandwidth (read + write bytes / time) of a 2 GiB torch copy."""
    import torch

    x = torch.empty(2**29, dtype=torch.float32, device=DEV)
    y = torch.empty_like(x)
    us = bench_us(lambda: y.copy_(x))
    return 2 * x.numel() * 4 / (us * 1e-6) / 1e9


def compare(name, ours, ref, tol, failures) -> float:
    err = (ours.float() - ref.float()).abs().max().item()
    scale = ref.float().abs().max().item()
    ok = err <= tol * max(1.0, scale)
    print(f"  check {name}: max abs diff {err:.3g} (fla max |x| {scale:.3g}) {'ok' if ok else 'OFF'}", flush=True)
    if not ok:
        failures.append(f"{name}: max abs diff {err:.3g} > {tol} x {max(1.0, scale):.3g}")
    return err


def prefill_inputs(lengths, seed):
    import torch

    from longseq.kernels.kda import fused_kda_gate

    gen = torch.Generator(device=DEV).manual_seed(seed)
    T = sum(lengths)

    def r(*shape, dtype=None):
        return torch.randn(*shape, generator=gen, device=DEV).to(dtype or getattr(torch, DTYPE))

    A_log = torch.rand(H, generator=gen, device=DEV) * 2
    dt_bias = r(H * K, dtype=torch.float32)
    raw_g = r(1, T, H, K, dtype=torch.float32)
    return dict(q=r(1, T, H, K), k=r(1, T, H, K), v=r(1, T, H, V), raw_g=raw_g, A_log=A_log, dt_bias=dt_bias,
                g=fused_kda_gate(raw_g.flatten(-2), A_log, K, g_bias=dt_bias),
                beta=torch.sigmoid(r(1, T, H, dtype=torch.float32)), h0=r(len(lengths), H, V, K, dtype=torch.float32),
                cu=torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int64, device=DEV))


def run_prefill(label, lengths, fla, fused_gate=False):
    """fla's chunk_kda on one prefill case, timed (the baseline row; longseq has no chunk kernel)."""
    x = prefill_inputs(lengths, seed=len(lengths) * 7 + sum(lengths) % 1000)
    cu = x["cu"] if len(lengths) > 1 else None
    common = dict(initial_state=x["h0"], output_final_state=True, use_qk_l2norm_in_kernel=True, cu_seqlens=cu)
    if fused_gate:
        gate_args = dict(g=x["raw_g"], use_gate_in_kernel=True, A_log=x["A_log"], dt_bias=x["dt_bias"])
    else:
        gate_args = dict(g=x["g"])

    def theirs():
        return fla["chunk_kda"](x["q"], x["k"], x["v"], beta=x["beta"], state_v_first=True, **gate_args, **common)

    row = {"case": label, "lengths": lengths if len(lengths) <= 16 else f"{len(lengths)} seqs",
           "tokens": sum(lengths), "fused_gate": fused_gate}
    row["fla_us"] = bench_us(theirs)
    return row


def decode_variants(batch, q, k, v, g, beta, pool, idx, row, tol, failures) -> dict:
    """CUDA-graph microseconds of the decode variants (see the module docstring); each is checked first."""
    import torch

    from longseq.kernels.kda import fused_recurrent as fr
    from longseq.kernels.kda import fused_recurrent_kda

    gen = torch.Generator(device=DEV).manual_seed(200 + batch)
    A_log = torch.rand(H, generator=gen, device=DEV)
    dt_bias = torch.randn(H * K, generator=gen, device=DEV)
    raw_g = torch.randn(batch, 1, H, K, generator=gen, device=DEV)
    raw_beta = torch.randn(batch, 1, H, generator=gen, device=DEV)
    base = pool.clone()  # the timed calls below update ``pool`` in place; checks start from this snapshot
    ref_pool = pool.clone()
    from longseq.kernels.kda import fused_kda_gate

    g_ref = fused_kda_gate(raw_g.flatten(-2), A_log, K, g_bias=dt_bias).view_as(raw_g)
    o_ref, _ = fused_recurrent_kda(q, k, v, g_ref, torch.sigmoid(raw_beta), initial_state=ref_pool,
                                   ssm_state_indices=idx, use_qk_l2norm_in_kernel=True)

    def fused(state):
        return fused_recurrent_kda(q, k, v, raw_g, raw_beta, initial_state=state, ssm_state_indices=idx,
                                   use_qk_l2norm_in_kernel=True, A_log=A_log, dt_bias=dt_bias,
                                   use_gate_in_kernel=True, use_beta_sigmoid_in_kernel=True)

    def two_launches(state):  # what the adapters ran before: gate kernel, then the recurrent kernel
        g2 = fused_kda_gate(raw_g.flatten(-2), A_log, K, g_bias=dt_bias).view_as(raw_g)
        return fused_recurrent_kda(q, k, v, g2, torch.sigmoid(raw_beta), initial_state=state,
                                   ssm_state_indices=idx, use_qk_l2norm_in_kernel=True)

    check = base.clone()
    compare(f"decode b={batch} fused gate output", fused(check)[0], o_ref, tol, failures)
    compare(f"decode b={batch} fused gate state", check, ref_pool, tol, failures)
    out = {"fused_gate_graph_us": bench_graph_us(lambda: fused(pool)),
           "gate_then_recurrent_graph_us": bench_graph_us(lambda: two_launches(pool)), "tiles": []}
    o_plain, _ = fused_recurrent_kda(q, k, v, g, beta, initial_state=base.clone(), ssm_state_indices=idx,
                                     use_qk_l2norm_in_kernel=True)
    try:
        for bv, warps in DECODE_TILE_GRID:
            fr.DECODE_TILE = (bv, warps)
            o_tile, _ = fused_recurrent_kda(q, k, v, g, beta, initial_state=base.clone(), ssm_state_indices=idx,
                                            use_qk_l2norm_in_kernel=True)
            compare(f"decode b={batch} tile BV={bv} warps={warps}", o_tile, o_plain, tol, failures)
            us = bench_graph_us(lambda: fused_recurrent_kda(q, k, v, g, beta, initial_state=pool,
                                                            ssm_state_indices=idx, use_qk_l2norm_in_kernel=True))
            out["tiles"].append({"BV": bv, "num_warps": warps, "graph_us": us})
    finally:
        fr.DECODE_TILE = None
    timed = [t for t in out["tiles"] if t["graph_us"]]
    out["fastest_tile"] = min(timed, key=lambda t: t["graph_us"]) if timed else None
    us = lambda x: "n/a" if x is None else f"{x:.2f}"  # noqa: E731 - a graph timing that failed is None
    print(f"  variants b={batch}: fused gate {us(out['fused_gate_graph_us'])} us vs gate+recurrent "
          f"{us(out['gate_then_recurrent_graph_us'])} us (graph); tiles: "
          + ", ".join(f"BV{t['BV']}/w{t['num_warps']} {t['graph_us']:.2f}" for t in timed)
          + (f"; fastest BV={out['fastest_tile']['BV']} warps={out['fastest_tile']['num_warps']} "
             f"(default {row['ours_graph_us']:.2f} us)" if timed and row.get("ours_graph_us") else ""), flush=True)
    return out


def run_decode(batch, fla, tol, failures, copy_gbs, variants=False):
    import torch

    from longseq.kernels.kda import fused_recurrent_kda

    gen = torch.Generator(device=DEV).manual_seed(100 + batch)

    def r(*shape, dtype=None):
        return torch.randn(*shape, generator=gen, device=DEV).to(dtype or getattr(torch, DTYPE))

    q, k, v = r(batch, 1, H, K), r(batch, 1, H, K), r(batch, 1, H, V)
    g = -torch.nn.functional.softplus(r(batch, 1, H, K, dtype=torch.float32))
    beta = torch.sigmoid(r(batch, 1, H, dtype=torch.float32))
    pool = r(batch + 1, H, V, K, dtype=torch.float32) * 0.5  # slot 0: vLLM's null block
    idx = torch.arange(1, batch + 1, device=DEV)
    h0 = pool[1:].clone()

    def ours(state):
        return fused_recurrent_kda(q, k, v, g, beta, initial_state=state, ssm_state_indices=idx,
                                   use_qk_l2norm_in_kernel=True)

    row = {"batch": batch}
    check_pool = pool.clone()
    o, _ = ours(check_pool)
    if fla is not None:
        def theirs():
            return fla["fused_recurrent_kda"](q, k, v, g, beta, initial_state=h0, output_final_state=True,
                                              use_qk_l2norm_in_kernel=True, state_v_first=True)
        fo, fs = theirs()
        row["max_abs_diff_o"] = compare(f"decode b={batch} output", o, fo, tol, failures)
        row["max_abs_diff_state"] = compare(f"decode b={batch} state", check_pool[1:], fs, tol, failures)
        row["fla_us"] = bench_us(theirs)
        row["fla_graph_us"] = bench_graph_us(theirs)
    row["ours_us"] = bench_us(lambda: ours(pool))
    row["ours_graph_us"] = bench_graph_us(lambda: ours(pool))
    state_bytes = 2 * batch * H * K * V * 4
    best = row["ours_graph_us"] or row["ours_us"]
    row["ours_state_gbs"] = state_bytes / (best * 1e-6) / 1e9  # kernel time (graph) where measured
    row["ours_frac_of_copy_bw"] = row["ours_state_gbs"] / copy_gbs
    if fla is not None:
        row["fla_state_gbs"] = state_bytes / ((row["fla_graph_us"] or row["fla_us"]) * 1e-6) / 1e9
        row["speedup"] = row["fla_us"] / row["ours_us"]
        if row["fla_graph_us"] and row["ours_graph_us"]:
            row["speedup_graph"] = row["fla_graph_us"] / row["ours_graph_us"]
        row["target"] = TARGET_DECODE.get(batch)
        row["met"] = row["target"] is None or row["speedup"] >= row["target"]
    if variants and batch in VARIANT_BATCHES:
        row["variants"] = decode_variants(batch, q, k, v, g, beta, pool, idx, row, tol, failures)
    return row


def main(argv=None) -> None:
    args = parse_args(argv)
    import torch
    import triton

    from benchmarks.common import command_line, environment, write_result

    if not torch.cuda.is_available():
        raise SystemExit("bench_kda_kernels: needs a CUDA GPU")
    try:
        from fla.ops.kda import chunk_kda as fla_chunk, fused_recurrent_kda as fla_recurrent

        fla = {"chunk_kda": fla_chunk, "fused_recurrent_kda": fla_recurrent}
        import fla as fla_pkg

        fla_version = getattr(fla_pkg, "__version__", "?")
    except ImportError as e:
        print(f"WARNING: fla is not importable ({e}); timing ours only (decode), no baseline, no fla check",
              flush=True)
        fla, fla_version = None, None
    failures: list[str] = []
    torch.backends.cuda.matmul.allow_tf32 = False
    with torch.inference_mode():
        copy_gbs = copy_bandwidth_gbs()
        print(f"device copy bandwidth: {copy_gbs:.0f} GB/s", flush=True)
        prefill = []
        for T in args.prefill if fla is not None else []:
            prefill.append(run_prefill(f"T={T}", [T], fla))
            print(fmt(prefill[-1]), flush=True)
            torch.cuda.empty_cache()
        if args.varlen and fla is not None:
            gen = torch.Generator().manual_seed(0)
            cuts = sorted(torch.randperm(args.varlen // 64 - 1, generator=gen)[:7].add(1).mul(64).tolist())
            cuts = [c - 17 * i for i, c in enumerate(cuts)]  # ragged: most sequences end mid-chunk
            lengths = [b - a for a, b in zip([0] + cuts, cuts + [args.varlen])]
            prefill.append(run_prefill(f"varlen 8 seqs, {args.varlen} tokens", lengths, fla))
            print(fmt(prefill[-1]), flush=True)
        if not args.quick and 32768 in args.prefill and fla is not None:
            prefill.append(run_prefill("T=32768, gate fused", [32768], fla, fused_gate=True))
            print(fmt(prefill[-1]), flush=True)
        decode = []
        for b in args.batches:
            decode.append(run_decode(b, fla, args.tol, failures, copy_gbs, variants=args.variants))
            print(fmt(decode[-1]) + f", ours {decode[-1]['ours_state_gbs']:.0f} GB/s "
                  f"({100 * decode[-1]['ours_frac_of_copy_bw']:.0f}% of copy)", flush=True)
    env = environment()
    env.update(triton=triton.__version__, fla=fla_version, FLA_FLASH_KDA=os.environ.get("FLA_FLASH_KDA"))
    path = write_result(args.name, {"benchmark": "kda_kernels", "command": command_line(), "env": env,
                                    "inputs": {"H": H, "K": K, "V": V, "dtype": DTYPE, "state": "float32",
                                               **{k: v for k, v in vars(args).items() if k != "name"}},
                                    "copy_bandwidth_gbs": copy_gbs, "prefill": prefill, "decode": decode,
                                    "correctness_failures": failures})
    print(f"wrote {path}")
    if failures:
        raise SystemExit("bench_kda_kernels: ours disagrees with fla:\n  " + "\n  ".join(failures))


def fmt(row) -> str:
    head = row.get("case") or f"decode batch={row['batch']}"
    if "ours_us" not in row:  # prefill: fla alone
        return f"{head}: fla {row['fla_us']:.1f} us"
    s = f"{head}: ours {row['ours_us']:.1f} us"
    if "fla_us" in row:
        s += f", fla {row['fla_us']:.1f} us, speedup {row['speedup']:.2f}x"
        if row.get("target"):
            s += f" (target {row['target']}x: {'met' if row['met'] else 'NOT met'})"
    if row.get("ours_graph_us"):
        s += f"; CUDA graph: ours {row['ours_graph_us']:.1f} us"
        if row.get("speedup_graph"):
            s += f", fla {row['fla_graph_us']:.1f} us, speedup {row['speedup_graph']:.2f}x"
    return s


if __name__ == "__main__":
    main()
