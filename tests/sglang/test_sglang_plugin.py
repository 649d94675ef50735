"""SGLang plugin registration: entry point, registry, CLI choices, idempotency and the version check."""

from __future__ import annotations

import argparse
import importlib.metadata
import logging
from types import SimpleNamespace

import pytest

pytestmark = pytest.mark.sglang
NAME = "longseq_dense"


def test_entry_point_declared():
    eps = [e for e in importlib.metadata.entry_points(group="sglang.srt.plugins") if e.name == "longseq"]
    assert [e.value for e in eps] == ["longseq.plugin.sglang:register"]
    from longseq.plugin.sglang import register

    assert eps[0].load() is register


def test_load_plugins_registers_backend_and_choice():
    from sglang.srt.arg_groups.choices import ATTENTION_BACKEND_CHOICES
    from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS
    from sglang.srt.plugins import load_plugins

    from longseq.plugin.sglang import create_dense_backend

    load_plugins()
    assert ATTENTION_BACKENDS[NAME] is create_dense_backend
    assert ATTENTION_BACKEND_CHOICES.count(NAME) == 1


def _parser():
    from sglang.srt.server_args import ServerArgs

    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)
    return parser


def test_server_args_accept_backend():
    from sglang.srt.server_args import ServerArgs

    from longseq.plugin.sglang import register

    register()
    args = _parser().parse_args(["--model-path", "unused", "--attention-backend", NAME,
                                 "--prefill-attention-backend", NAME, "--decode-attention-backend", NAME])
    assert (args.attention_backend, args.prefill_attention_backend, args.decode_attention_backend) == (NAME,) * 3
    assert ServerArgs.from_cli_args(args).attention_backend == NAME


def test_server_args_reject_unknown_backend(capsys):
    with pytest.raises(SystemExit):  # negative control: the choices really are checked
        _parser().parse_args(["--model-path", "unused", "--attention-backend", "longseq_nope"])
    assert "invalid choice: 'longseq_nope'" in capsys.readouterr().err


def test_register_is_idempotent():
    from sglang.srt.arg_groups.choices import ATTENTION_BACKEND_CHOICES
    from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS

    from longseq.plugin.sglang import create_dense_backend, register

    register()
    snapshot = (dict(ATTENTION_BACKENDS), list(ATTENTION_BACKEND_CHOICES))
    register()
    register()
    assert (dict(ATTENTION_BACKENDS), list(ATTENTION_BACKEND_CHOICES)) == snapshot
    assert ATTENTION_BACKENDS[NAME] is create_dense_backend and ATTENTION_BACKEND_CHOICES.count(NAME) == 1


def test_supported_versions_pass():
    from longseq.plugin.sglang import check_sglang_version

    assert check_sglang_version() == importlib.metadata.version("sglang") == "0.5.23"
    in_range = ("0.5.15", "0.5.19", "0.5.23.post1")
    assert [check_sglang_version(v) for v in in_range] == list(in_range)


@pytest.mark.parametrize("installed", ["0.5.14", "0.5.24", "0.6.0", None])
def test_wrong_version_is_reported_by_register_and_factory(installed, monkeypatch, caplog):
    import longseq.plugin.sglang as plugin
    from longseq.versions import LongSeqVersionError

    monkeypatch.setattr(plugin, "installed_version", lambda dist: installed)
    monkeypatch.setattr(plugin, "_checked", False)
    expected = (f"longseq supports SGLang 0.5.15 to 0.5.23; installed: "
                f"{'sglang ' + installed if installed else 'no sglang'}")
    with pytest.raises(LongSeqVersionError) as err:
        plugin.check_sglang_version()
    assert expected in str(err.value)
    # register() logs it (SGLang would swallow an exception) and still registers the name ...
    with caplog.at_level(logging.ERROR, logger="longseq"):
        plugin.register()
    assert expected in caplog.text and f"--attention-backend {NAME} will fail" in caplog.text
    from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS

    assert ATTENTION_BACKENDS[NAME] is plugin.create_dense_backend
    # ... so selecting the backend raises the same clear error instead of "invalid choice"
    with pytest.raises(LongSeqVersionError, match=expected):
        ATTENTION_BACKENDS[NAME](SimpleNamespace(device="cpu"))


def test_register_logs_bad_config_once(monkeypatch, caplog):
    import longseq.config as config
    import longseq.plugin.sglang as plugin

    monkeypatch.setattr(plugin, "_checked", False)
    monkeypatch.setenv("LONGSEQ_ATTENTION", "nonsense")
    monkeypatch.setattr(config, "_CACHED", None)  # as in a fresh process; restored after the test
    with caplog.at_level(logging.ERROR, logger="longseq"):
        plugin.register()
        plugin.register()
    assert caplog.text.count("LONGSEQ_ATTENTION='nonsense' is not a longseq technique") == 1
    with pytest.raises(config.LongSeqConfigError, match="LONGSEQ_ATTENTION='nonsense'"):
        plugin.create_dense_backend(SimpleNamespace(device="cpu"))
