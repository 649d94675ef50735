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

from .fingerprint import KVFingerprint
from .mooncake_client import MooncakeClient
from .remote import FAILED, GuardedClient, open_client, remote_name
from .remote_guard import TimedCalls
from .settings import RemoteSettings

#: The probe's transfer buffer: it moves no block, but the client needs one.
PROBE_BUFFER_GIB = 1 / 64
_THREADS = 2


class RemoteProbe:
    """Presence of blocks in the remote store for a set of fingerprints (the ranks'). Thread-safe; never raises
    for anything the store does."""

    def __init__(self, client: MooncakeClient, calls: TimedCalls, timeout_s: float, where: str) -> None:
        self.client, self.timeout_s = client, timeout_s
        self._guard = GuardedClient(client, calls, timeout_s, f"kv scheduler: remote lookups at {where}",
                                    self._count_error)
        self.lookups = self.errors = 0

    def _count_error(self) -> None:
        self.errors += 1

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
        self.lookups += len(keys) * len(fingerprints)
        found = FAILED
        if keys and fingerprints and self._guard.breaker.allow():
            names = [remote_name(fp.digest(), k) for fp in fingerprints for k in keys]
            found = self._guard.call("lookup", lambda: self.client.exists(names))
        if found is FAILED:
            return [[False] * len(keys) for _ in fingerprints]
        return [found[r * len(keys):(r + 1) * len(keys)] for r in range(len(fingerprints))]

    def counters(self) -> dict:
        return {"up": self._guard.breaker.up, "lookups": self.lookups, "errors": self.errors}

    def close(self) -> None:
        """Leave the master (at most ``timeout_s``, at least 1 s; not while it is down or a call is stuck)."""
        self._guard.close(_THREADS, max(self.timeout_s, 1.0))
