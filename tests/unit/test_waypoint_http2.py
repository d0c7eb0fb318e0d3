"""The waypoint's h2c layer without sockets: heads as the policy sees them, refusals on one stream only, window
given back only on `ack`, the connection's end for floods; and protocol selection (port and first bytes)."""

from __future__ import annotations

import h2.config
import h2.connection
import h2.events
import pytest
from h2.errors import ErrorCodes
from hyperframe.frame import DataFrame, Frame, GoAwayFrame, RstStreamFrame

from ztunnel.config.loader import build_config, load_documents
from ztunnel.config.model import ServicePort, Workload
from ztunnel.policy.decision import ConnectionAttributes
from ztunnel.waypoint.http1 import RequestHead
from ztunnel.waypoint.http2 import (
    BadRequest,
    Closed,
    Data,
    H2Conn,
    H2Limits,
    RequestStarted,
)
from ztunnel.waypoint.server import _h1_head, check_attributes, classify, port_protocol


def _client() -> h2.connection.H2Connection:
    c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, validate_outbound_headers=False))
    c.initiate_connection()
    return c


def _req(path: str = "/hello", method: str = "GET", **extra: str) -> list[tuple[str, str]]:
    return [(":method", method), (":path", path), (":scheme", "http"), (":authority", "greeter"), *extra.items()]


def _exchange(server: H2Conn, client: h2.connection.H2Connection) -> list[object]:
    events = server.receive(client.data_to_send())
    client.receive_data(server.data_to_send())
    return [e for e in events if type(e).__name__ != "WindowOpened"]


def test_request_head_as_the_policy_sees_it() -> None:
    server, client = H2Conn(client_side=False), _client()
    client.send_headers(1, [*_req("/api/hello?x=1"), ("x-user", "a"), ("content-type", "application/grpc")])
    (ev,) = _exchange(server, client)
    assert isinstance(ev, RequestStarted) and not ev.ended
    head = ev.head
    assert (head.method, head.target, head.path, head.host, head.version) == (
        b"GET",
        b"/api/hello?x=1",
        b"/api/hello",
        b"greeter",
        b"2",
    )
    assert head.headers == ((b"x-user", b"a"), (b"content-type", b"application/grpc"))


def test_path_normalized_alike_for_policy_and_app() -> None:
    """The :path the policy matches is the one forwarded (an h2 or HTTP/1.1 upstream): `%2e%2e`, `\\` and `//`
    resolved, the query as sent."""
    server, client = H2Conn(client_side=False), _client()
    client.send_headers(1, _req("/public/%2e%2E/\\/admin/%7Ex?q=/../"), end_stream=True)
    (ev, _) = _exchange(server, client)
    assert isinstance(ev, RequestStarted)
    assert (ev.head.target, ev.head.path) == (b"/admin/~x?q=/../", b"/admin/~x")
    assert _h1_head(ev.head, True).startswith(b"GET /admin/~x?q=/../ HTTP/1.1\r\n")


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        (_req("http://evil/x"), 400),  # not origin-form: the policy must see the path the app serves
        ([(":method", "CONNECT"), (":authority", "greeter:80")], 501),  # no tunnels inside h2c
        (_req("*", "GET"), 400),  # `*` is OPTIONS' only
        (_req("/x", "delete"), 400),  # Istio: a method not in upper case is refused (a DENY on DELETE holds)
        (_req("/public/#/../admin"), 400),  # a fragment: an app resolving it would serve /admin
        (_req("/public/%00/../admin"), 400),  # %00: always refused, as Istio
    ],
)
def test_refused_on_its_stream_only(headers: list[tuple[str, str]], status: int) -> None:
    server, client = H2Conn(client_side=False), _client()
    client.send_headers(1, headers, end_stream=True)
    client.send_headers(3, _req(), end_stream=True)
    events = server.receive(client.data_to_send())
    refused = [e for e in events if isinstance(e, BadRequest)]
    started = [e for e in events if isinstance(e, RequestStarted)]
    assert [(e.stream_id, e.status) for e in refused] == [(1, status)]
    assert [e.stream_id for e in started] == [3]
    answers = client.receive_data(server.data_to_send())
    statuses = [dict(e.headers)[b":status"] for e in answers if isinstance(e, h2.events.ResponseReceived)]
    assert statuses == [str(status).encode()]
    assert server.closed is None


