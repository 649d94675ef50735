"""A framework's API read from source with ``ast``: nothing is installed, nothing of the framework is imported.

Code trees read:

- a released wheel, downloaded once with ``pip download --no-deps`` into ``$LONGSEQ_CACHE_DIR/wheels``
  (else ``~/.cache/longseq/wheels``) and opened as a zip;
- an installed package's ``.py`` files (found with ``importlib.util.find_spec``, without importing it);
- longseq's own sources, so one :class:`ApiIndex` follows our classes into the framework's bases.

Signatures are lists of :class:`Param`; :func:`override_problems` and :func:`call_problems` say why a
function could not stand in for another / could not take a given call (an empty list means it can).
Used by the vLLM (through ``vllm_wheel_api``) and SGLang conformance tests; ``api_uses`` finds our uses.
"""

from __future__ import annotations

import ast
import dataclasses
import glob
import importlib.util
import os
import subprocess
import sys
import zipfile
from typing import Callable

from longseq.models import cache_root, cached_build

REPO = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "longseq")  # the package


# ---------------------------------------------------------------------------------------- code trees

def wheel_cache_dir() -> str:
    """``$LONGSEQ_CACHE_DIR/wheels``, else ``~/.cache/longseq/wheels`` (made by the models' ``cache_root``)."""
    return cache_root(os.path.join(os.environ.get("LONGSEQ_CACHE_DIR") or os.path.join("~", ".cache", "longseq"),
                                   "wheels"))


def download_wheel(dist: str, version: str, platform: str, python_version: str | None = None) -> str:
    """Path of the ``dist==version`` wheel for ``platform`` (e.g. ``manylinux_2_28_x86_64``; and CPython
    ``python_version`` such as ``3.11`` for a version-specific wheel), fetched on first use and cached.

    The fetch goes through ``cached_build`` (file lock + atomic rename), so a partial download is never
    reused. Raises ``RuntimeError`` with pip's output when pip fails (no network, index unreachable).
    """
    def fetch(tmp: str) -> None:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--platform", platform, *(["--python-version", python_version] if python_version else []),
               "--timeout", "30", "--retries", "2", "--disable-pip-version-check", "-q", f"{dist}=={version}",
               "-d", tmp]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode:
            raise RuntimeError(f"could not download the {dist}=={version} wheel (network or package index "
                               f"unreachable?): `{' '.join(cmd[2:])}` exited {r.returncode}:\n"
                               f"{(r.stdout + r.stderr)[-1500:]}")

    folder = cached_build(f"{dist}-{version}", f"pip-download-{dist}-{version}-manylinux-x86_64", fetch,
                          wheel_cache_dir())
    wheels = glob.glob(os.path.join(folder, f"{dist}-{version}-*.whl"))
    if len(wheels) != 1:
        raise RuntimeError(f"expected one {dist}-{version} wheel in {folder}, found {wheels}; delete the folder")
    return wheels[0]


def wheel_reader(path: str) -> Callable[[str], str | None]:
    """``read('pkg/x/y.py')`` from a wheel (a zip), None if absent."""
    z = zipfile.ZipFile(path)
    names = set(z.namelist())
    return lambda rel: z.read(rel).decode() if rel in names else None


def dir_reader(pkg_dir: str) -> Callable[[str], str | None]:
    """``read('<pkg>/x/y.py')`` from the package folder ``pkg_dir`` (the first path component is dropped)."""
    def read(rel: str) -> str | None:
        path = os.path.join(pkg_dir, *rel.split("/")[1:])
        if not os.path.isfile(path):
            return None
        with open(path, encoding="utf-8") as f:
            return f.read()
    return read


def installed_package_dir(name: str) -> str | None:
    """Folder of the installed package ``name`` (``find_spec`` locates it without importing it)."""
    spec = importlib.util.find_spec(name)
    return list(spec.submodule_search_locations)[0] if spec and spec.submodule_search_locations else None


# ---------------------------------------------------------------------------------------- signatures

@dataclasses.dataclass(frozen=True)
class Param:
    name: str
    kind: str  # "pos" (positional-only), "pos_or_kw", "kw" (keyword-only), "var_pos" (*a), "var_kw" (**k)
    default: bool  # has a default (always True for *a / **k)


