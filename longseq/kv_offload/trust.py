"""Who may write the disk cache directory, and how a reader tells its own blocks from planted ones.

The fingerprint and the CRC in a block file are public: anyone who can write ``disk_dir`` can plant a block that
passes every check and is served as KV. Three defences, all framework-free:

- Modes. Every directory the store creates is 0700 and every file 0600 (``shared_group``: 02770 / 0660, the
  setgid bit so new entries keep the directory's group), set with ``fchmod``, so the umask never widens them.
  ``shared_group`` may name a group: what the store creates is then also ``fchown``-ed to it.
- A start-up warning (once per directory) when ``disk_dir`` is writable by others than its owner, or owned by
  another user, while ``shared_group`` is off: then the directory, not this process, decides what is served.
- ``auth_key_file``: a secret key (the file is hostile input: opened without following a symlink, non-blocking,
  checked regular, small, private). Blocks written then carry a keyed tag, HMAC-SHA256 over the header, key and
  payload, and a block without a valid tag is a miss (counted as ``auth_failures`` and deleted). HMAC-SHA256 over
  keyed BLAKE2b: OpenSSL's SHA-256 uses the CPU's SHA instructions and is the faster of the two on x86-64 servers
  (``benchmarks/bench_kv_tag.py``); with a key the tag replaces the CRC check on reads (it catches every accident
  the CRC does).
"""

from __future__ import annotations

import errno
import grp
import hashlib
import hmac
import logging
import os
import stat
import threading
from dataclasses import dataclass

from .safe_fs import PRIVATE, Modes
from .settings import KVConfigError, cache_dir

log = logging.getLogger("longseq.kv_offload")

TAG_SIZE = 32  # HMAC-SHA256
MAX_KEY_FILE_BYTES = 4096
MIN_KEY_BYTES = 16
SHARED = Modes(dir=0o2770, file=0o660)
_warned_dirs: set[str] = set()
_warned_lock = threading.Lock()


class AuthFailure(Exception):
    """A block without a valid keyed tag (written without our key, with another key, or altered)."""


class BlockAuth:
    """The keyed tag of block files. ``signed`` is the file's header and key bytes, ``payload`` the block."""

    def __init__(self, key: bytes) -> None:
        self._key = key

    def tag(self, signed: bytes, payload) -> bytes:
        mac = hmac.new(self._key, signed, hashlib.sha256)
        mac.update(payload)  # OpenSSL releases the GIL on large buffers, like crc32
        return mac.digest()

    def check(self, signed: bytes, tag: bytes | None, payload) -> None:
        if tag is None:
            raise AuthFailure("block has no tag (written without auth_key_file)")
        if not hmac.compare_digest(self.tag(signed, payload), tag):
            raise AuthFailure("tag mismatch (written with another key, or altered)")

    def __repr__(self) -> str:  # never print the key
        return "BlockAuth(<key>)"


@dataclass(frozen=True)
class Trust:
    """What the store creates (``modes``), whether it shares the directory with a group, and its block tag."""

    modes: Modes = PRIVATE
    shared: bool = False
    auth: BlockAuth | None = None


def shared_group_setting(prefix: str, name: str, value) -> bool | str:
    """``shared_group``: false (private 0700/0600), true (group-shared 02770/0660), or a group name (also chown
    to it; this process must be in that group)."""
    if isinstance(value, bool):
        return value
    if not isinstance(value, str) or not value.strip():
        raise KVConfigError(f"{prefix}: {name} must be true, false or a group name, got {value!r}")
    group_id(prefix, name, value)
    return value


def group_id(prefix: str, name: str, group: str) -> int:
    try:
        gid = grp.getgrnam(group).gr_gid
    except KeyError:
        raise KVConfigError(f"{prefix}: {name}={group!r}: no such group") from None
    if os.geteuid() != 0 and gid != os.getegid() and gid not in os.getgroups():
        raise KVConfigError(f"{prefix}: {name}={group!r}: this process is not a member of that group, so it cannot "
                            f"give the cache's files to it (add the user to the group, or set {name}: true)")
    return gid


