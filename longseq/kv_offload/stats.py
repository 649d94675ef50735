"""Counters of the block store: hits, misses, bytes and seconds per tier, and the one-line log summary."""

from __future__ import annotations

import logging
import sys
import threading
from dataclasses import dataclass, field, replace

TIERS = ("dram", "disk")


@dataclass
class TierStats:
    """Counters of one tier. Read = served by ``get``; written = inserted by ``put`` (or a disk promotion)."""

    hits: int = 0
    misses: int = 0
    bytes_read: int = 0
    read_seconds: float = 0.0
    bytes_written: int = 0
    write_seconds: float = 0.0
    blocks_written: int = 0
    evictions: int = 0

    @property
    def read_gbps(self) -> float:
        return self.bytes_read / self.read_seconds / 1e9 if self.read_seconds > 0 else 0.0

    @property
    def write_gbps(self) -> float:
        return self.bytes_written / self.write_seconds / 1e9 if self.write_seconds > 0 else 0.0


@dataclass
class StoreStats:
    """A snapshot of a ``BlockStore``'s counters.

    corrupt_blocks: disk blocks that failed a check (header, fingerprint, key, size, checksum) -> served as misses
    read_errors:    disk reads that failed with an OS error other than "file not found"
    bad_files:      lookups that met a symlink, FIFO or other non-regular entry in the disk directory -> misses
                    (never followed or opened blocking; a later write of that block replaces the entry)
    auth_failures:  disk blocks without a valid keyed tag (with ``auth_key_file``) -> misses, deleted like corrupt ones
    lookup_errors:  unexpected exceptions on a lookup or load (any cause) -> misses, never raised to the engine
    write_errors:   disk writes that failed (ENOSPC, EACCES, read-only dir, ...); DRAM kept serving
    dropped_writes: disk writes skipped because too many bytes were already queued (the engine is never blocked)

    With a remote tier (``remote.py``) ``tiers["remote"]`` counts its reads (hits, misses) and writes (blocks put), and:
    remote_up:            whether the tier is up now (None: no remote tier); down = skipped until its next retry
    remote_lookups:       keys asked of the remote store (probes and reads, skipped ones included)
    remote_put_dropped:   blocks not written through: the write queue was full, or the tier down or closing
    remote_failed_checks: remote records that failed a check (size, header, fingerprint, key, CRC, tag) -> misses
    remote_errors:        remote calls that failed, timed out or raised -> misses (the tier goes down for a while)
    """

    tiers: dict[str, TierStats] = field(default_factory=lambda: {t: TierStats() for t in TIERS})
    corrupt_blocks: int = 0
    read_errors: int = 0
    bad_files: int = 0
    auth_failures: int = 0
    lookup_errors: int = 0
    write_errors: int = 0
    dropped_writes: int = 0
    dram_bytes: int = 0
    dram_blocks: int = 0
    dram_pinned_bytes: int = 0  # pinned slabs held (>= dram_bytes: includes recycled, not yet used pieces)
    disk_bytes: int = 0
    remote_up: bool | None = None
    remote_lookups: int = 0
    remote_put_dropped: int = 0
    remote_failed_checks: int = 0
    remote_errors: int = 0

    @property
    def dram(self) -> TierStats:
        return self.tiers["dram"]

    @property
    def disk(self) -> TierStats:
        return self.tiers["disk"]

    @property
    def remote(self) -> TierStats | None:
        return self.tiers.get("remote")

    def remote_counters(self) -> dict:
        """The remote tier's counters for a stats file (``longseq kv stats --server``); {} without one."""
        r = self.remote
        if r is None:
            return {}
        return {"up": bool(self.remote_up), "puts": r.blocks_written, "put_dropped": self.remote_put_dropped,
                "lookups": self.remote_lookups, "hits": r.hits, "misses": r.misses,
                "failed_checks": self.remote_failed_checks, "errors": self.remote_errors,
                "read_gbps": r.read_gbps}

    def copy(self) -> "StoreStats":
        return replace(self, tiers={k: replace(v) for k, v in self.tiers.items()})

    def summary(self) -> str:
        """One log line: per tier hits/misses, bytes read at GB/s, bytes written at GB/s; then the fault counters."""
        parts = []
        for name, t in self.tiers.items():
            parts.append(f"{name}: {t.hits} hit/{t.misses} miss, read {t.bytes_read / 2**20:.1f} MiB"
                         f" @ {t.read_gbps:.2f} GB/s, wrote {t.bytes_written / 2**20:.1f} MiB"
                         f" @ {t.write_gbps:.2f} GB/s, {t.evictions} evicted")
        pinned = f" (pinned slabs {self.dram_pinned_bytes / 2**20:.1f} MiB)" if self.dram_pinned_bytes else ""
        parts.append(f"dram holds {self.dram_blocks} blocks {self.dram_bytes / 2**20:.1f} MiB{pinned},"
                     f" disk ~{self.disk_bytes / 2**20:.1f} MiB")
        parts.append(f"corrupt {self.corrupt_blocks}, bad files {self.bad_files}, auth failures {self.auth_failures},"
                     f" read errors {self.read_errors},"
                     f" lookup errors {self.lookup_errors},"
                     f" write errors {self.write_errors}, dropped writes {self.dropped_writes}")
        if self.remote is not None:
            parts.append(f"remote {'up' if self.remote_up else 'DOWN'}: {self.remote_lookups} lookups,"
                         f" {self.remote_put_dropped} puts dropped, {self.remote_failed_checks} failed checks,"
                         f" {self.remote_errors} errors")
        return "kv store: " + "; ".join(parts)


