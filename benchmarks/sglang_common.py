"""What the SGLang benchmarks (``bench_sglang_decode``, ``bench_sglang_hicache``) share: the engine calls their
children make (SGLang is imported only there), the parent's per-configuration run under a time budget, and the
command-line options both take."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time

from benchmarks.common import REPO_ROOT, env_without_longseq, run_child

#: Variables of ours kept from the caller's environment; every other LONGSEQ_* is dropped (run_child's callers do too).
KEEP = ("LONGSEQ_TEST_MODEL", "LONGSEQ_CACHE_DIR")



def generate(engine, prompts: list[list[int]], max_new_tokens: int) -> tuple[float, list[dict]]:
    """Wall seconds of one synchronous greedy ``Engine.generate`` of ``prompts`` (token ids) and each output's
    ``meta_info``; raises unless every request produced ``max_new_tokens`` tokens."""
    params = [{"temperature": 0.0, "max_new_tokens": max_new_tokens, "ignore_eos": True} for _ in prompts]
    t = time.perf_counter()
    outs = engine.generate(input_ids=prompts, sampling_params=params)
    seconds = time.perf_counter() - t
    got = [len(o["output_ids"]) for o in outs]
    if got != [max_new_tokens] * len(prompts):
        raise RuntimeError(f"asked {max_new_tokens} tokens per request, got {got}")
    return seconds, [o["meta_info"] for o in outs]


def flush(engine) -> dict:
    """``Engine.flush_cache()`` until it succeeds (SGLang refuses while a batch is still in flight)."""
    for attempt in range(1, 41):
        out = engine.flush_cache()
        if getattr(out, "success", out) is True:
            return {"success": True, "attempts": attempt}
        time.sleep(0.25)
    return {"success": False, "attempts": attempt}


def kernel_table(trace_path: str, steps: int, top: int = 25) -> list[dict]:
    """GPU kernel time per step by kernel name from a torch profiler chrome trace (``.json`` or ``.json.gz``):
    ``[{"total_us_per_step": ...}, {"kernel", "us_per_step", "calls_per_step"}, ...]``, busiest first."""
    import gzip

    opener = gzip.open if trace_path.endswith(".gz") else open
    with opener(trace_path, "rt") as f:
        events = json.load(f).get("traceEvents", [])
    per: dict[str, list[float]] = {}
    for ev in events:
        if ev.get("cat") == "kernel" and ev.get("ph") == "X":
            per.setdefault(str(ev.get("name", "?"))[:120], []).append(float(ev.get("dur", 0.0)))
    rows = sorted(({"kernel": k, "us_per_step": round(sum(v) / steps, 2), "calls_per_step": round(len(v) / steps, 2)}
                   for k, v in per.items()), key=lambda r: -r["us_per_step"])
    return [{"total_us_per_step": round(sum(r["us_per_step"] for r in rows), 1)}] + rows[:top]


def profile_decode(engine, prompts: list[list[int]], steps: int, timeout: float = 120.0) -> list[dict]:
    """``kernel_table`` of ``steps`` forward steps of ``prompts`` (already in the radix cache, so the first step is a
    short extend and the rest decode), through SGLang's own profiler (``Engine.start_profile``: the scheduler process
    runs the GPU work). The trace is written when the steps are done; it is read once its size settles."""
    import glob
    import tempfile

    out_dir = tempfile.mkdtemp(prefix="sglang-profile-")
    engine.start_profile(output_dir=out_dir, num_steps=steps, activities=["GPU"], with_stack=False,
                         record_shapes=False)
    generate(engine, prompts, steps + 16)
    deadline, last = time.monotonic() + timeout, -1
    while time.monotonic() < deadline:
        paths = glob.glob(os.path.join(out_dir, "*.trace.json*"))
        size = sum(os.path.getsize(p) for p in paths)
        if paths and size == last:
            try:
                table = kernel_table(paths[0], steps)
            except (OSError, ValueError, EOFError):  # still being written
                table = None
            if table:
                for r in table[1:11]:
                    print(f"[prof] {r['us_per_step']:9.1f} us  x{r['calls_per_step']:6.1f}  {r['kernel']}",
                          file=sys.stderr, flush=True)
                return table
        last = size
        time.sleep(2.0)
    raise TimeoutError(f"no readable profiler trace in {out_dir} after {timeout:.0f} s")


def server_summary(engine) -> dict:
    """What the scheduler resolved (backend, page size, KV tokens, graph settings, SGLang version)."""
    try:
        info = engine.get_server_info()
        states = info.get("internal_states") or [{}]
        state = states[0] if isinstance(states, list) and isinstance(states[0], dict) else {}
        keys = ("version", "attention_backend", "page_size", "max_total_num_tokens", "mem_fraction_static",
                "cuda_graph_config", "chunked_prefill_size", "hicache_storage_backend", "hicache_mem_layout")
        out = {k: info[k] for k in keys if info.get(k) is not None}
        out.update({k: state[k] for k in ("memory_usage", "cuda_graph_config") if k in state})
        return json.loads(json.dumps(out, default=str))
    except Exception as e:  # noqa: BLE001 - a record for the result file, never a reason to lose the timings
        return {"server_info_error": repr(e)}


def finish(engine, result: dict) -> None:
    """Print the child's ``RESULT`` line, shut the engine down (so its GPU memory is free for the next child) and
    exit without interpreter teardown (SGLang's threads can hold it up); a hung shutdown is cut after 90 s."""
    print("RESULT " + json.dumps(result, default=str), flush=True)
    sys.stderr.flush()
    threading.Timer(90, lambda: os._exit(0)).start()
    try:
        if engine is not None:
            engine.shutdown()
    finally:
        os._exit(0)


def run_config(module: str, child_args: list[str], env: dict, label: str, timeout: float) -> dict:
    """``common.run_child``, with a failure or timeout returned as ``{"error": ...}`` instead of ending the run."""
    try:
        return run_child(module, child_args, env, label, timeout=timeout)
    except (SystemExit, Exception) as e:  # run_child exits naming the label; its stderr tail is already shown
        time.sleep(5)  # the killed engine's scheduler (PDEATHSIG) gives its GPU memory back
        return {"error": str(e) or type(e).__name__}


def run_environment() -> dict:
    """``common.environment()`` (device, versions, commit: ``BENCH_COMMIT``) in a short-lived process, so no CUDA
    context of this parent holds GPU memory while the engines run; plus the SGLang version."""
    from longseq.versions import installed_version

    code = "import json; from benchmarks.common import environment; print(json.dumps(environment()))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT, timeout=300)
    try:
        info = json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        info = {"environment_error": proc.stderr[-500:]}
    info["sglang"] = installed_version("sglang")
    return info


def base_kwargs(model_dir: str, backend: str, page_size: int, context_length: int, max_total_tokens: int,
                max_batch: int) -> dict:
    """``Engine`` arguments of both benchmarks (ServerArgs fields of SGLang 0.5.15 and 0.5.23 alike; 0.5.15 has no
    ``cuda_graph_max_bs`` keyword, only the CLI alias): dummy weights, bf16, token ids in and out (no tokenizer),
    greedy sampling in PyTorch (no FlashInfer JIT build for a baseline that does not use it), decode graphs up to
    ``max_batch``, prefill graphs off, a KV pool of ``max_total_tokens`` (same for every backend)."""
    return dict(model_path=model_dir, load_format="dummy", dtype="bfloat16", attention_backend=backend,
                page_size=page_size, context_length=context_length, max_total_tokens=max_total_tokens,
                max_running_requests=max(16, 2 * max_batch), cuda_graph_max_bs_decode=max_batch,
                disable_prefill_cuda_graph=True, skip_tokenizer_init=True, sampling_backend="pytorch",
                random_seed=0, log_level="warning")


def child_env(extra: dict) -> dict:
    env = env_without_longseq(*KEEP)
    return {**env, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **extra}


def add_run_args(p: argparse.ArgumentParser, name: str, timeout: float, unit: str) -> None:
    """The options of both benchmarks' parent and child: the shape-only model, the time limits (``unit``: what one
    engine runs, for the help), the result file's name and the hidden ``--child``."""
    p.add_argument("--shape", default="llama-3.1-8b")
    p.add_argument("--model-dir", default=None, help="shape-only model folder (written if missing)")
    p.add_argument("--tokenizer-from", default=os.environ.get("LONGSEQ_TEST_MODEL"))
    p.add_argument("--timeout", type=float, default=timeout, help=f"seconds per {unit} (engine start included)")
    p.add_argument("--budget", type=float, default=520,
                   help=f"seconds for the whole run: no {unit} starts with less than 60 s left, and each one's "
                        "timeout is cut to what is left (scripts/gpu/job.sh stops a job at 540 s)")
    p.add_argument("--name", default=name, help="results file name")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)


def run_in_budget(args, started: float, module: str, child_args: list[str], env: dict, label: str) -> dict:
    """One configuration's child (``run_config``) with its timeout cut to what is left of ``--budget`` since
    ``started`` (``time.monotonic()``); ``{"error": "not run: ..."}`` when under 60 s are left."""
    left = args.budget - (time.monotonic() - started)
    if left < 60:
        return {"error": f"not run: {left:.0f} s left of --budget {args.budget:.0f}"}
    return run_config(module, child_args, env, label, round(min(args.timeout, left)))
