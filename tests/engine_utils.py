"""Helpers for end-to-end tests that start vLLM's real CPU engine in subprocesses."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
RUNNER = os.path.join(HERE, "engine_runner.py")

#: Environment every engine run shares: offline, small KV cache, in-process engine (fast, low memory).
BASE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
}

LLM_KWARGS = {"dtype": "bfloat16", "max_model_len": 4096, "enable_prefix_caching": True, "enforce_eager": True,
              "seed": 0}


def clean_env(extra: dict[str, str]) -> dict[str, str]:
    """The current environment without any LONGSEQ_* setting, plus BASE_ENV and ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LONGSEQ_") or k == "LONGSEQ_CACHE_DIR"}
    env.update(BASE_ENV)
    env.update(extra)
    return env


def run_llm(model: str, prompts: list[list[int]], max_tokens: int, env: dict[str, str],
            llm_kwargs: dict | None = None, timeout: float = 900, prompt_logprobs: int | None = None) -> dict:
    """Run ``engine_runner.py`` in a fresh process from a neutral cwd; return its JSON (or raise with its log)."""
    with tempfile.TemporaryDirectory() as tmp:
        spec = os.path.join(tmp, "spec.json")
        out = os.path.join(tmp, "out.json")
        json.dump({"model": model, "prompts": prompts, "max_tokens": max_tokens, "prompt_logprobs": prompt_logprobs,
                   "llm_kwargs": {**LLM_KWARGS, **(llm_kwargs or {})}}, open(spec, "w"))
        proc = subprocess.run([sys.executable, RUNNER, spec, out], env=clean_env(env), cwd=tmp,
                              capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0 or not os.path.exists(out):
            raise EngineRunError(proc.returncode, proc.stdout + proc.stderr)
        return json.load(open(out))


class EngineRunError(RuntimeError):
    def __init__(self, returncode: int, log: str):
        super().__init__(f"engine run failed (exit {returncode}); log tail:\n{log[-4000:]}")
        self.returncode, self.log = returncode, log


def read_traces(trace_dir: str) -> list[dict]:
    if not os.path.isdir(trace_dir):
        return []
    return [json.load(open(os.path.join(trace_dir, f))) for f in sorted(os.listdir(trace_dir)) if f.endswith(".json")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ApiServer:
    """``python -m vllm.entrypoints.openai.api_server`` on 127.0.0.1 (``vllm serve`` is broken in vllm-cpu 0.32)."""

    def __init__(self, model: str, env: dict[str, str], args: list[str], log_path: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(log_path, "w")
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
               "--host", "127.0.0.1", "--port", str(self.port), *args]
        self.proc = subprocess.Popen(cmd, env=clean_env(env), cwd=os.path.dirname(log_path),
                                     stdout=self.log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 600) -> None:
        import requests

        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise EngineRunError(self.proc.returncode, open(self.log.name).read())
            try:
                if requests.get(self.url + "/v1/models", timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(1)
        raise TimeoutError(f"server not ready in {timeout}s:\n{open(self.log.name).read()[-3000:]}")

    def stop(self, timeout: float = 30) -> None:
        """SIGTERM, then SIGKILL after ``timeout`` s (keep it above the server's ``--shutdown-timeout``)."""
        self.proc.terminate()
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()
