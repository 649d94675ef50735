"""Run the example notebooks in the test venv's own Python kernel (tests/cpu_engine/test_notebooks.py for the vLLM
venv, tests/sglang/test_sglang_notebook.py for the SGLang one; a notebook names its venv in metadata.longseq.venv)."""

from __future__ import annotations

import glob
import json
import os
import sys

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "examples")


def notebooks(venv: str) -> list[str]:
    """The example notebooks for ``venv`` (``"vllm"``, the default when a notebook names none, or ``"sglang"``)."""
    def wants(path: str) -> str:
        with open(path, encoding="utf-8") as f:
            return json.load(f).get("metadata", {}).get("longseq", {}).get("venv", "vllm")

    return [p for p in sorted(glob.glob(os.path.join(EXAMPLES, "*.ipynb"))) if wants(p) == venv]


def execute_notebook(path: str, tmp_path) -> None:
    """Execute ``path`` in this interpreter's venv; fails on any error output or when no cell shows a plot. Writes the
    executed copy to ``tmp_path`` for inspection."""
    import nbformat
    from jupyter_client.manager import KernelManager
    from nbclient import NotebookClient

    class VenvKernelManager(KernelManager):  # the kernel must be this interpreter, not whatever `python3` is first
        def format_kernel_cmd(self, extra_arguments=None):
            return [sys.executable, "-m", "ipykernel_launcher", "-f", self.connection_file]

    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=1500, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}},
                            extra_arguments=[])
    client.kernel_manager_class = VenvKernelManager
    try:
        client.execute()
    finally:
        nbformat.write(nb, str(tmp_path / os.path.basename(path)))
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs), "the notebook must show its numbers as a plot"
