"""Tiny random-weight checkpoints for shape tests (built offline, cached).

Llama presets are 2-layer Llamas with hidden = q_heads * head_dim. Hybrid presets follow the layouts of models
people serve with windowed layers: ``gemma3-hybrid`` (Gemma-3 text: 5 of 6 layers sliding-window, MQA, head_dim
256), ``gemma2-softcap`` (Gemma-2: windowed and global layers alternating, attention logits soft-capped at 50) and
``gptoss-sinks`` (gpt-oss: learned attention-sink logits on every layer, windowed/global alternating, 4 experts).
Windows are 64 tokens so that short test prompts already cross them. Every preset has a 512-token byte-level BPE tokenizer
trained here on a few lines of text (ids 0/1/2 = ``<|endoftext|>``/``<|im_start|>``/``<|im_end|>`` as in
SmolLM2, the rest of the 512 filled with ``<|reserved_N|>`` so every logit id decodes), and weights drawn from
N(0, 0.08) with a fixed seed (norm weights are 1). The large std makes logits spread by several units, so
greedy argmax is not a near-tie and engines agree token for token. Weights are stored in bf16.

    python -m longseq.models.tiny [PRESET ...]     # builds, prints one folder per preset
"""

from __future__ import annotations

import hashlib
import json
import os
import sys

from longseq.models import cached_build

