"""Batched PyTorch versions of page selection and sparse decode, for devices without the Triton kernels.

Same contracts as ``select_topk_pages`` / ``sparse_paged_decode`` (and their references in ``naive.py``),
computed for the whole batch at once: requests padded to the longest one and masked, instead of the
references' per-request loops. vLLM's CPU engine runs these (``core/sparse.py``). The GQA reduction of the
Quest bound is the linear form of ``select.py`` (``max_i * sum_g relu(q_gi) + min_i * sum_g min(q_gi, 0)``),
which sums in another order than the reference: scores agree to float rounding, so two pages whose bounds
differ by less than that may swap places in the selection.
"""

from __future__ import annotations

import torch

from longseq.kernels.score_mods import NO_MODS, ScoreMods, soft_cap, softmax_with_sinks


def _page_geometry(block_table: torch.Tensor, page_size: int, block_size: int) -> tuple[torch.Tensor, int]:
    """``[B, max_pages]`` int64 global page id of every logical page slot of the block table, and max_pages."""
    max_pages = block_table.shape[1] * block_size // page_size
    j = torch.arange(max_pages, device=block_table.device)
    blocks = block_table.long()[:, (j * page_size) // block_size]  # [B, max_pages]
    return blocks * (block_size // page_size) + ((j * page_size) % block_size) // page_size, max_pages


def score_pages_torch(q: torch.Tensor, page_min: torch.Tensor, page_max: torch.Tensor, block_table: torch.Tensor,
                      seq_lens: torch.Tensor, page_size: int, block_size: int, num_sink_pages: int = 0,
                      num_recent_pages: int = 0, group_max: bool = False) -> torch.Tensor:
    """``score_pages_ref``'s result (``[B, Hkv, max_pages]`` fp32, same ``-inf``/``+inf`` rules), batched."""
    b_, hq, d = q.shape
    hkv = page_min.shape[1]
    gp, max_pages = _page_geometry(block_table, page_size, block_size)
    n_pages = (seq_lens.long() + page_size - 1) // page_size  # [B]
    j = torch.arange(max_pages, device=q.device)
    valid = j[None] < n_pages[:, None]  # [B, max_pages]
    qg = q.float().view(b_, hkv, hq // hkv, d)
    gp = torch.where(valid, gp, 0)  # pages past the end may point anywhere: read page 0, masked below
    mn, mx = page_min[gp].float(), page_max[gp].float()  # [B, max_pages, Hkv, D]
    if group_max:  # each query head's bound [B, Hkv, G, max_pages], then the largest (amax propagates NaN)
        s = (torch.einsum("bphd,bhgd->bhgp", mx, qg.clamp(min=0))
             + torch.einsum("bphd,bhgd->bhgp", mn, qg.clamp(max=0))).amax(2)
    else:
        q_pos, q_neg = qg.clamp(min=0).sum(2), qg.clamp(max=0).sum(2)  # [B, Hkv, D]
        s = torch.einsum("bphd,bhd->bhp", mx, q_pos) + torch.einsum("bphd,bhd->bhp", mn, q_neg)
    s = torch.where(s.isnan(), float("inf"), s)
    forced = (j[None] < num_sink_pages) | (j[None] >= n_pages[:, None] - num_recent_pages)
    s = torch.where(forced[:, None], float("inf"), s)
    return torch.where(valid[:, None], s, float("-inf"))


def topk_pages_torch(scores: torch.Tensor, seq_lens: torch.Tensor, page_size: int,
                     num_select: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top ``num_select`` pages of each ``[B, Hkv, max_pages]`` score row, ascending, ``-1`` padded (``torch.topk``
    + sort; ties broken arbitrarily), and ``num_valid`` ``[B]``. Invalid pages score ``-inf`` and lose to every
    valid one, so the first ``min(k, n_pages)`` winners are exactly the valid selection."""
    max_pages = scores.shape[-1]
    k = min(num_select, max_pages)
    vals, idx = scores.topk(k, dim=-1, sorted=False)
    idx = torch.where(vals == float("-inf"), max_pages, idx).sort(dim=-1).values  # invalid pages sort last
    page_ids = torch.where(idx == max_pages, -1, idx).to(torch.int32)
    if k < num_select:
        page_ids = torch.nn.functional.pad(page_ids, (0, num_select - k), value=-1)
    n_pages = (seq_lens.to(torch.int64) + page_size - 1) // page_size
    return page_ids, n_pages.clamp(max=k).to(torch.int32)


def select_topk_pages_torch(q: torch.Tensor, page_min: torch.Tensor, page_max: torch.Tensor,
                            block_table: torch.Tensor, seq_lens: torch.Tensor, page_size: int, block_size: int,
                            num_select: int, num_sink_pages: int = 0, num_recent_pages: int = 0,
                            group_max: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``select_topk_pages``'s contract: ``page_ids`` ``[B, Hkv, num_select]`` int32 ascending, ``-1`` padded;
    ``num_valid`` ``[B]`` int32 ``min(num_select, ceil(seq_len / P))``."""
    scores = score_pages_torch(q, page_min, page_max, block_table, seq_lens, page_size, block_size,
                               num_sink_pages, num_recent_pages, group_max)
    return topk_pages_torch(scores, seq_lens, page_size, num_select)


def sparse_paged_decode_torch(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                              block_table: torch.Tensor, seq_lens: torch.Tensor, page_ids: torch.Tensor,
                              page_size: int, scale: float, extra_pages: torch.Tensor | None = None,
                              mods: ScoreMods = NO_MODS) -> torch.Tensor:
    """``sparse_paged_decode_ref``'s result (``[B, Hq, D]`` in ``q.dtype``, fp32 softmax), batched.

    Args: as ``sparse_paged_decode_ref``: caches ``[num_blocks, block_size, Hkv, D]`` (any strides),
    ``page_ids`` ``[B, Hkv, S]`` logical pages, ``-1`` skipped, tokens at positions ``>= seq_len`` masked;
    ``extra_pages`` ``[B, E]``: more pages for every KV head (``sparse_paged_decode``); ``mods``: soft-cap, sinks.
    """
    b_, hq, d = q.shape
    block_size, hkv = key_cache.shape[1], key_cache.shape[2]
    if extra_pages is not None:
        page_ids = torch.cat([page_ids, extra_pages[:, None, :].expand(-1, hkv, -1).to(page_ids.dtype)], dim=2)
    pos = (page_ids.long()[..., None] * page_size + torch.arange(page_size, device=q.device)).flatten(2)  # [B,Hkv,N]
    ok = (page_ids.long()[..., None] >= 0).expand(-1, -1, -1, page_size).flatten(2) & (pos < seq_lens.long()[:, None, None])
    pos = torch.where(ok, pos, 0)
    blk = torch.gather(block_table.long()[:, None, :].expand(-1, hkv, -1), 2, pos // block_size)  # [B, Hkv, N]
    head = torch.arange(hkv, device=q.device)[None, :, None]
    k = key_cache[blk, pos % block_size, head].float()  # [B, Hkv, N, D]
    v = value_cache[blk, pos % block_size, head].float()
    qg = q.float().view(b_, hkv, hq // hkv, d)
    s = soft_cap(torch.einsum("bhgd,bhnd->bhgn", qg, k) * scale, mods.softcap)
    s = s.masked_fill(~ok[:, :, None], float("-inf"))
    sinks = mods.sinks_on(q.device, hq)
    p = softmax_with_sinks(s, None if sinks is None else sinks.view(1, hkv, hq // hkv))  # no token: zeros
    return torch.einsum("bhgn,bhnd->bhgd", p, v).reshape(b_, hq, d).to(q.dtype)
