"""Synthetic multi-passkey samples for DuoAttention calibration (``longseq duo calibrate``), made locally from
a seed: filler text with pass keys at random depths, a question, and the teacher-forced answer.

Imports only the standard library at import time.
"""

from __future__ import annotations

import random

#: Key names of the synthetic samples (NATO alphabet, as in the authors' multi-passkey data).
KEY_NAMES = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliett",
             "kilo", "lima", "mike", "november", "oscar", "papa", "quebec", "romeo", "sierra", "tango",
             "uniform", "victor", "whiskey", "xray", "yankee", "zulu"]


def _chat_frame(tokenizer) -> tuple[str, str]:
    """Text before and after the user message in the tokenizer's chat template (with generation prompt)."""
    marker = "@@LONGSEQ_CONTEXT@@"
    if getattr(tokenizer, "chat_template", None):
        try:
            text = tokenizer.apply_chat_template([{"role": "user", "content": marker}], tokenize=False,
                                                 add_generation_prompt=True)
            if isinstance(text, str) and text.count(marker) == 1:
                pre, post = text.split(marker)
                return pre, post
        except Exception:  # a template that needs other fields: fall back to plain text
            pass
    return "", "\nAnswer: "


def _encode_marked(tokenizer, text: str, spans: list[tuple[int, int]]) -> tuple[list[int], list[bool]]:
    """Token ids of ``text`` and, per token, whether it overlaps one of the character ``spans``."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    marked = [any(s < e_tok and b_tok < e for s, e in spans) for b_tok, e_tok in enc["offset_mapping"]]
    return list(enc["input_ids"]), marked


def make_sample(tokenizer, seq_len: int, rng: random.Random, num_keys: int = 4) -> tuple[list[int], list[int]]:
    """One synthetic multi-passkey sample of exactly ``seq_len`` tokens.

    Layout: chat prefix + instruction, filler with ``num_keys`` needles ("The pass key for NAME is NNNNN.
    Remember it.") inserted at sorted random depths in [5%, 95%] of the filler, the question naming all keys,
    then the teacher-forced answer "The pass key for NAME is NNNNN. ..." (keys in question order).
    Returns ``(input_ids, loss_positions)``: the positions whose next token is a key digit of the answer.
    """
    from longseq.models.prompts import synthetic_text

    if not 1 <= num_keys <= len(KEY_NAMES):
        raise ValueError(f"num_keys must be in 1..{len(KEY_NAMES)}, got {num_keys}")
    names = rng.sample(KEY_NAMES, num_keys)
    keys = [str(rng.randint(10000, 99999)) for _ in names]
    depths = sorted(rng.uniform(0.05, 0.95) for _ in names)  # names[i] goes at depths[i]
    asked = list(names)
    rng.shuffle(asked)  # the question (and answer) order differs from the order in the text

    def enc(text: str) -> list[int]:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    pre, post = _chat_frame(tokenizer)
    prefix = enc(pre + "Below is a long text. Several pass keys are hidden in it; remember them.\n\n")
    key_of = dict(zip(names, keys))
    needles = [enc(f"\n\nThe pass key for {n} is {key_of[n]}. Remember it.\n\n") for n in names]
    listed = ", ".join(asked[:-1]) + (" and " if len(asked) > 1 else "") + asked[-1]
    question = enc(f"\n\nWhat are the pass keys for {listed}?" + post)
    answer_text, spans = "", []
    for n in asked:
        answer_text += f"The pass key for {n} is "
        spans.append((len(answer_text), len(answer_text) + len(key_of[n])))
        answer_text += key_of[n] + ". "
    answer, marked = _encode_marked(tokenizer, answer_text.rstrip(), spans)

    budget = seq_len - len(prefix) - sum(map(len, needles)) - len(question) - len(answer)
    if budget < 16:
        raise ValueError(f"seq_len {seq_len} is too short for {num_keys} pass key(s) (needs at least "
                         f"{seq_len - budget + 16} tokens with this tokenizer)")
    filler: list[int] = []
    sentences = budget // 6 + 20
    while len(filler) < budget:
        filler = enc(synthetic_text(sentences, rng.randrange(1 << 30)))
        sentences *= 2
    filler = filler[:budget]
    ids = list(prefix)
    last = 0
    for depth, needle in zip(depths, needles):
        cut = int(depth * budget)
        ids += filler[last:cut] + needle
        last = cut
    ids += filler[last:] + question
    start = len(ids)
    ids += answer
    assert len(ids) == seq_len, (len(ids), seq_len)
    positions = [start + i - 1 for i, m in enumerate(marked) if m]
    if not positions:
        raise ValueError("no answer token found (tokenizer without offsets?)")
    return ids, positions
