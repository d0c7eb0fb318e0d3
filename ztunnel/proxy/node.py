"""The node proxy: serves a set of local workloads (pods), outbound and inbound.

Which workloads are served is pluggable. Local mode (`LocalWorkloads`) derives the set from the config
(enrolled pods whose spec.nodeName is this node) and binds `<podIP>:port` on loopback. In-pod mode (the
node agent hands over each pod's netns) calls `add_workload(workload, sockets)` / `remove_workload(uid)`
with sockets it bound inside the pod's network namespace.

Per connection:
- outbound (SOCKS5 or transparent 15001): route (routing.py), then HBONE via the pool, plain TCP
  passthrough, or refusal; never plaintext to a mesh destination;
- HBONE inbound: validate CONNECT (400), authorize (401), connect the app (503), answer 200 and relay;
- plaintext inbound: PeerAuthentication (STRICT refuses), authorize, relay.
Open inbound connections are tracked and re-checked when policy changes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ztunnel.config.model import ClusterConfig, Service, Workload, normalize_ip
from ztunnel.hbone.client import HbonePool, PoolKey, SecureNamingError, TlsHandshakeError
from ztunnel.hbone.protocol import (
    STATUS_BAD_REQUEST,
    STATUS_OK,
    STATUS_UNAUTHORIZED,
    STATUS_UNAVAILABLE,
    ConnectRequest,
    HboneError,
    Rejection,
)
from ztunnel.hbone.server import HboneServer, InboundTunnel
from ztunnel.hbone.streams import ByteStream, StreamClosed, TcpStream
from ztunnel.hbone.tls_cache import TlsContexts
from ztunnel.identity.certs import CertificateProvider
from ztunnel.identity.spiffe import SpiffeId
from ztunnel.policy.engine import ConnectionAttributes, Decision, PolicyEngine
from ztunnel.proxy import socks5
from ztunnel.proxy.listeners import ListenerFactory, WorkloadSockets, original_destination, serve_streams
from ztunnel.proxy.relay import RelayCounters, relay
from ztunnel.proxy.routing import PROXY_PORTS, HboneRoute, OutboundRouter, PassthroughRoute, RefusedRoute
from ztunnel.proxy.tracking import ConnectionTracker, TrackedConnection
from ztunnel.telemetry.accesslog import AccessLog
from ztunnel.telemetry.metrics import ConnectionLabels, ProxyMetrics

log = logging.getLogger("ztunnel.proxy")

# Envoy/Istio response flags used in metrics and the access log.
FLAG_NONE = "-"
FLAG_DENY = "DENY"  # authorization (or STRICT peer authentication) refused the connection
FLAG_NO_ROUTE = "NR"  # no route: a service without endpoints, an unknown or non-local destination
FLAG_UPSTREAM_FAILURE = "UF"  # could not connect upstream (app, passthrough, or the HBONE peer)
FLAG_BAD_REQUEST = "BR"  # malformed request (HBONE 400)


@dataclass
class ProxyOptions:
    node: str
    connect_timeout: float = 5.0
    drain_timeout: float = 10.0
    pool_idle_timeout: float = 60.0


@dataclass(eq=False)
class ServedWorkload:
    workload: Workload
    sockets: WorkloadSockets
    servers: list[asyncio.Server] = field(default_factory=list)
    added_at: float = field(default_factory=time.time)


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
    ) -> None:
        super().__init__(message)
        self.reply = reply
        self.flag = flag
        self.destination = destination
        self.service = service
        self.mesh = mesh


@dataclass
class _Upstream:
    stream: ByteStream
    labels: ConnectionLabels
    destination: Workload | None
    service: Service | None
    dst_identity: str | None
    address: str


def _addr(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class NodeProxy:
    """Outbound + inbound data plane for the workloads it serves. Lifetime: use, then `drain`/`close`."""

    def __init__(
        self,
        options: ProxyOptions,
        certs: CertificateProvider,
        *,
        metrics: ProxyMetrics | None = None,
        access_log: AccessLog | None = None,
    ) -> None:
        self.options = options
        self.certs = certs
        self.metrics = metrics
        self.access_log = access_log or AccessLog("off")
        self.config = ClusterConfig.empty()
        self.config_loaded = False
        self.policy = PolicyEngine.from_config(self.config)
        self.contexts = TlsContexts(certs)
        self.pool = HbonePool(
            self.contexts,
            connect_timeout=options.connect_timeout,
            idle_timeout=options.pool_idle_timeout,
            on_failure=self._on_pool_failure,
        )
        self.hbone_server = HboneServer(self.contexts, self._serve_tunnel)
        self.router = OutboundRouter()
        self.tracker = ConnectionTracker()
        self.workloads: dict[str, ServedWorkload] = {}
        self._served_by_ip: dict[str, str] = {}  # pod IP -> uid of a workload served here
        self.tasks: set[asyncio.Task[None]] = set()
        self.draining = False
        self.closed = asyncio.Event()

    def __repr__(self) -> str:
        return (
            f"<NodeProxy node={self.options.node} workloads={len(self.workloads)} open={len(self.tracker)}"
            f" pool={self.pool.size}>"
        )

    # ---- config --------------------------------------------------------------------------------
    def apply_config(self, config: ClusterConfig) -> None:
        """Use a new snapshot: new policy engine, refreshed workload objects, re-checked inbound connections."""
        self.config = config
        self.config_loaded = True
        self.policy = PolicyEngine.from_config(config)
        for err in self.policy.errors:
            log.error("policy rejected: %s", err)
        for served in self.workloads.values():
            fresh = config.workload_by_uid(served.workload.uid)
            if fresh is not None:
                served.workload = fresh
        closed = self.tracker.close_denied(self._recheck)
        if closed:
            log.info("policy change closed connections", extra={"closed": closed})
        if self.metrics is not None:
            self.metrics.config_loaded()

    def _recheck(self, conn: TrackedConnection) -> str | None:
        attrs = conn.attributes
        if attrs is None:
            return None
        served = self.workloads.get(conn.workload_uid)
        destination = served.workload if served else attrs.destination
        fresh = ConnectionAttributes(
            source_principal=attrs.source_principal,
            source_ip=attrs.source_ip,
            destination=destination,
            destination_ip=attrs.destination_ip,
            destination_port=attrs.destination_port,
        )
        if attrs.source_principal is None:  # plaintext: a switch to STRICT closes it too
            mode = self.policy.peer_authentication_mode(destination, attrs.destination_port)
            if mode == "STRICT":
                return "peer authentication STRICT"
        decision = self.policy.check_l4(fresh)
        if decision.allowed:
            return None
        return decision.policy or decision.reason

    # ---- served workloads ----------------------------------------------------------------------
    async def add_workload(self, workload: Workload, sockets: WorkloadSockets) -> None:
        """Serve `workload` on the given listening sockets (the proxy owns them from now on).

        Fetches the workload's certificate first, so a pod is never served without its SVID. Adding a uid
        that is already served replaces its sockets.
        """
        if workload.uid in self.workloads:
            await self.remove_workload(workload.uid)
        identity = SpiffeId.parse(workload.identity)
        served = ServedWorkload(workload=workload, sockets=sockets)
        try:
            await self.contexts.server(identity)
            await self.contexts.client(identity)
            for sock in sockets.hbone:
                served.servers.append(await self.hbone_server.listen(sock, identity))
            uid = workload.uid
            for sock in sockets.plaintext:
                served.servers.append(
                    await serve_streams(sock, lambda s, u=uid: self._serve_plaintext(u, s), tasks=self.tasks)
                )
            for sock in sockets.socks5:
                served.servers.append(
                    await serve_streams(sock, lambda s, u=uid: self._serve_socks5(u, s), tasks=self.tasks)
                )
            for sock in sockets.outbound:
                served.servers.append(
                    await serve_streams(sock, lambda s, u=uid: self._serve_transparent(u, s), tasks=self.tasks)
                )
        except BaseException:
            for server in served.servers:
                server.close()
            sockets.close()
            raise
        self.workloads[workload.uid] = served
        for ip in workload.ips:
            self._served_by_ip[normalize_ip(ip)] = workload.uid
        log.info("serving workload", extra={"workload": workload.ref, "identity": workload.identity})
        if self.metrics is not None:
            self.metrics.set_pods_served(len(self.workloads))
            cert = self.contexts.certificate(identity)
            if cert is not None:
                self.metrics.set_certificate_expiry(identity.uri, cert.not_after.timestamp())

    async def remove_workload(self, uid: str) -> None:
        """Stop serving a pod: close its listeners and abort its open connections."""
        served = self.workloads.pop(uid, None)
        if served is None:
            return
        for ip in [ip for ip, owner in self._served_by_ip.items() if owner == uid]:
            del self._served_by_ip[ip]
        for server in served.servers:
            server.close()
        served.sockets.close()
        self.tracker.abort_all(uid)
        identity = SpiffeId.parse(served.workload.identity)
        if not any(w.workload.identity == served.workload.identity for w in self.workloads.values()):
            self.contexts.forget(identity)
            forget = getattr(self.certs, "forget", None)
            if callable(forget):
                forget(identity)
            if self.metrics is not None:
                self.metrics.remove_certificate(identity.uri)
        log.info("stopped serving workload", extra={"workload": served.workload.ref})
        if self.metrics is not None:
            self.metrics.set_pods_served(len(self.workloads))

    def served_workload(self, uid: str) -> Workload | None:
        served = self.workloads.get(uid)
        return served.workload if served else None

    # ---- outbound ------------------------------------------------------------------------------
    async def _serve_socks5(self, uid: str, client: TcpStream) -> None:
        handshake = socks5.Socks5Handshake()
        try:
            async with asyncio.timeout(self.options.connect_timeout * 2):
                step = socks5.Step()
                while step.request is None:
                    data = await client.read(1024)
                    if not data:
                        client.close()
                        return
                    step = handshake.receive_data(data)
                    if step.send:
                        await client.write(step.send)
        except socks5.Socks5Error as e:
            log.info("SOCKS5 client refused", extra={"reason": str(e), "peer": _addr(*client.peername)})
            if e.reply:
                try:
                    await client.write(e.reply)
                except (ConnectionError, StreamClosed):
                    pass
            client.close()
            self._count_refusal("socks5")
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
                await self._socks_fail(client, socks5.Reply.HOST_UNREACHABLE)
                return
            host = resolved
        await self._outbound(uid, client, (host, request.port), socks=True)

    def _resolve(self, name: str) -> str | None:
        """Service names (`svc`, `svc.ns`, `svc.ns.svc.cluster.local`) resolve to their ClusterIP."""
        name = name.rstrip(".")
        for s in self.config.services:
            if s.cluster_ips and name in (s.hostname, f"{s.name}.{s.namespace}", f"{s.name}.{s.namespace}.svc"):
                return s.cluster_ips[0]
        return None

    async def _socks_fail(self, client: TcpStream, code: socks5.Reply) -> None:
        try:
            await client.write(socks5.reply(code))
        except (ConnectionError, StreamClosed):
            pass
        client.close()

    async def _serve_transparent(self, uid: str, client: TcpStream) -> None:
        dst = original_destination(client.transport.get_extra_info("socket"))
        if dst is None:
            log.info("outbound connection without an original destination, closing")
            client.abort()
            return
        await self._outbound(uid, client, dst, socks=False)

    async def _outbound(self, uid: str, client: TcpStream, dst: tuple[str, int], *, socks: bool) -> None:
        served = self.workloads.get(uid)
        if served is None or self.draining:
            if socks:
                await self._socks_fail(client, socks5.Reply.GENERAL_FAILURE)
            else:
                client.abort()
            return
        source = served.workload
        peer = client.peername
        src_ip = peer[0] if peer[0] in source.ips else (source.ips[0] if source.ips else peer[0])
        started = time.monotonic()
        try:
            upstream = await self._open_upstream(served, (src_ip, peer[1]), dst)
        except OutboundFailure as e:
            if socks:
                await self._socks_fail(client, e.reply)
            else:
                client.abort()
            dst_principal = e.destination.identity if e.mesh and e.destination else None
            labels = self._outbound_labels(
                source, e.destination, e.service, dst_principal, security="mutual_tls" if e.mesh else "unknown"
            )
            self._report(
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
                await client.write(socks5.reply(socks5.Reply.SUCCEEDED))
            except (ConnectionError, StreamClosed):
                upstream.stream.abort()
                client.abort()
                return
        tracked = self.tracker.add(
            TrackedConnection("outbound", uid, abort=lambda: (client.abort(), upstream.stream.abort()))
        )
        if self.metrics is not None:
            self.metrics.connection_opened(upstream.labels)
        counters = RelayCounters()
        try:
            await relay(client, upstream.stream, counters)
        finally:
            self.tracker.remove(tracked)
            # Source side: "received" came from the client pod, "sent" went back to it.
            self._report(
                upstream.labels,
                "outbound",
                (src_ip, peer[1]),
                dst,
                FLAG_NONE,
                started,
                received=counters.a_to_b,
                sent=counters.b_to_a,
                opened=True,
                destination=upstream.destination,
                service=upstream.service,
                dst_identity=upstream.dst_identity,
                src_identity=source.identity,
                src_workload=source,
                error=counters.error,
            )

    async def _open_upstream(
        self, served: ServedWorkload, client_addr: tuple[str, int], dst: tuple[str, int]
    ) -> _Upstream:
        source = served.workload
        route = self.router.route(self.config, dst[0], dst[1])
        if isinstance(route, RefusedRoute):
            self._count_refusal("no_route")
            raise OutboundFailure(route.reason, socks5.Reply.HOST_UNREACHABLE, FLAG_NO_ROUTE, service=route.service)
        if isinstance(route, PassthroughRoute):
            try:
                async with asyncio.timeout(self.options.connect_timeout):
                    stream = await served.sockets.connector.connect(route.address)
            except (OSError, TimeoutError) as e:
                raise OutboundFailure(
                    f"cannot connect to {_addr(*route.address)}: {e or 'timed out'}",
                    socks5.Reply.CONNECTION_REFUSED,
                    FLAG_UPSTREAM_FAILURE,
                    destination=route.destination,
                    service=route.service,
                ) from None
            labels = self._outbound_labels(source, route.destination, route.service, None, security="unknown")
            return _Upstream(stream, labels, route.destination, route.service, None, _addr(*route.address))
        assert isinstance(route, HboneRoute)
        key = PoolKey(
            source=SpiffeId.parse(source.identity),
            destination=SpiffeId.parse(route.destination.identity),
            address=route.proxy_address,
        )

        def failure(message: str, reply: socks5.Reply, flag: str) -> OutboundFailure:
            return OutboundFailure(
                message, reply, flag, destination=route.destination, service=route.service, mesh=True
            )

        try:
            stream = await self.pool.connect(
                key, route.target, expected_identities=route.expected_identities, forwarded_for=client_addr
            )
        except TimeoutError:
            raise failure(
                f"timed out opening a tunnel to {route.target}", socks5.Reply.TTL_EXPIRED, FLAG_UPSTREAM_FAILURE
            ) from None
        except HboneError as e:
            if e.status == STATUS_UNAUTHORIZED:
                raise failure(str(e), socks5.Reply.NOT_ALLOWED, FLAG_DENY) from None
            if e.status == STATUS_BAD_REQUEST:
                raise failure(str(e), socks5.Reply.HOST_UNREACHABLE, FLAG_NO_ROUTE) from None
            reply = socks5.Reply.CONNECTION_REFUSED if e.status == STATUS_UNAVAILABLE else socks5.Reply.GENERAL_FAILURE
            raise failure(str(e), reply, FLAG_UPSTREAM_FAILURE) from None
        except Exception as e:  # certificate errors and the like: fail closed
            raise failure(f"cannot open a tunnel: {e}", socks5.Reply.GENERAL_FAILURE, FLAG_UPSTREAM_FAILURE) from None
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
        security: Any = "unknown",
    ) -> ConnectionLabels:
        return ConnectionLabels.build(
            reporter="source",
            source=source,
            source_principal=source.identity,
            destination=destination,
            destination_principal=dst_principal,
            destination_service=service,
            connection_security_policy=security,
        )

    def _on_pool_failure(self, reason: str, key: PoolKey, error: Exception) -> None:
        if self.metrics is None:
            return
        if isinstance(error, SecureNamingError):
            self.metrics.tls_failure("identity")
        elif isinstance(error, TlsHandshakeError):
            self.metrics.tls_failure("handshake")
        else:
            self.metrics.connection_refused("hbone_connect")

    # ---- HBONE inbound -------------------------------------------------------------------------
    async def _serve_tunnel(self, tunnel: InboundTunnel) -> None:
        stream = tunnel.stream
        started = time.monotonic()
        peer_identity = tunnel.peer_identity.uri
        request = tunnel.request
        if isinstance(request, Rejection):
            stream.respond(request.status)
            self._count_refusal("bad_request")
            self._report_inbound_refusal(tunnel, None, None, FLAG_BAD_REQUEST, request.reason, started)
            return
        assert isinstance(request, ConnectRequest)
        target = request.target
        uid = self._served_by_ip.get(target.ip)
        served = self.workloads.get(uid) if uid is not None else None
        if served is None:
            stream.respond(STATUS_BAD_REQUEST)
            self._count_refusal("not_local")
            self._report_inbound_refusal(
                tunnel, None, None, FLAG_NO_ROUTE, f"{target} is not a workload served by this proxy", started
            )
            return
        destination = served.workload
        if destination.identity != tunnel.local_identity.uri or target.port in PROXY_PORTS:
            stream.respond(STATUS_BAD_REQUEST)
            self._count_refusal("not_local")
            why = (
                f"port {target.port} is a proxy port"
                if target.port in PROXY_PORTS
                else f"{target} belongs to {destination.identity}, not to this listener's {tunnel.local_identity}"
            )
            self._report_inbound_refusal(tunnel, destination, None, FLAG_NO_ROUTE, why, started)
            return
        source_ip, source_port = self._claimed_source(request, tunnel)
        attrs = ConnectionAttributes(
            source_principal=peer_identity,
            source_ip=source_ip,
            destination=destination,
            destination_ip=target.ip,
            destination_port=target.port,
        )
        source_workload = self._source_workload(source_ip, peer_identity)
        labels = ConnectionLabels.build(
            reporter="destination",
            source=source_workload,
            source_principal=peer_identity,
            destination=destination,
            destination_principal=destination.identity,
            destination_service=None,
            connection_security_policy="mutual_tls",
        )
        decision = self.policy.check_l4(attrs)
        if not decision.allowed:
            stream.respond(STATUS_UNAUTHORIZED)
            self._report_denied(labels, "inbound", (source_ip, source_port), target, decision, started, source_workload)
            return
        try:
            async with asyncio.timeout(self.options.connect_timeout):
                app = await served.sockets.connector.connect((target.ip, target.port), source=(source_ip, source_port))
        except (OSError, TimeoutError) as e:
            stream.respond(STATUS_UNAVAILABLE)
            self._report(
                labels,
                "inbound",
                (source_ip, source_port),
                (target.ip, target.port),
                FLAG_UPSTREAM_FAILURE,
                started,
                error=f"cannot connect to the app: {e}",
                destination=destination,
                dst_identity=destination.identity,
                src_identity=peer_identity,
                src_workload=source_workload,
                count_open=True,
            )
            return
        stream.respond(STATUS_OK)
        await self._relay_inbound(
            served, stream, app, attrs, labels, (source_ip, source_port), started, peer_identity, source_workload
        )

    def _claimed_source(self, request: ConnectRequest, tunnel: InboundTunnel) -> tuple[str, int]:
        """The client address for policy and telemetry: the `forwarded` address when it belongs to a pod
        with the caller's own (authenticated) identity, else the TCP peer. A workload cannot borrow another
        workload's address to pass an ipBlocks rule."""
        if request.forwarded_for is not None:
            claimed = self.config.workload_by_ip(request.forwarded_for[0])
            if claimed is not None and claimed.identity == tunnel.peer_identity.uri:
                return request.forwarded_for
        return tunnel.peer_address

    def _source_workload(self, ip: str, principal: str | None) -> Workload | None:
        w = self.config.workload_by_ip(ip)
        if w is None:
            return None
        if principal is not None and w.identity != principal:
            return None  # the address is not the authenticated caller's: do not attribute it
        return w

    async def _relay_inbound(
        self,
        served: ServedWorkload,
        downstream: ByteStream,
        app: TcpStream,
        attrs: ConnectionAttributes,
        labels: ConnectionLabels,
        client: tuple[str, int],
        started: float,
        principal: str | None,
        source_workload: Workload | None,
    ) -> None:
        tracked = self.tracker.add(
            TrackedConnection(
                "inbound",
                served.workload.uid,
                abort=lambda: (downstream.abort(), app.abort()),
                attributes=attrs,
            )
        )
        if self.metrics is not None:
            self.metrics.connection_opened(labels)
        counters = RelayCounters()
        try:
            await relay(downstream, app, counters)
        finally:
            self.tracker.remove(tracked)
            flag = FLAG_DENY if tracked.denied_by else FLAG_NONE
            self._report(
                labels,
                "inbound",
                client,
                (attrs.destination_ip, attrs.destination_port),
                flag,
                started,
                received=counters.a_to_b,
                sent=counters.b_to_a,
                opened=True,
                destination=served.workload,
                dst_identity=served.workload.identity,
                src_identity=principal,
                src_workload=source_workload,
                policy=tracked.denied_by,
                error=counters.error if not tracked.denied_by else "closed by a policy change",
            )

    # ---- plaintext inbound ---------------------------------------------------------------------
    async def _serve_plaintext(self, uid: str, client: TcpStream) -> None:
        served = self.workloads.get(uid)
        if served is None or self.draining:
            client.abort()
            return
        started = time.monotonic()
        destination = served.workload
        dst = original_destination(client.transport.get_extra_info("socket"))
        local = client.sockname
        if dst is None or (dst[0] == local[0] and dst[1] == local[1]):
            port = served.sockets.fallback_port
            if port is None:
                log.info("plaintext inbound: no original destination and no single containerPort, closing")
                client.abort()
                return
            dst = (local[0] if local[0] in destination.ips else destination.ips[0], port)
        source_ip, source_port = client.peername
        source_workload = self._source_workload(source_ip, None)
        labels = ConnectionLabels.build(
            reporter="destination",
            source=source_workload,
            source_principal=None,
            destination=destination,
            destination_principal=destination.identity,
            destination_service=None,
            connection_security_policy="none",
        )
        if dst[1] in PROXY_PORTS:
            client.abort()
            return
        mode = self.policy.peer_authentication_mode(destination, dst[1])
        if mode == "STRICT":
            client.abort()
            decision = Decision(False, None, "peer authentication is STRICT: plaintext is refused")
            mode_policy = getattr(self.policy, "peer_authentication_for", None)
            if callable(mode_policy):
                decision = Decision(False, mode_policy(destination, dst[1])[1], decision.reason)
            self._report_denied(labels, "inbound", (source_ip, source_port), dst, decision, started, source_workload)
            return
        attrs = ConnectionAttributes(
            source_principal=None,
            source_ip=source_ip,
            destination=destination,
            destination_ip=dst[0],
            destination_port=dst[1],
        )
        decision = self.policy.check_l4(attrs)
        if not decision.allowed:
            client.abort()
            self._report_denied(labels, "inbound", (source_ip, source_port), dst, decision, started, source_workload)
            return
        try:
            async with asyncio.timeout(self.options.connect_timeout):
                app = await served.sockets.connector.connect(dst, source=(source_ip, source_port))
        except (OSError, TimeoutError) as e:
            client.abort()
            self._report(
                labels,
                "inbound",
                (source_ip, source_port),
                dst,
                FLAG_UPSTREAM_FAILURE,
                started,
                error=str(e),
                count_open=True,
            )
            return
        await self._relay_inbound(
            served, client, app, attrs, labels, (source_ip, source_port), started, None, source_workload
        )

    # ---- reporting -----------------------------------------------------------------------------
    def _count_refusal(self, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.connection_refused(reason)

    def _report_inbound_refusal(
        self,
        tunnel: InboundTunnel,
        destination: Workload | None,
        service: Service | None,
        flag: str,
        reason: str,
        started: float,
    ) -> None:
        log.info("HBONE request refused", extra={"peer_identity": tunnel.peer_identity.uri, "reason": reason})
        target = tunnel.request.target if isinstance(tunnel.request, ConnectRequest) else None
        self.access_log.log_connection(
            direction="inbound",
            src_addr=_addr(*tunnel.peer_address),
            dst_addr=str(target) if target else "-",
            src_identity=tunnel.peer_identity.uri,
            dst_identity=destination.identity if destination else None,
            dst_workload=destination.ref if destination else None,
            response_flags=flag,
            duration=time.monotonic() - started,
            error=reason,
        )

    def _report_denied(
        self,
        labels: ConnectionLabels,
        direction: Any,
        client: tuple[str, int],
        dst: Any,
        decision: Decision,
        started: float,
        source_workload: Workload | None,
    ) -> None:
        dst_addr = dst if isinstance(dst, tuple) else (dst.ip, dst.port)
        self._report(
            labels,
            direction,
            client,
            dst_addr,
            FLAG_DENY,
            started,
            count_open=True,
            policy=decision.policy,
            error=decision.reason,
            src_identity=labels.source_principal if labels.source_principal != "unknown" else None,
            dst_identity=labels.destination_principal,
            src_workload=source_workload,
        )

    def _report(
        self,
        labels: ConnectionLabels,
        direction: Any,
        client: tuple[str, int],
        dst: tuple[str, int],
        flag: str,
        started: float,
        *,
        received: int = 0,
        sent: int = 0,
        opened: bool = False,
        count_open: bool = False,
        destination: Workload | None = None,
        service: Service | None = None,
        dst_identity: str | None = None,
        src_identity: str | None = None,
        src_workload: Workload | None = None,
        policy: str | None = None,
        error: str | None = None,
    ) -> None:
        """One connection ended (or was refused): metrics (opened if not yet) + one access log line."""
        if self.metrics is not None:
            if count_open and not opened:
                self.metrics.connection_opened(labels)
                opened = True
            if opened:
                self.metrics.connection_closed(labels, sent, received, flag)
        self.access_log.log_connection(
            direction=direction,
            src_addr=_addr(*client),
            dst_addr=_addr(*dst),
            src_identity=src_identity,
            dst_identity=dst_identity,
            src_workload=src_workload.ref if src_workload else None,
            dst_workload=destination.ref if destination else None,
            dst_service=service.hostname if service else None,
            sent_bytes=sent,
            received_bytes=received,
            duration=time.monotonic() - started,
            response_flags=flag,
            policy=policy,
            error=error,
        )

    # ---- lifetime ------------------------------------------------------------------------------
    async def drain(self, timeout: float | None = None) -> None:
        """Stop accepting, GOAWAY every HBONE connection, let open connections finish within the deadline,
        then close whatever is left."""
        timeout = self.options.drain_timeout if timeout is None else timeout
        if self.draining:
            await self.closed.wait()
            return
        self.draining = True
        log.info("draining", extra={"open_connections": len(self.tracker), "deadline_s": timeout})
        for served in self.workloads.values():
            for server in served.servers:
                server.close()
        self.hbone_server.drain()
        self.pool.drain()
        finished = await self.tracker.wait_empty(timeout)
        if not finished:
            log.warning("drain deadline passed, closing connections", extra={"open_connections": len(self.tracker)})
        await self.close()

    async def close(self) -> None:
        self.draining = True
        for uid in list(self.workloads):
            await self.remove_workload(uid)
        self.tracker.abort_all()
        self.hbone_server.abort()
        self.pool.close()
        tasks = [t for t in (*self.tasks, *self.hbone_server.tasks) if not t.done()]
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        self.closed.set()

    # ---- introspection -------------------------------------------------------------------------
    def config_dump(self) -> dict[str, Any]:
        cfg = self.config
        dump_certs = getattr(self.certs, "dump", None)
        return {
            "node": self.options.node,
            "generation": cfg.generation,
            "served_workloads": [
                {
                    "uid": s.workload.uid,
                    "name": s.workload.ref,
                    "identity": s.workload.identity,
                    "ips": list(s.workload.ips),
                }
                for s in self.workloads.values()
            ],
            "workloads": [
                {
                    "name": w.ref,
                    "node": w.node,
                    "ips": list(w.ips),
                    "identity": w.identity,
                    "enrolled": w.enrolled,
                    "ready": w.ready,
                }
                for w in cfg.workloads
            ],
            "services": [
                {
                    "name": s.ref,
                    "cluster_ips": list(s.cluster_ips),
                    "ports": [{"port": p.port, "target_port": p.target_port} for p in s.ports],
                    "endpoints": [w.ref for w in cfg.endpoints(s)],
                }
                for s in cfg.services
            ],
            "policies": [o.ref for o in cfg.policy_objects],
            "policy_errors": [str(e) for e in self.policy.errors],
            "certificates": dump_certs() if callable(dump_certs) else [],
            "pool": [repr(c) for c in self.pool.connections()],
            "open_connections": len(self.tracker),
        }


class LocalWorkloads:
    """Local mode: serve the enrolled pods of `node` from the config, binding `<podIP>:port` on loopback.

    `reconcile(config)` adds pods that appeared and removes pods that went away (or moved or left the
    mesh); a pod whose listeners or certificate cannot be set up now is retried on the next call.
    """

    def __init__(self, proxy: NodeProxy, factory: ListenerFactory) -> None:
        self.proxy = proxy
        self.factory = factory
        self.errors: dict[str, str] = {}
        self._lock = asyncio.Lock()

    def desired(self, config: ClusterConfig) -> Mapping[str, Workload]:
        return {w.uid: w for w in config.mesh_workloads_on_node(self.proxy.options.node)}

    async def reconcile(self, config: ClusterConfig) -> None:
        async with self._lock:
            desired = self.desired(config)
            for uid, served in list(self.proxy.workloads.items()):
                want = desired.get(uid)
                if want is None or want.ips != served.workload.ips or want.identity != served.workload.identity:
                    await self.proxy.remove_workload(uid)
            for uid, workload in desired.items():
                if uid in self.proxy.workloads:
                    continue
                try:
                    sockets = self.factory.sockets_for(workload)
                    await self.proxy.add_workload(workload, sockets)
                except Exception as e:  # one bad pod must not stop the others
                    if self.errors.get(uid) != str(e):
                        log.error("cannot serve workload %s: %s", workload.ref, e)
                    self.errors[uid] = str(e)
                else:
                    self.errors.pop(uid, None)
            for uid in list(self.errors):
                if uid not in desired:
                    del self.errors[uid]

    def pending(self, config: ClusterConfig) -> list[str]:
        return [w.ref for uid, w in self.desired(config).items() if uid not in self.proxy.workloads]


def readiness(proxy: NodeProxy, local: LocalWorkloads | None) -> Callable[[], tuple[bool, str]]:
    def check() -> tuple[bool, str]:
        if not proxy.config_loaded:
            return False, "config not loaded"
        if proxy.draining:
            return False, "draining"
        if local is not None:
            pending = local.pending(proxy.config)
            if pending:
                return False, f"no listeners/certificates yet for {', '.join(sorted(pending))}"
        ready_for = getattr(proxy.certs, "ready_for", None)
        if callable(ready_for):
            ids = {SpiffeId.parse(s.workload.identity) for s in proxy.workloads.values()}
            if not ready_for(ids):
                return False, "certificates not ready"
        return True, ""

    return check
