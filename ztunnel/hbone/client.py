"""The HBONE client pool: mTLS + HTTP/2 connections keyed by (source identity, destination identity,
destination address), shared by up to `max_streams` tunnels each (DESIGN §4.2).

Assignment only changes state and never awaits while holding a slot decision; concurrent first requests
for a key wait for one handshake, not N. After the handshake the client checks secure naming: the server
must present one of the identities expected for the destination, otherwise the connection is dropped.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import ssl
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import NoReturn

from ztunnel.hbone.connection import HboneConnection
from ztunnel.hbone.protocol import (
    IDENTITY_ERROR,
    KEEPALIVE_INTERVAL,
    KEEPALIVE_TIMEOUT,
    MAX_STREAMS_PER_CONNECTION,
    TLS_FAILURE,
    Authority,
    HboneError,
    trace_headers,
)
from ztunnel.hbone.stream import HboneStream
from ztunnel.hbone.tls_cache import TlsContexts
from ztunnel.identity.spiffe import SpiffeId
from ztunnel.identity.tls import PeerIdentityError, check_secure_naming, peer_identity
from ztunnel.net.deadline import Deadline

log = logging.getLogger("ztunnel.hbone")

DEFAULT_CONNECT_TIMEOUT = 5.0
DEFAULT_IDLE_TIMEOUT = 60.0
REFUSED_RETRIES = 2  # a stream the server never processed (GOAWAY, REFUSED_STREAM) is sent again this often


CONNECT_FAILURE = "connect"


class TlsHandshakeError(HboneError):
    """The TLS handshake with the destination proxy failed (unknown CA, bad cert, reset...)."""

    reason = TLS_FAILURE


class SecureNamingError(HboneError):
    """The destination proxy presented an identity that is not expected for the destination."""

    reason = IDENTITY_ERROR


@dataclass(frozen=True, slots=True)
class PoolKey:
    source: SpiffeId
    destination: SpiffeId
    address: tuple[str, int]

    def __str__(self) -> str:
        return f"{self.source}->{self.destination}@{self.address[0]}:{self.address[1]}"


@dataclass
class PoolStats:
    """Counters the proxy exports; aggregated here so the hot path does no metric work."""

    connections_opened: int = 0
    tls_failures: int = 0
    identity_errors: int = 0
    connect_failures: int = 0
    by_reason: dict[str, int] = field(default_factory=dict)


class HbonePool:
    def __init__(
        self,
        contexts: TlsContexts,
        *,
        max_streams: int = MAX_STREAMS_PER_CONNECTION,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
        keepalive_interval: float = KEEPALIVE_INTERVAL,
        keepalive_timeout: float = KEEPALIVE_TIMEOUT,
        on_failure: Callable[[str, PoolKey, Exception], None] | None = None,
    ) -> None:
        self.contexts = contexts
        self.max_streams = max_streams
        self.connect_timeout = connect_timeout
        self.idle_timeout = idle_timeout
        self.keepalive_interval = keepalive_interval
        self.keepalive_timeout = keepalive_timeout
        self.on_failure = on_failure
        self.stats = PoolStats()
        self._conns: dict[PoolKey, list[HboneConnection]] = {}
        self._dialing: dict[PoolKey, asyncio.Future[HboneConnection]] = {}
        self._draining = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reaping: set[HboneConnection] = set()  # idle connections with a reaper timer pending

    def __repr__(self) -> str:
        return f"<HbonePool keys={len(self._conns)} connections={self.size}>"

    @property
    def size(self) -> int:
        return sum(len(v) for v in self._conns.values())

    def connections(self, key: PoolKey | None = None) -> list[HboneConnection]:
        if key is not None:
            return list(self._conns.get(key, ()))
        return [c for conns in self._conns.values() for c in conns]

    async def connect(
        self,
        key: PoolKey,
        target: Authority,
        *,
        expected_identities: Iterable[str],
        forwarded_for: tuple[str, int] | None = None,
        traceparent: str | None = None,
        baggage: str | None = None,
    ) -> HboneStream:
        """Open one tunnel to `target` through a pooled connection; raise HboneError on any failure.

        `traceparent`/`baggage` are sent as request headers when given (DESIGN §4.2).
        """
        if self._draining:
            raise HboneError("the proxy is draining")
        expected = frozenset(expected_identities)
        loop = self._loop
        if loop is None or asyncio.current_task(loop) is None:  # not the running loop: look it up (getpid())
            loop = self._loop = asyncio.get_running_loop()
        async with Deadline.after(loop, self.connect_timeout):
            for attempt in range(REFUSED_RETRIES + 1):
                conn = await self._checkout(key, expected)
                try:
                    return await conn.open_stream(
                        target,
                        forwarded_for=forwarded_for,
                        extra=trace_headers(traceparent, baggage),
                        reserved=True,
                    )
                except BaseException as e:
                    if conn.is_idle and conn.on_idle is not None:
                        conn.on_idle(conn)
                    if not (isinstance(e, HboneError) and e.refused) or attempt == REFUSED_RETRIES:
                        raise
                    # never processed (a draining server): send it again, on another connection
        raise AssertionError("unreachable")  # pragma: no cover

    async def _checkout(self, key: PoolKey, expected: frozenset[str]) -> HboneConnection:
        while True:
            for conn in self._conns.get(key, ()):
                if conn.is_available(self.max_streams):
                    conn.reserved += 1
                    return conn
            dial = self._dialing.get(key)
            if dial is not None and dial.done():
                # Finished, but its done-callback has not run yet: awaiting it would not yield, and the
                # connection it made is already taken. Start the next handshake instead.
                del self._dialing[key]
                if not dial.cancelled() and dial.exception() is not None:
                    raise dial.exception()  # type: ignore[misc]
                dial = None
            if dial is None:
                dial = asyncio.ensure_future(self._dial(key, expected))
                self._dialing[key] = dial
                dial.add_done_callback(functools.partial(self._dial_done, key))
            await asyncio.shield(dial)  # raises the handshake's error for every waiter

    def _dial_done(self, key: PoolKey, fut: asyncio.Future[HboneConnection]) -> None:
        if self._dialing.get(key) is fut:
            del self._dialing[key]
        if not fut.cancelled():
            fut.exception()  # mark retrieved even when every waiter went away

    async def _dial(self, key: PoolKey, expected: frozenset[str]) -> HboneConnection:
        loop = asyncio.get_running_loop()
        ctx = await self.contexts.client(key.source)
        problem: list[Exception] = []

        def on_connected(conn: HboneConnection) -> bool:
            assert conn.transport is not None
            ssl_object = conn.transport.get_extra_info("ssl_object")
            try:
                identity = peer_identity(ssl_object)
                check_secure_naming(identity, expected)
            except PeerIdentityError as e:
                problem.append(e)
                return False
            conn.peer_identity = identity
            return True

        def factory() -> HboneConnection:
            return HboneConnection(
                client_side=True,
                on_connected=on_connected,
                keepalive_interval=self.keepalive_interval,
                keepalive_timeout=self.keepalive_timeout,
                label=str(key),
            )

        host, port = key.address
        try:
            _, conn = await loop.create_connection(
                factory, host, port, ssl=ctx, server_hostname="", ssl_handshake_timeout=self.connect_timeout
            )
        except ssl.SSLError as e:
            self._fail(TLS_FAILURE, key, TlsHandshakeError(f"TLS handshake with {host}:{port} failed: {e}"))
        except TimeoutError:  # the kernel gave up on the TCP connect (ETIMEDOUT); an OSError, so caught first
            self._fail(CONNECT_FAILURE, key, HboneError(f"timed out connecting to the HBONE endpoint {host}:{port}"))
        except OSError as e:  # refused, unreachable, or the TLS handshake over its timeout (ConnectionAbortedError)
            self._fail(CONNECT_FAILURE, key, HboneError(f"cannot connect to the HBONE endpoint {host}:{port}: {e}"))
        if problem:
            self._fail(
                IDENTITY_ERROR, key, SecureNamingError(f"secure naming check failed for {host}:{port}: {problem[0]}")
            )
        try:
            await conn.ready
        except HboneError as e:
            self._fail(
                TLS_FAILURE, key, TlsHandshakeError(f"the HBONE endpoint {host}:{port} closed the connection: {e}")
            )
        conn.on_idle = lambda c, k=key: self._on_idle(k, c)
        self._conns.setdefault(key, []).append(conn)
        self.stats.connections_opened += 1
        log.debug("HBONE connection opened", extra={"key": str(key)})
        return conn

    def _fail(self, reason: str, key: PoolKey, error: HboneError) -> NoReturn:
        if reason == TLS_FAILURE:
            self.stats.tls_failures += 1
        elif reason == IDENTITY_ERROR:
            self.stats.identity_errors += 1
        else:
            self.stats.connect_failures += 1
        self.stats.by_reason[reason] = self.stats.by_reason.get(reason, 0) + 1
        log.warning("HBONE connection failed", extra={"key": str(key), "reason": reason, "error": str(error)})
        if self.on_failure is not None:
            self.on_failure(reason, key, error)
        raise error

    def _on_idle(self, key: PoolKey, conn: HboneConnection) -> None:
        """Called when a connection has no streams left or has closed."""
        if conn.closed.done():
            conns = self._conns.get(key)
            if conns and conn in conns:
                conns.remove(conn)
                if not conns:
                    del self._conns[key]
            return
        if conn.is_idle and conn not in self._reaping:
            # One reaper timer per connection, not one per idle spell: a connection whose last tunnel ends
            # on every new connection (one client at a time) would otherwise pile up a 60 s timer per tunnel.
            self._reaping.add(conn)
            conn.loop.call_later(self.idle_timeout, self._reap, key, conn)

    def _reap(self, key: PoolKey, conn: HboneConnection) -> None:
        self._reaping.discard(conn)
        if not conn.is_idle:
            return  # busy again: its next idle spell arms a new reaper
        idle_for = time.monotonic() - conn.idle_since
        if idle_for < self.idle_timeout * 0.99:  # busy and idle again since this timer was set: wait the rest
            self._reaping.add(conn)
            conn.loop.call_later(self.idle_timeout - idle_for, self._reap, key, conn)
            return
        conn.close()
        conns = self._conns.get(key)
        if conns and conn in conns:
            conns.remove(conn)
            if not conns:
                del self._conns[key]

    def drain(self) -> None:
        """No new tunnels; idle connections close now, busy ones when their streams end."""
        self._draining = True
        for conn in self.connections():
            conn.goaway()

    def close(self) -> None:
        for conn in self.connections():
            conn.abort()
        self._conns.clear()
