"""Shared fixtures for the SGLang tests (run in the SGLang venv: ``bash scripts/setup_sglang.sh``).

Nothing here imports sglang at collection time, so the vLLM venv can collect (and deselect) these tests.
"""

import importlib.metadata
import os

import pytest

SETUP_HINT = "bash scripts/setup_sglang.sh && .venv-sglang/bin/python -m pytest tests/sglang -m sglang"


@pytest.fixture(autouse=True)
def _require_sglang():
    """A selected SGLang test fails (never skips) when sglang is not installed in this interpreter."""
    try:
        importlib.metadata.version("sglang")
    except importlib.metadata.PackageNotFoundError:
        pytest.fail(f"sglang is not installed in this Python; run the SGLang tests in its venv: {SETUP_HINT}")


@pytest.fixture
def longseq_env(monkeypatch):
    """``set_env(**{"LONGSEQ_X": "v"})`` -> the refreshed LongSeqConfig; restores the config afterwards."""
    from longseq.config import LongSeqConfig, get_config

    for var in LongSeqConfig.ENV_NAMES.values():
        monkeypatch.delenv(var, raising=False)
    monkeypatch.delenv("LONGSEQ_CONFIG", raising=False)

    def set_env(**env):
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        return get_config(refresh=True)

    yield set_env
    monkeypatch.undo()
    get_config(refresh=True)


@pytest.fixture
def neutral_cwd(tmp_path, monkeypatch):
    """Run from an empty folder so the repository root cannot shadow the installed ``longseq``."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LONGSEQ_", "SGLANG_PLUGINS"))}
    env.update(extra)
    return env
