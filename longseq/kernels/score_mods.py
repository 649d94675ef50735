"""Score modifiers some models put on attention logits, shared by every kernel and reference here.

- Soft-capping (Gemma 2): ``s = cap * tanh(s / cap)`` on the scaled scores ``q.k * scale``, before masking.
- Learned sinks (gpt-oss): one logit per query head joins each softmax's denominator with no value:
  ``out = sum_j e^(s_j) v_j / (sum_j e^(s_j) + e^(sink))``. A kernel that tracks the log-sum-exp ``lse`` of
  the real keys applies it once at the end: ``out *= 1 / (1 + e^(sink - lse))``, so split-K partials stay
  plain and only the final write (or the merge) changes.

Semantics as in vLLM's FlashAttention and CPU backends (``logits_soft_cap``, ``sinks``). PyTorch only (the
references import it without Triton); the Triton helpers are in ``triton_score_mods.py``.
"""

from __future__ import annotations

import dataclasses

import torch

LOG2E = 1.4426950408889634


@dataclasses.dataclass(frozen=True)
class ScoreMods:
    """A layer's score modifiers. ``softcap``: None or > 0. ``sinks``: None or ``[Hq]`` float (this rank's query
    heads), any device; kernels read an fp32 copy on the query's device (:meth:`sinks_on`)."""

    softcap: float | None = None
    sinks: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.softcap is not None and not self.softcap > 0:
            raise ValueError(f"softcap must be None or > 0, got {self.softcap}")
        if self.sinks is not None and self.sinks.dim() != 1:
            raise ValueError(f"sinks must be [Hq], got {tuple(self.sinks.shape)}")

    @classmethod
    def of(cls, softcap: float | None = None, sinks: torch.Tensor | None = None) -> "ScoreMods":
        """From a layer's raw settings: a soft-cap of 0 means none (vLLM's convention)."""
        return cls(softcap=float(softcap) if softcap else None, sinks=sinks)

    @property
    def any(self) -> bool:
        return self.softcap is not None or self.sinks is not None

    def sinks_on(self, device: torch.device, num_heads: int) -> torch.Tensor | None:
        """``[num_heads]`` fp32 sinks on ``device`` (None without sinks)."""
        if self.sinks is None:
            return None
        if self.sinks.shape[0] != num_heads:
            raise ValueError(f"sinks has {self.sinks.shape[0]} heads, the query {num_heads}")
        return self.sinks.to(device=device, dtype=torch.float32)


NO_MODS = ScoreMods()


def soft_cap(s: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """Soft-capped scaled scores (``s`` unchanged when ``softcap`` is None). Apply before masking."""
    return s if softcap is None else softcap * torch.tanh(s / softcap)


def softmax_with_sinks(s: torch.Tensor, sinks: torch.Tensor | None) -> torch.Tensor:
    """Softmax over the last dim of fp32 scores ``s`` (masked entries ``-inf``), with ``sinks`` (broadcastable to
    ``s.shape[:-1]``) in the denominator. A row with no unmasked entry gives zeros (also without sinks)."""
    if sinks is not None:
        sink = sinks.to(s.dtype).expand(s.shape[:-1]).unsqueeze(-1)
        return torch.softmax(torch.cat([s, sink], dim=-1), dim=-1)[..., :-1]
    return torch.softmax(s, dim=-1).nan_to_num(0.0)


def kernel_args(scale: float, mods: ScoreMods, device: torch.device, num_heads: int,
                placeholder: torch.Tensor) -> tuple[float, float, torch.Tensor]:
    """What the Triton kernels take for the score modifiers: ``(qk_scale, cap_log2, sinks_log2)``.

    Without soft-cap the kernels compute ``s = q.k * qk_scale`` in log2 units (``qk_scale = scale * log2 e``); with
    it ``s = cap_log2 * tanh(q.k * qk_scale)`` (``qk_scale = scale / cap``, ``cap_log2 = cap * log2 e``).
    ``sinks_log2``: ``[num_heads]`` fp32 sinks in log2 units, or ``placeholder`` (never read) without sinks."""
    if mods.softcap is None:
        qk_scale, cap_log2 = scale * LOG2E, 0.0
    else:
        qk_scale, cap_log2 = scale / mods.softcap, mods.softcap * LOG2E
    sinks = mods.sinks_on(device, num_heads)
    return qk_scale, cap_log2, placeholder if sinks is None else sinks * LOG2E
