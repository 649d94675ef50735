"""Tier 3: KV blocks in a remote store that servers on several machines share (a Mooncake Store).

Behind DRAM and disk. ``put`` writes through asynchronously: a copy of the block goes into a bounded queue that one
writer thread empties; when the queue is full, or the tier is down, the block is dropped and counted
(``remote_put_dropped``), never waited for. Lookups and reads that DRAM and disk miss ask the remote store; the block
store promotes a remote hit into DRAM, like a disk hit.

Records: exactly the disk tier's bytes (``block_format.py``: header, key, CRC, and the keyed tag with
``auth_key_file``) under the name ``longseq-kv/<fingerprint digest>/<blake2b(key)>``, so another model's or layout's
blocks never match. Whoever can reach the master can write any object, so every record read is hostile input: its
size is checked before it is fetched, then the header, fingerprint, key and CRC or tag. A failed check is a miss
(``remote_failed_checks``) and the object is removed, so that the next put replaces it.

Failures never reach the engine: every call waits at most ``timeout_s`` (``remote_guard.TimedCalls``) and is wrapped;
an exception, a timeout or a status that says the store is unusable is a counted miss (``remote_errors``) and trips
the circuit breaker (down for 1 s, doubling up to 30 s), during which lookups and puts skip the tier at once. After
the backoff one call retries; the Mooncake client reconnects to a restarted master by itself. DRAM and disk keep every
block whatever happens here.
"""

from __future__ import annotations

import hashlib
import logging
import queue
import threading
import time
from typing import Callable

import numpy as np
import torch

from .block_format import BlockCheckError, encode_record, parse_record, record_size
from .dram import copy_bytes, host_bytes
from .fingerprint import KVFingerprint
from .mooncake_client import CallRejected, MooncakeClient
from .remote_guard import CircuitBreaker, TimedCalls
from .settings import GIB, KVConfigError, RemoteSettings
from .stats import StatsRecorder
from .trust import AuthFailure, BlockAuth

log = logging.getLogger("longseq.kv_offload")

#: Threads that run remote calls: the store's reader threads (8) and the writer, plus one spare.
CALL_THREADS = 10
#: A write may take this many times ``timeout_s`` (it moves a whole block, and only the writer thread waits for it).
WRITE_TIMEOUT_FACTOR = 5
#: Seconds ``close`` waits for queued writes, then for the client to leave the pool.
CLOSE_TIMEOUT_S = 10.0
FAILED = object()  # what a guarded call returns when it failed
#: ``source(key, out)``: copy block ``key``'s bytes from a local tier into ``out`` (flat uint8); False if gone.
LocalSource = Callable[[bytes, torch.Tensor], bool]


def remote_name(digest: bytes, key: bytes) -> str:
    """The object name of block ``key`` under fingerprint ``digest``."""
    return f"longseq-kv/{digest.hex()}/{hashlib.blake2b(key, digest_size=16).hexdigest()}"


def open_remote_tier(settings: RemoteSettings | None, optional: bool, fingerprint: KVFingerprint,
                     recorder: StatsRecorder, block_nbytes: int | None, auth: BlockAuth | None,
                     prefix: str = "kv store", source: LocalSource | None = None) -> "RemoteTier | None":
    """The remote tier for ``settings`` (None: no tier). A tier that cannot start (client package missing, master
    unreachable, set-up failed) raises the KVConfigError naming the setting, or with ``optional`` logs it as a
    warning and returns None: the server then runs with its local tiers only. ``source``: see ``RemoteTier``."""
    opened = open_client(settings, optional, prefix, CALL_THREADS, "longseq-kv-remote",
                         "serving without the remote tier")
    return None if opened is None else RemoteTier(*opened, settings, fingerprint, recorder, block_nbytes, auth,
                                                  source=source)


def open_client(settings: RemoteSettings | None, optional: bool, prefix: str, threads: int, thread_name: str,
                without: str) -> "tuple[MooncakeClient, TimedCalls] | None":
    """A connected client and the ``threads`` call threads that bound its calls; None without ``settings``, or when
    it cannot connect and ``optional`` is set (then the KVConfigError is logged as a warning ending in ``without``)."""
    if settings is None:
        return None
    calls = TimedCalls(threads, thread_name)
    try:
        return MooncakeClient.open(settings, prefix, calls.run), calls
    except KVConfigError as e:
        calls.stop(threads)
        if not optional:
            raise
        log.warning("%s; remote_optional is true: %s", e, without)
        return None


