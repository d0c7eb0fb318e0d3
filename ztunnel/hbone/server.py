"""The HBONE server: accepts mTLS connections on a listening socket and hands each CONNECT stream to a
handler with the caller's verified identity.

The certificate presented is the SVID of the workload the listener belongs to (one listener per pod IP in
local mode, one per pod netns in in-pod mode); the TLS context is swapped at ClientHello time to the newest
certificate of that identity, so rotation needs no new listener.

Each accepted socket's handshake runs in a task (`loop.connect_accepted_socket`), not inside
`create_server(ssl=...)`: there a failed handshake (expired, untrusted or no certificate, timeout) never
reaches our code. Here it is counted by reason, logged (rate-limited), and the client gets OpenSSL's alert
(see `AlertingSSLObject`).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from ztunnel.hbone.budgets import PeerBudget
from ztunnel.hbone.connection import HboneConnection
from ztunnel.hbone.protocol import (
    IDENTITY_ERROR,
    KEEPALIVE_INTERVAL,
    KEEPALIVE_TIMEOUT,
    MAX_INBOUND_CONNECTIONS,
    PEER_BUDGET,
    PEER_MAX_CONNECTIONS,
    ConnectRequest,
    Rejection,
)
from ztunnel.hbone.stream import HboneStream
from ztunnel.hbone.tls_cache import TlsContexts
from ztunnel.identity.spiffe import SpiffeId
from ztunnel.identity.tls import (
    HANDSHAKE_WATCH,
    HandshakeWatch,
    PeerIdentityError,
    PeerRevokedError,
    handshake_failure_reason,
    peer_identity,
)

log = logging.getLogger("ztunnel.hbone")

REVOKED = "revoked"  # a handshake-failure reason (identity.tls.HANDSHAKE_FAILURE_REASONS): the leaf is on a CRL

TLS_HANDSHAKE_TIMEOUT = 10.0
ACCEPT_BATCH = 64  # sockets accepted per readiness event, so one busy listener cannot starve the loop
ACCEPT_PAUSE = 1.0  # seconds without accepting after running out of file descriptors
FAILURE_LOG_INTERVAL = 10.0
FAILURE_LOG_LINES = 5  # per reason and interval; the rest are counted and reported with the next line
# Handshakes in progress per server. Each costs a socket and ~70 KiB (SSL object, transport) until the
# handshake timeout, and any TCP client can start one without a certificate: past this many the oldest is
# dropped (a legitimate handshake takes milliseconds, a silent one the whole timeout). 1,024 x 70 KiB ~ 70 MiB.
MAX_PENDING_HANDSHAKES = 1024


@dataclass(slots=True)
class _ReasonLog:
    window_start: float = 0.0
    lines: int = 0
    suppressed: int = 0


@dataclass
class FailureLog:
    """Rate-limited logging of refused handshakes: at most `lines` per reason per `interval`, the next line
    saying how many were left out. State is one small record per reason (a fixed set), never per peer."""

    interval: float = FAILURE_LOG_INTERVAL
    lines: int = FAILURE_LOG_LINES
    _reasons: dict[str, _ReasonLog] = field(default_factory=dict)

    def allow(self, reason: str, now: float) -> int | None:
        """None: do not log this one. Otherwise: log it, with this many left out since the last line."""
        state = self._reasons.get(reason)
        if state is None:
            state = self._reasons[reason] = _ReasonLog(now)
        if now - state.window_start >= self.interval:
            state.window_start, state.lines = now, 0
        if state.lines >= self.lines:
            state.suppressed += 1
            return None
        state.lines += 1
        suppressed, state.suppressed = state.suppressed, 0
        return suppressed


class HboneListener(asyncio.AbstractServer):
    """One listening socket of an `HboneServer` (what `asyncio.Server` is for `create_server`)."""

    def __init__(self, server: HboneServer, sock: socket.socket, identity: SpiffeId, ctx: ssl.SSLContext) -> None:
        self._server = server
        self._sock = sock
        self._identity = identity
        self._ctx = ctx
        self._loop = asyncio.get_running_loop()
        self._serving = False
        self._resume: asyncio.TimerHandle | None = None
        self.sockets = [sock]

    def start_serving_now(self) -> None:
        self._sock.setblocking(False)
        self._loop.add_reader(self._sock.fileno(), self._on_readable)
        self._serving = True

    def _on_readable(self) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                conn, peer = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    log.error("HBONE listener cannot accept", extra={"listener": str(self._identity), "error": str(e)})
                    self._loop.remove_reader(self._sock.fileno())
                    self._resume = self._loop.call_later(ACCEPT_PAUSE, self._resume_accepting)
                    return
                continue  # the peer went away before we accepted it (ECONNABORTED...)
            self._server._accepted(conn, peer, self._identity, self._ctx)

    def _resume_accepting(self) -> None:
        self._resume = None
        if self._serving:
            self._loop.add_reader(self._sock.fileno(), self._on_readable)

    def close(self) -> None:
        """Stop accepting and close the socket; connections already accepted go on."""
        if self._serving:
            self._serving = False
            if self._resume is not None:
                self._resume.cancel()
                self._resume = None
            else:
                self._loop.remove_reader(self._sock.fileno())
        self._sock.close()

    def get_loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    def is_serving(self) -> bool:
        return self._serving

    async def start_serving(self) -> None:
        if not self._serving and self._sock.fileno() >= 0:
            self.start_serving_now()

    async def serve_forever(self) -> None:
        raise NotImplementedError("HBONE listeners serve from listen() on; close() them to stop")

    async def wait_closed(self) -> None:
        return None


@dataclass(slots=True)
class InboundTunnel:
    """One CONNECT request as the server received it."""

    stream: HboneStream
    request: ConnectRequest | Rejection
    peer_identity: SpiffeId
    peer_address: tuple[str, int]
    local_address: tuple[str, int]
    local_identity: SpiffeId
    # The connection's event loop, so the handler needs no asyncio.get_running_loop() (a getpid() on 3.11).
    loop: asyncio.AbstractEventLoop | None = None


TunnelHandler = Callable[[InboundTunnel], Awaitable[None]]
# What a peer's connection count and memory budget are kept by: its identity and the address it connects
# from. An identity is a service account, shared by every replica on every node; the address is the client
# node (a node proxy dials HBONE from its own netns), so a hostile pod holding one SVID key exhausts only
# its own (identity, address) share, not the same identity's replicas on other nodes.
PeerKey = tuple[SpiffeId, str]
# The `reason` label of ztunnel_connections_refused_total for a connection closed right after its handshake.
PEER_CONNECTION_LIMIT = "peer_connection_limit"  # its (identity, address) holds peer_max_connections
SERVER_CONNECTION_LIMIT = "server_connection_limit"  # the server holds max_connections
_LIMIT_MESSAGES = {
    PEER_CONNECTION_LIMIT: "HBONE client refused: its identity holds the maximum of connections from its address",
    SERVER_CONNECTION_LIMIT: "HBONE client refused: the server holds the maximum of inbound connections",
}


class HboneServer:
    """Owns the accepted HBONE connections and the tasks serving their streams."""

    def __init__(
        self,
        contexts: TlsContexts,
        handler: TunnelHandler,
        *,
        keepalive_interval: float = KEEPALIVE_INTERVAL,
        keepalive_timeout: float = KEEPALIVE_TIMEOUT,
        on_rejected: Callable[[str], None] | None = None,
        on_budget_reset: Callable[[], None] | None = None,
        on_connection_limit: Callable[[str], None] | None = None,
        handshake_timeout: float = TLS_HANDSHAKE_TIMEOUT,
        peer_budget: int = PEER_BUDGET,
        peer_max_connections: int = PEER_MAX_CONNECTIONS,
        max_connections: int = MAX_INBOUND_CONNECTIONS,
    ) -> None:
        self.contexts = contexts
        self.handler = handler
        # Called with the reason a client was refused: IDENTITY_ERROR (verified, but the wrong identity or
        # trust domain), or a failed handshake's reason (see `handshake_failure_reason`).
        self.on_rejected = on_rejected
        self.handshake_timeout = handshake_timeout
        self.handshake_failures: dict[str, int] = {}
        self.failure_log = FailureLog()
        # Handshakes in progress, oldest first (dropped first past max_pending_handshakes): task -> its socket,
        # peer address and listener identity.
        self._handshakes: dict[asyncio.Task[None], tuple[socket.socket, tuple[str, int], SpiffeId]] = {}
        self.max_pending_handshakes = MAX_PENDING_HANDSHAKES
        self.keepalive_interval = keepalive_interval
        self.keepalive_timeout = keepalive_timeout
        self.connections: set[HboneConnection] = set()
        # App bytes each peer (identity, address) holds across its connections, how many connections it may
        # hold, and how many the server holds in all (hbone/protocol.py, "Limits under attack"); a budget
        # lives while its peer has a connection.
        self.peer_budget = peer_budget
        self.peer_max_connections = peer_max_connections
        self.max_connections = max_connections
        self.on_budget_reset = on_budget_reset
        # Told of each connection refused past a limit, with PEER_CONNECTION_LIMIT or SERVER_CONNECTION_LIMIT.
        self.on_connection_limit = on_connection_limit
        self.connection_limit_refusals = 0
        self.budgets: dict[PeerKey, PeerBudget] = {}
        self.budget_resets = 0  # streams reset for going over their peer's budget, budgets gone included
        self.tasks: set[asyncio.Task[None]] = set()
        self.rejected_handshakes = 0
        self._draining = False

    async def listen(self, sock: socket.socket, identity: SpiffeId) -> HboneListener:
        """Serve HBONE on an already bound, listening socket, presenting `identity`'s SVID."""
        ctx = await self.contexts.server(identity)
        listener = HboneListener(self, sock, identity, ctx)
        listener.start_serving_now()
        return listener

    def _accepted(self, sock: socket.socket, peer: tuple[str, int], identity: SpiffeId, ctx: ssl.SSLContext) -> None:
        loop = asyncio.get_running_loop()
        while len(self._handshakes) >= self.max_pending_handshakes:
            self._drop_oldest_handshake()
        task = loop.create_task(self._handshake(loop, sock, peer, identity, ctx))
        self._handshakes[task] = (sock, peer, identity)
        task.add_done_callback(self._handshake_done)

    def _handshake_done(self, task: asyncio.Task[None]) -> None:
        self._handshakes.pop(task, None)

    def _drop_oldest_handshake(self) -> None:
        """Too many handshakes in progress (a flood of connections that never finish theirs): end the oldest."""
        task, (sock, peer, identity) = next(iter(self._handshakes.items()))
        del self._handshakes[task]
        task.cancel()  # its except-clause closes the socket; a task that never ran has no clause, so close here
        sock.close()  # (deferred by Python while the transport holds the socket, which then lets it go)
        self._handshake_failed(ConnectionAbortedError("too many handshakes in progress"), peer, identity, "overload")

    async def _handshake(
        self,
        loop: asyncio.AbstractEventLoop,
        sock: socket.socket,
        peer: tuple[str, int],
        identity: SpiffeId,
        ctx: ssl.SSLContext,
    ) -> None:
        watch = HandshakeWatch(loop, sock)
        HANDSHAKE_WATCH.set(watch)  # this task's context: the transport's callbacks run in a copy of it
        try:
            await loop.connect_accepted_socket(
                lambda: self._new_connection(identity), sock, ssl=ctx, ssl_handshake_timeout=self.handshake_timeout
            )
        except (OSError, EOFError) as e:  # ssl.SSLError is an OSError
            self._handshake_failed(watch.error or e, peer, identity)
        except BaseException:
            sock.close()  # cancelled (server abort) or a bug: never leak the socket
            raise

    def _handshake_failed(
        self, error: BaseException, peer: tuple[str, int], identity: SpiffeId, reason: str | None = None
    ) -> None:
        reason = reason or handshake_failure_reason(error)
        self.handshake_failures[reason] = self.handshake_failures.get(reason, 0) + 1
        if self.on_rejected is not None:
            self.on_rejected(reason)
        suppressed = self.failure_log.allow(reason, time.monotonic())
        if suppressed is None:
            return
        text = getattr(error, "verify_message", None) or str(error) or type(error).__name__
        log.log(
            logging.INFO if reason == "closed" else logging.WARNING,
            "HBONE handshake failed",
            extra={
                "reason": reason,
                "peer": f"{peer[0]}:{peer[1]}" if ":" not in peer[0] else f"[{peer[0]}]:{peer[1]}",
                "listener": str(identity),
                "error": text[:256],
                "suppressed": suppressed,
            },
        )

    def _new_connection(self, identity: SpiffeId) -> HboneConnection:
        conn: HboneConnection
        # Peer address (read at the handshake, it keys the limits) and local address (at the first request),
        # each read once per connection: a get_extra_info may be a system call.
        addresses: list[tuple[str, int]] = []

        def on_connected(c: HboneConnection) -> bool:
            assert c.transport is not None
            try:
                peer = peer_identity(c.transport.get_extra_info("ssl_object"))
            except PeerIdentityError as e:
                revoked = isinstance(e, PeerRevokedError)  # checked by us after the handshake, not by OpenSSL
                self._rejected(
                    "HBONE client rejected", {"reason": str(e), "listener": str(identity)}, REVOKED if revoked else None
                )
                return False
            if peer.trust_domain != identity.trust_domain:
                self._rejected(
                    "HBONE client rejected: trust domain differs",
                    {"peer_identity": peer.uri, "listener": str(identity)},
                )
                return False
            address = c.transport.get_extra_info("peername") or ("", 0)
            addresses.append((address[0], address[1]))  # on_request's peer_address: read once per connection
            key = (peer, address[0])
            if len(self.connections) >= self.max_connections:
                self._over_connection_limit(SERVER_CONNECTION_LIMIT, key, identity, self.max_connections)
                return False
            held = self.budgets.get(key)
            if held is not None and held.connections >= self.peer_max_connections:
                self._over_connection_limit(PEER_CONNECTION_LIMIT, key, identity, self.peer_max_connections)
                return False
            c.peer_identity = peer
            self.connections.add(c)
            c.budget = self._budget_for(key)
            c.closed.add_done_callback(lambda _f: self._connection_closed(c, key))
            if self._draining:
                c.goaway()
            return True

        def on_request(stream: HboneStream, verdict: ConnectRequest | Rejection) -> None:
            assert conn.transport is not None and isinstance(conn.peer_identity, SpiffeId)
            if len(addresses) < 2:
                local = conn.transport.get_extra_info("sockname") or ("", 0)
                addresses.append((local[0], local[1]))
            tunnel = InboundTunnel(
                stream=stream,
                request=verdict,
                peer_identity=conn.peer_identity,
                peer_address=addresses[0],
                local_address=addresses[1],
                local_identity=identity,
                loop=conn.loop,
            )
            task = conn.loop.create_task(self._serve(tunnel))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

        conn = HboneConnection(
            client_side=False,
            on_request=on_request,
            on_connected=on_connected,
            keepalive_interval=self.keepalive_interval,
            keepalive_timeout=self.keepalive_timeout,
            label=f"inbound {identity}",
        )
        return conn

    def _budget_for(self, key: PeerKey) -> PeerBudget:
        """The peer's budget, looked up once per connection (the connection keeps it)."""
        budget = self.budgets.get(key)
        if budget is None:
            budget = self.budgets[key] = PeerBudget(self.peer_budget, self.on_budget_reset)
        budget.connections += 1
        return budget

    def _connection_closed(self, c: HboneConnection, key: PeerKey) -> None:
        self.connections.discard(c)
        budget = c.budget
        if budget is not None:
            budget.connections -= 1
            if budget.connections == 0:
                self.budget_resets += budget.resets
                self.budgets.pop(key, None)

    def _over_connection_limit(self, reason: str, key: PeerKey, listener: SpiffeId, limit: int) -> None:
        """A peer (identity, address), or the whole server, already holds its maximum of connections: the new
        one is closed (counted by reason, logged under the failure log's per-reason limit)."""
        self.connection_limit_refusals += 1
        if self.on_connection_limit is not None:
            self.on_connection_limit(reason)
        suppressed = self.failure_log.allow(reason, time.monotonic())
        if suppressed is not None:
            log.warning(
                _LIMIT_MESSAGES[reason],
                extra={
                    "peer_identity": key[0].uri,
                    "peer": key[1],
                    "listener": str(listener),
                    "limit": limit,
                    "suppressed": suppressed,
                },
            )

    def budget_resets_total(self) -> int:
        """Streams reset so far because their peer (identity, address) went over its memory budget."""
        return self.budget_resets + sum(b.resets for b in self.budgets.values())

    def _rejected(self, message: str, fields: dict[str, object], reason: str | None = None) -> None:
        """A verified client of the wrong identity (or, `reason` REVOKED, a revoked certificate): counted, logged
        under the same limit as failed handshakes."""
        self.rejected_handshakes += 1
        if self.on_rejected is not None:
            self.on_rejected(reason or IDENTITY_ERROR)
        suppressed = self.failure_log.allow(reason or "identity", time.monotonic())
        if suppressed is not None:
            log.info(message, extra={**fields, "suppressed": suppressed})

    async def _serve(self, tunnel: InboundTunnel) -> None:
        try:
            await self.handler(tunnel)
        except Exception:
            log.exception("HBONE stream handler failed")
            tunnel.stream.abort()

    def drain(self) -> None:
        """GOAWAY on every connection: open streams finish, no new ones."""
        self._draining = True
        for conn in list(self.connections):
            conn.goaway()

    def abort(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        for task, (sock, _peer, _identity) in list(self._handshakes.items()):
            task.cancel()
            sock.close()  # a handshake task cancelled before it ran would never close it
        for conn in list(self.connections):
            conn.abort()
