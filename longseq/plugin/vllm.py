"""vLLM general plugin: ``vllm.general_plugins`` entry point ``longseq = longseq.plugin.vllm:register``.

vLLM calls :func:`register` in every process (front end, engine core, workers), so it is idempotent and
imports only vLLM's backend registry: the backend classes are given as import paths and loaded by vLLM
where they are used. The KDA layer (``LONGSEQ_KDA=1``) is registered lazily, see :func:`register_vllm_kda_layer`.

Usage:  ``LONGSEQ_ATTENTION=dense vllm serve MODEL --attention-backend CUSTOM``  (GPU)
        ``LONGSEQ_KDA=1 vllm serve moonshotai/Kimi-Linear-48B-A3B-Instruct``  (Kimi-Linear on longseq's KDA kernels)
        ``LONGSEQ_CPU=1 LONGSEQ_ATTENTION=dense python -m vllm.entrypoints.openai.api_server ...``  (CPU)
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import logging
import sys
import types
from collections.abc import Callable, Mapping
from typing import Any

from longseq.config import get_config
from longseq.versions import LongSeqVersionError, check_vllm_version, vllm_kda_layer_api

logger = logging.getLogger("longseq")

#: Import paths vLLM resolves lazily (see vllm/v1/attention/backends/registry.py).
GPU_BACKEND_PATH = "longseq.attention_backends.vllm.flash.LongSeqFlashBackend"
CPU_BACKEND_PATH = "longseq.attention_backends.vllm.cpu.LongSeqCPUBackend"
#: KV offload connector (``longseq.kv_offload.vllm``), registered under its class name.
KV_CONNECTOR_NAME, KV_CONNECTOR_MODULE = "LongSeqOffloadConnector", "longseq.kv_offload.vllm"
#: Kimi-Linear's KDA layer (``LONGSEQ_KDA=1``): vLLM's module and class (its out-of-tree registry key) and ours.
VLLM_KDA_LAYER_MODULE = "vllm.model_executor.layers.mamba.gdn.kimi_gdn_linear_attn"
VLLM_KDA_LAYER_CLASS = "KimiGatedDeltaNetAttention"
OUR_KDA_LAYER = "longseq.attention_backends.vllm.kda.LongSeqKimiDeltaAttention"

#: ``LONGSEQ_DUO_MEMORY=1``: vLLM's model class (module, class) -> ours in
#: ``longseq.attention_backends.vllm.duo_memory_models``. Every architecture name vLLM resolves to one of these
#: classes (``LlamaForCausalLM``, ``LlamaModel``, ``MistralModel``, ...) gets ours.
DUO_MEMORY_MODELS = {("vllm.model_executor.models.llama", "LlamaForCausalLM"): "DuoSplitLlamaForCausalLM",
                     ("vllm.model_executor.models.qwen2", "Qwen2ForCausalLM"): "DuoSplitQwen2ForCausalLM"}
DUO_MEMORY_MODULE = "longseq.attention_backends.vllm.duo_memory_models"

_registered: set[str] = set()


def register() -> None:
    """Register longseq's attention backend(s) with vLLM. Safe to call any number of times.

    Raises:
        LongSeqConfigError: a ``LONGSEQ_*`` setting is invalid (vLLM then stops at start-up).
        LongSeqVersionError: the installed vLLM is outside the supported range.
    """
    config = get_config()  # validates LONGSEQ_* now, so a typo stops the engine before it loads a model
    check_vllm_version()
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    if "CUSTOM" not in _registered:
        register_backend(AttentionBackendEnum.CUSTOM, GPU_BACKEND_PATH)
        _registered.add("CUSTOM")
    if config.cpu_override and "CPU_ATTN" not in _registered:
        # The CPU platform ignores --attention-backend and always resolves CPU_ATTN through the
        # registry's overrides, so overriding that member is how the CPU engine runs our backend.
        register_backend(AttentionBackendEnum.CPU_ATTN, CPU_BACKEND_PATH)
        _registered.add("CPU_ATTN")
    if config.kda and "KDA" not in _registered:
        # Kimi-Linear's KDA layer -> ours, through vLLM's out-of-tree layer registry. Deferred until vLLM's
        # layer module is imported (only processes that build the model pay for that import).
        register_vllm_kda_layer()
        _registered.add("KDA")
    if config.duo_memory and "DUO_MEMORY" not in _registered:
        # Llama/Qwen2 models whose attention layers split into retrieval and streaming sublayers, under every
        # architecture name vLLM maps to those classes (it resolves the class path lazily, in the processes that
        # build the model).
        from vllm import ModelRegistry

        for arch, cls in duo_memory_architectures(ModelRegistry.models).items():
            ModelRegistry.register_model(arch, f"{DUO_MEMORY_MODULE}:{cls}")
        _registered.add("DUO_MEMORY")
    if "KV_CONNECTOR" not in _registered:
        # --kv-transfer-config '{"kv_connector":"LongSeqOffloadConnector",...}' without a module path.
        from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

        if KV_CONNECTOR_NAME not in KVConnectorFactory._registry:  # the user may have registered it already
            KVConnectorFactory.register_connector(KV_CONNECTOR_NAME, KV_CONNECTOR_MODULE, KV_CONNECTOR_NAME)
        _registered.add("KV_CONNECTOR")
    logger.debug("longseq registered %s (technique %s)", sorted(_registered), config.attention)


def duo_memory_architectures(models: Mapping[str, Any]) -> dict[str, str]:
    """Architecture name -> our split class name, for every entry of vLLM's model registry (``ModelRegistry.models``)
    that vLLM resolves to a class of :data:`DUO_MEMORY_MODELS` (aliases such as ``LlamaModel`` differ by version)."""
    found = {}
    for arch, entry in models.items():
        key = (getattr(entry, "module_name", None), getattr(entry, "class_name", None))
        if key in DUO_MEMORY_MODELS:
            found[arch] = DUO_MEMORY_MODELS[key]
    return found


# ------------------------------------------------------------------------------- KDA layer, lazy registration
# How the swap is installed: ``KimiGatedDeltaNetAttention.register_oot(LongSeqKimiDeltaAttention)``, vLLM's
# supported out-of-tree layer replacement (a ``PluggableLayer`` builds the registered subclass wherever the model
# builds the original; vLLM 0.26 .. 0.33). Why not the alternatives: re-registering the model architecture
# (``ModelRegistry``) means copying a model whose module moved between 0.26 and 0.32; replacing the GDN metadata
# backend changes every GDN model (Qwen3-Next too) and not the kernels; rebinding Triton kernels by name
# (``vllm.triton_utils.dispatcher``, 0.32+ only) is monkeypatching.
#
# Registration is lazy: subclassing needs vLLM's layer module, whose import costs seconds (Triton, FLA), and
# vLLM calls the plugin in every process. :func:`register_vllm_kda_layer` therefore registers at once when that
# module is already imported, else installs an import hook that registers right after the module is first
# executed, i.e. in the processes that build a Kimi-Linear model and before any layer is built.
def install_vllm_kda_layer(layer_module: types.ModuleType | None = None) -> type:
    """``register_oot`` our subclass for vLLM's KDA layer now (idempotent). Returns the registered class.

    Raises:
        LongSeqVersionError: the layer's ``_forward`` has a layout longseq does not know, or another plugin
            already replaced the layer.
    """
    from vllm.model_executor.custom_op import op_registry_oot

    module = layer_module or importlib.import_module(VLLM_KDA_LAYER_MODULE)
    base = getattr(module, VLLM_KDA_LAYER_CLASS)
    current = op_registry_oot.get(VLLM_KDA_LAYER_CLASS)
    if current is not None:
        if f"{current.__module__}.{current.__qualname__}" == OUR_KDA_LAYER:
            return current
        raise LongSeqVersionError(
            f"LONGSEQ_KDA=1: {VLLM_KDA_LAYER_CLASS} is already replaced by {current.__module__}."
            f"{current.__qualname__} (another plugin); unset LONGSEQ_KDA or that plugin")
    vllm_kda_layer_api(base)  # fail here, at start-up, on an unknown layout
    from longseq.attention_backends.vllm.kda import LongSeqKimiDeltaAttention

    base.register_oot(LongSeqKimiDeltaAttention)
    return LongSeqKimiDeltaAttention


class _AfterImportHook(importlib.abc.MetaPathFinder):
    """Runs ``callback(module)`` right after the module ``name`` is first executed (one-shot)."""

    def __init__(self, name: str, callback: Callable[[types.ModuleType], object]):
        self.name, self.callback = name, callback

    def find_spec(self, fullname, path, target=None):
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)  # one-shot, and keeps find_spec below from finding us again
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        spec.loader = _CallbackLoader(spec.loader, self.callback)
        return spec


class _CallbackLoader(importlib.abc.Loader):
    def __init__(self, loader, callback):
        self._loader, self._callback = loader, callback

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        self._callback(module)

    def __getattr__(self, name):  # get_source, get_filename, ... for tracebacks and inspect
        return getattr(self._loader, name)


def register_vllm_kda_layer() -> str:
    """Install our KDA layer now if vLLM's layer module is loaded, else right after it loads. Idempotent.

    Returns ``"registered"`` or ``"deferred"`` (an import hook is waiting for the module).
    """
    if VLLM_KDA_LAYER_MODULE in sys.modules:
        install_vllm_kda_layer(sys.modules[VLLM_KDA_LAYER_MODULE])
        return "registered"
    if not any(isinstance(f, _AfterImportHook) and f.name == VLLM_KDA_LAYER_MODULE for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterImportHook(VLLM_KDA_LAYER_MODULE, install_vllm_kda_layer))
    return "deferred"
