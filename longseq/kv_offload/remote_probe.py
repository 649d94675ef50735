"""Which blocks the remote store holds for every tensor-parallel rank, asked by a scheduler that holds no store.

With tensor parallelism the scheduler runs in another process than the workers, so it cannot ask their stores
(``vllm_hits.KeyIndexHits``). For the remote tier it asks the Mooncake master directly: one client of its own that
adds no memory to the pool, one ``batch_is_exist`` request per lookup for every rank's object names (each rank
stores its own heads under its own fingerprint). Presence only: each worker reads and checks its records when it
loads them, and a record that fails there is recomputed (as for disk probes). The same time bound and circuit
breaker as the tier: a failed or slow call is a miss, and the master is skipped for a while.
"""

from __future__ import annotations

import dataclasses
import logging

from .fingerprint import KVFingerprint
from .mooncake_client import MooncakeClient
from .remote import open_client, remote_name
from .remote_guard import CircuitBreaker, TimedCalls
from .settings import RemoteSettings

log = logging.getLogger("longseq.kv_offload")

#: The probe's transfer buffer: it moves no block, but the client needs one.
PROBE_BUFFER_GIB = 1 / 64
_THREADS = 2


class RemoteProbe:
    """Presence of blocks in the remote store for a set of fingerprints (the ranks'). Thread-safe; never raises
    for anything the store does."""

    def __init__(self, client: MooncakeClient, calls: TimedCalls, timeout_s: float, where: str) -> None:
        self.client, self._calls, self.timeout_s, self.where = client, calls, timeout_s, where
        self.breaker = CircuitBreaker(1.0, 30.0, trial_s=timeout_s)
        self.lookups = self.errors = 0

    @classmethod
    def open(cls, settings: RemoteSettings | None, optional: bool, prefix: str) -> "RemoteProbe | None":
        """A probe on ``settings``' master (None without a remote tier). Start-up failures are the tier's: a
        KVConfigError naming the setting, or with ``optional`` a warning and no probe."""
        if settings is None:
            return None
        probe_settings = dataclasses.replace(settings, segment_gib=0.0, buffer_gib=PROBE_BUFFER_GIB)
        opened = open_client(probe_settings, optional, prefix, _THREADS, "longseq-kv-remote-probe",
                             "the scheduler counts no remote hits")
        return None if opened is None else cls(*opened, settings.timeout_s, f"Mooncake Store at {settings.master}")

    def present(self, fingerprints: list[KVFingerprint], keys: list[bytes]) -> list[list[bool]]:
        """``[rank][i]``: whether rank ``fingerprints[rank]``'s record of ``keys[i]`` is in the store. All False
        when the store is down, slow or fails (counted in ``errors``)."""
        none = [[False] * len(keys) for _ in fingerprints]
        self.lookups += len(keys) * len(fingerprints)
        if not keys or not fingerprints or not self.breaker.allow():
            return none
        names = [remote_name(fp.digest(), k) for fp in fingerprints for k in keys]
        try:
            found = self._calls.run(lambda: self.client.exists(names), self.timeout_s)
        except Exception as e:
            self.errors += 1
            took_down, wait = self.breaker.failed()
            if took_down:
                log.warning("kv scheduler: remote lookup at %s failed (%s: %s): misses, skipped for %.3g s",
                            self.where, type(e).__name__, e, wait)
            return none
        if self.breaker.succeeded():
            log.info("kv scheduler: remote lookups at %s work again", self.where)
        return [found[r * len(keys):(r + 1) * len(keys)] for r in range(len(fingerprints))]

    def counters(self) -> dict:
        return {"up": self.breaker.up, "lookups": self.lookups, "errors": self.errors}

    def close(self) -> None:
        """Leave the master (at most ``timeout_s``; not while the master is down or a call is stuck)."""
        if self.breaker.up and self._calls.running == 0:
            try:
                self._calls.run(self.client.close, max(self.timeout_s, 1.0))
            except Exception as e:
                log.debug("kv scheduler: closing the remote probe failed (%s: %s)", type(e).__name__, e)
        self._calls.stop(_THREADS)
