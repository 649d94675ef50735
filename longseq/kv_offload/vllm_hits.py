"""Where the scheduler half of ``LongSeqOffloadConnector`` learns which blocks the workers hold.

``StoreHits`` (one worker, in the engine-core process: one GPU or the CPU platform with the in-process executor):
asks the worker's ``BlockStore`` directly. Disk blocks are read, checked and promoted into DRAM at lookup time,
so a counted block cannot fail to load.

``KeyIndexHits`` (workers in other processes: tensor parallelism, or the multiprocess executor): the scheduler
cannot see the workers' stores, so it keeps
- an LRU of the keys it sent for saving or loading, as large as the smallest rank's DRAM tier (every rank gets the
  same saves and loads in the same order, so their LRUs evict the same blocks as this index), and
- header probes of every rank's block files in the disk directory (each rank's fingerprint differs: its own heads),
- with a remote tier, one presence request to the remote store for every rank's records (``remote_probe.py``).
Each worker reads and checks its blocks when it loads them (``BlockStore.fetch_prefix_to_dram``); a block missing or bad
on any rank is reported through ``get_block_ids_with_load_errors`` and vLLM recomputes it (vLLM takes the union
over ranks). The index and the workers can drift (a dropped save, a failed write): drift costs recompute, never
wrong data.

Framework-free apart from the shapes described here; ``RankInfo`` is what each worker tells the scheduler at
start-up (vLLM's KV connector handshake metadata).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass

from .disk import DiskTier
from .fingerprint import KVFingerprint
from .remote_probe import RemoteProbe
from .stats import StatsRecorder
from .store import BlockStore
from .trust import Trust

log = logging.getLogger("longseq.kv_offload")


@dataclass
class RankInfo:
    """One worker rank's store, as the scheduler needs it.

    rank:             tensor-parallel rank
    fingerprint_json: ``KVFingerprint.to_json()`` of the rank's store (its heads, page shape, dtype)
    dram_blocks:      blocks the rank's DRAM tier holds when full
    block_nbytes:     bytes of one block on that rank (0: unknown); a disk file of another size is not counted
    """

    rank: int
    fingerprint_json: str
    dram_blocks: int
    block_nbytes: int = 0


class StoreHits:
    """Hits from the worker's own store (same process)."""

    mode = "store"

    def __init__(self, store: BlockStore) -> None:
        self.store = store

    def count(self, keys: list[bytes]) -> int:
        """Leading ``keys`` usable now: present, and for disk blocks read, checked and pulled into DRAM.
        Never raises (the scheduler thread must not fail over the cache): an error is a counted miss."""
        try:
            return self.store.fetch_prefix_to_dram(keys[:self.store.count_prefix_hits(keys)])
        except Exception as e:
            self.store.record_lookup_error("scheduler hit count", e)
            return 0

    def in_dram_batch(self, keys: list[bytes]) -> list[bool]:
        return self.store.in_dram_batch(keys)

    def sent(self, keys: list[bytes]) -> None:
        """Keys sent to the workers for saving or loading (the store itself tracks them here)."""

    def forget(self, keys: list[bytes]) -> None:
        """Keys a worker failed to load: dropped from the store's DRAM tier (a bad disk file is already deleted)."""
        self.store.forget(keys)

    def close(self) -> None:
        """The store belongs to the worker half."""


class KeyIndexHits:
    """Hits from an index of what was sent to the workers, plus probes of every rank's disk files and, with
    ``remote``, of every rank's records in the remote store."""

    mode = "index"

    def __init__(self, ranks: list[RankInfo], disk_dir: str | None = None, disk_gib: float = 0.0,
                 trust: Trust = Trust(), remote: RemoteProbe | None = None) -> None:
        if not ranks:
            raise ValueError("KeyIndexHits: no rank reported its store")
        self.ranks = sorted(ranks, key=lambda r: r.rank)
        self.capacity = min(r.dram_blocks for r in self.ranks)
        self.remote = remote
        self.fingerprints = ([KVFingerprint.from_json(r.fingerprint_json) for r in self.ranks]
                             if disk_dir or remote is not None else [])
        self._keys: OrderedDict[bytes, None] = OrderedDict()
        self.rec = StatsRecorder()
        # Probe-only views of each rank's files (same directory and fingerprints as the workers' stores): reads
        # headers, never payloads; a file that fails its header check (or, with a key, has no tag) is handled as
        # the workers would.
        self.disks = [DiskTier(disk_dir, fp, int(disk_gib * (1 << 30)), self.rec, block_nbytes=r.block_nbytes or None,
                               trust=trust)
                      for r, fp in zip(self.ranks, self.fingerprints)] if disk_dir else []

    def count(self, keys: list[bytes]) -> int:
        """Leading ``keys`` that every rank should hold: in the index (DRAM), or for every rank a file on disk or a
        record in the remote store (a rank may have one block on disk and the next one only remotely)."""
        n = 0
        for k in keys:
            if k not in self._keys:
                break
            self._keys.move_to_end(k)  # a hit is loaded: the workers' LRUs touch it too
            n += 1
        try:
            if self.disks:
                for k in keys[n:]:
                    if not all(d.probe(k) for d in self.disks):
                        break
                    n += 1
            if self.remote is not None and n < len(keys):
                rest = keys[n:]
                remote = self.remote.present(self.fingerprints, rest)
                for i, k in enumerate(rest):
                    if not all(remote[r][i] or (self.disks and self.disks[r].probe(k)) for r in range(len(remote))):
                        break
                    n += 1
        except Exception:  # probes never raise by design; if one does, the rest is a miss, never an engine error
            self.rec.add("lookup_errors")
            log.warning("KeyIndexHits: a disk or remote probe failed: treated as a miss", exc_info=True)
        return n

    def in_dram_batch(self, keys: list[bytes]) -> list[bool]:
        return [k in self._keys for k in keys]

    def sent(self, keys: list[bytes]) -> None:
        """The workers will ``put`` (save) or fetch into DRAM (load) these blocks: most recent in their LRUs."""
        for k in keys:
            self._keys[k] = None
            self._keys.move_to_end(k)
        while len(self._keys) > self.capacity:
            self._keys.popitem(last=False)

    def forget(self, keys: list[bytes]) -> None:
        """Keys some rank failed to load: no longer counted, so they are saved again once recomputed."""
        for k in keys:
            self._keys.pop(k, None)

    def __contains__(self, key: bytes) -> bool:
        return key in self._keys

    def close(self) -> None:
        self._keys.clear()
        if self.remote is not None:
            self.remote.close()
