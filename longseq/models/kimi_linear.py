"""Kimi-Linear shape models for vLLM (``model_type: kimi_linear``, vLLM ships the config class: no remote code)
and a greedy-generation runner for engine tests and benchmarks on dummy weights.

Presets:
    ``tiny``: 4 layers (KDA, KDA, KDA, MLA), hidden 1024, 8 KDA heads x 128, 16 MLA heads (kv_lora_rank 512,
        rope dim 64), dense MLP, SmolLM2's vocab (49152).
    ``kimi-linear-48b``: Kimi-Linear-48B-A3B's layer shapes (hidden 2304, 32 KDA heads x 128, MLA 32 heads,
        MoE 256 experts top-8 + 1 shared, first layer dense, vocab 163840); depth set by ``num_layers`` with
        the model's 3:1 KDA:MLA pattern (every 4th layer MLA).

    python -m longseq.models.kimi_linear write OUT_DIR [PRESET] [NUM_LAYERS]
    python -m longseq.models.kimi_linear run SPEC.json OUT.json    (used by tests/gpu/test_vllm_kda_gpu.py)
"""

from __future__ import annotations

import copy
import functools
import json
import math
import os
import sys
import time
import zlib

_MLA = {"q_lora_rank": None, "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
        "v_head_dim": 128, "mla_use_nope": True}
_COMMON = {"architectures": ["KimiLinearForCausalLM"], "model_type": "kimi_linear", "hidden_act": "silu",
           "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "rope_theta": 10000.0,
           "max_position_embeddings": 8192, **_MLA}

KIMI_LINEAR_PRESETS: dict[str, dict] = {
    "tiny": {**_COMMON, "num_hidden_layers": 4, "hidden_size": 1024, "num_attention_heads": 16,
             "num_key_value_heads": 16, "intermediate_size": 2816, "vocab_size": 49152,
             "linear_attn_config": {"num_heads": 8, "head_dim": 128, "short_conv_kernel_size": 4}},
    # Shapes as in Kimi-Linear-48B-A3B-Instruct's config (27 layers, 7 of them MLA).
    "kimi-linear-48b": {**_COMMON, "num_hidden_layers": 27, "hidden_size": 2304, "num_attention_heads": 32,
                        "num_key_value_heads": 32, "intermediate_size": 9216, "vocab_size": 163840,
                        "moe_intermediate_size": 1024, "num_experts": 256, "num_experts_per_token": 8,
                        "num_shared_experts": 1, "first_k_dense_replace": 1, "moe_layer_freq": 1,
                        "moe_router_activation_func": "sigmoid", "moe_renormalize": True,
                        "use_grouped_topk": True, "num_expert_group": 1, "topk_group": 1,
                        "linear_attn_config": {"num_heads": 32, "head_dim": 128, "short_conv_kernel_size": 4}},
}


def kimi_linear_config(preset: str = "tiny", num_layers: int | None = None) -> dict:
    """config.json contents: ``preset`` with ``num_layers`` layers, every 4th (1-based) MLA, the rest KDA."""
    if preset not in KIMI_LINEAR_PRESETS:
        raise KeyError(f"unknown Kimi-Linear preset {preset!r}; presets: {', '.join(KIMI_LINEAR_PRESETS)}")
    cfg = copy.deepcopy(KIMI_LINEAR_PRESETS[preset])
    n = num_layers or cfg["num_hidden_layers"]
    if n < 1:
        raise ValueError(f"num_layers must be >= 1, got {n}")
    cfg["num_hidden_layers"] = n
    full = [i for i in range(1, n + 1) if i % 4 == 0] or [n]  # at least one MLA layer: vLLM sizes its KV cache
    cfg["linear_attn_config"]["full_attn_layers"] = full
    cfg["linear_attn_config"]["kda_layers"] = [i for i in range(1, n + 1) if i not in full]
    return cfg


def write_kimi_linear_model(out_dir: str, preset: str = "tiny", num_layers: int | None = None,
                            tokenizer_from: str | None = None, max_model_len: int | None = None) -> str:
    """Write ``out_dir/config.json`` (see :func:`kimi_linear_config`) next to SmolLM2's tokenizer files (or
    ``tokenizer_from``'s). Returns ``out_dir``; load it with ``load_format="dummy"``."""
    from longseq.models.shapes import write_shape_model

    cfg = kimi_linear_config(preset, num_layers)
    # Tokenizer files, the vocab check and BOS/EOS ids come from the shape-model writer; config.json is then ours.
    write_shape_model(out_dir, "llama-3.2-1b", tokenizer_from=tokenizer_from, max_model_len=max_model_len,
                      vocab_size=cfg["vocab_size"], max_position_embeddings=cfg["max_position_embeddings"])
    path = os.path.join(out_dir, "config.json")
    with open(path) as f:
        written = json.load(f)
    for key in ("bos_token_id", "eos_token_id", "pad_token_id", "max_position_embeddings"):
        if written.get(key) is not None:
            cfg[key] = written[key]
    with open(path, "w") as f:
        json.dump(cfg, f, indent=2)
    return out_dir


