"""A vLLM logits processor for teacher forcing: request ``i`` emits the given tokens, step by step.

With ``SamplingParams(extra_args={"longseq_forced": [t0, t1, ...]})`` step ``k`` of that request samples
``t_k`` whatever the model predicts; with vLLM's default ``logprobs_mode="raw_logprobs"`` the returned
log-probs are still the model's own (taken before logits processors), so a technique's next-token
distribution can be compared with dense on exactly the dense run's context, through the decode path.
Load it with ``LLM(..., logits_processors=[ForcedTokensLogitsProcessor])``.
"""

from __future__ import annotations

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

FORCED_KEY = "longseq_forced"


class ForcedTokensLogitsProcessor(LogitsProcessor):
    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool) -> None:
        # batch row -> (forced token ids, the request's live list of output token ids)
        self.rows: dict[int, tuple[list[int], list[int]]] = {}

    def is_argmax_invariant(self) -> bool:
        return False

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is None:
            return
        for index in batch_update.removed:
            self.rows.pop(index, None)
        for added in batch_update.added:  # (index, params, [prompt ids,] output ids): last is the live list
            index, params, out_ids = added[0], added[1], added[-1]
            forced = (params.extra_args or {}).get(FORCED_KEY) if params is not None else None
            if forced:
                self.rows[index] = (list(forced), out_ids)
            else:
                self.rows.pop(index, None)
        for a, b, direction in batch_update.moved:
            row_a, row_b = self.rows.pop(a, None), self.rows.pop(b, None)
            if row_a is not None:
                self.rows[b] = row_a
            if direction == MoveDirectionality.SWAP and row_b is not None:
                self.rows[a] = row_b

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        for index, (forced, out_ids) in self.rows.items():
            step = len(out_ids)
            if step < len(forced) and index < logits.shape[0]:
                logits[index].fill_(float("-inf"))
                logits[index, forced[step]] = 0.0
        return logits
