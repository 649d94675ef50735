"""Tier 1: CPU DRAM, LRU by bytes, pinned host memory when CUDA is present.

Not thread-safe by itself: ``BlockStore`` calls it under its own lock.
"""

from __future__ import annotations

import mmap
from collections import OrderedDict
from typing import Callable

import numpy as np
import torch


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    """A flat ``uint8`` view of a contiguous tensor (any dtype, fp8 included). No copy."""
    if not t.is_contiguous():
        raise ValueError(f"KV block tensor must be contiguous (shape {tuple(t.shape)}, stride {t.stride()})")
    return t.reshape(-1).view(torch.uint8)


def copy_bytes(dst: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """``dst.copy_(src)`` for two ``uint8`` tensors of one shape; host to host it is a numpy copy.

    The store's copies run on background threads (the vLLM connector's save thread and disk readers, SGLang's
    HiCache threads). torch's CPU ``copy_`` runs an OpenMP parallel region, and one started from another thread
    builds a second OpenMP thread team beside the engine's. On vLLM's CPU platform that slowed every later
    decode step (docs/benchmarks/kv-offload.md). numpy copies in the calling thread only, with the GIL released.
    """
    if dst.device.type == "cpu" and src.device.type == "cpu" and dst.dtype == src.dtype == torch.uint8 \
            and dst.shape == src.shape:
        np.copyto(dst.numpy(), src.numpy())
        return dst
    return dst.copy_(src)


#: Pageable host buffers at least this big get their own anonymous mapping (``host_bytes``).
MMAP_MIN_BYTES = 1 << 20


def host_bytes(nbytes: int) -> torch.Tensor:
    """A flat pageable ``uint8`` CPU tensor of ``nbytes``; from ``MMAP_MIN_BYTES`` up it owns an anonymous mmap.

    Block-sized buffers are allocated and freed all the time from several threads (save, disk writer, readers).
    Through malloc, glibc raises its mmap threshold after the first large free, so later blocks come from
    per-thread arenas that keep the freed pages (docs/benchmarks/kv-offload.md, the soak). A mapping is returned
    to the OS when the tensor dies (M_MMAP_THRESHOLD in ``man mallopt``).
    """
    if nbytes < MMAP_MIN_BYTES:
        return torch.empty(nbytes, dtype=torch.uint8)
    return torch.frombuffer(mmap.mmap(-1, nbytes), dtype=torch.uint8)  # the tensor holds the mapping alive


def default_pin_memory() -> bool:
    """Pinned (page-locked) host memory lets GPU<->CPU copies run async at full PCIe/NVLink-C2C speed;
    it only exists with a CUDA device."""
    return torch.cuda.is_available()


SLAB_BYTES = 64 << 20


def _pow2_ceil(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


class HostBufferAllocator:
    """Flat ``uint8`` host buffers for blocks, pinned if asked, recycled after eviction.

    Pinned allocation (``cudaHostAlloc``) costs milliseconds and serializes with the GPU, and torch's
    caching host allocator rounds every pinned request up to a power of two (a 2.3 MiB block would hold
    4 MiB). So pinned buffers are carved from power-of-two slabs (``slab_bytes``, default 64 MiB or the
    tier size if smaller) into exact-size pieces that are recycled forever: pinned memory held =
    the peak bytes in use + at most one partly carved slab per block size (``pinned_bytes``).
    Pageable buffers come from the normal allocator; ``max_free_bytes`` of freed ones are kept for reuse.
    """

    def __init__(self, pin_memory: bool, max_free_bytes: int, use_slabs: bool | None = None,
                 slab_bytes: int = SLAB_BYTES) -> None:
        self.pin_memory = pin_memory
        self.use_slabs = pin_memory if use_slabs is None else use_slabs
        self.slab_bytes = _pow2_ceil(max(1, slab_bytes))
        self.max_free_bytes = max_free_bytes
        self.pinned_bytes = 0  # total size of the slabs (pinned memory held)
        self._free: dict[int, list[torch.Tensor]] = {}
        self._free_bytes = 0

    def alloc(self, nbytes: int) -> torch.Tensor:
        bucket = self._free.get(nbytes)
        if bucket:
            if not self.use_slabs:
                self._free_bytes -= nbytes
            return bucket.pop()
        if not self.use_slabs:
            return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True) if self.pin_memory else host_bytes(nbytes)
        self.add_slab(self.new_slab(nbytes), nbytes)
        return self._free[nbytes].pop()

    def reserve(self, nbytes: int, count: int, max_slab_bytes: int = 1 << 30) -> int:
        """Carve slabs now until ``count`` pieces of ``nbytes`` are free (fewer if some already are); returns
        the bytes newly allocated. Slabs up to ``max_slab_bytes`` (a power of two) cut the number of
        ``cudaHostAlloc`` calls; the total cost is about the same per byte, but paid once, before serving."""
        if not self.use_slabs or count <= 0:
            return 0
        want = count - len(self._free.get(nbytes, []))
        added = 0
        while want > 0:
            # Largest power of two that the remaining pieces fill (no slab beyond the tier), capped.
            fill = 1 << ((want * nbytes).bit_length() - 1)
            slab_size = max(_pow2_ceil(nbytes), min(_pow2_ceil(max_slab_bytes), fill))
            slab = torch.empty(slab_size, dtype=torch.uint8, pin_memory=self.pin_memory)
            self.add_slab(slab, nbytes)
            added += slab_size
            want -= slab_size // nbytes
        return added

    def needs_slab(self, nbytes: int) -> bool:
        """``alloc(nbytes)`` would carve a new slab (a slow pinned allocation: worth doing outside locks)."""
        return self.use_slabs and not self._free.get(nbytes)

    def new_slab(self, nbytes: int) -> torch.Tensor:
        """A slab for pieces of ``nbytes``. Touches no allocator state, so it may run outside the caller's lock."""
        slab_size = max(self.slab_bytes, _pow2_ceil(nbytes))  # a power of two: nothing lost to rounding
        return torch.empty(slab_size, dtype=torch.uint8, pin_memory=self.pin_memory)

    def add_slab(self, slab: torch.Tensor, nbytes: int) -> None:
        """Carve ``slab`` (from ``new_slab``) into free pieces of ``nbytes``; each piece keeps the slab alive."""
        self.pinned_bytes += slab.numel()
        pieces = [slab[k * nbytes:(k + 1) * nbytes] for k in range(slab.numel() // nbytes)]
        self._free.setdefault(nbytes, []).extend(pieces[::-1])  # the next alloc gets the slab's first piece

    def release(self, buf: torch.Tensor) -> None:
        """Give a buffer back. The caller guarantees nobody else still reads it."""
        n = buf.numel()
        if self.use_slabs:  # slab pieces are never given back to torch: the slab stays pinned anyway
            self._free.setdefault(n, []).append(buf)
        elif self._free_bytes + n <= self.max_free_bytes:
            self._free.setdefault(n, []).append(buf)
            self._free_bytes += n

    def clear(self) -> None:
        self._free.clear()
        self._free_bytes = 0
        self.pinned_bytes = 0


class DramTier:
    """LRU map key -> flat uint8 host buffer, bounded by total bytes.

    ``can_recycle(key, buf)`` tells whether an evicted block's buffer may be reused (False while the disk
    writer still has to write it or a reader still copies it out); buffers returned by ``lookup`` are the stored
    ones, so callers copy out.
    """

    def __init__(self, capacity_bytes: int, pin_memory: bool,
                 can_recycle: Callable[[bytes, torch.Tensor], bool] = lambda key, buf: True) -> None:
        self.capacity_bytes = int(capacity_bytes)
        self.used_bytes = 0
        self._blocks: OrderedDict[bytes, torch.Tensor] = OrderedDict()
        self._can_recycle = can_recycle
        # Pageable: keep at most ~1/16 of the tier (or 64 MiB) idle for reuse. Pinned: slabs no larger
        # than the tier itself.
        self.allocator = HostBufferAllocator(pin_memory, max_free_bytes=min(self.capacity_bytes // 16, 64 << 20),
                                             slab_bytes=min(SLAB_BYTES, max(1, self.capacity_bytes)))

    def __len__(self) -> int:
        return len(self._blocks)

    def __contains__(self, key: bytes) -> bool:
        return key in self._blocks

    def holds(self, key: bytes, buf: torch.Tensor) -> bool:
        """``buf`` is the buffer stored for ``key`` (no LRU update)."""
        return self._blocks.get(key) is buf

    def slab_wanted(self, key: bytes, nbytes: int) -> bool:
        """Inserting ``key`` would carve a new slab: not held, fits without evicting (an eviction recycles
        a piece instead) and no free piece of that size."""
        return (key not in self._blocks and self.used_bytes + nbytes <= self.capacity_bytes
                and self.allocator.needs_slab(nbytes))

    def reserve(self, nbytes: int) -> int:
        """Pre-carve pinned pieces of ``nbytes`` for the whole tier (``capacity // nbytes`` blocks); returns the
        bytes allocated. Lazy carving calls ``cudaHostAlloc`` while serving, and that call stalls the engine's
        own CUDA calls: reserving up front keeps them off the cold-prompt TTFT (docs/benchmarks/kv-offload.md)."""
        return self.allocator.reserve(nbytes, (self.capacity_bytes - self.used_bytes) // nbytes)

    def peek(self, key: bytes) -> torch.Tensor | None:
        """The stored buffer, without marking it recently used."""
        return self._blocks.get(key)

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
            if self._can_recycle(old_key, old_buf):
                self.allocator.release(old_buf)
        buf = self.allocator.alloc(nbytes)
        copy_bytes(buf, src)
        self._blocks[key] = buf
        self.used_bytes += nbytes
        return buf, evicted

    def discard(self, key: bytes) -> None:
        """Forget one block (no-op if absent); its buffer is recycled unless the disk writer still needs it."""
        buf = self._blocks.pop(key, None)
        if buf is not None:
            self.used_bytes -= buf.numel()
            if self._can_recycle(key, buf):
                self.allocator.release(buf)

    def drop_blocks(self) -> None:
        """Forget every block but keep the buffers for reuse (pinned slabs stay allocated): the state of a server
        restarted with its tier reserved at start-up. Buffers the disk writer still needs are left to it."""
        for key, buf in self._blocks.items():
            if self._can_recycle(key, buf):
                self.allocator.release(buf)
        self._blocks.clear()
        self.used_bytes = 0

    def clear(self) -> None:
        self._blocks.clear()
        self.allocator.clear()
        self.used_bytes = 0
