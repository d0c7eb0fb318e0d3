"""Poll until something holds, with a deadline: the one way tests wait for another process, thread or task.

`check` returns a value: a truthy one ends the wait and is returned. An AssertionError it raises counts as
"not yet" (so a check can be a few asserts) and is chained to the timeout error, as is the last value seen.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

T = TypeVar("T")


class _Pending:
    """What the last poll saw, for the timeout message."""

    def __init__(self) -> None:
        self.value: Any = None
        self.error: AssertionError | None = None

    def timeout(self, what: str, timeout: float) -> AssertionError:
        seen = f": {self.error}" if self.error is not None else f" (last value {self.value!r})"
        failure = AssertionError(f"timed out after {timeout:g}s waiting for {what}{seen}")
        failure.__cause__ = self.error
        return failure


def eventually(check: Callable[[], T], timeout: float = 15.0, interval: float = 0.05, *, what: str) -> T:
    """Call `check` every `interval` s until it returns a truthy value (returned); AssertionError naming
    `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    pending = _Pending()
    while True:
        try:
            value = check()
        except AssertionError as e:
            pending.error = e
        else:
            if value:
                return value
            pending.value, pending.error = value, None
        if time.monotonic() >= deadline:
            raise pending.timeout(what, timeout)
        time.sleep(interval)


async def eventually_async(
    check: Callable[[], T | Awaitable[T]], timeout: float = 15.0, interval: float = 0.05, *, what: str
) -> T:
    """`eventually` on the event loop: `check` may be a plain function or a coroutine function, and the
    loop keeps running between polls."""
    deadline = time.monotonic() + timeout
    pending = _Pending()
    while True:
        try:
            value = check()
            if inspect.isawaitable(value):
                value = await value
        except AssertionError as e:
            pending.error = e
        else:
            if value:
                return value
            pending.value, pending.error = value, None
        if time.monotonic() >= deadline:
            raise pending.timeout(what, timeout)
        await asyncio.sleep(interval)
