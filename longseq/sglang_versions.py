"""What differs between the SGLang versions longseq supports, behind one call each.

Supported: SGLang 0.5.15 (the build for torch 2.11, on the GPU machine) to 0.5.23 (CPU CI). Each helper
probes for the 0.5.23 form of an API (``hasattr`` on an SGLang module, class or model runner, or an import
that fails) and otherwise uses the 0.5.15 form, so the adapters make one call whatever the version. Probes are
written as ``if hasattr(...): ... else: ...`` so the conformance test can tell which code each version
reaches. SGLang is imported inside the helpers: the plugin imports this module at registration, in every
SGLang process.

``tests/sglang/test_sglang0515_conformance.py`` evaluates every probe here statically against the 0.5.15
wheel and the installed SGLang, and checks that the branch each version takes calls what that version has.
"""

from __future__ import annotations

from packaging.version import Version

SGLANG_MIN, SGLANG_MAX = Version("0.5.15"), Version("0.5.23")  # both ends inclusive


def sglang_version_supported(version: str) -> bool:
    """Whether ``version`` (post/dev/local suffixes ignored) is within ``SGLANG_MIN..SGLANG_MAX``."""
    return SGLANG_MIN <= Version(Version(version).base_version) <= SGLANG_MAX


def add_attention_backend_choice(name: str) -> None:
    """Add ``name`` (once) to the list argparse takes ``--attention-backend``, ``--prefill-attention-backend``
    and ``--decode-attention-backend`` choices from (the same list object, so a later parse accepts it)."""
    try:
        from sglang.srt.arg_groups.choices import ATTENTION_BACKEND_CHOICES, add_attention_backend_choices
    except ImportError:  # 0.5.15 keeps the choices in server_args
        from sglang.srt.server_args import ATTENTION_BACKEND_CHOICES, add_attention_backend_choices
    if name not in ATTENTION_BACKEND_CHOICES:
        add_attention_backend_choices([name])


def kv_write_loc(forward_batch, layer):
    """The ``KVWriteLoc`` SGLang's own backends pass to ``set_kv_buffer`` for ``layer``'s keys and values of
    this step: the batch's ``out_cache_loc`` (``encoder_out_cache_loc`` for a cross-attention layer)."""
    from sglang.srt.mem_cache.memory_pool import KVWriteLoc

    if hasattr(KVWriteLoc, "for_layer"):  # 0.5.23: also carries the batch's physical-slot mark
        return KVWriteLoc.for_layer(forward_batch, layer)
    else:  # 0.5.15: what its torch_native and triton backends build
        loc = forward_batch.encoder_out_cache_loc if layer.is_cross_attention else forward_batch.out_cache_loc
        return KVWriteLoc(loc)


def kv_cache_dtype_name(model_runner) -> str:
    """The runner's resolved ``--kv-cache-dtype`` (``"auto"`` for the model's dtype, else e.g. ``"fp8_e4m3"``)."""
    if hasattr(model_runner, "kv_cache_dtype_str"):  # 0.5.23: set when the runner resolves the KV dtype
        return model_runner.kv_cache_dtype_str
    else:  # 0.5.15 keeps only the resolved torch dtype
        dtype = model_runner.kv_cache_dtype
        return "auto" if dtype == model_runner.dtype else str(dtype).removeprefix("torch.")


def mamba_extra_buffer_enabled() -> bool:
    """Whether SGLang's hybrid radix cache keeps extra Mamba/KDA state buffers (resolved server arguments)."""
    from sglang.srt import runtime_context

    if hasattr(runtime_context, "get_exec"):  # 0.5.23: resolved config namespaces
        return bool(runtime_context.get_exec().mamba.enable_mamba_extra_buffer)
    else:  # 0.5.15: a ServerArgs method
        return bool(runtime_context.get_server_args().enable_mamba_extra_buffer())


def hicache_dcp(storage_config) -> tuple[int, int, int | None]:
    """``(dcp_size, dcp_rank, logical_page_size)`` of a ``HiCacheStorageConfig``; ``(1, 0, None)`` where SGLang's
    HiCache has no decode context parallelism (0.5.15)."""
    from sglang.srt.mem_cache.hicache_storage import HiCacheStorageConfig

    if hasattr(HiCacheStorageConfig, "dcp_size"):  # 0.5.23 (a defaulted dataclass field)
        return storage_config.dcp_size, storage_config.dcp_rank, storage_config.logical_page_size
    else:
        return 1, 0, None


def hicache_is_storage_writer(storage_config) -> bool:
    """Whether this rank writes shared storage copies: every rank of a non-MLA model, one rank of MLA ones."""
    from sglang.srt.mem_cache.hicache_storage import HiCacheStorageConfig

    if hasattr(HiCacheStorageConfig, "is_storage_writer"):  # 0.5.23 (a property)
        return bool(storage_config.is_storage_writer)
    else:  # 0.5.15: HiCacheController backs MLA pages up on TP rank 0 only (its backup_skip)
        return not storage_config.is_mla_model or storage_config.tp_rank == 0
