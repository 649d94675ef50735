"""Passkey retrieval prompts (a number hidden in long filler text) as chat token ids, and scoring."""

from __future__ import annotations

import random
import re


def passkey_prompt(tokenizer, context_tokens: int, seed: int, depth: float | None = None) -> tuple[list[int], str]:
    """A chat prompt of about ``context_tokens`` tokens hiding a 5-digit pass key at relative ``depth``.

    Returns (token ids, the pass key).
    """
    from longseq.models.prompts import synthetic_text

    rng = random.Random(seed)
    key = str(rng.randint(10000, 99999))
    depth = rng.uniform(0.1, 0.9) if depth is None else depth
    needle = f"\n\nThe pass key is {key}. Remember it. {key} is the pass key.\n\n"
    question = "What is the pass key? The pass key is"
    filler_ids = tokenizer(synthetic_text(context_tokens // 4 + 40, seed=seed))["input_ids"]
    budget = context_tokens - len(tokenizer(needle + question)["input_ids"]) - 40
    filler_ids = filler_ids[: max(budget, 0)]
    cut = int(len(filler_ids) * depth)
    # Plain completion, not the chat template: a 135M model copies the key reliably only this way.
    text = (tokenizer.decode(filler_ids[:cut]) + needle + tokenizer.decode(filler_ids[cut:])
            + "\n\n" + question)
    return list(tokenizer(text)["input_ids"]), key


def passkey_found(generated_text: str, key: str) -> bool:
    return key in re.sub(r"\s+", "", generated_text)