class GuardedClient:
    """A Mooncake client whose calls wait at most ``timeout_s`` each and never raise (the tier's and the scheduler
    probe's one rule). A failed call (an exception, a timeout, a status that says the store is unusable) calls
    ``on_error`` and trips ``breaker``: down for ``min_backoff_s``, doubling up to ``max_backoff_s``, logged once per
    trip as ``who``; a call the store refused alone (``CallRejected``) is counted but leaves the breaker up."""

    def __init__(self, client: MooncakeClient, calls: TimedCalls, timeout_s: float, who: str,
                 on_error: Callable[[], None], down_note: str = "", min_backoff_s: float = 1.0,
                 max_backoff_s: float = 30.0) -> None:
        self.client, self.calls, self.timeout_s, self.who = client, calls, timeout_s, who
        self._on_error, self._down_note = on_error, down_note
        self.breaker = CircuitBreaker(min_backoff_s, max_backoff_s, trial_s=timeout_s)
        self._warned: set = set()
        self._lock = threading.Lock()

    def call(self, what: str, fn: Callable, timeout: float | None = None):
        """``fn()``'s result, or ``FAILED`` (counted; the breaker trips unless the store refused this call only)."""
        try:
            result = self.calls.run(fn, self.timeout_s if timeout is None else timeout)
        except Exception as e:
            self.count_error(what, e)
            return FAILED
        if self.breaker.succeeded():
            log.info("%s is back", self.who)
        return result

    def count_error(self, what: str, err: Exception) -> None:
        self._on_error()
        if isinstance(err, CallRejected):
            self.log_once(("rejected", what), "%s: %s refused (%s): a miss, the tier stays up (later ones of this "
                          "kind are only counted)", self.who, what, err)
            return
        took_down, wait = self.breaker.failed()
        if took_down:
            log.warning("%s failed on %s (%s: %s): treated as misses, skipped for %.3g s, then retried%s", self.who,
                        what, type(err).__name__, err, wait, self._down_note)
        else:
            log.debug("%s: %s failed (%s: %s)", self.who, what, type(err).__name__, err)

    def log_once(self, kind, msg: str, *args) -> None:
        with self._lock:
            first = kind not in self._warned
            self._warned.add(kind)
        (log.warning if first else log.debug)(msg, *args)

    def close(self, threads: int, timeout: float, idle: bool = True) -> None:
        """Leave the pool (at most ``timeout``) and stop the ``threads`` call threads. The client is left open while
        the breaker is down (leaving a dead master's pool blocks for seconds, and the master drops a silent client by
        itself), while a call is still blocked in it (closing it under a running call is not safe) or unless
        ``idle``."""
        if idle and self.breaker.up and self.calls.running == 0:
            try:
                self.calls.run(self.client.close, timeout)
            except Exception as e:
                log.debug("%s: closing the client failed (%s: %s)", self.who, type(e).__name__, e)
        self.calls.stop(threads)


