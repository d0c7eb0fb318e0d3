"""Outbound: a local pod's connection (SOCKS5 in local mode, transparent 15001 in in-pod mode) routed to
an HBONE tunnel, a plain passthrough, or a refusal. A mesh destination is never reached in plaintext."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from dataclasses import dataclass

from ztunnel.config.model import Service, Workload, canonical_ip
from ztunnel.errors import ZtunnelError
from ztunnel.hbone.client import HbonePool, PoolKey, SecureNamingError, TlsHandshakeError
from ztunnel.hbone.protocol import STATUS_BAD_REQUEST, STATUS_UNAUTHORIZED, STATUS_UNAVAILABLE, HboneError
from ztunnel.identity.spiffe import SpiffeId
from ztunnel.net.deadline import Deadline
from ztunnel.net.streams import ByteStream, StreamClosed, TcpStream
from ztunnel.proxy import socks5
from ztunnel.proxy.labels import SecurityPolicy, connection_labels
from ztunnel.proxy.listeners import original_destination
from ztunnel.proxy.report import (
    FLAG_DENY,
    FLAG_NO_ROUTE,
    FLAG_UPSTREAM_FAILURE,
    ConnectionReporter,
    format_addr,
)
from ztunnel.proxy.routing import HboneRoute, OutboundRouter, PassthroughRoute, RefusedRoute
from ztunnel.proxy.state import ProxyState, ServedWorkload
from ztunnel.proxy.tracking import TrackedConnection
from ztunnel.telemetry.metrics import ConnectionLabels

log = logging.getLogger("ztunnel.proxy")


class OutboundFailure(Exception):
    """An outbound connection could not be set up: what to answer the client and what to report."""

    def __init__(
        self,
        message: str,
        reply: socks5.Reply,
        flag: str,
        *,
        destination: Workload | None = None,
        service: Service | None = None,
        mesh: bool = False,
        failover: bool = False,
    ) -> None:
        super().__init__(message)
        self.reply = reply
        self.flag = flag
        self.destination = destination
        self.service = service
        self.mesh = mesh
        self.failover = failover  # the tunnel itself failed (proxy down, handshake): another endpoint may do

    @classmethod
    def on_route(
        cls,
        route: HboneRoute | PassthroughRoute,
        message: str,
        reply: socks5.Reply,
        flag: str,
        *,
        failover: bool = False,
    ) -> OutboundFailure:
        """A failure on the way to `route`: reported with its pod and service, as a mesh connection if HBONE."""
        mesh = isinstance(route, HboneRoute)
        return cls(
            message, reply, flag, destination=route.destination, service=route.service, mesh=mesh, failover=failover
        )

    @classmethod
    def tunnel_timeout(cls, route: HboneRoute) -> OutboundFailure:
        message = f"timed out opening a tunnel to {route.target}"
        return cls.on_route(route, message, socks5.Reply.TTL_EXPIRED, FLAG_UPSTREAM_FAILURE)


@dataclass
class _Upstream:
    stream: ByteStream
    labels: ConnectionLabels
    destination: Workload | None
    service: Service | None
    dst_identity: str | None
    address: str


@functools.lru_cache(maxsize=4096)
def _spiffe_id(identity: str) -> SpiffeId:
    """Parsed once per identity, not per connection: a pool key needs both ends' ids on every new tunnel."""
    return SpiffeId.parse(identity)


