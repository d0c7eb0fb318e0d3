"""A fake clock for code that takes one: time moves only when the test says so."""

from __future__ import annotations


class FakeClock:
    """`now()` in seconds (monotonic-style); `advance(s)` moves it forward. Pass `clock.now` where code takes
    a `Callable[[], float]` (time.monotonic's shape), so a timeout is tested without waiting for it."""

    def __init__(self, start: float = 1000.0) -> None:
        self._now = start

    def now(self) -> float:
        return self._now

    __call__ = now

    def advance(self, seconds: float) -> float:
        if seconds < 0:
            raise ValueError(f"a clock does not go back ({seconds} s)")
        self._now += seconds
        return self._now
