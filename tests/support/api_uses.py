"""What one of our modules uses of a framework, found with ``ast`` and checked in an :class:`ApiIndex`.

Version probes are evaluated statically for the indexed version: ``if hasattr(X, "name"):`` (``X`` a framework
class or module, or a name that always holds one framework class's objects) takes the branch that version
would take, and a ``try:`` whose handler catches ``ImportError`` takes its body when every framework import
there resolves, else the handler. Only the code a version reaches is checked against it, so each branch of a
shim is checked against the version it serves.

Checked uses (each check returns a list of problems, empty when all is well):

- ``from <framework>... import name``: the name resolves;
- calls of imported functions and classes, of their members (``Cls.method(...)``, ``module.func(...)``), and
  of methods on what a typed call returns (``get_server_args().method()``): the signature takes the call;
- ``Cls.NAME`` / ``module.NAME`` reads and reads on typed names (``forward_batch.seq_lens``): the member exists
  (not checked on classes that answer attributes through ``__getattr__``, such as config namespaces).
"""

from __future__ import annotations

import ast
import dataclasses
import functools

from wheel_api import ApiIndex, ClassInfo, Param, call_problems, params_of


@dataclasses.dataclass
class Probe:
    where: str  # "longseq/sglang_versions.py:40"
    text: str  # 'hasattr(KVWriteLoc, "for_layer")', or the imports a ``try:`` attempts
    taken: bool  # the ``if`` body / the ``try`` body runs in the indexed version


def members(api: ApiIndex, cls: ClassInfo) -> set[str]:
    """Every name a class and its indexed bases define: methods, class attributes, fields, ``self.X`` sets."""
    return {n for c in api.mro(cls) for n in (*c.methods, *c.class_attrs, *c.fields, *c.self_attrs)}


def _catches_import_error(handler: ast.ExceptHandler) -> bool:
    names = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
    return any(getattr(n, "id", None) in ("ImportError", "ModuleNotFoundError") for n in names)


