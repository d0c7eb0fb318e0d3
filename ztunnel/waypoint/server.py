"""The waypoint's data path: HBONE in, one decision per HTTP request (HTTP/1.1 or h2c), HBONE out; TCP relayed.

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

Protocols (Istio's protocol selection): a Service port's `appProtocol`, else its name's `<protocol>[-suffix]`, says
TCP (`tcp`, `tls`, ...: the engine's L4 check with the client's identity, then bytes relayed both ways) or HTTP;
when it says nothing, the first bytes decide (`classify`, at most SNIFF_LIMIT bytes or SNIFF_TIMEOUT): an HTTP/1.x
request line is `Http1Connection`'s, the HTTP/2 preface `_H2ClientConnection`'s (each stream decided as a request
of its own, sent upstream as h2c for gRPC and ports declared http2/grpc, as HTTP/1.1 otherwise), anything else
TCP. A bodiless idempotent request whose kept-alive upstream ends before any response byte is sent once more.

Timeouts (`Timeouts`): a client connection with no request in flight is closed after the idle timeout (h2c: with
a GOAWAY); a request head not whole within the request-headers timeout of its first byte ends the connection
(HTTP/1.1: 408; h2c: GOAWAY); with a response timeout, an upstream whose response head is late is cut and the
client answered 504. HTTP/1.1 reads carry a timeout only while waiting for a head; h2c arms one timer per
transition (no open stream, a header block arriving), not per read.

CUSTOM (ext-authz) policies: when a CUSTOM policy's rules match, `decide` leaves the verdict pending on its
provider (`Verdict.custom`); the connection asks the provider (extauthz.Authorizers) and `after_ext_authz`
applies the answer before the engine's DENY/ALLOW, as Envoy's ext_authz filter runs before its RBAC filter.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import h2.exceptions
from h2.errors import ErrorCodes

from ztunnel.config.model import ClusterConfig, Service, ServicePort, Workload
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
from ztunnel.telemetry.metrics import ConnectionLabels
from ztunnel.waypoint.extauthz import Authorizers, AuthzVerdict, CheckAttributes
from ztunnel.waypoint.http1 import _HOP_BY_HOP as _H1_HOP_BY_HOP
from ztunnel.waypoint.http1 import (
    CLOSED,
    DENIED_BODY,
    NEED_DATA,
    Http1Connection,
    Limits,
    RequestData,
    RequestEnded,
    RequestHead,
    RequestReceived,
    RequestRejected,
    ResponseData,
    ResponseEnded,
    ResponseReceived,
    TunnelOpened,
)
from ztunnel.waypoint.http1 import _tokens as _connection_tokens
from ztunnel.waypoint.http2 import (
    H2C_PREFACE_LINE,
    HOP_BY_HOP,
    BadRequest,
    H2Conn,
    H2Limits,
    RequestStarted,
    ResponseStarted,
    Trailers,
    WindowOpened,
    is_grpc,
)
from ztunnel.waypoint.http2 import Closed as H2Closed
from ztunnel.waypoint.http2 import Data as H2Data
from ztunnel.waypoint.http2 import Ended as H2Ended
from ztunnel.waypoint.http2 import Event as H2Event
from ztunnel.waypoint.http2 import Reset as H2Reset
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
TIMEOUT_BODY = b"request timeout"  # 408: the request head did not arrive in time (Envoy's words)
UPSTREAM_TIMEOUT_BODY = b"upstream request timeout"  # 504: Envoy's answer when its route timeout fires
_HEAD_TIMED_OUT = (
    b"HTTP/1.1 408 Request Timeout\r\ncontent-length: %d\r\ncontent-type: text/plain\r\nconnection: close\r\n\r\n%s"
    % (len(TIMEOUT_BODY), TIMEOUT_BODY)
)
_UPSTREAM_TIMED_OUT = (
    b"HTTP/1.1 504 Gateway Timeout\r\ncontent-length: %d\r\ncontent-type: text/plain\r\nconnection: close\r\n\r\n%s"
    % (len(UPSTREAM_TIMEOUT_BODY), UPSTREAM_TIMEOUT_BODY)
)


@dataclass(frozen=True, slots=True)
class Timeouts:
    """The waypoint's HTTP timeouts (`ztunnel waypoint --idle-timeout ...`); None turns one off.

    Envoy's as reference: its HTTP idle_timeout is 1 h; request_headers_timeout and the route timeout are off
    by default (Istio sets no route timeout). Here the head timeout is on (10 s: a slowloris client that sends
    its head a byte at a time holds a connection 10 s, not forever) and the response timeout is opt-in."""

    idle: float | None = 3600.0  # a client connection with no request in flight (h2c: no open stream): closed
    request_headers: float | None = 10.0  # from a request head's first byte to its end: 408 (h2c: GOAWAY), closed
    response: float | None = None  # from the request forwarded to the upstream's response head: 504


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
    """Chooses the endpoint for each request; holds the round-robin cursors (per Service) and the endpoint lists
    of the current config snapshot (per Service and port: a snapshot is immutable, a reload replaces it)."""

    def __init__(self, *, hbone_port: int = HBONE_PORT) -> None:
        self.hbone_port = hbone_port
        self._cursor: dict[str, int] = {}
        self._config: ClusterConfig | None = None
        self._endpoints: dict[tuple[str, int], tuple[Service, list[Endpoint]]] = {}

    def endpoints(self, config: ClusterConfig, service: Service, port: int) -> list[Endpoint]:
        """The ready mesh endpoints of `service` for `port` (the same list while the snapshot lasts: not to be
        changed by the caller)."""
        if config is not self._config:
            self._config = config
            self._endpoints = {}
        key = (service.ref, port)
        hit = self._endpoints.get(key)
        if hit is not None and hit[0] is service:
            return hit[1]
        out = self._build(config, service, port)
        self._endpoints[key] = (service, out)
        return out

    def _build(self, config: ClusterConfig, service: Service, port: int) -> list[Endpoint]:
        service_port = service.port_for(port)
        if service_port is None:
            return []
        out = []
        for w in config.endpoints(service):
            if not w.ready or not w.ips or not w.enrolled:
                continue
            target = config.endpoint_port(service, service_port, w)
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
        protocol={b"1.0": "HTTP/1.0", b"2": "HTTP/2"}.get(head.version, "HTTP/1.1"),
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


@dataclass(eq=False, slots=True)
class _TcpRelay:
    """An open TCP relay's byte counts for the metrics: `moved` is [from the client, to it], kept current by the
    copies; `flushed` is how much of each the periodic flush already added to the counters."""

    labels: ConnectionLabels
    moved: list[int] = field(default_factory=lambda: [0, 0])
    flushed: list[int] = field(default_factory=lambda: [0, 0])

    def take_unflushed(self) -> tuple[int, int]:
        """(sent to the client, received from it) since the last flush, marked flushed."""
        received, sent = self.moved
        delta = (sent - self.flushed[1], received - self.flushed[0])
        self.flushed[0], self.flushed[1] = received, sent
        return delta


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
    h2c_connections: set[_H2ClientConnection] = field(default_factory=set)  # told to drain on `drain`
    draining: bool = False
    timeouts: Timeouts = field(default_factory=Timeouts)
    tcp_relays: set[_TcpRelay] = field(default_factory=set)  # open TCP relays, for `flush_tcp_bytes`
    headers_with_underscores: str = "ALLOW"  # http1.Limits: ALLOW, REJECT_REQUEST or DROP_HEADER

    def flush_tcp_bytes(self) -> None:
        """Add the open TCP relays' bytes since the last flush to the byte counters (a long connection shows
        its traffic before it ends), one call per label set; the node proxy's periodic flush."""
        telemetry = self.telemetry
        if telemetry is None:
            return
        totals: dict[ConnectionLabels, list[int]] = {}
        for relay in self.tcp_relays:
            sent, received = relay.take_unflushed()
            if sent or received:
                total = totals.setdefault(relay.labels, [0, 0])
                total[0] += sent
                total[1] += received
        for labels, (sent, received) in totals.items():
            telemetry.tcp_bytes(labels, sent, received)

    def _count(self, what: str) -> None:
        self.requests[what] = self.requests.get(what, 0) + 1

    def drain(self) -> None:
        """Shutting down: h2c clients get a graceful GOAWAY (no new streams; open ones finish), as HBONE's
        clients get one from the HboneServer."""
        self.draining = True
        for c in list(self.h2c_connections):
            c.goaway()

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