class StatsRecorder:
    """Thread-safe counter updates (the engine thread and the disk writer thread both record)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._stats = StoreStats()

    def hit(self, tier: str, nbytes: int, seconds: float, n: int = 1) -> None:
        with self._lock:
            t = self._stats.tiers[tier]
            t.hits += n
            t.bytes_read += nbytes
            t.read_seconds += seconds

    def miss(self, tier: str) -> None:
        with self._lock:
            self._stats.tiers[tier].misses += 1

    def wrote(self, tier: str, nbytes: int, seconds: float) -> None:
        with self._lock:
            t = self._stats.tiers[tier]
            t.blocks_written += 1
            t.bytes_written += nbytes
            t.write_seconds += seconds

    def add(self, name: str, n: int = 1, tier: str | None = None) -> None:
        """Increment a fault counter (``corrupt_blocks``, ...) or, with ``tier``, a tier counter."""
        with self._lock:
            obj = self._stats.tiers[tier] if tier else self._stats
            setattr(obj, name, getattr(obj, name) + n)

    def add_remote_tier(self) -> None:
        """Count a remote tier from now on (its ``TierStats`` and ``remote_*`` counters appear in snapshots)."""
        with self._lock:
            self._stats.tiers.setdefault("remote", TierStats())
            if self._stats.remote_up is None:
                self._stats.remote_up = True

    def snapshot(self, **gauges) -> StoreStats:
        with self._lock:
            snap = self._stats.copy()
        for k, v in gauges.items():
            setattr(snap, k, v)
        return snap


def ensure_log_visible(logger: logging.Logger) -> None:
    """Make the INFO summaries show up when the host process configured no logging for us.

    SGLang configures the root logger, so nothing is added there. vLLM configures only its own "vllm"
    logger: without this our INFO lines would reach Python's last-resort handler (WARNING and up) and be
    lost. Adds one stderr handler to the top "longseq" logger only if no handler exists up the chain.
    """
    top = logging.getLogger("longseq")
    if logger.hasHandlers() or getattr(top, "_longseq_handler", False):
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(asctime)s [%(name)s] %(message)s", "%m-%d %H:%M:%S"))
    top.addHandler(handler)
    top._longseq_handler = True
    if top.level == logging.NOTSET:
        top.setLevel(logging.INFO)
