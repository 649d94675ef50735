"""Execute every example notebook of the vLLM venv (small sizes, CPU) in its Python kernel; any error fails.
The SGLang notebooks run in the SGLang venv: tests/sglang/test_sglang_notebook.py."""

from __future__ import annotations

import os

import pytest

from notebooks import execute_notebook, notebooks

NOTEBOOKS = notebooks("vllm")

pytestmark = pytest.mark.engine


def test_examples_exist():
    assert NOTEBOOKS, "no vLLM notebooks in examples/"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[os.path.basename(p) for p in NOTEBOOKS])
def test_notebook_executes(path, tmp_path):
    execute_notebook(path, tmp_path)
