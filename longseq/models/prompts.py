"""Deterministic long prompts (token ids) for end-to-end tests: readable text, fixed seed, exact lengths."""

from __future__ import annotations

import random

_SUBJECTS = ["The river", "Our old library", "The night train", "A quiet village", "The city council",
             "My grandmother", "The lighthouse keeper", "A young engineer", "The museum", "The harbor market"]
_VERBS = ["opened", "described", "remembered", "measured", "painted", "repaired", "visited", "counted",
          "announced", "explored"]
_OBJECTS = ["the northern bridge", "a forgotten map", "seventeen wooden boats", "the summer festival",
            "an unusual letter", "the stone tower", "a basket of apples", "the eastern garden",
            "a broken clock", "the narrow streets"]
_TAILS = ["before the rain started.", "in the spring of {y}.", "with {n} friends.", "after a long winter.",
          "while the bells rang.", "for the {n}th time.", "near the old mill.", "during the storm of {y}."]


def synthetic_text(num_sentences: int, seed: int) -> str:
    rng = random.Random(seed)
    out = []
    for i in range(num_sentences):
        tail = rng.choice(_TAILS).format(y=rng.randint(1800, 2020), n=rng.randint(2, 40))
        out.append(f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} {tail}")
        if i % 6 == 5:
            out.append("\n\n")
    return " ".join(out)


def make_prompts(tokenizer, lengths: list[int], seed: int = 0, shared_prefix: tuple[int, int, int] | None = None
                 ) -> list[list[int]]:
    """Prompts of exactly ``lengths`` tokens. ``shared_prefix=(i, j, n)``: prompt j starts with prompt i's first n."""
    prompts = []
    for k, n in enumerate(lengths):
        ids = tokenizer(synthetic_text(n // 4 + 20, seed * 100 + k))["input_ids"]
        assert len(ids) >= n, (len(ids), n)
        prompts.append(ids[:n])
    if shared_prefix:
        i, j, n = shared_prefix
        prompts[j] = prompts[i][:n] + prompts[j][: lengths[j] - n]
    return prompts
