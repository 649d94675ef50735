"""``LongSeqOffloadConnector``: vLLM KV connector that offloads finished KV blocks to CPU DRAM and disk and
loads prefix hits back before the forward pass (vLLM 0.26 - 0.33). Validated on the CPU platform
(``tests/cpu_engine/test_vllm_kv_offload_cpu.py``) and on CUDA (``tests/gpu/test_vllm_kv_offload_gpu.py``: a new engine that
loads the saved blocks gives the same greedy tokens as vLLM's own GPU prefix-cache hit of the same blocks).

Usage::

    --kv-transfer-config '{"kv_connector":"LongSeqOffloadConnector",
        "kv_connector_module_path":"longseq.kv_offload.vllm", "kv_role":"kv_both",
        "kv_connector_extra_config":{"cpu_gib":4, "disk_dir":"/mnt/kv", "disk_gib":64}}'

(the module path can be left out when the longseq vLLM plugin is installed: it registers the short name).
A shared or group-writable ``disk_dir`` takes ``"shared_group": true`` (or a group name) and ``"auth_key_file"``
(blocks carry a keyed tag; untagged ones are misses): see ``trust.py``. A remote tier shared across machines:
``"remote": {"kind": "mooncake", "master": "HOST:PORT"}`` (``remote.py``; ``"remote_optional": true`` serves without
it when its master cannot be reached at start-up).
``kv_role``: ``kv_both`` saves and loads, ``kv_producer`` only saves, ``kv_consumer`` only loads.

Design (see ``vllm_scheduler.py``, ``vllm_hits.py`` and ``vllm_worker.py``): keys are our own token-hash chain,
so blocks survive restarts; loads are synchronous (copied before the forward); saves are asynchronous
(device->host on a side stream, store ``put`` in a background thread). With one worker in the engine-core process
the scheduler half counts hits in the worker's store and verifies them; with tensor parallelism (workers in other
processes) each rank stores its own heads under its own fingerprint, tells the scheduler about its store at
start-up (handshake metadata), the scheduler counts hits from an index of what it sent plus every rank's disk
files, and each rank checks its blocks when it loads them. Pipeline parallelism is refused at start-up. A block
that fails to load on any rank is recomputed (``kv_load_failure_policy`` is set to ``recompute``: a cache miss is
never a request error).
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Any

import torch

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1, KVConnectorHandshakeMetadata, KVConnectorMetadata, KVConnectorRole, SupportsHMA)

from .disk import HEADER_SIZE
from .settings import (KVConfigError, cache_dir, check_tier_sizes, flag, remote_setting, size_gib,
                       write_queue_gib)
from .store import BlockStore, KVFingerprint
from .trust import key_file_setting, shared_group_setting, trust_policy
from .remote_probe import RemoteProbe
from .vllm_hits import KeyIndexHits, RankInfo, StoreHits
from .vllm_scheduler import BlockTransfer, OffloadScheduler
from .vllm_worker import OffloadWorker

log = logging.getLogger("longseq.kv_offload")

CONNECTOR_NAME = "LongSeqOffloadConnector"
#: ``kv_connector_extra_config`` keys and their defaults.
EXTRA_CONFIG_DEFAULTS: dict[str, Any] = {"cpu_gib": 4.0, "disk_dir": None, "disk_gib": 16.0, "stats_path": None,
                                         "pin_at_start": True, "load_kernel": "auto", "shared_group": False,
                                         "auth_key_file": None, "remote": None, "remote_optional": False,
                                         "write_queue_gib": None}
#: ``load_kernel`` values: ``auto`` = the direct-read kernel on CUDA where it applies, ``copy`` = per-block copies.
LOAD_KERNELS = ("auto", "copy")


#: Invalid ``kv_connector_extra_config`` (raised when the engine starts); the SGLang backend raises the same class.
OffloadConfigError = KVConfigError


def parse_extra_config(extra: dict | None) -> dict[str, Any]:
    """Validate ``kv_connector_extra_config``: known keys only, sizes finite non-negative numbers, paths non-empty
    strings (``~`` expanded). The rules are ``settings.py``'s, shared with the SGLang backend; every error names
    the setting. Tier sizes against the block size are checked once the block size is known (``open_store``)."""
    if extra is not None and not isinstance(extra, dict):
        raise OffloadConfigError(f"{CONNECTOR_NAME}: kv_connector_extra_config must be a JSON object, got {extra!r}")
    extra = dict(extra or {})
    unknown = sorted(set(extra) - set(EXTRA_CONFIG_DEFAULTS))
    if unknown:
        raise OffloadConfigError(f"{CONNECTOR_NAME}: unknown kv_connector_extra_config key(s) {unknown}; "
                                 f"allowed: {sorted(EXTRA_CONFIG_DEFAULTS)}")
    cfg = {**EXTRA_CONFIG_DEFAULTS, **extra}
    for key in ("cpu_gib", "disk_gib"):
        cfg[key] = size_gib(CONNECTOR_NAME, key, cfg[key])
    for key in ("disk_dir", "stats_path"):
        cfg[key] = cache_dir(CONNECTOR_NAME, key, cfg[key])
    cfg["pin_at_start"] = flag(CONNECTOR_NAME, "pin_at_start", cfg["pin_at_start"])
    cfg["shared_group"] = shared_group_setting(CONNECTOR_NAME, "shared_group", cfg["shared_group"])
    cfg["auth_key_file"] = key_file_setting(CONNECTOR_NAME, "auth_key_file", cfg["auth_key_file"], cfg["shared_group"])
    cfg["remote"] = remote_setting(CONNECTOR_NAME, "remote", cfg["remote"])
    cfg["remote_optional"] = flag(CONNECTOR_NAME, "remote_optional", cfg["remote_optional"])
    cfg["write_queue_gib"] = write_queue_gib(CONNECTOR_NAME, "write_queue_gib", cfg["write_queue_gib"], cfg["cpu_gib"])
    if not isinstance(cfg["load_kernel"], str) or cfg["load_kernel"] not in LOAD_KERNELS:
        raise OffloadConfigError(f"{CONNECTOR_NAME}: load_kernel must be one of {list(LOAD_KERNELS)}, "
                                 f"got {cfg['load_kernel']!r}")
    if cfg["disk_dir"] is not None and cfg["disk_gib"] <= 0:
        raise OffloadConfigError(f"{CONNECTOR_NAME}: disk_gib must be > 0 when disk_dir is set")
    if cfg["disk_dir"] is None and cfg["cpu_gib"] <= 0 and cfg["remote"] is None:
        raise OffloadConfigError(f"{CONNECTOR_NAME}: cpu_gib is 0 and no disk_dir or remote: nothing to offload to")
    return cfg


def open_store(cfg: dict[str, Any], fp: KVFingerprint, block_nbytes: int) -> BlockStore:
    """The worker's store for a parsed config, once the block size is known: a tier that cannot hold one block
    is refused here, naming the setting."""
    disk_gib = cfg["disk_gib"] if cfg["disk_dir"] else 0.0
    check_tier_sizes(CONNECTOR_NAME, cfg["cpu_gib"], cfg["disk_dir"], disk_gib, block_nbytes, HEADER_SIZE)
    return BlockStore(fp, cpu_gib=cfg["cpu_gib"], disk_dir=cfg["disk_dir"], disk_gib=disk_gib,
                      max_pending_write_gib=cfg["write_queue_gib"], block_nbytes=block_nbytes,
                      shared_group=cfg["shared_group"], auth_key_file=cfg["auth_key_file"], remote=cfg["remote"],
                      remote_optional=cfg["remote_optional"])


@dataclass
class LongSeqOffloadMetadata(KVConnectorMetadata):
    """Scheduler -> worker, once per step: blocks to load before the forward and to save after it."""

    loads: list[BlockTransfer]
    saves: list[BlockTransfer]


@dataclass
class LongSeqRankHandshake(KVConnectorHandshakeMetadata):
    """Worker -> scheduler at start-up (vLLM collects one per rank): this rank's store (``vllm_hits.RankInfo``)."""

    rank: int
    fingerprint_json: str
    dram_blocks: int
    block_nbytes: int = 0


