"""The SGLang 0.5.15 branches of ``longseq/sglang_versions.py``, run on the installed 0.5.23 with the
probed 0.5.23 API taken away (``test_sglang0515_conformance.py`` checks statically that 0.5.15 has what these
branches call; this file checks what they compute). The 0.5.23 branches run in every other SGLang test."""

from __future__ import annotations

import dataclasses
import sys
from types import SimpleNamespace

import pytest
import torch

from longseq import sglang_versions as sglang_compat

pytestmark = pytest.mark.sglang


@dataclasses.dataclass
class KVWriteLoc0515:
    """0.5.15's ``KVWriteLoc``: the same fields, no ``for_layer``/``for_batch`` constructors."""

    loc: torch.Tensor
    swa_loc: torch.Tensor | None = None
    full_loc: torch.Tensor | None = None


@dataclasses.dataclass
class HiCacheStorageConfig0515:
    """0.5.15's ``HiCacheStorageConfig`` fields that matter here: no DCP fields, no ``is_storage_writer``."""

    tp_rank: int
    tp_size: int
    is_mla_model: bool


@pytest.mark.parametrize("cross", [False, True])
def test_kv_write_loc_without_for_layer(cross, monkeypatch):
    from sglang.srt.mem_cache import memory_pool

    monkeypatch.setattr(memory_pool, "KVWriteLoc", KVWriteLoc0515)
    batch = SimpleNamespace(out_cache_loc=torch.arange(3), encoder_out_cache_loc=torch.arange(5, 7))
    loc = sglang_compat.kv_write_loc(batch, SimpleNamespace(is_cross_attention=cross))
    assert isinstance(loc, KVWriteLoc0515) and loc.swa_loc is None and loc.full_loc is None
    assert loc.loc is (batch.encoder_out_cache_loc if cross else batch.out_cache_loc)


def test_kv_write_loc_for_layer_on_installed():
    from sglang.srt.mem_cache.memory_pool import KVWriteLoc

    batch = SimpleNamespace(out_cache_loc=torch.arange(3), out_cache_loc_is_physical=True)
    loc = sglang_compat.kv_write_loc(batch, SimpleNamespace(is_cross_attention=False))
    assert isinstance(loc, KVWriteLoc) and loc.loc is batch.out_cache_loc and loc.physical


@pytest.mark.parametrize("kv_dtype, expected", [(torch.bfloat16, "auto"), (torch.float8_e4m3fn, "float8_e4m3fn")])
def test_kv_cache_dtype_name_from_torch_dtype(kv_dtype, expected):
    runner = SimpleNamespace(kv_cache_dtype=kv_dtype, dtype=torch.bfloat16)  # 0.5.15: no kv_cache_dtype_str
    assert sglang_compat.kv_cache_dtype_name(runner) == expected
    assert sglang_compat.kv_cache_dtype_name(SimpleNamespace(kv_cache_dtype_str="fp8_e4m3")) == "fp8_e4m3"


@pytest.mark.parametrize("enabled", [False, True])
def test_mamba_extra_buffer_from_server_args(enabled, monkeypatch):
    from sglang.srt import runtime_context

    monkeypatch.delattr(runtime_context, "get_exec")
    args = SimpleNamespace(enable_mamba_extra_buffer=lambda: enabled)  # 0.5.15: a ServerArgs method
    monkeypatch.setattr(runtime_context, "get_server_args", lambda: args)
    assert sglang_compat.mamba_extra_buffer_enabled() is enabled


@pytest.mark.parametrize("mla, tp_rank, writer", [(False, 1, True), (True, 0, True), (True, 1, False)])
def test_hicache_config_without_dcp(mla, tp_rank, writer, monkeypatch):
    from sglang.srt.mem_cache import hicache_storage

    monkeypatch.setattr(hicache_storage, "HiCacheStorageConfig", HiCacheStorageConfig0515)
    cfg = HiCacheStorageConfig0515(tp_rank=tp_rank, tp_size=2, is_mla_model=mla)
    assert sglang_compat.hicache_dcp(cfg) == (1, 0, None)
    assert sglang_compat.hicache_is_storage_writer(cfg) is writer


def test_attention_backend_choice_through_server_args(monkeypatch):
    from sglang.srt.server_args import ATTENTION_BACKEND_CHOICES  # 0.5.23 re-exports the same list here

    monkeypatch.setitem(sys.modules, "sglang.srt.arg_groups.choices", None)  # its import now fails
    name = "longseq_compat_probe"
    try:
        sglang_compat.add_attention_backend_choice(name)
        sglang_compat.add_attention_backend_choice(name)
        assert ATTENTION_BACKEND_CHOICES.count(name) == 1
    finally:
        while name in ATTENTION_BACKEND_CHOICES:
            ATTENTION_BACKEND_CHOICES.remove(name)
