"""The Mooncake Store client behind the remote tier: start-up checks, and the few calls the tier makes, with
Mooncake's status codes sorted into "not there", "this call only" and "the store is unusable".

Mooncake Store (github.com/kvcache-ai/Mooncake): a master process keeps the index of objects; every client adds a
segment of its own memory to a pool shared by all clients and moves object bytes to and from the other clients
directly (TCP or RDMA). So an object lives in some client's segment and vanishes when that client stops, and the
master must be running for any lookup. Python client: ``mooncake.store.MooncakeDistributedStore`` from the
``mooncake-transfer-engine`` wheels (``longseq[remote]``); its calls return status integers and do not raise.
"""

from __future__ import annotations

import errno
import logging
import socket
from typing import Callable

from .settings import KVConfigError, RemoteSettings

log = logging.getLogger("longseq.kv_offload")

GIB = 1 << 30
#: Statuses (Mooncake's ErrorCode) that mean the object is not (or no longer, or not yet) there: a plain miss.
ABSENT = {-704: "object not found", -703: "replica not ready", -707: "lease expired"}
#: Statuses that concern this call only (the store itself works): counted, but the tier stays up.
CALL_ONLY = {-705: "object already exists", -706: "object has a lease", -200: "no space left in the pool",
             -600: "invalid parameters (e.g. larger than the transfer buffer)", -400: "invalid key"}
OBJECT_ALREADY_EXISTS = -705
#: How long ``open`` waits for the master's TCP port, and for the client's set-up (Mooncake's own set-up retries
#: an unreachable master for minutes).
CONNECT_TIMEOUT_S = 3.0
SETUP_TIMEOUT_S = 30.0
METADATA_SERVER = "P2PHANDSHAKE"  # clients exchange transfer metadata directly, no etcd


class RemoteUnavailable(Exception):
    """The store answered with a status that says it is unusable now (master gone, RPC or transfer failed)."""


class CallRejected(Exception):
    """The store refused this one call (``CALL_ONLY``); other calls may succeed."""


def status_error(status: int, what: str) -> Exception:
    """The exception for a negative status that is not ``ABSENT``."""
    if status in CALL_ONLY:
        return CallRejected(f"{what}: status {status} ({CALL_ONLY[status]})")
    return RemoteUnavailable(f"{what}: status {status}")


def local_address_towards(host: str, port: int) -> str:
    """The address of this machine's interface that routes to ``host`` (no packet is sent)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.connect((host, port))
        return s.getsockname()[0]


class MooncakeClient:
    """One ``MooncakeDistributedStore`` connected to the master of ``settings``. Thread-safe (the Mooncake client
    is). Every method returns normally only when the store answered; otherwise it raises ``RemoteUnavailable``,
    ``CallRejected``, or whatever the binding raised (the caller treats all of them as a failed call)."""

    def __init__(self, store) -> None:
        self._store = store

    @classmethod
    def open(cls, settings: RemoteSettings, prefix: str, run: Callable[[Callable, float], object],
             name: str = "remote") -> "MooncakeClient":
        """Connect, or raise a KVConfigError naming the setting at fault: the package missing, ``remote.master``
        not reachable, or the client's set-up failing. ``run(fn, timeout)`` runs ``fn`` with a bound on the wait
        (``remote_guard.TimedCalls.run``)."""
        try:
            from mooncake.store import MooncakeDistributedStore
        except ImportError as e:  # also a missing libibverbs.so.1, which the wheel links
            raise KVConfigError(f"{prefix}: {name}.kind='mooncake' needs the Mooncake Store client: pip install "
                                f"'longseq[remote]' (CUDA machines: mooncake-transfer-engine) and, on Debian/Ubuntu, "
                                f"apt-get install libibverbs1 ({e})") from None
        host, port, master = settings.master_host, settings.master_port, settings.master
        try:
            socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S).close()
        except OSError as e:
            why = "no answer" if isinstance(e, TimeoutError) or e.errno == errno.ETIMEDOUT else (e.strerror or str(e))
            raise KVConfigError(f"{prefix}: {name}.master={master!r} is not reachable ({why}): start the Mooncake "
                                f"master there (mooncake_master --port={port}) or set remote_optional: true to serve "
                                f"without the remote tier") from None
        local = settings.local_hostname
        if local is None:
            try:
                local = local_address_towards(host, port)
            except OSError as e:
                raise KVConfigError(f"{prefix}: cannot tell this machine's address towards {name}.master={master!r} "
                                    f"({e}): set {name}.local_hostname") from None
        store = MooncakeDistributedStore()
        try:
            status = run(lambda: store.setup(local, METADATA_SERVER, int(settings.segment_gib * GIB),
                                             int(settings.buffer_gib * GIB), settings.protocol,
                                             settings.rdma_devices, master), SETUP_TIMEOUT_S)
        except Exception as e:  # a timeout, or the binding refusing an argument
            status = f"{type(e).__name__}: {e}"
        if status != 0:
            raise KVConfigError(f"{prefix}: the Mooncake client could not join {name}.master={master!r} as "
                                f"{local!r} ({name}.local_hostname) over {settings.protocol}: set-up returned "
                                f"{status} (its log lines above say why)")
        log.info("kv store: remote tier joined the Mooncake Store at %s as %s (%s, adds %.3g GiB to the pool, "
                 "transfer buffer %.3g GiB)", master, local, settings.protocol, settings.segment_gib,
                 settings.buffer_gib)
        return cls(store)

    def exists(self, names: list[str]) -> list[bool]:
        """Whether each object is there (one request for all)."""
        statuses = self._store.batch_is_exist(names)
        if len(statuses) != len(names):
            raise RemoteUnavailable(f"batch_is_exist answered {len(statuses)} statuses for {len(names)} keys")
        for s in statuses:
            if s < 0 and s not in ABSENT:
                raise status_error(s, "batch_is_exist")
        return [s == 1 for s in statuses]

    def size(self, name: str) -> int | None:
        """The object's size in bytes, None if it is not there."""
        n = self._store.get_size(name)
        if n >= 0:
            return n
        if n in ABSENT:
            return None
        raise status_error(n, "get_size")

    def get(self, name: str) -> bytes:
        """The object's bytes; empty when it is gone or the read failed (the binding does not say which)."""
        return self._store.get(name)

    def put(self, name: str, parts: list) -> None:
        """Store the concatenation of ``parts`` (buffers) as one object; an existing object is kept (content
        addressed: equal names, equal bytes; a bad one is removed by the reader that finds it)."""
        status = self._store.put_parts(name, *parts)
        if status != 0 and status != OBJECT_ALREADY_EXISTS:
            raise status_error(status, "put")

    def remove(self, name: str) -> None:
        """Remove the object even while a reader's lease holds it (only bad records are removed)."""
        status = self._store.remove(name, True)
        if status < 0 and status not in ABSENT:
            raise status_error(status, "remove")

    def close(self) -> None:
        self._store.close()
