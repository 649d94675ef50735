"""LongSeqConfig: defaults, env/JSON parsing and clear errors naming the bad setting."""

import json

import pytest

from longseq.config import ATTENTION_TECHNIQUES, LongSeqConfig, LongSeqConfigError


def test_defaults_from_empty_env():
    cfg = LongSeqConfig.from_env({})
    assert cfg.attention == "dense" and cfg.cpu_override is False and cfg.trace_dir is None


def test_env_values_are_parsed_and_normalised():
    cfg = LongSeqConfig.from_env({"LONGSEQ_ATTENTION": " Dense ", "LONGSEQ_CPU": "yes", "LONGSEQ_TRACE_DIR": "/tmp/x"})
    assert (cfg.attention, cfg.cpu_override, cfg.trace_dir) == ("dense", True, "/tmp/x")
    assert LongSeqConfig.from_env({"LONGSEQ_CPU": "0"}).cpu_override is False


def test_unknown_technique_names_setting_and_allowed_values():
    with pytest.raises(LongSeqConfigError) as e:
        LongSeqConfig.from_env({"LONGSEQ_ATTENTION": "quest2"})
    msg = str(e.value)
    assert "LONGSEQ_ATTENTION" in msg and "'quest2'" in msg
    for name in ATTENTION_TECHNIQUES:
        assert name in msg


def test_bad_boolean_is_rejected():
    with pytest.raises(LongSeqConfigError, match="LONGSEQ_CPU|cpu_override"):
        LongSeqConfig.from_env({"LONGSEQ_CPU": "maybe"})


def test_unknown_env_variable_is_rejected():
    with pytest.raises(LongSeqConfigError, match="LONGSEQ_ATENTION"):
        LongSeqConfig.from_env({"LONGSEQ_ATENTION": "dense"})


def test_json_file_and_env_overlay(tmp_path):
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps({"attention": "dense", "cpu_override": True}))
    cfg = LongSeqConfig.from_env({"LONGSEQ_CONFIG": str(path), "LONGSEQ_CPU": "0"})
    assert cfg.cpu_override is False  # env wins over the file


def test_json_file_unknown_key_is_named(tmp_path):
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps({"atention": "dense"}))
    with pytest.raises(LongSeqConfigError, match="'atention'.*allowed keys"):
        LongSeqConfig.from_env({"LONGSEQ_CONFIG": str(path)})


def test_unreadable_json_file(tmp_path):
    path = tmp_path / "cfg.json"
    path.write_text("{not json")
    with pytest.raises(LongSeqConfigError, match="LONGSEQ_CONFIG"):
        LongSeqConfig.from_env({"LONGSEQ_CONFIG": str(path)})


def test_sparse_knobs_parse_from_env_and_json(tmp_path):
    cfg = LongSeqConfig.from_env({"LONGSEQ_ATTENTION": "sparse", "LONGSEQ_SPARSE_BUDGET": "1024",
                                  "LONGSEQ_SPARSE_PAGE_SIZE": "32", "LONGSEQ_SPARSE_DENSE_LAYERS": "0"})
    assert (cfg.attention, cfg.sparse_budget, cfg.sparse_page_size, cfg.sparse_dense_layers) == ("sparse", 1024, 32, 0)
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"attention": "sparse", "sparse_budget": 512, "sparse_recent_pages": 2}))
    cfg = LongSeqConfig.from_env({"LONGSEQ_CONFIG": str(path)})
    assert (cfg.sparse_budget, cfg.sparse_recent_pages) == (512, 2)
    assert cfg.sparse_topk_split_rows is None  # unset: the kernel's measured default
    cfg = LongSeqConfig.from_env({"LONGSEQ_SPARSE_TOPK_SPLIT_ROWS": "128"})
    from longseq.attention_backends.core.sparse import SparseSettings

    assert SparseSettings.from_config(cfg).topk_split_rows == 128
    assert SparseSettings.from_config(cfg).group_max  # default: the largest head's bound
    assert not SparseSettings.from_config(LongSeqConfig.from_env({"LONGSEQ_SPARSE_GROUP_SCORE": "SUM"})).group_max
    defaults = LongSeqConfig.from_env({})
    assert (defaults.sparse_page_size, defaults.sparse_recent_pages, defaults.sparse_group_score) == (8, 8, "max")
    assert defaults.sparse_reuse_steps == 1 and SparseSettings.from_config(defaults).reuse_steps == 1
    assert SparseSettings.from_config(LongSeqConfig.from_env({"LONGSEQ_SPARSE_REUSE_STEPS": "4"})).reuse_steps == 4
    assert defaults.sparse_topk == "auto"
    fi = LongSeqConfig.from_env({"LONGSEQ_SPARSE_TOPK": "FlashInfer"})
    assert SparseSettings.from_config(fi).topk_impl == "flashinfer"


