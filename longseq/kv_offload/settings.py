"""Validation rules for the KV offload settings, shared by the vLLM connector, the SGLang backend and the store.

Both frameworks hand us JSON, and Python's ``json`` accepts ``Infinity`` and ``NaN``: sizes must be finite numbers,
the cache directory a non-empty path (``~`` expanded), and a tier too small for one block is refused at start-up
instead of silently caching nothing. Every error names the setting it is about.
"""

from __future__ import annotations

import math
import os
from dataclasses import MISSING, dataclass, fields

from longseq.config import LongSeqConfigError

GIB = 1 << 30


class KVConfigError(LongSeqConfigError):
    """An invalid KV offload setting (raised at start-up; the message names the setting). A ``ValueError``."""


def size_gib(prefix: str, name: str, value) -> float:
    """A tier size in GiB: a finite number >= 0 (not a bool, string, Infinity or NaN)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise KVConfigError(f"{prefix}: {name} must be a number >= 0 (GiB, finite), got {value!r}")
    return float(value)


def write_queue_gib(prefix: str, name: str, value, cpu_gib: float) -> float:
    """The disk write-behind queue in GiB (writes queued beyond it are dropped and counted, so a slow disk never
    blocks serving): ``value``, a finite number > 0, or when None the DRAM tier's size (at least 1), since queued
    writes hold DRAM-tier buffers (a disk-only store holds copies)."""
    if value is None:
        return max(1.0, cpu_gib)
    gib = size_gib(prefix, name, value)
    if gib <= 0:
        raise KVConfigError(f"{prefix}: {name} must be > 0 (GiB), got {value!r}")
    return gib


def cache_dir(prefix: str, name: str, value) -> str | None:
    """A directory path, or None: a non-empty string, ``~`` expanded (an empty path would mean the current
    directory, and a literal ``~`` directory is never what was meant)."""
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise KVConfigError(f"{prefix}: {name} must be a non-empty path string, got {value!r}")
    if "\0" in value:
        raise KVConfigError(f"{prefix}: {name} must not contain a NUL character, got {value!r}")
    path = os.path.expanduser(value)
    if path.startswith("~"):
        raise KVConfigError(f"{prefix}: {name}={value!r}: cannot expand '~' (no such user or no home directory)")
    return path


def flag(prefix: str, name: str, value) -> bool:
    if not isinstance(value, bool):
        raise KVConfigError(f"{prefix}: {name} must be true or false, got {value!r}")
    return value


def check_tier_sizes(prefix: str, cpu_gib: float, disk_dir: str | None, disk_gib: float, block_nbytes: int,
                     header_nbytes: int = 0, cpu_name: str = "cpu_gib", disk_name: str = "disk_gib") -> None:
    """Refuse a tier that is on but cannot hold a single block of ``block_nbytes`` (plus its file header)."""
    if block_nbytes <= 0:
        return
    if cpu_gib > 0 and int(cpu_gib * GIB) < block_nbytes:
        raise KVConfigError(f"{prefix}: {cpu_name}={cpu_gib:g} is smaller than one KV block ({block_nbytes} bytes): "
                            f"raise it to at least {block_nbytes / GIB:.3g} GiB, or set it to 0 to turn the tier off")
    need = block_nbytes + header_nbytes
    if disk_dir is not None and int(disk_gib * GIB) < need:
        raise KVConfigError(f"{prefix}: {disk_name}={disk_gib:g} is smaller than one KV block file ({need} bytes): "
                            f"raise it to at least {need / GIB:.3g} GiB")


#: Remote tier kinds (``"remote": {"kind": ...}``) and transfer protocols.
REMOTE_KINDS = ("mooncake",)
REMOTE_PROTOCOLS = ("tcp", "rdma")


@dataclass(frozen=True)
class RemoteSettings:
    """The ``remote`` object of the KV offload config (``remote.py`` explains the tier).

    kind:           "mooncake" (a Mooncake Store: its master at ``master``, memory pooled by every client)
    master_host, master_port: where the Mooncake master listens (config ``"master": "HOST:PORT"``)
    local_hostname: this machine's address that other clients reach it at; None = the address of the interface
                    that routes to the master (``mooncake_client.py``)
    protocol:       Mooncake transfer protocol, "tcp" or "rdma"; rdma_devices: its device list ("" = all)
    segment_gib:    memory this server adds to the shared pool (0: it only uses others'); its blocks there vanish
                    when it stops
    buffer_gib:     the client's local transfer buffer: must hold every block in flight at once
    queue_blocks:   blocks waiting for the remote writer at most; a put beyond that is dropped (counted). While a
                    local tier (DRAM or disk) holds a block only its key waits, and the writer copies it out when
                    it writes it; a store without local tiers keeps a private copy per waiting block
    timeout_s:      the longest a lookup or read waits for the remote store before it is a miss (and the tier is
                    marked down)
    """

    kind: str
    master_host: str
    master_port: int
    local_hostname: str | None = None
    protocol: str = "tcp"
    rdma_devices: str = ""
    segment_gib: float = 4.0
    buffer_gib: float = 0.5
    queue_blocks: int = 4096
    timeout_s: float = 1.0

    @property
    def master(self) -> str:
        host = f"[{self.master_host}]" if ":" in self.master_host else self.master_host
        return f"{host}:{self.master_port}"


#: The keys of the ``remote`` object and their defaults (``kind`` and ``master`` have none).
REMOTE_DEFAULTS = {"kind": None, "master": None, **{f.name: f.default for f in fields(RemoteSettings)
                                                    if f.default is not MISSING}}


def master_address(prefix: str, name: str, value) -> tuple[str, int]:
    """``"HOST:PORT"`` (IPv6 as ``"[ADDR]:PORT"``) -> (host, port); a KVConfigError naming ``name`` otherwise."""
    bad = KVConfigError(f"{prefix}: {name} must be \"HOST:PORT\" (port 1-65535), got {value!r}")
    if not isinstance(value, str) or any(c.isspace() or c in "/@\0" for c in value):
        raise bad
    host, sep, port = value.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:  # an IPv6 address needs its brackets, or the port is ambiguous
        raise bad
    if not sep or not host or not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536:
        raise bad
    return host, int(port)


def remote_setting(prefix: str, name: str, value) -> RemoteSettings | None:
    """The ``remote`` object (None: no remote tier). Unknown keys, an unknown ``kind``, a malformed ``master`` or
    size, and a wrong type are KVConfigErrors naming the key (``remote.master``, ...). Nothing is contacted here."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise KVConfigError(f"{prefix}: {name} must be an object like {{\"kind\": \"mooncake\", \"master\": "
                            f"\"HOST:PORT\"}}, got {value!r}")
    unknown = sorted(set(value) - set(REMOTE_DEFAULTS))
    if unknown:
        raise KVConfigError(f"{prefix}: unknown {name} key(s) {unknown}; allowed: {sorted(REMOTE_DEFAULTS)}")
    cfg = {**REMOTE_DEFAULTS, **value}
    if cfg["kind"] not in REMOTE_KINDS:
        raise KVConfigError(f"{prefix}: {name}.kind must be one of {list(REMOTE_KINDS)}, got {cfg['kind']!r}")
    host, port = master_address(prefix, f"{name}.master", cfg["master"])
    local = cfg["local_hostname"]
    if local is not None and (not isinstance(local, str) or not local.strip() or any(c.isspace() for c in local)):
        raise KVConfigError(f"{prefix}: {name}.local_hostname must be a host name or address, got {local!r}")
    if cfg["protocol"] not in REMOTE_PROTOCOLS:
        raise KVConfigError(f"{prefix}: {name}.protocol must be one of {list(REMOTE_PROTOCOLS)}, "
                            f"got {cfg['protocol']!r}")
    if not isinstance(cfg["rdma_devices"], str):
        raise KVConfigError(f"{prefix}: {name}.rdma_devices must be a string, got {cfg['rdma_devices']!r}")
    queue_blocks = cfg["queue_blocks"]
    if isinstance(queue_blocks, bool) or not isinstance(queue_blocks, int) or queue_blocks < 1:
        raise KVConfigError(f"{prefix}: {name}.queue_blocks must be an integer >= 1, got {queue_blocks!r}")
    timeout_s = cfg["timeout_s"]
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or not 0 < timeout_s < math.inf:
        raise KVConfigError(f"{prefix}: {name}.timeout_s must be a finite number of seconds > 0, got {timeout_s!r}")
    buffer_gib = size_gib(prefix, f"{name}.buffer_gib", cfg["buffer_gib"])
    if not buffer_gib > 0:
        raise KVConfigError(f"{prefix}: {name}.buffer_gib must be > 0 (it holds the blocks in flight)")
    return RemoteSettings(kind=cfg["kind"], master_host=host, master_port=port, local_hostname=local,
                          protocol=cfg["protocol"], rdma_devices=cfg["rdma_devices"],
                          segment_gib=size_gib(prefix, f"{name}.segment_gib", cfg["segment_gib"]),
                          buffer_gib=buffer_gib, queue_blocks=queue_blocks, timeout_s=float(timeout_s))


def check_remote_sizes(prefix: str, remote: RemoteSettings | None, record_nbytes: int, name: str = "remote") -> None:
    """Refuse a transfer buffer (or a non-zero pooled segment) that cannot hold one block record."""
    if remote is None or record_nbytes <= 0:
        return
    for key in ("buffer_gib", "segment_gib"):
        gib = getattr(remote, key)
        if (key == "buffer_gib" or gib > 0) and int(gib * GIB) < record_nbytes:
            raise KVConfigError(f"{prefix}: {name}.{key}={gib:g} is smaller than one KV block record "
                                f"({record_nbytes} bytes): raise it to at least {record_nbytes / GIB:.3g} GiB")
