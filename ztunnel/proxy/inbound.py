"""Inbound: HBONE tunnels and plaintext connections to a served pod, authorized, then relayed to the app.

HBONE answers 400 (not a CONNECT, malformed authority, not a pod served here), 401 (authorization),
503 (the app cannot be reached) or 200. Plaintext obeys PeerAuthentication (STRICT refuses it).
Every open connection is tracked with its attributes so a policy change can re-check it.

A pod that uses a waypoint (a Service selecting it names one) is reached only through that waypoint: an HBONE
tunnel from any other identity gets 401 and plaintext is refused (reason `waypoint_bypass`), since neither
could be checked against the L7 rules. The waypoint's own tunnels are let through: it applied the pod's
policies in full, with the original client's identity (`waypoint_verdict`).
"""

from __future__ import annotations

import asyncio
import logging
import time

from ztunnel.config.model import ClusterConfig, Workload, normalize_ip
from ztunnel.hbone.protocol import (
    STATUS_BAD_REQUEST,
    STATUS_OK,
    STATUS_UNAUTHORIZED,
    STATUS_UNAVAILABLE,
    ConnectRequest,
    Rejection,
)
from ztunnel.hbone.server import InboundTunnel
from ztunnel.net.deadline import Deadline
from ztunnel.net.streams import ByteStream, TcpStream
from ztunnel.policy.decision import ConnectionAttributes, Decision
from ztunnel.proxy.labels import connection_labels
from ztunnel.proxy.listeners import original_destination
from ztunnel.proxy.report import (
    FLAG_BAD_REQUEST,
    FLAG_NO_ROUTE,
    FLAG_UPSTREAM_FAILURE,
    ConnectionReporter,
    format_addr,
)
from ztunnel.proxy.routing import PROXY_PORTS
from ztunnel.proxy.state import ProxyState, ServedWorkload
from ztunnel.proxy.tracking import TrackedConnection
from ztunnel.telemetry.metrics import ConnectionLabels

log = logging.getLogger("ztunnel.proxy")


def waypoint_verdict(config: ClusterConfig, destination: Workload, principal: str | None) -> Decision | None:
    """The decision for a connection to a pod that uses a waypoint, or None when it uses none (then L4
    policy decides). Its waypoint is let through: the waypoint applied every policy of the pod in full, with
    the original client's identity, which a check here with the waypoint's identity would get wrong (an ALLOW
    naming the client would refuse the waypoint). Anyone else, and plaintext, would skip the L7 rules:
    refused. A `use-waypoint` label naming no Gateway means no waypoint (see ClusterConfig)."""
    waypoints = config.workload_waypoints(destination)
    if not waypoints:
        return None
    names = ", ".join(w.ref for w in waypoints)
    which = "waypoint" if len(waypoints) == 1 else "waypoints"
    if any(w.identity == principal for w in waypoints):
        return Decision(True, None, f"from its {which} {names}, which applied the policies")
    caller = principal or "a plaintext client"
    return Decision(
        False,
        None,
        f"{destination.ref} uses {which} {names}: only its {which} may connect to it, not {caller} "
        "(dialling the pod address would skip the L7 rules)",
    )


