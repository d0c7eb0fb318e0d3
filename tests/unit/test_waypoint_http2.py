"""The waypoint's h2c layer without sockets: heads as the policy sees them, refusals on one stream only, window
given back only on `ack`, the connection's end for floods; and protocol selection (port and first bytes)."""

from __future__ import annotations

import random

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import hpack
import pytest
from h2.errors import ErrorCodes
from h2.utilities import HeaderValidationFlags, normalize_inbound_headers, validate_headers
from hpack import NeverIndexedHeaderTuple
from hyperframe.frame import DataFrame, Frame, GoAwayFrame, HeadersFrame, RstStreamFrame

from ztunnel.config.loader import build_config, load_documents
from ztunnel.config.model import ServicePort, Workload
from ztunnel.policy.decision import ConnectionAttributes
from ztunnel.waypoint.http1 import RequestHead
from ztunnel.waypoint.http2 import (
    _REQUEST,
    _RESPONSE,
    _TRAILERS,
    BadRequest,
    Closed,
    Data,
    H2Conn,
    H2Limits,
    RequestStarted,
    _Decoder,
    _Encoder,
    check_received,
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


@pytest.mark.parametrize("underscores", ["ALLOW", "DROP_HEADER"])
def test_client_cert_header_is_not_in_the_head_the_policy_sees(underscores: str) -> None:
    """A client's x-forwarded-client-cert, in either spelling a CGI-style app reads as it, is gone before the
    policy and ext-authz see the head (Envoy's SANITIZE), not only from what the app is sent."""
    server, client = H2Conn(client_side=False, limits=H2Limits(headers_with_underscores=underscores)), _client()
    forged = "URI=spiffe://cluster.local/ns/x/sa/admin"
    client.send_headers(
        1, [*_req(), ("x-forwarded-client-cert", forged), ("x_forwarded_client_cert", forged), ("x-user", "a")],
        end_stream=True,
    )
    (ev, _) = _exchange(server, client)
    assert isinstance(ev, RequestStarted)
    assert ev.head.headers == ((b"x-user", b"a"),)


def test_client_cert_header_with_an_underscore_refused_as_any() -> None:
    """REJECT_REQUEST refuses any name with `_` (400), the `x_forwarded_client_cert` spelling too, as HTTP/1.1."""
    server, client = H2Conn(client_side=False, limits=H2Limits(headers_with_underscores="REJECT_REQUEST")), _client()
    client.send_headers(1, [*_req(), ("x_forwarded_client_cert", "URI=spiffe://x")], end_stream=True)
    (ev, *_) = _exchange(server, client)
    assert isinstance(ev, BadRequest) and ev.status == 400


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
        ([*_req(), ("x(y", "1")], 400),  # not a token: no HTTP/1.1 upstream may be sent it (nghttp2 refuses it too)
        ([*_req(), ("x-a", "b\x01c")], 400),  # a control character other than HTAB
        ([*_req(), ("x-a", "b\x7fc")], 400),
        (_req("/a\tb"), 400),  # a tab in the request line
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


# --- h2's inbound validation and HPACK, as the waypoint does them (check_received, _Encoder, _Decoder) ---

_KINDS = {  # check_received's kinds -> h2's validation flags for the same block
    _REQUEST: HeaderValidationFlags(is_client=False, is_trailer=False, is_response_header=False, is_push_promise=False),
    _RESPONSE: HeaderValidationFlags(is_client=True, is_trailer=False, is_response_header=True, is_push_promise=False),
    _TRAILERS: HeaderValidationFlags(is_client=False, is_trailer=True, is_response_header=False, is_push_promise=False),
}
_BASE = {
    _REQUEST: [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"a"), (b":path", b"/")],
    _RESPONSE: [(b":status", b"200")],
    _TRAILERS: [(b"grpc-status", b"0")],
}


def _h2_refuses(headers: list[tuple[bytes, bytes]], kind: int) -> bool:
    try:
        list(validate_headers(normalize_inbound_headers(headers, _KINDS[kind]), _KINDS[kind]))
    except h2.exceptions.ProtocolError:
        return True
    return False


