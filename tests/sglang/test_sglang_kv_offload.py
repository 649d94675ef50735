"""longseq's SGLang HiCache storage backend (``longseq.kv_offload.sglang``) at its interface, on CPU.

HiCache's data path needs CUDA, so (as SGLang's own storage-backend tests do, e.g.
``storage/tensorcast_store/test_tensorcast_store.py``) the host KV pool is a real SGLang pool class built
with ``object.__new__`` and CPU tensors; the backend is built by SGLang's own factory
(``StorageBackendFactory.create_backend("dynamic", ...)``) exactly as ``--hicache-storage-backend dynamic``
does. Run: ``.venv-sglang/bin/python -m pytest tests/sglang/test_sglang_kv_offload.py -m sglang -q``.
"""

from __future__ import annotations

import glob
import os

import pytest
import torch

pytestmark = pytest.mark.sglang

PAGE_SIZE, PAGE_NUM, LAYERS, HEADS, HEAD_DIM = 4, 8, 3, 2, 8


def _extra(tmp_path, **over):
    cfg = {"backend_name": "longseq", "module_path": "longseq.kv_offload.sglang",
           "class_name": "LongSeqHiCacheStorage", "interface_v1": 1,
           "cpu_gib": 0.001, "disk_dir": str(tmp_path / "kv"), "disk_gib": 0.05}
    cfg.update(over)
    return {k: v for k, v in cfg.items() if v is not None}


def _storage_config(extra, *, mla=False, tp_rank=0, tp_size=1, model="test-org/tiny-model"):
    from sglang.srt.mem_cache.hicache_storage import HiCacheStorageConfig

    return HiCacheStorageConfig(tp_rank=tp_rank, tp_size=tp_size, pp_rank=0, pp_size=1, attn_cp_rank=0,
                                attn_cp_size=1, is_mla_model=mla, enable_storage_metrics=False,
                                is_page_first_layout=True, model_name=model, extra_config=dict(extra))


def _pool(family="mha", layout="page_first", dtype=torch.bfloat16, seed=0):
    """A real SGLang host pool class with CPU tensors, filled with random values."""
    from sglang.srt.mem_cache.pool_host.mha import MHATokenToKVPoolHost
    from sglang.srt.mem_cache.pool_host.mla import MLATokenToKVPoolHost

    size = PAGE_NUM * PAGE_SIZE
    g = torch.Generator().manual_seed(seed)
    if family == "mha":
        pool = object.__new__(MHATokenToKVPoolHost)
        shape = (2, size, LAYERS, HEADS, HEAD_DIM) if layout == "page_first" else (2, LAYERS, size, HEADS, HEAD_DIM)
        pool.head_dim = HEAD_DIM
        pool.head_num = HEADS
    else:
        pool = object.__new__(MLATokenToKVPoolHost)
        shape = (size, LAYERS, 1, HEAD_DIM)
        pool.kv_cache_dim = HEAD_DIM
        pool.kv_lora_rank, pool.qk_rope_head_dim = HEAD_DIM - 2, 2
        pool.head_num = 1
        pool.dcp_size, pool.dcp_rank = 1, 0
    pool.kv_buffer = torch.randn(shape, generator=g).to(dtype)
    pool.layout, pool.page_size, pool.page_num, pool.size = layout, PAGE_SIZE, PAGE_NUM, size
    pool.layer_num, pool.dtype, pool.device, pool.pin_memory = LAYERS, dtype, "cpu", False
    return pool


def _backend(extra, pool, **cfg):
    from sglang.srt.mem_cache.storage.backend_factory import StorageBackendFactory

    backend = StorageBackendFactory.create_backend("dynamic", _storage_config(extra, **cfg), pool)
    backend.register_mem_pool_host(pool)  # what HiCacheController does right after create_backend
    return backend


def _indices(pages):
    return torch.cat([torch.arange(p * PAGE_SIZE, (p + 1) * PAGE_SIZE) for p in pages])


def _page(pool, p):
    return pool.get_data_page(p * PAGE_SIZE, flat=True).clone()