def params_of(args: ast.arguments, drop_first: bool) -> list[Param]:
    """Parameters of a ``def``; ``drop_first`` drops ``self``/``cls``."""
    pos = [(a, "pos") for a in args.posonlyargs] + [(a, "pos_or_kw") for a in args.args]
    first_default = len(pos) - len(args.defaults)
    out = [Param(a.arg, kind, i >= first_default) for i, (a, kind) in enumerate(pos)][1 if drop_first else 0:]
    if args.vararg:
        out.append(Param(args.vararg.arg, "var_pos", True))
    out += [Param(a.arg, "kw", d is not None) for a, d in zip(args.kwonlyargs, args.kw_defaults)]
    if args.kwarg:
        out.append(Param(args.kwarg.arg, "var_kw", True))
    return out


def _shape(params: list[Param]):
    positional = [p for p in params if p.kind in ("pos", "pos_or_kw")]
    by_name = {p.name: p for p in params if p.kind in ("pos_or_kw", "kw")}
    kinds = {p.kind for p in params}
    return positional, by_name, "var_pos" in kinds, "var_kw" in kinds


def override_problems(base: list[Param], ours: list[Param]) -> list[str]:
    """Why ``ours`` cannot take every call that ``base`` accepts (by position and by keyword)."""
    b_pos, b_names, b_star, b_dstar = _shape(base)
    o_pos, o_names, o_star, o_dstar = _shape(ours)
    probs = []
    for i, bp in enumerate(b_pos):
        if i < len(o_pos):
            if bp.default and not o_pos[i].default:
                probs.append(f"positional #{i + 1} ({o_pos[i].name!r}) needs a default, as base {bp.name!r} has one")
        elif not o_star:
            probs.append(f"base parameter {bp.name!r} (positional #{i + 1}) cannot be passed positionally")
    for name, bp in b_names.items():
        op = o_names.get(name)
        if op is None:
            if not o_dstar:
                probs.append(f"base parameter {name!r} cannot be passed by keyword")
        elif op.kind == "pos_or_kw" and bp.kind == "pos_or_kw" and o_pos.index(op) != b_pos.index(bp):
            probs.append(f"{name!r} is positional #{o_pos.index(op) + 1}, base has it at #{b_pos.index(bp) + 1}")
        elif bp.default and not op.default:
            probs.append(f"{name!r} needs a default, as in the base")
    if b_star and not o_star:
        probs.append("base takes *args, ours does not")
    if b_dstar and not o_dstar:
        probs.append("base takes **kwargs, ours does not")
    for i, op in enumerate(o_pos):
        if not op.default and i >= len(b_pos) and not b_star:
            probs.append(f"ours requires an extra positional parameter {op.name!r}")
    for name, op in o_names.items():
        if op.kind == "kw" and not op.default and name not in b_names:
            probs.append(f"ours requires an extra keyword-only parameter {name!r}")
    return probs


def call_shape(call: ast.Call) -> tuple[int, list[str], bool, bool]:
    """(number of plain positional args, keyword names, has ``*x``, has ``**x``) of a call."""
    return (sum(not isinstance(a, ast.Starred) for a in call.args), [k.arg for k in call.keywords if k.arg],
            any(isinstance(a, ast.Starred) for a in call.args), any(k.arg is None for k in call.keywords))


def call_problems(params: list[Param], call: ast.Call, forwarding: bool = False) -> list[str]:
    """Why a function with ``params`` could not take ``call``.

    A ``*x``/``**x`` in the call may hold anything, so the callee needs ``*args``/``**kwargs`` too, unless
    ``forwarding`` (the call passes on our own ``*args, **kwargs``, which hold what the caller gave).
    """
    npos, kwnames, star, dstar = call_shape(call)
    o_pos, o_names, o_star, o_dstar = _shape(params)
    probs = []
    if npos > len(o_pos) and not o_star:
        probs.append(f"passes {npos} positional arguments, accepts {len(o_pos)}")
    if star and not o_star and not forwarding:
        probs.append("passes *args, no *args parameter")
    if dstar and not o_dstar and not forwarding:
        probs.append("passes **kwargs (arbitrary keywords), no **kwargs parameter")
    for name in kwnames:
        if name not in o_names and not o_dstar:
            probs.append(f"passes keyword {name!r}, not accepted")
        elif name in o_names and o_names[name] in o_pos[:npos]:
            probs.append(f"passes {name!r} both by position and by keyword")
    if not (star or dstar):
        missing = [p.name for p in o_pos[npos:] if not p.default and p.name not in kwnames]
        missing += [n for n, p in o_names.items() if p.kind == "kw" and not p.default and n not in kwnames]
        if missing:
            probs.append(f"does not pass required {missing}")
    return probs


