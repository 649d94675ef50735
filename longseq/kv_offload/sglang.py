"""SGLang HiCache storage backend (L3) over the longseq block store.

Load it with (SGLang 0.5.15 to 0.5.23)::

    --enable-hierarchical-cache --hicache-storage-backend dynamic
    --hicache-storage-backend-extra-config '{"backend_name": "longseq",
        "module_path": "longseq.kv_offload.sglang", "class_name": "LongSeqHiCacheStorage",
        "interface_v1": 1, "cpu_gib": 8, "disk_dir": "/mnt/nvme/kv", "disk_gib": 200}'

A remote tier shared across machines (``remote.py``): ``"remote": {"kind": "mooncake", "master": "HOST:PORT"}``,
and ``"remote_optional": true`` to serve without it when its master cannot be reached at start-up.

``interface_v1: 1`` makes SGLang call the zero-copy ``batch_get_v1`` / ``batch_set_v1`` (host indices): a
batch's pages are read on the store's read threads, DRAM hits are copied straight into the host KV pool, and disk
reads land there directly when a page is one contiguous run (else in a per-thread staging buffer, checked, then
copied); pages are stored from the pool with no per-page tensor from the pool API. Without it SGLang uses the
legacy ``batch_get`` / ``batch_set`` (page copies).

One block = one page of ``page_size`` tokens for every layer this rank holds, in the host pool's own byte
layout. The fingerprint carries the model, the pool class and layout, the geometry, the dtype, the page
size and the shard (TP rank and size; PP, attention CP and DCP parts when used), so each TP rank keeps
its own heads and a change of any of these never serves stale bytes. MLA KV is replicated over TP ranks,
so MLA ranks share one fingerprint and only storage-writer ranks (``is_storage_writer``) write. SGLang backs
pages up on the writer rank only and takes the minimum hit count over ranks, so MLA with TP > 1 needs
``disk_dir`` (one directory every rank sees); a DRAM-only setup is refused at startup there.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, List, Optional

import torch

from sglang.srt.mem_cache.hicache_storage import HiCacheStorage, HiCacheStorageConfig, HiCacheStorageExtraInfo

from longseq.sglang_versions import hicache_dcp, hicache_is_storage_writer

from .disk import HEADER_SIZE
from .dram import as_bytes, copy_bytes, host_bytes
from .fingerprint import KVFingerprint
from .settings import (KVConfigError, cache_dir, check_tier_sizes, flag, remote_setting, size_gib,
                       write_queue_gib)
from .store import BlockStore
from .trust import key_file_setting, shared_group_setting

log = logging.getLogger("longseq.kv_offload")

# Keys SGLang itself puts in / reads from extra_config; ours with their types and defaults.
SGLANG_KEYS = ("backend_name", "module_path", "class_name", "interface_v1")
OUR_KEYS = {"cpu_gib": (size_gib, 0.0), "disk_dir": (cache_dir, None), "disk_gib": (size_gib, 0.0),
            "fsync": (flag, False), "shared_group": (shared_group_setting, False),
            "auth_key_file": (key_file_setting, None), "remote": (remote_setting, None),
            "remote_optional": (flag, False), "write_queue_gib": (write_queue_gib, None)}
PREFIX = "longseq HiCache backend: extra_config"
# Host pool attributes that may hold the pool's root tensors (zero-copy pointers point into these).
_ROOT_ATTRS = ("kv_buffer", "k_buffer", "v_buffer", "index_k_buffer", "index_k_scale_buffer")


def parse_extra_config(extra: Optional[dict]) -> dict:
    """``cpu_gib`` / ``disk_dir`` / ``disk_gib`` / ``fsync`` / ``shared_group`` / ``auth_key_file`` / ``remote`` /
    ``remote_optional`` / ``write_queue_gib`` from SGLang's extra_config, validated with the same rules as the vLLM
    connector's (``settings.py``: finite sizes, non-empty ``disk_dir`` with ``~`` expanded, the ``remote`` object's
    keys; ``trust.py``: the key file is loaded and checked now).
    Raises ``KVConfigError`` (a ValueError) naming the setting, or the allowed keys on an unknown key."""
    extra = dict(extra or {})
    unknown = sorted(set(extra) - set(SGLANG_KEYS) - set(OUR_KEYS))
    if unknown:
        raise KVConfigError(f"longseq HiCache backend: unknown extra_config key(s) {unknown}; allowed: "
                            f"{', '.join(OUR_KEYS)} (ours) and {', '.join(SGLANG_KEYS)} (SGLang's)")
    opts = {name: check(PREFIX, name, extra.get(name, default)) for name, (check, default) in OUR_KEYS.items()
            if name not in ("auth_key_file", "write_queue_gib")}  # these two depend on other settings
    opts["auth_key_file"] = key_file_setting(PREFIX, "auth_key_file", extra.get("auth_key_file"), opts["shared_group"])
    opts["write_queue_gib"] = write_queue_gib(PREFIX, "write_queue_gib", extra.get("write_queue_gib"), opts["cpu_gib"])
    if opts["cpu_gib"] <= 0 and not opts["disk_dir"] and opts["remote"] is None:
        raise KVConfigError("longseq HiCache backend: set cpu_gib > 0 and/or disk_dir (+ disk_gib) or remote in "
                            "extra_config")
    if opts["disk_dir"] and opts["disk_gib"] <= 0:
        raise KVConfigError("longseq HiCache backend: extra_config disk_gib must be > 0 when disk_dir is set")
    return opts


def open_store(opts: dict, fp: KVFingerprint, page_nbytes: int) -> BlockStore:
    """The store for parsed options once the page size is known: a tier that cannot hold one page is refused,
    naming the setting. Pageable DRAM tier: it only exchanges bytes with SGLang's (already pinned) host pool, CPU
    to CPU, so pinning would buy nothing and its cudaHostAlloc calls would stall the GPU engine while serving."""
    check_tier_sizes(PREFIX, opts["cpu_gib"], opts["disk_dir"], opts["disk_gib"], page_nbytes, HEADER_SIZE)
    return BlockStore(fp, cpu_gib=opts["cpu_gib"], disk_dir=opts["disk_dir"], disk_gib=opts["disk_gib"],
                      fsync=opts["fsync"], pin_memory=False, block_nbytes=page_nbytes or None,
                      max_pending_write_gib=opts["write_queue_gib"],
                      shared_group=opts["shared_group"], auth_key_file=opts["auth_key_file"], remote=opts["remote"],
                      remote_optional=opts["remote_optional"])


def _shard(cfg: HiCacheStorageConfig) -> str:
    """Which slice of the model's KV this rank holds (MLA: replicated over TP, so no TP part)."""
    parts = ["mla"] if cfg.is_mla_model else [f"tp{cfg.tp_rank}of{cfg.tp_size}"]
    if cfg.pp_size > 1:
        parts.append(f"pp{cfg.pp_rank}of{cfg.pp_size}")
    if cfg.attn_cp_size > 1:
        parts.append(f"cp{cfg.attn_cp_rank}of{cfg.attn_cp_size}")
    dcp_size, dcp_rank, logical_page_size = hicache_dcp(cfg)
    if dcp_size > 1:
        parts.append(f"dcp{dcp_rank}of{dcp_size}:lpage{logical_page_size}")
    return "/".join(parts)