@pytest.mark.parametrize("family,layout", [("mha", "page_first"), ("mha", "layer_first"), ("mla", "page_first")])
def test_v1_roundtrip_prefix_and_new_server(tmp_path, family, layout):
    from longseq.kv_offload.sglang import LongSeqHiCacheStorage

    src = _pool(family, layout, seed=1)
    backend = _backend(_extra(tmp_path), src, mla=family == "mla")
    assert isinstance(backend, LongSeqHiCacheStorage)
    keys = [f"{i:064x}" for i in range(1, 5)]
    chunks = backend._page_chunks(_indices([0, 1]), 2)  # the zero-copy path: views into the pool itself
    pieces = {("mha", "page_first"): 2, ("mha", "layer_first"): 2 * LAYERS, ("mla", "page_first"): 1}
    assert chunks is not None and len(chunks[0]) == pieces[family, layout]
    assert backend.batch_set_v1(keys, _indices([0, 1, 2, 3])) == [True] * 4
    assert backend.batch_exists(keys + ["ff" * 32]) == 4
    assert backend.batch_exists(["ff" * 32] + keys) == 0

    dst = _pool(family, layout, seed=2)  # different contents, so a no-op read would show
    backend.register_mem_pool_host(dst)
    assert backend.batch_get_v1(keys[:3], _indices([5, 6, 7])) == [True] * 3
    for a, b in ((0, 5), (1, 6), (2, 7)):
        assert torch.equal(_page(dst, b), _page(src, a))
    backend.store.flush()
    backend.close()

    # A fresh backend on the same directory (a restarted or second server) finds the pages on disk.
    dst2 = _pool(family, layout, seed=3)
    fresh = _backend(_extra(tmp_path), dst2, mla=family == "mla")
    assert fresh.batch_exists(keys) == 4
    got = fresh.batch_get_v1([keys[3], "ee" * 32, keys[0]], _indices([1, 2, 3]))
    assert got == [True, False, False]  # stops at the first miss
    assert torch.equal(_page(dst2, 1), _page(src, 3))
    assert fresh.store.stats().disk.hits == 1
    fresh.close()


def test_dram_tier_is_pageable_even_with_cuda(tmp_path, monkeypatch):
    """Our tier only swaps bytes with SGLang's pinned host pool (CPU to CPU), so it must not pin: on a GPU machine
    the store's default would pin, and each lazy cudaHostAlloc stalls the engine while serving."""
    import longseq.kv_offload.store as store_mod

    monkeypatch.setattr(store_mod, "default_pin_memory", lambda: True)  # what a CUDA machine would say
    backend = _backend(_extra(tmp_path), _pool("mha", "page_first", seed=1))
    assert backend.store.pin_memory is False and backend.store._dram.allocator.pin_memory is False
    backend.close()


def test_legacy_get_set_and_tp_ranks_are_separate(tmp_path):
    pool = _pool(seed=4)
    rank0 = _backend(_extra(tmp_path, interface_v1=None), pool, tp_rank=0, tp_size=2)
    rank1 = _backend(_extra(tmp_path, interface_v1=None), pool, tp_rank=1, tp_size=2)
    assert rank0.batch_set(["aa", "bb"], [_page(pool, 0), _page(pool, 1)])
    out = pool.get_dummy_flat_data_page()
    assert torch.equal(rank0.get("bb", out), _page(pool, 1))
    assert rank0.exists("aa") and not rank1.exists("aa")  # each TP rank stores its own heads
    rank0.store.flush()
    assert rank1.batch_get(["aa"], [pool.get_dummy_flat_data_page()]) == [None]
    rank0.close()
    rank1.close()


def test_unknown_extra_config_key_is_a_clear_error(tmp_path):
    from longseq.kv_offload.sglang import LongSeqHiCacheStorage

    with pytest.raises(ValueError, match=r"unknown extra_config key\(s\) \['disk_size'\].*cpu_gib, disk_dir, disk_gib"):
        LongSeqHiCacheStorage(_storage_config(_extra(tmp_path, disk_size=3)))
    with pytest.raises(ValueError, match="cpu_gib must be a number"):
        LongSeqHiCacheStorage(_storage_config(_extra(tmp_path, cpu_gib="8")))
    with pytest.raises(ValueError, match="set cpu_gib > 0 and/or disk_dir"):
        LongSeqHiCacheStorage(_storage_config(_extra(tmp_path, cpu_gib=0, disk_dir=None)))


