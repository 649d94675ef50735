"""SGLang engine runs for tests/gpu/test_sglang_gpu.py: one offline ``Engine`` per configuration, each in a
fresh Python process (GPU memory is freed between configurations; SGLang's registries start clean).

``run_sglang(model, ops, env, engine_kwargs)`` runs :func:`main` in a new process (cwd: an empty folder;
environment: this one without ``LONGSEQ_*``, plus ``env`` and ``LONGSEQ_TRACE_DIR``) and returns its JSON plus
the backends' trace files. The ops run in order in one engine:

- ``generate(prompts, max_tokens, logprobs=k, forced=None)``: greedy, ``ignore_eos``; returns ``tokens``,
  ``logprobs`` (per prompt, per step ``{token id: logprob}`` of the top ``k``: what ``compare_greedy`` and
  ``longseq.eval.fidelity.compare`` read), ``top2_gaps`` and ``meta`` (``cached_tokens``,
  ``cached_tokens_details``). ``forced``: teacher forcing through :class:`ForceAndRecord`, a custom logit
  processor that records the raw top-k log-probs of each step and then leaves only the forced token, so the
  log-probs are the model's on the forced prefix. Needs ``enable_custom_logit_processor`` and
  ``disable_overlap_schedule`` (the step index is the request's output length, exact without overlap).
- ``{"op": "wait_blocks", "dir": D, "count": n}``: until ``D`` (our KV store's disk tier) holds ``n`` block
  files: the store has the pages in DRAM and on disk, so a flush cannot cancel their backup.
- ``{"op": "flush"}``: ``Engine.flush_cache()`` until it succeeds (it refuses while a batch is in flight).

No SGLang import at module level: the test module imports this only inside fixtures/tests.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

from engine_utils import EngineRunError, read_traces

HERE = os.path.dirname(os.path.abspath(__file__))
BASE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def generate(prompts, max_tokens: int, logprobs: int = 0, forced=None) -> dict:
    return {"op": "generate", "prompts": prompts, "max_tokens": max_tokens, "logprobs": logprobs, "forced": forced}


def run_sglang(model: str, ops: list[dict], env: dict[str, str], engine_kwargs: dict, timeout: float = 540) -> dict:
    """``{"ops": [one result per op], "load_s", "server": {...}, "traces": [...]}`` or :class:`EngineRunError`
    with the process's log (the scheduler's errors included)."""
    with tempfile.TemporaryDirectory() as tmp:
        spec, out, trace = (os.path.join(tmp, n) for n in ("spec.json", "out.json", "trace"))
        with open(spec, "w") as f:
            json.dump({"model": model, "ops": ops, "engine_kwargs": engine_kwargs}, f)
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("LONGSEQ_") or k == "LONGSEQ_CACHE_DIR"}
        full_env.update(BASE_ENV)
        full_env.update(env)
        full_env["LONGSEQ_TRACE_DIR"] = trace
        # This folder first, so SGLang's scheduler process can import ForceAndRecord by name (dill by reference).
        full_env["PYTHONPATH"] = os.pathsep.join([HERE] + [p for p in [os.environ.get("PYTHONPATH")] if p])
        cmd = [sys.executable, "-c", "import sys, sglang_gpu; sglang_gpu.main(sys.argv[1], sys.argv[2])", spec, out]
        proc = subprocess.run(cmd, env=full_env, cwd=tmp, capture_output=True, text=True, timeout=timeout,
                              check=False)
        if proc.returncode != 0 or not os.path.exists(out):
            raise EngineRunError(proc.returncode, proc.stdout + proc.stderr)
        with open(out) as f:
            result = json.load(f)
        result["traces"] = read_traces(trace)
        return result


class ForceAndRecord:
    """SGLang custom logit processor. Per request (``custom_params``: ``path``, ``prompt``, ``top_k``, optional
    ``forced``): append ``{"prompt", "step", "top": {token: logprob}}`` of the raw logits to ``path``, then with
    ``forced`` keep only ``forced[step]`` (logit 0, the rest -inf) so greedy sampling takes it."""

    def __call__(self, logits, custom_param_list=None):
        import torch

        for i, params in enumerate(custom_param_list or []):
            if not params or "path" not in params:
                continue
            step = len(params["__req__"].output_ids)
            top = torch.log_softmax(logits[i].float(), dim=-1).topk(int(params["top_k"]))
            record = {"prompt": params["prompt"], "step": step,
                      "top": dict(zip(map(str, top.indices.tolist()), top.values.tolist()))}
            with open(params["path"], "a") as f:
                f.write(json.dumps(record) + "\n")
            forced = params.get("forced")
            if forced and step < len(forced):
                logits[i].fill_(float("-inf"))
                logits[i, int(forced[step])] = 0.0
        return logits


def processor_str() -> str:
    """``CustomLogitProcessor.to_str()``'s format for :class:`ForceAndRecord` (no SGLang base class needed:
    SGLang only ``dill.loads`` the class and calls an instance)."""
    import dill

    return json.dumps({"callable": dill.dumps(ForceAndRecord).hex()})


def _top2_gap(step: dict[str, float]) -> float:
    top = sorted(step.values(), reverse=True)
    return top[0] - top[1] if len(top) > 1 else float("inf")


def _generate(engine, op: dict, record_path: str) -> dict:
    n, k, forced = len(op["prompts"]), op["logprobs"], op.get("forced")
    params = [{"temperature": 0.0, "max_new_tokens": op["max_tokens"], "ignore_eos": True} for _ in range(n)]
    kwargs = {}
    if forced:
        for i, p in enumerate(params):
            p["custom_params"] = {"path": record_path, "prompt": i, "top_k": max(k, 2), "forced": forced[i]}
        kwargs["custom_logit_processor"] = [processor_str()] * n
    elif k:
        kwargs.update(return_logprob=True, top_logprobs_num=k)
    t0 = time.perf_counter()
    outs = engine.generate(input_ids=op["prompts"], sampling_params=params, **kwargs)
    res = {"op": "generate", "generate_s": time.perf_counter() - t0, "tokens": [list(o["output_ids"]) for o in outs],
           "meta": [{key: o["meta_info"].get(key) for key in ("cached_tokens", "cached_tokens_details")}
                    for o in outs]}
    if forced:
        steps: list[dict[int, dict]] = [{} for _ in range(n)]
        with open(record_path) as f:
            for line in f:
                rec = json.loads(line)
                steps[rec["prompt"]][rec["step"]] = rec["top"]  # a repeated step (retraction): the last counts
        for i, s in enumerate(steps):
            assert sorted(s) == list(range(op["max_tokens"])), f"prompt {i}: steps recorded {sorted(s)}"
        res["logprobs"] = [[s[j] for j in range(op["max_tokens"])] for s in steps]
    elif k:
        res["logprobs"] = [[{str(t[1]): t[0] for t in step} for step in o["meta_info"]["output_top_logprobs"]]
                           for o in outs]
    if "logprobs" in res:
        for i, (toks, steps_i) in enumerate(zip(res["tokens"], res["logprobs"])):
            assert len(steps_i) == len(toks), f"prompt {i}: log-probs of {len(steps_i)} steps, {len(toks)} tokens"
        res["top2_gaps"] = [[_top2_gap(step) for step in p] for p in res["logprobs"]]
    return res


def _wait_blocks(op: dict) -> dict:
    deadline, count = time.time() + op.get("timeout", 120), 0
    while time.time() < deadline:
        count = sum(f.endswith(".kvb") for _, _, files in os.walk(op["dir"]) for f in files)
        if count >= op["count"]:
            return {"op": "wait_blocks", "files": count}
        time.sleep(0.2)
    raise TimeoutError(f"{op['dir']}: {count} block files after {op.get('timeout', 120)} s, expected {op['count']}")


def _flush(engine) -> dict:
    for attempt in range(1, 21):
        out = engine.flush_cache()
        if getattr(out, "success", out) is True:
            return {"op": "flush", "success": True, "attempts": attempt}
        time.sleep(0.5)
    return {"op": "flush", "success": False, "attempts": attempt}


def _server_summary(engine) -> dict:
    """Resolved settings as the scheduler reports them (``get_server_info``), else as this process resolved them."""
    summary: dict = {}
    try:
        info = engine.get_server_info()
        states = info.get("internal_states") or [{}]
        state = states[0] if isinstance(states, list) and states and isinstance(states[0], dict) else {}
        cfg = state.get("cuda_graph_config") or info.get("cuda_graph_config")
        summary.update(graph_gb=(state.get("memory_usage") or {}).get("graph"), version=info.get("version"),
                       attention_backend=state.get("attention_backend", info.get("attention_backend")))
        decode = cfg.get("decode") if isinstance(cfg, dict) else getattr(cfg, "decode", None)
        backend = decode.get("backend") if isinstance(decode, dict) else getattr(decode, "backend", None)
        if backend is not None:
            summary["decode_graph"] = str(backend)
    except Exception as e:  # noqa: BLE001 - reported, and the test's assertion names what is missing
        summary["server_info_error"] = repr(e)
    if "decode_graph" not in summary:
        cfg = getattr(engine.server_args, "cuda_graph_config", None)
        summary["decode_graph"] = str(getattr(getattr(cfg, "decode", None), "backend", cfg))
    return summary


def main(spec_path: str, out_path: str) -> None:
    from sglang.srt.entrypoints.engine import Engine

    with open(spec_path) as f:
        spec = json.load(f)
    t0 = time.perf_counter()
    engine = Engine(model_path=spec["model"], **spec["engine_kwargs"])
    results = {"load_s": time.perf_counter() - t0, "ops": []}
    try:
        for i, op in enumerate(spec["ops"]):
            if op["op"] == "generate":
                results["ops"].append(_generate(engine, op, os.path.abspath(f"record-{i}.jsonl")))
            elif op["op"] == "wait_blocks":
                results["ops"].append(_wait_blocks(op))
            elif op["op"] == "flush":
                results["ops"].append(_flush(engine))
            else:
                raise ValueError(f"unknown op {op['op']!r}")
        results["server"] = _server_summary(engine)
    finally:
        engine.shutdown()
    with open(out_path, "w") as f:
        json.dump(results, f)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # the engine is shut down; skip interpreter teardown (SGLang's threads can hold it up)
