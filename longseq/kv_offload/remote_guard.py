"""What keeps a remote store from stalling the engine: a bound on every call, and a circuit breaker.

A network client can block far longer than a lookup may take (a Mooncake client whose master died blocks each
call for seconds while it reconnects). ``TimedCalls`` runs each call on one of a few daemon threads and gives up
waiting after a timeout (the call itself may go on in its thread; daemon threads never hold up the process's exit).
``CircuitBreaker`` marks the tier down after a failure: lookups then skip it at once, for a backoff that doubles on
each failed retry, so an outage costs at most one timeout per retry instead of one per lookup. Standard library only.
"""

from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Callable, TypeVar

T = TypeVar("T")


class CallTimeout(Exception):
    """A remote call did not answer within its timeout (it may still be running in its thread)."""


class TimedCalls:
    """Run callables on ``threads`` daemon threads; ``run`` waits at most ``timeout`` seconds for each."""

    def __init__(self, threads: int, name: str) -> None:
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._running = 0
        for i in range(threads):
            threading.Thread(target=self._loop, name=f"{name}-{i}", daemon=True).start()

    def _loop(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            fn, fut = job
            if not fut.set_running_or_notify_cancel():  # gave up on before it started
                continue
            with self._lock:
                self._running += 1
            try:
                fut.set_result(fn())
            except BaseException as e:  # handed to the caller, whatever it is
                fut.set_exception(e)
            finally:
                with self._lock:
                    self._running -= 1

    @property
    def running(self) -> int:
        """Calls running now (including ones whose caller gave up waiting)."""
        return self._running

    def run(self, fn: Callable[[], T], timeout: float) -> T:
        """``fn()``'s result or exception; CallTimeout after ``timeout`` seconds (a call still queued is cancelled,
        so calls never pile up behind a blocked one)."""
        fut: Future = Future()
        self._jobs.put((fn, fut))
        try:
            return fut.result(timeout)
        except FutureTimeout:
            fut.cancel()
            raise CallTimeout(f"no answer within {timeout:g} s") from None

    def stop(self, threads: int) -> None:
        """Let ``threads`` idle threads exit (a thread blocked in a call exits once the call returns)."""
        for _ in range(threads):
            self._jobs.put(None)


class CircuitBreaker:
    """Up, or down until a retry time. Thread-safe.

    ``allow()``: may this caller use the tier now? Up: yes. Down: no, except once the retry time has come, when one
    caller gets True (the trial) and the retry time moves ``trial_s`` ahead, so concurrent callers keep skipping
    while it runs. ``succeeded()`` marks it up (backoff back to ``min_s``). ``failed()`` marks it down for the current
    backoff and doubles it (up to ``max_s``); a failure of a call that began before the tier went down (a straggler,
    not the trial) changes nothing, so one outage seen by many threads at once costs one backoff step."""

    def __init__(self, min_s: float = 1.0, max_s: float = 30.0, trial_s: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.min_s, self.max_s, self.trial_s = min_s, max_s, trial_s
        self._clock = clock
        self._lock = threading.Lock()
        self._up = True
        self._trial = False
        self._retry_at = 0.0
        self._backoff = min_s

    @property
    def up(self) -> bool:
        return self._up

    def skipping(self) -> bool:
        """Down and not yet time to retry (no side effect)."""
        return not self._up and self._clock() < self._retry_at

    def allow(self) -> bool:
        if self._up:
            return True
        with self._lock:
            now = self._clock()
            if self._up or now < self._retry_at:
                return self._up
            self._retry_at, self._trial = now + self.trial_s, True
            return True

    def succeeded(self) -> bool:
        """Mark up; True if it was down (the caller logs the recovery)."""
        if self._up:
            return False
        with self._lock:
            was_down = not self._up
            self._up, self._trial, self._backoff = True, False, self.min_s
        return was_down

    def failed(self) -> tuple[bool, float]:
        """Mark down; (whether this call took it down, seconds until the next retry)."""
        with self._lock:
            now = self._clock()
            if not self._up and not self._trial and now < self._retry_at:
                return False, self._retry_at - now
            was_up, wait = self._up, self._backoff
            self._up, self._trial = False, False
            self._retry_at = now + wait
            self._backoff = min(self.max_s, wait * 2)
        return was_up, wait
