"""Our SGLang adapters against the SGLang 0.5.15 API, checked statically (0.5.15 is the only SGLang build for
torch 2.11, the GPU machine's torch; CPU CI runs 0.5.23, and one venv holds one SGLang).

The 0.5.15 wheel is downloaded once (``wheel_api.download_wheel``) and read as a zip with ``ast``; nothing is
installed or imported. What we subclass, override, call, read and probe is derived from our own sources by
``ast`` (``api_uses``), so new uses are checked without editing this file; version probes in
``longseq/sglang_versions.py`` are evaluated per version, so each branch is checked against the version
it serves. Every test also runs against the installed SGLang (0.5.23 in CI, which the runtime tests in
tests/sglang exercise), to show the checker passes on a known-good version. A failed download fails the
0.5.15 tests (no skip).
"""

from __future__ import annotations

import ast
import glob
import importlib.metadata
import os
import tomllib

import pytest
from api_uses import SourceUses, members
from wheel_api import (
    REPO, ApiIndex, ClassInfo, base_override_problems, call_problems, call_site_problems, dir_reader, download_wheel,
    find_calls, installed_package_dir, params_of, still_abstract, super_call_problems, unset_self_reads, wheel_reader,
)

pytestmark = pytest.mark.sglang

WHEEL_VERSION = "0.5.15"
WHEEL_PLATFORM, WHEEL_PYTHON = "manylinux_2_34_x86_64", "3.11"  # SGLang wheels are cp311 builds
ADAPTER_MODULES = sorted(f"longseq.attention_backends.sglang.{os.path.basename(p)[:-3]}"
                         for p in glob.glob(os.path.join(REPO, "attention_backends", "sglang", "*.py"))
                         if not p.endswith("__init__.py")) + ["longseq.kv_offload.sglang"]  # + HiCache storage
PLUGIN_MOD, COMPAT_MOD = "longseq.plugin.sglang", "longseq.sglang_versions"
ALL_MODULES = ADAPTER_MODULES + [PLUGIN_MOD, COMPAT_MOD]

REGISTRY_MOD = "sglang.srt.layers.attention.attention_registry"
KDA_MOD = "sglang.srt.layers.attention.linear.kda_backend"
#: Names that always hold one SGLang class in our code (parameters and variables), for member checks.
TYPED_NAMES = {
    "forward_batch": ("sglang.srt.model_executor.forward_batch_info", "ForwardBatch"),
    "layer": ("sglang.srt.layers.radix_attention", "RadixAttention"),
    "model_runner": ("sglang.srt.model_executor.model_runner", "ModelRunner"),
    "cfg": ("sglang.srt.mem_cache.hicache_storage", "HiCacheStorageConfig"),
    "storage_config": ("sglang.srt.mem_cache.hicache_storage", "HiCacheStorageConfig"),
}
#: Where SGLang calls methods of ours that no SGLang base declares (or declares narrower):
#: (SGLang base class, method, module, function holding the call, name called there).
FRAMEWORK_CALLS = [
    ("HiCacheStorage", "__init__", "sglang.srt.mem_cache.storage.backend_factory",
     "StorageBackendFactory._create_dynamic_backend", "backend_class"),
    ("HiCacheStorage", "close", "sglang.srt.managers.cache_controller", "HiCacheController.detach_storage_backend",
     "close"),
    ("LinearAttnKernelBase", "decode", KDA_MOD, "KDAKernelDispatcher.decode", "decode"),
    ("LinearAttnKernelBase", "packed_decode", KDA_MOD, "KDAKernelDispatcher.packed_decode", "packed_decode"),
]
#: Modules that declare the ``--attention-backend`` options (0.5.15: server_args; 0.5.23: the exec arg group).
CLI_MODULES = ("sglang.srt.server_args", "sglang.srt.arg_groups.fields.exec_")


@pytest.fixture(scope="session")
def wheel_index() -> ApiIndex:
    """SGLang 0.5.15 (the wheel) plus longseq's sources."""
    try:
        wheel, error = download_wheel("sglang", WHEEL_VERSION, WHEEL_PLATFORM, WHEEL_PYTHON), None
    except RuntimeError as e:
        error = str(e)
    if error:  # fail, never skip: a silent skip would hide that 0.5.15 went unchecked
        pytest.fail(error, pytrace=False)
    return ApiIndex(f"sglang {WHEEL_VERSION} (wheel)", {"sglang": wheel_reader(wheel), "longseq": dir_reader(REPO)})


