"""Quest-style sparse decode over a paged KV cache (issue 3).

Per decode step: ``update_page_summary`` keeps each page's channel-wise key min/max current;
``select_topk_pages`` scores every page of a request by the Quest bound ``sum_i max(q_i min_i, q_i max_i)``
and keeps the best ``num_select`` per kv head (sink and recent pages forced in); ``sparse_paged_decode``
attends over those pages only. ``naive.py`` holds the PyTorch references the Triton kernels are tested
against.
"""

from longseq.kernels.sparse_decode.decode import default_num_splits, dense_page_ids, sparse_paged_decode
from longseq.kernels.sparse_decode.naive import (
    score_pages_ref,
    select_topk_pages_ref,
    sparse_paged_decode_ref,
    update_page_summary_ref,
)
from longseq.kernels.sparse_decode.page_summary import allocate_page_summary, update_page_summary
from longseq.kernels.sparse_decode.select import score_pages, select_topk_pages, topk_pages

__all__ = [
    "allocate_page_summary",
    "default_num_splits",
    "dense_page_ids",
    "score_pages",
    "score_pages_ref",
    "select_topk_pages",
    "select_topk_pages_ref",
    "sparse_paged_decode",
    "sparse_paged_decode_ref",
    "topk_pages",
    "update_page_summary",
    "update_page_summary_ref",
]
