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
            llm_kwargs: dict | None = None, timeout: float = 900, prompt_logprobs: int | None = None,
            logprobs: int | None = None) -> dict:
    """Run ``engine_runner.py`` in a fresh process from a neutral cwd; return its JSON (or raise with its log).
    ``logprobs=k``: also the top-k log-probs of each generated step (``out["logprobs"][prompt][step]``)."""
    with tempfile.TemporaryDirectory() as tmp:
        spec = os.path.join(tmp, "spec.json")
        out = os.path.join(tmp, "out.json")
        json.dump({"model": model, "prompts": prompts, "max_tokens": max_tokens, "prompt_logprobs": prompt_logprobs,
                   "logprobs": logprobs, "llm_kwargs": {**LLM_KWARGS, **(llm_kwargs or {})}}, open(spec, "w"))
        proc = subprocess.run([sys.executable, RUNNER, spec, out], env=clean_env(env), cwd=tmp,
                              capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0 or not os.path.exists(out):
            raise EngineRunError(proc.returncode, proc.stdout + proc.stderr)
        return json.load(open(out))


#: Greedy runs whose kernels round differently may part at a step where the baseline's top-2 log-probs are
#: closer than this (nats); anywhere else a difference is a bug.
TIE_NATS = 0.25


def compare_greedy(base: dict, ours: dict, tie_nats: float = TIE_NATS) -> dict:
    """Per prompt: tokens equal up to the first difference, which must sit at a near-tie of the baseline.

    ``base`` needs ``logprobs`` (top-2 at least) and ``tokens``; ``ours`` needs ``tokens`` (and ``logprobs`` for
    ``max_logprob_diff``; with ``top2_gaps[p][i]``, its own top-2 gap at each step, the split must be a near-tie
    of both runs). Kernels that compute the same math in another order (fp32 SDPA vs einsum, GEMMs of another
    batch shape, another CPU ISA) flip greedy near-ties of the synthetic prompts; that is not an error.
    """
    report = {"identical": 0, "near_tie_splits": [], "max_logprob_diff": 0.0}
    for p, (tb, to) in enumerate(zip(base["tokens"], ours["tokens"])):
        assert len(tb) == len(to), (p, tb, to)
        split = next((i for i, (a, b) in enumerate(zip(tb, to)) if a != b), None)
        if ours.get("logprobs"):
            for i in range(len(tb) if split is None else split):
                lp_b, lp_o = base["logprobs"][p][i][str(tb[i])], ours["logprobs"][p][i][str(tb[i])]
                report["max_logprob_diff"] = max(report["max_logprob_diff"], abs(lp_b - lp_o))
        if split is None:
            report["identical"] += 1
            continue
        top = sorted(base["logprobs"][p][split].values(), reverse=True)
        gap = top[0] - top[1]
        assert gap < tie_nats, f"prompt {p} parts at step {split} where the baseline's top-2 gap is {gap:.3f} nats"
        if ours.get("top2_gaps"):
            own = ours["top2_gaps"][p][split]
            assert own < tie_nats, f"prompt {p} parts at step {split} where its own top-2 gap is {own:.3f} nats"
        report["near_tie_splits"].append({"prompt": p, "step": split, "gap": gap})
    return report


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

    def ask_greedy(self, model: str, prompts: list[list[int]], max_tokens: int) -> dict:
        """Send ``prompts`` one by one (greedy, ``ignore_eos``, top-2 log-probs); return ``{"texts", "tokens",
        "logprobs"}``, logprobs as ``[prompt][step] = {token id: logprob}`` (the shape ``compare_greedy`` reads)."""
        import requests

        out: dict = {"texts": [], "tokens": [], "logprobs": []}
        for p in prompts:
            r = requests.post(self.url + "/v1/completions", timeout=600, json={
                "model": model, "prompt": p, "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True,
                "return_token_ids": True, "logprobs": 2, "return_tokens_as_token_ids": True})
            assert r.status_code == 200, r.text
            choice = r.json()["choices"][0]
            out["texts"].append(choice["text"])
            out["tokens"].append(choice["token_ids"])
            out["logprobs"].append([{k.removeprefix("token_id:"): lp for k, lp in step.items()}
                                    for step in choice["logprobs"]["top_logprobs"]])
        return out

    def stop(self, timeout: float = 30) -> None:
        """SIGTERM, then SIGKILL after ``timeout`` s (keep it above the server's ``--shutdown-timeout``)."""
        self.proc.terminate()
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def write_one_streaming_head_pattern(path: str, layers: int = 30, kv_heads: int = 3, sink: int = 16,
                                     recent: int = 64) -> str:
    """A duo pattern with exactly one streaming KV head per layer (gate < 0.4, the others > 0.6), so sparsity
    ``1 / kv_heads`` picks the same heads globally and per layer: compute-only duo and ``LONGSEQ_DUO_MEMORY``'s
    split (one streaming count per layer) then run one mask. Returns ``path``."""
    import torch

    from longseq.attention_backends.core.duo_pattern import DuoPattern, save_duo_pattern

    g = torch.Generator().manual_seed(0)
    gates = 0.6 + 0.4 * torch.rand(layers, kv_heads, generator=g, dtype=torch.float64)
    gates[torch.arange(layers), torch.randint(0, kv_heads, (layers,), generator=g)] = 0.4 * torch.rand(
        layers, generator=g, dtype=torch.float64)
    save_duo_pattern(DuoPattern(gates, sink_size=sink, recent_size=recent, source="test"), path)
    return path