def _write_json(path: str, data: dict) -> None:
    try:
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(data, f)
        os.replace(tmp, path)
    except OSError as e:
        log.warning("%s: cannot write stats file %s: %s", CONNECTOR_NAME, path, e)


def _scheduler_stats(sched: OffloadScheduler | None) -> dict:
    probe = getattr(sched.hits, "remote", None) if sched else None
    return {"lookups": sched.lookups if sched else 0, "hit_tokens": sched.hit_tokens if sched else 0,
            "miss_tokens": sched.miss_tokens if sched else 0,
            "lookup_seconds": sched.lookup_seconds if sched else 0.0,
            "step_seconds": sched.step_seconds if sched else 0.0,
            **({"remote_probe": probe.counters()} if probe is not None else {})}


class _Engine:
    """What the scheduler and worker halves of one engine share (they live in one process)."""

    def __init__(self, store: BlockStore, worker: OffloadWorker, stats_path: str | None, rank: int = 0) -> None:
        self.store, self.worker, self.stats_path, self.rank = store, worker, stats_path, rank
        self.scheduler: OffloadScheduler | None = None
        self._closed = False
        self._lock = threading.Lock()
        atexit.register(self.close)

    def stats(self) -> dict:
        s = self.store.stats(log_summary=False)
        return {"pid": os.getpid(), "time": time.time(), "rank": self.rank, **self.worker.counters,
                **_scheduler_stats(self.scheduler),
                "store": {"dram_hits": s.dram.hits, "disk_hits": s.disk.hits, "disk_misses": s.disk.misses,
                          "disk_blocks_written": s.disk.blocks_written, "corrupt_blocks": s.corrupt_blocks,
                          "bad_files": s.bad_files, "auth_failures": s.auth_failures,
                          "lookup_errors": s.lookup_errors, "read_errors": s.read_errors,
                          "write_errors": s.write_errors,
                          "dropped_writes": s.dropped_writes, "dram_blocks": s.dram_blocks,
                          "disk_read_gbps": s.disk.read_gbps, **({"remote": s.remote_counters()} if s.remote else {})}}

    def write_stats(self) -> None:
        if self.stats_path:
            _write_json(self.stats_path, self.stats())

    def close(self) -> None:
        """Drain queued saves and disk writes (so a restarted server finds them), log, close. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self.worker.drain(timeout=60)
        self.write_stats()
        log.info("%s: %s", CONNECTOR_NAME, json.dumps(self.stats()))
        self.store.close()


#: engine id -> shared state, filled by the worker half when it sees the KV caches.
_ENGINES: dict[str, _Engine] = {}


def rank_stats_path(stats_path: str | None, rank: int, world_size: int) -> str | None:
    """Where rank ``rank``'s worker writes its stats: ``stats_path`` itself with one rank, else
    ``<stats_path>.tp<rank>`` (the scheduler then writes its own counters to ``stats_path``)."""
    if not stats_path or world_size == 1:
        return stats_path
    return f"{stats_path}.tp{rank}"


def fingerprint_for(vllm_config, worker: OffloadWorker, block_size: int) -> KVFingerprint:
    """Model, this rank's page layout (device type, layers, page shape, TP rank/size) and dtypes."""
    from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

    pc = vllm_config.parallel_config
    layout = (f"vllm:{worker.device.type}:layers={len(worker.views)}:page={list(worker.page_shape)}"
              f":tp{get_tensor_model_parallel_rank()}of{pc.tensor_parallel_size}")
    dtype = f"{str(worker.dtype).removeprefix('torch.')}/{vllm_config.cache_config.cache_dtype}"
    return KVFingerprint(model=str(vllm_config.model_config.model), layout=layout, dtype=dtype,
                         block_size=block_size)