@pytest.mark.parametrize("env, match", [
    ({"LONGSEQ_SPARSE_BUDGET": "0"}, "LONGSEQ_SPARSE_BUDGET=0 must be a positive integer"),
    ({"LONGSEQ_SPARSE_BUDGET": "-16"}, "LONGSEQ_SPARSE_BUDGET=-16 must be a positive integer"),
    ({"LONGSEQ_SPARSE_BUDGET": "lots"}, "LONGSEQ_SPARSE_BUDGET.*'lots' must be an integer"),
    ({"LONGSEQ_SPARSE_PAGE_SIZE": "24"}, "LONGSEQ_SPARSE_PAGE_SIZE=24 must be a power of two"),
    ({"LONGSEQ_SPARSE_BUDGET": "1004"}, "LONGSEQ_SPARSE_BUDGET=1004 must be a multiple of LONGSEQ_SPARSE_PAGE_SIZE=8"),
    ({"LONGSEQ_SPARSE_BUDGET": "64"}, "exceed the budget of 8 pages"),  # 1 sink + 8 recent pages of 8 tokens
    ({"LONGSEQ_SPARSE_DENSE_LAYERS": "-1"}, "LONGSEQ_SPARSE_DENSE_LAYERS=-1 must be >= 0"),
    ({"LONGSEQ_SPARSE_TOPK_SPLIT_ROWS": "-1"}, "LONGSEQ_SPARSE_TOPK_SPLIT_ROWS=-1 must be >= 0"),
    ({"LONGSEQ_SPARSE_GROUP_SCORE": "mean"}, "LONGSEQ_SPARSE_GROUP_SCORE='mean' is not allowed; allowed values: sum, max"),
    ({"LONGSEQ_SPARSE_REUSE_STEPS": "0"}, "LONGSEQ_SPARSE_REUSE_STEPS=0 must be a positive integer"),
    ({"LONGSEQ_SPARSE_REUSE_STEPS": "often"}, "LONGSEQ_SPARSE_REUSE_STEPS.*'often' must be an integer"),
    ({"LONGSEQ_SPARSE_TOPK": "torch"}, "LONGSEQ_SPARSE_TOPK='torch' is not allowed; allowed values: auto, flashinfer"),
])
def test_bad_sparse_knobs_are_named(env, match):
    with pytest.raises(LongSeqConfigError, match=match):
        LongSeqConfig.from_env(env)


def test_flashinfer_topk_without_flashinfer_is_a_startup_error(monkeypatch):
    """LONGSEQ_SPARSE_TOPK=flashinfer where FlashInfer's top-k cannot run (this CPU machine) stops the layer's
    start-up check with the knob's name, not the first decode step."""
    from longseq.attention_backends.core.sparse import SparseSettings
    from longseq.kernels.sparse_decode import library_topk

    monkeypatch.setattr(library_topk, "flashinfer_topk_available", lambda: False)
    settings = SparseSettings.from_config(LongSeqConfig.from_env({"LONGSEQ_SPARSE_TOPK": "flashinfer"}))
    with pytest.raises(LongSeqConfigError, match="LONGSEQ_SPARSE_TOPK=flashinfer needs a CUDA GPU"):
        settings.validate_layer(block_size=16, head_size=64, backend="longseq sparse")
    SparseSettings.from_config(LongSeqConfig.from_env({})).validate_layer(block_size=16, head_size=64, backend="x")


def test_duo_is_a_technique_and_its_knobs_default_to_unset():
    assert "duo" in ATTENTION_TECHNIQUES
    cfg = LongSeqConfig.from_env({})
    assert (cfg.duo_pattern, cfg.duo_sparsity, cfg.duo_threshold, cfg.duo_sink, cfg.duo_recent) == (None,) * 5


