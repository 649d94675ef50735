"""Fidelity of a technique against dense, through vLLM's real engine.

``run_generation`` runs one engine in a fresh process (environment = the technique, as a user sets it) and
returns greedy tokens plus the top-k log-probs at every generated step; ``forced=`` feeds given tokens
(teacher forcing). ``compare(dense, other)`` gives, per prompt and overall:
  - next-token agreement: the technique's argmax equals dense's token at every step of dense's sequence;
  - KL(dense || technique) per step over dense's top-k tokens (nats; the mass outside top-k is ignored, and a
    token missing from the technique's top-k gets its k-th log-prob, an upper bound);
  - free-running greedy match: the fraction of positions where the two free-running generations agree.

    python -m longseq.eval.fidelity SPEC.json OUT.json   (the engine process; used by run_generation)
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import tempfile


_CONCURRENCY = re.compile(r"Maximum concurrency for ([\d,]+) tokens per request: ([\d.]+)x")


def run_session(model: str, runs: list[dict], env: dict[str, str], llm_kwargs: dict, logprobs: int = 20,
                timeout: float = 3600) -> dict:
    """Several generation runs, one after another, in ONE fresh engine process (later runs reuse the
    prefix cache of earlier ones, so a forced run followed by a free run prefills each prompt once).

    Each run: ``{"prompts": [[ids]], "max_tokens": n, "forced": [[ids]] | None}``.
    Returns ``{"runs": [{"tokens", "texts", "logprobs", "generate_s"}], "trace": [...], "num_kv_blocks",
    "max_concurrency": {"tokens", "x"} (vLLM's start-up line, None if absent)}``; ``logprobs`` is,
    per prompt, the top-``logprobs`` ``{token: logprob}`` at every generated step.
    """
    with tempfile.TemporaryDirectory() as tmp:
        spec, out, trace = (os.path.join(tmp, n) for n in ("spec.json", "out.json", "trace"))
        os.makedirs(trace)
        json.dump({"model": model, "runs": runs, "logprobs": logprobs, "llm_kwargs": llm_kwargs}, open(spec, "w"))
        full_env = {**os.environ, **env, "LONGSEQ_TRACE_DIR": trace}
        proc = subprocess.run([sys.executable, "-m", "longseq.eval.fidelity", spec, out], env=full_env, cwd=tmp,
                              capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0 or not os.path.exists(out):
            raise RuntimeError(f"engine run failed (exit {proc.returncode}):\n{(proc.stdout + proc.stderr)[-4000:]}")
        result = json.load(open(out))
        result["trace"] = [json.load(open(os.path.join(trace, f))) for f in sorted(os.listdir(trace))
                           if f.endswith(".json")]
        m = _CONCURRENCY.search(proc.stdout + proc.stderr)  # vLLM's own start-up line
        result["max_concurrency"] = {"tokens": int(m.group(1).replace(",", "")), "x": float(m.group(2))} if m else None
        return result


def run_generation(model: str, prompts: list[list[int]], max_tokens: int, env: dict[str, str],
                   llm_kwargs: dict, logprobs: int = 20, forced: list[list[int]] | None = None,
                   timeout: float = 3600) -> dict:
    """One run (greedy, or teacher-forced with ``forced``) in a fresh engine; the run's dict plus ``trace``."""
    res = run_session(model, [{"prompts": prompts, "max_tokens": max_tokens, "forced": forced}], env, llm_kwargs,
                      logprobs, timeout)
    return {**res["runs"][0], "trace": res["trace"]}


def _kl(p: dict[str, float], q: dict[str, float]) -> float:
    floor = min(q.values())
    return sum(math.exp(lp) * (lp - q.get(t, floor)) for t, lp in p.items())


def compare(dense: dict, forced: dict, free: dict | None = None) -> dict:
    """Metrics of a technique's teacher-forced run (``forced``: fed dense's tokens) against ``dense``."""
    per_prompt, agree, total, kls = [], 0, 0, []
    for i, (toks, lp_d, lp_s) in enumerate(zip(dense["tokens"], dense["logprobs"], forced["logprobs"])):
        a = sum(max(s, key=s.get) == str(t) for t, s in zip(toks, lp_s))
        k = [_kl(d, s) for d, s in zip(lp_d, lp_s)]
        row = {"prompt": i, "steps": len(toks), "agreement": a / len(toks), "mean_kl": sum(k) / len(k),
               "max_kl": max(k)}
        if free is not None:
            row["free_running_match"] = sum(x == y for x, y in zip(toks, free["tokens"][i])) / len(toks)
        per_prompt.append(row)
        agree, total = agree + a, total + len(toks)
        kls += k
    res = {"agreement": agree / total, "mean_kl": sum(kls) / len(kls), "max_kl": max(kls), "steps": total,
           "per_prompt": per_prompt}
    if free is not None:
        res["free_running_match"] = sum(r["free_running_match"] * r["steps"] for r in per_prompt) / total
    return res


def _engine_main(spec_path: str, out_path: str) -> None:
    import time

    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from longseq.eval.forced import FORCED_KEY, ForcedTokensLogitsProcessor

    spec = json.load(open(spec_path))
    kw = dict(spec["llm_kwargs"])
    kw.setdefault("max_logprobs", max(20, spec["logprobs"]))
    llm = LLM(model=spec["model"], logits_processors=[ForcedTokensLogitsProcessor], **kw)
    results = []
    for run in spec["runs"]:
        params = []
        for i in range(len(run["prompts"])):
            extra = {FORCED_KEY: run["forced"][i]} if run.get("forced") else None
            params.append(SamplingParams(temperature=0.0, max_tokens=run["max_tokens"], ignore_eos=True,
                                         logprobs=spec["logprobs"], extra_args=extra))
        t0 = time.perf_counter()
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in run["prompts"]], params, use_tqdm=False)
        results.append({
            "tokens": [list(o.outputs[0].token_ids) for o in outs],
            "texts": [o.outputs[0].text for o in outs],
            "logprobs": [[{str(t): lp.logprob for t, lp in step.items()} for step in o.outputs[0].logprobs]
                         for o in outs],
            "generate_s": time.perf_counter() - t0})
    cache = llm.llm_engine.vllm_config.cache_config
    json.dump({"runs": results, "num_kv_blocks": getattr(cache, "num_gpu_blocks", None)}, open(out_path, "w"))


if __name__ == "__main__":
    _engine_main(sys.argv[1], sys.argv[2])
