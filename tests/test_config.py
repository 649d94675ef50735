"""LongSeqConfig: defaults, env/JSON parsing and clear errors naming the bad setting."""

import json

import pytest

from longseq.plugin.config import ATTENTION_TECHNIQUES, LongSeqConfig, LongSeqConfigError


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


@pytest.mark.parametrize("env, match", [
    ({"LONGSEQ_SPARSE_BUDGET": "0"}, "LONGSEQ_SPARSE_BUDGET=0 must be a positive integer"),
    ({"LONGSEQ_SPARSE_BUDGET": "-16"}, "LONGSEQ_SPARSE_BUDGET=-16 must be a positive integer"),
    ({"LONGSEQ_SPARSE_BUDGET": "lots"}, "LONGSEQ_SPARSE_BUDGET.*'lots' must be an integer"),
    ({"LONGSEQ_SPARSE_PAGE_SIZE": "24"}, "LONGSEQ_SPARSE_PAGE_SIZE=24 must be a power of two"),
    ({"LONGSEQ_SPARSE_BUDGET": "1000"}, "LONGSEQ_SPARSE_BUDGET=1000 must be a multiple of LONGSEQ_SPARSE_PAGE_SIZE=16"),
    ({"LONGSEQ_SPARSE_BUDGET": "64", "LONGSEQ_SPARSE_RECENT_PAGES": "4"}, "exceed the budget of 4 pages"),
    ({"LONGSEQ_SPARSE_DENSE_LAYERS": "-1"}, "LONGSEQ_SPARSE_DENSE_LAYERS=-1 must be >= 0"),
])
def test_bad_sparse_knobs_are_named(env, match):
    with pytest.raises(LongSeqConfigError, match=match):
        LongSeqConfig.from_env(env)