@pytest.fixture(scope="session")
def installed_index() -> ApiIndex:
    """The installed SGLang plus longseq's sources."""
    folder = installed_package_dir("sglang")
    if folder is None:
        pytest.fail("SGLang is not installed in this interpreter; run scripts/setup_sglang.sh", pytrace=False)
    return ApiIndex(f"sglang {importlib.metadata.version('sglang')} (installed)",
                    {"sglang": dir_reader(folder), "longseq": dir_reader(REPO)})


@pytest.fixture(params=[f"{WHEEL_VERSION}-wheel", "installed"])
def api(request) -> ApiIndex:
    return request.getfixturevalue("installed_index" if request.param == "installed" else "wheel_index")


def _is_sglang(c: ClassInfo) -> bool:
    return c.qualname.startswith("sglang.")


def our_classes(api: ApiIndex) -> list[ClassInfo]:
    """Classes in our SGLang adapter modules that derive from an SGLang class."""
    out = [c for m in ADAPTER_MODULES for c in api.module_classes(m) if any(map(_is_sglang, api.mro(c)))]
    assert len(out) >= 5, f"too few SGLang subclasses found in {ADAPTER_MODULES}: {[c.name for c in out]}"
    return out


def uses(api: ApiIndex, modname: str) -> SourceUses:
    return SourceUses(api, modname, "sglang", TYPED_NAMES)


def _fail_if(problems: list[str], api: ApiIndex) -> None:
    assert not problems, f"{api.label}:\n  " + "\n  ".join(problems)


def _self_method_calls(api: ApiIndex) -> set[str]:
    """Names our adapter code calls as ``self.name(...)``: our own helpers, whatever their spelling."""
    return {n.func.attr for m in ADAPTER_MODULES for n in ast.walk(api.module(m)[1]) if isinstance(n, ast.Call)
            and isinstance(n.func, ast.Attribute) and getattr(n.func.value, "id", None) == "self"}


def test_overrides_accept_what_sglang_passes(api):
    """Each method we define overrides one SGLang declares (or SGLang calls it from a known site, or it is our
    own helper / a Python protocol method), and takes every call the base signature / the call site allows;
    our ``super().x(...)`` calls bind. Constructors are checked at SGLang's call sites only (SGLang builds our
    storage backend; our factories build the attention backends)."""
    problems = []
    helpers = _self_method_calls(api)
    for cls in our_classes(api):
        sglang_names = {c.name for c in api.mro(cls) if _is_sglang(c)}
        for name, m in cls.methods.items():
            sites = [s[2:] for s in FRAMEWORK_CALLS if s[0] in sglang_names and s[1] == name]
            protocol = name.startswith("__") and name.endswith("__")  # called by Python itself
            ours = (name.startswith("_") and not protocol) or name in helpers
            if api.lookup(cls, name, skip_self=True) is None and not (sites or ours or protocol):
                problems.append(f"{cls.name}.{name}: overrides nothing and no SGLang call site is known")
            if name != "__init__":
                problems += base_override_problems(api, cls, m)
            problems += [p for site in sites for p in call_site_problems(api, cls, m, *site)]
            problems += super_call_problems(api, cls, m)
    _fail_if(problems, api)


def test_abstract_methods_are_implemented(api):
    """No abstract method of an SGLang base stays abstract in our classes (ABCs would refuse to instantiate;
    ``longseq_dense``'s forwarders are added after class creation, so they would not count)."""
    _fail_if([p for cls in our_classes(api) for p in still_abstract(api, cls)], api)


def test_inherited_self_attributes_exist(api):
    """Every ``self.<attr>`` our methods read and do not set (``self.x = ...`` or ``object.__setattr__(self,
    "x", ...)``) is set or declared by an SGLang base (e.g. ``HiCacheStorage.mem_pool_host``)."""
    _fail_if([p for cls in our_classes(api) for p in unset_self_reads(api, cls)], api)


