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