@pytest.mark.parametrize(
    "headers",
    [
        [*_req(), ("x-a", "b\r\nx-injected: 1")],  # would split a field on an HTTP/1.1 upstream
        [*_req("/x", "CONNECT")],  # an ordinary CONNECT with :path and :scheme
        [("x-first", "1"), *_req()],  # a pseudo-header after a regular field
    ],
)
def test_malformed_head_ends_the_connection(headers: list[tuple[str, str]]) -> None:
    server, client = H2Conn(client_side=False), _client()
    client.send_headers(1, headers, end_stream=True)
    events = server.receive(client.data_to_send())
    assert [(type(e), getattr(e, "code", None)) for e in events] == [(Closed, ErrorCodes.PROTOCOL_ERROR)]


def test_window_is_given_back_only_when_passed_on() -> None:
    limits = H2Limits(stream_window=65535, connection_window=65535)
    server, client = H2Conn(client_side=False, limits=limits), _client()
    client.send_headers(1, _req("/upload", "POST"))
    for _ in range(4):
        client.send_data(1, b"x" * 15000)
    events = _exchange(server, client)
    assert sum(len(e.data) for e in events if isinstance(e, Data)) == 60000
    assert client.local_flow_control_window(1) == 65535 - 60000  # nothing acknowledged yet: backpressure
    server.ack(1, 60000)
    client.receive_data(server.data_to_send())
    assert client.local_flow_control_window(1) == 65535


def test_send_data_stops_at_the_peer_window() -> None:
    server, client = H2Conn(client_side=False), _client()
    client.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 1000})
    client.send_headers(1, _req(), end_stream=True)
    _exchange(server, client)
    server.receive(client.data_to_send())
    assert server.send_response(1, 200, [(b"content-type", b"text/plain")])
    assert server.send_data(1, b"y" * 5000) == 1000


def test_rapid_reset_ends_the_connection() -> None:
    server, client = H2Conn(client_side=False, limits=H2Limits(reset_budget=10)), _client()
    for sid in range(1, 40, 2):
        client.send_headers(sid, _req(), end_stream=True)
        client.reset_stream(sid, ErrorCodes.CANCEL)
    events = server.receive(client.data_to_send())
    assert events and isinstance(events[-1], Closed)
    assert (events[-1].code, events[-1].ours) == (ErrorCodes.ENHANCE_YOUR_CALM, True)
    goaway = [e for e in client.receive_data(server.data_to_send()) if isinstance(e, h2.events.ConnectionTerminated)]
    assert goaway and goaway[0].error_code == ErrorCodes.ENHANCE_YOUR_CALM


def test_h2_head_as_http1_for_the_upstream() -> None:
    server, client = H2Conn(client_side=False), _client()
    client.send_headers(1, [*_req("/up", "POST"), ("te", "trailers"), ("expect", "100-continue"), ("x-a", "1")])
    (ev,) = _exchange(server, client)
    assert isinstance(ev, RequestStarted)
    assert _h1_head(ev.head, no_body=False) == (
        b"POST /up HTTP/1.1\r\nhost: greeter\r\nx-a: 1\r\ntransfer-encoding: chunked\r\n\r\n"
    )
    client.send_headers(3, [*_req("/up", "POST"), ("content-length", "5")])
    (ev,) = _exchange(server, client)
    assert isinstance(ev, RequestStarted)
    assert _h1_head(ev.head, no_body=False) == b"POST /up HTTP/1.1\r\nhost: greeter\r\ncontent-length: 5\r\n\r\n"