class RemoteTier:
    """Blocks of one fingerprint in a remote store (see the module docstring). Thread-safe; no method raises for
    anything the remote store does or holds.

    ``source``: where the writer copies a queued block from when it writes it (the block store's DRAM and disk).
    With it the queue holds keys only, so a long prompt's blocks all fit in it; a block no local tier holds by
    then is dropped (counted). Without it each queued block is a private copy."""

    def __init__(self, client: MooncakeClient, calls: TimedCalls, settings: RemoteSettings,
                 fingerprint: KVFingerprint, recorder: StatsRecorder, block_nbytes: int | None,
                 auth: BlockAuth | None, min_backoff_s: float = 1.0, max_backoff_s: float = 30.0,
                 source: LocalSource | None = None) -> None:
        self.client, self.rec = client, recorder
        self._source = source
        self._staging: dict[int, torch.Tensor] = {}  # the writer's one buffer per block size (source mode)
        self.digest = fingerprint.digest()
        self.block_nbytes, self.auth = block_nbytes, auth
        self.timeout_s = settings.timeout_s
        self.max_record = int(settings.buffer_gib * GIB)  # nothing larger passes the client's transfer buffer
        self.where = f"Mooncake Store at {settings.master}"
        self._guard = GuardedClient(client, calls, settings.timeout_s, f"kv store: remote tier ({self.where})",
                                    lambda: recorder.add("remote_errors"), "; DRAM and disk keep serving",
                                    min_backoff_s, max_backoff_s)
        self.breaker = self._guard.breaker
        self._queue: queue.Queue = queue.Queue(maxsize=settings.queue_blocks)
        self._idle = threading.Condition()
        self._unfinished = 0  # queued or being written
        self._closed = False
        recorder.add_remote_tier()
        self._writer = threading.Thread(target=self._writer_loop, name="longseq-kv-remote-writer", daemon=True)
        self._writer.start()

    @property
    def up(self) -> bool:
        return self.breaker.up

    # ---- lookups and reads --------------------------------------------------------------------
    def contains_batch(self, keys: list[bytes]) -> list[bool]:
        """Whether each block is in the remote store (one request; the record is checked when read)."""
        self.rec.add("remote_lookups", len(keys))
        if not keys or not self.breaker.allow():
            return [False] * len(keys)
        names = [remote_name(self.digest, k) for k in keys]
        found = self._guard.call("lookup", lambda: self.client.exists(names))
        return [False] * len(keys) if found is FAILED else found

    def read(self, key: bytes, alloc: Callable[[int], torch.Tensor]) -> torch.Tensor | None:
        """The block's payload in ``alloc(nbytes)`` (a flat uint8 CPU tensor), or None on a miss, a failed check, an
        error or a skipped (down) tier, each counted. ``alloc`` may raise (e.g. the caller's buffer has another
        size): a miss. Nothing is allocated before the record's size is known to fit."""
        self.rec.add("remote_lookups")
        t0 = time.perf_counter()
        got = self._read(key, alloc) if self.breaker.allow() else None
        if got is None:
            self.rec.miss("remote")
        else:
            self.rec.hit("remote", got.numel(), time.perf_counter() - t0)
        return got

    def _read(self, key: bytes, alloc: Callable[[int], torch.Tensor]) -> torch.Tensor | None:
        name = remote_name(self.digest, key)
        size = self._guard.call("size", lambda: self.client.size(name))
        if size is FAILED or size is None:
            return None
        fits = self._record_sizes(key)
        if not (size in fits if fits else 0 < size <= self.max_record):
            expected = " or ".join(map(str, sorted(fits))) if fits else f"at most {self.max_record}"
            return self._failed_check(name, f"object is {size} bytes, a block record here is {expected}")
        data = self._guard.call("read", lambda: self.client.get(name))
        if data is FAILED:
            return None
        if len(data) != size:
            if not data:  # gone since get_size (evicted, removed) or a failed read: the binding does not say which
                self._guard.count_error("read", CallRejected(f"get of {size} bytes returned nothing"))
                return None
            return self._failed_check(name, f"object is {len(data)} bytes, get_size said {size}")
        try:
            payload = parse_record(data, self.digest, key, self.auth, self.block_nbytes, self.max_record)
        except (BlockCheckError, AuthFailure) as e:
            return self._failed_check(name, e)
        try:
            buf = alloc(len(payload))
        except Exception as e:
            log.warning("kv store: remote block %s not usable here (%s: %s): miss", name, type(e).__name__, e)
            return None
        np.copyto(buf.numpy(), np.frombuffer(payload, dtype=np.uint8))
        return buf

    def _record_sizes(self, key: bytes) -> set[int]:
        """Sizes a good record of ``key`` can have (empty: any, blocks of unknown size). Without a key both the plain
        and the tagged format are read (as on disk); with one only tagged records are."""
        if self.block_nbytes is None:
            return set()
        tagged = record_size(key, self.block_nbytes, True)
        return {tagged} if self.auth is not None else {tagged, record_size(key, self.block_nbytes, False)}

    def _failed_check(self, name: str, err) -> None:
        """Count and log a record that failed a check, and queue its removal (the next put then stores a good
        one: an existing object is never overwritten)."""
        self.rec.add("remote_failed_checks")
        self._guard.log_once(("check", type(err).__name__), "kv store: remote block %s failed a check (%s): treated "
                             "as a miss and removed (later ones of this kind are only counted)", name, err)
        self._enqueue(("remove", name, None))
        return None

    # ---- writes -------------------------------------------------------------------------------
    def put(self, key: bytes, src: torch.Tensor) -> None:
        """Queue a copy of block ``src`` (flat uint8) for the writer; dropped and counted when the queue is full,
        the tier is down or closed. Never blocks on the remote store."""
        if self._closed or self.breaker.skipping() or self._queue.full():
            self.rec.add("remote_put_dropped")
            return
        item = (("put_key", key, src.numel()) if self._source is not None
                else ("put", key, copy_bytes(host_bytes(src.numel()), src)))
        if not self._enqueue(item):
            self.rec.add("remote_put_dropped")

    def _enqueue(self, item: tuple) -> bool:
        with self._idle:
            if self._closed:
                return False
            try:
                self._queue.put_nowait(item)
            except queue.Full:
                return False
            self._unfinished += 1
            return True

    def _writer_loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            kind, what, buf = item
            try:
                if kind == "put":
                    self._write(what, buf)
                elif kind == "put_key":
                    self._write_from_source(what, buf)
                elif self.breaker.allow():
                    self._guard.call("remove", lambda: self.client.remove(what))
            except Exception:  # never let one block kill the writer
                self._guard.count_error(kind, RuntimeError("unexpected error in the remote writer"))
                log.exception("kv store: unexpected error in the remote writer")
            finally:
                with self._idle:
                    self._unfinished -= 1
                    self._idle.notify_all()

    def _write_from_source(self, key: bytes, nbytes: int) -> None:
        if self.breaker.skipping():  # no side effect: _write's allow() takes the trial call when one is due
            self.rec.add("remote_put_dropped")
            return
        buf = self._staging.get(nbytes)
        if buf is None:
            buf = self._staging[nbytes] = host_bytes(nbytes)
        if not self._source(key, buf):  # evicted from DRAM and not on disk before its turn came
            self.rec.add("remote_put_dropped")
            return
        if not self._write(key, buf):
            # a timed-out put may still be reading the buffer in its call thread: never refill it under it
            self._staging.pop(nbytes, None)

    def _write(self, key: bytes, buf: torch.Tensor) -> bool:
        """Write block ``key`` from ``buf`` (or drop it, counted, while the tier is down); False if the call failed
        or timed out (counted): a timed-out call may still be reading ``buf``."""
        if not self.breaker.allow():
            self.rec.add("remote_put_dropped")
            return True
        t0 = time.perf_counter()
        chunks = encode_record(self.digest, key, memoryview(buf.numpy()).cast("B"), self.auth)
        name = remote_name(self.digest, key)
        if self._guard.call("write", lambda: self.client.put(name, chunks),
                            self.timeout_s * WRITE_TIMEOUT_FACTOR) is FAILED:
            return False
        self.rec.wrote("remote", buf.numel(), time.perf_counter() - t0)
        return True

    # ---- lifecycle ----------------------------------------------------------------------------
    def flush(self, timeout: float | None = None) -> bool:
        """Wait until the queued writes are done (or ``timeout`` seconds passed); True if they are."""
        with self._idle:
            return self._idle.wait_for(lambda: self._unfinished == 0, timeout=timeout)

    def close(self) -> None:
        """Write what is queued (at most ``CLOSE_TIMEOUT_S``), drop the rest (counted), stop the writer and leave
        the pool (at most ``CLOSE_TIMEOUT_S``; not while the tier is down or a call is stuck: ``GuardedClient.close``).
        Idempotent."""
        with self._idle:
            if self._closed:
                return
            self._closed = True
        self.flush(CLOSE_TIMEOUT_S)
        dropped = 0
        while True:  # left by a writer that is stuck in a call
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            dropped += item[0] in ("put", "put_key")
            with self._idle:
                self._unfinished -= 1
        if dropped:
            self.rec.add("remote_put_dropped", dropped)
        self._queue.put_nowait(None)
        self._writer.join(timeout=1.0)
        self._guard.close(CALL_THREADS, CLOSE_TIMEOUT_S, idle=not self._writer.is_alive())