# ---------------------------------------------------------------------------------------- classes

@dataclasses.dataclass
class Method:
    name: str
    kind: str  # "instance", "static", "class" or "property"
    params: list[Param]
    abstract: bool
    node: ast.FunctionDef


@dataclasses.dataclass(eq=False)
class ClassInfo:
    """One class as written in source: what its body defines, and its bases that the index could follow."""

    qualname: str  # "vllm.v1.attention.backend.AttentionBackend"
    where: str  # "vllm/v1/attention/backend.py:59"
    node: ast.ClassDef
    bases: list["ClassInfo"]  # bases inside the indexed packages; others (ABC, Generic, Enum) are dropped
    methods: dict[str, Method]
    class_attrs: dict[str, ast.expr | None]  # class-level assignments / annotations (value None if bare)
    self_attrs: set[str]  # every `self.X = ...` in any method
    fields: dict[str, bool]  # annotated class-level names other than ClassVar -> has a default (dataclass fields)

    @property
    def name(self) -> str:
        return self.node.name

    def is_dataclass(self) -> bool:
        return any(_decorator_name(d) == "dataclass" for d in self.node.decorator_list)

    def dataclass_kwargs(self) -> dict[str, ast.expr]:
        return {k.arg: k.value for d in self.node.decorator_list if isinstance(d, ast.Call) for k in d.keywords}


def _decorator_name(d: ast.expr) -> str:
    d = d.func if isinstance(d, ast.Call) else d
    return d.attr if isinstance(d, ast.Attribute) else getattr(d, "id", "")


def _method(node: ast.FunctionDef) -> Method:
    decos = {_decorator_name(d) for d in node.decorator_list}
    kind = ("static" if "staticmethod" in decos else "class" if "classmethod" in decos
            else "property" if decos & {"property", "cached_property"} else "instance")
    return Method(node.name, kind, params_of(node.args, drop_first=kind != "static"),
                  bool(decos & {"abstractmethod", "abstractproperty"}), node)


def _top_level(body: list[ast.stmt]):
    """Module-level statements, looking into ``if``/``try`` blocks (TYPE_CHECKING imports, fallbacks)."""
    for stmt in body:
        yield stmt
        if isinstance(stmt, ast.If):
            yield from _top_level(stmt.body + stmt.orelse)
        elif isinstance(stmt, ast.Try):
            yield from _top_level(stmt.body + stmt.orelse + stmt.finalbody + [s for h in stmt.handlers for s in h.body])