def test_sglang_imports_resolve(api):
    """Every ``from sglang... import name`` our adapters and plugin reach in this version (function-level ones
    included, a shim's fallback imports only where its probe takes them) resolves."""
    problems = [p for m in ALL_MODULES for p in uses(api, m).import_problems()]
    assert sum(len(uses(api, m).import_nodes) for m in ALL_MODULES) >= 10, "AST walk found too few sglang imports"
    _fail_if(problems, api)


def test_calls_into_sglang_bind(api):
    """Every call our code makes to an SGLang function, class or method it can resolve (``register_attention_
    backend(name)``, ``HookRegistry.register(...)``, ``KVWriteLoc(...)``, ``AttentionBackend.forward(self, ...)``,
    ``get_server_args().enable_mamba_extra_buffer()``, ...) fits that callable's signature in this version."""
    assert sum(len(uses(api, m).framework_calls()) for m in ALL_MODULES) >= 5, "AST walk found too few sglang calls"
    _fail_if([p for m in ALL_MODULES for p in uses(api, m).call_problems()], api)


def test_sglang_members_we_read_exist(api):
    """``Cls.X``/``module.X`` on SGLang names (``HookType.AFTER``, ``runtime_context.get_exec``) and reads on
    names that hold SGLang objects (``forward_batch.out_cache_loc``, ``layer.qk_head_dim``,
    ``cfg.attn_cp_size``, ``get_parallel()``'s ``tp_rank``) exist in this version; ``getattr`` with a default
    is how our code reads what may be missing, and is not checked."""
    assert sum(len(uses(api, m).typed_reads()) for m in ALL_MODULES) >= 20, "AST walk found too few typed reads"
    _fail_if([p for m in ALL_MODULES for p in uses(api, m).member_problems()], api)


def _registered_factories(api: ApiIndex) -> dict[str, ast.FunctionDef]:
    """SGLang's own ``@register_attention_backend("name")`` factories."""
    tree = api.module(REGISTRY_MOD)[1]
    return {d.args[0].value: node for node in tree.body if isinstance(node, ast.FunctionDef)
            for d in node.decorator_list if isinstance(d, ast.Call)
            and getattr(d.func, "id", None) == "register_attention_backend" and isinstance(d.args[0], ast.Constant)}


def _module_constant(tree: ast.Module, name: str) -> ast.expr:
    """The value assigned to ``name`` at the top level of ``tree``."""
    return next(s.value for s in tree.body if isinstance(s, ast.Assign) and ast.unparse(s.targets[0]) == name)


def _positional_call(params, lead: int = 0) -> ast.Call:
    """``f(x, ...)`` with ``lead`` extra positional arguments plus one per required positional parameter."""
    required = [p for p in params if p.kind in ("pos", "pos_or_kw") and not p.default]
    return ast.parse(f"f({', '.join(['x'] * (lead + len(required)))})").body[0].value


def test_attention_registry_takes_our_factories(api):
    """Our registered factories take the call SGLang's own factories take (``fn(model_runner)``), and the SGLang
    backends ``longseq_dense`` wraps by default (``DEFAULT_INNER``, else ``triton``) are registered."""
    theirs = _registered_factories(api)
    assert "torch_native" in theirs, f"{api.label}: no torch_native factory in {REGISTRY_MOD}"
    call = _positional_call(params_of(theirs["torch_native"].args, drop_first=False))  # SGLang passes the runner
    plugin = api.module(PLUGIN_MOD)[1]
    factories = _module_constant(plugin, "FACTORIES")
    problems = []
    for name in (v.id for v in factories.values):
        ours = api.resolve(PLUGIN_MOD, name)[1]
        problems += [f"{name} called as SGLang's factories are ({REGISTRY_MOD}:{theirs['torch_native'].lineno}): {p}"
                     for p in call_problems(params_of(ours.args, drop_first=False), call)]
    dense = api.module("longseq.attention_backends.sglang.dense")[1]
    default_inner = _module_constant(dense, "DEFAULT_INNER")
    fallback = next(c.args[1].value for c in find_calls(dense, "get") if ast.unparse(c.func) == "DEFAULT_INNER.get")
    wrapped = {*ast.literal_eval(default_inner).values(), fallback}
    assert wrapped == {"torch_native", "triton"}, f"derived default inner backends look wrong: {wrapped}"
    problems += [f"longseq_dense wraps {n!r} by default, which {REGISTRY_MOD} does not register"
                 for n in sorted(wrapped - theirs.keys())]
    _fail_if(problems, api)


