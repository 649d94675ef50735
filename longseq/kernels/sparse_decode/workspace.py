"""Per-device int32 counters that fused Triton launches use to find the last program of a row (``counters``).

Shared by the fused score + top-k launch (``select.py``), the fused segment merge (``topk_split.py``) and the
fused split merge of ``decode.py``. Every launch leaves the counters it used at zero, so launches that share a
device must not run concurrently on different streams.
"""

from __future__ import annotations

import torch
import triton

_COUNTERS: dict[tuple[str, int | None], torch.Tensor] = {}
_RETIRED: list[torch.Tensor] = []  # replaced buffers stay allocated: captured graphs may still use them


def counters(device: torch.device, n: int) -> torch.Tensor:
    """``n`` int32 zeros that stay zero between launches (each user resets what it counted). Cached per device;
    a larger request replaces the buffer (allocated with its zeros inside a graph capture when first needed
    there, so the capture records that zeroing too)."""
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    key = (device.type, device.index)
    buf = _COUNTERS.get(key)
    if buf is None or buf.numel() < n:
        if buf is not None:
            _RETIRED.append(buf)
        buf = torch.zeros(max(4096, triton.next_power_of_2(n)), dtype=torch.int32, device=device)
        _COUNTERS[key] = buf
    return buf
