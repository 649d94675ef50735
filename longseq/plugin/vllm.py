"""vLLM general plugin: ``vllm.general_plugins`` entry point ``longseq = longseq.plugin.vllm:register``.

vLLM calls :func:`register` in every process (front end, engine core, workers), so it is idempotent and
imports only vLLM's backend registry: the backend classes are given as import paths and loaded by vLLM
where they are used.

Usage:  ``LONGSEQ_ATTENTION=dense vllm serve MODEL --attention-backend CUSTOM``  (GPU)
        ``LONGSEQ_KDA=1 vllm serve moonshotai/Kimi-Linear-48B-A3B-Instruct``  (Kimi-Linear on longseq's KDA kernels)
        ``LONGSEQ_CPU=1 LONGSEQ_ATTENTION=dense python -m vllm.entrypoints.openai.api_server ...``  (CPU)
"""

from __future__ import annotations

import logging

from longseq.config import get_config
from longseq.versions import check_vllm_version

logger = logging.getLogger("longseq")

#: Import paths vLLM resolves lazily (see vllm/v1/attention/backends/registry.py).
GPU_BACKEND_PATH = "longseq.attention_backends.vllm.flash.LongSeqFlashBackend"
CPU_BACKEND_PATH = "longseq.attention_backends.vllm.cpu.LongSeqCPUBackend"
#: KV offload connector (``longseq.kv_offload.vllm``), registered under its class name.
KV_CONNECTOR_NAME, KV_CONNECTOR_MODULE = "LongSeqOffloadConnector", "longseq.kv_offload.vllm"

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
        from longseq.plugin.kda_compat import register_vllm_kda_layer

        register_vllm_kda_layer()
        _registered.add("KDA")
    if "KV_CONNECTOR" not in _registered:
        # --kv-transfer-config '{"kv_connector":"LongSeqOffloadConnector",...}' without a module path.
        from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

        if KV_CONNECTOR_NAME not in KVConnectorFactory._registry:  # the user may have registered it already
            KVConnectorFactory.register_connector(KV_CONNECTOR_NAME, KV_CONNECTOR_MODULE, KV_CONNECTOR_NAME)
        _registered.add("KV_CONNECTOR")
    logger.debug("longseq registered %s (technique %s)", sorted(_registered), config.attention)