def test_cli_choices_reach_argparse(api):
    """The list ``add_attention_backend_choice`` extends in this version is the very list the three
    ``--attention-backend``/``--prefill-attention-backend``/``--decode-attention-backend`` options take their
    choices from (argparse checks at parse time, and SGLang loads plugins before parsing)."""
    compat = uses(api, COMPAT_MOD)
    choices = compat.resolved("ATTENTION_BACKEND_CHOICES")
    adder = compat.resolved("add_attention_backend_choices")
    assert choices and adder, f"{api.label}: the shim's choices imports do not resolve"
    extends = {ast.unparse(n) for n in ast.walk(adder[1]) if isinstance(n, ast.Attribute)}
    assert "ATTENTION_BACKEND_CHOICES.extend" in extends, f"{api.label}: {adder[0]}.add_attention_backend_choices " \
                                                          f"does not extend ATTENTION_BACKEND_CHOICES"
    uses_of_list = [f"{mod}:{k.value.lineno}" for mod in CLI_MODULES if api.module(mod)
                    for k in ast.walk(api.module(mod)[1]) if isinstance(k, ast.keyword) and k.arg == "choices"
                    and isinstance(k.value, ast.Name) and api.resolve(mod, k.value.id) == choices]
    assert len(uses_of_list) == 3, f"{api.label}: options taking {choices[0]}.ATTENTION_BACKEND_CHOICES: {uses_of_list}"


def _hook_registrations(api: ApiIndex):
    """(target dotted path, hook FunctionDef, hook type name) of each ``HookRegistry.register`` in the plugin."""
    plugin = api.module(PLUGIN_MOD)[1]
    consts = {t.id: s.value.value for s in plugin.body if isinstance(s, ast.Assign) for t in s.targets
              if isinstance(t, ast.Name) and isinstance(s.value, ast.Constant)}
    for call in find_calls(plugin, "register"):
        if ast.unparse(call.func) == "HookRegistry.register":
            target, hook = call.args[0], call.args[1]
            kind = (call.args[2] if len(call.args) > 2
                    else next((k.value for k in call.keywords if k.arg == "hook_type"), None))
            yield (consts.get(getattr(target, "id", None), getattr(target, "value", None)),
                   api.resolve(PLUGIN_MOD, hook.id)[1], kind.attr if kind is not None else "AFTER")


def test_hook_targets_exist_and_hooks_take_their_calls(api):
    """Each ``HookRegistry.register(target, hook, type)`` of the plugin names a method this SGLang has, the hook
    takes what ``HookRegistry`` passes (AFTER: ``hook(result, *args, **kwargs)`` of the original call), and what
    the hook reads from the hooked instance exists on that class (``KDAAttnBackend.kernel_dispatcher``)."""
    hooks = list(_hook_registrations(api))
    assert hooks, "no HookRegistry.register(...) call found in plugin/sglang.py"
    problems = []
    for target, hook, kind in hooks:
        parts = target.split(".")
        split = next((i for i in range(len(parts), 0, -1) if api.module(".".join(parts[:i]))), 0)
        cls = api.class_info(".".join(parts[:split]), parts[split]) if 0 < split < len(parts) - 1 else None
        method = api.lookup(cls, parts[-1]) if cls else None
        if method is None:
            problems.append(f"hook target {target} not found")
            continue
        lead = {"AFTER": 1, "AROUND": 1}.get(kind, 0)  # the result / the original function comes first
        call = _positional_call(method[1].params, lead + 1)  # + the instance
        problems += [f"{hook.name} as {kind} hook on {target}: {p}"
                     for p in call_problems(params_of(hook.args, drop_first=False), call)]
        instance = hook.args.args[lead].arg
        reads = {n.attr for n in ast.walk(hook)
                 if isinstance(n, ast.Attribute) and getattr(n.value, "id", None) == instance}
        problems += [f"{hook.name} reads {instance}.{a}, which {cls.qualname} does not set" for a in
                     sorted(reads - members(api, cls))]
    _fail_if(problems, api)


