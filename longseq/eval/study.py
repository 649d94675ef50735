"""Technique-vs-dense fidelity studies through the real engine (used by tests, the notebooks and the benchmarks).

:func:`variant_study` is the general one: dense once, then each named variant (an environment dict, as a user
sets it: ``LONGSEQ_ATTENTION=sparse`` + its knobs, ``LONGSEQ_ATTENTION=duo`` + a pattern, ...) against it.
Each variant's engine runs (1) the dense run's tokens teacher-forced (next-token agreement, KL), (2) the same
prompts free-running (greedy match), (3) passkey prompts. Engines run one at a time, each in a fresh process.
:func:`fidelity_study` is the sparse sweep over budgets built on it, :func:`duo_variants` DuoAttention's calibrated
and random patterns; :func:`engine_setup` gives the engine settings the benchmarks and notebooks share.
"""

from __future__ import annotations

import os

from longseq.eval.fidelity import compare, run_session
from longseq.eval.passkey import passkey_found, passkey_prompt
from longseq.models.prompts import make_prompts

#: vLLM's CPU engine: our PyTorch path (``LONGSEQ_CPU=1``), one process, 2 GiB of KV cache, offline hub.
CPU_ENV = {"LONGSEQ_CPU": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "2"}
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
CPU_KW = {"dtype": "bfloat16", "max_model_len": 8192, "enforce_eager": True, "seed": 0,
          "enable_prefix_caching": True, "max_num_batched_tokens": 4096}
#: The GPU engine: our CUSTOM backend, CUDA graphs for decode.
#: A fixed KV cache (4 GiB holds 16 x 8K tokens of SmolLM2) rather than one sized by profiling free memory, so a
#: study gives the same engine when another job shares the GPU.
GPU_KW = {"dtype": "bfloat16", "max_model_len": 8192, "seed": 0, "enable_prefix_caching": True,
          "gpu_memory_utilization": 0.4, "kv_cache_memory_bytes": 4 << 30, "max_num_seqs": 16,
          "max_num_batched_tokens": 8192,
          "compilation_config": {"mode": 0, "cudagraph_mode": "FULL_DECODE_ONLY"},
          "attention_config": {"backend": "CUSTOM"}}


def engine_setup(cpu: bool) -> tuple[dict[str, str], dict, dict[str, str]]:
    """``(base_env, llm_kwargs, dense_env)`` for a study on vLLM's CPU engine or on the GPU.

    On CPU dense is our PyTorch paged path (``LONGSEQ_CPU_KERNEL=torch``), the numerics family of the
    techniques' CPU paths, so a difference is the technique's and not the kernel's.
    """
    base_env = {**(CPU_ENV if cpu else {}), **OFFLINE_ENV}
    dense_env = {"LONGSEQ_ATTENTION": "dense", **({"LONGSEQ_CPU_KERNEL": "torch"} if cpu else {})}
    return base_env, dict(CPU_KW if cpu else GPU_KW), dense_env


def duo_variants(pattern: str, sparsity: float, random_seed: int, folder: str) -> dict[str, dict[str, str]]:
    """DuoAttention's two variants: ``{"calibrated": env, "random": env}``, ``pattern`` (a folder or built-in
    name) and a random pattern of its shape and streaming sizes (written to ``folder``), both at ``sparsity``.
    The random one is the control: same streaming-head count, heads not chosen by calibration."""
    from longseq.attention_backends.core.duo_pattern import load_duo_pattern, random_pattern, save_duo_pattern

    calibrated = load_duo_pattern(pattern)
    rnd = os.path.join(folder, "random")
    save_duo_pattern(random_pattern(calibrated.num_layers, calibrated.num_kv_heads, random_seed,
                                    calibrated.sink_size, calibrated.recent_size), rnd)
    return {label: {"LONGSEQ_ATTENTION": "duo", "LONGSEQ_DUO_PATTERN": path, "LONGSEQ_DUO_SPARSITY": str(sparsity)}
            for label, path in (("calibrated", pattern), ("random", rnd))}