class SourceUses:
    """The framework uses of our module ``modname`` that the indexed framework version reaches.

    ``typed_names`` maps a parameter/variable name to the framework class it always holds in our code
    (``{"forward_batch": ("sglang.srt.model_executor.forward_batch_info", "ForwardBatch")}``).
    """

    def __init__(self, api: ApiIndex, modname: str, framework: str,
                 typed_names: dict[str, tuple[str, str]] | None = None):
        self.api, self.framework = api, framework
        self.path, tree, _ = api.module(modname)
        self.typed_names = typed_names or {}
        self.imports: dict[str, tuple[str, str]] = {}  # local name -> (framework module, name), live code only
        self.import_nodes: list[ast.ImportFrom] = []
        self.probes: list[Probe] = []
        self.live = list(self._walk(tree))

    # ---- reaching the live code ----
    def _is_framework_import(self, node: ast.ImportFrom) -> bool:
        return not node.level and (node.module or "").split(".")[0] == self.framework

    def _walk(self, node: ast.AST):
        """Nodes in source order, skipping the branches of version probes this version does not take."""
        yield node
        if isinstance(node, ast.ImportFrom) and self._is_framework_import(node):
            self.import_nodes.append(node)
            self.imports.update({a.asname or a.name: (node.module, a.name) for a in node.names})
        if isinstance(node, ast.If) and (taken := self._hasattr_probe(node.test)) is not None:
            self.probes.append(Probe(f"{self.path}:{node.lineno}", ast.unparse(node.test), taken))
            for child in node.body if taken else node.orelse:
                yield from self._walk(child)
            return
        if isinstance(node, ast.Try) and any(map(_catches_import_error, node.handlers)):
            tried = [n for s in node.body for n in ast.walk(s) if isinstance(n, ast.ImportFrom) and self._is_framework_import(n)]
            taken = all(self.api.resolve(n.module, a.name) for n in tried for a in n.names)
            self.probes.append(Probe(f"{self.path}:{node.lineno}", "; ".join(map(ast.unparse, tried)), taken))
            chosen = node.body + node.orelse if taken else [s for h in node.handlers for s in h.body]
            for child in chosen + node.finalbody:
                yield from self._walk(child)
            return
        for child in ast.iter_child_nodes(node):
            yield from self._walk(child)

    def _hasattr_probe(self, test: ast.expr) -> bool | None:
        """Value of ``hasattr(X, "<name>")`` in this version, ``X`` a framework class or module or a typed name
        (then: whether the class sets or declares ``name``); None for other tests."""
        if not (isinstance(test, ast.Call) and getattr(test.func, "id", None) == "hasattr" and len(test.args) == 2
                and isinstance(test.args[1], ast.Constant) and isinstance(test.args[0], ast.Name)):
            return None
        name, attr = test.args[0].id, test.args[1].value
        if name in self.typed_names and (cls := self.api.class_info(*self.typed_names[name])) is not None:
            return attr in members(self.api, cls)
        return self._member(name, attr) is not None

    # ---- resolving names ----
    def resolved(self, name: str) -> tuple[str, ast.AST] | None:
        """(module, definition node) of an imported framework name, None if it is not one or does not resolve."""
        return self.api.resolve(*self.imports[name]) if name in self.imports else None

    def _class(self, mod: str, node: ast.AST) -> ClassInfo | None:
        return self.api.class_info(mod, node.name) if isinstance(node, ast.ClassDef) else None

    def _member(self, name: str, attr: str):
        """``name.attr`` for an imported class or module ``name``: ("class", ClassInfo, attr), ("module", hit)
        or None when absent."""
        hit = self.resolved(name)
        if hit is None:
            return None
        if isinstance(hit[1], ast.Module):
            sub = self.api.resolve(hit[0], attr)
            return ("module", sub) if sub else None
        cls = self._class(*hit)
        return ("class", cls, attr) if cls is not None and attr in members(self.api, cls) else None

    def _returned_class(self, call: ast.Call) -> ClassInfo | None:
        """The class a framework function's return annotation names, for ``func()`` / ``module.func()``."""
        func = call.func
        if isinstance(func, ast.Name):
            hit = self.resolved(func.id)
        elif isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name):
            found = self._member(func.value.id, func.attr)
            hit = found[1] if found and found[0] == "module" else None
        else:
            return None
        if hit is None or not isinstance(hit[1], ast.FunctionDef) or not isinstance(hit[1].returns, ast.Name):
            return None
        ret = self.api.resolve(hit[0], hit[1].returns.id)
        return self._class(*ret) if ret else None

    @functools.cached_property
    def _typed_locals(self) -> dict[str, ClassInfo]:
        """``self.typed_names``, plus names assigned once from a typed framework call (``p = get_parallel()``)."""
        out = {n: self.api.class_info(m, c) for n, (m, c) in self.typed_names.items()}
        for node in self.live:
            if (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)
                    and isinstance(node.value, ast.Call) and (cls := self._returned_class(node.value))):
                out[node.targets[0].id] = cls
        return {n: c for n, c in out.items() if c is not None}

    # ---- checks ----
    def at(self, node: ast.AST) -> str:
        return f"{self.path}:{node.lineno}"

    def import_problems(self) -> list[str]:
        return [f"{self.at(n)}: from {n.module} import {a.name}" for n in self.import_nodes for a in n.names
                if self.api.resolve(n.module, a.name) is None]

    def _signature(self, func: ast.expr) -> tuple[str, list[Param] | None] | None:
        """(what is called, its parameters; None when not a ``def``) for a call of a framework callable; None
        for calls that are not (or that ``member_problems`` reports as missing)."""
        if isinstance(func, ast.Name) and (hit := self.resolved(func.id)):
            mod, node = hit
            if isinstance(node, ast.FunctionDef):
                return f"{mod}.{node.name}", params_of(node.args, drop_first=False)
            if (cls := self._class(mod, node)) is not None:
                return f"{cls.qualname}(...)", self._constructor(cls)
            return f"{mod}.{func.id}", None
        if not isinstance(func, ast.Attribute):
            return None
        if isinstance(func.value, ast.Name) and (found := self._member(func.value.id, func.attr)):
            if found[0] == "module":
                node = found[1][1]
                return (f"{found[1][0]}.{func.attr}",
                        params_of(node.args, drop_first=False) if isinstance(node, ast.FunctionDef) else None)
            return self._method_signature(found[1], func.attr, unbound=True)
        owner = self._typed_locals.get(getattr(func.value, "id", None))
        if owner is None and isinstance(func.value, ast.Call):
            owner = self._returned_class(func.value)
        return self._method_signature(owner, func.attr, unbound=False) if owner else None

    def _method_signature(self, cls: ClassInfo, name: str, unbound: bool):
        hit = self.api.lookup(cls, name)
        if hit is None:
            return f"{cls.qualname}.{name}", None  # an attribute (e.g. a callable field), not a def
        method = hit[1]
        params = method.params
        if unbound and method.kind == "instance":  # Cls.method(obj, ...) passes self explicitly
            params = [Param("self", "pos_or_kw", False)] + params
        return f"{hit[0].qualname}.{name}", params

    def _constructor(self, cls: ClassInfo) -> list[Param] | None:
        """``Cls(...)``'s parameters: its ``__init__``, else a dataclass's fields (bases first)."""
        init = self.api.lookup(cls, "__init__")
        if init is not None:
            return init[1].params
        if cls.is_dataclass():
            flag = cls.dataclass_kwargs().get("kw_only")
            kw_only = flag is not None and bool(ast.literal_eval(flag))
            fields = {f: d for c in reversed(self.api.mro(cls)) if c.is_dataclass() for f, d in c.fields.items()}
            return [Param(f, "kw" if kw_only else "pos_or_kw", d) for f, d in fields.items()]
        return None

    def framework_calls(self) -> list[tuple[ast.Call, str, list[Param]]]:
        """(call, what it calls, the callee's parameters) of each live framework call with a known signature."""
        return [(node, *sig) for node in self.live
                if isinstance(node, ast.Call) and (sig := self._signature(node.func)) and sig[1] is not None]

    def call_problems(self) -> list[str]:
        """Framework calls in the live code whose callee's signature does not take them."""
        return [f"{self.at(node)}: {what}: {p}" for node, what, params in self.framework_calls()
                for p in call_problems(params, node)]

    def typed_reads(self) -> list[tuple[ast.Attribute, ClassInfo]]:
        """``name.X`` reads on typed names and ``typed_call().X`` reads, with the class the value belongs to."""
        out = []
        for node in self.live:
            if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load):
                value = node.value
                cls = (self._typed_locals.get(value.id) if isinstance(value, ast.Name) and value.id not in self.imports
                       else self._returned_class(value) if isinstance(value, ast.Call) else None)
                if cls is not None:
                    out.append((node, cls))
        return out

    def member_problems(self) -> list[str]:
        """``Cls.X`` / ``module.X`` on imported framework names, and ``name.X`` on typed names, that do not exist."""
        probs = []
        for node in self.live:
            if (isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load) and isinstance(node.value, ast.Name)
                    and (hit := self.resolved(node.value.id)) and isinstance(hit[1], ast.Module | ast.ClassDef)
                    and not self._member(node.value.id, node.attr)):
                probs.append(f"{self.at(node)}: {ast.unparse(node)}: no {node.attr!r} in {self.imports[node.value.id]}")
        for node, cls in self.typed_reads():
            known = members(self.api, cls)
            if "__getattr__" not in known and node.attr not in known:
                probs.append(f"{self.at(node)}: {ast.unparse(node)}: {cls.qualname} has no {node.attr!r}")
        return probs
