"""Selection reuse across decode steps: which rows select again, and which pages were written since.

LServe's reusable page selector (https://arxiv.org/abs/2502.14866): consecutive decode queries of a request
pick nearly the same pages, so a row selects every ``every`` steps and in between attends to the pages it kept
plus every page written since. ``plan_selection_reuse`` runs once per decode step for all sparse layers of a
KV-cache group (the decision is per request, the same for every layer and KV head); the score and top-k
kernels skip rows that reuse, and the decode kernel reads the extra pages.

A batch row is trusted to hold the same request as at its last selection only if its length grew by fewer
than ``every`` tokens AND the physical block that held its last token at that selection is still in the
same place of its block table. The last block of a running request is its own (a shared prefix block is
full, hence not the block being written), so another request in the row fails the check, with one benign
exception: a prefix-cache hit on that very block means the same tokens up to there. Kept pages are logical
(positions in the request), so even a wrong guess could only attend to the row's own KV.

Per row ``b`` of the decode rows (state ``sel_len``/``sel_tag`` persists across steps):

    L, L0 = seq_lens[b], sel_len[b]
    reuse = L0 > 0 and 0 < L - L0 < every and block_table[b, (L0 - 1) // block_size] == sel_tag[b]
    reuse:    refresh[b] = 0; extra[b, e] = ceil(L0 / P) + e if that page < ceil(L / P) else -1
    refresh:  refresh[b] = 1; extra[b, :] = -1; sel_len[b] = L; sel_tag[b] = block_table[b, (L - 1) // block_size]

Fixed shapes, no host synchronization: CUDA-graph safe.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def extra_page_slots(every: int, page_size: int) -> int:
    """Pages a request can start between two selections ``every`` steps apart: ``ceil((every - 1) / P)``."""
    return (max(every, 1) - 1 + page_size - 1) // page_size


@triton.jit
def _plan_reuse_kernel(
    block_table, seq_lens, sel_len, sel_tag, refresh, extra, num_rows, every, s_btb, s_btn, s_eb,
    BLOCK_SIZE: tl.constexpr, PAGE_SIZE: tl.constexpr, EXTRA: tl.constexpr, BLOCK_B: tl.constexpr,
):
    b = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    m = b < num_rows
    n_now = tl.load(seq_lens + b, mask=m, other=0)
    n_old = tl.load(sel_len + b, mask=m, other=0)
    tag = tl.load(sel_tag + b, mask=m, other=-1)
    grown = (n_old > 0) & (n_now > n_old) & (n_now - n_old < every)
    bt_row = block_table + b.to(tl.int64) * s_btb
    old_blk = tl.load(bt_row + ((n_old - 1) // BLOCK_SIZE) * s_btn, mask=m & grown, other=-2)
    reuse = grown & (old_blk == tag)
    new_tag = tl.load(bt_row + (tl.maximum(n_now - 1, 0) // BLOCK_SIZE) * s_btn, mask=m & (n_now > 0), other=-1)
    tl.store(sel_len + b, tl.where(reuse, n_old, n_now), mask=m)
    tl.store(sel_tag + b, tl.where(reuse, tag, new_tag), mask=m)
    tl.store(refresh + b, tl.where(reuse, 0, 1).to(tl.int32), mask=m)
    first_new = (n_old + PAGE_SIZE - 1) // PAGE_SIZE
    n_pages = (n_now + PAGE_SIZE - 1) // PAGE_SIZE
    for e in tl.static_range(EXTRA):
        page = first_new + e
        tl.store(extra + b * s_eb + e, tl.where(reuse & (page < n_pages), page, -1).to(tl.int32), mask=m)


def plan_selection_reuse(block_table: torch.Tensor, seq_lens: torch.Tensor, sel_len: torch.Tensor,
                         sel_tag: torch.Tensor, refresh: torch.Tensor, extra: torch.Tensor, every: int,
                         page_size: int, block_size: int) -> None:
    """One decode step's reuse plan for ``B`` rows, in place (contract: module docstring).

    Args:
        block_table: ``[B, max_blocks]`` int32 physical blocks; seq_lens: ``[B]`` int32 (with the query token).
        sel_len, sel_tag: ``[>= B]`` int32 state (zeros / ``-1`` initially: every row selects).
        refresh: ``[>= B]`` int32 out: 1 where the row selects this step.
        extra: ``[>= B, E]`` int32 out (``E = extra_page_slots(every, P)``, may be 0): pages written since the
            row's selection, ``-1`` padded.
        every: select every ``every`` steps (1: always).
    """
    bsz = seq_lens.shape[0]
    if bsz == 0:
        return
    assert extra.shape[1] == extra_page_slots(every, page_size) and extra.stride(1) == 1
    block_b = 128
    _plan_reuse_kernel[(triton.cdiv(bsz, block_b),)](
        block_table, seq_lens, sel_len, sel_tag, refresh, extra, bsz, every, block_table.stride(0),
        block_table.stride(1), extra.stride(0),
        BLOCK_SIZE=block_size, PAGE_SIZE=page_size, EXTRA=extra_page_slots(every, page_size), BLOCK_B=block_b,
    )