def _we_refuse(headers: list[tuple[bytes, bytes]], kind: int) -> bool:
    try:
        check_received(list(normalize_inbound_headers(headers, _KINDS[kind])), kind)
    except h2.exceptions.ProtocolError:
        return True
    return False


def _blocks() -> list[tuple[list[tuple[bytes, bytes]], int]]:
    """Header blocks of each kind, good and bad: every byte in a name and at each place in a value, every set of
    pseudo-headers with and without CONNECT, and random mixes of fields that are each fine or each not."""
    out: list[tuple[list[tuple[bytes, bytes]], int]] = []
    for kind, base in _BASE.items():
        for c in range(256):
            b = bytes((c,))
            out.append(([*base, (b"x" + b, b"v")], kind))
            out.append(([*base, (b + b"x", b"v")], kind))
            out += [([*base, (b"x", v)], kind) for v in (b + b"v", b"v" + b + b"v", b"v" + b, b)]
        for i in range(len(base)):  # each field of the good block emptied, or dropped
            out.append(([*base[:i], (base[i][0], b""), *base[i + 1 :]], kind))
            out.append(([*base[:i], *base[i + 1 :]], kind))
        pseudo = [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"a"), (b":path", b"/"),
                  (b":status", b"200"), (b":protocol", b"websocket")]  # fmt: skip
        for mask in range(64):
            chosen = [f for i, f in enumerate(pseudo) if mask >> i & 1]
            out.append(([*chosen, (b"x", b"1")], kind))
            out.append(([(n, b"CONNECT") if n == b":method" else (n, v) for n, v in chosen], kind))
    pool = [
        (b":method", b"GET"), (b":method", b"CONNECT"), (b":scheme", b"http"), (b":path", b"/a"), (b":path", b""),
        (b":authority", b"a"), (b":authority", b"b"), (b":status", b"200"), (b":status", b"100"), (b":foo", b"x"),
        (b":protocol", b"ws"), (b"host", b"a"), (b"host", b"b"), (b"te", b"trailers"), (b"te", b"TRAILERS"),
        (b"te", b"gzip"), (b"connection", b"close"), (b"keep-alive", b"1"), (b"upgrade", b"h2"), (b"cookie", b"a=1"),
        (b"cookie", b"b=2"), (b"x", b" lead"), (b"x", b"trail\t"), (b"x", b"in side"), (b"", b"empty"),
        (b"X-Up", b"1"), (b"x:y", b"1"), (b"x", b"a\x00b"), (b"content-length", b"5"), (b"x", b""),
    ]  # fmt: skip
    rng = random.Random(7)
    for _ in range(6000):
        fields = [rng.choice(pool) for _ in range(rng.randint(0, 7))]
        out.append((fields, rng.choice(list(_BASE))))
        out.append(([*_BASE[_REQUEST], *fields], _REQUEST))
    return out


def test_received_headers_are_refused_exactly_as_h2_refuses_them() -> None:
    """check_received replaces h2's inbound validation (turned off in the waypoint's h2): the same blocks pass."""
    blocks = _blocks()
    verdicts = [(_h2_refuses(headers, kind), _we_refuse(headers, kind)) for headers, kind in blocks]
    differ = [(blocks[i], v) for i, v in enumerate(verdicts) if v[0] != v[1]]
    assert differ == []
    refused = sum(theirs for theirs, _ in verdicts)
    assert 0.2 * len(blocks) < refused < 0.9 * len(blocks)  # the corpus holds both, in bulk


def test_a_bad_field_still_ends_the_connection_with_h2_validation_off() -> None:
    server, client = H2Conn(client_side=False), _client()
    assert not server.h2.config.validate_inbound_headers
    client.send_headers(1, [*_req(), ("x-a", "b\x00c")], end_stream=True)
    events = server.receive(client.data_to_send())
    assert [(type(e), getattr(e, "code", None)) for e in events] == [(Closed, ErrorCodes.PROTOCOL_ERROR)]