def sglang_fingerprint(cfg: HiCacheStorageConfig, pool: Any, page_nbytes: int) -> KVFingerprint:
    geometry = [f"{a}={getattr(pool, a)}" for a in ("layer_num", "head_num", "head_dim", "v_head_dim",
                                                     "kv_cache_dim", "kv_lora_rank", "qk_rope_head_dim")
                if isinstance(getattr(pool, a, None), int)]
    layout = ":".join(["sglang", type(pool).__name__, str(getattr(pool, "layout", "?")), *geometry,
                       f"page_bytes={page_nbytes}", _shard(cfg)])
    return KVFingerprint(model=cfg.model_name or "unknown-model", layout=layout,
                         dtype=str(pool.dtype).removeprefix("torch."), block_size=int(pool.page_size))


def _pool_roots(pool: Any) -> list[tuple[int, int, torch.Tensor]]:
    """(start address, end address, flat uint8 view) of each contiguous CPU root tensor of the host pool."""
    roots = []
    for attr in _ROOT_ATTRS:
        try:
            value = getattr(pool, attr, None)
        except Exception:  # a property that does not apply to this layout
            continue
        for t in value if isinstance(value, (tuple, list)) else [value]:
            if isinstance(t, torch.Tensor) and t.device.type == "cpu" and t.is_contiguous() and t.numel():
                roots.append((t.data_ptr(), t.data_ptr() + t.nbytes, as_bytes(t)))
    return roots


