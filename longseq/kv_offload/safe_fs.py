"""Opening entries of a shared cache directory without trusting them.

Every level below the directory's root is opened with ``O_NOFOLLOW`` relative to the one above (``openat``), so a
symlink planted inside the directory is never followed: nothing is read, written, touched or deleted outside it.
Files are opened non-blocking and must be regular files, so a FIFO or device at a block's name cannot hang a reader.
Everything created here gets its mode from ``Modes`` by ``fchmod`` (private 0700/0600 by default), never from the umask.
"""

from __future__ import annotations

import errno
import os
import stat
import threading
from dataclasses import dataclass

TMP_SUFFIX = ".tmp"
# O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer forever.
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_LINK_ERRNOS = (errno.ELOOP, errno.ENOTDIR)  # what O_NOFOLLOW / O_DIRECTORY give for a symlink or a non-directory


@dataclass(frozen=True)
class Modes:
    """Permissions of what the store creates: directories, files, and the group to ``fchown`` them to (None: keep
    the creator's group)."""

    dir: int = 0o700
    file: int = 0o600
    gid: int | None = None

    def apply(self, fd: int, mode: int) -> None:
        """Set ``fd``'s group (first: a chown may clear the setgid bit) and exact mode."""
        if self.gid is not None:
            os.fchown(fd, -1, self.gid)
        os.fchmod(fd, mode)


PRIVATE = Modes()


class UnsafeEntryError(Exception):
    """An entry inside the cache directory is a symlink, or not a directory / regular file where one belongs."""


def make_root(root: str, modes: Modes = PRIVATE) -> None:
    """Create ``root`` and missing parents with ``modes.dir`` (an existing directory is left as it is)."""
    root = os.path.abspath(root)
    if os.path.isdir(root):
        return
    parent = os.path.dirname(root)
    if parent != root:
        make_root(parent, modes)
    try:
        os.mkdir(root, 0o700)
    except FileExistsError:
        return
    fd = os.open(root, _DIR_FLAGS)
    try:
        modes.apply(fd, modes.dir)
    finally:
        os.close(fd)


def open_dir(root: str, parts: tuple[str, ...] | list[str], create: bool = False, modes: Modes = PRIVATE) -> int:
    """An fd of ``root/parts...``, each part opened with O_NOFOLLOW relative to the one above, so no symlink
    below ``root`` is followed (``root`` itself may be one: the operator chose it). ``create``: make missing
    levels, and replace a symlink or file standing where a level belongs (unlinking an entry never touches its
    target); levels made here get ``modes.dir``. Raises FileNotFoundError, UnsafeEntryError (without ``create``) or
    OSError."""
    if create:
        make_root(root, modes)
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for part in parts:
            for attempt in (0, 1):
                made = False
                if create:
                    try:
                        os.mkdir(part, 0o700, dir_fd=fd)
                        made = True
                    except FileExistsError:
                        pass
                try:
                    sub = os.open(part, _DIR_FLAGS, dir_fd=fd)
                    if made:
                        _apply_or_close(sub, modes)
                    break
                except OSError as e:
                    if e.errno not in _LINK_ERRNOS:
                        raise
                    if not (create and attempt == 0 and unlink_if(fd, part, (stat.S_ISLNK, stat.S_ISREG))):
                        raise UnsafeEntryError(f"{part!r} is a symlink or not a directory: not followed") from None
            os.close(fd)
            fd = sub
        return fd
    except BaseException:
        os.close(fd)
        raise


def _apply_or_close(fd: int, modes: Modes) -> None:
    try:
        modes.apply(fd, modes.dir)
    except BaseException:
        os.close(fd)
        raise


def unlink_if(dir_fd: int, name: str, kinds, same_as: os.stat_result | None = None) -> bool:
    """Unlink ``name`` in ``dir_fd`` if it is one of ``kinds`` (``stat.S_ISREG``, ...) and, with ``same_as``,
    still the very file checked (device, inode, size, mtime). Never follows a symlink."""
    try:
        now = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        if not any(k(now.st_mode) for k in kinds):
            return False
        if same_as is not None and (now.st_dev, now.st_ino, now.st_size, now.st_mtime_ns) != \
                (same_as.st_dev, same_as.st_ino, same_as.st_size, same_as.st_mtime_ns):
            return False
        os.unlink(name, dir_fd=dir_fd)
        return True
    except OSError:
        return False


def open_regular(name: str, dir_fd: int | None = None) -> tuple[int, os.stat_result]:
    """(fd, fstat) of a regular file opened for reading without following a symlink and without blocking.
    Raises FileNotFoundError, UnsafeEntryError or OSError."""
    try:
        fd = os.open(name, _READ_FLAGS, dir_fd=dir_fd)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise UnsafeEntryError("block file is a symlink: not followed") from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UnsafeEntryError(f"not a regular file (mode {stat.filemode(st.st_mode)})")
        os.set_blocking(fd, True)
        return fd, st
    except BaseException:
        os.close(fd)
        raise


def write_atomic(dir_fd: int, name: str, chunks: list, fsync: bool, modes: Modes = PRIVATE) -> None:
    """Write ``chunks`` (bytes-like) to a unique temp file in ``dir_fd`` with mode ``modes.file``, then
    ``os.replace`` it onto ``name`` (a rename replaces a symlink or FIFO standing there; it never writes through it)."""
    tmp = f".{name}.{os.getpid()}.{threading.get_ident()}.{os.urandom(4).hex()}{TMP_SUFFIX}"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                     dir_fd=dir_fd)
        with open(fd, "wb") as f:
            modes.apply(fd, modes.file)
            for c in chunks:
                f.write(c)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        try:
            os.unlink(tmp, dir_fd=dir_fd)
        except OSError:
            pass
        raise