def test_encoder_blocks_decode_as_sent_and_signal_a_table_size_change() -> None:
    encoder, decoder = _Encoder(), hpack.Decoder()
    fields = [
        (b":status", b"200"), (b"content-type", b"text/plain"), (b"content-length", b"1" * 200),
        (b"x-custom", b"v"), (b"authorization", b"Bearer x"), (b"cookie", b"short=1"), (b"cookie", b"c" * 30),
        (b"x-long-name-" + b"n" * 150, b""),
    ]  # fmt: skip
    block = encoder.encode(fields)
    decoded = decoder.decode(block, raw=True)
    assert decoded == fields
    assert [isinstance(h, NeverIndexedHeaderTuple) for h in decoded] == [False] * 4 + [True, True, False, False]
    assert len(decoder.header_table.dynamic_entries) == 0  # nothing indexed: the peer's table stays empty
    assert encoder.encode([(b":status", b"200")]) == b"\x88"
    encoder.header_table_size = 0  # the peer lowered SETTINGS_HEADER_TABLE_SIZE
    block = encoder.encode([(b":status", b"404")])
    assert block[0] & 0xE0 == 0x20  # a dynamic table size update opens the next block
    assert decoder.decode(block, raw=True) == [(b":status", b"404")]


def test_decoder_gives_what_hpack_gives_for_every_block() -> None:
    """_Decoder's short way (blocks of one-byte indexed fields) against hpack's decoder on one stream of blocks
    from hpack's encoder (which indexes, so repeats come as indexed fields); errors alike."""
    encoder, ours, theirs = hpack.Encoder(), _Decoder(), hpack.Decoder()
    rng = random.Random(3)
    names = [b":method", b":path", b"x-a", b"x-b", b"user-agent", b"accept"]
    values = [b"GET", b"/", b"/a", b"1", b"2", b"bench", b"*/*"]
    indexed_only = 0
    for _ in range(2000):
        fields = [(rng.choice(names), rng.choice(values)) for _ in range(rng.randint(0, 6))]
        block = encoder.encode(fields, huffman=rng.random() < 0.5)
        indexed_only += not block.translate(None, bytes(range(0x81, 0xFF)))
        assert ours.decode(block, raw=True) == theirs.decode(block, raw=True) == fields
    assert indexed_only > 500  # the short way was taken (and agreed)
    for bad in (b"\xfe", b"\x82\xfe"):  # an index past the dynamic table
        with pytest.raises(hpack.InvalidTableIndex):
            _Decoder().decode(bad, raw=True)
    small = _Decoder()
    small.max_header_list_size = 40
    with pytest.raises(hpack.OversizedHeaderListError):
        small.decode(b"\x82\x84", raw=True)  # :method GET (32+10) + :path / (32+6)


def _raw_request(encoder: hpack.Encoder, sid: int) -> bytes:
    frame = HeadersFrame(sid, encoder.encode(_req_bytes()), flags=["END_HEADERS", "END_STREAM"])
    return bytes(frame.serialize())


def _req_bytes() -> list[tuple[bytes, bytes]]:
    return [(n.encode(), v.encode()) for n, v in _req()]


def test_concurrent_stream_limit_holds_with_closed_streams_held() -> None:
    """h2's open-stream count is skipped below the limit (_H2._open_streams): at the limit, answered streams
    still make room and open ones still refuse one more."""
    limit = 4
    server, client = H2Conn(client_side=False, limits=H2Limits(max_concurrent_streams=limit)), _client()
    _exchange(server, client)  # SETTINGS acknowledged: the limit is in force
    encoder = hpack.Encoder()
    for rnd in range(3):  # each round: `limit` streams open at once, then answered (closed)
        sids = [1 + 2 * (rnd * limit + i) for i in range(limit)]
        events = server.receive(b"".join(_raw_request(encoder, sid) for sid in sids))
        assert [e.stream_id for e in events if isinstance(e, RequestStarted)] == sids
        for sid in sids:
            server.respond(sid, 200, b"ok")
        server.data_to_send()
    sids = [101 + 2 * i for i in range(limit)]  # as many as the limit, none answered
    events = server.receive(b"".join(_raw_request(encoder, sid) for sid in sids))
    assert [e.stream_id for e in events if isinstance(e, RequestStarted)] == sids
    (closed,) = server.receive(_raw_request(encoder, 201))  # one more
    assert isinstance(closed, Closed) and closed.code == ErrorCodes.PROTOCOL_ERROR
    assert "Max inbound streams" in closed.reason