def variant_study(model: str, tokenizer, variants: dict[str, dict[str, str]], fid_lengths: list[int],
                  passkey_lengths: list[int], max_tokens: int, base_env: dict[str, str], llm_kwargs: dict,
                  dense_env: dict[str, str], seed: int = 0, logprobs: int = 20) -> dict:
    """Dense once, then every named variant against it.

    Args:
        variants: label -> environment of that variant's engine (added to ``base_env``); run in this order.
        fid_lengths: fidelity prompt lengths (tokens; ``make_prompts`` with ``seed``).
        passkey_lengths: passkey prompt lengths (may be empty); prompt ``i`` uses seed ``seed * 100 + i``.
        max_tokens: generated tokens per fidelity prompt (passkey runs generate 8).
        dense_env: added to ``base_env`` for the dense engine.

    Returns:
        ``{"inputs": {"fid_lengths", "passkey_lengths", "max_tokens", "seed"}, "dense": {"passkey_correct",
        "trace"}, "variants": {label: {"agreement", "mean_kl", "max_kl", "steps", "free_running_match",
        "per_prompt", "passkey_correct", "trace", "kv_blocks", "max_concurrency"}}}`` (KV blocks and vLLM's
        "Maximum concurrency" line of each engine, dense's too).

    Raises:
        RuntimeError: an engine failed, or teacher forcing did not reproduce the dense tokens.
    """
    prompts = make_prompts(tokenizer, fid_lengths, seed=seed)
    pk = [passkey_prompt(tokenizer, n, seed=seed * 100 + i) for i, n in enumerate(passkey_lengths)]
    pk_prompts, keys = [p for p, _ in pk], [k for _, k in pk]

    def passkeys(run: dict) -> list[bool]:
        return [passkey_found(t, k) for t, k in zip(run["texts"], keys)]

    pk_runs = [{"prompts": pk_prompts, "max_tokens": 8}] if pk_prompts else []
    dense = run_session(model, [{"prompts": prompts, "max_tokens": max_tokens}, *pk_runs],
                        {**base_env, **dense_env}, llm_kwargs, logprobs)
    d_run = dense["runs"][0]
    out = {"inputs": {"fid_lengths": fid_lengths, "passkey_lengths": passkey_lengths, "max_tokens": max_tokens,
                      "seed": seed},
           "dense": {"passkey_correct": passkeys(dense["runs"][1]) if pk_prompts else [], "trace": dense["trace"],
                     "kv_blocks": dense.get("num_kv_blocks"), "max_concurrency": dense.get("max_concurrency")},
           "variants": {}}
    for label, env in variants.items():
        runs = [{"prompts": prompts, "max_tokens": max_tokens, "forced": d_run["tokens"]},
                {"prompts": prompts, "max_tokens": max_tokens}, *pk_runs]
        res = run_session(model, runs, {**base_env, **env}, llm_kwargs, logprobs)
        forced, free = res["runs"][0], res["runs"][1]
        if forced["tokens"] != d_run["tokens"]:
            raise RuntimeError(f"teacher forcing failed for {label!r}: the forced run did not emit the dense tokens")
        metrics = compare(d_run, forced, free)
        metrics["passkey_correct"] = passkeys(res["runs"][2]) if pk_prompts else []
        metrics["trace"] = res["trace"]
        metrics["kv_blocks"], metrics["max_concurrency"] = res.get("num_kv_blocks"), res.get("max_concurrency")
        out["variants"][label] = metrics
    return out


def fidelity_study(model: str, tokenizer, budgets: list[int], fid_lengths: list[int], passkey_lengths: list[int],
                   max_tokens: int, base_env: dict[str, str], llm_kwargs: dict, dense_env: dict[str, str],
                   sparse_envs: dict[str, dict[str, str]] | None = None, seed: int = 0, logprobs: int = 20) -> dict:
    """Sparse: dense once, then every (variant, budget) against it (:func:`variant_study`).

    ``sparse_envs``: variant label -> extra environment of the sparse engines (default ``{"default": {}}``);
    each runs with ``LONGSEQ_ATTENTION=sparse`` and ``LONGSEQ_SPARSE_BUDGET`` per budget.
    Returns ``{"inputs" (with "budgets"), "dense", "variants": {label: {budget: metrics}}}``.
    """
    sparse_envs = sparse_envs or {"default": {}}
    keys = {f"{label}/{budget}": (label, budget) for label in sparse_envs for budget in budgets}
    variants = {key: {"LONGSEQ_ATTENTION": "sparse", "LONGSEQ_SPARSE_BUDGET": str(budget), **sparse_envs[label]}
                for key, (label, budget) in keys.items()}
    res = variant_study(model, tokenizer, variants, fid_lengths, passkey_lengths, max_tokens, base_env, llm_kwargs,
                        dense_env, seed, logprobs)
    res["inputs"]["budgets"] = budgets
    nested: dict = {label: {} for label in sparse_envs}
    for key, (label, budget) in keys.items():
        nested[label][budget] = res["variants"][key]
    res["variants"] = nested
    return res