#: Attention shapes covered: head_dim 64, 128 and 256; GQA ratio (q heads / kv heads) 1, 2, 3, 4, 8; sliding
#: windows mixed with global layers; logit soft-capping. ``family`` picks the architecture (default llama).
TINY_PRESETS: dict[str, dict] = {
    "mha-d64": {"num_attention_heads": 4, "num_key_value_heads": 4, "head_dim": 64},
    "mha-d128": {"num_attention_heads": 4, "num_key_value_heads": 4, "head_dim": 128},
    "gqa3-d64": {"num_attention_heads": 6, "num_key_value_heads": 2, "head_dim": 64},
    "gqa4-d128": {"num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 128},
    "gqa8-d128": {"num_attention_heads": 8, "num_key_value_heads": 1, "head_dim": 128},
    "gemma3-hybrid": {"family": "gemma3", "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 256,
                      "num_hidden_layers": 6, "sliding_window": 64},
    "gemma2-softcap": {"family": "gemma2", "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64,
                       "num_hidden_layers": 4, "sliding_window": 64, "attn_logit_softcapping": 50.0,
                       "tie_word_embeddings": True},  # vLLM's Gemma-2 requires tied embeddings
    "gptoss-sinks": {"family": "gpt_oss", "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64,
                     "num_hidden_layers": 2, "sliding_window": 64, "num_local_experts": 4, "num_experts_per_tok": 2},
}

#: family -> (architecture, model_type); the hybrids' remaining fields are transformers' defaults for them.
FAMILIES = {"llama": ("LlamaForCausalLM", "llama"), "gemma3": ("Gemma3ForCausalLM", "gemma3_text"),
            "gemma2": ("Gemma2ForCausalLM", "gemma2"), "gpt_oss": ("GptOssForCausalLM", "gpt_oss")}

VOCAB_SIZE = 512
NUM_LAYERS = 2
MAX_POSITIONS = 4096
WEIGHT_STD = 0.08
SEED = 0
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
#: Bump when the recipe changes so cached folders get rebuilt.
RECIPE_VERSION = 1

_TRAINING_TEXT = [
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.",
    "The pass key is 71432. Remember it. 71432 is the pass key. What is the pass key?",
    "The quick brown fox jumps over the lazy dog while the five boxing wizards jump quickly.",
    "0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 32 64 128 256 512 1024 2048 4096 8192",
    "def attention(q, k, v): return softmax(q @ k.T / sqrt(d)) @ v  # long context, paged KV cache",
    "Once upon a time, in a land far away, there lived a small model that answered every question.",
    "user: Hello! How are you today? assistant: I am fine, thank you. How can I help you?",
]


def model_config(preset: str) -> dict:
    """The config fields of ``preset`` (plain dict, also the cache key's input)."""
    p = dict(TINY_PRESETS[preset])
    arch, model_type = FAMILIES[p.pop("family", "llama")]
    hidden = p["num_attention_heads"] * p["head_dim"]
    llama_only = {"rope_theta": 10000.0, "hidden_act": "silu"} if model_type == "llama" else {}
    return {
        "architectures": [arch],
        "model_type": model_type,
        "vocab_size": VOCAB_SIZE,
        "hidden_size": hidden,
        "intermediate_size": 2 * hidden,
        "num_hidden_layers": NUM_LAYERS,
        "max_position_embeddings": MAX_POSITIONS,
        **llama_only,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 2,
        **p,  # the preset's own fields win
    }


def train_tokenizer():
    """Byte-level BPE tokenizer (``transformers`` fast tokenizer) with exactly ``VOCAB_SIZE`` ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: any text encodes
        show_progress=False,
    )
    tok.train_from_iterator(_TRAINING_TEXT, trainer)
    # Pad to the model's vocab so every id the model can emit is a real token.
    n = tok.get_vocab_size()
    tok.add_special_tokens([f"<|reserved_{i}|>" for i in range(VOCAB_SIZE - n)])
    assert tok.get_vocab_size() == VOCAB_SIZE, tok.get_vocab_size()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
        chat_template=CHAT_TEMPLATE,
        model_max_length=MAX_POSITIONS,
    )


def build_tiny(preset: str, out_dir: str, seed: int = SEED) -> None:
    """Write config.json, tokenizer files and bf16 model.safetensors of ``preset`` into ``out_dir``."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg_fields = model_config(preset)
    config = AutoConfig.for_model(cfg_fields["model_type"],
                                  **{k: v for k, v in cfg_fields.items() if k not in ("architectures", "model_type")})
    config.architectures = cfg_fields["architectures"]
    config.dtype = torch.bfloat16
    with torch.device("meta"):  # only the names and shapes; the values are drawn below
        shapes = {k: tuple(v.shape) for k, v in AutoModelForCausalLM.from_config(config).state_dict().items()}
    if cfg_fields["tie_word_embeddings"]:
        shapes.pop("lm_head.weight", None)  # the embedding is the head
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name in sorted(shapes):  # fixed order, so the same seed gives the same weights everywhere
        if name.endswith("norm.weight"):
            w = torch.ones(shapes[name])
        else:
            w = torch.randn(shapes[name], generator=gen) * WEIGHT_STD
        state[name] = w.to(torch.bfloat16).contiguous()
    save_file(state, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(out_dir)
    train_tokenizer().save_pretrained(out_dir)


def tiny_model_path(preset: str, cache_dir: str | None = None) -> str:
    """Folder of the tiny model ``preset`` (a key of ``TINY_PRESETS``), built on first use.

    Cached as ``<cache root>/tiny-<preset>`` (cache root as in :func:`longseq.models.cache_root`).
    """
    if preset not in TINY_PRESETS:
        raise KeyError(f"unknown tiny preset {preset!r}; presets: {', '.join(TINY_PRESETS)}")
    recipe = {"v": RECIPE_VERSION, "seed": SEED, "std": WEIGHT_STD, "text": _TRAINING_TEXT, "chat": CHAT_TEMPLATE}
    spec = json.dumps({**recipe, **model_config(preset)}, sort_keys=True)
    key = f"tiny-{preset}-" + hashlib.sha256(spec.encode()).hexdigest()[:16]
    return cached_build(f"tiny-{preset}", key, lambda tmp: build_tiny(preset, tmp), cache_dir)


def main(argv: list[str] | None = None) -> None:
    for preset in (argv if argv is not None else sys.argv[1:]) or list(TINY_PRESETS):
        print(tiny_model_path(preset))


if __name__ == "__main__":
    main()
