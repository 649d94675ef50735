"""PyTorch references for hierarchical Quest selection (``hierarchical.py``): blocks first, then their pages.

A cache block of ``block_size`` tokens holds ``ppb = block_size // P`` pages. Its block summary
``block_min``/``block_max`` (``[num_blocks, Hkv, D]``, the page summaries' dtype) is the channel-wise min/max
of the summaries of the block's written pages. Since ``max(q min, q max)`` only grows when ``min`` falls or
``max`` rises, the block's Quest score bounds the score of each of its pages, and so every key in it. fp8 page
summaries are already rounded outward, and a min/max of fp8 values is an fp8 value: the block summary is exact
(NaN, "out of range", propagates, and the block scores ``+inf``).

Selection: score every block (``score_pages_ref`` with ``page_size = block_size``), keep the best
``num_blocks_select`` per (request, kv head), then the best ``num_select`` pages among those blocks' pages.
These are loops written for clarity, fp32 math; the Triton kernels are tested against them.
"""

from __future__ import annotations

import torch

from longseq.kernels.sparse_decode.naive import score_pages_ref


def coarse_forced_blocks(num_sink_pages: int, num_recent_pages: int, pages_per_block: int) -> tuple[int, int]:
    """``(sink_blocks, recent_blocks)``: how many first / last live blocks to force so that every block holding
    one of the first ``num_sink_pages`` / last ``num_recent_pages`` pages is kept.

    The first pages fill ``ceil(S / ppb)`` blocks. ``R`` consecutive pages ending anywhere span at most
    ``ceil((R - 1) / ppb) + 1`` blocks; the block scorer takes one count for all requests, so one block more
    than needed is forced when the last page ends a block.
    """
    ppb = pages_per_block
    sink = -(-num_sink_pages // ppb)
    recent = 0 if num_recent_pages <= 0 else -(-(num_recent_pages - 1) // ppb) + 1
    return sink, recent


def update_block_summary_ref(page_min: torch.Tensor, page_max: torch.Tensor, block_min: torch.Tensor,
                             block_max: torch.Tensor, slot_mapping: torch.Tensor, block_size: int,
                             page_size: int) -> None:
    """Recompute, in place, the summary of every block a slot of ``slot_mapping`` was written to.

    Args:
        page_min, page_max: ``[num_blocks * ppb, Hkv, D]`` page summaries, already updated for this step.
        block_min, block_max: ``[num_blocks, Hkv, D]``, the page summaries' dtype.
        slot_mapping: ``[T]`` int slots written this step, ``-1`` = padding.

    A block's tokens are written in order by one request, so its pages ``0..o // P`` (``o``: the largest offset
    written in the block this step) hold that request's keys; later pages may be a previous owner's.
    """
    ppb = block_size // page_size
    last_off: dict[int, int] = {}
    for s in slot_mapping.long().tolist():
        if s >= 0:
            blk = s // block_size
            last_off[blk] = max(last_off.get(blk, -1), s % block_size)
    for blk, off in last_off.items():
        rows = slice(blk * ppb, blk * ppb + off // page_size + 1)
        block_min[blk] = page_min[rows].float().amin(0).to(block_min.dtype)  # amin/amax propagate NaN
        block_max[blk] = page_max[rows].float().amax(0).to(block_max.dtype)


def select_topk_pages_hierarchical_ref(q: torch.Tensor, page_min: torch.Tensor, page_max: torch.Tensor,
                                       block_min: torch.Tensor, block_max: torch.Tensor, block_table: torch.Tensor,
                                       seq_lens: torch.Tensor, page_size: int, block_size: int, num_select: int,
                                       num_blocks_select: int, num_sink_pages: int = 0,
                                       num_recent_pages: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Top ``num_select`` pages among the pages of the top ``num_blocks_select`` blocks, per (request, kv head).

    Args:
        q: ``[B, Hq, D]``; page_min, page_max: ``[num_blocks * ppb, Hkv, D]``; block_min, block_max:
            ``[num_blocks, Hkv, D]``; block_table: ``[B, max_blocks]`` int; seq_lens: ``[B]`` int.
        num_sink_pages, num_recent_pages: first / last live pages forced in (their blocks too,
            ``coarse_forced_blocks``).

    Returns:
        page_ids: ``[B, Hkv, num_select]`` int32 logical pages, ascending, ``-1`` padded; every live page when
            the request has at most ``num_select``. A row holds fewer than ``num_select`` pages only when the
            chosen blocks hold fewer live pages (a partial last block among them and
            ``num_blocks_select * ppb < num_select + ppb - 1``).
        num_valid: ``[B]`` int32 ``min(num_select, ceil(seq_len / P))``.
    """
    ppb = block_size // page_size
    sink_b, recent_b = coarse_forced_blocks(num_sink_pages, num_recent_pages, ppb)
    coarse = score_pages_ref(q, block_min, block_max, block_table, seq_lens, block_size, block_size, sink_b,
                             recent_b)
    fine = score_pages_ref(q, page_min, page_max, block_table, seq_lens, page_size, block_size, num_sink_pages,
                           num_recent_pages)
    bsz, hkv = coarse.shape[:2]
    page_ids = torch.full((bsz, hkv, num_select), -1, dtype=torch.int32, device=q.device)
    num_valid = torch.zeros(bsz, dtype=torch.int32, device=q.device)
    for b in range(bsz):
        n = -(-int(seq_lens[b]) // page_size)
        nb = -(-int(seq_lens[b]) // block_size)
        num_valid[b] = min(num_select, n)
        if n <= num_select:
            page_ids[b, :, :n] = torch.arange(n, dtype=torch.int32, device=q.device)
            continue
        for h in range(hkv):
            blocks = coarse[b, h, :nb].topk(min(num_blocks_select, nb)).indices
            cand = (blocks[:, None] * ppb + torch.arange(ppb, device=q.device)).reshape(-1)
            cand = cand[cand < n]
            k = min(num_select, cand.numel())
            top = cand[fine[b, h, cand].topk(k).indices].sort().values
            page_ids[b, h, :k] = top.to(torch.int32)
    return page_ids, num_valid
