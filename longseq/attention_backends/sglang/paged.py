"""SGLang's KV pool as a paged cache, for the longseq backends that run longseq's own kernels on it.

With ``--page-size P`` every request owns whole pages and slot ``s`` is row ``s % P`` of page ``s // P``, so
``k_buffer.view(-1, P, Hkv, D)`` is a paged cache with block size ``P`` and a request's block table is
``req_to_token[req, ::P] // P``. The table is gathered once per step; for decode CUDA graphs it is gathered inside
the graph (``init_forward_metadata_in_graph``) into a full-width buffer made in ``init_cuda_graph_state``, so each
replay re-gathers it from the static ``req_pool_indices`` buffer.
"""

from __future__ import annotations

import torch


class PagedPool:
    """Mixin for a ``LongSeqTechniqueBackend``: ``page_size``, ``block_table`` (this step's, or None),
    ``graph_block_table``; subclasses may override ``_table_ready`` (called after the in-graph gather)."""

    _PAGED_OWN = frozenset({"page_size", "block_table", "graph_block_table"})

    def _init_paged(self, page_size: int) -> None:
        self.page_size = int(page_size)
        self.block_table: torch.Tensor | None = None
        self.graph_block_table: torch.Tensor | None = None

    def _gather_block_table(self, forward_batch, num_pages: int | None = None) -> torch.Tensor:
        """``[B, num_pages]`` int32 page ids of each request's pages (default: the table's full width)."""
        p = self.page_size
        stop = self.req_to_token.shape[1] if num_pages is None else num_pages * p
        return (self.req_to_token[forward_batch.req_pool_indices.long(), :stop:p] // p).to(torch.int32)

    def _eager_block_table(self, forward_batch) -> torch.Tensor:
        """This step's table, only the pages in use when the host knows the lengths."""
        seq_lens_cpu = getattr(forward_batch, "seq_lens_cpu", None)
        pages = None if seq_lens_cpu is None else -(-int(seq_lens_cpu.max()) // self.page_size)
        return self._gather_block_table(forward_batch, pages)

    def _step_block_table(self, forward_batch) -> torch.Tensor:
        """The prepared table, or one gathered now if ``init_forward_metadata`` did not prepare this batch."""
        table = self.block_table
        if table is None or table.shape[0] != forward_batch.req_pool_indices.shape[0]:
            table = self._gather_block_table(forward_batch)
        return table

    def init_cuda_graph_state(self, max_bs: int, max_num_tokens: int):
        self.inner.init_cuda_graph_state(max_bs, max_num_tokens)
        width = -(-self.req_to_token.shape[1] // self.page_size)  # full width: shapes fixed for replay
        self.graph_block_table = torch.zeros(max_bs, width, dtype=torch.int32, device=self.req_to_token.device)

    def init_forward_metadata_in_graph(self, forward_batch):
        self.inner.init_forward_metadata_in_graph(forward_batch)
        if forward_batch.forward_mode.is_decode() and self.graph_block_table is not None:
            table = self.graph_block_table[: forward_batch.req_pool_indices.shape[0]]
            table.copy_(self._gather_block_table(forward_batch))
            self.block_table = table
            self._table_ready(forward_batch)

    def _table_ready(self, forward_batch) -> None:
        """Hook: the in-graph table of a decode step is in ``block_table``."""

    def _paged_kv(self, layer) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's key and value buffers as ``[num_pages, P, Hkv, D]`` views (no copy)."""
        def paged(buf: torch.Tensor) -> torch.Tensor:  # [num_slots, Hkv, D]
            rows = buf.shape[0] // self.page_size * self.page_size  # allocated slots never reach the tail
            return buf[:rows].view(-1, self.page_size, *buf.shape[1:])

        return paged(self.pool.get_key_buffer(layer.layer_id)), paged(self.pool.get_value_buffer(layer.layer_id))