def test_write_queue_holds_a_long_prefix_burst(tmp_path):
    """SGLang backs up a whole prompt's pages in one burst after its prefill; disk writes queued beyond the
    write-behind queue are dropped, so the queue defaults to the DRAM tier's size (at least 1 GiB, as the vLLM
    connector's) and ``write_queue_gib`` sets it (a disk-only store for long prompts)."""
    from longseq.kv_offload.settings import KVConfigError

    gib = 1 << 30
    for extra, want in (({}, 1.0), ({"cpu_gib": 8}, 8.0), ({"cpu_gib": 0, "write_queue_gib": 6}, 6.0)):
        backend = _backend(_extra(tmp_path, **extra), _pool(seed=7))
        assert backend.store._max_pending_bytes == int(want * gib), extra
        backend.close()
    with pytest.raises(KVConfigError, match="write_queue_gib must be > 0"):
        _backend(_extra(tmp_path, write_queue_gib=0), _pool(seed=7))


def test_extra_config_follows_the_same_rules_as_the_vllm_connector(tmp_path, monkeypatch):
    """Infinity/NaN sizes, an empty or unexpandable disk_dir and a tier smaller than one page are refused at
    start-up with the setting named; ``~`` is expanded (an empty disk_dir used to write into the cwd)."""
    import json

    from longseq.kv_offload.sglang import LongSeqHiCacheStorage
    from longseq.kv_offload.settings import KVConfigError

    for name in ("cpu_gib", "disk_gib"):
        for bad in (float("inf"), float("nan"), json.loads('{"x": Infinity}')["x"]):
            with pytest.raises(KVConfigError, match=f"extra_config: {name} must be a number >= 0"):
                LongSeqHiCacheStorage(_storage_config(_extra(tmp_path, **{name: bad})))
    with pytest.raises(KVConfigError, match="disk_dir must be a non-empty path"):
        LongSeqHiCacheStorage(_storage_config(_extra(tmp_path, disk_dir="")))
    with pytest.raises(KVConfigError, match="disk_dir='~no-such-user-longseq': cannot expand"):
        LongSeqHiCacheStorage(_storage_config(_extra(tmp_path, disk_dir="~no-such-user-longseq")))
    with pytest.raises(KVConfigError, match="disk_gib must be > 0 when disk_dir is set"):
        LongSeqHiCacheStorage(_storage_config(_extra(tmp_path, disk_gib=0)))
    monkeypatch.setenv("HOME", str(tmp_path))
    backend = _backend(_extra(tmp_path, disk_dir="~/kvhome"), _pool(seed=7))
    assert backend.store._disk.root == str(tmp_path / "kvhome")
    backend.close()
    for name in ("cpu_gib", "disk_gib"):  # one page of the test pool is 768 bytes
        with pytest.raises(KVConfigError, match=f"extra_config: {name}=1e-07 is smaller than one KV block"):
            _backend(_extra(tmp_path, **{name: 1e-7}), _pool(seed=7))