def test_kda_kernel_swap_reaches_sglang_decode(api):
    """``install_kda_kernels`` swaps the dispatcher's decode kernel: the dispatcher's ``decode`` and
    ``packed_decode`` call ``self.decode_kernel.<same name>(...)``, and every dispatcher attribute we assign is
    one the dispatcher sets (we replace it) or one this SGLang never reads (assigning it is a no-op)."""
    install = api.resolve("longseq.attention_backends.sglang.kda", "install_kda_kernels")[1]
    target = install.args.args[0].arg
    assigned = {n.attr for n in ast.walk(install) if isinstance(n, ast.Attribute) and isinstance(n.ctx, ast.Store)
                and getattr(n.value, "id", None) == target}
    dispatcher = api.class_info(KDA_MOD, "KDAKernelDispatcher")
    assert dispatcher is not None and "decode_kernel" in assigned, f"{api.label}: {KDA_MOD}.KDAKernelDispatcher"
    problems = [f"KDAKernelDispatcher.{entry} does not call self.decode_kernel.{entry}(...)"
                for entry in ("decode", "packed_decode")
                if not any(ast.unparse(c.func) == f"self.decode_kernel.{entry}"
                           for c in find_calls(dispatcher.methods[entry].node, entry))]
    kda_tree = api.module(KDA_MOD)[1]
    read = {n.attr for n in ast.walk(kda_tree) if isinstance(n, ast.Attribute) and isinstance(n.ctx, ast.Load)}
    read |= {n.value for n in ast.walk(kda_tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
    problems += [f"install_kda_kernels sets {target}.{a}: KDAKernelDispatcher ({dispatcher.where}) does not set it, "
                 f"but {KDA_MOD} reads a name {a!r}" for a in sorted(assigned - dispatcher.self_attrs) if a in read]
    problems += [f"KDAKernelDispatcher no longer sets {a}" for a in ["decode_kernel"] if a not in dispatcher.self_attrs]
    _fail_if(problems, api)


def test_version_probes_split_the_versions(wheel_index, installed_index):
    """Every version probe lives in ``longseq/plugin/`` (the adapters have none), and each probe there takes
    one branch on 0.5.15 and the other on the installed SGLang: no shim branch is dead on both."""
    assert not [p for m in ADAPTER_MODULES for p in uses(installed_index, m).probes], \
        "version probes belong in longseq/sglang_versions.py, not in the adapters"
    old, new = uses(wheel_index, COMPAT_MOD).probes, uses(installed_index, COMPAT_MOD).probes
    assert len(old) >= 5, f"AST walk found too few probes: {old}"
    table = {p.where: (p.text, p.taken) for p in old}
    same = [f"{p.where} {p.text}: taken={p.taken} on both" for p in new
            if table.get(p.where, (None, None))[1] == p.taken]
    missing = sorted(table.keys() ^ {p.where for p in new})
    assert not same and not missing, f"probes that do not tell the versions apart: {same}; unmatched: {missing}"


def test_checked_versions_are_the_supported_range(installed_index):
    """This file checks both ends of the range the plugin accepts and ``pyproject.toml`` declares."""
    from longseq.sglang_versions import SGLANG_MAX, SGLANG_MIN

    with open(os.path.join(os.path.dirname(REPO), "pyproject.toml"), "rb") as f:
        extra = tomllib.load(f)["project"]["optional-dependencies"]["sglang"]
    assert extra == [f"sglang>={SGLANG_MIN},<={SGLANG_MAX}"]
    assert (str(SGLANG_MIN), str(SGLANG_MAX)) == (WHEEL_VERSION, importlib.metadata.version("sglang"))


def test_plugin_imports_sglang_lazily(installed_index):
    """The plugin and the shim import nothing of SGLang at module level: SGLang runs ``register`` in every
    process, the detokenizer included, so registration must not pull SGLang's model-side modules."""
    problems = [f"{installed_index.module(m)[0]}:{s.lineno}: {ast.unparse(s)}" for m in (PLUGIN_MOD, COMPAT_MOD)
                for s in installed_index.module(m)[1].body if isinstance(s, ast.ImportFrom | ast.Import)
                and ast.unparse(s).split()[1].split(".")[0] == "sglang"]
    _fail_if(problems, installed_index)
