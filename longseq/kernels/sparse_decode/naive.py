"""PyTorch references for Quest-style sparse decode: page summaries, page scores, top-k, sparse attention.

Cache layout: ``key_cache``/``value_cache`` are ``[num_blocks, block_size, Hkv, D]`` tensors with any
strides (vLLM's flash layout is contiguous; our CPU cache is a permuted ``[num_blocks, Hkv, block_size, D]``
view). A slot is ``block * block_size + offset``. Every block is cut into ``block_size // page_size`` pages,
so the global page of slot ``s`` is ``s // page_size`` and a request's logical page ``j`` lives at

    block_table[b, (j * P) // block_size] * (block_size // P) + ((j * P) % block_size) // P

Page summaries ``page_min``/``page_max`` are ``[num_blocks * block_size // P, Hkv, D]``: the channel-wise
min/max of the page's keys. In the cache dtype (or fp32) they are exact. In ``torch.float8_e4m3fn`` (half the
bytes for the scoring pass) the min is rounded down and the max up to the next representable value, so the
Quest score stays an upper bound of every key's ``q . k``; a max above 448 (or a min below -448) has no such
value and is stored as NaN, which makes the page's score ``+inf`` (always selected: still a bound).

These are loops written for clarity: the Triton kernels beside this file are tested against them, with
fp32 math throughout.
"""

from __future__ import annotations

import torch

from longseq.kernels.score_mods import NO_MODS, ScoreMods, soft_cap, softmax_with_sinks