def test_trust_settings_in_extra_config(tmp_path):
    """``shared_group`` and ``auth_key_file`` (issue 17) are validated like the vLLM connector's, naming the setting;
    with a key, pages are tagged on disk and a new backend with the same key reads them back, one without a tag
    (planted by a keyless store) is a miss."""
    import grp
    import stat

    from kv_fixtures import key_file
    from longseq.kv_offload import disk
    from longseq.kv_offload.sglang import LongSeqHiCacheStorage, parse_extra_config
    from longseq.kv_offload.settings import KVConfigError

    with pytest.raises(KVConfigError, match="extra_config: shared_group must be true, false or a group name"):
        LongSeqHiCacheStorage(_storage_config(_extra(tmp_path, shared_group=0)))
    with pytest.raises(KVConfigError, match="extra_config: auth_key_file=.* does not exist"):
        LongSeqHiCacheStorage(_storage_config(_extra(tmp_path, auth_key_file=str(tmp_path / "missing"))))
    with pytest.raises(KVConfigError, match="extra_config: auth_key_file=.* is empty"):
        LongSeqHiCacheStorage(_storage_config(_extra(tmp_path, auth_key_file=key_file(tmp_path / "empty", b""))))
    with pytest.raises(ValueError, match=r"unknown extra_config key\(s\) \['auth_key'\].*shared_group, auth_key_file"):
        LongSeqHiCacheStorage(_storage_config(_extra(tmp_path, auth_key="x")))
    group = grp.getgrgid(os.getegid()).gr_name
    assert parse_extra_config(_extra(tmp_path, shared_group=group))["shared_group"] == group
    keyed = _extra(tmp_path, cpu_gib=0, auth_key_file=key_file(tmp_path / "key"), shared_group=True)
    pool = _pool(seed=11)
    backend = _backend(keyed, pool)
    keys = [f"trust-{i}" for i in range(3)]
    assert all(backend.batch_set_v1(keys, _indices([0, 1, 2])))
    backend.store.flush()
    files = glob.glob(str(tmp_path / "kv" / "blocks" / "*" / "*" / "*.kvb"))
    assert len(files) == 3 and {stat.S_IMODE(os.stat(f).st_mode) for f in files} == {0o660}
    for f in files:
        with open(f, "rb") as fh:
            assert disk.HEADER.unpack(fh.read(disk.HEADER_SIZE))[1] == disk.TAGGED_VERSION
    backend.close()
    dst = _pool(seed=13)
    reader = _backend(keyed, dst)
    assert reader.batch_exists(keys) == 3
    assert all(reader.batch_get_v1(keys, _indices([5, 6, 7])))
    assert all(torch.equal(_page(dst, b), _page(pool, a)) for a, b in ((0, 5), (1, 6), (2, 7)))
    planted = _backend(_extra(tmp_path, cpu_gib=0), _pool(seed=12))  # no key: writes today's format
    assert all(planted.batch_set_v1(["planted"], _indices([0])))
    planted.close()
    assert reader.batch_exists(["planted"]) == 0 and reader.store.stats(log_summary=False).auth_failures == 1
    reader.close()


@pytest.mark.timeout(30)
def test_fifo_at_a_page_path_is_a_miss_not_a_hang(tmp_path):
    pool = _pool(seed=8)
    backend = _backend(_extra(tmp_path, cpu_gib=0), pool)
    path = backend.store._disk.path_for(b"fifo-page")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    os.mkfifo(path)
    assert not backend.exists("fifo-page") and backend.batch_exists(["fifo-page"]) == 0
    assert backend.get("fifo-page", pool.get_dummy_flat_data_page()) is None
    assert backend.batch_get_v1(["fifo-page"], _indices([0])) == [False]
    assert backend.store.stats().bad_files >= 4
    backend.close()


def _corrupt_truncate(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 7)


def _corrupt_flip(path):
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) - 100)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0x10]))


@pytest.mark.parametrize("fault", ["truncated", "flipped_byte", "other_model"])
def test_damaged_or_foreign_block_is_a_miss(tmp_path, fault):
    pool = _pool(seed=5)
    backend = _backend(_extra(tmp_path, cpu_gib=0), pool)  # disk only, so every read goes to the file
    backend.batch_set_v1(["k1"], _indices([0]))
    backend.store.flush()
    (path,) = glob.glob(str(tmp_path / "kv" / "blocks" / "*" / "*" / "*.kvb"))
    if fault == "truncated":
        _corrupt_truncate(path)
    elif fault == "flipped_byte":
        _corrupt_flip(path)
    else:  # another model's block for the same key, planted at our file name
        other = _backend(_extra(tmp_path, cpu_gib=0), pool, model="other-org/other-model")
        other.batch_set_v1(["k1"], _indices([0]))
        other.store.flush()
        other.close()
        (theirs,) = [p for p in glob.glob(str(tmp_path / "kv" / "blocks" / "*" / "*" / "*.kvb")) if p != path]
        os.replace(theirs, path)
    backend.register_mem_pool_host(_pool(seed=6))
    assert backend.batch_get_v1(["k1"], _indices([2])) == [False]  # SGLang never uses a slot reported False
    assert backend.store.stats().corrupt_blocks >= 1
    assert backend.batch_exists(["k1"]) == 0  # the bad file was removed
    backend.close()