class Outbound:
    """Serves a local pod's outgoing connections (SOCKS5 and transparent share everything after the handshake)."""

    def __init__(self, state: ProxyState, pool: HbonePool, report: ConnectionReporter) -> None:
        self.state = state
        self.pool = pool
        self.report = report
        self.router = OutboundRouter()

    async def serve_socks5(self, uid: str, client: TcpStream) -> None:
        handshake = socks5.Socks5Handshake()
        # The method reply, held back when the request came in the same read as the greeting (a pipelining
        # client): it then goes out with the request's reply in one write, one system call fewer.
        held = b""
        try:
            async with Deadline.after(client.protocol.loop, self.state.options.connect_timeout * 2):
                step = socks5.Step()
                while step.request is None:
                    data = await client.read(1024)
                    if not data:
                        client.close()
                        return
                    step = handshake.receive_data(data)
                    if step.send:
                        if step.request is not None:
                            held = step.send
                        else:
                            await client.write(step.send)
        except socks5.Socks5Error as e:
            log.info("SOCKS5 client refused", extra={"reason": str(e), "peer": format_addr(*client.peername)})
            if e.reply:
                try:
                    await client.write(e.reply)
                except (ConnectionError, StreamClosed):
                    pass
            client.close()
            self.report.refusal("socks5")
            return
        except (TimeoutError, ConnectionError, StreamClosed):
            client.abort()
            return
        request = step.request
        client.unread(step.leftover)
        host = request.host
        if request.is_domain:
            resolved = self._resolve(host)
            if resolved is None:
                await self._socks_fail(client, socks5.Reply.HOST_UNREACHABLE, held)
                return
            host = resolved
        await self._outbound(uid, client, (host, request.port), socks=True, socks_held=held)

    def _resolve(self, name: str) -> str | None:
        """Service names (`svc`, `svc.ns`, `svc.ns.svc.cluster.local`) resolve to their ClusterIP."""
        name = name.rstrip(".")
        for s in self.state.config.services:
            if s.cluster_ips and name in (s.hostname, f"{s.name}.{s.namespace}", f"{s.name}.{s.namespace}.svc"):
                return s.cluster_ips[0]
        return None

    async def _socks_fail(self, client: TcpStream, code: socks5.Reply, held: bytes = b"") -> None:
        try:
            await client.write(held + socks5.reply(code))
        except (ConnectionError, StreamClosed):
            pass
        client.close()

    async def serve_transparent(self, uid: str, client: TcpStream) -> None:
        served = self.state.workloads.get(uid)
        sock = client.transport.get_extra_info("socket")
        # eBPF redirection's map, when the pod has one, is the answer: conntrack there (if loaded) only knows an
        # un-NATed connection's own address, and asking it too is a second syscall per connection
        if served is not None and served.sockets.outbound_original_dst is not None:
            dst = served.sockets.outbound_destination(sock)
        else:
            dst = original_destination(sock)
        if dst is None:
            log.info("outbound connection without an original destination, closing")
            client.abort()
            return
        await self._outbound(uid, client, dst, socks=False)

    async def _outbound(
        self, uid: str, client: TcpStream, dst: tuple[str, int], *, socks: bool, socks_held: bytes = b""
    ) -> None:
        """`socks_held`: SOCKS5 handshake bytes not yet sent, to go out in front of the request's reply."""
        served = self.state.workloads.get(uid)
        if served is None or self.state.draining:
            if socks:
                await self._socks_fail(client, socks5.Reply.GENERAL_FAILURE, socks_held)
            else:
                client.abort()
            return
        source = served.workload
        peer = client.peername
        src_ip = peer[0] if peer[0] in source.ips else (source.ips[0] if source.ips else peer[0])
        started = time.monotonic()
        try:
            upstream = await self._open_upstream(served, (src_ip, peer[1]), dst, client.protocol.loop)
        except OutboundFailure as e:
            if socks:
                await self._socks_fail(client, e.reply, socks_held)
            else:
                client.abort()
            dst_principal = e.destination.identity if e.mesh and e.destination else None
            labels = self._outbound_labels(
                source, e.destination, e.service, dst_principal, security="mutual_tls" if e.mesh else "unknown"
            )
            self.report.connection(
                labels,
                "outbound",
                (src_ip, peer[1]),
                dst,
                e.flag,
                started,
                count_open=True,
                destination=e.destination,
                service=e.service,
                dst_identity=dst_principal,
                src_identity=source.identity,
                src_workload=source,
                error=str(e),
            )
            return
        if socks:
            try:
                await client.write(socks_held + socks5.reply(socks5.Reply.SUCCEEDED))
            except (ConnectionError, StreamClosed):
                upstream.stream.abort()
                client.abort()
                return
        tracked = TrackedConnection("outbound", uid, client, upstream.stream, upstream.labels)
        try:
            await self.state.tracker.relay(tracked, self.report.metrics)
        finally:
            self.report.relayed(
                tracked,
                (src_ip, peer[1]),
                dst,
                started,
                destination=upstream.destination,
                service=upstream.service,
                dst_identity=upstream.dst_identity,
                src_identity=source.identity,
                src_workload=source,
            )

    async def _open_upstream(
        self,
        served: ServedWorkload,
        client_addr: tuple[str, int],
        dst: tuple[str, int],
        loop: asyncio.AbstractEventLoop,
    ) -> _Upstream:
        source = served.workload
        # The edge: from here on the destination has one spelling (`::ffff:10.0.0.1` is 10.0.0.1), and every
        # decision below (loop guard, pod, service, passthrough) is made on it.
        try:
            ip = canonical_ip(dst[0])
        except ValueError as e:
            self.report.refusal("bad_address")
            raise OutboundFailure(
                f"{format_addr(*dst)} is not a destination: {e}", socks5.Reply.NOT_ALLOWED, FLAG_NO_ROUTE
            ) from None
        if self.state.is_proxy_address(ip, dst[1]):
            # An app dialing the proxy's own listeners (127.0.0.1:15001, its pod IP's 15008, the admin port...)
            # would make the proxy dial itself, or reach its operator ports and other pods' SOCKS5 listeners.
            self.report.refusal("loop")
            raise OutboundFailure(
                f"{format_addr(*dst)} is one of the proxy's own listeners; refusing to connect to itself",
                socks5.Reply.NOT_ALLOWED,
                FLAG_NO_ROUTE,
            )
        routes = self.router.routes(self.state.config, ip, dst[1], source)
        route = routes[0]
        if isinstance(route, RefusedRoute):
            self.report.refusal("no_route")
            raise OutboundFailure(route.reason, socks5.Reply.HOST_UNREACHABLE, FLAG_NO_ROUTE, service=route.service)
        if isinstance(route, PassthroughRoute):
            try:
                async with Deadline.after(loop, self.state.options.connect_timeout):
                    stream = await served.sockets.connector.connect(route.address)
            except (OSError, TimeoutError) as e:
                message = f"cannot connect to {format_addr(*route.address)}: {e or 'timed out'}"
                raise OutboundFailure.on_route(
                    route, message, socks5.Reply.CONNECTION_REFUSED, FLAG_UPSTREAM_FAILURE
                ) from None
            labels = self._outbound_labels(source, route.destination, route.service, None, security="unknown")
            return _Upstream(stream, labels, route.destination, route.service, None, format_addr(*route.address))
        assert isinstance(route, HboneRoute)
        # A Service's other ready mesh endpoints, each tried once if the chosen one's tunnel fails, all within
        # the connect timeout. Only HBONE ones: failing over never downgrades a connection to plaintext.
        candidates = [route, *(r for r in routes[1:] if isinstance(r, HboneRoute))]
        if len(candidates) == 1 and self.pool.connect_timeout <= self.state.options.connect_timeout:
            # One endpoint (the common case): the pool's own timeout, no longer than ours, bounds the attempt and
            # fails it the same way (TTL expired, upstream failure), so a second timer per connection is not needed.
            return await self._open_tunnel(source, route, client_addr)
        deadline = loop.time() + self.state.options.connect_timeout
        for attempt, candidate in enumerate(candidates):
            try:
                async with Deadline(loop, deadline):
                    return await self._open_tunnel(source, candidate, client_addr)
            except TimeoutError:
                raise OutboundFailure.tunnel_timeout(candidate) from None
            except OutboundFailure as e:
                if not e.failover or attempt == len(candidates) - 1 or loop.time() >= deadline:
                    raise
                log.info(
                    "service endpoint unreachable; trying the next one",
                    extra={
                        "endpoint": str(candidate.target),
                        "next": str(candidates[attempt + 1].target),
                        "error": str(e),
                    },
                )
        raise AssertionError("unreachable")  # the last candidate returns or raises

    async def _open_tunnel(self, source: Workload, route: HboneRoute, client_addr: tuple[str, int]) -> _Upstream:
        key = PoolKey(
            source=_spiffe_id(source.identity),
            destination=_spiffe_id(route.destination.identity),
            address=route.proxy_address,
        )

        failure = functools.partial(OutboundFailure.on_route, route)
        try:
            stream = await self.pool.connect(
                key, route.target, expected_identities=route.expected_identities, forwarded_for=client_addr
            )
        except TimeoutError:
            raise OutboundFailure.tunnel_timeout(route) from None
        except (SecureNamingError, TlsHandshakeError) as e:
            raise failure(str(e), socks5.Reply.GENERAL_FAILURE, e.reason, failover=True) from None
        except HboneError as e:
            if e.status == STATUS_UNAUTHORIZED:
                raise failure(str(e), socks5.Reply.NOT_ALLOWED, FLAG_DENY) from None
            if e.status == STATUS_BAD_REQUEST:
                raise failure(str(e), socks5.Reply.HOST_UNREACHABLE, FLAG_NO_ROUTE) from None
            reply = socks5.Reply.CONNECTION_REFUSED if e.status == STATUS_UNAVAILABLE else socks5.Reply.GENERAL_FAILURE
            # No status: the tunnel never got an answer (endpoint's proxy down, connection lost): fail over.
            raise failure(str(e), reply, FLAG_UPSTREAM_FAILURE, failover=e.status is None) from None
        except (ZtunnelError, OSError) as e:  # no certificate (CA refusal or unreachable), a failed dial: fail closed
            raise failure(f"cannot open a tunnel: {e}", socks5.Reply.GENERAL_FAILURE, FLAG_UPSTREAM_FAILURE) from None
        except Exception as e:  # a bug: fail closed all the same, and leave its traceback for whoever fixes it
            log.exception(
                "unexpected error opening a tunnel; the client gets a general failure",
                extra={"source": source.identity, "target": str(route.target)},
            )
            raise failure(f"cannot open a tunnel: {e!r}", socks5.Reply.GENERAL_FAILURE, FLAG_UPSTREAM_FAILURE) from None
        labels = self._outbound_labels(
            source, route.destination, route.service, route.destination.identity, security="mutual_tls"
        )
        return _Upstream(
            stream, labels, route.destination, route.service, route.destination.identity, str(route.target)
        )

    def _outbound_labels(
        self,
        source: Workload,
        destination: Workload | None,
        service: Service | None,
        dst_principal: str | None,
        security: SecurityPolicy = "unknown",
    ) -> ConnectionLabels:
        return connection_labels(
            reporter="source",
            source=source,
            source_principal=source.identity,
            destination=destination,
            destination_principal=dst_principal,
            destination_service=service,
            connection_security_policy=security,
            cache=self.report.labels,
        )