class LongSeqOffloadConnector(KVConnectorBase_V1, SupportsHMA):
    """KV offload to CPU DRAM + disk. See the module docstring for usage and design."""

    def __init__(self, vllm_config, role: KVConnectorRole, kv_cache_config=None) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        ktc = self._kv_transfer_config
        self.cfg = parse_extra_config(ktc.kv_connector_extra_config)
        self.do_load = ktc.kv_role in ("kv_both", "kv_consumer")
        self.do_save = ktc.kv_role in ("kv_both", "kv_producer")
        self.engine_id = str(ktc.engine_id)
        self.block_size = self._check_kv_cache_config(kv_cache_config)
        pc = vllm_config.parallel_config
        if pc.pipeline_parallel_size > 1:
            raise OffloadConfigError(f"{CONNECTOR_NAME} supports tensor parallelism but not pipeline parallelism; "
                                     f"got pipeline_parallel_size={pc.pipeline_parallel_size}")
        self.world_size = int(pc.tensor_parallel_size)
        if role == KVConnectorRole.SCHEDULER and ktc.kv_load_failure_policy != "recompute":
            # A block that cannot be loaded (evicted, corrupt) is a cache miss: recompute it, never fail the request.
            ktc.kv_load_failure_policy = "recompute"
        self._engine: _Engine | None = None
        self._sched: OffloadScheduler | None = None
        self._ranks: list[RankInfo] = []  # scheduler: each worker's store, from the handshake metadata
        self._remote_probe: RemoteProbe | None = None  # scheduler, workers in other processes: remote presence

    @staticmethod
    def _check_kv_cache_config(kv_cache_config) -> int:
        """One full-attention KV cache group is supported; anything else is refused at start-up."""
        from vllm.v1.kv_cache_interface import FullAttentionSpec

        groups = kv_cache_config.kv_cache_groups if kv_cache_config is not None else []
        kinds = [type(g.kv_cache_spec).__name__ for g in groups]
        if len(groups) != 1 or not isinstance(groups[0].kv_cache_spec, FullAttentionSpec):
            raise OffloadConfigError(f"{CONNECTOR_NAME} supports models with one full-attention KV cache group; "
                                     f"this model has {kinds or 'none'} (sliding-window, Mamba/linear-attention "
                                     f"and mixed models are not supported yet)")
        return int(groups[0].kv_cache_spec.block_size)

    # ================= worker side =================
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        layer_order = self._kv_cache_config.kv_cache_groups[0].layer_names
        caches = [kv_caches[n] for n in layer_order if n in kv_caches]
        if not caches:
            raise OffloadConfigError(f"{CONNECTOR_NAME}: none of the KV cache group's layers has a cache tensor")
        worker = OffloadWorker(caches, self._kv_cache_config.num_blocks)
        fp = fingerprint_for(self._vllm_config, worker, self.block_size)
        store = open_store(self.cfg, fp, worker.block_bytes)
        worker.attach(store, pin_at_start=self.cfg["pin_at_start"], load_kernel=self.cfg["load_kernel"])
        from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

        rank = get_tensor_model_parallel_rank()
        self._engine = _ENGINES[self.engine_id] = _Engine(
            store, worker, rank_stats_path(self.cfg["stats_path"], rank, self.world_size), rank)
        log.info("%s: %d layers, page %s %s on %s, %.1f KiB per block; fingerprint %s", CONNECTOR_NAME,
                 len(worker.views), list(worker.page_shape), worker.dtype, worker.device, worker.block_bytes / 1024,
                 fp.to_json())

    def get_handshake_metadata(self) -> LongSeqRankHandshake | None:
        e = self._engine
        if e is None:
            return None
        return LongSeqRankHandshake(rank=e.rank, fingerprint_json=e.store.fingerprint.to_json(),
                                    dram_blocks=e.store.dram_capacity_blocks(e.worker.block_bytes),
                                    block_nbytes=e.worker.block_bytes)

    def _meta(self) -> LongSeqOffloadMetadata:
        meta = self._get_connector_metadata()
        assert isinstance(meta, LongSeqOffloadMetadata)
        return meta

    def start_load_kv(self, forward_context, **kwargs: Any) -> None:
        meta = self._meta()
        if meta.loads and self._engine is not None:
            self._engine.worker.load(meta.loads, self.block_size)
            self._engine.write_stats()

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # start_load_kv loads every layer before the forward pass

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata, **kwargs: Any) -> None:
        return  # pages are gathered from the registered caches in wait_for_save, all layers at once

    def wait_for_save(self) -> None:
        meta = self._meta()
        if meta.saves and self._engine is not None:
            self._engine.worker.save(meta.saves)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        if self._engine is None:
            return None, None
        return self._engine.worker.finished_sending(finished_req_ids) or None, None

    def get_block_ids_with_load_errors(self) -> set[int]:
        if self._engine is None or not self._engine.worker.load_errors:
            return set()
        errors, self._engine.worker.load_errors = self._engine.worker.load_errors, set()
        return errors

    def handle_preemptions(self, kv_connector_metadata) -> None:
        # Nothing to do, and cheap on purpose (vLLM calls it every step): after each save the compute stream
        # already waits for the device->host copies (OffloadWorker.save), so reused pages are never read late.
        return

    def shutdown(self) -> None:
        if self._engine is not None:
            self._engine.close()
        if self._sched is not None and self._sched.hits.mode == "index":
            self._write_scheduler_stats()
            self._sched.hits.close()  # closes the remote probe too
        elif self._remote_probe is not None:
            self._remote_probe.close()

    # ================= scheduler side =================
    def set_xfer_handshake_metadata(self, metadata: dict) -> None:
        """Each worker's store (vLLM calls this once at start-up, after the workers registered their caches)."""
        ranks = [RankInfo(m.rank, m.fingerprint_json, m.dram_blocks, getattr(m, "block_nbytes", 0))
                 for m in metadata.values()
                 if isinstance(m, LongSeqRankHandshake)]
        if len(ranks) != self.world_size:
            raise OffloadConfigError(f"{CONNECTOR_NAME}: {len(ranks)} of {self.world_size} tensor-parallel ranks "
                                     f"reported their store at start-up")
        self._ranks = ranks
        in_process = _ENGINES.get(self.engine_id) is not None and self.world_size == 1
        if not in_process and self._remote_probe is None:  # open at start-up: a bad master stops it there
            self._remote_probe = RemoteProbe.open(self.cfg["remote"], self.cfg["remote_optional"], CONNECTOR_NAME)

    def _scheduler(self) -> OffloadScheduler:
        if self._sched is None:
            engine = _ENGINES.get(self.engine_id)
            if engine is not None and self.world_size == 1:
                hits = StoreHits(engine.store)  # the worker lives in this process: ask its store
            elif self._ranks:
                hits = KeyIndexHits(self._ranks, self.cfg["disk_dir"], self.cfg["disk_gib"],
                                    trust_policy(CONNECTOR_NAME, self.cfg["shared_group"], self.cfg["auth_key_file"]),
                                    remote=self._remote_probe)
            else:
                raise RuntimeError(f"{CONNECTOR_NAME}: no worker reported its store to the scheduler (engine "
                                   f"{self.engine_id}); vLLM did not pass the KV connector handshake metadata")
            self._sched = OffloadScheduler(hits, self.block_size, save=self.do_save)
            if engine is not None:
                engine.scheduler = self._sched
            log.info("%s: scheduler counts hits from %s", CONNECTOR_NAME,
                     "the worker's store" if hits.mode == "store" else
                     f"an index of {hits.capacity} blocks, {len(hits.disks)} ranks' disk files"
                     + (" and the remote store" if hits.remote is not None else ""))
        return self._sched

    def _write_scheduler_stats(self) -> None:
        engine = _ENGINES.get(self.engine_id)
        if engine is not None and engine.scheduler is self._sched:
            engine.write_stats()  # one file with the worker's counters
        elif self.cfg["stats_path"]:
            _write_json(self.cfg["stats_path"], {"pid": os.getpid(), "time": time.time(), "ranks": self.world_size,
                                                 **_scheduler_stats(self._sched)})

    def get_num_new_matched_tokens(self, request, num_computed_tokens: int) -> tuple[int | None, bool]:
        if not self.do_load:
            self._scheduler().track(request)  # still tracked, for saving
            return 0, False
        sched = self._scheduler()
        try:
            n = sched.num_new_matched_tokens(request, num_computed_tokens)
        except Exception as e:  # the cache must never fail the scheduler: a lookup error is a miss
            engine = _ENGINES.get(self.engine_id)
            if engine is not None:
                engine.store.record_lookup_error("get_num_new_matched_tokens", e)
            else:
                log.warning("%s: hit lookup failed (%s: %s): treated as a miss", CONNECTOR_NAME, type(e).__name__, e)
            n = 0
        self._write_scheduler_stats()  # hits, misses and failed checks are visible right away
        return n, False

    def update_state_after_alloc(self, request, blocks, num_external_tokens: int) -> None:
        if num_external_tokens > 0:
            self._scheduler().after_alloc(request, blocks.get_block_ids()[0], num_external_tokens)

    def update_connector_output(self, connector_output) -> None:
        if connector_output.invalid_block_ids and self._sched is not None:
            self._sched.load_failed(set(connector_output.invalid_block_ids))

    def build_connector_meta(self, scheduler_output) -> KVConnectorMetadata:
        loads, saves = self._scheduler().build_step(scheduler_output)
        return LongSeqOffloadMetadata(loads, saves)

    def request_finished(self, request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        return self._scheduler().finished(request), None

    def request_finished_all_groups(self, request, block_ids: tuple[list[int], ...]):
        return self.request_finished(request, block_ids[0] if block_ids else [])
