"""``scatter_host_blocks``: one Triton kernel reads stored KV blocks straight from pinned host memory and
writes them into every layer's paged cache.

The per-block path (one ``cudaMemcpyAsync`` per 2 MiB block into a device staging tensor, then one
``index_copy_`` per layer) falls short of the pinned host-to-device bandwidth (docs/benchmarks/kv-offload.md):
each copy pays a fixed launch/DMA-setup cost. Here the GPU reads the pinned buffers itself (pinned
``cudaHostAlloc`` memory is mapped into the device's address space under unified addressing, at the same
address), many blocks at once, so there is one launch per load, no staging tensor and no second pass.

The caller must keep every source buffer alive and unchanged until the kernel has finished (synchronize).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

#: Words moved per program (a word is up to 8 bytes: the largest size every offset is a multiple of).
BLOCK_WORDS = 1024

@dataclass(frozen=True)
class PageLayout:
    """How one page of one layer lies in memory. In logical order (the store's block holds, per layer, the page
    in logical order) a page is ``outer1 x outer2`` runs of ``inner_bytes`` contiguous bytes; run ``(i, j)``
    starts ``i * stride1 + j * stride2`` bytes into the page. Pages lie ``block_stride`` bytes apart;
    ``layer_bases`` holds each layer's address of page 0. ``word``: the widest access (bytes) that divides
    every size, stride and base."""

    outer1: int
    stride1: int
    outer2: int
    stride2: int
    inner_bytes: int
    block_stride: int
    layer_bases: tuple[int, ...]
    word: int


def page_layout(views: list[torch.Tensor]) -> PageLayout | None:
    """The ``PageLayout`` of per-layer views ``[num_blocks, *page_shape]`` (one dtype, shape and strides), or
    None when a page needs more than two strided dimensions around its contiguous part (the caller then copies
    per block).

    vLLM 0.26 CUDA FlashAttention (logical ``[B, H, bs, 2D]`` stored as ``[B, bs, H, 2D]``): runs of ``2D``
    over (H, bs); the ``[2, B, bs, H, D]`` layout: 2 runs (K, V) of ``bs*H*D``; contiguous pages: 1 run."""
    v = views[0]
    for w in views[1:]:
        if w.shape != v.shape or w.stride() != v.stride() or w.dtype != v.dtype or w.device != v.device:
            return None
    es = v.element_size()
    dims = [(n, st) for n, st in zip(v.shape[1:], v.stride()[1:]) if n != 1]
    inner, k = 1, len(dims)
    while k > 0 and dims[k - 1][1] == inner:  # contiguous suffix
        inner *= dims[k - 1][0]
        k -= 1
    outer: list[tuple[int, int]] = []  # leading dims, adjacent ones merged where their strides allow
    for n, st in dims[:k]:
        if outer and outer[-1][1] == st * n:
            outer[-1] = (outer[-1][0] * n, st)
        else:
            outer.append((n, st))
    if len(outer) > 2:
        return None
    outer = [(1, 0)] * (2 - len(outer)) + outer
    (o1, s1), (o2, s2) = outer
    inner_bytes, s1, s2, block_stride = inner * es, s1 * es, s2 * es, v.stride(0) * es
    bases = tuple(w.data_ptr() for w in views)
    word = 8
    while word > 1 and any(x % word for x in (inner_bytes, s1, s2, block_stride, *bases)):
        word //= 2
    return PageLayout(o1, s1, o2, s2, inner_bytes, block_stride, bases, word)


@triton.jit
def _scatter_host_blocks_kernel(src_addr_ptr, dst_block_ptr, layer_base_ptr, block_stride, stride1, stride2,
                                OUTER1: tl.constexpr, OUTER2: tl.constexpr, INNER: tl.constexpr,
                                WORD: tl.constexpr, BLOCK_O2: tl.constexpr, BLOCK_I: tl.constexpr):
    # grid: (blocks, layers * OUTER1, cdiv(OUTER2, BLOCK_O2) * cdiv(INNER, BLOCK_I)); INNER, BLOCK_I in words.
    # Each program moves a [BLOCK_O2, BLOCK_I] tile of runs: contiguous in the source block, strided in the page.
    b = tl.program_id(0)
    lo = tl.program_id(1)
    t = tl.program_id(2)
    n_i: tl.constexpr = (INNER + BLOCK_I - 1) // BLOCK_I
    layer = lo // OUTER1
    o1 = lo % OUTER1
    o2 = (t // n_i) * BLOCK_O2 + tl.arange(0, BLOCK_O2)
    i = (t % n_i) * BLOCK_I + tl.arange(0, BLOCK_I)
    mask = (o2 < OUTER2)[:, None] & (i < INNER)[None, :]
    if WORD == 8:
        ty = tl.int64
    elif WORD == 4:
        ty = tl.int32
    elif WORD == 2:
        ty = tl.int16
    else:
        ty = tl.uint8
    src_base = tl.load(src_addr_ptr + b) + lo.to(tl.int64) * (OUTER2 * INNER * WORD)
    dst_base = (tl.load(layer_base_ptr + layer) + tl.load(dst_block_ptr + b) * block_stride
                + o1.to(tl.int64) * stride1)
    src = src_base.to(tl.pointer_type(ty)) + (o2.to(tl.int64) * INNER)[:, None] + i[None, :]
    dst = (dst_base + o2.to(tl.int64) * stride2)[:, None].to(tl.pointer_type(ty)) + i[None, :]
    tl.store(dst, tl.load(src, mask=mask), mask=mask)


def scatter_host_blocks(layout: PageLayout, block_ids: torch.Tensor, src_addrs: torch.Tensor,
                        layer_bases: torch.Tensor, block_words: int = BLOCK_WORDS, num_warps: int = 4) -> None:
    """Launch the copy on the current stream (asynchronous).

    block_ids:   ``[n]`` int64 on the cache device, destination page ids
    src_addrs:   ``[n]`` int64 on the cache device, addresses of the source blocks (pinned host memory; flat
                 ``[num_layers, *page_shape]`` in logical order, ``layout.word``-aligned)
    layer_bases: ``[num_layers]`` int64 on the cache device (``torch.tensor(layout.layer_bases)``)
    block_words, num_warps: tile size (words per program) and warps per program (``bench_kv_reload.py`` sweeps)
    """
    n = block_ids.numel()
    if n == 0:
        return
    inner = layout.inner_bytes // layout.word
    block_i = min(block_words, triton.next_power_of_2(inner))
    block_o2 = min(triton.next_power_of_2(layout.outer2), max(1, block_words // block_i))
    grid = (n, layer_bases.numel() * layout.outer1, triton.cdiv(layout.outer2, block_o2) * triton.cdiv(inner, block_i))
    _scatter_host_blocks_kernel[grid](src_addrs, block_ids, layer_bases, layout.block_stride, layout.stride1,
                                      layout.stride2, OUTER1=layout.outer1, OUTER2=layout.outer2, INNER=inner,
                                      WORD=layout.word, BLOCK_O2=block_o2, BLOCK_I=block_i, num_warps=num_warps)
