"""Triton kernels under the interpreter on machines without CUDA (shared by the kernel test modules).

``triton.jit`` picks the interpreter at decoration time, for our kernels and for triton.language's own jit
helpers (``tl.max``, ``tl.cumsum``...), and the interpreter reads ``TRITON_INTERPRET`` at run time too. So:
:func:`import_kernels` re-imports the given modules (and triton.language) with ``TRITON_INTERPRET=1`` set, and
:func:`interpreter_env` sets it while a test module runs; both restore the variable after, so other modules'
subprocesses never see it. With CUDA both do nothing special (the kernels compile natively).
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
import types

import torch

CUDA = torch.cuda.is_available()


@contextlib.contextmanager
def _interpret():
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = old


def import_kernels(*modules: str) -> list[types.ModuleType]:
    """Import ``modules`` (dependency order: later ones may call earlier ones' jit functions), re-imported
    under the interpreter when there is no GPU."""
    if CUDA:
        return [importlib.import_module(m) for m in modules]
    with _interpret():
        import triton.language as tl
        from triton.runtime.interpreter import InterpretedFunction

        if not isinstance(tl.standard.max, InterpretedFunction):  # triton was imported before us
            importlib.reload(tl.standard)
            importlib.reload(tl)
        # Kernel modules imported earlier without the interpreter (shared jit helpers such as
        # triton_score_mods, loaded by another test's backend) would be called from interpreted kernels and
        # fail: re-import them too, twice, so helpers imported by name from each other are the new ones.
        stale = _compiled_kernel_modules()
        for _ in range(2 if stale else 0):
            for name in stale:
                importlib.reload(sys.modules[name])
        return [importlib.reload(importlib.import_module(m)) for m in modules]


def _compiled_kernel_modules() -> list[str]:
    """Loaded ``longseq.kernels`` modules holding a jit function made without the interpreter."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    return sorted(name for name, mod in list(sys.modules.items()) if mod is not None
                  and (name == "longseq.kernels" or name.startswith("longseq.kernels."))
                  and any(isinstance(v, JITFunction) and not isinstance(v, InterpretedFunction)
                          for v in vars(mod).values()))


def interpreter_env():
    """Generator for an autouse module fixture: ``TRITON_INTERPRET=1`` while the module's tests run (no GPU)."""
    if CUDA:
        yield
        return
    with _interpret():
        yield
