"""Validation rules for the KV offload settings, shared by the vLLM connector, the SGLang backend and the store.

Both frameworks hand us JSON, and Python's ``json`` accepts ``Infinity`` and ``NaN``: sizes must be finite numbers,
the cache directory a non-empty path (``~`` expanded), and a tier too small for one block is refused at start-up
instead of silently caching nothing. Every error names the setting it is about.
"""

from __future__ import annotations

import math
import os

GIB = 1 << 30


class KVConfigError(ValueError):
    """An invalid KV offload setting (raised at start-up; the message names the setting)."""


def size_gib(prefix: str, name: str, value) -> float:
    """A tier size in GiB: a finite number >= 0 (not a bool, string, Infinity or NaN)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise KVConfigError(f"{prefix}: {name} must be a number >= 0 (GiB, finite), got {value!r}")
    return float(value)


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
