"""In-memory index of the block files a disk cache directory holds, so that looking up a block that is not on
disk costs no file-system call.

Why: the scheduler looks up every new prompt on the engine thread, and most new prompts are misses. A miss used to
open the block's path (ENOENT), and the save check opened one path per new block (~16 ms of the engine thread for
a 32K prompt on the H200). Opens are also slow at times while the disk writer creates and renames files in the
same tree: up to 9-14 ms against 0.6 ms idle on the CPU CI machine (``benchmarks/study_disk_writer.py``,
``open_miss``), and a stall of the engine thread stalls every request.

The index holds file names (``block_name``: a hash of fingerprint and key, so one set serves every fingerprint in
the directory). It is filled by directory scans (the disk tier's cap check walks the tree anyway) and kept current
by this process's own writes and deletions. Blocks that another server writes into a shared directory become
visible at this process's next scan (every ``rescan_seconds``; a lookup that finds the index stale starts one in
the background). Until the first scan has finished the index knows nothing, and lookups probe the disk as before.
A name in the index whose file is gone (another server evicted it) is found at the read: a miss, then dropped.
"""

from __future__ import annotations

import threading
import time


class DiskNameIndex:
    """Set of block file names present in one directory tree. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._names: set[str] | None = None  # None until the first scan has finished: "unknown"
        self._scan_started: float | None = None  # monotonic start of the scan in progress
        self._changed_during_scan: dict[str, bool] = {}  # name -> present, for changes a running scan may miss

    @property
    def ready(self) -> bool:
        return self._names is not None

    def might_hold(self, name: str) -> bool:
        """False only when the index is complete and ``name`` is not in it (no need to touch the disk)."""
        with self._lock:
            return self._names is None or name in self._names

    def add(self, name: str) -> None:
        self._set(name, True)

    def discard(self, name: str) -> None:
        self._set(name, False)

    def _set(self, name: str, present: bool) -> None:
        with self._lock:
            if self._names is not None:
                (self._names.add if present else self._names.discard)(name)
            if self._scan_started is not None:
                self._changed_during_scan[name] = present

    def begin_scan(self) -> bool:
        """Mark a scan as started; False if one is already running (the caller then skips its own)."""
        with self._lock:
            if self._scan_started is not None:
                return False
            self._scan_started, self._changed_during_scan = time.monotonic(), {}
            return True

    def end_scan(self, names: set[str] | None) -> None:
        """Install a finished scan's names (None: the scan failed, keep what we had). Writes and deletions made
        while it ran are applied on top: the walk may have passed their directory before or after them."""
        with self._lock:
            if names is not None:
                for name, present in self._changed_during_scan.items():
                    (names.add if present else names.discard)(name)
                self._names = names
            self._scan_started, self._changed_during_scan = None, {}

    def __len__(self) -> int:
        with self._lock:
            return len(self._names or ())
