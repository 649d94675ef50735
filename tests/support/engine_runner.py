"""Run vLLM's real engine offline in a fresh process and dump greedy tokens as JSON.

usage: python engine_runner.py SPEC.json OUT.json
SPEC: {"model": path, "prompts": [[token ids], ...], "max_tokens": int, "llm_kwargs": {...}}
Which backend runs is decided by the environment the parent sets (LONGSEQ_CPU, LONGSEQ_ATTENTION, ...),
exactly as a user would. A fresh process per run keeps vLLM's global registries clean.
"""

import json
import sys
import time


def main(spec_path: str, out_path: str) -> None:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    spec = json.load(open(spec_path))
    t0 = time.perf_counter()
    llm = LLM(model=spec["model"], **spec.get("llm_kwargs", {}))
    t_load = time.perf_counter() - t0
    # prompt_logprobs=k: the top-k log-probs at every prompt position (teacher-forced over the prompt).
    # logprobs=k: the top-k log-probs of every generated step (to tell a near-tie split from a real difference).
    params = SamplingParams(temperature=0.0, max_tokens=spec["max_tokens"], ignore_eos=True,
                            prompt_logprobs=spec.get("prompt_logprobs"), logprobs=spec.get("logprobs"))
    t0 = time.perf_counter()
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in spec["prompts"]], params, use_tqdm=False)
    t_gen = time.perf_counter() - t0
    cfg = getattr(llm.llm_engine, "vllm_config", None)
    cg_mode = str(cfg.compilation_config.cudagraph_mode) if cfg is not None else None
    json.dump({"tokens": [list(o.outputs[0].token_ids) for o in outs], "cudagraph_mode": cg_mode,
               "texts": [o.outputs[0].text for o in outs],
               "prompt_logprobs": [_top_logprobs(o.prompt_logprobs) for o in outs] if spec.get("prompt_logprobs")
               else None,
               "logprobs": [[{str(t): lp.logprob for t, lp in step.items()} for step in o.outputs[0].logprobs]
                            for o in outs] if spec.get("logprobs") else None,
               "num_kv_blocks": getattr(cfg.cache_config, "num_gpu_blocks", None) if cfg is not None else None,
               "load_s": t_load, "generate_s": t_gen}, open(out_path, "w"))


def _top_logprobs(per_position) -> list[dict[str, float]]:
    """vLLM's ``prompt_logprobs`` (first entry None) -> ``[{token_id: logprob}]`` per position 1..n-1."""
    return [{str(t): lp.logprob for t, lp in pos.items()} for pos in per_position[1:]]


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
