"""Tier 2: a directory of block files with a size cap, safe to share between servers.

Layout::

    DIR/blocks/ab/cd/<32 hex>.kvb        one file per block; name = blake2b(fingerprint digest + key)
    DIR/fingerprints/<32 hex>.json       what each fingerprint digest means (model, layout, dtype, block size)

Block file = one record of ``block_format.py`` (48-byte header + key + [keyed tag] + payload, CRC32 or, with
``auth_key_file``, an HMAC-SHA256 tag; the remote tier stores the same records).

Writes go to a unique temp file in the block's own directory and are published with ``os.replace``,
which is atomic on POSIX: a reader (this process or another server) sees the whole old file, the whole
new file, or nothing. Any failed check is a miss, never data; the bad file is deleted only if the path
still names the very file we read (same device, inode, size and mtime), so a good block that another
server published meanwhile is left alone. No pickle anywhere: the header is ``struct``, the sidecar JSON.

The directory may be shared, so its entries are not trusted: every level below ``DIR`` is opened with
``O_NOFOLLOW`` (a symlinked ``blocks/ab`` is never followed, so nothing is read, written, touched or deleted
outside ``DIR``), block files are opened non-blocking and must be regular files (a FIFO cannot hang a reader),
and the header's payload size is checked against the expected block size before anything is allocated.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import stat
import threading
import time
from typing import TYPE_CHECKING, Callable, Iterator

# The format names stay importable from here (``disk_stats``, tests, older callers).
from .block_format import (FORMAT_VERSION, HEADER, HEADER_SIZE, MAGIC, MAX_KEY_BYTES, TAGGED_VERSION,  # noqa: F401
                           BlockCheckError, BlockHeader, check_identity, check_payload, encode_header, encode_record,
                           read_header)
from .fingerprint import DIGEST_BYTES, KVFingerprint
from .safe_fs import TMP_SUFFIX, UnsafeEntryError, open_dir, open_regular, unlink_if, write_atomic
from .stats import StatsRecorder
from .trust import AuthFailure, Trust, warn_if_others_can_write

if TYPE_CHECKING:  # torch only for annotations: ``longseq kv stats`` imports this module without torch
    import torch

log = logging.getLogger("longseq.kv_offload")

BLOCK_SUFFIX = ".kvb"
STALE_TMP_SECONDS = 600.0  # temp files older than this are a crashed writer's leftovers


class SizeMismatch(Exception):
    """The caller's output buffer does not fit the block: a miss, but not the file's fault."""


def block_name(digest: bytes, key: bytes) -> str:
    return hashlib.blake2b(digest + key, digest_size=16).hexdigest()


def iter_block_files(root: str) -> Iterator[os.DirEntry]:
    """Every ``*.kvb`` and leftover temp file under ``root/blocks`` (two-level fan-out; symlinks never followed)."""
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


def write_fingerprint_sidecar(root: str, fp: KVFingerprint, trust: Trust = Trust()) -> None:
    name = fp.digest().hex() + ".json"
    dfd = open_dir(root, ("fingerprints",), create=True, modes=trust.modes)
    try:
        try:
            if stat.S_ISREG(os.stat(name, dir_fd=dfd, follow_symlinks=False).st_mode):
                return
        except FileNotFoundError:
            pass
        doc = json.loads(fp.to_json()) | {"format_version": FORMAT_VERSION, "created_unix": time.time()}
        write_atomic(dfd, name, [json.dumps(doc, indent=1).encode()], fsync=False, modes=trust.modes)
    finally:
        os.close(dfd)


class DiskTier:
    """Block files under ``root`` for one fingerprint, at most ``capacity_bytes`` in total (shared by every
    fingerprint and server using the directory; each server evicts oldest-mtime files when it sees the
    directory over the cap). Thread-safe: no shared mutable state except the usage estimate (locked).
    ``block_nbytes``: the payload size every block of this fingerprint has (None: unknown, then only bounded
    by the cap); a file claiming another size is corrupt. ``trust``: modes of what is created, and the block tag
    (``trust.py``)."""

    def __init__(self, root: str, fingerprint: KVFingerprint, capacity_bytes: int, recorder: StatsRecorder,
                 fsync: bool = False, rescan_seconds: float = 60.0, block_nbytes: int | None = None,
                 trust: Trust = Trust()) -> None:
        self.root = os.path.abspath(root)
        self.digest = fingerprint.digest()
        assert len(self.digest) == DIGEST_BYTES
        self.capacity_bytes = int(capacity_bytes)
        self.low_water_bytes = int(capacity_bytes * 0.9)  # evict below the cap so we do not scan on every write
        self.block_nbytes = int(block_nbytes) if block_nbytes else None
        self.fsync = fsync
        self.rescan_seconds = rescan_seconds
        self.rec = recorder
        self._lock = threading.Lock()
        self._usage: int | None = None  # unknown until the first scan (done by the writer, not at startup)
        self._last_scan = 0.0
        self._warned: set = set()
        self._fingerprint = fingerprint
        self._sidecar_written = False
        self.trust = trust
        try:
            os.close(open_dir(self.root, ("blocks",), create=True, modes=trust.modes))
            self._write_sidecar()
        except OSError as e:
            self._write_failed("init", e)
        warn_if_others_can_write(self.root, trust)

    def _write_sidecar(self) -> None:
        """The fingerprint's JSON sidecar (for ``longseq kv stats``); retried with each block until written."""
        write_fingerprint_sidecar(self.root, self._fingerprint, self.trust)
        self._sidecar_written = True

    # ---- paths and checks ------------------------------------------------------------------
    def _where(self, key: bytes) -> tuple[tuple[str, str, str], str]:
        """(directory levels below root, file name) of the key's block file."""
        name = block_name(self.digest, key)
        return ("blocks", name[:2], name[2:4]), name + BLOCK_SUFFIX

    def path_for(self, key: bytes) -> str:
        parts, fname = self._where(key)
        return os.path.join(self.root, *parts, fname)

    def _header(self, f, st: os.stat_result, key: bytes) -> BlockHeader:
        header = read_header(f, st.st_size, self.block_nbytes, self.capacity_bytes)
        check_identity(header, self.digest, key, self.trust.auth)
        return header

    def _with_block(self, key: bytes, body: Callable):
        """``body(f, fd, st)`` on the key's block file, opened safely; None on a miss. Every failure is a miss:
        a failed check or an unexpected error deletes the file (only if it is still the regular file we read);
        a symlink, FIFO or other non-regular entry is counted and left alone (a write replaces it)."""
        parts, fname = self._where(key)
        path, st, dfd = os.path.join(self.root, *parts, fname), None, None
        try:
            dfd = open_dir(self.root, parts)
            fd, st = open_regular(fname, dfd)
            with open(fd, "rb", buffering=0) as f:
                return body(f, fd, st)
        except FileNotFoundError:
            return None  # plain miss (never written, or evicted by us or another server)
        except UnsafeEntryError as e:
            self._bad_entry(path, e)
        except AuthFailure as e:
            self._corrupt(dfd, fname, st, path, e, counter="auth_failures")
        except BlockCheckError as e:
            self._corrupt(dfd, fname, st, path, e)
        except SizeMismatch as e:
            log.warning("kv store: disk block %s not usable here: %s", path, e)
        except OSError as e:
            self._read_failed(path, e)
        except Exception as e:  # e.g. an allocation the header asked for failed: still a miss, never an exception
            self.rec.add("lookup_errors")
            log.warning("kv store: disk block %s could not be read (%s: %s): treated as a miss", path,
                        type(e).__name__, e)
            if dfd is not None and st is not None:
                unlink_if(dfd, fname, (stat.S_ISREG,), same_as=st)
        finally:
            if dfd is not None:
                os.close(dfd)
        return None

    def probe(self, key: bytes) -> bool:
        """File exists and its header passes every check (payload checksum is left to ``read``)."""
        return bool(self._with_block(key, lambda f, fd, st: self._header(f, st, key) is not None))

    def read(self, key: bytes, alloc: Callable[[int], torch.Tensor]) -> torch.Tensor | None:
        """The block's payload in a flat uint8 buffer from ``alloc(nbytes)``, or None on miss / failed check.

        ``alloc`` may raise SizeMismatch (e.g. caller's ``out`` has another size): that is a miss, not corruption.
        """
        def body(f, fd: int, st: os.stat_result) -> torch.Tensor:
            header = self._header(f, st, key)
            buf = alloc(header.payload_nbytes)
            view = memoryview(buf.numpy()).cast("B")
            got = 0
            while got < header.payload_nbytes:  # raw reads may return short counts
                n = f.readinto(view[got:])
                if not n:
                    raise BlockCheckError(f"truncated payload ({got} of {header.payload_nbytes} bytes)")
                got += n
            check_payload(header, view, self.trust.auth)
            try:  # a hit is a use: refresh mtime (of the file we read, by fd) so eviction keeps hot blocks
                os.utime(fd)
            except OSError:
                pass
            return buf

        return self._with_block(key, body)

    def _corrupt(self, dfd: int | None, fname: str, st: os.stat_result | None, path: str, err: Exception,
                 counter: str = "corrupt_blocks") -> None:
        """Count and log a failed check; delete the file only if the name still holds the regular file we checked
        (another server may have published a good block there meanwhile)."""
        self.rec.add(counter)
        log.warning("kv store: disk block %s failed a check (%s): treated as a miss", path, err)
        if dfd is not None and st is not None:
            unlink_if(dfd, fname, (stat.S_ISREG,), same_as=st)

    def _bad_entry(self, path: str, err: Exception) -> None:
        self.rec.add("bad_files")
        self._warn_once(("bad", str(err)), "kv store: %s in the disk cache: %s; treated as a miss and never followed"
                        " (logged once per kind)", path, err)

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
        parts, fname = self._where(key)
        chunks = encode_record(self.digest, key, memoryview(buf.numpy()).cast("B"), self.trust.auth)
        try:
            dfd = open_dir(self.root, parts, create=True, modes=self.trust.modes)
            try:
                if self._refresh(dfd, fname, key):  # content-addressed: equal key, equal bytes; just mark it used
                    return True
                if not self._sidecar_written:
                    self._write_sidecar()
                write_atomic(dfd, fname, chunks, self.fsync, self.trust.modes)
            finally:
                os.close(dfd)
        except UnsafeEntryError as e:
            self._bad_entry(self.path_for(key), e)
            return False
        except OSError as e:
            self._write_failed("write", e)
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                self.enforce_cap(shrink=True)  # the file system is smaller than our cap: make room
            return False
        with self._lock:
            if self._usage is not None:
                self._usage += sum(len(c) for c in chunks)
        self.enforce_cap()
        return True

    def _refresh(self, dfd: int, fname: str, key: bytes) -> bool:
        """Touch an existing regular block file whose header passes (by fd, never through a symlink); False if there
        is none, so the write replaces whatever stands there (e.g. a planted block without our tag)."""
        try:
            fd, st = open_regular(fname, dfd)
        except (OSError, UnsafeEntryError):
            return False  # missing, or a symlink / FIFO that the write replaces
        try:
            with open(fd, "rb", buffering=0, closefd=False) as f:
                self._header(f, st, key)
            os.utime(fd)
            return True
        except (OSError, BlockCheckError, AuthFailure):
            return False
        finally:
            os.close(fd)

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
                    self._unlink_quiet(e.path)
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
                if self._unlink_quiet(path):
                    evicted += 1
                total -= size
        with self._lock:
            self._usage = total
        if evicted:
            self.rec.add("evictions", evicted, tier="disk")
            log.info("kv store: disk cache %s over %.2f GiB: evicted %d oldest blocks, now %.2f GiB",
                     self.root, self.capacity_bytes / 2**30, evicted, total / 2**30)

    def _unlink_quiet(self, path: str) -> bool:
        """Delete a regular file found by the scan, through O_NOFOLLOW directory fds (a level swapped for a
        symlink since the scan is not followed)."""
        *parts, name = os.path.relpath(path, self.root).split(os.sep)
        try:
            dfd = open_dir(self.root, parts)
        except (OSError, UnsafeEntryError):
            return False
        try:
            return unlink_if(dfd, name, (stat.S_ISREG,))
        finally:
            os.close(dfd)
