"""Content-addressed KV block store: CPU DRAM (LRU) in front of a shared disk directory and, optionally, a remote
store shared by servers on several machines (``remote.py``, a Mooncake Store).

Framework-free: the vLLM connector (``kv_offload/vllm.py``) and the SGLang HiCache backend
(``kv_offload/sglang.py``) both sit on this. A block is a flat run of bytes (one page of KV for every
layer this process holds, in whatever layout the framework uses); the key is the caller's prefix-hash-chain
element for that block, and the store namespaces it with the ``KVFingerprint`` digest, so blocks of
another model / layout / dtype / block size are never returned.

Threads: ``put``/``get``/``contains`` are called from the engine thread; disk writes run in one background
writer thread (``async_disk_writes=True``), remote writes in another. One lock guards the DRAM tier and the
pending-write map; disk and remote reads and writes happen outside it. Lookups fall back DRAM -> disk -> remote, and
a disk or remote hit is promoted into DRAM. The tiers' own logic lives in ``dram.py``, ``disk.py`` and ``remote.py``;
what stays here (past 500 lines) is what shares that lock, so it is kept in one class.

Lookups (``contains``, ``count_prefix_hits``, ``fetch_prefix_to_dram``, ``get``, the DRAM batch reads) never raise
once their arguments are checked: whatever goes wrong below (a hostile file or remote record, a failed allocation, an
OS error, a remote store that is down) is a counted miss, so a broken cache costs recompute, never an exception in
the engine.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import torch

from .block_format import record_size
from .dram import DramTier, as_bytes, copy_bytes, default_pin_memory, host_bytes
from .disk import HEADER_SIZE, DiskTier, SizeMismatch
from .fingerprint import KVFingerprint
from .remote import open_remote_tier
from .settings import RemoteSettings, cache_dir, check_remote_sizes, check_tier_sizes, flag, remote_setting, size_gib
from .stats import StatsRecorder, StoreStats, TierStats, ensure_log_visible
from .trust import trust_policy

__all__ = ["BlockStore", "KVFingerprint", "StoreStats", "TierStats"]

log = logging.getLogger("longseq.kv_offload")
GIB = 1 << 30
#: Threads ``read_parallel`` (``fetch_prefix_to_dram``, SGLang's ``batch_get_v1``) reads blocks with (file reads,
#: crc32, large copies and the remote client's waits release the GIL).
READ_THREADS = 8
#: A key length the remote transfer buffer must leave room for beside one block (keys here are 16-64 bytes).
ROOMY_KEY = b"k" * 256


def _nbytes(out) -> int:
    """Bytes of a flat uint8 tensor or of a list of them."""
    return out.numel() if isinstance(out, torch.Tensor) else sum(piece.numel() for piece in out)


def _copy_out(dst, buf: torch.Tensor):
    """Copy flat ``buf`` into ``dst``: one flat uint8 tensor of its size, or consecutive pieces adding up to it."""
    if isinstance(dst, torch.Tensor):
        return copy_bytes(dst, buf)
    offset = 0
    for piece in dst:
        copy_bytes(piece, buf[offset: offset + piece.numel()])
        offset += piece.numel()
    return dst


def _check_key(key: bytes) -> bytes:
    if isinstance(key, (bytearray, memoryview)):
        return bytes(key)
    if not isinstance(key, bytes) or not key:
        raise TypeError(f"block key must be non-empty bytes, got {type(key).__name__}")
    return key


class BlockStore:
    """Content-addressed KV block store: DRAM, disk, remote. Keys are bytes (caller's prefix-hash chain element);
    the store namespaces them with the fingerprint digest, so other models' blocks are never returned.

    cpu_gib:        DRAM tier size (GiB); 0 disables it (then blocks wait in DRAM only until written to disk)
    disk_dir:       disk tier directory (created; may be shared by several servers), None = DRAM only
    disk_gib:       disk tier size cap (GiB) for the whole directory; must be > 0 with ``disk_dir``
    pin_memory:     pinned host buffers for the DRAM tier; default: ``torch.cuda.is_available()``
    async_disk_writes: write-through to disk in a background thread (False: inside ``put``)
    fsync:          fsync each block file before publishing it (durability across power loss; slower)
    max_pending_write_gib: disk writes queued beyond this are dropped (counted), so a slow disk never
                    blocks the engine or grows memory without bound
    log_interval_s: seconds between one-line stats summaries on the ``longseq.kv_offload`` logger (0: never)
    block_nbytes:   the byte size of every block, when the caller knows it (the framework adapters do): a disk
                    file of another size is corrupt, a ``put`` of another size is refused, and a tier that cannot
                    hold one block is refused here. None: blocks of any size (a disk file is then only bounded
                    by the disk cap)
    shared_group:   False: what the store creates is private (dirs 0700, files 0600, whatever the umask); True:
                    group-shared (02770 / 0660); a group name: also chown-ed to that group (``trust.py``)
    auth_key_file:  a file holding a secret key (0600, ours): blocks are written with a keyed tag and only blocks
                    with a valid tag are served (others are misses, counted as ``auth_failures`` and deleted; remote
                    ones as ``remote_failed_checks``)
    remote:         the ``remote`` config object (``settings.remote_setting``: ``{"kind": "mooncake", "master":
                    "HOST:PORT", ...}``) or parsed ``RemoteSettings``; None: no remote tier. Joined here: a master
                    that cannot be reached is a KVConfigError naming ``remote.master``
    remote_optional: a remote tier that cannot start is a logged warning and no remote tier, not an error
    """

    def __init__(self, fingerprint: KVFingerprint, *, cpu_gib: float, disk_dir: str | None = None,
                 disk_gib: float = 0.0, pin_memory: bool | None = None, async_disk_writes: bool = True,
                 fsync: bool = False, max_pending_write_gib: float = 1.0, log_interval_s: float = 60.0,
                 block_nbytes: int | None = None, shared_group: bool | str = False,
                 auth_key_file: str | None = None, remote: dict | RemoteSettings | None = None,
                 remote_optional: bool = False) -> None:
        if not isinstance(fingerprint, KVFingerprint):
            raise TypeError(f"fingerprint must be a KVFingerprint, got {type(fingerprint).__name__}")
        cpu_gib = size_gib("kv store", "cpu_gib", cpu_gib)
        disk_gib = size_gib("kv store", "disk_gib", disk_gib)
        max_pending_write_gib = size_gib("kv store", "max_pending_write_gib", max_pending_write_gib)
        disk_dir = cache_dir("kv store", "disk_dir", disk_dir)
        if disk_dir is not None and not disk_gib > 0:
            raise ValueError(f"kv store: disk_gib must be > 0 when disk_dir is set (disk_dir={disk_dir!r}, "
                             f"disk_gib={disk_gib!r})")
        if block_nbytes is not None and (isinstance(block_nbytes, bool) or not isinstance(block_nbytes, int)
                                         or block_nbytes <= 0):
            raise ValueError(f"kv store: block_nbytes must be a positive int, got {block_nbytes!r}")
        check_tier_sizes("kv store", cpu_gib, disk_dir, disk_gib, block_nbytes or 0, HEADER_SIZE)
        if not isinstance(remote, RemoteSettings):
            remote = remote_setting("kv store", "remote", remote)
        remote_optional = flag("kv store", "remote_optional", remote_optional)
        check_remote_sizes("kv store", remote, record_size(ROOMY_KEY, block_nbytes, True) if block_nbytes else 0)
        trust = trust_policy("kv store", shared_group, auth_key_file)
        self.block_nbytes = block_nbytes
        self.fingerprint = fingerprint
        self.pin_memory = default_pin_memory() if pin_memory is None else bool(pin_memory)
        if self.pin_memory and not torch.cuda.is_available():
            raise ValueError("kv store: pin_memory=True needs a CUDA device (pinned host memory is a CUDA feature)")
        self._rec = StatsRecorder()
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._pending: dict[bytes, torch.Tensor] = {}  # key -> bytes waiting for the disk writer
        self._pending_bytes = 0
        self._pending_dram_owned: set[bytes] = set()  # pending keys whose buffer came from the DRAM allocator
        self._max_pending_bytes = int(max_pending_write_gib * GIB)
        # data_ptr of a DRAM-allocator buffer copied out without the lock -> [readers, allocator-owned]
        self._reading: dict[int, list] = {}
        self._dram = DramTier(int(cpu_gib * GIB), self.pin_memory,
                              can_recycle=lambda k, buf: k not in self._pending and buf.data_ptr() not in self._reading)
        self._disk = DiskTier(disk_dir, fingerprint, int(disk_gib * GIB), self._rec, fsync=fsync,
                              block_nbytes=block_nbytes, trust=trust) if disk_dir is not None else None
        # With a local tier the remote writer's queue holds keys and copies each block out when it writes it;
        # with none it needs a private copy per queued block.
        source = self._copy_local if cpu_gib > 0 or disk_dir else None
        self._remote = open_remote_tier(remote, remote_optional, fingerprint, self._rec, block_nbytes, trust.auth,
                                        source=source)
        self._log_interval_s = log_interval_s
        self._last_log = time.monotonic()
        self._closed = False
        self._read_pool: ThreadPoolExecutor | None = None
        self._queue: queue.SimpleQueue | None = None
        self._writer: threading.Thread | None = None
        if self._disk is not None and async_disk_writes:
            self._queue = queue.SimpleQueue()
            self._writer = threading.Thread(target=self._writer_loop, name="longseq-kv-disk-writer", daemon=True)
            self._writer.start()
        ensure_log_visible(log)
        log.info("kv store: %s, dram %.3g GiB (%s), disk %s, remote %s%s", fingerprint.model, cpu_gib,
                 "pinned" if self.pin_memory else "pageable",
                 f"{disk_dir} cap {disk_gib:.3g} GiB" if disk_dir else "off",
                 self._remote.where if self._remote is not None else "off",
                 ", blocks tagged with auth_key_file" if trust.auth and (disk_dir or self._remote) else "")

    # ---- lookups ----------------------------------------------------------------------------
    def record_lookup_error(self, where: str, err: BaseException) -> None:
        """Count an unexpected exception on a lookup or load (here or in a framework adapter) and log it; the
        caller then answers with a miss."""
        self._rec.add("lookup_errors")
        log.warning("kv store: %s failed (%s: %s): treated as a miss", where, type(err).__name__, err,
                    exc_info=log.isEnabledFor(logging.DEBUG))

    def contains(self, key: bytes) -> bool:
        """In DRAM, waiting for the disk writer, on disk with a valid header, or in the remote store. Cheap (no
        payload read; a remote record is checked when it is read)."""
        key = _check_key(key)
        try:
            return self._local_contains(key) or (self._remote is not None and self._remote.contains_batch([key])[0])
        except Exception as e:
            self.record_lookup_error("contains", e)
            return False

    def _local_contains(self, key: bytes) -> bool:
        return self.in_dram(key) or (self._disk is not None and self._disk.probe(key))

    def count_prefix_hits(self, keys: list[bytes]) -> int:
        """Number of leading ``keys`` present (stops at the first miss): the reusable prefix length in blocks.
        The remote store is asked once, for every key from the first one DRAM and disk miss."""
        keys = [_check_key(k) for k in keys]
        n = 0
        with self._lock:  # one lock for the DRAM-resident part (per-key locking adds up over a long prefix)
            for key in keys:
                if not self._resident(key):
                    break
                n += 1
        try:
            remote_from, in_remote = n, None
            for i in range(n, len(keys)):
                if not self._local_contains(keys[i]):
                    if self._remote is None:
                        break
                    if in_remote is None:
                        remote_from, in_remote = i, self._remote.contains_batch(keys[i:])
                    if not in_remote[i - remote_from]:
                        break
                n += 1
        except Exception as e:
            self.record_lookup_error("count_prefix_hits", e)
        return n

    def in_dram_batch(self, keys: list[bytes]) -> list[bool]:
        """``in_dram`` for each key, under one lock."""
        keys = [_check_key(k) for k in keys]
        with self._lock:
            return [self._resident(k) for k in keys]

    def get(self, key: bytes, out: torch.Tensor | list[torch.Tensor] | None = None,
            staging: torch.Tensor | None = None) -> torch.Tensor | list[torch.Tensor] | None:
        """The block's bytes, or None on a miss or on ANY failed check (logged and counted, never data).

        out: optional contiguous tensor of exactly the block's byte size (any dtype/shape), or a list of contiguous
             CPU tensors whose sizes add up to it (the block's bytes in order, e.g. one page's K and V runs in a
             host pool); filled and returned. Without it a new flat uint8 CPU tensor (a copy, safe to keep) is
             returned. On a miss ``out`` may have been partly written (disk reads land in it directly): ignore it.
        staging: with a list ``out``, a flat uint8 CPU tensor of the block's size that disk and remote reads land in
             before they are checked and copied out (a DRAM hit is copied straight into ``out``); default: a new one.
        A disk or remote hit is promoted into the DRAM tier.
        """
        key = _check_key(key)
        if isinstance(out, (list, tuple)):
            out_bytes = [as_bytes(piece) for piece in out]
        else:
            out_bytes = as_bytes(out) if out is not None else None
        try:
            got = self._get_dram(key, out_bytes)
            if got is None and (self._disk is not None or self._remote is not None):
                got = self._read_below_dram(key, out_bytes, staging)
        except Exception as e:
            self.record_lookup_error("get", e)
            got = None
        self._maybe_log()
        if got is None:
            return None
        return out if out is not None else got

    def fetch_prefix_to_dram(self, keys: list[bytes]) -> int:
        """How many leading ``keys`` are usable now without a disk or remote read: DRAM blocks are; disk and remote
        blocks are read (checked) and promoted into DRAM, several at once, since that read is their tier's whole cost.
        The count stops at the first miss or failed check (that block is not data, and a prefix cannot skip it)."""
        keys = [_check_key(k) for k in keys]
        try:
            on_disk = [k for k, resident in zip(keys, self.in_dram_batch(keys)) if not resident]
            if self._disk is None and self._remote is None:
                got = dict.fromkeys(on_disk, False)
            else:
                got = dict(zip(on_disk, self.read_parallel(lambda k: self.get(k) is not None, on_disk)))
        except Exception as e:
            self.record_lookup_error("fetch_prefix_to_dram", e)
            return 0
        ok = [got.get(k, True) for k in keys]
        return ok.index(False) if False in ok else len(ok)

    def read_parallel(self, read: Callable, items: list) -> list:
        """``[read(item) for item in items]``, on the store's read threads when there are several (disk reads,
        crc32, copies of large blocks and remote waits release the GIL). ``read`` must not raise."""
        if len(items) <= 1:
            return [read(item) for item in items]
        with self._lock:
            if self._read_pool is None:
                self._read_pool = ThreadPoolExecutor(READ_THREADS, thread_name_prefix="longseq-kv-read")
        return list(self._read_pool.map(read, items))

    def forget(self, keys: list[bytes]) -> None:
        """Drop ``keys`` from the DRAM tier (blocks that failed to load: counted again only once saved again).
        A bad disk file was already deleted by the check that failed; a block still queued for the disk writer
        stays with it. Never raises."""
        try:
            with self._lock:
                for key in map(_check_key, keys):
                    if key not in self._pending:
                        self._dram.discard(key)
        except Exception as e:
            self.record_lookup_error("forget", e)

    def dram_capacity_blocks(self, block_nbytes: int) -> int:
        """How many blocks of ``block_nbytes`` the DRAM tier holds when full."""
        return self._dram.capacity_bytes // max(1, int(block_nbytes))

    def in_dram(self, key: bytes) -> bool:
        """In the DRAM tier or waiting for the disk writer: ``get`` needs no disk read."""
        key = _check_key(key)
        with self._lock:
            return self._resident(key)

    def _resident(self, key: bytes) -> bool:
        """Under ``self._lock``: in the DRAM tier or waiting for the disk writer."""
        return key in self._dram or key in self._pending

    def read_dram_batch(self, keys: list[bytes], nbytes: int, read: Callable[[list[torch.Tensor | None]], None],
                        pinned_only: bool = False) -> list[bool]:
        """Call ``read(bufs)`` under the store lock with the stored buffer (flat uint8, pinned on CUDA) of each
        key, or None where the block is not in DRAM (or not ``nbytes`` long, or with ``pinned_only`` not in
        pinned memory: read those with ``get``).
        ``read`` must be done with the buffers when it returns (synchronize any async copy from them): once the
        lock is released, eviction may recycle them. Counted as DRAM hits/misses; returns which were found."""
        t0 = time.perf_counter()
        keys = [_check_key(k) for k in keys]
        try:
            with self._lock:
                bufs = []
                usable = not pinned_only or self._dram.allocator.pin_memory
                for key in keys:
                    buf = None
                    if usable:
                        buf = self._dram.lookup(key)
                        if buf is None and (not pinned_only or key in self._pending_dram_owned):
                            buf = self._pending.get(key)  # queued for the disk writer (a private copy is pageable)
                    bufs.append(buf if buf is not None and buf.numel() == nbytes else None)
                read(bufs)
        except Exception as e:  # nothing is reported found: the caller reads each block again (or recomputes)
            self.record_lookup_error("read_dram_batch", e)
            bufs = [None] * len(keys)
        found = [b is not None for b in bufs]
        if any(found):
            self._rec.hit("dram", nbytes * sum(found), time.perf_counter() - t0, n=sum(found))
        if not all(found):
            self._rec.add("misses", len(found) - sum(found), tier="dram")
        self._maybe_log()
        return found

    def get_dram_batch(self, keys: list[bytes], outs: list[torch.Tensor],
                       synchronize: Callable[[], None] | None = None) -> list[bool]:
        """Copy the DRAM-resident blocks among ``keys`` into ``outs`` (same-nbytes tensors, e.g. slices of one
        GPU staging tensor) with ``non_blocking=True``; others are left alone and reported False (read
        them with ``get``). ``synchronize`` (e.g. ``torch.cuda.current_stream().synchronize``) runs before
        the lock is released, because the async copies read buffers that eviction may recycle; pass it
        whenever ``outs`` are on a GPU. Counted as DRAM hits/misses."""
        if not outs:
            return []

        def copy(bufs: list[torch.Tensor | None]) -> None:
            for buf, out in zip(bufs, outs):
                if buf is not None:
                    as_bytes(out).copy_(buf, non_blocking=True)
            if synchronize is not None:
                synchronize()

        return self.read_dram_batch(keys, as_bytes(outs[0]).numel(), copy)

    def _get_dram(self, key: bytes, out_bytes) -> torch.Tensor | list[torch.Tensor] | None:
        """DRAM tier (or a block still waiting for the disk writer), copied out WITHOUT the lock so that the read
        threads copy in parallel: the buffer is pinned as being read, and an eviction meanwhile leaves its
        recycling to the last reader (``_unpin``). ``out_bytes``: None, a flat uint8 tensor or a list of them."""
        t0 = time.perf_counter()
        with self._lock:
            buf = self._dram.lookup(key)
            if buf is None:
                buf = self._pending.get(key)
            if buf is None or (out_bytes is not None and _nbytes(out_bytes) != buf.numel()):
                if buf is not None:
                    log.warning("kv store: get(out=) has %d bytes but the block has %d: miss",
                                _nbytes(out_bytes), buf.numel())
                self._rec.miss("dram")
                return None
            pin = self._reading.setdefault(buf.data_ptr(), [0, False])
            pin[0] += 1
            pin[1] = pin[1] or self._dram.holds(key, buf) or key in self._pending_dram_owned
        try:
            result = _copy_out(out_bytes if out_bytes is not None else host_bytes(buf.numel()), buf)
        finally:
            self._unpin(key, buf)
        self._rec.hit("dram", buf.numel(), time.perf_counter() - t0)
        return result

    def _unpin(self, key: bytes, buf: torch.Tensor) -> None:
        """A reader of ``buf`` is done; the last one gives an allocator buffer that no tier holds any more (evicted
        while it was read) back for reuse."""
        with self._lock:
            pin = self._reading[buf.data_ptr()]
            pin[0] -= 1
            if pin[0]:
                return
            del self._reading[buf.data_ptr()]
            if pin[1] and not self._dram.holds(key, buf) and self._pending.get(key) is not buf:
                self._dram.allocator.release(buf)

    def _read_below_dram(self, key: bytes, out_bytes, staging: torch.Tensor | None = None
                         ) -> torch.Tensor | None:
        """Disk, then remote (each counts its own hit or miss); a hit is promoted into DRAM. A CPU ``out_bytes``
        tensor is read into directly; a list of pieces or a device tensor gets the bytes once they are checked."""
        direct = isinstance(out_bytes, torch.Tensor) and out_bytes.device.type == "cpu"

        def alloc(nbytes: int) -> torch.Tensor:
            if out_bytes is not None and _nbytes(out_bytes) != nbytes:
                raise SizeMismatch(f"get(out=) has {_nbytes(out_bytes)} bytes but the block has {nbytes}")
            if direct:
                return out_bytes
            if staging is not None and as_bytes(staging).numel() == nbytes:
                return as_bytes(staging)
            return host_bytes(nbytes)

        buf = None
        if self._disk is not None:
            t0 = time.perf_counter()
            buf = self._disk.read(key, alloc)
            if buf is None:
                self._rec.miss("disk")
            else:
                self._rec.hit("disk", buf.numel(), time.perf_counter() - t0)
        if buf is None and self._remote is not None:
            buf = self._remote.read(key, alloc)
        if buf is None:
            return None
        if out_bytes is not None and not direct:
            _copy_out(out_bytes, buf)
        self._reserve_slab(key, buf.numel())
        with self._lock:
            self._insert_dram(key, buf)
        return buf

    def _copy_local(self, key: bytes, out: torch.Tensor) -> bool:
        """For the remote writer: block ``key``'s bytes from DRAM (or the disk writer's queue), else from disk, into
        ``out`` (flat uint8). False when no local tier holds it any more. Not a lookup: no hit or LRU touch."""
        with self._lock:
            buf = self._dram.peek(key)
            if buf is None:
                buf = self._pending.get(key)
            if buf is not None and buf.numel() == out.numel():
                copy_bytes(out, buf)
                return True
        if self._disk is None:
            return False

        def alloc(nbytes: int) -> torch.Tensor:
            if nbytes != out.numel():
                raise SizeMismatch(f"disk block has {nbytes} bytes, the remote write expected {out.numel()}")
            return out

        return self._disk.read(key, alloc) is not None

    # ---- inserts ----------------------------------------------------------------------------
    def put(self, key: bytes, data: torch.Tensor, *, write_to_disk: bool = True) -> None:
        """Store a block: ``data`` is a contiguous tensor of any dtype/shape (CPU; a CUDA tensor is copied
        synchronously). The bytes are copied into the DRAM tier now and written through to disk in the
        background (and to the remote tier, from a copy queued for its writer). Re-putting a key already held only
        refreshes it (equal keys mean equal bytes). ``write_to_disk=False``: DRAM only, none of the shared tiers (disk,
        remote; e.g. a replica rank whose peer writes the shared copy)."""
        key = _check_key(key)
        src = as_bytes(data)
        if self.block_nbytes is not None and src.numel() != self.block_nbytes:
            raise ValueError(f"kv store: put() of {src.numel()} bytes, but blocks here have {self.block_nbytes}")
        write_now = None
        self._reserve_slab(key, src.numel())
        with self._lock:
            if self._closed:
                raise RuntimeError("kv store: put() after close()")
            if key in self._pending or self._dram.lookup(key) is not None:
                return
            buf = self._insert_dram(key, src)
            if self._disk is not None and write_to_disk:
                if buf is None:  # too big for / no DRAM tier: keep a private copy for the writer
                    buf = copy_bytes(host_bytes(src.numel()), src)
                else:
                    self._pending_dram_owned.add(key)
                if self._pending_bytes + buf.numel() > self._max_pending_bytes:
                    self._rec.add("dropped_writes")
                else:
                    self._pending[key] = buf
                    self._pending_bytes += buf.numel()
                    if self._queue is not None:
                        self._queue.put(key)
                    else:
                        write_now = buf
        if write_now is not None:
            self._write_disk(key, write_now)
        if self._remote is not None and write_to_disk:
            self._remote.put(key, src)
        self._maybe_log()

    def drop_dram_blocks(self) -> None:
        """Empty the DRAM tier but keep its (pinned) buffers: what a restarted server with a reserved tier holds.
        Disk files stay. For benchmarks and tests of the disk path."""
        with self._lock:
            self._dram.drop_blocks()

    def reserve_dram(self, block_nbytes: int) -> int:
        """Allocate the DRAM tier's (pinned) buffers for blocks of ``block_nbytes`` now, before serving;
        returns the bytes allocated (0 without pinning: pageable memory costs nothing to allocate lazily)."""
        with self._lock:
            return self._dram.reserve(block_nbytes)

    def _reserve_slab(self, key: bytes, nbytes: int) -> None:
        """Allocate the pinned slab the next DRAM insert needs OUTSIDE the lock: ``cudaHostAlloc`` is slow
        (docs/benchmarks/kv-offload.md), and under the lock it stalled every lookup (the engine thread's
        ``contains``) while a save thread or disk readers filled the tier. Added only if still needed
        (another thread may have added one meanwhile), so at most one partly carved slab per size remains."""
        dram = self._dram
        with self._lock:
            if not dram.slab_wanted(key, nbytes):
                return
        slab = dram.allocator.new_slab(nbytes)
        with self._lock:
            if dram.allocator.needs_slab(nbytes):
                dram.allocator.add_slab(slab, nbytes)

    def _insert_dram(self, key: bytes, src: torch.Tensor) -> torch.Tensor | None:
        """Under ``self._lock``."""
        t0 = time.perf_counter()
        buf, evicted = self._dram.insert(key, src)
        if evicted:
            self._rec.add("evictions", evicted, tier="dram")
        if buf is not None:
            self._rec.wrote("dram", buf.numel(), time.perf_counter() - t0)
        return buf

    def _write_disk(self, key: bytes, buf: torch.Tensor) -> None:
        t0 = time.perf_counter()
        try:
            if self._disk.write(key, buf):
                self._rec.wrote("disk", buf.numel(), time.perf_counter() - t0)
        except Exception:  # never let one bad block kill the writer thread
            self._rec.add("write_errors")
            log.exception("kv store: unexpected error writing a block to disk")
        finally:
            with self._lock:
                if self._pending.pop(key, None) is not None:
                    self._pending_bytes -= buf.numel()
                if key in self._pending_dram_owned:
                    self._pending_dram_owned.discard(key)
                    # evicted while queued: recycle it now (or its last reader will)
                    if not self._dram.holds(key, buf) and buf.data_ptr() not in self._reading:
                        self._dram.allocator.release(buf)
                self._idle.notify_all()

    def _writer_loop(self) -> None:
        while True:
            key = self._queue.get()
            if key is None:
                return
            with self._lock:
                buf = self._pending.get(key)
            if buf is not None:
                self._write_disk(key, buf)

    # ---- lifecycle and observability --------------------------------------------------------
    def flush(self, timeout: float | None = None) -> None:
        """Wait until every queued disk and remote write is done (or ``timeout`` seconds passed)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            self._idle.wait_for(lambda: not self._pending, timeout=timeout)
        if self._remote is not None:
            self._remote.flush(None if deadline is None else max(0.0, deadline - time.monotonic()))

    def stats(self, log_summary: bool = True) -> StoreStats:
        """Snapshot of the counters; also logs the one-line summary (INFO) unless ``log_summary=False``."""
        with self._lock:
            gauges = dict(dram_bytes=self._dram.used_bytes, dram_blocks=len(self._dram),
                          dram_pinned_bytes=self._dram.allocator.pinned_bytes if self.pin_memory else 0)
        gauges["disk_bytes"] = self._disk.usage_bytes if self._disk is not None else 0
        if self._remote is not None:
            gauges["remote_up"] = self._remote.up
        snap = self._rec.snapshot(**gauges)
        if log_summary:
            log.info(snap.summary())
        return snap

    def _maybe_log(self) -> None:
        if self._log_interval_s and time.monotonic() - self._last_log >= self._log_interval_s:
            self._last_log = time.monotonic()
            self.stats()

    def close(self) -> None:
        """Finish queued disk writes (and remote ones, for a bounded time), stop the writers, leave the remote pool,
        drop the DRAM tier. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        if self._writer is not None:
            self._queue.put(None)
            self._writer.join()
        if self._read_pool is not None:
            self._read_pool.shutdown(wait=True)
        if self._remote is not None:
            self._remote.close()
        self.flush(timeout=0)  # synchronous mode leaves nothing pending; this just wakes waiters
        self.stats()
        with self._lock:
            self._dram.clear()

    def __enter__(self) -> "BlockStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