def client_address(
    config: ClusterConfig, forwarded_for: tuple[str, int] | None, peer_identity: str, peer_address: tuple[str, int]
) -> tuple[str, int]:
    """The original client's address, as the node proxy trusts it: the `forwarded` address when it belongs to a
    pod with the caller's own (authenticated) identity, else the TCP peer (a caller cannot borrow another
    workload's address to pass a `remoteIpBlocks`/`ipBlocks` rule). The TCP peer is the client's node proxy,
    which dials from its node, so this is what policy, the access log and the app's node proxy are given."""
    if forwarded_for is not None:
        claimed = config.workload_by_ip(forwarded_for[0])
        if claimed is not None and claimed.identity == peer_identity:
            return forwarded_for
    return peer_address


def source_ip(
    config: ClusterConfig, forwarded_for: tuple[str, int] | None, peer_identity: str, peer_address: tuple[str, int]
) -> str:
    """The client address for policy (`source.ip`, `ipBlocks`, `remoteIpBlocks`): see `client_address`."""
    return client_address(config, forwarded_for, peer_identity, peer_address)[0]


# Protocol selection (Istio's: `appProtocol`, else the port name's prefix, else detection on the first bytes).
HTTP_PROTOCOLS = frozenset({"http", "http2", "grpc", "grpc-web"})
L4_PROTOCOLS = frozenset({"tcp", "tls", "https", "mongo", "mysql", "redis"})  # opaque at a waypoint
SNIFF_LIMIT = 4096  # bytes read before deciding (a request line longer than this is not one we detect)
SNIFF_TIMEOUT = 1.0  # seconds without a decisive byte after which a silent client's connection is TCP
_METHOD_CHARS = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ-_")


def classify(data: bytes, *, final: bool) -> str:
    """What the first bytes of a connection are: "h2c" (the HTTP/2 preface), "http1" (an HTTP/1.x request
    line: METHOD SP target SP HTTP/1.x), "tcp", or "more" (could still be either; only when not `final`).
    With `final`, a request line still incomplete counts as HTTP/1.1 when it has its method and a space."""
    data = data.lstrip(b"\r\n")  # empty lines before a request line are allowed (RFC 9112 §2.2)
    if not data:
        return "tcp" if final else "more"
    if data.startswith(H2C_PREFACE_LINE):
        return "h2c"
    if H2C_PREFACE_LINE.startswith(data) and not final:
        return "more"
    sp = data.find(b" ")
    method = data if sp < 0 else data[:sp]
    if not method or len(method) > 20 or not _METHOD_CHARS.issuperset(method):
        return "tcp"
    if sp < 0:
        return "tcp" if final else "more"
    eol = data.find(b"\n", sp)
    if eol < 0:
        if final:
            return "http1"
        return "more"
    line = data[:eol].rstrip(b"\r")
    _, _, version = line.rpartition(b" ")
    return "http1" if version.startswith(b"HTTP/1.") and line.count(b" ") >= 2 else "tcp"


