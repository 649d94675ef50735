"""Copies of stored KV blocks into paged caches (KV offload loads, issue 5). ``naive.py`` is the reference."""

from longseq.kernels.kv_block_copy.naive import scatter_host_blocks_ref
from longseq.kernels.kv_block_copy.scatter import PageLayout, page_layout, scatter_host_blocks

__all__ = ["PageLayout", "page_layout", "scatter_host_blocks", "scatter_host_blocks_ref"]
