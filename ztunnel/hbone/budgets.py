"""What a peer may cost us: new streams and premature resets per second on one connection (rapid reset), and
the app bytes one peer identity pins across its connections.

Both are plain counters checked where the work happens (as h2 parses a frame, as DATA is charged or given
back), so a flood stops at the limit, not at the end of the read that carried it.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import h2.exceptions
from h2.errors import ErrorCodes


class PeerTooCostly(h2.exceptions.ProtocolError):
    """The peer went past a limit of the work or memory it may cost us: GOAWAY(ENHANCE_YOUR_CALM)."""

    error_code = ErrorCodes.ENHANCE_YOUR_CALM


class StreamBudget:
    """A server connection's new streams and premature resets in the current second (rapid reset).

    A reset is premature when the peer resets a stream before we answered it: all the set-up work of the
    stream (handler, policy, upstream dial) is for nothing. Resets of answered tunnels are ordinary aborts
    and are not counted; `is_abort(stream_id)` (the connection's) tells which is which.
    """

    __slots__ = ("_is_abort", "_now", "_window_start", "open_limit", "opens", "reset_limit", "resets")

    def __init__(
        self,
        open_limit: int,
        reset_limit: int,
        is_abort: Callable[[int], bool],
        now: Callable[[], float] = time.monotonic,
    ) -> None:
        self.open_limit = open_limit
        self.reset_limit = reset_limit
        self._is_abort = is_abort
        self._now = now
        self._window_start = now()
        self.opens = 0
        self.resets = 0

    def _roll(self) -> None:
        now = self._now()
        if now - self._window_start >= 1.0:
            self._window_start = now
            self.opens = self.resets = 0

    def opened(self) -> None:
        self._roll()
        self.opens += 1
        if self.opens > self.open_limit:
            raise PeerTooCostly(f"more than {self.open_limit} new streams in a second")

    def reset(self, stream_id: int) -> None:
        if self._is_abort(stream_id):
            return
        self._roll()
        self.resets += 1
        if self.resets > self.reset_limit:
            raise PeerTooCostly(f"more than {self.reset_limit} streams reset before their answer in a second")


class PeerBudget:
    """App bytes one peer identity holds in this proxy across its server connections, both ways: `parked`,
    app data read for a stream that the peer granted no window for (or whose connection it does not read),
    and `unread`, DATA the peer sent that a local app has not taken yet (its window not given back). A
    stream that would take `parked + unread` past `limit` is reset with ENHANCE_YOUR_CALM, so what a
    hostile identity pins stays bounded however many connections and streams it opens; `resets` counts
    them. One add per DATA frame and one subtract per acknowledgement: nothing per byte."""

    __slots__ = ("connections", "limit", "on_reset", "parked", "resets", "unread")

    def __init__(self, limit: int, on_reset: Callable[[], None] | None = None) -> None:
        self.limit = limit
        self.on_reset = on_reset  # told of each reset (the proxy counts them in its metrics)
        self.parked = 0
        self.unread = 0
        self.resets = 0
        self.connections = 0  # kept by the owner (the server drops the budget with the last connection)
