"""What makes two KV blocks' bytes interchangeable: model, layer layout, dtype and block size.

The store namespaces every key with ``KVFingerprint.digest()``, so a block written by another model,
another TP rank's heads, another dtype or another page size is never returned as data.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

DIGEST_BYTES = 16


@dataclass(frozen=True)
class KVFingerprint:
    """Identity of a block's byte layout.

    model:      model name or path as the engine was given it
    layout:     framework-specific text that pins the tensor layout of one block, e.g.
                ``"vllm:layers=30:kv_heads=3/tp0of1:head=64:shape=[2,16,3,64]"``
    dtype:      KV cache dtype name ("bfloat16", "float16", "fp8_e4m3", ...)
    block_size: tokens per block (page)
    """

    model: str
    layout: str
    dtype: str
    block_size: int

    def __post_init__(self) -> None:
        for name in ("model", "layout", "dtype"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ValueError(f"KVFingerprint.{name} must be a non-empty string, got {getattr(self, name)!r}")
        if not isinstance(self.block_size, int) or self.block_size <= 0:
            raise ValueError(f"KVFingerprint.block_size must be a positive int, got {self.block_size!r}")

    def to_json(self) -> str:
        """Canonical JSON (sorted keys); the digest is computed over exactly this text."""
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))

    def digest(self) -> bytes:
        """16-byte blake2b of the canonical JSON: stable across processes and Python versions
        (Python's ``hash()`` is salted per process, so it would never match between two servers)."""
        return hashlib.blake2b(self.to_json().encode(), digest_size=DIGEST_BYTES,
                               person=b"longseq-kvfp").digest()

    @classmethod
    def from_json(cls, text: str) -> "KVFingerprint":
        d = json.loads(text)
        return cls(model=d["model"], layout=d["layout"], dtype=d["dtype"], block_size=int(d["block_size"]))
