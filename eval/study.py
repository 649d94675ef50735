"""Sparse-vs-dense fidelity study through the real engine (used by tests, the notebook and the benchmark).

For each budget: one engine runs (1) the dense run's tokens teacher-forced (next-token agreement, KL),
(2) the same prompts free-running (greedy match), (3) passkey prompts. Dense is one more engine with the same
prompts. Engines run one at a time, each in a fresh process with the technique set through the environment.
"""

from __future__ import annotations

from longseq.eval.fidelity import compare, run_session
from longseq.eval.passkey import passkey_found, passkey_prompt
from longseq.models.prompts import make_prompts


def fidelity_study(model: str, tokenizer, budgets: list[int], fid_lengths: list[int], passkey_lengths: list[int],
                   max_tokens: int, base_env: dict[str, str], llm_kwargs: dict, dense_env: dict[str, str],
                   sparse_envs: dict[str, dict[str, str]] | None = None, seed: int = 0, logprobs: int = 20) -> dict:
    """Dense once, then every (variant, budget) of sparse against it.

    ``sparse_envs``: variant label -> extra environment of the sparse engines (default ``{"default": {}}``);
    ``dense_env`` and each variant's are added to ``base_env``.
    Returns ``{"inputs", "dense": {"passkey_correct", "trace"}, "variants": {label: {budget: {"agreement",
    "mean_kl", "max_kl", "free_running_match", "passkey_correct", "per_prompt", "trace", ...}}}}``.
    """
    prompts = make_prompts(tokenizer, fid_lengths, seed=seed)
    pk = [passkey_prompt(tokenizer, n, seed=seed * 100 + i) for i, n in enumerate(passkey_lengths)]
    pk_prompts, keys = [p for p, _ in pk], [k for _, k in pk]

    def passkeys(run: dict) -> list[bool]:
        return [passkey_found(t, k) for t, k in zip(run["texts"], keys)]

    runs = [{"prompts": prompts, "max_tokens": max_tokens}]
    if pk_prompts:
        runs.append({"prompts": pk_prompts, "max_tokens": 8})
    dense = run_session(model, runs, {**base_env, **dense_env}, llm_kwargs, logprobs)
    d_run = dense["runs"][0]
    out = {"inputs": {"fid_lengths": fid_lengths, "passkey_lengths": passkey_lengths, "max_tokens": max_tokens,
                      "budgets": budgets, "seed": seed},
           "dense": {"passkey_correct": passkeys(dense["runs"][1]) if pk_prompts else [],
                     "trace": dense["trace"]},
           "variants": {}}
    for label, extra_env in (sparse_envs or {"default": {}}).items():
        out["variants"][label] = {}
        for budget in budgets:
            runs = [{"prompts": prompts, "max_tokens": max_tokens, "forced": d_run["tokens"]},
                    {"prompts": prompts, "max_tokens": max_tokens}]
            if pk_prompts:
                runs.append({"prompts": pk_prompts, "max_tokens": 8})
            env = {**base_env, "LONGSEQ_ATTENTION": "sparse", "LONGSEQ_SPARSE_BUDGET": str(budget), **extra_env}
            res = run_session(model, runs, env, llm_kwargs, logprobs)
            forced, free = res["runs"][0], res["runs"][1]
            if forced["tokens"] != d_run["tokens"]:
                raise RuntimeError("teacher forcing failed: the forced run did not emit the dense tokens")
            metrics = compare(d_run, forced, free)
            metrics["passkey_correct"] = passkeys(res["runs"][2]) if pk_prompts else []
            metrics["trace"] = res["trace"]
            out["variants"][label][budget] = metrics
    return out
