"""The registry of open proxied connections, so policy changes can re-check them and drain can wait.

Each entry holds the two streams of its relay, so it can abort itself; the tracker never touches sockets on its
own. `ConnectionTracker.relay` is how inbound and outbound run a connection once it is set up.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ztunnel.net.streams import ByteStream
from ztunnel.policy.decision import ConnectionAttributes
from ztunnel.proxy.relay import RelayCounters, relay
from ztunnel.telemetry.metrics import ConnectionLabels, ProxyMetrics


@dataclass(eq=False)
class TrackedConnection:
    direction: str  # "inbound" | "outbound"
    workload_uid: str  # the local pod this connection belongs to
    downstream: ByteStream  # the client's side: counters.a_to_b is what it sent
    upstream: ByteStream
    labels: ConnectionLabels  # what its metrics are counted under
    attributes: ConnectionAttributes | None = None  # inbound: what authorization decided on
    opened_at: float = field(default_factory=time.monotonic)
    denied_by: str | None = None  # set when a policy change closed it
    # Byte counts while it is open: the relay's live counters, and how much of each direction the periodic
    # flush already added to the byte counters.
    counters: RelayCounters = field(default_factory=RelayCounters)
    flushed_sent: int = 0  # toward the client (b_to_a)
    flushed_received: int = 0  # from the client (a_to_b)

    def abort(self) -> None:
        self.downstream.abort()
        self.upstream.abort()

    def take_unflushed(self) -> tuple[int, int]:
        """(sent, received) since the last flush, and mark them flushed."""
        sent, received = self.counters.b_to_a, self.counters.a_to_b
        delta = (sent - self.flushed_sent, received - self.flushed_received)
        self.flushed_sent, self.flushed_received = sent, received
        return delta

    def __repr__(self) -> str:
        return f"<TrackedConnection {self.direction} {self.workload_uid} denied_by={self.denied_by}>"


class ConnectionTracker:
    def __init__(self) -> None:
        self._open: set[TrackedConnection] = set()
        self._empty = asyncio.Event()
        self._empty.set()

    def __len__(self) -> int:
        return len(self._open)

    def add(self, conn: TrackedConnection) -> TrackedConnection:
        self._open.add(conn)
        self._empty.clear()
        return conn

    def remove(self, conn: TrackedConnection) -> None:
        self._open.discard(conn)
        if not self._open:
            self._empty.set()

    async def relay(self, conn: TrackedConnection, metrics: ProxyMetrics | None) -> None:
        """Relay `conn`'s streams until both ends close, counted open and tracked (policy re-checks, drain, byte
        flushes) meanwhile. The caller reports the connection from `conn` when this returns or raises."""
        self.add(conn)
        if metrics is not None:
            metrics.connection_opened(conn.labels)
        try:
            await relay(conn.downstream, conn.upstream, conn.counters)
        finally:
            self.remove(conn)

    def connections(self, direction: str | None = None, workload_uid: str | None = None) -> list[TrackedConnection]:
        return [
            c
            for c in self._open
            if (direction is None or c.direction == direction)
            and (workload_uid is None or c.workload_uid == workload_uid)
        ]

    def close_denied(self, decide: Callable[[TrackedConnection], str | None]) -> int:
        """Abort every inbound connection for which `decide` names a denying policy; returns how many."""
        closed = 0
        for conn in self.connections("inbound"):
            reason = decide(conn)
            if reason is not None:
                conn.denied_by = reason
                conn.abort()
                closed += 1
        return closed

    def abort_all(self, workload_uid: str | None = None) -> None:
        for conn in self.connections(workload_uid=workload_uid):
            conn.abort()

    async def wait_empty(self, timeout: float) -> bool:
        try:
            async with asyncio.timeout(timeout):
                await self._empty.wait()
            return True
        except TimeoutError:
            return False
