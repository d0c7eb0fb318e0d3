"""The waypoint's data path: HBONE in, one decision per HTTP/1.1 request, HBONE out.

A source node proxy opens HBONE to the waypoint for a Service that uses it: the CONNECT authority is the
Service VIP:port the client dialled, and the peer certificate is the ORIGINAL client's SVID (node proxies
present the workload's certificate). Each tunnel carries one client connection, parsed by `Http1Connection`
(sans-IO). Per request: pick a ready endpoint of the Service (`EndpointPicker`, round robin; the endpoint of
the previous request on the same connection is kept while it stays ready, so its upstream stream is reused),
then decide (`RequestDecider`: RequestAuthentication, then `check_l7` for that endpoint), then either answer
locally (403 `RBAC: access denied`, 401 for a present but invalid JWT) or forward over one HBONE stream to the
endpoint's node proxy, opened with the waypoint's own identity. Bodies stream both ways with the streams'
flow control as backpressure; nothing is buffered whole.

The two pure parts (`EndpointPicker`, `RequestDecider`) hold every decision; `WaypointServer` is the asyncio
edge that moves bytes between the HBONE streams and the HTTP connection.

CUSTOM (ext-authz) policies: when a CUSTOM policy's rules match, `decide` leaves the verdict pending on its
provider (`Verdict.custom`); the connection asks the provider (extauthz.Authorizers) and `after_ext_authz`
applies the answer before the engine's DENY/ALLOW, as Envoy's ext_authz filter runs before its RBAC filter.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ztunnel.config.model import ClusterConfig, Service, Workload
from ztunnel.hbone.client import HbonePool, PoolKey
from ztunnel.hbone.protocol import (
    STATUS_BAD_REQUEST,
    STATUS_OK,
    Authority,
    ConnectRequest,
    HboneError,
    Rejection,
)
from ztunnel.hbone.server import InboundTunnel
from ztunnel.hbone.stream import HboneStream
from ztunnel.identity.spiffe import SpiffeId
from ztunnel.net.streams import StreamClosed
from ztunnel.policy.decision import ConnectionAttributes, Decision, HttpRequestAttributes
from ztunnel.policy.engine import PolicyEngine
from ztunnel.ports import HBONE_PORT
from ztunnel.waypoint.extauthz import Authorizers, AuthzVerdict, CheckAttributes
from ztunnel.waypoint.http1 import (
    CLOSED,
    DENIED_BODY,
    NEED_DATA,
    PAUSED,
    Http1Connection,
    RequestData,
    RequestEnded,
    RequestHead,
    RequestReceived,
    ResponseData,
    ResponseEnded,
    ResponseReceived,
    TunnelOpened,
)
from ztunnel.waypoint.jwt import (
    Authenticated,
    JwtRule,
    KeyLookup,
    Rejected,
    RequestTokens,
    authenticate,
    header_edits,
)
from ztunnel.waypoint.telemetry import Outcome, RequestTelemetry

log = logging.getLogger("ztunnel.waypoint")

READ_CHUNK = 64 * 1024
JWT_FAILED_BODY = b"Jwt verification fails"  # Envoy's jwt_authn answer to a present but invalid token
NO_UPSTREAM_BODY = b"no healthy upstream"  # Envoy's answer when a cluster has no ready endpoint
UPSTREAM_FAILED_BODY = b"upstream connect error"
CLOSE_WAIT = 5.0  # seconds a finished client stream waits for the peer's end before it is reset


# ---------------------------------------------------------------------------------------------------
# Where a request goes (pure)
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Endpoint:
    """One ready endpoint of the Service, as the waypoint dials it."""

    workload: Workload
    service: Service
    target: Authority  # the CONNECT authority: pod IP and target port
    proxy_address: tuple[str, int]  # the endpoint's node proxy HBONE listener (local mode: <pod ip>:15008)
    expected_identities: tuple[str, ...]


class EndpointPicker:
    """Chooses the endpoint for each request; holds only the round-robin cursors (per Service)."""

    def __init__(self, *, hbone_port: int = HBONE_PORT) -> None:
        self.hbone_port = hbone_port
        self._cursor: dict[str, int] = {}

    def endpoints(self, config: ClusterConfig, service: Service, port: int) -> list[Endpoint]:
        service_port = service.port_for(port)
        if service_port is None:
            return []
        out = []
        for w in config.endpoints(service):
            if not w.ready or not w.ips or not w.enrolled:
                continue
            target = w.target_port(service_port.target_port)
            if target is None:
                continue
            ip = w.ips[0]
            out.append(
                Endpoint(w, service, Authority(ip, target), (ip, self.hbone_port), config.expected_identities(w))
            )
        return out

    def pick(self, config: ClusterConfig, authority: Authority, current: Endpoint | None = None) -> Endpoint | str:
        """The endpoint for a request to `authority` (the Service VIP:port), or why there is none.

        `current` (the endpoint of the previous request on the client connection) is kept while it is still a
        ready endpoint for this port, so the upstream stream is reused; otherwise round robin."""
        service = config.service_by_ip(authority.ip)
        if service is None:
            return f"{authority.ip} is not a Service address"
        if service.port_for(authority.port) is None:
            return f"service {service.ref} has no port {authority.port}"
        candidates = self.endpoints(config, service, authority.port)
        if not candidates:
            return f"service {service.ref} has no ready mesh endpoint for port {authority.port}"
        if current is not None:
            for e in candidates:
                if e.workload.uid == current.workload.uid and e.target == current.target:
                    return e
        i = self._cursor.get(service.ref, 0)
        self._cursor[service.ref] = i + 1
        return candidates[i % len(candidates)]


# ---------------------------------------------------------------------------------------------------
# What is done with a request (pure)
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Verdict:
    allowed: bool
    status: int  # the local answer's status when not allowed
    body: bytes
    reason: str
    policy: str | None = None
    add_headers: tuple[tuple[bytes, bytes], ...] = ()  # upstream, after an allow (JWT outputs)
    remove_headers: frozenset[bytes] = frozenset()  # upstream, lowercase names
    custom: Decision | None = None  # pending on the CUSTOM policy's provider (see `after_ext_authz`)
    response_headers: tuple[tuple[bytes, bytes], ...] = ()  # to the client with a local answer
    denied_by: str = "rbac"  # when not allowed: "rbac", "jwt" or "ext_authz" (counted and logged as the reason)


def _text(value: bytes) -> str:
    return value.decode("latin-1")


class RequestDecider:
    """One request's verdict: RequestAuthentication of the destination workload, then `check_l7`.

    `keys` looks up a rule's key set (jwt.KeyStore over the JWKS refresher); `clock` gives wall-clock seconds
    for `exp`/`nbf`. Nothing here does I/O."""

    def __init__(self, engine: PolicyEngine, keys: KeyLookup, clock: Callable[[], float] = time.time) -> None:
        self.engine = engine
        self.keys = keys
        self.clock = clock
        self._rules: dict[str, tuple[JwtRule, ...]] = {}  # workload uid -> its JWT rules (engine is per snapshot)

    def jwt_rules(self, workload: Workload) -> tuple[JwtRule, ...]:
        rules = self._rules.get(workload.uid)
        if rules is None:
            rules = self._rules[workload.uid] = tuple(
                JwtRule.from_policy(r) for ra in self.engine.request_authentications_for(workload) for r in ra.jwt_rules
            )
        return rules

    def decide(self, head: RequestHead, conn: ConnectionAttributes) -> Verdict:
        headers = [(_text(k).lower(), _text(v)) for k, v in head.headers]
        rules = self.jwt_rules(conn.destination)
        principal: str | None = None
        claims: dict[str, Any] = {}
        audiences: tuple[str, ...] | None = None
        presenter: str | None = None
        add: tuple[tuple[bytes, bytes], ...] = ()
        remove: frozenset[bytes] = frozenset()
        if rules:
            _, _, query = head.target.partition(b"?")
            outcome = authenticate(RequestTokens(headers, _text(query)), rules, self.keys, self.clock())
            if isinstance(outcome, Rejected):
                return Verdict(False, outcome.status, JWT_FAILED_BODY, outcome.message(), denied_by="jwt")
            if isinstance(outcome, Authenticated):
                principal, claims = outcome.principal, dict(outcome.claims)
                audiences, presenter = outcome.audiences, outcome.presenter
            edits = header_edits(rules, outcome)
            remove = frozenset(n.encode("latin-1") for n in edits.remove)
            add = tuple((k.encode("latin-1"), v.encode("latin-1")) for k, v in edits.set)
        joined: dict[str, str] = {}
        for k, v in headers:
            joined[k] = f"{joined[k]},{v}" if k in joined else v
        request = HttpRequestAttributes(
            method=_text(head.method),
            path=_text(head.path),
            host=_text(head.host),
            headers=joined,
            request_principal=principal,
            request_claims=claims,
            request_audiences=audiences,
            request_presenter=presenter,
        )
        decision = self.engine.check_l7(conn, request)
        if decision.custom_policies:  # its provider is asked first (`after_ext_authz`)
            reason = f"CUSTOM policy {decision.custom_policies[0]}: waiting for its provider"
            return Verdict(False, 403, DENIED_BODY, reason, decision.custom_policies[0], add, remove, decision)
        if not decision.allowed:
            return Verdict(False, 403, DENIED_BODY, decision.reason, decision.policy)
        return Verdict(True, 200, b"", decision.reason, decision.policy, add, remove)


def after_ext_authz(verdict: Verdict, answer: AuthzVerdict) -> Verdict:
    """A pending verdict once its CUSTOM provider answered: its deny is the client's answer as the provider
    gave it; its allow leaves the engine's DENY/ALLOW decision, with the provider's headers added upstream."""
    decision = verdict.custom
    assert decision is not None
    if not answer.allowed:
        status, body, reason = answer.status, answer.body, answer.reason
        return Verdict(
            False, status, body, reason, verdict.policy, response_headers=answer.headers, denied_by="ext_authz"
        )
    decision = decision.after_custom(True)
    if not decision.allowed:
        return Verdict(False, 403, DENIED_BODY, decision.reason, decision.policy)
    add = verdict.add_headers + answer.headers
    removed = verdict.remove_headers | answer.remove_headers | {k for k, _ in answer.headers}
    return Verdict(True, 200, b"", f"{answer.reason}; {decision.reason}", decision.policy, add, frozenset(removed))


def check_attributes(head: RequestHead, conn: ConnectionAttributes, source_port: int) -> CheckAttributes:
    """What a CUSTOM provider is told about the request (Envoy's AttributeContext)."""
    joined: dict[str, str] = {}
    for k, v in head.headers:
        name, value = _text(k).lower(), _text(v)
        joined[name] = f"{joined[name]},{value}" if name in joined else value
    return CheckAttributes(
        source_ip=conn.source_ip,
        source_port=source_port,
        source_principal=conn.source_principal or "",
        destination_ip=conn.destination_ip,
        destination_port=conn.destination_port,
        destination_principal=conn.destination.identity,
        method=_text(head.method),
        path=_text(head.target),
        host=_text(head.host),
        headers=tuple(joined.items()),
        protocol="HTTP/1.0" if head.version == b"1.0" else "HTTP/1.1",
    )


# ---------------------------------------------------------------------------------------------------
# The asyncio edge
# ---------------------------------------------------------------------------------------------------
@dataclass
class WaypointState:
    """One config snapshot and what is derived from it (replaced whole on reload)."""

    config: ClusterConfig
    decider: RequestDecider


@dataclass
class _Upstream:
    endpoint: Endpoint
    stream: HboneStream

    @property
    def reusable(self) -> bool:
        s = self.stream
        return not (s.done or s.remote_closed or s.local_closed)


@dataclass
class WaypointServer:
    """Serves the waypoint's inbound tunnels: `serve_tunnel` is the HboneServer's handler."""

    identity: SpiffeId  # the waypoint's own SVID, presented to destination node proxies
    pool: HbonePool
    state: WaypointState
    picker: EndpointPicker = field(default_factory=EndpointPicker)
    requests: dict[str, int] = field(default_factory=dict)  # verdict -> count (allow, deny, jwt, error)
    authorizers: Authorizers = field(default_factory=Authorizers)  # CUSTOM policies' providers
    telemetry: RequestTelemetry | None = None  # Istio's HTTP metrics and the access log, per request

    def _count(self, what: str) -> None:
        self.requests[what] = self.requests.get(what, 0) + 1

    async def serve_tunnel(self, tunnel: InboundTunnel) -> None:
        stream, request = tunnel.stream, tunnel.request
        if isinstance(request, Rejection):
            stream.respond(request.status)
            return
        assert isinstance(request, ConnectRequest)
        target = request.target
        service = self.state.config.service_by_ip(target.ip)
        if service is None or service.port_for(target.port) is None:
            log.info(
                "waypoint tunnel refused: not a Service address and port",
                extra={"target": str(target), "peer_identity": tunnel.peer_identity.uri},
            )
            stream.respond(STATUS_BAD_REQUEST)
            return
        stream.respond(STATUS_OK)
        await _ClientConnection(self, tunnel, request).run()


def source_ip(
    config: ClusterConfig, forwarded_for: tuple[str, int] | None, peer_identity: str, peer_address: tuple[str, int]
) -> str:
    """The client address for policy, as the node proxy trusts it: the `forwarded` address when it belongs to a
    pod with the caller's own (authenticated) identity, else the TCP peer (a caller cannot borrow another
    workload's address to pass a `remoteIpBlocks`/`ipBlocks` rule)."""
    if forwarded_for is not None:
        claimed = config.workload_by_ip(forwarded_for[0])
        if claimed is not None and claimed.identity == peer_identity:
            return forwarded_for[0]
    return peer_address[0]


class _ClientConnection:
    """One client connection (one inbound tunnel) and at most one upstream stream at a time."""

    def __init__(self, server: WaypointServer, tunnel: InboundTunnel, request: ConnectRequest) -> None:
        self.server = server
        self.tunnel = tunnel
        self.client = tunnel.stream
        self.target = request.target
        self.request = request
        self.principal = tunnel.peer_identity.uri
        self.http = Http1Connection()
        self.upstream: _Upstream | None = None
        self.outcome = Outcome(0.0)  # the current request's, for its telemetry

    async def run(self) -> None:
        http = self.http
        try:
            while True:
                ev = http.next_request_event()
                if ev is NEED_DATA:
                    http.receive_data(await self._read_client())
                elif isinstance(ev, RequestReceived):
                    if not await self._recorded(ev.head):
                        break
                else:  # CLOSED, RequestRejected (its answer is queued), PAUSED (nothing left to do)
                    break
            await self._to_client(http.data_to_client())
            await self._finish_client()
        except (StreamClosed, HboneError, ConnectionError):
            self.client.abort()
        finally:
            if self.upstream is not None:
                self.upstream.stream.close()
                self.upstream = None

    async def _read_client(self) -> bytes:
        try:
            return await self.client.read(READ_CHUNK)
        except StreamClosed:
            return b""

    async def _to_client(self, data: bytes) -> None:
        if data:
            await self.client.write(data)

    async def _finish_client(self) -> None:
        """Our side is done: end it, and give the peer a moment to end its side before the stream is reset."""
        await self.client.write_eof()
        with contextlib.suppress(StreamClosed, TimeoutError):
            async with asyncio.timeout(CLOSE_WAIT):
                while await self.client.read(READ_CHUNK):
                    pass
        self.client.close()

    async def _recorded(self, head: RequestHead) -> bool:
        """`_request`, and its metrics and access log line once it is over (however it ends)."""
        telemetry = self.server.telemetry
        config = self.server.state.config
        self.outcome = outcome = Outcome(time.monotonic(), service=config.service_by_ip(self.target.ip))
        outcome.tunnel_status = 200 if head.is_connect else 101
        try:
            return await self._request(head)
        finally:
            if telemetry is not None:
                telemetry.record(
                    config,
                    principal=self.principal,
                    source_ip=source_ip(config, self.request.forwarded_for, self.principal, self.tunnel.peer_address),
                    source_addr=f"{self.tunnel.peer_address[0]}:{self.tunnel.peer_address[1]}",
                    method=head.method,
                    path=head.path,
                    content_type=head.header(b"content-type"),
                    outcome=outcome,
                )

    async def _request(self, head: RequestHead) -> bool:
        """Decide and serve one request; False when the client connection is over."""
        server, http = self.server, self.http
        state = server.state
        current = self.upstream.endpoint if self.upstream is not None else None
        endpoint = server.picker.pick(state.config, self.target, current)
        if isinstance(endpoint, str):
            server._count("no_endpoint")
            self.outcome.status, self.outcome.reason = 503, "no_endpoint"
            self.outcome.response_bytes = len(NO_UPSTREAM_BODY)
            log.info("request refused: %s", endpoint, extra=self._fields(head))
            http.respond(503, NO_UPSTREAM_BODY)
            await self._to_client(http.data_to_client())
            return not http.closed
        self.outcome.destination, self.outcome.upstream = endpoint.workload, str(endpoint.target)
        attrs = ConnectionAttributes(
            source_principal=self.principal,
            source_ip=source_ip(state.config, self.request.forwarded_for, self.principal, self.tunnel.peer_address),
            destination=endpoint.workload,
            destination_ip=endpoint.target.ip,
            destination_port=endpoint.target.port,
        )
        verdict = state.decider.decide(head, attrs)
        if verdict.custom is not None:
            verdict = await self._ext_authz(head, attrs, verdict)
        if not verdict.allowed:
            server._count("jwt" if verdict.denied_by == "jwt" else "deny")
            self._denied(verdict)
            log.info(
                "request denied: %s",
                verdict.reason,
                extra={**self._fields(head), "status": verdict.status, "policy": verdict.policy},
            )
            content_type = next((v for k, v in verdict.response_headers if k == b"content-type"), b"text/plain")
            extra = tuple((k, v) for k, v in verdict.response_headers if k != b"content-type")
            http.respond(verdict.status, verdict.body, content_type=content_type, headers=extra)
            await self._to_client(http.data_to_client())
            return not http.closed
        upstream = self.upstream
        if upstream is not None and (upstream.endpoint != endpoint or not upstream.reusable):
            upstream.stream.close()
            upstream = self.upstream = None
        if upstream is None:
            try:
                stream = await server.pool.connect(
                    PoolKey(server.identity, SpiffeId.parse(endpoint.workload.identity), endpoint.proxy_address),
                    endpoint.target,
                    expected_identities=endpoint.expected_identities,
                    traceparent=self.request.traceparent,
                )
            except HboneError as e:
                server._count("upstream_error")
                self.outcome.status, self.outcome.reason = 503, "upstream_error"
                self.outcome.response_bytes = len(UPSTREAM_FAILED_BODY)
                log.warning(
                    "upstream tunnel failed: %s", e, extra={**self._fields(head), "endpoint": str(endpoint.target)}
                )
                http.respond(503, UPSTREAM_FAILED_BODY)
                await self._to_client(http.data_to_client())
                return not http.closed
            upstream = self.upstream = _Upstream(endpoint, stream)
        server._count("allow")
        self.outcome.policy = verdict.policy
        log.debug("request allowed", extra={**self._fields(head), "policy": verdict.policy})
        http.allow(verdict.add_headers, remove=verdict.remove_headers)
        await self._to_client(http.data_to_client())  # 100 Continue, when asked for
        await upstream.stream.write(http.data_to_upstream())
        body = asyncio.get_running_loop().create_task(self._pump_request(upstream.stream))
        try:
            keep = await self._pump_response(upstream.stream)
            if keep:
                await body
        finally:
            if not body.done():
                body.cancel()
            with contextlib.suppress(asyncio.CancelledError, StreamClosed, HboneError, ConnectionError):
                await body  # also retrieves the error of a body pump that failed while the response ended
        if not keep:
            upstream.stream.close()
            self.upstream = None
        return keep

    async def _ext_authz(self, head: RequestHead, attrs: ConnectionAttributes, verdict: Verdict) -> Verdict:
        """Ask the CUSTOM policy's provider (one per workload, as Istio allows) and apply its answer."""
        assert verdict.custom is not None
        config = self.server.state.config
        names = verdict.custom.custom_providers
        provider = config.extension_providers.get(names[0]) if len(names) == 1 else None
        if provider is None:
            why = "more than one provider" if len(names) > 1 else f"no extension provider {names[0]!r} in mesh config"
            reason = f"CUSTOM policy {verdict.policy}: {why} (fail closed)"
            return Verdict(False, 403, DENIED_BODY, reason, verdict.policy, denied_by="ext_authz")
        forwarded = self.request.forwarded_for
        port = forwarded[1] if forwarded and forwarded[0] == attrs.source_ip else self.tunnel.peer_address[1]
        answer = await self.server.authorizers.check(config, provider, check_attributes(head, attrs, port))
        return after_ext_authz(verdict, answer)

    async def _pump_request(self, up: HboneStream) -> None:
        """The allowed request's body, client -> upstream, one read at a time (each write waits for window)."""
        http = self.http
        while True:
            ev = http.next_request_event()
            if ev is NEED_DATA:
                http.receive_data(await self._read_client())
                continue
            if isinstance(ev, RequestData):
                self.outcome.request_bytes += len(ev.data)
            if isinstance(ev, (RequestData, RequestEnded)):
                data = http.data_to_upstream()
                if data:
                    await up.write(data)
                if isinstance(ev, RequestEnded):
                    return
                continue
            if ev is CLOSED:  # the client gave up mid-body: the upstream must not take a truncated request
                up.abort()
            return  # PAUSED: no body (or its decision is made)

    async def _pump_response(self, up: HboneStream) -> bool:
        """The response, upstream -> client; True when the client connection goes on to its next request."""
        http = self.http
        while True:
            ev = http.next_response_event()
            await self._to_client(http.data_to_client())
            if ev is NEED_DATA:
                try:
                    data = await up.read(READ_CHUNK)
                except StreamClosed:
                    data = b""
                http.receive_upstream_data(data)
            elif isinstance(ev, ResponseData):
                self.outcome.response_bytes += len(ev.data)
            elif isinstance(ev, ResponseReceived):
                self._response_head(ev)
            elif isinstance(ev, ResponseEnded):
                return ev.keep_alive
            elif isinstance(ev, TunnelOpened):
                self.outcome.status = self.outcome.status or self.outcome.tunnel_status
                await self._to_client(http.data_to_client())
                pending = http.data_to_upstream()
                if pending:
                    await up.write(pending)
                await asyncio.gather(_copy(self.client, up), _copy(up, self.client))
                return False
            elif ev is CLOSED or ev is PAUSED:  # PAUSED cannot happen mid-response: end the connection
                return False
            # ResponseReceived / ResponseData: their bytes went to the client above

    def _denied(self, verdict: Verdict) -> None:
        o = self.outcome
        o.status, o.policy, o.response_bytes = verdict.status, verdict.policy, len(verdict.body)
        o.reason = verdict.denied_by
        o.upstream = None  # answered here, not forwarded

    def _response_head(self, ev: ResponseReceived) -> None:
        self.outcome.status = ev.status
        for name, value in ev.headers:
            if name.lower() == b"grpc-status":  # a trailers-only gRPC answer; HTTP/1.1 trailers are not read
                self.outcome.grpc_status = value.decode("latin-1").strip()

    def _fields(self, head: RequestHead) -> dict[str, object]:
        return {
            "method": _text(head.method),
            "path": _text(head.path),
            "authority": str(self.target),
            "peer_identity": self.principal,
        }


async def _copy(src: HboneStream, dst: HboneStream) -> None:
    """Raw bytes after an Upgrade or CONNECT was allowed and accepted; EOF is passed on as a half-close."""
    try:
        while data := await src.read(READ_CHUNK):
            await dst.write(data)
        await dst.write_eof()
    except StreamClosed:
        dst.abort()