def logical_to_global_pages(block_table_row: torch.Tensor, num_pages: int, page_size: int,
                            block_size: int) -> torch.Tensor:
    """``[num_pages]`` int64 global page ids of logical pages ``0..num_pages-1`` of one request."""
    j = torch.arange(num_pages, device=block_table_row.device)
    blocks = block_table_row.long()[(j * page_size) // block_size]
    return blocks * (block_size // page_size) + ((j * page_size) % block_size) // page_size


_FP8_VALUES: dict[torch.device, torch.Tensor] = {}


def _fp8_values(device: torch.device) -> torch.Tensor:
    """Every finite ``float8_e4m3fn`` value, ascending (``-0`` and ``+0`` merged), as fp32."""
    if device not in _FP8_VALUES:
        v = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).float()
        _FP8_VALUES[device] = v[~v.isnan()].unique().to(device)
    return _FP8_VALUES[device]


def round_summary_ref(x: torch.Tensor, up: bool, dtype: torch.dtype) -> torch.Tensor:
    """``x`` (fp32) in the summary ``dtype``: exact dtypes by a plain cast; ``float8_e4m3fn`` by directed rounding
    (``up``: the smallest fp8 value ``>= x``, else the largest ``<= x``; NaN where none exists)."""
    if dtype != torch.float8_e4m3fn:
        return x.to(dtype)
    vals = _fp8_values(x.device)
    n = vals.numel()
    if up:
        i = torch.searchsorted(vals, x.contiguous(), side="left")
        r = torch.where(i < n, vals[i.clamp(max=n - 1)], float("nan"))
    else:
        i = torch.searchsorted(vals, x.contiguous(), side="right") - 1
        r = torch.where(i >= 0, vals[i.clamp(min=0)], float("nan"))
    return r.to(dtype)


def update_page_summary_ref(key_cache: torch.Tensor, slot_mapping: torch.Tensor, page_min: torch.Tensor,
                            page_max: torch.Tensor, page_size: int) -> None:
    """Recompute min/max of every page written this step, in place.

    Args:
        key_cache: ``[num_blocks, block_size, Hkv, D]`` (already holding this step's keys).
        slot_mapping: ``[T]`` int slots written this step, ``-1`` = padding.
        page_min, page_max: ``[num_pages_total, Hkv, D]``.
        page_size: tokens per page ``P`` (divides ``block_size``).

    A page's tokens are written in order by one request, so the rows that hold its keys are offsets
    ``0..o`` where ``o`` is the largest in-page offset written this step; rows past ``o`` may hold a
    previous owner's keys and are ignored.
    """
    block_size = key_cache.shape[1]
    slots = slot_mapping.long().tolist()
    last_off: dict[int, int] = {}
    for s in slots:
        if s >= 0:
            page = s // page_size
            last_off[page] = max(last_off.get(page, -1), s % page_size)
    for page, off in last_off.items():
        s0 = page * page_size  # slot of the page's first token
        blk, o0 = s0 // block_size, s0 % block_size
        keys = key_cache[blk, o0 : o0 + off + 1].float()  # [off+1, Hkv, D]
        page_min[page] = round_summary_ref(keys.amin(0), False, page_min.dtype)
        page_max[page] = round_summary_ref(keys.amax(0), True, page_max.dtype)


def score_pages_ref(q: torch.Tensor, page_min: torch.Tensor, page_max: torch.Tensor,
                    block_table: torch.Tensor, seq_lens: torch.Tensor, page_size: int, block_size: int,
                    num_sink_pages: int = 0, num_recent_pages: int = 0, group_max: bool = False) -> torch.Tensor:
    """Quest upper bound of ``q . k`` per logical page and kv head.

    Args:
        q: ``[B, Hq, D]`` one decode query per request; ``Hq = G * Hkv``, group ``h`` is query heads
            ``h*G .. h*G+G-1``.
        page_min, page_max: ``[num_pages_total, Hkv, D]``.
        block_table: ``[B, max_blocks]`` int physical blocks; seq_lens: ``[B]`` int.

    Returns:
        ``[B, Hkv, max_blocks * block_size // P]`` fp32: ``sum_g sum_i max(q_gi min_i, q_gi max_i)`` (the
        GQA group's query heads summed), or with ``group_max`` the largest head's bound ``max_g sum_i ...``;
        ``-inf`` past the last valid page, ``+inf`` for the first ``num_sink_pages`` and last
        ``num_recent_pages`` valid pages and for pages whose (fp8) summary holds a NaN (out of range).
    """
    b_, hq, d = q.shape
    hkv = page_min.shape[1]
    g = hq // hkv
    max_pages = block_table.shape[1] * block_size // page_size
    out = torch.full((b_, hkv, max_pages), float("-inf"), dtype=torch.float32, device=q.device)
    for b in range(b_):
        n = (int(seq_lens[b]) + page_size - 1) // page_size
        if n == 0:
            continue
        gp = logical_to_global_pages(block_table[b], n, page_size, block_size)
        mn = page_min[gp].float()  # [n, Hkv, D]
        mx = page_max[gp].float()
        qb = q[b].float().view(hkv, g, d)  # [Hkv, G, D]
        s = torch.maximum(qb[None] * mn[:, :, None], qb[None] * mx[:, :, None])  # [n, Hkv, G, D]
        s = (s.sum(3).amax(2) if group_max else s.sum((2, 3))).t()  # amax propagates a NaN head bound
        out[b, :, :n] = torch.where(s.isnan(), float("inf"), s)
        out[b, :, : min(num_sink_pages, n)] = float("inf")
        if num_recent_pages > 0:
            out[b, :, max(n - num_recent_pages, 0) : n] = float("inf")
    return out


def select_topk_pages_ref(q: torch.Tensor, page_min: torch.Tensor, page_max: torch.Tensor,
                          block_table: torch.Tensor, seq_lens: torch.Tensor, page_size: int,
                          block_size: int, num_select: int, num_sink_pages: int = 0,
                          num_recent_pages: int = 0, group_max: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Top ``num_select`` logical pages per (request, kv head) by Quest score.

    Returns:
        page_ids: ``[B, Hkv, num_select]`` int32 logical page indices, ascending, ``-1`` padded.
        num_valid: ``[B]`` int32 ``min(num_select, ceil(seq_len / P))``.
    """
    scores = score_pages_ref(q, page_min, page_max, block_table, seq_lens, page_size, block_size,
                             num_sink_pages, num_recent_pages, group_max)
    b_, hkv, _ = scores.shape
    page_ids = torch.full((b_, hkv, num_select), -1, dtype=torch.int32, device=q.device)
    num_valid = torch.zeros(b_, dtype=torch.int32, device=q.device)
    for b in range(b_):
        n = (int(seq_lens[b]) + page_size - 1) // page_size
        k = min(num_select, n)
        num_valid[b] = k
        if k == 0:
            continue
        idx = scores[b, :, :n].topk(k, dim=-1).indices.sort(dim=-1).values
        page_ids[b, :, :k] = idx.to(torch.int32)
    return page_ids, num_valid


def sparse_paged_decode_ref(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                            block_table: torch.Tensor, seq_lens: torch.Tensor, page_ids: torch.Tensor,
                            page_size: int, scale: float, mods: ScoreMods = NO_MODS) -> torch.Tensor:
    """Decode attention of each query head over the selected pages of its kv head (fp32 softmax).

    Args:
        q: ``[B, Hq, D]``; key_cache, value_cache: ``[num_blocks, block_size, Hkv, D]``.
        page_ids: ``[B, Hkv, S]`` int logical pages (any order; ``-1`` skipped); tokens at positions
            ``>= seq_len`` are masked.
        mods: the layer's soft-cap and ``[Hq]`` sinks (``longseq/kernels/score_mods.py``).

    Returns:
        ``[B, Hq, D]`` in ``q.dtype`` (zeros for a head that sees no token).
    """
    b_, hq, d = q.shape
    block_size, hkv = key_cache.shape[1], key_cache.shape[2]
    g = hq // hkv
    out = torch.zeros_like(q)
    sinks = mods.sinks_on(q.device, hq)
    for b in range(b_):
        seq_len = int(seq_lens[b])
        for h in range(hkv):
            pages = page_ids[b, h].long()
            pages = pages[pages >= 0]
            if pages.numel() == 0:
                continue
            pos = (pages[:, None] * page_size + torch.arange(page_size, device=q.device)).reshape(-1)
            pos = pos[pos < seq_len]
            if pos.numel() == 0:
                continue
            blk = block_table[b].long()[pos // block_size]
            off = pos % block_size
            k = key_cache[blk, off, h].float()  # [n, D]
            v = value_cache[blk, off, h].float()
            qh = q[b, h * g : (h + 1) * g].float()  # [G, D]
            s = soft_cap((qh @ k.t()) * scale, mods.softcap)
            p = softmax_with_sinks(s, None if sinks is None else sinks[h * g : (h + 1) * g])
            out[b, h * g : (h + 1) * g] = (p @ v).to(q.dtype)
    return out


def plan_selection_reuse_ref(block_table: torch.Tensor, seq_lens: torch.Tensor, sel_len: torch.Tensor,
                             sel_tag: torch.Tensor, refresh: torch.Tensor, extra: torch.Tensor, every: int,
                             page_size: int, block_size: int) -> None:
    """``reuse.plan_selection_reuse``'s contract (which rows select this step, the pages written since the last
    selection of the others), in place, one row at a time."""
    for b in range(seq_lens.shape[0]):
        n_now, n_old, tag = int(seq_lens[b]), int(sel_len[b]), int(sel_tag[b])
        reuse = (n_old > 0 and 0 < n_now - n_old < every
                 and int(block_table[b, (n_old - 1) // block_size]) == tag)
        extra[b] = -1
        if reuse:
            refresh[b] = 0
            first_new, n_pages = -(-n_old // page_size), -(-n_now // page_size)
            for e in range(extra.shape[1]):
                if first_new + e < n_pages:
                    extra[b, e] = first_new + e
        else:
            refresh[b] = 1
            sel_len[b] = n_now
            sel_tag[b] = int(block_table[b, (n_now - 1) // block_size]) if n_now > 0 else -1