def test_answered_streams_are_not_remembered_forever() -> None:
    """A long-lived connection: the set of answered streams (for the premature-reset count) stays bounded, and
    resets of long-answered streams still cost the peer nothing."""
    server, client = H2Conn(client_side=False, limits=H2Limits(open_budget=10_000, reset_budget=5)), _client()
    _exchange(server, client)
    encoder = hpack.Encoder()
    for i in range(2000):
        server.receive(_raw_request(encoder, 1 + 2 * i))
        server.respond(1 + 2 * i, 200, b"ok")
        server.data_to_send()
    assert len(server._answered) <= 300
    resets = b"".join(bytes(RstStreamFrame(1 + 2 * i, error_code=8).serialize()) for i in range(50))
    assert not [e for e in server.receive(resets) if isinstance(e, Closed)]


def _two_servers(requests: int) -> tuple[H2Conn, H2Conn]:
    """Two server connections in the same state: each got the same client preface and requests (1, 3, ...)."""
    client = _client()
    for i in range(requests):
        client.send_headers(1 + 2 * i, _req(), end_stream=True)
    data = client.data_to_send()
    servers = (H2Conn(client_side=False), H2Conn(client_side=False))
    for server in servers:
        server.receive(data)
        server.data_to_send()
    return servers


def test_response_head_and_last_data_go_out_as_h2_sends_them() -> None:
    """send_response/send_last queue their frames without h2's send_headers/send_data: the same bytes, stream
    states, windows and refusals as h2's own calls on a connection in the same state."""
    ours, h2s = _two_servers(4)
    fields = [(b"content-type", b"text/plain"), (b"content-length", b"5"), (b"x-app", b"a" * 300)]
    assert ours.send_response(1, 200, fields)
    h2s.h2.send_headers(1, [(b":status", b"200"), *fields])
    assert ours.send_last(1, b"hello")
    h2s.h2.send_data(1, b"hello", end_stream=True)
    assert ours.send_response(3, 204, [], end_stream=True)
    h2s.h2.send_headers(3, [(b":status", b"204")], end_stream=True)
    assert ours.send_response(5, 200, fields)
    h2s.h2.send_headers(5, [(b":status", b"200"), *fields])
    assert not ours.send_response(5, 200, fields)  # a second head without END_STREAM: trailers must end it
    with pytest.raises(h2.exceptions.ProtocolError):
        h2s.h2.send_headers(5, [(b":status", b"200"), *fields])
    assert ours.data_to_send() == h2s.data_to_send()
    for sid in (1, 3, 5, 7):
        a, b = ours.h2.streams[sid], h2s.h2.streams[sid]
        assert (a.state_machine.state, a.outbound_flow_control_window) == (
            b.state_machine.state,
            b.outbound_flow_control_window,
        )
    assert ours.h2.outbound_flow_control_window == h2s.h2.outbound_flow_control_window
    assert not ours.send_response(1, 200, fields)  # closed: refused as h2 refuses it
    with pytest.raises(h2.exceptions.StreamClosedError):
        h2s.h2.send_headers(1, [(b":status", b"200")])
    assert not ours.send_last(3, b"late")
    client, server = _client(), H2Conn(client_side=False)  # and a client reads them
    client.send_headers(1, _req(), end_stream=True)
    server.receive(client.data_to_send())
    assert server.send_response(1, 200, fields) and server.send_last(1, b"hello")
    events = client.receive_data(server.data_to_send())
    assert [(type(e).__name__, getattr(e, "headers", None) or getattr(e, "data", None)) for e in events[-3:]] == [
        ("ResponseReceived", [(b":status", b"200"), *fields]),
        ("DataReceived", b"hello"),
        ("StreamEnded", None),
    ]
