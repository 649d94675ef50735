"""Shape-only models: a real model's config.json plus borrowed tokenizer files, no weights.

For performance runs with vLLM ``load_format="dummy"`` (random weights, correct shapes and cost). The
tokenizer comes from another model (e.g. SmolLM2, vocab 49152); that is fine as long as every token id it
produces is below the shape's vocab (128256 for Llama 3), which :func:`write_shape_model` checks.

    python -m longseq.models.shapes OUT_DIR [SHAPE]     # tokenizer from SmolLM2 (built if needed)
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import sys

_LLAMA3_ROPE = {"rope_type": "llama3", "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}

#: config.json contents as published for each model (legacy ``rope_theta``/``rope_scaling`` keys, which
#: every transformers and vLLM version reads), with ``head_dim`` spelled out.
SHAPES: dict[str, dict] = {
    "llama-3.1-8b": {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "num_hidden_layers": 32,
        "hidden_size": 4096,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "intermediate_size": 14336,
        "vocab_size": 128256,
        "max_position_embeddings": 131072,
        "rope_theta": 500000.0,
        "rope_scaling": {**_LLAMA3_ROPE, "factor": 8.0},
        "rms_norm_eps": 1e-5,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "bos_token_id": 128000,
        "eos_token_id": [128001, 128008, 128009],
        "torch_dtype": "bfloat16",
    },
    "llama-3.2-1b": {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "num_hidden_layers": 16,
        "hidden_size": 2048,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 64,
        "intermediate_size": 8192,
        "vocab_size": 128256,
        "max_position_embeddings": 131072,
        "rope_theta": 500000.0,
        "rope_scaling": {**_LLAMA3_ROPE, "factor": 32.0},
        "rms_norm_eps": 1e-5,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": True,
        "bos_token_id": 128000,
        "eos_token_id": [128001, 128008, 128009],
        "torch_dtype": "bfloat16",
    },
}

#: Tokenizer files copied when present in ``tokenizer_from``.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja", "chat_template.json",
)


def _max_token_id(tokenizer_json: str) -> int:
    with open(tokenizer_json) as f:
        tok = json.load(f)
    ids = list(tok.get("model", {}).get("vocab", {}).values()) + [t["id"] for t in tok.get("added_tokens", [])]
    return max(ids)


def write_shape_model(out_dir: str, shape: str = "llama-3.1-8b", tokenizer_from: str | None = None,
                      max_model_len: int | None = None, **overrides) -> str:
    """Write ``out_dir/config.json`` for ``shape`` next to the tokenizer files of ``tokenizer_from``.

    Args:
        out_dir: folder to write (created; existing files of the same names are replaced).
        shape: a key of ``SHAPES``.
        tokenizer_from: model folder whose tokenizer files are copied; default the SmolLM2 folder.
        max_model_len: longest sequence wanted; raises ``max_position_embeddings`` if it is smaller (dummy
            weights do not care) and sets the tokenizer's ``model_max_length`` so long prompts raise no warning.
        overrides: config fields to replace, e.g. ``num_hidden_layers=4`` for a quicker run.
    Returns:
        ``out_dir``. BOS/EOS ids come from ``tokenizer_from/config.json`` when it has them, so they match the
        borrowed tokenizer.
    """
    if shape not in SHAPES:
        raise KeyError(f"unknown shape {shape!r}; shapes: {', '.join(SHAPES)}")
    if tokenizer_from is None:
        from longseq.models.smollm2 import smollm2_path

        tokenizer_from = smollm2_path()
    cfg = copy.deepcopy(SHAPES[shape])
    cfg.update(overrides)
    if max_model_len is not None and max_model_len > cfg["max_position_embeddings"]:
        cfg["max_position_embeddings"] = max_model_len
    src_cfg = os.path.join(tokenizer_from, "config.json")
    if os.path.isfile(src_cfg):
        with open(src_cfg) as f:
            src = json.load(f)
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if src.get(key) is not None and key not in overrides:
                cfg[key] = src[key]

    os.makedirs(out_dir, exist_ok=True)
    copied = []
    for name in TOKENIZER_FILES:
        if os.path.isfile(os.path.join(tokenizer_from, name)):
            shutil.copyfile(os.path.join(tokenizer_from, name), os.path.join(out_dir, name))
            copied.append(name)
    if "tokenizer.json" in copied:
        top = _max_token_id(os.path.join(out_dir, "tokenizer.json"))
        if top >= cfg["vocab_size"]:
            raise ValueError(f"tokenizer of {tokenizer_from} has id {top}, beyond vocab_size {cfg['vocab_size']}")
    elif not copied:
        raise FileNotFoundError(f"no tokenizer files in {tokenizer_from}")
    tc_path = os.path.join(out_dir, "tokenizer_config.json")
    if os.path.isfile(tc_path):
        with open(tc_path) as f:
            tc = json.load(f)
        tc["model_max_length"] = cfg["max_position_embeddings"]
        with open(tc_path, "w") as f:
            json.dump(tc, f, indent=2)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    return out_dir


def main(argv: list[str] | None = None) -> None:
    args = argv if argv is not None else sys.argv[1:]
    if not args:
        sys.exit("usage: python -m longseq.models.shapes OUT_DIR [SHAPE]")
    print(write_shape_model(args[0], *args[1:2]))


if __name__ == "__main__":
    main()