class LongSeqHiCacheStorage(HiCacheStorage):
    """HiCache L3 storage on ``BlockStore`` (DRAM LRU + shared disk directory). Built by SGLang's dynamic
    loader as ``cls(storage_config, kwargs)``; the store is opened when the host pool is registered,
    because the fingerprint needs the pool's layout, dtype and page size."""

    def __init__(self, storage_config: HiCacheStorageConfig, kwargs: Optional[dict] = None) -> None:
        self.storage_config = storage_config
        self.is_storage_writer = hicache_is_storage_writer(storage_config)
        self.options = parse_extra_config(storage_config.extra_config)
        if storage_config.is_mla_model and storage_config.tp_size > 1 and not self.options["disk_dir"] \
                and self.options["remote"] is None:
            raise ValueError("longseq HiCache backend: an MLA model with TP > 1 needs disk_dir (a directory all "
                             "ranks share) or remote: SGLang stores each page from one rank only, so a DRAM-only "
                             "tier would never give the other ranks a hit")
        self.store: BlockStore | None = None
        self.fingerprint: KVFingerprint | None = None
        self._roots: list[tuple[int, int, torch.Tensor]] = []
        self._staging = threading.local()  # per thread: SGLang's prefetch and backup threads run in parallel
        self.page_nbytes = 0

    def register_mem_pool_host(self, mem_pool_host: Any) -> None:
        super().register_mem_pool_host(mem_pool_host)
        self._roots = _pool_roots(mem_pool_host)
        try:
            tokens = getattr(mem_pool_host, "logical_page_size", mem_pool_host.page_size)  # DCP: widened page
            ptrs, sizes = mem_pool_host.get_page_buffer_meta(torch.arange(tokens))
            self.page_nbytes = int(sum(sizes))
        except (NotImplementedError, ValueError, AttributeError, AssertionError):
            self.page_nbytes = mem_pool_host.get_dummy_flat_data_page().nbytes
        self.fingerprint = sglang_fingerprint(self.storage_config, mem_pool_host, self.page_nbytes)
        if self.store is not None:
            self.store.close()
        self.store = open_store(self.options, self.fingerprint, self.page_nbytes)
        log.info("longseq HiCache backend: %s", self.fingerprint)

    def register_mem_host_pool_v2(self, host_pool: Any, host_pool_name) -> None:
        """Refuse hybrid models when SGLang registers their side pools (Mamba/SWA state, indexer, ...) right
        after attaching the backend, so raising fails the attach with this message: those pools go through
        ``batch_*_v2``, which this backend does not implement yet, and SGLang would otherwise fail later,
        mid-serving. Refused here rather than in 0.5.23's ``on_host_pools_registered``, which 0.5.15 lacks."""
        super().register_mem_host_pool_v2(host_pool, host_pool_name)
        extra = sorted(str(name) for name in self.registered_pools if str(name) != "kv")
        if extra:
            raise ValueError(f"longseq HiCache backend stores the KV pool only; this model also has host pools "
                             f"{extra} (hybrid model), which need the v2 interface it does not implement yet. "
                             f"Use SGLang's 'file' backend for this model.")

    def _require_store(self) -> BlockStore:
        if self.store is None:
            raise RuntimeError("longseq HiCache backend: register_mem_pool_host() was not called")
        return self.store

    # ---- zero-copy v1 (host indices) --------------------------------------------------------
    def _page_chunks(self, host_indices: torch.Tensor, n_pages: int) -> list[list[torch.Tensor]] | None:
        """For each page, the byte views of its pieces inside the host pool (e.g. [K, V] for MHA page_first,
        2 x layers pieces for layer_first), or None when the pool gives no pointers we can map."""
        try:
            ptrs, sizes = self.mem_pool_host.get_page_buffer_meta(host_indices)
        except (NotImplementedError, ValueError, AttributeError, AssertionError):
            return None
        if n_pages == 0 or len(ptrs) % n_pages:
            return None
        views = []
        for ptr, size in zip(ptrs, sizes):
            root = next((r for r in self._roots if r[0] <= ptr and ptr + size <= r[1]), None)
            if root is None:
                return None
            views.append(root[2][ptr - root[0]: ptr - root[0] + size])
        per = len(views) // n_pages
        return [views[i * per:(i + 1) * per] for i in range(n_pages)]

    def _staging_buffer(self, nbytes: int) -> torch.Tensor:
        buf = getattr(self._staging, "buf", None)
        if buf is None or buf.numel() != nbytes:
            buf = self._staging.buf = host_bytes(nbytes)
        return buf

    def _get_into(self, key: bytes, chunks: list[torch.Tensor]) -> bool:
        """One page into its pieces in the host pool: a DRAM hit is copied straight in; a disk or remote read lands
        in this thread's staging buffer first (its check needs the whole payload), or in the pool when the page is
        one contiguous run."""
        store = self._require_store()
        if len(chunks) == 1:
            return store.get(key, out=chunks[0]) is not None
        staging = self._staging_buffer(sum(c.numel() for c in chunks))
        return store.get(key, out=chunks, staging=staging) is not None

    def _put(self, key: bytes, data: torch.Tensor) -> None:
        """Only storage writers write the disk copy (MLA: one per replicated page). SGLang already skips
        backups on non-writer ranks (``HiCacheController.backup_skip``); if one is called anyway it stays in
        that rank's DRAM."""
        self._require_store().put(key, data, write_to_disk=self.is_storage_writer)

    def _put_from(self, key: bytes, chunks: list[torch.Tensor]) -> None:
        if len(chunks) == 1:
            return self._put(key, chunks[0])
        data, offset = self._staging_buffer(sum(c.numel() for c in chunks)), 0
        for c in chunks:  # not torch.cat: no OpenMP team on SGLang's HiCache threads (kv_offload/dram.py)
            copy_bytes(data[offset: offset + c.numel()], c)
            offset += c.numel()
        self._put(key, data)

    def batch_get_v1(self, keys: List[str], host_indices: torch.Tensor,
                     extra_info: Optional[HiCacheStorageExtraInfo] = None) -> List[bool]:
        """Read pages into the host pool at ``host_indices`` (``len(keys) * page_size`` token slots).

        The leading run of present keys is read on the store's read threads (each page lands in its own slots);
        the result stops at the first miss or failed check (SGLang only uses the leading run of hits), and
        later pages report False."""
        store = self._require_store()
        page_size = self.mem_pool_host.page_size
        chunks = self._page_chunks(host_indices, len(keys))
        raw = [key.encode() for key in keys]
        present = store.count_prefix_hits(raw) if len(raw) > 1 else len(raw)  # no page read past a miss

        def read(i: int) -> bool:
            try:
                if chunks is not None:
                    return self._get_into(raw[i], chunks[i])
                return self._get_copy(keys[i], host_indices[i * page_size].item())
            except Exception as e:  # a lookup never fails SGLang's prefetch thread: the page is a miss
                store.record_lookup_error("batch_get_v1", e)
                return False

        ok = store.read_parallel(read, list(range(present)))
        hits = ok.index(False) if False in ok else len(ok)
        return [True] * hits + [False] * (len(keys) - hits)

    def batch_set_v1(self, keys: List[str], host_indices: torch.Tensor,
                     extra_info: Optional[HiCacheStorageExtraInfo] = None) -> List[bool]:
        """Store pages from the host pool at ``host_indices`` (DRAM tier now, disk in the background)."""
        page_size = self.mem_pool_host.page_size
        chunks = self._page_chunks(host_indices, len(keys))
        for i, key in enumerate(keys):
            if chunks is not None:
                self._put_from(key.encode(), chunks[i])
            else:
                self.set(key, self.mem_pool_host.get_data_page(host_indices[i * page_size].item(), flat=True))
        return [True] * len(keys)

    def _get_copy(self, key: str, host_index: int) -> bool:
        """Fallback without pool pointers: through a flat page and ``set_from_flat_data_page``."""
        page = self.get(key, self.mem_pool_host.get_dummy_flat_data_page())
        if page is None:
            return False
        self.mem_pool_host.set_from_flat_data_page(host_index, page)
        return True

    # ---- legacy copy path (SGLang's default for dynamic backends) ------------------------------
    def get(self, key: str, target_location: Optional[Any] = None,
            target_sizes: Optional[Any] = None) -> torch.Tensor | None:
        """Fill ``target_location`` (a flat page tensor) with the page, or return a new uint8 tensor; None on a miss
        or any error (counted by the store)."""
        store = self._require_store()
        try:
            return store.get(key.encode(), out=target_location)
        except Exception as e:
            store.record_lookup_error("get", e)
            return None

    def batch_get(self, keys: List[str], target_locations: Optional[Any] = None,
                  target_sizes: Optional[Any] = None) -> List[torch.Tensor | None]:
        return [self.get(k, t) for k, t in zip(keys, target_locations or [None] * len(keys))]

    def set(self, key: str, value: Optional[Any] = None, target_location: Optional[Any] = None,
            target_sizes: Optional[Any] = None) -> bool:
        if value is None:
            raise ValueError("longseq HiCache backend: set() needs the page tensor (value)")
        self._put(key.encode(), value.contiguous())
        return True

    def batch_set(self, keys: List[str], values: Optional[Any] = None, target_locations: Optional[Any] = None,
                  target_sizes: Optional[Any] = None) -> bool:
        return all(self.set(k, v) for k, v in zip(keys, values))

    def exists(self, key: str) -> bool:
        store = self._require_store()
        try:
            return store.contains(key.encode())
        except Exception as e:
            store.record_lookup_error("exists", e)
            return False

    def batch_exists(self, keys: List[str], extra_info: Optional[HiCacheStorageExtraInfo] = None) -> int:
        """Number of leading keys present (DRAM, pending write, or a disk file whose header checks out)."""
        store = self._require_store()
        try:
            return store.count_prefix_hits([k.encode() for k in keys])
        except Exception as e:
            store.record_lookup_error("batch_exists", e)
            return 0

    def close(self) -> None:
        if self.store is not None:
            self.store.close()
            self.store = None
