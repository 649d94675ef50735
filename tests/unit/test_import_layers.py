"""The package's layers (docs/architecture.md): imports point down only, and no module imports itself back.

Read from the source (every ``import``, at module level or inside a function), so a lazy import counts too.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

import longseq

PKG = pathlib.Path(longseq.__file__).resolve().parent
FRAMEWORKS = ("vllm", "sglang")

KERNELS = ("longseq.kernels",)
CORES = ("longseq.attention_backends.core", "longseq.kv_offload.store", "longseq.kv_offload.dram",
         "longseq.kv_offload.disk", "longseq.kv_offload.disk_stats", "longseq.kv_offload.fingerprint",
         "longseq.kv_offload.stats", "longseq.kv_offload.direct_load", "longseq.kv_offload.safe_fs",
         "longseq.kv_offload.settings", "longseq.kv_offload.trust")
ADAPTERS = ("longseq.attention_backends.vllm", "longseq.attention_backends.sglang", "longseq.kv_offload.vllm",
            "longseq.kv_offload.sglang")


def _module_name(path: pathlib.Path) -> str:
    parts = ("longseq", *path.relative_to(PKG).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: pathlib.Path, name: str) -> set[str]:
    """Absolute names of every module ``path`` imports (relative imports resolved)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(up + ([node.module] if node.module else []))
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)
    return found


MODULES = {_module_name(p): p for p in PKG.rglob("*.py")}
GRAPH = {name: {m for m in _imports(path, name) if m in MODULES and m != name} for name, path in MODULES.items()}
RAW = {name: _imports(path, name) for name, path in MODULES.items()}


def _in(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") or name.startswith(p + "_") for p in prefixes)


def _layer_violations(layer: tuple[str, ...], forbidden) -> list[str]:
    return sorted(f"{m} imports {i}" for m in MODULES if _in(m, layer) for i in RAW[m] if forbidden(i))


def test_kernels_import_only_torch_triton_and_kernels():
    bad = _layer_violations(KERNELS, lambda i: i.split(".")[0] in FRAMEWORKS or (
        i.startswith("longseq") and not _in(i, KERNELS)))
    assert not bad, bad


def test_cores_import_no_framework_adapter_or_plugin():
    bad = _layer_violations(CORES, lambda i: i.split(".")[0] in FRAMEWORKS or _in(i, ADAPTERS) or
                            _in(i, ("longseq.plugin",)))
    assert not bad, bad


def test_adapters_import_no_entry_point():
    bad = _layer_violations(ADAPTERS, lambda i: _in(i, ("longseq.plugin",)))
    assert not bad, bad


def test_no_import_cycles():
    """Tarjan's strongly connected components over the package's import graph: every one has a single module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in GRAPH[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in sorted(GRAPH):
        if v not in index:
            visit(v)
    assert not cycles, cycles


@pytest.mark.parametrize("layer", [KERNELS, CORES, ADAPTERS], ids=["kernels", "cores", "adapters"])
def test_each_layer_is_present(layer):
    """The layer names above still match the tree (a rename must update this test, not silently empty a layer)."""
    assert any(_in(m, layer) for m in MODULES)
