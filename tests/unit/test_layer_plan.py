"""``longseq info --model``: what runs on each kind of attention layer, from the model's config.json."""

from __future__ import annotations

import json

import pytest

from longseq.attention_backends.core.layers import layer_plan
from longseq.plugin.cli import main, model_plan

GEMMA3 = {"model_type": "gemma3_text", "num_hidden_layers": 6, "sliding_window": 512,
          "layer_types": ["sliding_attention"] * 5 + ["full_attention"]}


def _by_runs(plan):
    return {e["runs"]: e["layers"] for e in plan}


@pytest.mark.parametrize("technique,global_runs", [("dense", "dense"), ("sparse", "sparse"), ("duo", "duo")])
def test_windowed_layers_stay_dense_and_the_technique_runs_on_global_layers(technique, global_runs):
    plan = layer_plan(GEMMA3, technique)
    assert _by_runs(plan) == {"dense, windowed": [0, 1, 2, 3, 4], global_runs: [5]}
    windowed = next(e for e in plan if e["runs"] == "dense, windowed")
    assert windowed["window"] == 512 and "512-token window" in windowed["why"]


def test_soft_cap_and_sinks_run_with_every_technique_and_say_so():
    gemma2 = {"model_type": "gemma2", "num_hidden_layers": 4, "sliding_window": 64, "attn_logit_softcapping": 50.0,
              "layer_types": ["sliding_attention", "full_attention"] * 2}
    assert _by_runs(layer_plan(gemma2, "sparse")) == {"dense, windowed": [0, 2], "sparse": [1, 3]}
    assert _by_runs(layer_plan(gemma2, "dense")) == {"dense, windowed": [0, 2], "dense": [1, 3]}
    sparse = next(e for e in layer_plan(gemma2, "sparse") if e["runs"] == "sparse")
    assert sparse["features"] == ["logits_soft_cap"] and "logits_soft_cap" in sparse["why"]
    gpt_oss = {"model_type": "gpt_oss", "num_hidden_layers": 2, "layer_types": ["sliding_attention", "full_attention"]}
    duo = next(e for e in layer_plan(gpt_oss, "duo") if e["runs"] == "duo")
    assert duo["layers"] == [1] and "sinks" in duo["why"]


def test_duo_rows_and_sparse_dense_layers_and_multimodal_text_config():
    plan = layer_plan({"text_config": {**GEMMA3, "num_hidden_layers": 12, "layer_types": GEMMA3["layer_types"] * 2}},
                      "duo")
    assert _by_runs(plan)["duo"] == [5, 11]
    llama = {"model_type": "llama", "num_hidden_layers": 4}
    assert _by_runs(layer_plan(llama, "sparse", dense_layers=2)) == {"dense": [0, 1], "sparse": [2, 3]}


@pytest.mark.parametrize("bad", [{"num_hidden_layers": "6"}, {"num_hidden_layers": 2, "layer_types": "full"},
                                 {"num_hidden_layers": 3, "layer_types": ["full_attention"]}])
def test_bad_configs_are_value_errors(bad):
    with pytest.raises(ValueError):
        layer_plan(bad, "dense")


def test_cli_info_model_prints_the_plan_and_rejects_unreadable_files(tmp_path, capsys, monkeypatch):
    from longseq.config import get_config

    monkeypatch.setenv("LONGSEQ_ATTENTION", "sparse")
    get_config(refresh=True)  # an earlier test's cached config must not leak into this CLI call
    (tmp_path / "config.json").write_text(json.dumps(GEMMA3))
    assert main(["info", "--model", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "layers (sparse):" in out and "sliding_attention x5" in out and "full_attention x1" in out
    (tmp_path / "bad.json").write_bytes(b"\xff\xfe not json")
    with pytest.raises(ValueError, match="not a readable model config"):
        model_plan(str(tmp_path / "bad.json"), "dense", 0)
    assert main(["info", "--model", str(tmp_path / "missing")]) == 2
