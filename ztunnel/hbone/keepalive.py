"""HTTP/2 keepalive as a sans-IO decision on an injected clock: when to PING, when a silent peer is dead.

The connection owns the timer and the I/O: it calls `tick()` every `period` seconds (the first time after
`interval`), sends the PING it returns, passes PING ACK payloads to `acknowledged`, and records each read
in `last_received` (a plain attribute, so the read path makes no call). A test drives it with a fake clock.
"""

from __future__ import annotations

import os
from collections.abc import Callable


class Keepalive:
    """PING every interval; no answer and no traffic within the timeout means the peer is gone."""

    __slots__ = ("_now", "_outstanding", "_sent_at", "interval", "last_received", "timeout")

    def __init__(self, interval: float, timeout: float, now: Callable[[], float]) -> None:
        self.interval = interval  # 0 turns keepalive off
        self.timeout = timeout
        self._now = now
        self.last_received = now()  # the connection's last read (set by the connection)
        self._outstanding: bytes | None = None
        self._sent_at = 0.0

    @property
    def enabled(self) -> bool:
        return self.interval > 0

    @property
    def period(self) -> float:
        """Seconds between ticks after the first: often enough to notice the timeout."""
        return min(self.interval, self.timeout / 2)

    def tick(self) -> bytes | None:
        """The payload of a PING to send now, or None (one is still unanswered). Check `expired()` first."""
        if self._outstanding is not None:
            return None
        self._outstanding = os.urandom(8)
        self._sent_at = self._now()
        return self._outstanding

    def expired(self) -> bool:
        """A PING went unanswered and nothing at all arrived for the timeout: close the connection."""
        if self._outstanding is None:
            return False
        now = self._now()
        return now - self._sent_at >= self.timeout and now - self.last_received >= self.timeout

    def acknowledged(self, payload: bytes) -> None:
        if payload == self._outstanding:
            self._outstanding = None
