"""Tier 1: CPU DRAM, LRU by bytes, pinned host memory when CUDA is present.

Not thread-safe by itself: ``BlockStore`` calls it under its own lock.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable

import torch


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    """A flat ``uint8`` view of a contiguous tensor (any dtype, fp8 included). No copy."""
    if not t.is_contiguous():
        raise ValueError(f"KV block tensor must be contiguous (shape {tuple(t.shape)}, stride {t.stride()})")
    return t.reshape(-1).view(torch.uint8)


def default_pin_memory() -> bool:
    """Pinned (page-locked) host memory lets GPU<->CPU copies run async at full PCIe/NVLink-C2C speed;
    it only exists with a CUDA device."""
    return torch.cuda.is_available()


class HostBufferAllocator:
    """Allocates flat ``uint8`` host buffers, pinned if asked, and keeps a few freed ones per size for reuse.

    Pinned allocation (``cudaHostAlloc``) costs milliseconds and serializes with the GPU, so evicted blocks'
    buffers are recycled: KV blocks of one model all have the same size, so almost every insert after the
    tier fills reuses a buffer. ``max_free_bytes`` bounds what is kept idle.
    """

    def __init__(self, pin_memory: bool, max_free_bytes: int) -> None:
        self.pin_memory = pin_memory
        self.max_free_bytes = max_free_bytes
        self._free: dict[int, list[torch.Tensor]] = {}
        self._free_bytes = 0

    def alloc(self, nbytes: int) -> torch.Tensor:
        bucket = self._free.get(nbytes)
        if bucket:
            self._free_bytes -= nbytes
            return bucket.pop()
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.pin_memory)

    def release(self, buf: torch.Tensor) -> None:
        """Give a buffer back. The caller guarantees nobody else still reads it."""
        n = buf.numel()
        if self._free_bytes + n <= self.max_free_bytes:
            self._free.setdefault(n, []).append(buf)
            self._free_bytes += n

    def clear(self) -> None:
        self._free.clear()
        self._free_bytes = 0


class DramTier:
    """LRU map key -> flat uint8 host buffer, bounded by total bytes.

    ``can_recycle(key)`` tells whether an evicted block's buffer may be reused (False while the disk
    writer still has to write it); buffers returned by ``lookup`` are the stored ones, so callers copy out.
    """

    def __init__(self, capacity_bytes: int, pin_memory: bool,
                 can_recycle: Callable[[bytes], bool] = lambda key: True) -> None:
        self.capacity_bytes = int(capacity_bytes)
        self.used_bytes = 0
        self._blocks: OrderedDict[bytes, torch.Tensor] = OrderedDict()
        self._can_recycle = can_recycle
        # Keep at most ~1/16 of the tier (or 64 MiB) idle for reuse.
        self.allocator = HostBufferAllocator(pin_memory, max_free_bytes=min(self.capacity_bytes // 16, 64 << 20))

    def __len__(self) -> int:
        return len(self._blocks)

    def __contains__(self, key: bytes) -> bool:
        return key in self._blocks

    def lookup(self, key: bytes) -> torch.Tensor | None:
        buf = self._blocks.get(key)
        if buf is not None:
            self._blocks.move_to_end(key)
        return buf

    def insert(self, key: bytes, src: torch.Tensor) -> tuple[torch.Tensor | None, int]:
        """Copy ``src`` (flat uint8, any device) in as the most recent block.

        Returns (stored buffer or None if the block can never fit, number of blocks evicted).
        An existing key is only refreshed: content-addressed keys mean equal bytes.
        """
        nbytes = src.numel()
        if key in self._blocks:
            self._blocks.move_to_end(key)
            return self._blocks[key], 0
        if nbytes > self.capacity_bytes:
            return None, 0
        evicted = 0
        while self.used_bytes + nbytes > self.capacity_bytes:
            old_key, old_buf = self._blocks.popitem(last=False)
            self.used_bytes -= old_buf.numel()
            evicted += 1
            if self._can_recycle(old_key):
                self.allocator.release(old_buf)
        buf = self.allocator.alloc(nbytes)
        buf.copy_(src, non_blocking=False)
        self._blocks[key] = buf
        self.used_bytes += nbytes
        return buf, evicted

    def clear(self) -> None:
        self._blocks.clear()
        self.allocator.clear()
        self.used_bytes = 0
