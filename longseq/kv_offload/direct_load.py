"""Loads on CUDA with one kernel that reads the store's pinned DRAM buffers directly (no staging tensor).

The per-block path (``OffloadWorker._load_chunk_staged``) falls short of the pinned host-to-device bandwidth
(docs/benchmarks/kv-offload.md): one ``cudaMemcpyAsync`` per 2 MiB block plus a scatter per layer. ``scatter_host_blocks``
(``longseq.kernels.kv_block_copy``) reads the pinned buffers over the bus from the GPU itself and writes every
layer's pages, a request's whole prefix in one launch.

It relies on pinned host memory being addressable from the GPU at its host address (unified addressing,
every CUDA platform vLLM runs on). That is checked once at start-up with a known pattern; if the check or the
cache layout fails, loads use the per-block path and the log says why.
"""

from __future__ import annotations

import logging

import torch

from .store import BlockStore

log = logging.getLogger("longseq.kv_offload")


class DirectLoad:
    """Copies the leading pinned-DRAM-resident blocks of a prefix into the per-layer page views, one launch."""

    def __init__(self, views: list[torch.Tensor], store: BlockStore, layout) -> None:
        self.store = store
        self.layout = layout
        self.device = views[0].device
        self.layer_bases = torch.tensor(layout.layer_bases, dtype=torch.int64, device=self.device)

    def warm_up(self, views: list[torch.Tensor]) -> None:
        """Compile the kernel for this cache layout now, not in the first hit's TTFT (a Triton JIT compile): copy
        page 0's own bytes back onto it (start-up: no request uses the caches yet)."""
        from longseq.kernels.kv_block_copy import scatter_host_blocks

        host = torch.stack([v[0] for v in views]).cpu().reshape(-1).view(torch.uint8).pin_memory()
        before = [v[0].clone() for v in views]
        scatter_host_blocks(self.layout, torch.zeros(1, dtype=torch.int64, device=self.device),
                            torch.tensor([host.data_ptr()], dtype=torch.int64, device=self.device), self.layer_bases)
        torch.cuda.synchronize(self.device)
        if not all(torch.equal(v[0].contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))
                   for v, b in zip(views, before)):
            raise RuntimeError("warm-up copy of page 0 onto itself changed it")

    def load(self, block_ids: list[int], keys: list[bytes], block_bytes: int) -> int:
        """Load the longest prefix of ``keys`` that is in pinned DRAM into pages ``block_ids``; returns its
        length. Runs (and synchronizes) under the store's lock: eviction may recycle a buffer once it is
        released."""
        from longseq.kernels.kv_block_copy import scatter_host_blocks

        loaded = 0
        word = self.layout.word

        def read(bufs: list[torch.Tensor | None]) -> None:
            nonlocal loaded
            n = next((i for i, b in enumerate(bufs) if b is None), len(bufs))
            addrs = [b.data_ptr() for b in bufs[:n]]
            if n == 0 or any(a % word for a in addrs):
                return
            dev = self.device
            src = torch.tensor(addrs, dtype=torch.int64, pin_memory=True).to(dev, non_blocking=True)
            ids = torch.tensor(block_ids[:n], dtype=torch.int64, pin_memory=True).to(dev, non_blocking=True)
            scatter_host_blocks(self.layout, ids, src, self.layer_bases)
            torch.cuda.current_stream(dev).synchronize()
            loaded = n

        self.store.read_dram_batch(keys, block_bytes, read, pinned_only=True)
        return loaded


def direct_load_setup(views: list[torch.Tensor], store: BlockStore) -> DirectLoad | None:
    """A ``DirectLoad`` for these caches, or None (logged) when the per-block path must be used."""
    try:
        from longseq.kernels.kv_block_copy import page_layout

        if not store.pin_memory:
            log.info("LongSeqOffloadConnector: DRAM tier not pinned: loads use per-block copies")
            return None
        layout = page_layout(views)
        if layout is None:
            log.warning("LongSeqOffloadConnector: KV cache page layout %s / strides %s not covered by the direct "
                        "load kernel: loads use per-block copies", list(views[0].shape), list(views[0].stride()))
            return None
        self_test(views[0].device)
        direct = DirectLoad(views, store, layout)
        direct.warm_up(views)
    except Exception as e:  # any failure here only means the slower path
        log.warning("LongSeqOffloadConnector: direct load kernel unavailable (%s): loads use per-block copies", e)
        return None
    log.info("LongSeqOffloadConnector: loads use the direct-read kernel (%s)", layout)
    return direct


def self_test(device: torch.device) -> None:
    """Raise unless the kernel moves pinned host bytes into a two-layer device layout exactly (vLLM 0.26
    FlashAttention's page order: both strided dimensions in use)."""
    from longseq.kernels.kv_block_copy import page_layout, scatter_host_blocks, scatter_host_blocks_ref

    gen = torch.Generator().manual_seed(1)
    caches = [torch.zeros(5, 4, 3, 16, dtype=torch.bfloat16, device=device) for _ in range(2)]
    views = [c.permute(0, 2, 1, 3) for c in caches]
    blocks = [torch.randint(0, 256, (2 * views[0][0].numel() * 2,), dtype=torch.uint8, generator=gen)
              .pin_memory() for _ in range(3)]
    ids = [4, 0, 2]
    want = [c.clone() for c in caches]
    scatter_host_blocks_ref([w.permute(0, 2, 1, 3) for w in want], ids, blocks)
    layout = page_layout(views)
    scatter_host_blocks(layout, torch.tensor(ids, device=device),
                        torch.tensor([b.data_ptr() for b in blocks], device=device),
                        torch.tensor(layout.layer_bases, device=device))
    torch.cuda.synchronize(device)
    if not all(torch.equal(c.view(torch.int16), w.view(torch.int16)) for c, w in zip(caches, want)):
        raise RuntimeError("self-test: bytes read from pinned host memory differ")
