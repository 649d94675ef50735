"""DuoAttention pattern files (load, save, built-in names, validation, random patterns), on CPU without a
framework."""

import json

import pytest
import torch

from longseq.attention_backends.core import duo_pattern as duo
from longseq.attention_backends.core.duo import StreamingHeadMask
from longseq.attention_backends.core.duo_pattern import DuoPattern, load_duo_pattern, random_pattern, save_duo_pattern
from longseq.config import LongSeqConfigError


def write_pattern(folder, tsv: str, config=None):
    """A pattern folder in the authors' format, written by hand."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "full_attention_heads.tsv").write_text(tsv)
    if config is not None:
        (folder / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    return folder


# ---------------------------------------------------------------- files


def test_save_load_round_trip_keeps_gates_sizes_and_unknown_keys(tmp_path):
    pat = random_pattern(5, 3, seed=7, sink_size=16, recent_size=128)
    pat.meta.update({"model_name": "m", "lr": 0.02, "nested": {"a": [1, 2]}})
    save_duo_pattern(pat, tmp_path / "p")
    lines = (tmp_path / "p" / "full_attention_heads.tsv").read_text().splitlines()
    assert len(lines) == 5 and all(len(line.split("\t")) == 3 for line in lines)
    back = load_duo_pattern(tmp_path / "p")
    assert torch.equal(back.gates, pat.gates)  # %.18e round-trips float64 exactly
    assert (back.sink_size, back.recent_size) == (16, 128)
    assert back.meta == pat.meta
    assert back.shape == (5, 3)


def test_load_authors_format_written_by_hand(tmp_path):
    tsv = ("6.054687500000000000e-01\t0.000000000000000000e+00\t9.687500000000000000e-01\n"
           "1.000000000000000000e+00\t2.490234375000000000e-02\t4.310607910156250000e-04\n")
    cfg = {"model_name": "models/x", "sink_size": 128, "recent_size": 256, "deploy_sink_size": None,
           "threshold": 0.5, "sparsity": None}
    folder = write_pattern(tmp_path / "run", tsv, cfg)
    pat = load_duo_pattern(str(folder))
    expected = torch.tensor([[0.60546875, 0.0, 0.96875], [1.0, 0.02490234375, 0.000431060791015625]],
                            dtype=torch.float64)
    assert torch.equal(pat.gates, expected)
    assert (pat.sink_size, pat.recent_size) == (128, 256)
    assert pat.meta == {"model_name": "models/x", "deploy_sink_size": None, "threshold": 0.5, "sparsity": None}
    pat.validate(2, 3)


def test_single_row_and_single_column_files(tmp_path):
    one_layer = load_duo_pattern(write_pattern(tmp_path / "a", "0.5\t0.25\n", {"sink_size": 1, "recent_size": 2}))
    assert one_layer.shape == (1, 2)
    one_head = load_duo_pattern(write_pattern(tmp_path / "b", "0.5\n0.25\n\n", {"sink_size": 1, "recent_size": 2}))
    assert one_head.shape == (2, 1)


@pytest.mark.parametrize("tsv, match", [
    ("0.5\t1.5\n", r"gate values must be in \[0, 1\]; layer 0, KV head 1 has 1.5"),
    ("0.5\t0.5\n-0.1\t0.2\n", r"in \[0, 1\]; layer 1, KV head 0 has -0.1"),
    ("0.5\tnan\n", r"in \[0, 1\]; layer 0, KV head 1 has nan"),
    ("0.5\tabc\n", r"full_attention_heads.tsv line 1, column 2: 'abc' is not a number"),
    ("0.5\t0.5\n0.5 0.5\n", r"line 2, column 1: '0.5 0.5' is not a number \(cells are tab-separated"),
    ("0.5\t0.5\n0.5\t0.5\t0.5\n", r"ragged: line 2 has 3 values, line 1 has 2"),
    ("\n\n", r"holds no gate values"),
])
def test_bad_gates_file_is_named(tmp_path, tsv, match):
    folder = write_pattern(tmp_path / "bad", tsv, {"sink_size": 4, "recent_size": 8})
    with pytest.raises(LongSeqConfigError, match=match) as e:
        load_duo_pattern(folder)
    assert str(folder) in str(e.value)


@pytest.mark.parametrize("cfg, match", [
    ({"sink_size": 0, "recent_size": 8}, r"sink_size=0 must be a positive integer"),
    ({"sink_size": -4, "recent_size": 8}, r"sink_size=-4 must be a positive integer"),
    ({"sink_size": 4, "recent_size": 12.5}, r"recent_size=12.5 must be a positive integer"),
    ({"sink_size": "64", "recent_size": 8}, r"sink_size='64' must be a positive integer"),
    ({"sink_size": True, "recent_size": 8}, r"sink_size=True must be a positive integer"),
    ({"recent_size": 8}, r"config.json has no 'sink_size'"),
    ({"sink_size": 4}, r"config.json has no 'recent_size'"),
    ("{not json", r"config.json cannot be read as JSON"),
    ("[4, 8]", r"config.json must hold a JSON object"),
])
def test_bad_config_json_is_named(tmp_path, cfg, match):
    folder = write_pattern(tmp_path / "bad", "0.5\t0.5\n", cfg)
    with pytest.raises(LongSeqConfigError, match=match) as e:
        load_duo_pattern(folder)
    assert str(folder) in str(e.value)


def test_integral_float_sizes_are_accepted(tmp_path):
    pat = load_duo_pattern(write_pattern(tmp_path / "p", "0.5\n", {"sink_size": 64.0, "recent_size": 256}))
    assert (pat.sink_size, pat.recent_size) == (64, 256) and isinstance(pat.sink_size, int)


def test_missing_files_are_named(tmp_path):
    no_cfg = write_pattern(tmp_path / "no_cfg", "0.5\n")
    with pytest.raises(LongSeqConfigError, match=r"no_cfg: missing config.json"):
        load_duo_pattern(no_cfg)
    no_tsv = tmp_path / "no_tsv"
    no_tsv.mkdir()
    (no_tsv / "config.json").write_text('{"sink_size": 4, "recent_size": 8}')
    with pytest.raises(LongSeqConfigError, match=r"no_tsv: missing full_attention_heads.tsv"):
        load_duo_pattern(no_tsv)


def test_unknown_pattern_lists_builtin_names(tmp_path, monkeypatch):
    monkeypatch.setattr(duo, "BUILTIN_PATTERN_DIR", str(tmp_path / "none_here"))
    with pytest.raises(LongSeqConfigError, match=r"'nope' is neither a folder nor a built-in.*\(none installed\)"):
        load_duo_pattern("nope")
    builtin = tmp_path / "builtin"
    save_duo_pattern(random_pattern(2, 3, seed=1), builtin / "tiny-b")
    save_duo_pattern(random_pattern(4, 1, seed=2), builtin / "tiny-a")
    (builtin / "not-a-pattern").mkdir()
    monkeypatch.setattr(duo, "BUILTIN_PATTERN_DIR", str(builtin))
    assert duo.builtin_pattern_names() == ["tiny-a", "tiny-b"]
    with pytest.raises(LongSeqConfigError, match=r"'smollm2' is neither a folder nor a built-in pattern name; "
                                                 r"built-in patterns: tiny-a, tiny-b"):
        load_duo_pattern("smollm2")
    with pytest.raises(LongSeqConfigError, match=r"neither a folder"):
        load_duo_pattern(str(tmp_path / "missing" / "dir"))


def test_builtin_name_resolves_to_package_folder(tmp_path, monkeypatch):
    builtin = tmp_path / "builtin"
    pat = random_pattern(3, 2, seed=3, sink_size=8, recent_size=32)
    save_duo_pattern(pat, builtin / "tiny-a")
    monkeypatch.setattr(duo, "BUILTIN_PATTERN_DIR", str(builtin))
    loaded = load_duo_pattern("tiny-a")
    assert torch.equal(loaded.gates, pat.gates) and loaded.recent_size == 32
    assert "built-in" in loaded.source
    with pytest.raises(LongSeqConfigError, match=r"'tiny-a' \(built-in, .*\) has 3 layers x 2 KV heads, "
                                                 r"the model has 30 x 3"):
        loaded.validate(30, 3)
    # a local folder of the same name is reached with an explicit path
    save_duo_pattern(random_pattern(1, 1, seed=4), tmp_path / "tiny-a")
    monkeypatch.chdir(tmp_path)
    assert load_duo_pattern("tiny-a").shape == (3, 2)
    assert load_duo_pattern("./tiny-a").shape == (1, 1)


def test_default_builtin_dir_is_the_package_folder():
    assert duo.BUILTIN_PATTERN_DIR.endswith("attention_backends/core/duo_patterns")


def test_validate_names_pattern_and_both_shapes(tmp_path):
    folder = tmp_path / "pat"
    save_duo_pattern(random_pattern(24, 4, seed=0), folder)
    pat = load_duo_pattern(folder)
    msg = f"duo pattern {folder} has 24 layers x 4 KV heads, the model has 30 x 3"
    with pytest.raises(LongSeqConfigError, match=msg):
        pat.validate(30, 3)
    mask = StreamingHeadMask.from_pattern(pat, sparsity=0.5)
    with pytest.raises(LongSeqConfigError, match=msg):
        mask.validate(30, 3)
    pat.validate(24, 4)
    mask.validate(24, 4)


def test_in_memory_pattern_checks():
    with pytest.raises(LongSeqConfigError, match=r"non-empty \[num_layers, num_kv_heads\]"):
        DuoPattern(torch.rand(4), 4, 8)
    with pytest.raises(LongSeqConfigError, match=r"in \[0, 1\]"):
        DuoPattern(torch.tensor([[2.0]]), 4, 8)
    with pytest.raises(LongSeqConfigError, match=r"recent_size=0 must be a positive integer"):
        DuoPattern(torch.tensor([[0.5]]), 4, 0)


def test_random_pattern_is_deterministic_and_in_range():
    a, b, c = random_pattern(30, 3, seed=5), random_pattern(30, 3, seed=5), random_pattern(30, 3, seed=6)
    assert a.shape == (30, 3) and torch.equal(a.gates, b.gates) and not torch.equal(a.gates, c.gates)
    assert bool(((a.gates >= 0) & (a.gates < 1)).all())
    assert (a.sink_size, a.recent_size) == (duo.DEFAULT_SINK_SIZE, duo.DEFAULT_RECENT_SIZE)
    mask = StreamingHeadMask.from_pattern(a, sparsity=0.5)
    assert int(mask.is_streaming.sum()) == 45  # the random control at the same sparsity