def randomize_weights(model, seed: int = 0, logit_std: float = 8.0) -> int:
    """Redraw the weights of a dummy-loaded vLLM Kimi-Linear model in place, deterministically per parameter name,
    so logits spread (greedy argmax is rarely a near-tie) and the KDA layers carry signal.

    MLA layers are left as loaded: their decode path uses matrices derived from ``kv_b_proj`` at load time, which
    a redraw would leave stale. With dummy weights (|w| <= 1e-3) they add ~nothing to the residual stream.
    Linear weights ~ N(0, 1/fan_in); norm weights 1; ``A_log`` = log U(1, 16) and ``dt_bias`` = softplus^-1 of
    U(log 1e-3, log 0.1) in log space (fla's KDA init); ``lm_head`` ~ N(0, logit_std^2 / hidden).
    Returns the number of parameters redrawn.
    """
    import torch

    mla = [n + "." for n, m in model.named_modules() if type(m).__name__ == "KimiMLAAttention"]
    count = 0
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(name.startswith(prefix) for prefix in mla):
                continue
            g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
            shape = tuple(p.shape)
            if name.endswith("A_log"):
                val = torch.empty(shape).uniform_(1.0, 16.0, generator=g).log()
            elif name.endswith("dt_bias"):
                dt = torch.empty(shape).uniform_(math.log(1e-3), math.log(0.1), generator=g).exp()
                val = dt + torch.log(-torch.expm1(-dt))
            elif p.ndim == 1:
                val = torch.zeros(shape) if "bias" in name else torch.ones(shape)
            elif "lm_head" in name:
                val = torch.randn(shape, generator=g) * (logit_std / math.sqrt(shape[-1]))
            elif "embed_tokens" in name:
                val = torch.randn(shape, generator=g)
            else:
                val = torch.randn(shape, generator=g) / math.sqrt(shape[-1])
            p.copy_(val.to(device=p.device, dtype=p.dtype))
            count += 1
    return count


def run(spec_path: str, out_path: str) -> None:
    """Greedy generation in this process. SPEC: ``{"model", "prompts": [[ids]], "max_tokens", "llm_kwargs",
    "randomize_seed": int | null, "logprobs": k}``; OUT: tokens, top-k logprobs per step, timings."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    spec = json.load(open(spec_path))
    t0 = time.perf_counter()
    llm = LLM(model=spec["model"], load_format="dummy", **spec.get("llm_kwargs", {}))
    redrawn = None
    if spec.get("randomize_seed") is not None:
        redrawn = llm.apply_model(functools.partial(randomize_weights, seed=spec["randomize_seed"]))
    t_load = time.perf_counter() - t0
    params = SamplingParams(temperature=0.0, max_tokens=spec["max_tokens"], ignore_eos=True,
                            logprobs=spec.get("logprobs"))
    t0 = time.perf_counter()
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in spec["prompts"]], params, use_tqdm=False)
    t_gen = time.perf_counter() - t0
    logprobs = None
    if spec.get("logprobs"):
        logprobs = [[{str(t): lp.logprob for t, lp in step.items()} for step in o.outputs[0].logprobs] for o in outs]
    json.dump({"tokens": [list(o.outputs[0].token_ids) for o in outs], "logprobs": logprobs, "redrawn": redrawn,
               "load_s": t_load, "generate_s": t_gen}, open(out_path, "w"))


def main(argv: list[str] | None = None) -> None:
    args = argv if argv is not None else sys.argv[1:]
    if args[:1] == ["write"] and len(args) >= 2:
        print(write_kimi_linear_model(args[1], *args[2:3], *(int(a) for a in args[3:4])))
    elif args[:1] == ["run"] and len(args) == 3:
        run(args[1], args[2])
    else:
        sys.exit("usage: python -m longseq.models.kimi_linear write OUT_DIR [PRESET] [NUM_LAYERS]\n"
                 "       python -m longseq.models.kimi_linear run SPEC.json OUT.json")


if __name__ == "__main__":
    main()