def test_duo_knobs_parse_from_env_and_json(tmp_path):
    cfg = LongSeqConfig.from_env({"LONGSEQ_ATTENTION": "duo", "LONGSEQ_DUO_PATTERN": "smollm2-135m-instruct",
                                  "LONGSEQ_DUO_SPARSITY": " 0.75 ", "LONGSEQ_DUO_SINK": "32",
                                  "LONGSEQ_DUO_RECENT": "128"})
    assert (cfg.attention, cfg.duo_pattern, cfg.duo_sparsity, cfg.duo_sink, cfg.duo_recent) == (
        "duo", "smollm2-135m-instruct", 0.75, 32, 128)
    assert cfg.duo_threshold is None
    cfg = LongSeqConfig.from_env({"LONGSEQ_ATTENTION": "duo", "LONGSEQ_DUO_PATTERN": "/p", "LONGSEQ_DUO_THRESHOLD": "1",
                                  "LONGSEQ_DUO_SPARSITY": "", "LONGSEQ_DUO_SINK": ""})
    assert (cfg.duo_threshold, cfg.duo_sparsity, cfg.duo_sink) == (1.0, None, None)
    assert cfg.duo_hybrid_decode_batch == 8
    assert LongSeqConfig.from_env({"LONGSEQ_DUO_HYBRID_DECODE_BATCH": "4"}).duo_hybrid_decode_batch == 4
    assert LongSeqConfig.from_env({"LONGSEQ_DUO_HYBRID_DECODE_BATCH": "0"}).duo_hybrid_decode_batch == 0  # off
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"attention": "duo", "duo_pattern": "/pat", "duo_sparsity": 0.5, "duo_threshold": None,
                                "duo_recent": 64, "duo_sink": None}))
    cfg = LongSeqConfig.from_env({"LONGSEQ_CONFIG": str(path)})
    assert (cfg.duo_pattern, cfg.duo_sparsity, cfg.duo_threshold, cfg.duo_sink, cfg.duo_recent) == (
        "/pat", 0.5, None, None, 64)
    # env wins over the file: the file's sparsity unset by an empty variable, a threshold given instead
    cfg = LongSeqConfig.from_env({"LONGSEQ_CONFIG": str(path), "LONGSEQ_DUO_SPARSITY": "",
                                  "LONGSEQ_DUO_THRESHOLD": "0.4"})
    assert (cfg.duo_sparsity, cfg.duo_threshold) == (None, 0.4)


def test_duo_knobs_do_not_need_duo_mode():
    cfg = LongSeqConfig.from_env({"LONGSEQ_DUO_SPARSITY": "0.5"})  # set but unused: dense mode
    assert cfg.attention == "dense" and cfg.duo_sparsity == 0.5


@pytest.mark.parametrize("env, match", [
    ({"LONGSEQ_ATTENTION": "duo"}, "LONGSEQ_ATTENTION=duo needs LONGSEQ_DUO_PATTERN"),
    ({"LONGSEQ_ATTENTION": "duo", "LONGSEQ_DUO_PATTERN": ""}, "LONGSEQ_ATTENTION=duo needs LONGSEQ_DUO_PATTERN"),
    ({"LONGSEQ_DUO_SPARSITY": "0.5", "LONGSEQ_DUO_THRESHOLD": "0.5"},
     "LONGSEQ_DUO_SPARSITY=0.5 and LONGSEQ_DUO_THRESHOLD=0.5 are both set; they are mutually exclusive"),
    ({"LONGSEQ_DUO_SPARSITY": "1.5"}, r"LONGSEQ_DUO_SPARSITY=1.5 must be in \[0, 1\]"),
    ({"LONGSEQ_DUO_SPARSITY": "-0.1"}, r"LONGSEQ_DUO_SPARSITY=-0.1 must be in \[0, 1\]"),
    ({"LONGSEQ_DUO_SPARSITY": "half"}, "LONGSEQ_DUO_SPARSITY.*'half' must be a number"),
    ({"LONGSEQ_DUO_SPARSITY": "nan"}, "LONGSEQ_DUO_SPARSITY.*'nan' must be a finite number"),
    ({"LONGSEQ_DUO_THRESHOLD": "2"}, r"LONGSEQ_DUO_THRESHOLD=2.0 must be in \[0, 1\]"),
    ({"LONGSEQ_DUO_SINK": "0"}, "LONGSEQ_DUO_SINK=0 must be a positive integer"),
    ({"LONGSEQ_DUO_RECENT": "-8"}, "LONGSEQ_DUO_RECENT=-8 must be a positive integer"),
    ({"LONGSEQ_DUO_SINK": "64.5"}, "LONGSEQ_DUO_SINK.*'64.5' must be an integer"),
    ({"LONGSEQ_DUO_HYBRID_DECODE_BATCH": "-1"}, "LONGSEQ_DUO_HYBRID_DECODE_BATCH=-1 must be >= 0"),
    ({"LONGSEQ_DUO_PATERN": "x"}, "LONGSEQ_DUO_PATERN"),
])
def test_bad_duo_knobs_are_named(env, match):
    with pytest.raises(LongSeqConfigError, match=match):
        LongSeqConfig.from_env(env)


def test_bad_duo_json_values_are_named(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"duo_sparsity": True}))
    with pytest.raises(LongSeqConfigError, match="duo_sparsity.*must be a number"):
        LongSeqConfig.from_env({"LONGSEQ_CONFIG": str(path)})
