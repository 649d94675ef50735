"""PyTorch reference for ``scatter_host_blocks``: copy stored KV blocks into vLLM's per-layer paged caches."""

from __future__ import annotations

import torch


def scatter_host_blocks_ref(views: list[torch.Tensor], block_ids: list[int], blocks: list[torch.Tensor]) -> None:
    """``views[l][block_ids[i]] = blocks[i][l]`` for every layer ``l`` and block ``i``.

    views:     per layer ``[num_blocks, *page_shape]`` (any strides, any device), written in place
    block_ids: ``n`` destination page ids
    blocks:    ``n`` flat ``uint8`` host tensors, each a contiguous ``[num_layers, *page_shape]`` in the views'
               dtype (the store's block layout: pages in logical order)
    """
    page_shape, dtype = tuple(views[0].shape[1:]), views[0].dtype
    for bid, raw in zip(block_ids, blocks):
        block = raw.view(dtype).view(len(views), *page_shape).to(views[0].device)
        for layer, view in enumerate(views):
            view[bid].copy_(block[layer])