class _ReadDeadline:
    """A client connection's read deadline (idle, request head) on one loop timer, re-armed only when it fires
    before the deadline (which keep-alive requests keep moving later) or when a deadline moves earlier: an
    `asyncio.timeout` per read armed and cancelled a timer for every request. Expiry cancels the reading task;
    `read` turns that cancellation (and only that one) into TimeoutError."""

    __slots__ = ("_handle", "_loop", "_task", "_when", "deadline", "expired")

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._task: asyncio.Task[Any] | None = None
        self._handle: asyncio.TimerHandle | None = None
        self._when = 0.0
        self.deadline: float | None = None  # loop time; None while no read waits
        self.expired = False

    async def read(self, read: Callable[[], Any], delay: float) -> bytes:
        """`await read()`, TimeoutError after `delay` seconds (what `start`, `timed_out` and `end` do around a read,
        which `_run_http1` writes out inline: no coroutine of its own per request)."""
        self.start(delay)
        try:
            data: bytes = await read()
            return data
        except asyncio.CancelledError:
            if self.timed_out():
                raise TimeoutError from None
            raise
        finally:
            self.deadline = None

    def start(self, delay: float) -> None:
        """A read begins that must end within `delay` seconds (then `end` it). Every read is from one task."""
        if self._task is None:
            self._task = asyncio.current_task()
        deadline = self._loop.time() + delay
        self.deadline = deadline
        handle = self._handle
        if handle is None or self._when > deadline:
            if handle is not None:
                handle.cancel()
            self._arm(deadline)

    def timed_out(self) -> bool:
        """The read was cancelled: True when by its deadline alone (then the cancellation is spent, and the read
        is a timeout), False when the cancellation is someone else's (to be re-raised)."""
        if not self.expired:
            return False
        self.expired = False
        assert self._task is not None
        return self._task.uncancel() == 0  # ours alone: nobody else cancelled the task meanwhile

    def end(self) -> None:
        self.deadline = None

    def _arm(self, when: float) -> None:
        self._when = when
        self._handle = self._loop.call_at(when, self._fire)

    def _fire(self) -> None:
        self._handle = None
        deadline = self.deadline
        if deadline is None:  # no read waits: the next one arms the timer again
            return
        if self._loop.time() < deadline:
            self._arm(deadline)
            return
        self.deadline = None
        self.expired = True
        assert self._task is not None
        self._task.cancel()

    def close(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None


class _ClientConnection:
    """One client connection (one inbound tunnel) and at most one upstream stream at a time."""

    def __init__(self, server: WaypointServer, tunnel: InboundTunnel, request: ConnectRequest) -> None:
        self.server = server
        self.tunnel = tunnel
        self.client = tunnel.stream
        self.target = request.target
        self.request = request
        self.principal = tunnel.peer_identity.uri
        mode, underscores = server.state.config.path_normalization, server.headers_with_underscores  # as the policy
        self.http = Http1Connection(Limits(path_normalization=mode, headers_with_underscores=underscores))
        self.upstream: _Upstream | None = None
        self.outcome = Outcome(0.0)  # the current request's, for its telemetry
        self.started = time.monotonic()
        # per-connection values kept while the config snapshot (and the endpoint) stays the same
        self._attrs: tuple[ClusterConfig, Endpoint, ConnectionAttributes] | None = None
        self._client: tuple[ClusterConfig, tuple[str, int], str] | None = None  # and its `ip:port` for the log
        self._service: tuple[ClusterConfig, Service | None] | None = None
        self._last_verdict: tuple[RequestDecider, ConnectionAttributes, tuple[Any, ...], Verdict] | None = None
        # the last endpoint `pick` gave, its snapshot, and its target as the access log shows it
        self._picked: tuple[ClusterConfig, Endpoint, str] | None = None

    async def run(self) -> None:
        """Istio's protocol selection for the port, then the first bytes when it says nothing (`sniff`)."""
        port = self.server.state.config.service_by_ip(self.target.ip)
        service_port = port.port_for(self.target.port) if port is not None else None
        declared = port_protocol(service_port) if service_port is not None else ""
        try:
            if declared in L4_PROTOCOLS:
                await self._relay_tcp(b"", f"port protocol {declared}")
                return
            first = await self._sniff()
            kind = classify(first, final=True)
            if kind == "h2c":
                await _H2ClientConnection(self).run(first)
                return
            if kind == "tcp" and declared not in HTTP_PROTOCOLS:
                await self._relay_tcp(first, "no HTTP in the first bytes")
                return
        except (StreamClosed, HboneError, ConnectionError):
            self.client.abort()
            return
        await self._run_http1(first)

    async def _sniff(self) -> bytes:
        """The client's first bytes, until they say HTTP/1.x, h2c or neither (`classify`), SNIFF_LIMIT bytes or
        SNIFF_TIMEOUT (a server-first protocol sends nothing: TCP)."""
        data = b""
        try:
            async with asyncio.timeout(SNIFF_TIMEOUT):
                while classify(data, final=False) == "more" and len(data) < SNIFF_LIMIT:
                    more = await self._read_client()
                    if not more:
                        break
                    data += more
        except TimeoutError:
            pass
        return data

    async def _run_http1(self, first: bytes) -> None:
        http = self.http
        if first:
            http.receive_data(first)
        timeouts = self.server.timeouts
        head_since = self.started if first else None  # when the awaited request head began (None: none has)
        reads = _ReadDeadline()
        client = self.client
        try:
            while True:
                ev = http.next_request_event()
                if ev is NEED_DATA:  # between requests, or inside a head
                    if head_since is None and http.buffered:
                        head_since = time.monotonic()
                    limit = timeouts.idle if head_since is None else timeouts.request_headers
                    if limit is None:
                        data = await self._read_client()
                    else:  # `reads.read(self._read_client, ...)` written out: two coroutines less per request
                        reads.start(limit if head_since is None else head_since + limit - time.monotonic())
                        timed_out = False
                        try:
                            data = await client.read(READ_CHUNK)
                        except StreamClosed:
                            data = b""
                        except asyncio.CancelledError:
                            if not reads.timed_out():
                                raise
                            timed_out = True
                        finally:
                            reads.end()
                        if timed_out:
                            self._timed_out(head_since is not None)
                            if head_since is not None:
                                await self._to_client(_HEAD_TIMED_OUT)
                            break
                    # (a head that is not whole after this read is timed from the next NEED_DATA, just above)
                    http.receive_data(data)
                elif isinstance(ev, RequestReceived):
                    head_since = None
                    # `_request`, and its metrics and access log line once it is over (however it ends); not a
                    # coroutine of its own: each upstream read resumes every frame of the await chain
                    head = ev.head
                    content_type = http.request_content_type
                    self.outcome = outcome = Outcome(time.monotonic(), service=self._target_service())
                    try:
                        go_on = await self._request(head)
                    finally:
                        self._record_as(head, outcome, content_type)
                    if not go_on:
                        break
                else:  # CLOSED, RequestRejected (its answer is queued), PAUSED (nothing left to do)
                    if isinstance(ev, RequestRejected):
                        self._refused(ev.status, ev.reason, None)
                    break
            await self._to_client(http.data_to_client())
            await self._finish_client()
        except (StreamClosed, HboneError, ConnectionError):
            self.client.abort()
        finally:
            reads.close()
            if self.upstream is not None:
                self.upstream.stream.close()
                self.upstream = None

    # --- shared by the HTTP/1.1, h2c and TCP paths ---

    def _attributes(self, endpoint: Endpoint) -> ConnectionAttributes:
        """The connection's side of a decision: the same for every request to one endpoint within a snapshot."""
        config = self.server.state.config
        cached = self._attrs
        if cached is not None and cached[0] is config and cached[1] is endpoint:
            return cached[2]
        attrs = ConnectionAttributes(
            source_principal=self.principal,
            source_ip=self._client_address()[0],
            destination=endpoint.workload,
            destination_ip=endpoint.target.ip,
            destination_port=endpoint.target.port,
        )
        self._attrs = (config, endpoint, attrs)
        return attrs

    def _decide(self, head: RequestHead, attrs: ConnectionAttributes) -> Verdict:
        """`RequestDecider.decide`, or the previous request's verdict when this one is the same again: same
        method, path, host and header fields, same connection attributes and snapshot. Only verdicts that depend on
        nothing else are kept: none under JWT rules (the clock, the key sets) and none pending on a CUSTOM
        provider (asked for every request). A keep-alive client repeating its request skips the engine."""
        decider = self.server.state.decider
        key = (head.method, head.path, head.host, head.headers)
        last = self._last_verdict
        if last is not None and last[0] is decider and last[1] is attrs and last[2] == key:
            return last[3]
        verdict = decider.decide(head, attrs)
        if verdict.custom is None and not decider.jwt_rules(attrs.destination):
            self._last_verdict = (decider, attrs, key, verdict)
        return verdict

    def _client_address(self) -> tuple[str, int]:
        """`client_address` of this connection (per snapshot: whether the claimed address is trusted depends on it)."""
        config = self.server.state.config
        cached = self._client
        if cached is not None and cached[0] is config:
            return cached[1]
        address = client_address(config, self.request.forwarded_for, self.principal, self.tunnel.peer_address)
        self._client = (config, address, f"{address[0]}:{address[1]}")
        return address

    async def _dial(self, endpoint: Endpoint) -> HboneStream:
        """A tunnel to the endpoint's node proxy, which is told the original client (`forwarded`) and trusts it
        from the pod's waypoint: the app sees the client's address, not the waypoint's (DESIGN §4.6)."""
        server = self.server
        return await server.pool.connect(
            PoolKey(server.identity, SpiffeId.parse(endpoint.workload.identity), endpoint.proxy_address),
            endpoint.target,
            expected_identities=endpoint.expected_identities,
            forwarded_for=self._client_address(),
            traceparent=self.request.traceparent,
        )

    def _record(self, head: RequestHead | None, outcome: Outcome) -> None:
        self._record_as(head, outcome, head.header(b"content-type") if head is not None else None)

    def _record_as(self, head: RequestHead | None, outcome: Outcome, content_type: bytes | None) -> None:
        """`_record` with the request's content type known (HTTP/1.1 has it from the head's parse)."""
        telemetry = self.server.telemetry
        if telemetry is None:
            return
        client = self._client_address()  # the original client, as Istio logs it (the TCP peer is its node)
        assert self._client is not None
        telemetry.record(
            self.server.state.config,
            principal=self.principal,
            source_ip=client[0],
            source_addr=self._client[2],  # formatted once per connection and snapshot
            method=head.method if head is not None else b"-",
            path=head.path if head is not None else b"-",
            content_type=content_type,
            outcome=outcome,
        )

    def _refused(self, status: int, reason: str, head: RequestHead | None) -> None:
        """A request the HTTP parser refused (400, 431, 505, ...): counted, logged and in the metrics."""
        self.server._count("bad_request")
        log.info(
            "request refused by the HTTP parser: %s",
            reason,
            extra={"status": status, "authority": str(self.target), "peer_identity": self.principal},
        )
        service = self.server.state.config.service_by_ip(self.target.ip)
        outcome = Outcome(time.monotonic(), status=status, reason="bad_request", service=service)
        self._record(head, outcome)

    def _timed_out(self, in_head: bool, protocol: str = "HTTP/1.1") -> None:
        """A client connection closed by a timeout: idle (no request in flight), or inside a request head (counted
        and recorded as a 408, which is what an HTTP/1.1 client is told)."""
        timeouts = self.server.timeouts
        what = "request_headers_timeout" if in_head else "idle_timeout"
        self.server._count(what)
        fields = {"authority": str(self.target), "peer_identity": self.principal, "protocol": protocol}
        if not in_head:
            log.debug("idle client connection closed", extra={**fields, "timeout_s": timeouts.idle})
            return
        log.info("request head too slow: connection closed", extra={**fields, "timeout_s": timeouts.request_headers})
        service = self.server.state.config.service_by_ip(self.target.ip)
        self._record(None, Outcome(time.monotonic(), status=408, reason=what, service=service))

    async def _relay_tcp(self, first: bytes, why: str) -> None:
        """Not HTTP: the engine's L4 check with the original client's identity, then bytes both ways over
        HBONE to the chosen endpoint (EOF passed on as a half-close)."""
        server = self.server
        fields: dict[str, object] = {"authority": str(self.target), "peer_identity": self.principal, "why": why}
        endpoint = server.picker.pick(server.state.config, self.target)
        if isinstance(endpoint, str):
            server._count("no_endpoint")
            log.info("tcp connection refused: %s", endpoint, extra=fields)
            self.client.abort()
            return
        attrs = self._attributes(endpoint)
        decision = server.state.decider.engine.check_l4_at_waypoint(attrs)
        fields["endpoint"] = str(endpoint.target)
        if not decision.allowed:
            server._count("deny_l4")
            log.info("tcp connection denied: %s", decision.reason, extra={**fields, "policy": decision.policy})
            self.client.abort()
            return
        try:
            up = await self._dial(endpoint)
        except HboneError as e:
            server._count("upstream_error")
            log.warning("upstream tunnel failed: %s", e, extra=fields)
            self.client.abort()
            return
        server._count("tcp")
        log.debug("tcp connection relayed", extra={**fields, "policy": decision.policy})
        telemetry = server.telemetry
        relay = None
        if telemetry is not None:  # Istio's TCP metrics, reporter waypoint: opened now, bytes flushed and at the end
            labels = telemetry.tcp_opened(
                server.state.config,
                principal=self.principal,
                source_ip=attrs.source_ip,
                destination=endpoint.workload,
                service=endpoint.service,
            )
            if labels is not None:
                relay = _TcpRelay(labels)
                server.tcp_relays.add(relay)
        moved = relay.moved if relay is not None else [0, 0]  # from the client, to it: kept by the copies
        try:
            if first:
                await up.write(first)
                moved[0] = len(first)
            await asyncio.gather(_copy(self.client, up, moved, 0), _copy(up, self.client, moved, 1))
        finally:
            up.close()
            self.client.close()
            if relay is not None and telemetry is not None:
                server.tcp_relays.discard(relay)
                sent, received = relay.take_unflushed()
                telemetry.tcp_closed(relay.labels, sent=sent, received=received)

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

    def _target_service(self) -> Service | None:
        """The Service whose VIP the tunnel's authority names (per snapshot)."""
        config = self.server.state.config
        cached = self._service
        if cached is not None and cached[0] is config:
            return cached[1]
        service = config.service_by_ip(self.target.ip)
        self._service = (config, service)
        return service

    async def _request(self, head: RequestHead) -> bool:
        """Decide and serve one request; False when the client connection is over."""
        server, http = self.server, self.http
        state = server.state
        current = self.upstream.endpoint if self.upstream is not None else None
        picked = self._picked
        if current is not None and picked is not None and picked[0] is state.config and picked[1] is current:
            endpoint: Endpoint | str = current  # what `pick` answers: the snapshot, so its endpoint list, is the same
        else:
            endpoint = server.picker.pick(state.config, self.target, current)
            if not isinstance(endpoint, str):
                picked = self._picked = (state.config, endpoint, str(endpoint.target))
        if isinstance(endpoint, str):
            server._count("no_endpoint")
            self.outcome.status, self.outcome.reason = 503, "no_endpoint"
            self.outcome.response_bytes = len(NO_UPSTREAM_BODY)
            log.info("request refused: %s", endpoint, extra=self._fields(head))
            http.respond(503, NO_UPSTREAM_BODY)
            await self._to_client(http.data_to_client())
            return not http.closed
        assert picked is not None
        self.outcome.destination, self.outcome.upstream = endpoint.workload, picked[2]
        attrs = self._attributes(endpoint)
        verdict = self._decide(head, attrs)
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
        if upstream is not None and (
            (upstream.endpoint is not endpoint and upstream.endpoint != endpoint) or not upstream.reusable
        ):
            upstream.stream.close()
            upstream = self.upstream = None
        # A kept-alive upstream may have died before our request met it: an idempotent request without a body
        # (nothing of it consumed) is sent once more on a fresh stream, as Envoy retries a reset before headers.
        has_body = head.has_body
        retry = upstream is not None and head.method in IDEMPOTENT and not has_body and head.upgrade is None
        if upstream is None:
            dial_error: HboneError | None = None
            try:
                stream = await self._dial(endpoint)
            except HboneError as e:
                dial_error = e
            if dial_error is not None:  # answered after the except block: tests/unit/test_compiled_async.py
                self._dial_failed(head, endpoint, dial_error)
                http.respond(503, UPSTREAM_FAILED_BODY)
                await self._to_client(http.data_to_client())
                return not http.closed
            upstream = self.upstream = _Upstream(endpoint, stream)
        server._count("allow")
        self.outcome.policy = verdict.policy
        if log.isEnabledFor(logging.DEBUG):  # its fields are a dict per request: not built unless logged
            log.debug("request allowed", extra={**self._fields(head), "policy": verdict.policy})
        http.allow(verdict.add_headers, remove=verdict.remove_headers)
        out = http.data_to_client()  # 100 Continue, when asked for
        if out:
            await self.client.write(out)
        head_bytes = http.data_to_upstream()
        while True:
            if upstream is None:  # the retry's fresh stream
                redial_error: HboneError | None = None
                try:
                    stream = await self._dial(endpoint)
                except HboneError as e:
                    redial_error = e
                if redial_error is not None:  # answered after the except block (test_compiled_async.py)
                    self._dial_failed(head, endpoint, redial_error)
                    http.receive_upstream_data(b"")  # the request is committed: answered 502 as an upstream EOF
                    http.next_response_event()
                    await self._to_client(http.data_to_client())
                    return False
                upstream = self.upstream = _Upstream(endpoint, stream)
            body = None
            stale = False  # `continue` is after the `finally`: mypyc cannot compile one inside try/finally
            failed: BaseException | None = None
            try:
                try:
                    await upstream.stream.write(head_bytes)
                except StreamClosed:
                    if retry:
                        raise _StaleUpstream from None
                    raise
                if has_body:  # without one `_pump_request` has nothing to do: no task per request
                    body = asyncio.get_running_loop().create_task(self._pump_request(upstream.stream))
                keep = await self._pump_response(upstream.stream, retry_stale=retry)
                if keep and body is not None:
                    await body
            except _StaleUpstream:
                retry = False
                upstream.stream.abort()
                upstream = self.upstream = None
                server._count("retried")
                log.info("stale keep-alive upstream: request sent again", extra=self._fields(head))
                stale = True
            # Not a `finally`: mypyc (mypy 2.4.1) compiles a coroutine's `finally` that awaits so that, after the
            # `try` ended normally, it re-raises an exception thrown into the try's await and handled further down
            # (asyncio.timeout's cancellation, which _read_upstream turns into a 504: the connection then died of
            # CancelledError without closing the client's stream). Same for the two h2c exchanges below.
            except BaseException as e:
                failed = e
            if body is not None:
                if not body.done():
                    body.cancel()
                with contextlib.suppress(asyncio.CancelledError, StreamClosed, HboneError, ConnectionError):
                    await body  # also retrieves the error of a body pump that failed while the response ended
            if failed is not None:
                raise failed
            if not stale:
                break
        assert upstream is not None
        if not keep:
            upstream.stream.close()
            self.upstream = None
        return keep

    def _dial_failed(self, head: RequestHead, endpoint: Endpoint, e: HboneError) -> None:
        self.server._count("upstream_error")
        self.outcome.status, self.outcome.reason = 503, "upstream_error"
        self.outcome.response_bytes = len(UPSTREAM_FAILED_BODY)
        log.warning("upstream tunnel failed: %s", e, extra={**self._fields(head), "endpoint": str(endpoint.target)})

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

    async def _pump_response(self, up: HboneStream, *, retry_stale: bool = False) -> bool:
        """The response, upstream -> client; True when the client connection goes on to its next request.
        With `retry_stale`, an upstream that ends before the first response byte raises _StaleUpstream. With a
        response timeout, an upstream whose response head is not here in time gets the client a 504 (and closed)."""
        http = self.http
        limit = self.server.timeouts.response
        deadline = None if limit is None else time.monotonic() + limit  # cleared by the response head
        client = self.client
        outcome = self.outcome
        while True:
            ev = http.next_response_event()
            # the head and the body pieces of one upstream read go to the client as one write (one DATA frame),
            # sent before the next read waits and when the response ends
            if type(ev) is ResponseData:
                outcome.response_bytes += len(ev.data)
                continue
            if type(ev) is ResponseReceived:
                deadline = None
                outcome.status = ev.status
                if ev.grpc_status is not None:  # a trailers-only gRPC answer; HTTP/1.1 trailers are not read
                    outcome.grpc_status = ev.grpc_status.decode("latin-1").strip()
                continue
            out = http.data_to_client()
            if out:
                await client.write(out)
            if ev is NEED_DATA:
                if deadline is None:  # read here, not in `_read_upstream`: one coroutine frame less per read
                    try:
                        data = await up.read(READ_CHUNK)
                    except StreamClosed:
                        data = b""
                else:
                    timed_out = False
                    try:
                        data = await _read_upstream(up, deadline)
                    except TimeoutError:
                        timed_out = True
                    if timed_out:  # the 504 is written after the except block (test_compiled_async.py)
                        up.abort()
                        self._upstream_timed_out(outcome)
                        await self._to_client(_UPSTREAM_TIMED_OUT)
                        return False
                if retry_stale:
                    if not data:
                        raise _StaleUpstream
                    retry_stale = False
                http.receive_upstream_data(data)
            elif isinstance(ev, ResponseEnded):
                return ev.keep_alive
            elif isinstance(ev, TunnelOpened):
                outcome.status = outcome.status or outcome.tunnel_status
                await self._to_client(http.data_to_client())
                pending = http.data_to_upstream()
                if pending:
                    await up.write(pending)
                await asyncio.gather(_copy(self.client, up), _copy(up, self.client))
                return False
            else:  # CLOSED, or PAUSED (which cannot happen mid-response): end the connection
                return False

    def _upstream_timed_out(self, outcome: Outcome) -> None:
        """The upstream's response head did not come within the response timeout: the client is told 504."""
        self.server._count("upstream_timeout")
        outcome.status, outcome.reason, outcome.response_bytes = 504, "upstream_timeout", len(UPSTREAM_TIMEOUT_BODY)
        log.info(
            "upstream response timeout: 504",
            extra={
                "authority": str(self.target),
                "peer_identity": self.principal,
                "endpoint": outcome.upstream,
                "timeout_s": self.server.timeouts.response,
            },
        )

    def _denied(self, verdict: Verdict) -> None:
        o = self.outcome
        o.status, o.policy, o.response_bytes = verdict.status, verdict.policy, len(verdict.body)
        o.reason = verdict.denied_by
        o.upstream = None  # answered here, not forwarded

    def _fields(self, head: RequestHead) -> dict[str, object]:
        return {
            "method": _text(head.method),
            "path": _text(head.path),
            "authority": str(self.target),
            "peer_identity": self.principal,
        }


async def _read_upstream(up: HboneStream, deadline: float | None) -> bytes:
    """One read of an upstream response, by the response-head deadline if one is set (TimeoutError past it);
    a closed stream reads as EOF."""
    try:
        if deadline is None:
            return await up.read(READ_CHUNK)
        async with asyncio.timeout(deadline - time.monotonic()):
            return await up.read(READ_CHUNK)
    except StreamClosed:
        return b""


async def _copy(src: HboneStream, dst: HboneStream, moved: list[int] | None = None, index: int = 0) -> None:
    """Raw bytes (TCP, or after an Upgrade or CONNECT was allowed and accepted); EOF is passed on as a half-close.
    With `moved`, moved[index] grows by the bytes copied, chunk by chunk (an integer add per read, read by the
    periodic flush and at the close: no per-chunk metric)."""
    try:
        if moved is None:
            while data := await src.read(READ_CHUNK):
                await dst.write(data)
        else:
            while data := await src.read(READ_CHUNK):
                await dst.write(data)
                moved[index] += len(data)
        await dst.write_eof()
    except StreamClosed:
        dst.abort()


# ---------------------------------------------------------------------------------------------------
# HTTP/2 with prior knowledge (h2c) inside a tunnel
# ---------------------------------------------------------------------------------------------------
H2_OUT_HIGH = 256 * 1024  # bytes queued for one HBONE stream past which producers wait for the writer
H2_UPSTREAM_PROTOCOLS = ("http2", "grpc", "grpc-web")
# The gRPC status a local HTTP answer becomes for a gRPC client (the mapping of gRPC's HTTP-to-gRPC document).
GRPC_STATUS_OF_HTTP = {400: 13, 401: 16, 403: 7, 404: 12, 429: 14, 502: 14, 503: 14, 504: 14}
IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"})


def port_protocol(port: ServicePort) -> str:
    """Istio's protocol selection for a Service port: `appProtocol`, else the name's `<protocol>[-<suffix>]`;
    "" when neither says (then the first bytes decide: HTTP/1.1, h2c, or else TCP)."""
    if port.app_protocol:
        return port.app_protocol.lower()
    name = port.name.lower()
    for proto in ("http2", "https", "http", "grpc-web", "grpc", "tcp", "tls", "mongo", "mysql", "redis", "udp"):
        if name == proto or name.startswith(proto + "-"):
            return proto
    return ""


class _Inbox:
    """Items for one consumer task, in order; `get` waits. Bounded by the flow control of what feeds it."""

    __slots__ = ("_items", "_loop", "_waiter")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._items: collections.deque[Any] = collections.deque()
        self._loop = loop  # the owner's: asyncio.get_running_loop() costs a getpid(2) a call in 3.11
        self._waiter: asyncio.Future[None] | None = None

    def put(self, item: Any) -> None:
        self._items.append(item)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def get(self) -> Any:
        while not self._items:
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._items.popleft()

    def drain(self) -> list[Any]:
        items = list(self._items)
        self._items.clear()
        return items


class _H2Side:
    """An H2Conn over an HBONE stream: `read_loop` feeds received events to `on_event`, `flush` hands what
    h2 queued to the writer task; `send_all` waits for the peer's window and for the writer to catch up."""

    def __init__(
        self,
        conn: H2Conn,
        stream: HboneStream,
        on_event: Callable[[H2Event], None],
        on_headers: Callable[[bool], None] | None = None,
    ) -> None:
        self.conn = conn
        self.stream = stream
        self.on_event = on_event
        self.on_headers = on_headers  # told when a header block starts arriving (True) and when none is (False)
        self.loop = asyncio.get_running_loop()  # kept: each get_running_loop() is a getpid(2) in 3.11
        self.headers_pending = False
        self._out: list[bytes] = []
        self.pending = 0
        self._wake: asyncio.Future[None] | None = None
        self._room: asyncio.Future[None] | None = None
        self._windows: dict[int, asyncio.Future[None]] = {}
        self.dead = False
        self.writer: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.flush()
        self.writer = self.loop.create_task(self._write_loop())

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data and not self.dead:
            self._out.append(data)
            self.pending += len(data)
            _wake(self._wake)

    async def _write_loop(self) -> None:
        try:
            while True:
                if not self._out:
                    if self.dead:
                        return
                    self._wake = self.loop.create_future()
                    await self._wake
                    continue
                data = self._out[0] if len(self._out) == 1 else b"".join(self._out)
                self._out.clear()
                await self.stream.write(data)
                self.pending -= len(data)
                if self.pending < H2_OUT_HIGH:
                    _wake(self._room)
        except (StreamClosed, HboneError, ConnectionError):
            self.die()

    def die(self) -> None:
        self.dead = True
        self._out.clear()
        _wake(self._wake)
        _wake(self._room)
        for waiter in self._windows.values():
            _wake(waiter)

    async def drained(self, timeout: float = CLOSE_WAIT) -> None:
        """The writer sent everything queued (or the stream died)."""
        self.dead = True
        _wake(self._wake)
        if self.writer is not None:
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                async with asyncio.timeout(timeout):
                    await self.writer

    async def read_loop(self, initial: bytes = b"") -> None:
        data = initial
        while True:
            if data:
                events = self.conn.receive(data)
                for ev in events:
                    if isinstance(ev, WindowOpened):
                        if ev.stream_id == 0:
                            for waiter in self._windows.values():
                                _wake(waiter)
                        else:
                            _wake(self._windows.get(ev.stream_id))
                    self.on_event(ev)
                if self.on_headers is not None:
                    # A partial header block sits behind every frame that produced an event: when this read
                    # produced any, the block began in it (the clock restarts), else it is the one seen before.
                    pending = self.conn.receiving_headers
                    if pending and (events or not self.headers_pending):
                        self.on_headers(True)
                    elif not pending and self.headers_pending:
                        self.on_headers(False)
                    self.headers_pending = pending
                self.flush()
                closed = self.conn.closed
                if closed is not None and (closed.ours or closed.code != 0):
                    return  # a graceful GOAWAY from the peer: its open streams go on
            try:
                data = await self.stream.read(READ_CHUNK)
            except (StreamClosed, HboneError):
                data = b""
            if not data:
                self.on_event(H2Closed(int(ErrorCodes.CANCEL), "the tunnel ended", False))
                return

    async def send_all(self, stream_id: int, data: bytes) -> bool:
        """All of `data` on the stream, as the peer's windows open; False when the stream or side is gone."""
        view = memoryview(data)
        while view:
            if self.dead:
                return False
            n = self.conn.send_data(stream_id, view)
            if n < 0:
                return False
            if n:
                view = view[n:]
                self.flush()
            if view:
                waiter = self._windows[stream_id] = self.loop.create_future()
                try:
                    await waiter
                finally:
                    self._windows.pop(stream_id, None)
        while self.pending >= H2_OUT_HIGH and not self.dead:
            if self._room is None or self._room.done():  # one future shared by every stream that waits
                self._room = self.loop.create_future()
            await asyncio.shield(self._room)  # a waiter cancelled (its stream reset) leaves it to the others
        return not self.dead


def _wake(waiter: asyncio.Future[None] | None) -> None:
    if waiter is not None and not waiter.done():
        waiter.set_result(None)


@dataclass(eq=False)
class _H2Exchange:
    """One request stream of a client's h2c connection."""

    stream_id: int
    head: RequestHead
    ended: bool  # the client sent END_STREAM
    body: _Inbox  # Data, Trailers, Ended, Reset from the client
    replies: _Inbox  # ResponseStarted, Data, Trailers, Ended, Reset upstream
    task: asyncio.Task[None] | None = None
    reset: bool = False
    answered: bool = False  # a response head went to the client
    discard: bool = False  # the request body is not wanted: acknowledge it as it comes
    h1_stream: HboneStream | None = None  # the HTTP/1.1 upstream serving it, if any

    @property
    def bodiless(self) -> bool:
        """The request ended with no DATA (so far all of it is here and none of it is body)."""
        return self.ended and not any(isinstance(item, H2Data) for item in self.body._items)
    outcome: Outcome = field(default_factory=lambda: Outcome(time.monotonic()))


class _H2Upstream:
    """An h2c connection to one endpoint (one HBONE stream), shared by the client connection's streams."""

    def __init__(self, endpoint: Endpoint, stream: HboneStream) -> None:
        self.endpoint = endpoint
        self.exchanges: dict[int, _H2Exchange] = {}
        self.side = _H2Side(H2Conn(client_side=True), stream, self._on_event)
        self.side.start()
        self.reader = self.side.loop.create_task(self.side.read_loop())

    @property
    def usable(self) -> bool:
        c = self.side.conn
        limit = c.h2.remote_settings.max_concurrent_streams
        return not self.side.dead and c.closed is None and c.open_streams() < limit

    def _on_event(self, ev: H2Event) -> None:
        if isinstance(ev, H2Closed):
            graceful = not ev.ours and ev.code == 0
            for sid, pending in list(self.exchanges.items()):
                if graceful and sid <= ev.last_stream_id:
                    continue  # a graceful GOAWAY: the streams it covers finish
                pending.replies.put(H2Reset(sid, int(ErrorCodes.REFUSED_STREAM if graceful else ErrorCodes.CANCEL)))
            if not graceful:
                self.side.die()
            return
        sid = getattr(ev, "stream_id", 0)
        ex = self.exchanges.get(sid)
        if ex is None:
            if isinstance(ev, H2Data):
                self.side.conn.ack(sid, ev.flow)
            return
        if not isinstance(ev, WindowOpened):
            ex.replies.put(ev)

    def close(self) -> None:
        self.side.conn.goaway()
        self.side.flush()
        self.side.die()
        self.reader.cancel()
        self.side.stream.close()


class _H2ClientConnection:
    """One client connection speaking h2c: each stream decided and forwarded on its own."""

    def __init__(self, owner: _ClientConnection) -> None:
        self.owner = owner
        self.server = owner.server
        mode, underscores = self.server.state.config.path_normalization, self.server.headers_with_underscores
        self.conn = H2Conn(
            client_side=False, limits=H2Limits(path_normalization=mode, headers_with_underscores=underscores)
        )
        timeouts = self.server.timeouts
        on_headers = self._headers_clock if timeouts.request_headers is not None else None
        self.side = _H2Side(self.conn, owner.client, self._on_event, on_headers)
        self.exchanges: dict[int, _H2Exchange] = {}
        self._expired: asyncio.Future[str] | None = None  # why a timeout ends the connection: idle, request_headers
        self._idle_timer: asyncio.TimerHandle | None = None  # armed while no stream is open
        self._headers_timer: asyncio.TimerHandle | None = None  # armed while a header block is arriving
        self.h2_upstreams: dict[tuple[str, Authority], _H2Upstream] = {}  # by (workload uid, target)
        self.h1_idle: dict[tuple[str, Authority], list[HboneStream]] = {}
        self.h2_retired: list[_H2Upstream] = []  # replaced while streams were still open on them

    def goaway(self) -> None:
        self.conn.goaway()
        self.side.flush()

    # --- timeouts: one timer each, armed and cancelled on transitions (not per read) ---

    def _expire(self, why: str) -> None:
        if self._expired is not None and not self._expired.done():
            self._expired.set_result(why)

    def _headers_clock(self, started: bool) -> None:
        if self._headers_timer is not None:
            self._headers_timer.cancel()
            self._headers_timer = None
        limit = self.server.timeouts.request_headers
        if started and limit is not None and self._expired is not None and not self._expired.done():
            self._headers_timer = self.side.loop.call_later(limit, self._expire, "request_headers")

    def _idle_clock(self, idle: bool) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        limit = self.server.timeouts.idle
        if idle and limit is not None and self._expired is not None and not self._expired.done():
            self._idle_timer = self.side.loop.call_later(limit, self._expire, "idle")

    async def run(self, initial: bytes) -> None:
        """Serve the connection until the client ends it, or a timeout does (GOAWAY, then closed): no stream for
        the idle timeout, or a header block not whole within the request-headers timeout."""
        self.side.start()
        self.server.h2c_connections.add(self)
        if self.server.draining:
            self.goaway()
        loop = self.side.loop
        self._expired = loop.create_future()
        self._idle_clock(True)
        reader = loop.create_task(self.side.read_loop(initial))
        failed: BaseException | None = None
        try:
            await asyncio.wait((reader, self._expired), return_when=asyncio.FIRST_COMPLETED)
            if not reader.done():
                reader.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await reader
                self.goaway()
                self.owner._timed_out(self._expired.result() == "request_headers", "HTTP/2")
            else:
                await reader
                closed = self.conn.closed
                if closed is not None and closed.ours:
                    self.server._count("bad_request")
                    log.info(
                        "h2c connection closed for bad input: %s",
                        closed.reason,
                        extra={
                            "authority": str(self.owner.target),
                            "peer_identity": self.owner.principal,
                            "code": closed.code,
                        },
                    )
                elif closed is not None and closed.code == 0:  # graceful: open streams finish
                    pending = [ex.task for ex in self.exchanges.values() if ex.task is not None]
                    if pending:
                        await asyncio.wait(pending, timeout=CLOSE_WAIT * 6)
        except BaseException as e:  # not a `finally` that awaits: mypyc 2.4.1, test_compiled_async.py
            failed = e
        if not reader.done():
            reader.cancel()
        if not self._expired.done():
            self._expired.cancel()  # no clock is armed from now on (streams ending below would arm one)
        self._idle_clock(False)
        self._headers_clock(False)
        for ex in list(self.exchanges.values()):
            if ex.task is not None:
                ex.task.cancel()
        tasks = [ex.task for ex in self.exchanges.values() if ex.task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=CLOSE_WAIT)
        for up in [*self.h2_upstreams.values(), *self.h2_retired]:
            up.close()
        for streams in self.h1_idle.values():
            for s in streams:
                s.close()
        self.server.h2c_connections.discard(self)
        self.side.flush()
        await self.side.drained()
        with contextlib.suppress(StreamClosed, HboneError, ConnectionError):
            await self.owner._finish_client()  # a reset would drop the GOAWAY unread at the peer
        self.owner.client.close()
        if failed is not None:
            raise failed

    def _on_event(self, ev: H2Event) -> None:
        if isinstance(ev, RequestStarted):
            loop = self.side.loop
            new = _H2Exchange(ev.stream_id, ev.head, ev.ended, _Inbox(loop), _Inbox(loop))
            if not self.exchanges:
                self._idle_clock(False)
            self.exchanges[ev.stream_id] = new
            new.task = loop.create_task(self._serve(new))
            return
        if isinstance(ev, BadRequest):
            self.owner._refused(ev.status, ev.reason, None)
            return
        if isinstance(ev, (H2Closed, WindowOpened)):
            return
        ex = self.exchanges.get(ev.stream_id)
        if ex is None or ex.discard:
            if isinstance(ev, H2Data):
                self.conn.ack(ev.stream_id, ev.flow)
            return
        if isinstance(ev, H2Reset):
            ex.reset = True
            ex.replies.put(_CLIENT_RESET)  # wakes a response pump waiting on an h2c upstream
            if ex.h1_stream is not None:
                ex.h1_stream.abort()  # wakes one reading an HTTP/1.1 upstream
        elif isinstance(ev, H2Ended):
            ex.ended = True
        ex.body.put(ev)

    async def _serve(self, ex: _H2Exchange) -> None:
        owner, server = self.owner, self.server
        config = server.state.config
        ex.outcome = Outcome(time.monotonic(), service=config.service_by_ip(owner.target.ip))
        try:
            await self._exchange(ex)
        except (StreamClosed, HboneError, ConnectionError) as e:
            log.info("h2c stream failed: %s", e, extra=owner._fields(ex.head))
            self.conn.reset(ex.stream_id, ErrorCodes.INTERNAL_ERROR)
        except Exception:  # a bug here must cost this stream only
            log.exception("h2c stream handling failed", extra=owner._fields(ex.head))
            self.conn.reset(ex.stream_id, ErrorCodes.INTERNAL_ERROR)
        finally:
            self.exchanges.pop(ex.stream_id, None)
            if not self.exchanges:
                self._idle_clock(True)
            for item in ex.body.drain():
                if isinstance(item, H2Data):
                    self.conn.ack(ex.stream_id, item.flow)
            self.side.flush()
            owner._record(ex.head, ex.outcome)

    def _answer(self, ex: _H2Exchange, status: int, body: bytes, headers: tuple[tuple[bytes, bytes], ...] = ()) -> None:
        """A local answer on the stream; the rest of the request body is not wanted (RST_STREAM NO_ERROR, as
        RFC 9113 §8.1 lets a server that answered early ask)."""
        ex.answered = True
        if is_grpc(ex.head):  # a gRPC client reads a trailers-only answer (Envoy's gRPC local reply)
            code = GRPC_STATUS_OF_HTTP.get(status, 2)
            fields = [(b"content-type", b"application/grpc"), (b"grpc-status", b"%d" % code)]
            if body:
                fields.append((b"grpc-message", urllib.parse.quote(body.strip(), safe=" ").encode()))
            self.conn.send_response(ex.stream_id, 200, fields, end_stream=True)
            if not ex.ended:
                self.conn.reset(ex.stream_id, ErrorCodes.NO_ERROR)
                ex.discard = True
            self.side.flush()
            ex.outcome.status, ex.outcome.grpc_status = 200, str(code)
            return
        content_type = next((v for k, v in headers if k.lower() == b"content-type"), b"text/plain")
        extra = tuple((k, v) for k, v in headers if k.lower() not in (b"content-type", b"content-length"))
        self.conn.respond(ex.stream_id, status, body, extra, content_type=content_type)
        if not ex.ended:
            self.conn.reset(ex.stream_id, ErrorCodes.NO_ERROR)
            ex.discard = True
        self.side.flush()
        ex.outcome.status, ex.outcome.response_bytes = status, len(body)

    async def _exchange(self, ex: _H2Exchange) -> None:
        owner, server = self.owner, self.server
        state = server.state
        head = ex.head
        endpoint = server.picker.pick(state.config, owner.target)
        if isinstance(endpoint, str):
            server._count("no_endpoint")
            ex.outcome.reason = "no_endpoint"
            log.info("request refused: %s", endpoint, extra=owner._fields(head))
            self._answer(ex, 503, NO_UPSTREAM_BODY)
            return
        ex.outcome.destination, ex.outcome.upstream = endpoint.workload, str(endpoint.target)
        attrs = owner._attributes(endpoint)
        verdict = owner._decide(head, attrs)
        if verdict.custom is not None:
            verdict = await owner._ext_authz(head, attrs, verdict)
        if ex.reset:
            return
        if not verdict.allowed:
            server._count("jwt" if verdict.denied_by == "jwt" else "deny")
            log.info(
                "request denied: %s",
                verdict.reason,
                extra={**owner._fields(head), "status": verdict.status, "policy": verdict.policy},
            )
            self._answer(ex, verdict.status, verdict.body, verdict.response_headers)
            ex.outcome.policy, ex.outcome.reason, ex.outcome.upstream = verdict.policy, verdict.denied_by, None
            return
        server._count("allow")
        ex.outcome.policy = verdict.policy
        if not ex.ended and (head.header(b"expect") or b"").lower() == b"100-continue":
            self.conn.send_response(ex.stream_id, 100, [])  # only after the allow, as on HTTP/1.1
            self.side.flush()
        port = endpoint.service.port_for(owner.target.port)
        if (port is not None and port_protocol(port) in H2_UPSTREAM_PROTOCOLS) or is_grpc(head):
            await self._forward_h2(ex, endpoint, verdict)
        else:
            await self._forward_h1(ex, endpoint, verdict)

    def _stop_body(self, ex: _H2Exchange) -> bool:
        """The response ended before the request body: the rest is not wanted (RST_STREAM NO_ERROR after a
        complete response, RFC 9113 §8.1), so a client that never ends its body holds nothing. True if stopped."""
        if not ex.answered or ex.reset:
            return False
        self.conn.reset(ex.stream_id, ErrorCodes.NO_ERROR)
        ex.discard = True
        self.side.flush()
        return True

    def _upstream_failed(self, ex: _H2Exchange, endpoint: Endpoint, e: Exception) -> None:
        self.server._count("upstream_error")
        ex.outcome.reason = "upstream_error"
        log.warning(
            "upstream tunnel failed: %s", e, extra={**self.owner._fields(ex.head), "endpoint": str(endpoint.target)}
        )
        self._answer(ex, 503, UPSTREAM_FAILED_BODY)

    # --- h2c upstream (gRPC, and ports declared http2/grpc) ---

    async def _forward_h2(self, ex: _H2Exchange, endpoint: Endpoint, verdict: Verdict) -> None:
        key = (endpoint.workload.uid, endpoint.target)
        up = self.h2_upstreams.get(key)
        if up is None or not up.usable:
            try:
                stream = await self.owner._dial(endpoint)
            except HboneError as e:
                self._upstream_failed(ex, endpoint, e)
                return
            if up is not None:
                if up.exchanges:  # full, or draining after a graceful GOAWAY: its streams finish there
                    self.h2_retired.append(up)
                else:
                    up.close()
            up = self.h2_upstreams[key] = _H2Upstream(endpoint, stream)
        bodiless = ex.bodiless
        if bodiless:
            ex.body.drain()
        full = False
        try:
            sid = up.side.conn.send_request(
                ex.head, b"http", verdict.add_headers, verdict.remove_headers, end_stream=bodiless
            )
        except h2.exceptions.TooManyStreamsError:  # the app lowered its limit since `usable` was checked
            full = True
        if full:  # dialled after the except block (tests/unit/test_compiled_async.py)
            try:
                stream = await self.owner._dial(endpoint)
            except HboneError as e:
                self._upstream_failed(ex, endpoint, e)
                return
            self.h2_retired.append(up)
            up = self.h2_upstreams[key] = _H2Upstream(endpoint, stream)
            sid = up.side.conn.send_request(
                ex.head, b"http", verdict.add_headers, verdict.remove_headers, end_stream=bodiless
            )
        up.exchanges[sid] = ex
        up.side.flush()
        body = None
        if not bodiless:
            body = self.side.loop.create_task(self._pump_request_h2(ex, up, sid))
        failed: BaseException | None = None
        try:
            await self._pump_response_h2(ex, up, sid)
            if body is not None:
                if ex.ended or not self._stop_body(ex):
                    await body
                else:  # nor does the upstream get the rest
                    up.side.conn.reset(sid, ErrorCodes.CANCEL)
                    up.side.flush()
        except BaseException as e:  # not a `finally` that awaits: a mypyc bug, see _ClientConnection._request
            failed = e
        if body is not None and not body.done():
            body.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await body
        if up.exchanges.pop(sid, None) is not None and ex.reset:
            up.side.conn.reset(sid, ErrorCodes.CANCEL)
            up.side.flush()
        if not up.exchanges and up in self.h2_retired:
            self.h2_retired.remove(up)
            up.close()
        if failed is not None:
            raise failed

    async def _pump_request_h2(self, ex: _H2Exchange, up: _H2Upstream, sid: int) -> None:
        while True:
            item = await ex.body.get()
            if isinstance(item, H2Data):
                ex.outcome.request_bytes += len(item.data)
                if not await up.side.send_all(sid, item.data):
                    self.conn.ack(ex.stream_id, item.flow)
                    return
                self.conn.ack(ex.stream_id, item.flow)
                self.side.flush()
            elif isinstance(item, Trailers):
                up.side.conn.send_trailers(sid, item.headers)
                up.side.flush()
                return
            elif isinstance(item, H2Ended):
                up.side.conn.end(sid)
                up.side.flush()
                return
            elif isinstance(item, H2Reset):
                up.side.conn.reset(sid, ErrorCodes.CANCEL)
                up.side.flush()
                return

    async def _pump_response_h2(self, ex: _H2Exchange, up: _H2Upstream, sid: int) -> None:
        conn, o = self.conn, ex.outcome
        limit = self.server.timeouts.response
        deadline = None if limit is None else time.monotonic() + limit  # cleared by the response head
        while True:
            if deadline is None:
                item = await ex.replies.get()
            else:
                try:
                    async with asyncio.timeout(deadline - time.monotonic()):
                        item = await ex.replies.get()
                except TimeoutError:
                    up.side.conn.reset(sid, ErrorCodes.CANCEL)
                    up.side.flush()
                    self.owner._upstream_timed_out(o)
                    self._answer(ex, 504, UPSTREAM_TIMEOUT_BODY)
                    return
            if item is _CLIENT_RESET:
                return
            if isinstance(item, ResponseStarted):
                deadline = None
                o.status = item.status
                grpc = _header(item.headers, b"grpc-status")
                if grpc is not None:
                    o.grpc_status = grpc.decode("latin-1")
                ex.answered = True
                conn.send_response(ex.stream_id, item.status, item.headers, end_stream=item.ended)
                self.side.flush()
                if item.ended:
                    return
            elif isinstance(item, H2Data):
                o.response_bytes += len(item.data)
                ok = await self.side.send_all(ex.stream_id, item.data)
                up.side.conn.ack(sid, item.flow)
                up.side.flush()
                if not ok:
                    return
            elif isinstance(item, Trailers):
                grpc = _header(item.headers, b"grpc-status")
                if grpc is not None:
                    o.grpc_status = grpc.decode("latin-1")
                conn.send_trailers(ex.stream_id, item.headers)
                self.side.flush()
                return
            elif isinstance(item, H2Ended):
                conn.end(ex.stream_id)
                self.side.flush()
                return
            elif isinstance(item, H2Reset):
                if not ex.answered:
                    self.server._count("upstream_error")
                    o.reason = "upstream_error"
                    self._answer(ex, 502, b"upstream reset before response headers")
                else:
                    conn.reset(ex.stream_id, item.code or ErrorCodes.INTERNAL_ERROR)
                    self.side.flush()
                return

    # --- HTTP/1.1 upstream (everything else: the apps of the seeds speak HTTP/1.1) ---

    async def _forward_h1(self, ex: _H2Exchange, endpoint: Endpoint, verdict: Verdict) -> None:
        head = ex.head
        no_body = ex.bodiless
        if no_body:
            ex.body.drain()
        http = Http1Connection()
        http.receive_data(_h1_head(head, no_body))
        ev = http.next_request_event()
        if not isinstance(ev, RequestReceived):
            self._answer(ex, 400, b"request not expressible in HTTP/1.1\n")
            return
        http.allow(verdict.add_headers, remove=verdict.remove_headers)
        head_bytes = http.data_to_upstream()
        key = (endpoint.workload.uid, endpoint.target)
        idle = self.h1_idle.get(key)
        stream: HboneStream | None = None
        while idle and stream is None:
            stream = idle.pop()
            if stream.done or stream.remote_closed:  # the app ended it while idle
                stream.close()
                stream = None
        reused = stream is not None
        while True:
            if stream is None:
                try:
                    stream = await self.owner._dial(endpoint)
                except HboneError as e:
                    self._upstream_failed(ex, endpoint, e)
                    return
            ex.h1_stream = stream
            try:
                await stream.write(head_bytes)
            except StreamClosed:
                stream.abort()
                if reused:
                    reused, stream = False, None
                    continue
                raise
            body = None
            if not no_body:
                body = self.side.loop.create_task(self._pump_request_h1(ex, http, stream))
            stale = False  # `continue` is after the `finally`: mypyc cannot compile one inside try/finally
            failed: BaseException | None = None
            try:
                retry = reused and no_body and head.method in IDEMPOTENT
                keep = await self._pump_response_h1(ex, http, stream, retry_stale=retry)
                if body is not None and keep:
                    if ex.ended or not self._stop_body(ex):
                        await body
                    else:
                        keep = False  # the upstream has an unfinished request body: not reusable
            except _StaleUpstream:
                stream.abort()
                self.server._count("retried")
                log.info("stale keep-alive upstream: request sent again", extra=self.owner._fields(head))
                reused, stale = False, True
            except BaseException as e:  # not a `finally` that awaits: a mypyc bug, see _ClientConnection._request
                failed = e
            if body is not None and not body.done():
                body.cancel()
                with contextlib.suppress(asyncio.CancelledError, StreamClosed, HboneError):
                    await body
            if failed is not None:
                raise failed
            if stale:
                stream = None
                continue
            ex.h1_stream = None
            if keep and not ex.reset:
                self.h1_idle.setdefault(key, []).append(stream)
            else:
                stream.close()
            return

    async def _pump_request_h1(self, ex: _H2Exchange, http: Http1Connection, up: HboneStream) -> None:
        chunked = ex.head.content_length is None
        while True:
            item = await ex.body.get()
            if isinstance(item, H2Data):
                if item.data:
                    ex.outcome.request_bytes += len(item.data)
                    http.receive_data(b"%x\r\n%s\r\n" % (len(item.data), item.data) if chunked else item.data)
                    while isinstance(http.next_request_event(), RequestData):
                        pass
                    data = http.data_to_upstream()
                    if data:
                        await up.write(data)
                self.conn.ack(ex.stream_id, item.flow)
                self.side.flush()
            elif isinstance(item, (Trailers, H2Ended)):
                if chunked:
                    http.receive_data(b"0\r\n\r\n")
                http.next_request_event()
                data = http.data_to_upstream()
                if data:
                    await up.write(data)
                return
            elif isinstance(item, H2Reset):
                up.abort()
                return

    async def _pump_response_h1(
        self, ex: _H2Exchange, http: Http1Connection, up: HboneStream, *, retry_stale: bool
    ) -> bool:
        o = ex.outcome
        got = False
        limit = self.server.timeouts.response
        deadline = None if limit is None else time.monotonic() + limit  # cleared by the response head
        after: object = None  # the event read past a body piece (to end the stream with that piece)
        while True:
            ev = http.next_response_event() if after is None else after
            after = None
            http.data_to_client()  # the HTTP/1.1 rendering of the response: not what this client gets
            if ev is NEED_DATA:
                try:
                    data = await _read_upstream(up, deadline)
                except TimeoutError:
                    up.abort()
                    self.owner._upstream_timed_out(o)
                    self._answer(ex, 504, UPSTREAM_TIMEOUT_BODY)
                    return False
                if ex.reset:  # the client gave up (its reset aborted `up`)
                    return False
                if not data and not got and retry_stale:
                    raise _StaleUpstream
                got = got or bool(data)
                http.receive_upstream_data(data)
            elif isinstance(ev, ResponseReceived):
                deadline = None
                o.status = ev.status
                headers = _forwarded_fields(ev.headers)
                grpc = _header(headers, b"grpc-status")
                if grpc is not None:
                    o.grpc_status = grpc.decode("latin-1")
                ex.answered = True
                self.conn.send_response(ex.stream_id, ev.status, headers)
                self.side.flush()
            elif isinstance(ev, ResponseData):
                o.response_bytes += len(ev.data)
                after = http.next_response_event()
                if isinstance(after, ResponseEnded) and self.conn.send_last(ex.stream_id, ev.data):
                    http.data_to_client()
                    self.side.flush()  # the last piece carries END_STREAM: one frame, no empty DATA after it
                    return after.keep_alive
                if not await self.side.send_all(ex.stream_id, ev.data):
                    return False
            elif isinstance(ev, ResponseEnded):
                self.conn.end(ex.stream_id)
                self.side.flush()
                return ev.keep_alive
            else:  # CLOSED: the upstream broke off (or answered garbage)
                if not ex.answered:
                    self.server._count("upstream_error")
                    o.reason = "upstream_error"
                    self._answer(ex, 502, b"upstream closed before its response\n")
                else:
                    self.conn.reset(ex.stream_id, ErrorCodes.INTERNAL_ERROR)
                    self.side.flush()
                return False


_CLIENT_RESET = object()  # in an exchange's `replies`: the client reset the stream


class _StaleUpstream(Exception):
    """A reused keep-alive upstream stream ended before any byte of the response: send the request again."""




_NOT_TO_H1 = frozenset({b"host", b"content-length", b"expect"})  # written below, or answered here (100)


def _h1_head(head: RequestHead, no_body: bool) -> bytes:
    """An h2 request head as HTTP/1.1 (its values were checked free of CR/LF/NUL: http2.request_head)."""
    parts = [head.method, b" ", head.target, b" HTTP/1.1\r\nhost: ", head.host, b"\r\n"]
    for name, value in head.headers:
        if name in HOP_BY_HOP or name in _NOT_TO_H1:
            continue
        parts += (name, b": ", value, b"\r\n")
    if head.content_length is not None:
        parts.append(b"content-length: %d\r\n" % head.content_length)
    elif not no_body:
        parts.append(b"transfer-encoding: chunked\r\n")
    parts.append(b"\r\n")
    return b"".join(parts)


def _forwarded_fields(fields: tuple[tuple[bytes, bytes], ...]) -> list[tuple[bytes, bytes]]:
    """An HTTP/1.1 response's fields (lowercase) as HTTP/1.1 forwarding passes them on (http1's hop-by-hop set,
    and whatever its Connection field names: RFC 9110 §7.6.1); H2Conn.send_response drops what HTTP/2 forbids."""
    out: list[tuple[bytes, bytes]] = []
    named: set[bytes] | None = None
    for name, value in fields:
        low = name.lower()
        if low in _H1_HOP_BY_HOP:
            if low == b"connection":
                tokens = _connection_tokens(value)
                named = tokens if named is None else named | tokens
            continue
        out.append((low, value))
    if named:
        out = [(k, v) for k, v in out if k not in named]
    return out


def _header(headers: tuple[tuple[bytes, bytes], ...] | list[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    for k, v in headers:
        if k == name:
            return v
    return None
