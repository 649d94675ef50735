"""Random paged-KV block tables for kernel tests."""

from __future__ import annotations

import torch


def scattered_block_table(blocks_per_request: list[int], num_blocks: int, width: int,
                          generator: torch.Generator) -> torch.Tensor:
    """``[len(blocks_per_request), width]`` int32: request ``i``'s first ``blocks_per_request[i]`` entries are
    distinct physical blocks in random order (no two requests share one); entries past them are random junk
    (any block id), as a real table's unused tail may hold, so kernels must not read past a request's blocks."""
    perm = torch.randperm(num_blocks, generator=generator).to(torch.int32)
    table = torch.randint(0, num_blocks, (len(blocks_per_request), width), generator=generator, dtype=torch.int32)
    used = 0
    for i, n in enumerate(blocks_per_request):
        table[i, :n] = perm[used : used + n]
        used += n
    return table