@pytest.mark.parametrize("dram", [False, True])
def test_v1_reads_pages_on_several_threads_and_stops_at_a_damaged_one(tmp_path, dram):
    """``batch_get_v1`` reads a batch's pages on the store's read threads; the result is still the leading run of
    good pages, and a page that fails its check past it is never reported as loaded."""
    import threading

    src = _pool(seed=11)
    keys = [f"{i:064x}" for i in range(1, 5)]
    writer = _backend(_extra(tmp_path, cpu_gib=0), src)
    assert writer.batch_set_v1(keys, _indices([0, 1, 2, 3])) == [True] * 4
    writer.store.flush()
    writer.close()
    reader = _backend(_extra(tmp_path, cpu_gib=0.001 if dram else 0), _pool(seed=12))
    if dram:  # the first two pages come from the DRAM tier, the others from disk
        reader.batch_get_v1(keys[:2], _indices([6, 7]))
    _corrupt_flip(reader.store._disk.path_for(keys[2].encode()))
    threads = set()
    get = reader.store.get

    def recording_get(*args, **kwargs):
        threads.add(threading.current_thread().name)
        return get(*args, **kwargs)

    reader.store.get = recording_get
    dst = reader.mem_pool_host
    assert reader.batch_get_v1(keys, _indices([4, 5, 6, 7])) == [True, True, False, False]
    for a, b in ((0, 4), (1, 5)):
        assert torch.equal(_page(dst, b).view(torch.int16), _page(src, a).view(torch.int16))
    assert any(name.startswith("longseq-kv-read") for name in threads), threads
    assert reader.store.stats().corrupt_blocks == 1
    reader.close()


@pytest.mark.parametrize("how", ["dir_under_a_file", "eacces"])
def test_unwritable_dir_serves_from_dram(tmp_path, monkeypatch, how):
    """Disk writes fail; the backend keeps answering from its DRAM tier and counts the errors.
    ``dir_under_a_file`` is a real OS failure (ENOTDIR) that holds even as root; ``eacces`` simulates a
    permission error by patching the writer (chmod does not stop root, and tests may run as root)."""
    import errno

    from longseq.kv_offload import disk

    if how == "eacces":
        def deny(*a, **k):
            raise PermissionError(errno.EACCES, "Permission denied (simulated)")

        monkeypatch.setattr(disk, "write_atomic", deny)
        extra = _extra(tmp_path)
    else:
        (tmp_path / "afile").write_text("not a directory")
        extra = _extra(tmp_path, disk_dir=str(tmp_path / "afile" / "kv"))
    src = _pool(seed=7)
    backend = _backend(extra, src)
    assert backend.batch_set_v1(["a"], _indices([0])) == [True]
    backend.store.flush()
    assert backend.store.stats().write_errors >= 1
    assert backend.batch_get_v1(["a"], _indices([3])) == [True]  # DRAM hit into another slot
    assert torch.equal(_page(src, 3), _page(src, 0))
    fresh = _backend(extra, _pool(seed=8))  # nothing reached the disk
    assert fresh.batch_exists(["a"]) == 0
    backend.close()
    fresh.close()


def test_hybrid_side_pools_are_refused_at_attach(tmp_path):
    pool = _pool(seed=9)
    backend = _backend(_extra(tmp_path), pool)
    backend.register_mem_host_pool_v2(pool, "kv")  # the KV pool alone is fine
    with pytest.raises(ValueError, match=r"KV pool only.*\['mamba'\].*v2 interface"):
        backend.register_mem_host_pool_v2(pool, "mamba")
    backend.close()