def key_file_setting(prefix: str, name: str, value, shared_group=False) -> str | None:
    """``auth_key_file``: None, or a path whose key loads (checked at start-up, so a bad file stops the server)."""
    path = cache_dir(prefix, name, value)
    if path is not None:
        load_key(path, prefix, name, group_readable=bool(shared_group))
    return path


def load_key(path: str, prefix: str = "kv store", name: str = "auth_key_file", group_readable: bool = False) -> bytes:
    """The secret in ``path`` (surrounding whitespace stripped, so a trailing newline does not change the key).
    Refused with a ``KVConfigError`` naming the setting if the file is missing, a symlink, not regular, empty, too
    short or long, readable or writable by others (by the group too unless ``group_readable``), or not ours."""
    def bad(why: str) -> KVConfigError:
        return KVConfigError(f"{prefix}: {name}={path!r} {why}")

    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise bad("does not exist") from None
    except OSError as e:
        raise bad("is a symlink (not followed)" if e.errno == errno.ELOOP else f"cannot be opened: {e}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise bad(f"is not a regular file (mode {stat.filemode(st.st_mode)})")
        allowed = 0o040 if group_readable else 0
        if st.st_mode & 0o077 & ~allowed:
            raise bad(f"is accessible by {'others' if group_readable else 'group or others'} (mode "
                      f"{stat.filemode(st.st_mode)}): run chmod {'640' if group_readable else '600'} on it")
        if st.st_uid not in (os.geteuid(), 0):
            raise bad(f"is owned by uid {st.st_uid}, not by this user or root")
        if st.st_size > MAX_KEY_FILE_BYTES:
            raise bad(f"is {st.st_size} bytes; a key file holds at most {MAX_KEY_FILE_BYTES}")
        data = os.read(fd, MAX_KEY_FILE_BYTES + 1)
    finally:
        os.close(fd)
    if len(data) > MAX_KEY_FILE_BYTES:
        raise bad(f"is larger than {MAX_KEY_FILE_BYTES} bytes")
    key = data.strip()
    if not key:
        raise bad("is empty: write a random key into it, e.g. head -c 32 /dev/urandom | base64 > FILE")
    if len(key) < MIN_KEY_BYTES:
        raise bad(f"holds {len(key)} bytes; use at least {MIN_KEY_BYTES} random bytes (32 recommended)")
    return key


def trust_policy(prefix: str, shared_group=False, auth_key_file: str | None = None) -> Trust:
    """The ``Trust`` for the store's settings (validated again here: the store may be built without an adapter)."""
    shared = shared_group_setting(prefix, "shared_group", shared_group)
    modes = PRIVATE
    if shared:
        gid = group_id(prefix, "shared_group", shared) if isinstance(shared, str) else None
        modes = Modes(SHARED.dir, SHARED.file, gid)
    path = cache_dir(prefix, "auth_key_file", auth_key_file)
    auth = BlockAuth(load_key(path, prefix, group_readable=bool(shared))) if path is not None else None
    return Trust(modes=modes, shared=bool(shared), auth=auth)


def warn_if_others_can_write(root: str, trust: Trust) -> None:
    """Log once per directory when others than this user can plant files in ``root`` (see the module docstring)."""
    try:
        st = os.stat(root)
    except OSError:
        return
    mode = stat.S_IMODE(st.st_mode)
    if trust.shared:
        reasons = ["writable by every user"] if mode & 0o002 else []
        fix = f"chmod o-w {root}"
    else:
        reasons = [w for bit, w in ((0o020, "group-writable"), (0o002, "writable by every user")) if mode & bit]
        if st.st_uid != os.geteuid():
            reasons.append(f"owned by uid {st.st_uid}, not this user ({os.geteuid()})")
        fix = f"chown $USER {root} && chmod 700 {root}, or set shared_group for a cache shared by a group"
    if not reasons:
        return
    with _warned_lock:
        if root in _warned_dirs:
            return
        _warned_dirs.add(root)
    hint = "" if trust.auth else "; auth_key_file also makes planted blocks misses"
    log.warning("kv store: disk_dir %s is %s (mode %s): whoever can write it decides what KV is served. Fix: %s%s",
                root, " and ".join(reasons), stat.filemode(st.st_mode), fix, hint)
