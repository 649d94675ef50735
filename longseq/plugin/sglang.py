"""SGLang general plugin: ``sglang.srt.plugins`` entry point ``longseq = longseq.plugin.sglang:register``.

SGLang calls :func:`register` in every process (CLI/engine front end, scheduler, detokenizer, DP
controller) before it parses ``--attention-backend``, and only *logs* exceptions raised by plugins. So
``register`` is idempotent and cheap (it touches SGLang's registry and CLI choice list only; the backend
module is imported by the factory), and anything wrong (SGLang version, ``LONGSEQ_*`` settings) is logged
here and raised again by the factory, which runs only when the user selected our backend.

Usage:  ``python -m sglang.launch_server --model-path M --attention-backend longseq_dense``
        ``python -m sglang.launch_server --model-path M --attention-backend longseq_sparse --page-size 16``
        ``python -m sglang.launch_server --model-path M --attention-backend longseq_duo`` (``LONGSEQ_DUO_*``)
        (``sgl.Engine(..., attention_backend="longseq_dense")`` works the same way).
        ``LONGSEQ_KDA=1 python -m sglang.launch_server --model-path moonshotai/Kimi-Linear-48B-A3B-Instruct ...``
        (Kimi-Linear's KDA layers on longseq's kernels; any --attention-backend for its MLA layers)
"""

from __future__ import annotations

import importlib
import logging

from longseq.attention_backends.sglang import BACKEND_CLASSES
from longseq.config import LongSeqConfigError, get_config
from longseq.sglang_versions import (
    SGLANG_MAX,
    SGLANG_MIN,
    add_attention_backend_choice,
    mamba_extra_buffer_enabled,
    sglang_version_supported,
)
from longseq.versions import LongSeqVersionError, installed_version

logger = logging.getLogger("longseq")

DENSE_BACKEND = "longseq_dense"
SPARSE_BACKEND = "longseq_sparse"
DUO_BACKEND = "longseq_duo"
_checked = False  # the version/config problems are logged once per process


def check_sglang_version(version: str | None = None) -> str:
    """Return the installed SGLang version, or raise :class:`LongSeqVersionError` if it is not supported."""
    version = version or installed_version("sglang")
    if version is None or not sglang_version_supported(version):
        raise LongSeqVersionError(
            f"longseq supports SGLang {SGLANG_MIN} to {SGLANG_MAX}; installed: "
            f"{'sglang ' + version if version else 'no sglang'} (pip install 'longseq[sglang]')"
        )
    return version


def create_backend(name: str, model_runner):
    """The backend ``name`` of :data:`BACKEND_CLASSES` for ``model_runner`` (its module is imported here, not at
    registration). SGLang may call a factory several times per process (two-batch overlap, PD multiplexing).

    Raises:
        LongSeqVersionError: the installed SGLang is not a supported version.
        LongSeqConfigError: a ``LONGSEQ_*`` setting is invalid, or the model runner does not fit the backend.
    """
    check_sglang_version()
    config = get_config()
    module, cls = BACKEND_CLASSES[name].split(":")
    return getattr(importlib.import_module(module), cls)(model_runner, config)


def create_dense_backend(model_runner):
    """``ATTENTION_BACKENDS["longseq_dense"]`` factory: ``fn(model_runner) -> AttentionBackend``, one of SGLang's
    own backends wrapped (see :func:`create_backend`)."""
    return create_backend(DENSE_BACKEND, model_runner)


def create_sparse_backend(model_runner):
    """``ATTENTION_BACKENDS["longseq_sparse"]`` factory: Quest sparse decode over a wrapped dense backend; SGLang's
    ``--page-size`` (and the model) must fit the sparse settings."""
    return create_backend(SPARSE_BACKEND, model_runner)


def create_duo_backend(model_runner):
    """``ATTENTION_BACKENDS["longseq_duo"]`` factory: DuoAttention (``LONGSEQ_DUO_*``) over a wrapped dense
    backend; the pattern must fit the model."""
    return create_backend(DUO_BACKEND, model_runner)


#: What :func:`register` puts in SGLang's registry (one named factory per backend: SGLang calls it with the
#: model runner only).
FACTORIES = {DENSE_BACKEND: create_dense_backend, SPARSE_BACKEND: create_sparse_backend,
             DUO_BACKEND: create_duo_backend}


#: SGLang's KDA (Kimi-Linear) linear-attention backend; its ``kernel_dispatcher`` picks the KDA kernels.
KDA_BACKEND_INIT = "sglang.srt.layers.attention.linear.kda_backend.KDAAttnBackend.__init__"
_kda_hooked = False


def _install_kda_kernels_after_init(result, backend, model_runner, *args, **kwargs) -> None:
    """``HookType.AFTER`` hook on ``KDAAttnBackend.__init__``: swap longseq's KDA kernels into the dispatcher it
    just built. Hooked there rather than on ``KDAKernelDispatcher.__init__`` because the backend sees the state
    pool, so unsupported shapes/dtypes stop the engine at start-up.

    Raises:
        LongSeqConfigError: a ``LONGSEQ_*`` setting is invalid, the model's KDA shapes/state dtype are not
            supported by our kernels, or the radix cache needs KDA state snapshots.
    """
    if not get_config().kda:
        return
    from longseq.attention_backends.sglang.kda import install_kda_kernels

    install_kda_kernels(backend.kernel_dispatcher, model_runner.req_to_token_pool.mamba_pool.mamba_cache.temporal,
                        state_tracking=_mamba_state_tracking())
    logger.info("longseq: KDA decode kernel -> longseq (LONGSEQ_KDA=1); extend and verify stay SGLang's")


def _mamba_state_tracking() -> bool:
    """Whether SGLang's hybrid radix cache snapshots KDA states during extends (resolved server arguments)."""
    return mamba_extra_buffer_enabled()


def _register_kda_hook() -> None:
    """Under ``LONGSEQ_KDA=1`` (or a config that does not parse: the hook then raises its error at start-up of a
    KDA model), hook SGLang's KDA backend so it runs our kernels. ``load_plugins`` applies the hook."""
    global _kda_hooked
    try:
        wanted = get_config().kda
    except LongSeqConfigError:
        wanted = True
    if wanted and not _kda_hooked:
        from sglang.srt.plugins.hook_registry import HookRegistry, HookType

        HookRegistry.register(KDA_BACKEND_INIT, _install_kda_kernels_after_init, HookType.AFTER)
        _kda_hooked = True


def register() -> None:
    """Register ``longseq_dense``, ``longseq_sparse`` and ``longseq_duo`` with SGLang's attention registry and
    CLI choices, and (``LONGSEQ_KDA=1``) longseq's KDA kernels through a hook on SGLang's KDA backend.

    Safe to call repeatedly."""
    global _checked
    if not _checked:
        _checked = True
        try:
            check_sglang_version()
            get_config()  # validate LONGSEQ_* early so a typo shows in the front-end log
        except (LongSeqVersionError, LongSeqConfigError) as e:  # still register: the factory raises it again
            logger.error("longseq: %s; --attention-backend %s will fail (and so will %s)", e, DENSE_BACKEND,
                         ", ".join(name for name in FACTORIES if name != DENSE_BACKEND))
    from sglang.srt.layers.attention.attention_registry import register_attention_backend

    for name, factory in FACTORIES.items():
        register_attention_backend(name)(factory)
        add_attention_backend_choice(name)
    _register_kda_hook()
