"""bench_vllm_capacity's decode window on a fake engine: the batch is what the scheduler runs once its admissions
stop (more requests offered than fit), and the window counts only decode steps of that batch."""

from __future__ import annotations

import os
import sys
from types import SimpleNamespace

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if REPO not in sys.path:  # benchmarks/ is not installed: import it from the checkout
    sys.path.insert(0, REPO)
from benchmarks.bench_vllm_capacity import timed_decode_window  # noqa: E402


class FakeEngine:
    """Admits one waiting request per step while fewer than ``fits`` run; a request's first token comes
    ``prefill_steps`` steps after its admission, then one token per step."""

    def __init__(self, fits: int, prefill_steps: int) -> None:
        self.fits, self.prefill_steps = fits, prefill_steps
        self.waiting, self.running, self.tokens, self.age = [], [], {}, {}

    def add_request(self, rid, prompt, params) -> None:
        self.waiting.append(rid)

    def step(self):
        if self.waiting and len(self.running) < self.fits:
            rid = self.waiting.pop(0)
            self.running.append(rid)
            self.tokens[rid], self.age[rid] = 0, 0
        outs = []
        for rid in self.running:
            self.age[rid] += 1
            if self.age[rid] > self.prefill_steps:
                self.tokens[rid] += 1
                outs.append(SimpleNamespace(request_id=rid,
                                            outputs=[SimpleNamespace(token_ids=[0] * self.tokens[rid])]))
        return outs

    def abort_request(self, ids) -> None:
        self.waiting, self.running = [], []

    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting or self.running)


def test_admitted_batch_is_what_runs_once_admissions_stop():
    engine = FakeEngine(fits=5, prefill_steps=3)
    row = timed_decode_window(engine, [None] * 12, None, warm=2, steps=6, running=lambda: len(engine.running))
    assert row["batch"] == 5 and row["submitted"] == 12
    assert row["tokens"] == 30 and row["min_tokens_per_step"] == row["max_tokens_per_step"] == 5
    assert engine.has_unfinished_requests() is False  # everything aborted after the window


def test_gauge_that_reads_zero_until_the_first_token_does_not_end_admission():
    """vLLM 0.26's ``num_requests_running`` gauge is recorded only on steps with outputs: during the first
    requests' prefill it reads 0 while nothing has started, which must not count as a settled batch of 0."""
    engine = FakeEngine(fits=4, prefill_steps=6)
    seen = {"any": False}

    def gauge() -> int:
        seen["any"] = seen["any"] or any(engine.tokens.values())
        return len(engine.running) if seen["any"] else 0

    row = timed_decode_window(engine, [None] * 9, None, warm=1, steps=5, running=gauge)
    assert row["batch"] == 4 and row["tokens"] == 20 and row["min_tokens_per_step"] == 4


def test_fixed_batch_waits_for_every_prompt():
    engine = FakeEngine(fits=8, prefill_steps=2)
    row = timed_decode_window(engine, [None] * 3, None, warm=1, steps=4)
    assert row["batch"] == 3 and row["tokens"] == 12 and row["min_tokens_per_step"] == 3
