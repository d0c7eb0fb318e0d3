"""The HBONE server: accepts mTLS connections on a listening socket and hands each CONNECT stream to a
handler with the caller's verified identity.

The certificate presented is the SVID of the workload the listener belongs to (one listener per pod IP in
local mode, one per pod netns in in-pod mode); the TLS context is swapped at ClientHello time to the newest
certificate of that identity, so rotation needs no new listener.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from ztunnel.hbone.connection import HboneConnection, HboneStream
from ztunnel.hbone.protocol import IDENTITY_ERROR, KEEPALIVE_INTERVAL, KEEPALIVE_TIMEOUT, ConnectRequest, Rejection
from ztunnel.hbone.tls_cache import TlsContexts
from ztunnel.identity.spiffe import SpiffeId
from ztunnel.identity.tls import PeerIdentityError, peer_identity

log = logging.getLogger("ztunnel.hbone")

TLS_HANDSHAKE_TIMEOUT = 10.0


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
    ) -> None:
        self.contexts = contexts
        self.handler = handler
        self.on_rejected = on_rejected  # called with IDENTITY_ERROR when a verified client is refused
        self.keepalive_interval = keepalive_interval
        self.keepalive_timeout = keepalive_timeout
        self.connections: set[HboneConnection] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self.rejected_handshakes = 0
        self._draining = False

    async def listen(self, sock: socket.socket, identity: SpiffeId) -> asyncio.Server:
        """Serve HBONE on an already bound, listening socket, presenting `identity`'s SVID."""
        ctx = await self.contexts.server(identity)
        loop = asyncio.get_running_loop()
        return await loop.create_server(
            lambda: self._new_connection(identity),
            sock=sock,
            ssl=ctx,
            ssl_handshake_timeout=TLS_HANDSHAKE_TIMEOUT,
        )

    def _new_connection(self, identity: SpiffeId) -> HboneConnection:
        conn: HboneConnection
        # Peer and local address, read once per connection: each get_extra_info is a system call.
        addresses: list[tuple[str, int]] = []

        def on_connected(c: HboneConnection) -> bool:
            assert c.transport is not None
            try:
                peer = peer_identity(c.transport.get_extra_info("ssl_object"))
            except PeerIdentityError as e:
                self._rejected()
                log.info("HBONE client rejected", extra={"reason": str(e), "listener": str(identity)})
                return False
            if peer.trust_domain != identity.trust_domain:
                self._rejected()
                log.info(
                    "HBONE client rejected: trust domain differs",
                    extra={"peer_identity": peer.uri, "listener": str(identity)},
                )
                return False
            c.peer_identity = peer
            self.connections.add(c)
            c.closed.add_done_callback(lambda _f: self.connections.discard(c))
            if self._draining:
                c.goaway()
            return True

        def on_request(stream: HboneStream, verdict: ConnectRequest | Rejection) -> None:
            assert conn.transport is not None and isinstance(conn.peer_identity, SpiffeId)
            if not addresses:
                peer = conn.transport.get_extra_info("peername") or ("", 0)
                local = conn.transport.get_extra_info("sockname") or ("", 0)
                addresses[:] = [(peer[0], peer[1]), (local[0], local[1])]
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

    def _rejected(self) -> None:
        self.rejected_handshakes += 1
        if self.on_rejected is not None:
            self.on_rejected(IDENTITY_ERROR)

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
        for conn in list(self.connections):
            conn.abort()
