"""Execute the SGLang example notebooks (SmolLM2 through SGLang's pools and longseq's SGLang backends, CPU) in the
SGLang venv's Python kernel; any error fails."""

from __future__ import annotations

import os

import pytest

from notebooks import execute_notebook, notebooks

NOTEBOOKS = notebooks("sglang")

pytestmark = pytest.mark.sglang


def test_sglang_examples_exist():
    assert NOTEBOOKS, "no SGLang notebook in examples/"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[os.path.basename(p) for p in NOTEBOOKS])
def test_sglang_notebook_executes(path, tmp_path):
    execute_notebook(path, tmp_path)