@pytest.mark.parametrize(
    ("data", "final", "kind"),
    [
        (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", False, "h2c"),
        (b"PRI * HT", False, "more"),
        (b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n", False, "http1"),
        (b"GE", False, "more"),
        (b"GE", True, "tcp"),
        (b"GET /very/long", False, "more"),
        (b"GET /very/long", True, "http1"),
        (b"M-SEARCH * HTTP/1.1\r\n", False, "http1"),
        (b"\x16\x03\x01\x02\x00", False, "tcp"),  # a TLS ClientHello
        (b"get / HTTP/1.1\r\n", False, "tcp"),
        (b"HELLO there\r\n", False, "tcp"),
        (b"", True, "tcp"),  # a silent client after the deadline: a server-first protocol
        (b"\r\nGET / HTTP/1.1\r\n", False, "http1"),  # an empty line before the request line is allowed
        (b"\r\n", False, "more"),
    ],
)
def test_first_bytes(data: bytes, final: bool, kind: str) -> None:
    assert classify(data, final=final) == kind


@pytest.mark.parametrize(
    ("name", "app_protocol", "protocol"),
    [
        ("tcp-echo", "", "tcp"),
        ("tcp", "", "tcp"),
        ("http-web", "", "http"),
        ("http2", "", "http2"),
        ("grpc-api", "", "grpc"),
        ("http-web", "tcp", "tcp"),  # appProtocol wins over the name
        ("web", "", ""),
        ("tcpish", "", ""),
    ],
)
def test_port_protocol_as_istio_selects_it(name: str, app_protocol: str, protocol: str) -> None:
    assert port_protocol(ServicePort(80, 80, name=name, app_protocol=app_protocol)) == protocol


def test_loader_keeps_app_protocol() -> None:
    text = """
apiVersion: v1
kind: Service
metadata: {name: s, namespace: n}
spec: {clusterIP: 10.96.0.1, ports: [{port: 80, name: web, appProtocol: tcp}, {port: 81}]}
"""

    config = build_config(load_documents(text, "s.yaml"))
    (service,) = config.services
    assert [(p.name, p.app_protocol) for p in service.ports] == [("web", "tcp"), ("", "")]


def _frames(data: bytes) -> list[Frame]:
    out = []
    while data:
        frame, length = Frame.parse_frame_header(memoryview(data[:9]))
        frame.parse_body(memoryview(data[9 : 9 + length]))
        out.append(frame)
        data = data[9 + length :]
    return out


def test_graceful_goaway_lets_open_streams_finish_and_refuses_new_ones() -> None:
    server, client = H2Conn(client_side=False), _client()
    client.send_headers(1, _req(), end_stream=True)
    _exchange(server, client)
    server.goaway()
    server.respond(1, 200, b"still served")  # h2's own close_connection would refuse this
    frames = _frames(server.data_to_send())
    goaway = [f for f in frames if isinstance(f, GoAwayFrame)]
    assert [(f.error_code, f.last_stream_id) for f in goaway] == [(0, 1)]
    assert [f.data for f in frames if isinstance(f, DataFrame)] == [b"still served"]
    client.send_headers(3, _req(), end_stream=True)  # a client that ignores the GOAWAY
    assert not [e for e in server.receive(client.data_to_send()) if isinstance(e, RequestStarted)]
    resets = [f for f in _frames(server.data_to_send()) if isinstance(f, RstStreamFrame)]
    assert [(f.stream_id, f.error_code) for f in resets] == [(3, ErrorCodes.REFUSED_STREAM)]


def test_an_h2_request_as_a_custom_provider_sees_it() -> None:
    """Envoy's AttributeContext for an h2c request: protocol HTTP/2, the path with its query, :authority as host."""
    server, client = H2Conn(client_side=False), _client()
    client.send_headers(1, [*_req("/book?id=1", "POST"), ("x-user", "a")], end_stream=True)
    (ev,) = [e for e in _exchange(server, client) if isinstance(e, RequestStarted)]
    assert isinstance(ev, RequestStarted)
    pod = Workload("uid", "app", "demo", "node-b", "app", ("10.0.0.2",), {})
    conn = ConnectionAttributes(
        source_principal="spiffe://cluster.local/ns/demo/sa/client",
        source_ip="10.0.0.1",
        destination=pod,
        destination_ip="10.0.0.2",
        destination_port=8080,
    )
    attrs = check_attributes(ev.head, conn, 40000)
    assert (attrs.protocol, attrs.method, attrs.path, attrs.host) == ("HTTP/2", "POST", "/book?id=1", "greeter")
    assert ("x-user", "a") in attrs.headers


def test_upstream_h2_drops_forged_headers_in_either_spelling() -> None:
    """To an h2 app: a client's x-forwarded-client-cert and its copy of a header the waypoint writes (a JWT
    output) go, `_` spellings too, since CGI-style apps read `x_jwt_payload` as x-jwt-payload."""
    head = RequestHead(
        method=b"GET", target=b"/x", path=b"/x", host=b"greeter", version=b"2", content_length=None,
        chunked=False, keep_alive=True, upgrade=None, expect_continue=False,
        headers=((b"x_jwt_payload", b"forged"), (b"x_forwarded_client_cert", b"forged"), (b"x-ok", b"1")),
    )  # fmt: skip
    up, app = H2Conn(client_side=True), H2Conn(client_side=False)
    app.receive(up.data_to_send())
    up.receive(app.data_to_send())
    up.send_request(head, b"http", ((b"x-jwt-payload", b"real"),), frozenset({b"x-jwt-payload"}), end_stream=True)
    (started,) = [e for e in app.receive(up.data_to_send()) if isinstance(e, RequestStarted)]
    assert started.head.headers == ((b"x-ok", b"1"), (b"x-jwt-payload", b"real"))
