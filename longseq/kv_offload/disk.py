"""Tier 2: a directory of block files with a size cap, safe to share between servers.

Layout::

    DIR/blocks/ab/cd/<32 hex>.kvb        one file per block; name = blake2b(fingerprint digest + key)
    DIR/fingerprints/<32 hex>.json       what each fingerprint digest means (model, layout, dtype, block size)

Block file = 48-byte header + key + payload::

    magic "LSQKVBLK" | u16 format version | u16 header size | 16 B fingerprint digest | u32 key length
    | u64 payload bytes | u32 crc32(payload) | u32 crc32(header fields before it + key)

Checksum: ``zlib.crc32``. It is several times faster than blake2b on one core, releases the
GIL on large buffers, and is made for the failure we guard against: accidental corruption (torn or truncated
files, flipped bits), not an adversary. The header has its own crc, so a flipped header byte is caught
before the payload is read.

Writes go to a unique temp file in the block's own directory and are published with ``os.replace``,
which is atomic on POSIX: a reader (this process or another server) sees the whole old file, the whole
new file, or nothing. Any failed check is a miss, never data; the bad file is deleted only if the path
still names the very file we read (same device, inode, size and mtime), so a good block that another
server published meanwhile is left alone. No pickle anywhere: the header is ``struct``, the sidecar JSON.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import struct
import threading
import time
import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterator

from .fingerprint import DIGEST_BYTES, KVFingerprint
from .stats import StatsRecorder

if TYPE_CHECKING:  # torch only for annotations: ``longseq kv stats`` imports this module without torch
    import torch

log = logging.getLogger("longseq.kv_offload")

MAGIC = b"LSQKVBLK"
FORMAT_VERSION = 1
HEADER = struct.Struct("<8sHH16sIQII")  # see module docstring
HEADER_SIZE = HEADER.size  # 48
BLOCK_SUFFIX = ".kvb"
TMP_SUFFIX = ".tmp"
MAX_KEY_BYTES = 1 << 16
STALE_TMP_SECONDS = 600.0  # temp files older than this are a crashed writer's leftovers


class BlockCheckError(Exception):
    """A block file failed a check; the message names which one."""


@dataclass(frozen=True)
class BlockHeader:
    digest: bytes
    key: bytes
    payload_nbytes: int
    payload_crc: int

    @property
    def file_size(self) -> int:
        return HEADER_SIZE + len(self.key) + self.payload_nbytes


def encode_header(digest: bytes, key: bytes, payload_nbytes: int, payload_crc: int) -> bytes:
    head = HEADER.pack(MAGIC, FORMAT_VERSION, HEADER_SIZE, digest, len(key), payload_nbytes, payload_crc, 0)
    header_crc = zlib.crc32(key, zlib.crc32(head[:-4]))
    return head[:-4] + struct.pack("<I", header_crc) + key


def read_header(f, file_size: int) -> BlockHeader:
    """Read and check the header + key from an open binary file at offset 0. Raises BlockCheckError."""
    raw = f.read(HEADER_SIZE)
    if len(raw) != HEADER_SIZE:
        raise BlockCheckError(f"truncated header ({len(raw)} of {HEADER_SIZE} bytes)")
    magic, version, hsize, digest, key_len, nbytes, payload_crc, header_crc = HEADER.unpack(raw)
    if magic != MAGIC:
        raise BlockCheckError("bad magic")
    if version != FORMAT_VERSION or hsize != HEADER_SIZE:
        raise BlockCheckError(f"unknown format version {version} / header size {hsize}")
    if key_len > MAX_KEY_BYTES:
        raise BlockCheckError(f"key length {key_len} too large")
    key = f.read(key_len)
    if len(key) != key_len:
        raise BlockCheckError("truncated key")
    if zlib.crc32(key, zlib.crc32(raw[:-4])) != header_crc:
        raise BlockCheckError("header checksum mismatch")
    header = BlockHeader(digest, key, nbytes, payload_crc)
    if file_size != header.file_size:
        raise BlockCheckError(f"file is {file_size} bytes, header says {header.file_size}")
    return header


def block_name(digest: bytes, key: bytes) -> str:
    return hashlib.blake2b(digest + key, digest_size=16).hexdigest()


def iter_block_files(root: str) -> Iterator[os.DirEntry]:
    """Every ``*.kvb`` and leftover temp file under ``root/blocks`` (two-level fan-out)."""
    blocks = os.path.join(root, "blocks")
    for top in _scandir(blocks):
        if top.is_dir(follow_symlinks=False):
            for sub in _scandir(top.path):
                if sub.is_dir(follow_symlinks=False):
                    yield from (e for e in _scandir(sub.path) if e.is_file(follow_symlinks=False))


def _scandir(path: str) -> list[os.DirEntry]:
    try:
        with os.scandir(path) as it:
            return list(it)
    except OSError:  # removed by another server's eviction, or unreadable: nothing to list
        return []


def write_atomic(path: str, chunks: list, fsync: bool) -> None:
    """Write ``chunks`` (bytes-like) to a unique temp file beside ``path``, then ``os.replace`` it into place."""
    d, name = os.path.split(path)
    tmp = os.path.join(d, f".{name}.{os.getpid()}.{threading.get_ident()}.{os.urandom(4).hex()}{TMP_SUFFIX}")
    try:
        with open(tmp, "xb") as f:
            for c in chunks:
                f.write(c)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def write_fingerprint_sidecar(root: str, fp: KVFingerprint) -> None:
    path = os.path.join(root, "fingerprints", fp.digest().hex() + ".json")
    if os.path.exists(path):
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    doc = json.loads(fp.to_json()) | {"format_version": FORMAT_VERSION, "created_unix": time.time()}
    write_atomic(path, [json.dumps(doc, indent=1).encode()], fsync=False)


class DiskTier:
    """Block files under ``root`` for one fingerprint, at most ``capacity_bytes`` in total (shared by every
    fingerprint and server using the directory; each server evicts oldest-mtime files when it sees the
    directory over the cap). Thread-safe: no shared mutable state except the usage estimate (locked)."""

    def __init__(self, root: str, fingerprint: KVFingerprint, capacity_bytes: int, recorder: StatsRecorder,
                 fsync: bool = False, rescan_seconds: float = 60.0) -> None:
        self.root = os.path.abspath(root)
        self.digest = fingerprint.digest()
        assert len(self.digest) == DIGEST_BYTES
        self.capacity_bytes = int(capacity_bytes)
        self.low_water_bytes = int(capacity_bytes * 0.9)  # evict below the cap so we do not scan on every write
        self.fsync = fsync
        self.rescan_seconds = rescan_seconds
        self.rec = recorder
        self._lock = threading.Lock()
        self._usage: int | None = None  # unknown until the first scan (done by the writer, not at startup)
        self._last_scan = 0.0
        self._warned: set = set()
        self._fingerprint = fingerprint
        self._sidecar_written = False
        try:
            os.makedirs(os.path.join(self.root, "blocks"), exist_ok=True)
            self._write_sidecar()
        except OSError as e:
            self._write_failed("init", e)

    def _write_sidecar(self) -> None:
        """The fingerprint's JSON sidecar (for ``longseq kv stats``); retried with each block until written."""
        write_fingerprint_sidecar(self.root, self._fingerprint)
        self._sidecar_written = True

    # ---- paths and checks ------------------------------------------------------------------
    def path_for(self, key: bytes) -> str:
        name = block_name(self.digest, key)
        return os.path.join(self.root, "blocks", name[:2], name[2:4], name + BLOCK_SUFFIX)

    def _check_identity(self, header: BlockHeader, key: bytes) -> None:
        if header.digest != self.digest:
            raise BlockCheckError(f"written for another fingerprint ({header.digest.hex()}, ours {self.digest.hex()})")
        if header.key != key:
            raise BlockCheckError("key mismatch")

    def probe(self, key: bytes) -> bool:
        """File exists and its header passes every check (payload checksum is left to ``read``)."""
        path, st = self.path_for(key), None
        try:
            with open(path, "rb") as f:
                st = os.fstat(f.fileno())
                self._check_identity(read_header(f, st.st_size), key)
            return True
        except FileNotFoundError:
            return False
        except BlockCheckError as e:
            self._corrupt(path, st, e)
            return False
        except OSError as e:
            self._read_failed(path, e)
            return False

    def read(self, key: bytes, alloc: Callable[[int], torch.Tensor]) -> torch.Tensor | None:
        """The block's payload in a flat uint8 buffer from ``alloc(nbytes)``, or None on miss / failed check.

        ``alloc`` may raise ValueError (e.g. caller's ``out`` has another size): that is a miss, not corruption.
        """
        path = self.path_for(key)
        try:
            with open(path, "rb", buffering=0) as f:
                st = os.fstat(f.fileno())
                try:
                    header = read_header(f, st.st_size)
                    self._check_identity(header, key)
                    buf = alloc(header.payload_nbytes)
                    view = memoryview(buf.numpy()).cast("B")
                    got = 0
                    while got < header.payload_nbytes:  # raw reads may return short counts
                        n = f.readinto(view[got:])
                        if not n:
                            raise BlockCheckError(f"truncated payload ({got} of {header.payload_nbytes} bytes)")
                        got += n
                    if zlib.crc32(view) != header.payload_crc:
                        raise BlockCheckError("payload checksum mismatch")
                except BlockCheckError as e:
                    self._corrupt(path, st, e)
                    return None
            try:  # a hit is a use: refresh mtime so eviction (oldest mtime first) keeps hot blocks
                os.utime(path)
            except OSError:
                pass
            return buf
        except FileNotFoundError:
            return None  # plain miss (never written, or evicted by us or another server)
        except ValueError as e:
            log.warning("kv store: disk block %s not usable here: %s", path, e)
            return None
        except OSError as e:
            self._read_failed(path, e)
            return None

    def _corrupt(self, path: str, st: os.stat_result, err: Exception) -> None:
        """Count and log a failed check; delete the file only if the path still names the file we checked
        (another server may have published a good block there meanwhile)."""
        self.rec.add("corrupt_blocks")
        log.warning("kv store: disk block %s failed a check (%s): treated as a miss", path, err)
        try:
            now = os.stat(path)
            if (now.st_dev, now.st_ino, now.st_size, now.st_mtime_ns) == \
                    (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns):
                os.unlink(path)
        except OSError:
            pass

    def _read_failed(self, path: str, err: OSError) -> None:
        self.rec.add("read_errors")
        self._warn_once(("read", err.errno), "kv store: disk read of %s failed (%s): treated as a miss"
                        " (logged once per error kind)", path, err)

    def _write_failed(self, what: str, err: OSError) -> None:
        self.rec.add("write_errors")
        hint = {errno.ENOSPC: "disk full", errno.EDQUOT: "quota exceeded", errno.EACCES: "permission denied",
                errno.EROFS: "read-only file system"}.get(err.errno, "I/O error")
        self._warn_once(("write", err.errno), "kv store: disk %s under %s failed (%s: %s); serving continues"
                        " from DRAM, later failures of this kind are only counted", what, self.root, hint, err)

    def _warn_once(self, kind, msg: str, *args) -> None:
        with self._lock:
            first = kind not in self._warned
            self._warned.add(kind)
        (log.warning if first else log.debug)(msg, *args)

    # ---- writes and the size cap --------------------------------------------------------------
    def write(self, key: bytes, buf: torch.Tensor) -> bool:
        """Publish one block (flat uint8 CPU tensor) atomically. False on an OS error (counted, logged once)."""
        path = self.path_for(key)
        if os.path.exists(path):  # content-addressed: equal key, equal bytes; just mark it used
            try:
                os.utime(path)
                return True
            except OSError:
                pass  # evicted meanwhile: write it again
        view = memoryview(buf.numpy()).cast("B")
        header = encode_header(self.digest, key, len(view), zlib.crc32(view))
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            if not self._sidecar_written:
                self._write_sidecar()
            write_atomic(path, [header, view], self.fsync)
        except OSError as e:
            self._write_failed("write", e)
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                self.enforce_cap(shrink=True)  # the file system is smaller than our cap: make room
            return False
        with self._lock:
            if self._usage is not None:
                self._usage += len(header) + len(view)
        self.enforce_cap()
        return True

    @property
    def usage_bytes(self) -> int:
        return self._usage or 0

    def enforce_cap(self, shrink: bool = False) -> None:
        """Rescan the directory when our estimate is over the cap, stale (other servers write too) or unknown,
        and delete oldest-mtime blocks until under the low-water mark (90% of the cap). ``shrink`` (after
        ENOSPC) also frees 10% of what is there. Another server deleting the same files at the same time is
        harmless (ENOENT is ignored; readers of a deleted file keep their fd)."""
        with self._lock:
            stale = time.monotonic() - self._last_scan > self.rescan_seconds
            if not (shrink or stale or self._usage is None or self._usage > self.capacity_bytes):
                return
            self._last_scan = time.monotonic()
        files, total, now = [], 0, time.time()
        for e in iter_block_files(self.root):
            try:
                st = e.stat(follow_symlinks=False)
            except OSError:
                continue
            if e.name.endswith(TMP_SUFFIX):
                if now - st.st_mtime > STALE_TMP_SECONDS:
                    _unlink_quiet(e.path)
                continue
            files.append((st.st_mtime, st.st_size, e.path))
            total += st.st_size
        evicted = 0
        target = self.low_water_bytes if total > self.capacity_bytes else total
        if shrink:
            target = min(target, int(total * 0.9))
        if total > target:
            files.sort()
            for _, size, path in files:
                if total <= target:
                    break
                if _unlink_quiet(path):
                    evicted += 1
                total -= size
        with self._lock:
            self._usage = total
        if evicted:
            self.rec.add("evictions", evicted, tier="disk")
            log.info("kv store: disk cache %s over %.2f GiB: evicted %d oldest blocks, now %.2f GiB",
                     self.root, self.capacity_bytes / 2**30, evicted, total / 2**30)


def _unlink_quiet(path: str) -> bool:
    try:
        os.unlink(path)
        return True
    except OSError:
        return False
