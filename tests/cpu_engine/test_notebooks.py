"""Execute every example notebook (small sizes, CPU) in the test venv's Python kernel; any error fails."""

from __future__ import annotations

import glob
import os
import sys

import pytest

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "examples")
NOTEBOOKS = sorted(glob.glob(os.path.join(EXAMPLES, "*.ipynb")))

pytestmark = pytest.mark.engine


def test_examples_exist():
    assert NOTEBOOKS, f"no notebooks in {EXAMPLES}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[os.path.basename(p) for p in NOTEBOOKS])
def test_notebook_executes(path, tmp_path):
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    # The kernel must be this interpreter (the venv with vLLM + longseq), not whatever `python3` is first.
    client = NotebookClient(nb, timeout=1500, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}},
                            extra_arguments=[])
    client.kernel_manager_class = _venv_kernel_manager()
    client.execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs), "the notebook must show its numbers as a plot"
    nbformat.write(nb, str(tmp_path / os.path.basename(path)))  # executed copy, for inspection


def _venv_kernel_manager():
    from jupyter_client.manager import KernelManager

    class VenvKernelManager(KernelManager):
        def format_kernel_cmd(self, extra_arguments=None):
            return [sys.executable, "-m", "ipykernel_launcher", "-f", self.connection_file]

    return VenvKernelManager