class Inbound:
    """Serves HBONE tunnels and plaintext connections to the pods this proxy serves."""

    def __init__(self, state: ProxyState, report: ConnectionReporter) -> None:
        self.state = state
        self.report = report

    async def serve_tunnel(self, tunnel: InboundTunnel) -> None:
        stream = tunnel.stream
        started = time.monotonic()
        peer_identity = tunnel.peer_identity.uri
        request = tunnel.request
        if isinstance(request, Rejection):
            stream.respond(request.status)
            self.report.refusal("bad_request")
            self.report.inbound_refusal(tunnel, None, None, FLAG_BAD_REQUEST, request.reason, started)
            return
        assert isinstance(request, ConnectRequest)
        target = request.target
        uid = self.state.served_by_ip.get(target.ip)
        served = self.state.workloads.get(uid) if uid is not None else None
        if served is None:
            stream.respond(STATUS_BAD_REQUEST)
            self.report.refusal("not_local")
            self.report.inbound_refusal(
                tunnel, None, None, FLAG_NO_ROUTE, f"{target} is not a workload served by this proxy", started
            )
            return
        destination = served.workload
        ours = self._is_proxy_port(target.ip, target.port)
        if destination.identity != tunnel.local_identity.uri or ours:
            stream.respond(STATUS_BAD_REQUEST)
            self.report.refusal("not_local")
            why = (
                f"port {target.port} is a proxy port"
                if ours
                else f"{target} belongs to {destination.identity}, not to this listener's {tunnel.local_identity}"
            )
            self.report.inbound_refusal(tunnel, destination, None, FLAG_NO_ROUTE, why, started)
            return
        source_ip, source_port = self._claimed_source(request, tunnel, destination)
        attrs = ConnectionAttributes(
            source_principal=peer_identity,
            source_ip=source_ip,
            destination=destination,
            destination_ip=target.ip,
            destination_port=target.port,
        )
        # Metrics name the authenticated caller's pod: for the waypoint's tunnels that is the waypoint (its TCP
        # peer), while the address (policy, access log, the app's peer) is the original client it forwarded.
        source_workload = self._source_workload(source_ip, peer_identity) or self._source_workload(
            tunnel.peer_address[0], peer_identity
        )
        labels = self._labels(source_workload, peer_identity, destination, target.port)
        decision = waypoint_verdict(self.state.config, destination, peer_identity)
        if decision is None:
            decision = self.state.policy.check_l4(attrs)
        elif not decision.allowed:
            self.report.refusal("waypoint_bypass")
        if not decision.allowed:
            stream.respond(STATUS_UNAUTHORIZED)
            self.report.denied(
                labels,
                "inbound",
                (source_ip, source_port),
                target,
                decision,
                started,
                source_workload,
                traceparent=request.traceparent,
            )
            return
        if stream.done:  # reset by the peer before we got here (rapid reset): no dial for it
            return
        loop = tunnel.loop or asyncio.get_running_loop()
        stream.cancel_on_reset(asyncio.current_task(loop))  # and a reset during the dial cancels it
        try:
            async with Deadline.after(loop, self.state.options.connect_timeout):
                app = await served.sockets.connector.connect((target.ip, target.port), source=(source_ip, source_port))
        except (OSError, TimeoutError) as e:
            stream.respond(STATUS_UNAVAILABLE)
            self.report.connection(
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
                traceparent=request.traceparent,
            )
            return
        finally:
            stream.cancel_on_reset(None)
        stream.respond(STATUS_OK)
        await self._relay_inbound(
            served,
            stream,
            app,
            attrs,
            labels,
            (source_ip, source_port),
            started,
            peer_identity,
            source_workload,
            traceparent=request.traceparent,
        )

    def _is_proxy_port(self, ip: str, port: int) -> bool:
        """A tunnel or plaintext target that is one of the proxy's own ports: Istio's (whatever this proxy
        listens on) or a listener the flags moved (admin, metrics, readiness): never relayed to."""
        return port in PROXY_PORTS or self.state.is_proxy_address(ip, port)

    def _not_this_pod(self, destination: Workload, dst: tuple[str, int]) -> str | None:
        """Why a plaintext connection's original destination is not this pod's app, or None."""
        try:
            ip = normalize_ip(dst[0])
        except ValueError:
            return f"original destination {dst[0]!r} is not an IP address"
        if ip not in {normalize_ip(i) for i in destination.ips}:
            return f"original destination {format_addr(ip, dst[1])} is not an address of {destination.ref}"
        if self._is_proxy_port(dst[0], dst[1]):
            return f"original destination port {dst[1]} is a proxy port"
        return None

    def _claimed_source(
        self, request: ConnectRequest, tunnel: InboundTunnel, destination: Workload
    ) -> tuple[str, int]:
        """The client address for policy, telemetry and the app's peer: the `forwarded` address when it belongs
        to a pod with the caller's own (authenticated) identity, else the TCP peer. A workload cannot borrow
        another workload's address to pass an ipBlocks rule. The destination's own waypoint is a trusted proxy:
        its `forwarded` is the original client it checked (as Istio's ztunnel trusts its waypoint's header), so
        the app sees the client's address, not the waypoint's (DESIGN §4.6)."""
        forwarded = request.forwarded_for
        if forwarded is not None:
            caller = tunnel.peer_identity.uri
            claimed = self.state.config.workload_by_ip(forwarded[0])
            if claimed is not None and claimed.identity == caller:
                return forwarded
            if any(w.identity == caller for w in self.state.config.workload_waypoints(destination)):
                return forwarded
        return tunnel.peer_address

    def _labels(
        self, source: Workload | None, principal: str | None, destination: Workload, port: int
    ) -> ConnectionLabels:
        """The destination reporter's labels: mutual TLS for a caller with a principal (HBONE), none for plaintext."""
        return connection_labels(
            reporter="destination",
            source=source,
            source_principal=principal,
            destination=destination,
            destination_principal=destination.identity,
            destination_service=self.report.labels.inbound_service(self.state.config, destination, port),
            connection_security_policy="mutual_tls" if principal is not None else "none",
            cache=self.report.labels,
        )

    def _source_workload(self, ip: str, principal: str | None) -> Workload | None:
        w = self.state.config.workload_by_ip(ip)
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
        traceparent: str | None = None,
    ) -> None:
        tracked = TrackedConnection("inbound", served.workload.uid, downstream, app, labels, attributes=attrs)
        try:
            await self.state.tracker.relay(tracked, self.report.metrics)
        finally:
            self.report.relayed(
                tracked,
                client,
                (attrs.destination_ip, attrs.destination_port),
                started,
                destination=served.workload,
                dst_identity=served.workload.identity,
                src_identity=principal,
                src_workload=source_workload,
                traceparent=traceparent,
            )

    async def serve_plaintext(self, uid: str, client: TcpStream) -> None:
        served = self.state.workloads.get(uid)
        if served is None or self.state.draining:
            client.abort()
            return
        started = time.monotonic()
        destination = served.workload
        sock = client.transport.get_extra_info("socket")
        dst = original_destination(sock) or served.sockets.inbound_destination(sock)
        local = client.sockname
        if dst is None or (dst[0] == local[0] and dst[1] == local[1] and not served.sockets.preserves_destination):
            port = served.sockets.fallback_port
            if port is None:
                log.info("plaintext inbound: no original destination and no single containerPort, closing")
                client.abort()
                return
            dst = (local[0] if local[0] in destination.ips else destination.ips[0], port)
        source_ip, source_port = client.peername
        source_workload = self._source_workload(source_ip, None)
        labels = self._labels(source_workload, None, destination, dst[1])
        why_not = self._not_this_pod(destination, dst)
        if why_not is not None:
            # Redirected traffic that was not addressed to this pod (or aims at a proxy port): connecting
            # to it would make the proxy an open relay from inside the pod.
            client.abort()
            self.report.refusal("not_local")
            self.report.connection(
                labels,
                "inbound",
                (source_ip, source_port),
                dst,
                FLAG_NO_ROUTE,
                started,
                count_open=True,
                destination=destination,
                dst_identity=destination.identity,
                src_workload=source_workload,
                error=why_not,
            )
            return
        bypass = waypoint_verdict(self.state.config, destination, None)
        if bypass is not None:  # plaintext is never the waypoint: refused
            client.abort()
            self.report.refusal("waypoint_bypass")
            self.report.denied(labels, "inbound", (source_ip, source_port), dst, bypass, started, source_workload)
            return
        mode = self.state.policy.peer_authentication_mode(destination, dst[1])
        if mode == "STRICT":
            client.abort()
            decision = Decision(False, None, "peer authentication is STRICT: plaintext is refused")
            mode_policy = getattr(self.state.policy, "peer_authentication_for", None)
            if callable(mode_policy):
                decision = Decision(False, mode_policy(destination, dst[1])[1], decision.reason)
            self.report.denied(labels, "inbound", (source_ip, source_port), dst, decision, started, source_workload)
            return
        attrs = ConnectionAttributes(
            source_principal=None,
            source_ip=source_ip,
            destination=destination,
            destination_ip=dst[0],
            destination_port=dst[1],
        )
        decision = self.state.policy.check_l4(attrs)
        if not decision.allowed:
            client.abort()
            self.report.denied(labels, "inbound", (source_ip, source_port), dst, decision, started, source_workload)
            return
        try:
            async with Deadline.after(client.protocol.loop, self.state.options.connect_timeout):
                app = await served.sockets.connector.connect(dst, source=(source_ip, source_port))
        except (OSError, TimeoutError) as e:
            client.abort()
            self.report.connection(
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
