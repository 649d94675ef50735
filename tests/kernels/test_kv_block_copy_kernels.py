"""``scatter_host_blocks`` (KV offload loads) vs its PyTorch reference (longseq.kernels.kv_block_copy.naive).

Without CUDA the kernel runs in Triton's interpreter (host addresses are ordinary CPU pointers there); with CUDA
the source blocks are pinned host memory read by the GPU over the bus, the path the connector uses.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from triton_interp import CUDA, import_kernels, interpreter_env  # noqa: E402

DEV = "cuda" if CUDA else "cpu"
kbc = import_kernels("longseq.kernels.kv_block_copy.scatter", "longseq.kernels.kv_block_copy")[-1]
_interpreter_env = pytest.fixture(autouse=True, scope="module")(interpreter_env)


def _caches(layout: str, layers: int, num_blocks: int, bs: int, h: int, d: int, dtype, g):
    """Per-layer page views ``[num_blocks, *page]`` of caches laid out as the named backend lays them out."""
    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(dtype).to(DEV)
    if layout == "fa026":  # vLLM 0.26 FlashAttention: logical [B, H, bs, 2D] stored as [B, bs, H, 2D]
        return [rnd(num_blocks, bs, h, 2 * d).permute(0, 2, 1, 3) for _ in range(layers)]
    if layout == "flash":  # [2, num_blocks, bs, H, D] -> page [2, bs, H, D]: 2 runs (K, V)
        return [rnd(2, num_blocks, bs, h, d).movedim(1, 0) for _ in range(layers)]
    if layout == "flashinfer":  # [num_blocks, 2, bs, H, D]: pages contiguous
        return [rnd(num_blocks, 2, bs, h, d) for _ in range(layers)]
    if layout == "cpu":  # vLLM CPU: [num_blocks, H, bs, 2 * D]
        return [rnd(num_blocks, h, bs, 2 * d) for _ in range(layers)]
    if layout == "scrambled":  # [num_blocks, 2, bs, H, D] seen through [D, H, bs] order: 3 strided dims, not covered
        return [rnd(num_blocks, 2, bs, h, d).permute(0, 4, 3, 2, 1) for _ in range(layers)]
    raise ValueError(layout)


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality (random bytes seen as floats include NaNs, which ``torch.equal`` calls unequal)."""
    return torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def _host_blocks(views, n, g):
    page = views[0][0]
    nbytes = len(views) * page.numel() * page.element_size()
    return [torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=g) for _ in range(n)]


@pytest.mark.parametrize("layout,dtype,shape,word", [
    ("fa026", torch.bfloat16, (4, 3, 8), 8), ("flash", torch.bfloat16, (4, 2, 8), 8),
    ("flashinfer", torch.float16, (4, 2, 8), 8),
    ("cpu", torch.float32, (4, 2, 8), 8),
    ("flash", torch.uint8, (3, 1, 5), 1),  # fp8-like: 15-byte runs, so byte words
    ("flash", torch.float16, (3, 1, 2), 4)])  # 12-byte runs: 4-byte words
def test_scatter_matches_reference(layout, dtype, shape, word):
    bs, h, d = shape
    views = _caches(layout, 3, 9, bs, h, d, dtype, torch.Generator().manual_seed(7))
    before = [v.clone() for v in views]
    want = [v.clone() for v in views]
    g = torch.Generator().manual_seed(8)
    blocks = _host_blocks(views, 5, g)
    if CUDA:
        blocks = [b.pin_memory() for b in blocks]
    ids = [8, 0, 3, 5, 1]
    lay = kbc.page_layout(views)
    assert lay is not None and lay.word == word
    kbc.scatter_host_blocks_ref(want, ids, blocks)
    kbc.scatter_host_blocks(lay, torch.tensor(ids, device=DEV), torch.tensor([b.data_ptr() for b in blocks], device=DEV),
                            torch.tensor(lay.layer_bases, device=DEV))
    if CUDA:
        torch.cuda.synchronize()
    for v, w, b in zip(views, want, before):
        assert _same_bytes(v, w)
        assert not _same_bytes(v[ids], b[ids])  # the loaded pages did change
    untouched = [i for i in range(9) if i not in ids]  # pages not loaded keep their bytes
    assert all(_same_bytes(v[untouched], b[untouched]) for v, b in zip(views, before))


def test_page_layout():
    g = torch.Generator().manual_seed(0)
    fa026 = kbc.page_layout(_caches("fa026", 2, 6, 16, 8, 128, torch.bfloat16, g))
    # runs of 2D over (H, block): H stride 2D, block-row stride H * 2D
    assert (fa026.outer1, fa026.stride1, fa026.outer2, fa026.stride2, fa026.inner_bytes, fa026.word) == \
        (8, 256 * 2, 16, 8 * 256 * 2, 256 * 2, 8)
    flash = kbc.page_layout(_caches("flash", 2, 6, 16, 8, 128, torch.bfloat16, g))
    assert (flash.outer1, flash.outer2, flash.stride2, flash.inner_bytes) == (1, 2, 6 * 16 * 8 * 128 * 2,
                                                                              16 * 8 * 128 * 2)
    assert flash.block_stride == 16 * 8 * 128 * 2
    contig = kbc.page_layout(_caches("flashinfer", 2, 6, 16, 8, 128, torch.bfloat16, g))
    assert (contig.outer1, contig.outer2, contig.inner_bytes) == (1, 1, 2 * 16 * 8 * 128 * 2)
    assert kbc.page_layout(_caches("scrambled", 2, 6, 16, 8, 128, torch.bfloat16, g)) is None
    views = _caches("flash", 2, 6, 16, 8, 128, torch.bfloat16, g)
    assert kbc.page_layout([views[0], views[1][:, :1]]) is None  # layers must share shape and strides


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_scatter_llama8b_block_from_pinned():
    """Llama-3.1-8B pages (32 layers, block 16, 8 KV heads, d128, bf16: 2 MiB per block) from pinned slab pieces,
    as the store holds them."""
    g = torch.Generator().manual_seed(3)
    views = _caches("fa026", 32, 64, 16, 8, 128, torch.bfloat16, g)
    nbytes = 32 * 2 * 16 * 8 * 128 * 2
    slab = torch.randint(0, 256, (40 * nbytes,), dtype=torch.uint8, generator=g).pin_memory()
    blocks = [slab[i * nbytes:(i + 1) * nbytes] for i in torch.randperm(40, generator=g)[:24].tolist()]
    ids = torch.randperm(64, generator=g)[:24].tolist()
    want = [v.clone() for v in views]
    kbc.scatter_host_blocks_ref(want, ids, blocks)
    lay = kbc.page_layout(views)
    kbc.scatter_host_blocks(lay, torch.tensor(ids, device=DEV), torch.tensor([b.data_ptr() for b in blocks], device=DEV),
                            torch.tensor(lay.layer_bases, device=DEV))
    torch.cuda.synchronize()
    assert all(_same_bytes(v, w) for v, w in zip(views, want))