def test_sglang_controller_page_functions_drive_the_backend(tmp_path):
    """SGLang's own HiCacheController data-path functions (the zero-copy pair chosen with interface_v1=1,
    and the legacy pair otherwise), called on a stand-in controller that holds our backend and a CPU pool."""
    from types import SimpleNamespace

    from sglang.srt.managers.cache_controller import HiCacheController as C

    src, dst = _pool(seed=10), _pool(seed=11)
    backend = _backend(_extra(tmp_path), src)
    ctrl = SimpleNamespace(storage_backend=backend, storage_host_pool=src, page_size=PAGE_SIZE)
    op = SimpleNamespace(request_id="r1", is_terminated=lambda: False)
    keys = [f"{i:064x}" for i in range(20, 24)]
    assert C._page_set_zero_copy(ctrl, keys[:2], _indices([0, 1]))
    assert C._generic_page_set(ctrl, keys[2:], _indices([2, 3]))
    backend.register_mem_pool_host(dst)
    ctrl.storage_host_pool = dst
    assert C._page_get_zero_copy(ctrl, op, keys[2:] + ["dd" * 32], _indices([4, 5, 6])) == 2
    assert C._generic_page_get(ctrl, op, keys[:2], _indices([6, 7])) == 2
    for s, d in ((2, 4), (3, 5), (0, 6), (1, 7)):
        assert torch.equal(_page(dst, d), _page(src, s))
    backend.close()


def test_mla_tp_ranks_share_the_writer_disk_copy(tmp_path):
    from longseq.kv_offload.sglang import LongSeqHiCacheStorage

    pool = _pool("mla", seed=12)
    writer = _backend(_extra(tmp_path), pool, mla=True, tp_rank=0, tp_size=2)
    replica = _backend(_extra(tmp_path), _pool("mla", seed=13), mla=True, tp_rank=1, tp_size=2)
    assert writer.fingerprint == replica.fingerprint  # MLA KV is replicated: one shared copy on disk
    assert writer.is_storage_writer and not replica.is_storage_writer
    writer.batch_set_v1(["m1"], _indices([0]))
    writer.store.flush()
    assert replica.batch_exists(["m1"]) == 1 and replica.batch_get_v1(["m1"], _indices([1])) == [True]
    assert torch.equal(_page(replica.mem_pool_host, 1), _page(pool, 0))
    replica.batch_set_v1(["m2"], _indices([2]))  # SGLang skips this on replicas; if called, DRAM only
    replica.store.flush()
    assert replica.batch_exists(["m2"]) == 1 and writer.batch_exists(["m2"]) == 0
    for b in (writer, replica):
        b.close()
    with pytest.raises(ValueError, match="MLA model with TP > 1 needs disk_dir"):
        LongSeqHiCacheStorage(_storage_config(_extra(tmp_path, disk_dir=None), mla=True, tp_size=2))


def test_two_backends_share_pages_through_the_remote_store(tmp_path):
    """Two HiCache backends with separate empty DRAM and disk tiers (two SGLang servers) share pages through one
    Mooncake master on loopback: B reads A's pages exactly; a remote config error names its key."""
    from longseq.kv_offload.mooncake_local import LocalMaster
    from longseq.kv_offload.settings import KVConfigError

    with pytest.raises(KVConfigError, match=r"extra_config: remote\.kind must be one of \['mooncake'\]"):
        _backend(_extra(tmp_path, remote={"kind": "redis", "master": "127.0.0.1:1"}), _pool(seed=1))
    master = LocalMaster(tmp_path)
    master.start()
    backends = []
    try:
        remote = {"kind": "mooncake", "master": master.address, "segment_gib": 1 / 64, "buffer_gib": 1 / 64,
                  "timeout_s": 1.0}
        src = _pool(seed=1)
        a = _backend(_extra(tmp_path, disk_dir=str(tmp_path / "a"), remote=remote), src)
        backends.append(a)
        keys = [f"{i:064x}" for i in range(1, 5)]
        assert a.batch_set_v1(keys, _indices([0, 1, 2, 3])) == [True] * 4
        a.store.flush(10)
        dst = _pool(seed=2)
        b = _backend(_extra(tmp_path, disk_dir=str(tmp_path / "b"), remote=remote), dst)
        backends.append(b)
        assert b.batch_exists(keys + ["ff" * 32]) == 4
        assert b.batch_get_v1(keys, _indices([4, 5, 6, 7])) == [True] * 4
        for i in range(4):
            assert torch.equal(_page(dst, 4 + i), _page(src, i))
        s = b.store.stats()
        assert s.remote.hits == 4 and s.disk.hits == 0 and s.remote_failed_checks == 0
    finally:
        for backend in backends:
            backend.close()
        master.stop()