class ApiIndex:
    """Modules of several packages (``{"vllm": reader, "longseq": reader}``), parsed on demand."""

    def __init__(self, label: str, readers: dict[str, Callable[[str], str | None]]):
        self.label = label
        self.readers = readers
        self._modules: dict[str, tuple[str, ast.Module, bool] | None] = {}
        self._classes: dict[str, ClassInfo] = {}

    def module(self, modname: str) -> tuple[str, ast.Module, bool] | None:
        """(path, tree, is_package) of a module of an indexed package, else None."""
        if modname not in self._modules:
            self._modules[modname] = None
            read = self.readers.get(modname.split(".")[0])
            for rel, is_pkg in ((modname.replace(".", "/") + ".py", False),
                                (modname.replace(".", "/") + "/__init__.py", True)):
                text = read(rel) if read else None
                if text is not None:
                    self._modules[modname] = (rel, ast.parse(text, rel), is_pkg)
                    break
        return self._modules[modname]

    def resolve(self, modname: str, name: str, _depth: int = 0) -> tuple[str, ast.AST] | None:
        """Where ``name`` as seen in ``modname`` is defined, following ``from x import name`` re-exports.

        Returns (module, node): a ClassDef / FunctionDef / Assign / AnnAssign, or a Module for a submodule.
        """
        found = self.module(modname)
        if found is None or _depth > 20:  # a namespace package (no __init__.py) still holds its submodules
            sub = f"{modname}.{name}"
            return (sub, self.module(sub)[1]) if _depth <= 20 and self.module(sub) else None
        _, tree, is_pkg = found
        for stmt in _top_level(tree.body):
            if isinstance(stmt, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and stmt.name == name:
                return modname, stmt
            if isinstance(stmt, ast.Assign) and any(getattr(t, "id", None) == name for t in stmt.targets):
                return modname, stmt
            if isinstance(stmt, ast.AnnAssign) and getattr(stmt.target, "id", None) == name:
                return modname, stmt
            if isinstance(stmt, ast.ImportFrom):
                for alias in stmt.names:
                    if (alias.asname or alias.name) == name:
                        pkg = modname if is_pkg else modname.rpartition(".")[0]
                        for _ in range(max(stmt.level - 1, 0)):
                            pkg = pkg.rpartition(".")[0]
                        src = ".".join(p for p in (pkg if stmt.level else "", stmt.module or "") if p)
                        return self.resolve(src, alias.name, _depth + 1)
        sub = f"{modname}.{name}"
        return (sub, self.module(sub)[1]) if is_pkg and self.module(sub) else None

    def class_info(self, modname: str, name: str) -> ClassInfo | None:
        hit = self.resolve(modname, name)
        if hit is None or not isinstance(hit[1], ast.ClassDef):
            return None
        mod, node = hit
        qualname = f"{mod}.{node.name}"
        if qualname not in self._classes:
            bases = []
            for b in node.bases:
                b = b.value if isinstance(b, ast.Subscript) else b  # Builder[M] -> Builder
                info = self.class_info(mod, b.id) if isinstance(b, ast.Name) else None
                if info is not None:
                    bases.append(info)
            methods, attrs, self_attrs, fields = {}, {}, set(), {}
            for stmt in node.body:
                if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    if "overload" not in {_decorator_name(d) for d in stmt.decorator_list}:
                        methods[stmt.name] = _method(stmt)
                    for n in ast.walk(stmt):
                        if isinstance(n, ast.Attribute) and isinstance(n.ctx, ast.Store) and getattr(n.value, "id", "") == "self":
                            self_attrs.add(n.attr)
                elif isinstance(stmt, ast.Assign):
                    attrs.update({t.id: stmt.value for t in stmt.targets if isinstance(t, ast.Name)})
                elif isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
                    attrs[stmt.target.id] = stmt.value
                    if "ClassVar" not in ast.unparse(stmt.annotation):
                        fields[stmt.target.id] = stmt.value is not None
            self._classes[qualname] = ClassInfo(qualname, f"{self.module(mod)[0]}:{node.lineno}", node, bases,
                                                methods, attrs, self_attrs, fields)
        return self._classes[qualname]

    def mro(self, cls: ClassInfo) -> list[ClassInfo]:
        """C3 linearization over the indexed classes (external bases such as ABC/Generic left out)."""
        seqs = [[cls]] + [self.mro(b) for b in cls.bases] + [list(cls.bases)]
        out: list[ClassInfo] = []
        while seqs := [s for s in seqs if s]:
            head = next((s[0] for s in seqs if not any(s[0] in t[1:] for t in seqs)), None)
            if head is None:
                raise TypeError(f"{self.label}: inconsistent MRO for {cls.qualname}")
            out.append(head)
            seqs = [[c for c in s if c is not head] for s in seqs]
        return out

    def lookup(self, cls: ClassInfo, name: str, skip_self: bool = False) -> tuple[ClassInfo, Method] | None:
        """First method ``name`` along the MRO (after ``cls`` itself if ``skip_self``)."""
        for c in self.mro(cls)[1 if skip_self else 0:]:
            if name in c.methods:
                return c, c.methods[name]
        return None

    def class_attr(self, cls: ClassInfo, name: str) -> tuple[ClassInfo, ast.expr | None] | None:
        """First class-level assignment of ``name`` along the MRO: (defining class, value expression)."""
        for c in self.mro(cls):
            if name in c.class_attrs:
                return c, c.class_attrs[name]
        return None

    def module_classes(self, modname: str) -> list[ClassInfo]:
        """Classes defined at the top level of ``modname``."""
        _, tree, _ = self.module(modname)
        return [self.class_info(modname, s.name) for s in tree.body if isinstance(s, ast.ClassDef)]


def find_calls(tree: ast.AST, callee: str) -> list[ast.Call]:
    """Calls in ``tree`` to ``callee`` (``callee(...)`` or ``x.callee(...)``)."""
    return [n for n in ast.walk(tree) if isinstance(n, ast.Call)
            and (getattr(n.func, "id", None) == callee or getattr(n.func, "attr", None) == callee)]


def function_node(index: ApiIndex, modname: str, qualname: str) -> ast.FunctionDef | None:
    """``def`` named ``f`` or ``Cls.f`` at the top level of ``modname``."""
    head, _, meth = qualname.partition(".")
    hit = index.resolve(modname, head)
    if hit is None:
        return None
    node = hit[1]
    if meth:
        node = next((s for s in getattr(node, "body", []) if isinstance(s, ast.FunctionDef) and s.name == meth), None)
    return node if isinstance(node, ast.FunctionDef) else None


# ---------------------------------------------------------------------------------------- checks on our classes
# Shared by the conformance tests; each returns problems as text (empty: all is well).

def where(cls: ClassInfo, node: ast.AST) -> str:
    """``path:line`` of ``node`` inside ``cls``'s file."""
    return f"{cls.where.rsplit(':', 1)[0]}:{node.lineno}"


def base_override_problems(api: ApiIndex, cls: ClassInfo, method: Method) -> list[str]:
    """Why ``cls.method`` cannot stand in for the method it overrides (kind, then signature); [] if none."""
    base = api.lookup(cls, method.name, skip_self=True)
    if base is None:
        return []
    owner, bm = base
    if (bm.kind == "instance") != (method.kind == "instance") or (bm.kind == "property") != (method.kind == "property"):
        return [f"{cls.name}.{method.name} is {method.kind}, {where(owner, bm.node)} has a {bm.kind} method"]
    return [f"{cls.name}.{method.name} vs {owner.name}.{method.name} ({where(owner, bm.node)}): {p}"
            for p in override_problems(bm.params, method.params)]


def call_site_problems(api: ApiIndex, cls: ClassInfo, method: Method, module: str, function: str,
                       callee: str) -> list[str]:
    """Why ``cls.method`` cannot take the framework's ``callee(...)`` calls inside ``module``'s ``function``
    (``f`` or ``Cls.f``), or that no such call is there."""
    fn = function_node(api, module, function)
    calls = find_calls(fn, callee) if fn else []
    if not calls:
        return [f"framework call site {module}:{function} -> {callee}(...) not found"]
    return [f"{cls.name}.{method.name} called from {module}:{function} line {c.lineno}: {p}"
            for c in calls for p in call_problems(method.params, c)]


def super_call_problems(api: ApiIndex, cls: ClassInfo, method: Method) -> list[str]:
    """Why a ``super().name(...)`` call in ``cls.method`` does not bind (no base defines it, or the call does
    not fit; a passed-on ``*args, **kwargs`` is trusted)."""
    probs = []
    for call in (n for n in ast.walk(method.node) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
                 and isinstance(n.func.value, ast.Call) and getattr(n.func.value.func, "id", "") == "super"):
        target = api.lookup(cls, call.func.attr, skip_self=True)
        if target is None:
            probs.append(f"{cls.name}.{method.name} calls super().{call.func.attr}(), which no base defines")
        else:
            probs += [f"{cls.name}.{method.name}: super().{call.func.attr}(...) line {call.lineno}: {p}"
                      for p in call_problems(target[1].params, call, forwarding=True)]
    return probs


def still_abstract(api: ApiIndex, cls: ClassInfo) -> list[str]:
    """Abstract methods of ``cls``'s bases that nothing in its MRO implements (ABCs refuse to instantiate)."""
    mro = api.mro(cls)
    probs = []
    for name in sorted({n for c in mro for n, m in c.methods.items() if m.abstract}):
        owner = next(c for c in mro if name in c.methods or name in c.class_attrs)
        if name in owner.methods and owner.methods[name].abstract:
            probs.append(f"{cls.name}: {owner.name}.{name} ({where(owner, owner.methods[name].node)}) is abstract "
                         "and not implemented")
    return probs


def unset_self_reads(api: ApiIndex, cls: ClassInfo) -> list[str]:
    """``self.<attr>`` reads in ``cls``'s methods that no class in its MRO sets (``self.x = ...`` or
    ``object.__setattr__(self, "x", ...)``) or declares."""
    mro = api.mro(cls)
    known = {a for c in mro for a in (*c.methods, *c.class_attrs, *c.self_attrs)}
    known |= {n.args[1].value for c in mro for n in ast.walk(c.node) if isinstance(n, ast.Call)
              and ast.unparse(n.func) == "object.__setattr__" and isinstance(n.args[1], ast.Constant)}
    return [f"{cls.name}.{name} reads self.{a}, which no class in its MRO sets"
            for name, m in cls.methods.items() for a in sorted(
                {n.attr for n in ast.walk(m.node) if isinstance(n, ast.Attribute) and isinstance(n.ctx, ast.Load)
                 and getattr(n.value, "id", None) == "self"} - known)]
