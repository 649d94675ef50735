"""``longseq demo``: SmolLM2-135M-Instruct through vLLM's real engine with a longseq technique, on CPU or GPU.

Each engine runs in a fresh process (vLLM's backend registry and our config are per process), started as
``python -m longseq.plugin.demo SPEC.json OUT.json``; the parent sets the environment exactly as a user
would (``LONGSEQ_ATTENTION``, ``LONGSEQ_CPU``) and reads back tokens, text and timings.

Timings (greedy, prefix caching off so every run recomputes its prompt):
  ttft_s: wall time of ``generate(max_tokens=1)``; tpot_ms: ``(t(max_tokens) - t(1)) / (max_tokens - 1)``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

DEFAULT_QUESTION = "In two sentences: why is decoding with a very long context limited by memory bandwidth?"


def build_prompt(tokenizer, context_tokens: int, question: str = DEFAULT_QUESTION) -> list[int]:
    """Chat prompt of about ``context_tokens`` tokens: filler story text (if any) followed by ``question``."""
    from longseq.models.prompts import synthetic_text

    def chat(text: str) -> list[int]:
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                 tokenize=False)
        return list(tokenizer(rendered, add_special_tokens=False)["input_ids"])

    ids = chat(question)
    pad = context_tokens - len(ids)
    if pad > 0:
        story = tokenizer(synthetic_text(pad // 4 + 20, seed=7))["input_ids"][:pad]
        ids = chat(tokenizer.decode(story) + "\n\n" + question)
    return ids


def engine_env(mode: str | None, on_gpu: bool, trace_dir: str | None) -> dict[str, str]:
    """Environment for one engine run: ``mode=None`` is vLLM's built-in backend (plugin inactive)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LONGSEQ_") or k in ("LONGSEQ_CACHE_DIR",)}
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    if not on_gpu:
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # one process: faster start, less memory on small machines
    if mode is not None:
        env["LONGSEQ_ATTENTION"] = mode
        if not on_gpu:
            env["LONGSEQ_CPU"] = "1"
    if trace_dir:
        env["LONGSEQ_TRACE_DIR"] = trace_dir
    return env


def llm_kwargs(mode: str | None, on_gpu: bool, max_model_len: int) -> dict:
    kw = {"dtype": "bfloat16", "max_model_len": max_model_len, "enable_prefix_caching": False, "seed": 0}
    if on_gpu:
        kw["gpu_memory_utilization"] = 0.3
        if mode is not None:
            kw["attention_config"] = {"backend": "CUSTOM"}
    else:
        kw["enforce_eager"] = True  # torch.compile warm-up costs ~80 s on 2 cores; eager is the fair demo
    return kw


def run_engine(model: str, prompts: list[list[int]], max_tokens: int, mode: str | None, on_gpu: bool,
               timeout: float = 1800) -> dict:
    """Run one engine in a subprocess over ``prompts`` (one after another, each timed on its own).

    Returns ``{"mode", "load_s", "results": [{tokens, text, prompt_tokens, ttft_s, tpot_ms, ...}], "trace"}``;
    ``trace`` holds longseq's per-process call counts (empty when our backend did not run).
    """
    with tempfile.TemporaryDirectory() as tmp:
        spec, out, trace = (os.path.join(tmp, n) for n in ("spec.json", "out.json", "trace"))
        os.makedirs(trace)
        longest = max(len(p) for p in prompts)
        json.dump({"model": model, "prompts": prompts, "max_tokens": max_tokens,
                   "llm_kwargs": llm_kwargs(mode, on_gpu, max(4096, longest + max_tokens + 16))}, open(spec, "w"))
        proc = subprocess.run([sys.executable, "-m", "longseq.plugin.demo", spec, out],
                              env=engine_env(mode, on_gpu, trace), cwd=tmp, capture_output=True, text=True,
                              timeout=timeout)
        if proc.returncode != 0 or not os.path.exists(out):
            raise RuntimeError(f"vLLM run ({mode or 'built-in'}) failed, exit {proc.returncode}:\n"
                               f"{(proc.stdout + proc.stderr)[-4000:]}")
        result = json.load(open(out))
        result["trace"] = [json.load(open(os.path.join(trace, f))) for f in sorted(os.listdir(trace))]
        result["mode"] = mode or "built-in"
        return result


def _engine_main(spec_path: str, out_path: str) -> None:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    spec = json.load(open(spec_path))
    t0 = time.perf_counter()
    llm = LLM(model=spec["model"], **spec["llm_kwargs"])
    load_s = time.perf_counter() - t0

    def timed(prompt: list[int], n: int):
        params = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
        t = time.perf_counter()
        out = llm.generate([TokensPrompt(prompt_token_ids=prompt)], params, use_tqdm=False)[0].outputs[0]
        return time.perf_counter() - t, out

    timed(spec["prompts"][0][:64], 4)  # warm-up (first-call allocations)
    results = []
    for prompt in spec["prompts"]:
        ttft, _ = timed(prompt, 1)
        total, out = timed(prompt, spec["max_tokens"])
        tpot = (total - ttft) / max(1, spec["max_tokens"] - 1)
        results.append({"tokens": list(out.token_ids), "text": out.text, "prompt_tokens": len(prompt),
                        "ttft_s": ttft, "tpot_ms": tpot * 1e3, "total_s": total,
                        "decode_tok_per_s": 1.0 / tpot if tpot > 0 else None})
    json.dump({"load_s": load_s, "results": results}, open(out_path, "w"))


if __name__ == "__main__":
    _engine_main(sys.argv[1], sys.argv[2])
