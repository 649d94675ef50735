"""The vLLM entry point: discovered from the installed package, idempotent, opt-in CPU override, version gate.

Each check runs in a fresh interpreter so vLLM's global backend registry starts clean.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from engine_utils import clean_env

PROBE = r"""
import json, sys
from importlib.metadata import entry_points
eps = [ep for ep in entry_points(group="vllm.general_plugins") if ep.name == "longseq"]
assert len(eps) == 1 and eps[0].value == "longseq.plugin.vllm:register", eps
from vllm.plugins import load_general_plugins
load_general_plugins()
from longseq.plugin import vllm as plugin
plugin.register(); plugin.register()  # idempotent: vLLM calls it once per process, users may call it too
from vllm.v1.attention.backends.registry import AttentionBackendEnum as E
print(json.dumps({"custom": E.CUSTOM.get_path(), "cpu": E.CPU_ATTN.get_path(),
                  "heavy": sorted(m for m in ("longseq.attention_backends.vllm.cpu",
                                              "longseq.attention_backends.vllm.flash") if m in sys.modules)}))
"""


def probe(env: dict[str, str]) -> dict:
    proc = subprocess.run([sys.executable, "-c", PROBE], env=clean_env(env), capture_output=True, text=True,
                          timeout=300, cwd="/")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_entry_point_registers_custom_backend_lazily():
    out = probe({})
    assert out["custom"] == "longseq.attention_backends.vllm.flash.LongSeqFlashBackend"
    assert out["cpu"] == "vllm.v1.attention.backends.cpu_attn.CPUAttentionBackend"  # no override unless opted in
    assert out["heavy"] == []  # registration imports no backend module


def test_cpu_override_is_opt_in():
    out = probe({"LONGSEQ_CPU": "1"})
    assert out["cpu"] == "longseq.attention_backends.vllm.cpu.LongSeqCPUBackend"


def test_register_rejects_bad_setting():
    proc = subprocess.run([sys.executable, "-c", "from longseq.plugin.vllm import register; register()"],
                          env=clean_env({"LONGSEQ_ATTENTION": "nope"}), capture_output=True, text=True, cwd="/")
    assert proc.returncode != 0
    assert "LONGSEQ_ATTENTION='nope'" in proc.stderr and "allowed values" in proc.stderr


@pytest.mark.parametrize("version,ok", [("0.26.0", True), ("0.32.0+cpu", True), ("0.33.1", True),
                                        ("0.25.2", False), ("0.34.0", False)])
def test_vllm_version_gate(version, ok):
    from longseq.versions import LongSeqVersionError, check_vllm_version

    if ok:
        assert check_vllm_version(version) == version
    else:
        with pytest.raises(LongSeqVersionError, match=f"installed: vllm {version}"):
            check_vllm_version(version)
