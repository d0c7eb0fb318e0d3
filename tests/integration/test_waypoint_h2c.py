"""HTTP/2 with prior knowledge (h2c) through the waypoint process, with clients and servers we did not write:
curl --http2-prior-knowledge, Node's http2 client and grpcio (client and server), each reaching the waypoint
through the kit's TCP→HBONE bridge (the source node proxy's part). Each stream is decided on its own (one
connection carries an allowed and a denied request); bodies stream with flow control; gRPC goes upstream as
h2c; malformed HTTP/2 ends that connection with a GOAWAY carrying the spec's code while the waypoint serves on.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import json
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
import h2.config
import h2.connection
import h2.events
import h2.settings
import pytest
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    Frame,
    GoAwayFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)

from tests.support.waypoint import (
    APP_PORT,
    BIG,
    CONFIG,
    GREETER_IP,
    KeepAliveApp,
    client_pool,
    proxy_and_waypoint,
    tcp_bridge,
    tunnel,
    tunnel_to,
)
from ztunnel.hbone.client import HbonePool
from ztunnel.hbone.stream import HboneStream
from ztunnel.net.streams import StreamClosed

GRPC_VIP = "10.96.0.68"
GRPC_PORT = 50051
PLAIN_VIP = "10.96.0.71"
PLAIN_PORT = 8082  # Python's http.server (HTTP/1.0 answers, body until close), as the lab's apps
NODE_VIP = "10.96.0.72"
NODE_PORT = 8083  # Node's http server: reads chunked request bodies, answers chunked
EXTRA = f"""\
---
apiVersion: v1
kind: Service
metadata: {{name: hello-grpc, namespace: greet}}
spec:
  clusterIP: {GRPC_VIP}
  selector: {{app: greeter-service}}
  ports: [{{port: {GRPC_PORT}, targetPort: {GRPC_PORT}, name: grpc}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: hello-grpc, namespace: greet}}
spec:
  targetRefs: [{{kind: Service, group: "", name: hello-grpc}}]
  action: ALLOW
  rules:
  - to:
    - operation:
        paths: ["/test.Greeter/Hello", "/test.Greeter/Echo", "/test.Greeter/First", "/test.Greeter/Slow"]
---
apiVersion: v1
kind: Service
metadata: {{name: plain, namespace: greet}}
spec: {{clusterIP: {PLAIN_VIP}, selector: {{app: greeter-service}}, ports: [{{port: 80, targetPort: {PLAIN_PORT}}}]}}
---
apiVersion: v1
kind: Service
metadata: {{name: nodeapp, namespace: greet}}
spec: {{clusterIP: {NODE_VIP}, selector: {{app: greeter-service}}, ports: [{{port: 80, targetPort: {NODE_PORT}}}]}}
"""
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


class _PlainHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        if self.path.endswith("?hop"):  # fields the app's Connection field makes hop-by-hop, and one it does not
            self.send_header("Connection", "x-hop, Keep-Alive")
            self.send_header("X-Hop", "for the waypoint only")
            self.send_header("Keep-Alive", "timeout=5")
            self.send_header("X-Kept", "yes")
        self.end_headers()
        self.wfile.write(b"plain " + self.path.encode() + b"\n")

    def log_message(self, format: str, *args: object) -> None:
        pass


@dataclass
class Setup:
    ca_dir: Path
    waypoint_log: Path


def _hello(request: bytes, context: grpc.ServicerContext) -> bytes:
    return b"hello " + request


def _echo(requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
    yield from requests


def _first(requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
    return b"first: " + next(requests)  # answers before the client's stream ends


def _slow(request: bytes, context: grpc.ServicerContext) -> bytes:
    time.sleep(0.3)
    return b"slow " + request


def _grpc_server() -> grpc.Server:
    handlers = {
        "Slow": grpc.unary_unary_rpc_method_handler(_slow),
        "First": grpc.stream_unary_rpc_method_handler(_first),
        "Hello": grpc.unary_unary_rpc_method_handler(_hello),
        "Other": grpc.unary_unary_rpc_method_handler(_hello),
        "Echo": grpc.stream_stream_rpc_method_handler(_echo),
    }
    # two streams per connection: the waypoint must spread a client's calls over more upstream connections
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8), options=[("grpc.max_concurrent_streams", 2)])
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("test.Greeter", handlers),))
    server.add_insecure_port(f"{GREETER_IP}:{GRPC_PORT}")
    server.start()
    return server


# Answers each request with its method, path and the body's length (read chunked or not), chunked itself.
NODE_APP = r"""
const http = require('http');
const [host, port] = process.argv.slice(1);
http.createServer((req, res) => {
  let n = 0;
  req.on('data', (d) => { n += d.length; });
  req.on('end', () => {
    res.write(`node ${req.method} ${req.url} `);
    res.end(`${n} body bytes, te=${req.headers['transfer-encoding'] || ''}\n`);
  });
}).listen(parseInt(port), host, () => console.log('listening'));
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, ca_dir: Path) -> Iterator[Setup]:
    workdir = tmp_path_factory.mktemp("waypoint-h2c")
    config = workdir / "cluster.yaml"
    config.write_text(CONFIG + EXTRA)
    app = KeepAliveApp(GREETER_IP, APP_PORT)
    grpc_server = _grpc_server()
    plain = http.server.ThreadingHTTPServer((GREETER_IP, PLAIN_PORT), _PlainHandler)
    threading.Thread(target=plain.serve_forever, daemon=True).start()
    node_app = subprocess.Popen(["node", "-e", NODE_APP, GREETER_IP, str(NODE_PORT)], stdout=subprocess.PIPE)
    try:
        assert node_app.stdout is not None and node_app.stdout.readline() == b"listening\n"
        with proxy_and_waypoint(config, ca_dir, workdir) as (_, _, log_path):
            yield Setup(ca_dir, log_path)
    finally:
        grpc_server.stop(None)
        plain.shutdown()
        plain.server_close()
        node_app.kill()
        node_app.wait()
        if node_app.stdout is not None:
            node_app.stdout.close()
        app.close()


@pytest.fixture
async def client(setup: Setup) -> AsyncIterator[HbonePool]:
    async with client_pool(setup.ca_dir) as pool:
        yield pool


async def _run(*argv: str, stdin: bytes | None = None) -> str:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        async with asyncio.timeout(60):
            out, err = await proc.communicate(stdin)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, err.decode()
    return out.decode()


async def _curl(port: int, path: str, *args: str) -> str:
    return await _run(
        "curl", "--http2-prior-knowledge", "-sS", "--max-time", "20", "-w", "|%{http_version} %{http_code}",
        *args, f"http://127.0.0.1:{port}{path}",
    )  # fmt: skip


async def test_curl_requests_are_decided(client: HbonePool) -> None:
    """curl 7.88 cannot reuse an h2c connection for a second URL (its own framing-layer error, with any
    server), so each request is one curl run; one connection carrying both is the Node test's."""
    async with tcp_bridge(client) as port:
        assert await _curl(port, "/hello") == "hello GET /hello (0 body bytes) #1\n|2 200"
        assert await _curl(port, "/version") == "RBAC: access denied|2 403"
        assert await _curl(port, "/hello", "-X", "POST") == "RBAC: access denied|2 403"
        upload = await _curl(port, "/upload", "--data-binary", "x" * 3000, "-H", "expect: 100-continue")
        assert upload == "hello POST /upload (3000 body bytes) #1\n|2 200"


async def test_curl_h2c_to_an_http10_app(client: HbonePool) -> None:
    """The lab's apps are Python's http.server: HTTP/1.0 answers without a length, ended by close."""
    async with tcp_bridge(client, PLAIN_VIP, 80) as port:
        assert await _curl(port, "/hello") == "plain /hello\n|2 200"
        assert await _curl(port, "/version") == "RBAC: access denied|2 403"


async def test_fields_the_apps_connection_field_names_stop_at_the_waypoint(client: HbonePool) -> None:
    """RFC 9110 §7.6.1: a field the response's Connection field names is for the hop it arrived on. The h2c
    client gets the fields HTTP/1.1 forwarding passes on (the app's others), none of the named ones."""
    async with tcp_bridge(client, PLAIN_VIP, 80) as port:
        out = await _curl(port, "/hello?hop", "-D", "-")
    head, _, body = out.partition("\r\n\r\n")
    names = [line.split(":", 1)[0].lower() for line in head.split("\r\n")[1:]]
    assert body == "plain /hello?hop\n|2 200"
    assert "x-kept" in names and "x-hop" not in names and "keep-alive" not in names and "connection" not in names


NODE_UPLOAD = r"""
const http2 = require('http2');
const session = http2.connect(`http://127.0.0.1:${process.argv[2]}`);
const s = session.request({':method': 'POST', ':path': '/upload'});  // no content-length: chunked upstream
let out = '';
s.on('response', (h) => { out += h[':status'] + ' '; });
s.on('data', (d) => { out += d; });
s.on('end', () => { process.stdout.write(out); session.close(); });
for (let i = 0; i < 20; i++) { s.write(Buffer.alloc(50000, 'u')); }
s.end();
"""


async def test_body_without_length_goes_chunked_to_an_http1_app(client: HbonePool, tmp_path: Path) -> None:
    script = tmp_path / "upload.js"
    script.write_text(NODE_UPLOAD)
    async with tcp_bridge(client, NODE_VIP, 80) as port:
        out = await _run("node", str(script), str(port))
    assert out == "200 node POST /upload 1000000 body bytes, te=chunked\n"


NODE_CLIENT = r"""
const http2 = require('http2');
const port = process.argv[2];
const session = http2.connect(`http://127.0.0.1:${port}`);
function req(headers, body) {
  return new Promise((resolve, reject) => {
    const s = session.request(headers);
    let status = 0, n = 0, chunks = [];
    s.on('response', (h) => { status = h[':status']; });
    s.on('data', (d) => { n += d.length; if (chunks.length < 4) chunks.push(d); });
    s.on('end', () => resolve({status, bytes: n, head: Buffer.concat(chunks).toString().slice(0, 80)}));
    s.on('error', reject);
    if (body) { s.end(body); } else { s.end(); }
  });
}
(async () => {
  const results = await Promise.all([
    req({':path': '/hello'}),
    req({':path': '/version'}),
    req({':method': 'POST', ':path': '/upload', 'content-length': String(1 << 20)}, Buffer.alloc(1 << 20, 'u')),
    req({':method': 'POST', ':path': '/upload', 'content-length': '300000'}, Buffer.alloc(300000, 'c')),
    req({':path': '/big'}),
    req({':method': 'DELETE', ':path': '/hello'}),
  ]);
  console.log(JSON.stringify(results));
  session.close();
})().catch((e) => { console.error(e); process.exit(1); });
"""


async def test_node_concurrent_streams_each_decided(client: HbonePool, tmp_path: Path) -> None:
    script = tmp_path / "client.js"
    script.write_text(NODE_CLIENT)
    async with tcp_bridge(client) as port:
        results = json.loads(await _run("node", str(script), str(port)))
    got = [(r["status"], r["bytes"] if r["status"] == 200 and r["bytes"] > 100 else r["head"]) for r in results]
    assert got[0] == (200, got[0][1]) and got[0][1].startswith("hello GET /hello (0 body bytes)")
    assert got[1] == (403, "RBAC: access denied")
    assert got[2][0] == 200 and "hello POST /upload (1048576 body bytes)" in got[2][1]
    assert got[3][0] == 200 and "hello POST /upload (300000 body bytes)" in got[3][1]
    assert got[4] == (200, BIG)
    assert got[5] == (403, "RBAC: access denied")


def _grpc_calls(port: int) -> tuple[bytes, grpc.StatusCode, str, int]:
    options = [("grpc.enable_http_proxy", 0)]
    with grpc.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
        hello = channel.unary_unary("/test.Greeter/Hello")(b"grpc", timeout=20)
        try:
            channel.unary_unary("/test.Greeter/Other")(b"x", timeout=20)
            denied = (grpc.StatusCode.OK, "")
        except grpc.RpcError as e:
            denied = (e.code(), e.details())
        chunk = b"e" * 65536
        echoed = channel.stream_stream("/test.Greeter/Echo")(iter([chunk] * 64), timeout=30)
        total = sum(len(m) for m in echoed)
    return hello, denied[0], denied[1], total


async def test_grpc_through_the_waypoint(client: HbonePool) -> None:
    async with tcp_bridge(client, GRPC_VIP, GRPC_PORT) as port:
        hello, code, details, total = await asyncio.to_thread(_grpc_calls, port)
    assert hello == b"hello grpc"
    assert (code, details) == (grpc.StatusCode.PERMISSION_DENIED, "RBAC: access denied")
    assert total == 64 * 65536  # 4 MiB each way through flow-controlled streams


def _concurrent_slow_calls(port: int, n: int) -> list[bytes]:
    options = [("grpc.enable_http_proxy", 0)]
    with grpc.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
        call = channel.unary_unary("/test.Greeter/Slow")
        call(b"warm-up", timeout=20)  # the waypoint's upstream connection has the app's SETTINGS now
        pending = [call.future(b"%d" % i, timeout=20) for i in range(n)]
        return [f.result() for f in pending]


async def test_grpc_calls_over_the_apps_stream_limit(client: HbonePool) -> None:
    """The app takes 2 streams per connection: 6 concurrent calls on one client connection go over more upstream
    connections, and one that fills up is not cut while its calls are in flight."""
    async with tcp_bridge(client, GRPC_VIP, GRPC_PORT) as port:
        results = await asyncio.to_thread(_concurrent_slow_calls, port, 6)
    assert results == [b"slow %d" % i for i in range(6)]


# --- malformed HTTP/2: GOAWAY with the spec's code, the connection closed, the waypoint serves on ---


async def _goaway_after(stream: HboneStream, data: bytes) -> int:
    """Send `data` on a fresh h2c connection; the error code of the GOAWAY the waypoint answers with."""
    await stream.write(data)
    buf = b""
    with contextlib.suppress(StreamClosed):  # the waypoint ends the tunnel after its GOAWAY
        async with asyncio.timeout(10):
            while chunk := await stream.read():
                buf += chunk
    pos = 0
    while pos + 9 <= len(buf):
        frame, length = Frame.parse_frame_header(memoryview(buf[pos : pos + 9]))
        frame.parse_body(memoryview(buf[pos + 9 : pos + 9 + length]))
        pos += 9 + length
        if isinstance(frame, GoAwayFrame):
            return int(frame.error_code)
    raise AssertionError(f"no GOAWAY in {buf!r}")


def _raw(kind: int, flags: int, stream_id: int, payload: bytes) -> bytes:
    """A frame as bytes, whatever it breaks (hyperframe refuses to build some of the ones sent here)."""
    return len(payload).to_bytes(3, "big") + bytes([kind, flags]) + stream_id.to_bytes(4, "big") + payload


def _headers(stream_id: int, block: bytes, flags: tuple[str, ...] = ("END_HEADERS", "END_STREAM")) -> bytes:
    bits = (0x4 if "END_HEADERS" in flags else 0) | (0x1 if "END_STREAM" in flags else 0)
    return _raw(0x1, bits, stream_id, block)


# a literal header block: :method GET, :scheme http, :path /hello, :authority greeter (static-table indices)
GET_HELLO = b"\x82\x86\x04\x06/hello\x01\x07greeter"
SETTINGS = SettingsFrame(0).serialize()
PROTOCOL_ERROR, FRAME_SIZE_ERROR, ENHANCE_YOUR_CALM = 0x1, 0x6, 0xB

MALFORMED = {
    "bad preface after the magic": (b"PRI * HTTP/2.0\r\n\r\nXX\r\n\r\n" + SETTINGS, PROTOCOL_ERROR),
    "HEADERS on stream 0": (PREFACE + SETTINGS + _headers(0, GET_HELLO), PROTOCOL_ERROR),
    "DATA on stream 0": (PREFACE + SETTINGS + _raw(0x0, 0, 0, b"x"), PROTOCOL_ERROR),
    "frame over SETTINGS_MAX_FRAME_SIZE": (
        PREFACE + SETTINGS + _headers(1, GET_HELLO + b"\x00\x01a\x01b" * 4200),
        FRAME_SIZE_ERROR,
    ),
    "header block over the cap": (
        PREFACE
        + SETTINGS
        + _headers(1, GET_HELLO, ("END_STREAM",))
        + b"".join(ContinuationFrame(1, data=b"\x00\x01a\x01b" * 3200).serialize() for _ in range(6)),
        ENHANCE_YOUR_CALM,
    ),
    "CONTINUATION flood": (
        PREFACE
        + SETTINGS
        + _headers(1, GET_HELLO, ("END_STREAM",))
        + ContinuationFrame(1, data=b"").serialize() * 200,
        PROTOCOL_ERROR,
    ),
    "rapid reset": (
        PREFACE
        + SETTINGS
        + b"".join(
            _headers(i, GET_HELLO) + RstStreamFrame(i, error_code=8).serialize() for i in range(1, 1000, 2)
        ),
        ENHANCE_YOUR_CALM,
    ),
}


@pytest.mark.parametrize("case", list(MALFORMED))
async def test_malformed_http2_gets_goaway_and_the_waypoint_serves_on(client: HbonePool, case: str) -> None:
    data, code = MALFORMED[case]
    stream = await tunnel(client)
    try:
        assert await _goaway_after(stream, data) == code
    finally:
        stream.close()
    async with tcp_bridge(client) as port:
        assert (await _curl(port, "/hello")).endswith("|2 200")


async def test_a_denied_stream_leaves_the_others_open(client: HbonePool) -> None:
    """A request body still arriving on a denied stream is refused on that stream (RST_STREAM NO_ERROR after
    the 403) while an allowed stream of the same connection completes."""
    stream = await tunnel(client)
    try:
        denied = _headers(1, b"\x83\x86\x04\x08/version\x01\x07greeter", ("END_HEADERS",))  # POST, no END_STREAM
        allowed = _headers(3, GET_HELLO)
        await stream.write(PREFACE + SETTINGS + denied + DataFrame(1, data=b"x" * 1000).serialize() + allowed)
        seen: dict[int, list[str]] = {1: [], 3: []}
        buf = b""
        async with asyncio.timeout(10):
            while not any(x.startswith("DATA-END") for x in seen[3]):
                chunk = await stream.read()
                assert chunk, f"tunnel closed: {seen}"
                buf += chunk
                while len(buf) >= 9:
                    frame, length = Frame.parse_frame_header(memoryview(buf[:9]))
                    if len(buf) < 9 + length:
                        break
                    frame.parse_body(memoryview(buf[9 : 9 + length]))
                    buf = buf[9 + length :]
                    if frame.stream_id in seen and not isinstance(frame, WindowUpdateFrame):
                        if isinstance(frame, DataFrame):
                            end = "DATA-END" if "END_STREAM" in frame.flags else "DATA"
                            seen[frame.stream_id].append(f"{end} {frame.data[:19]!r}")
                        else:
                            seen[frame.stream_id].append(type(frame).__name__)
    finally:
        stream.close()
    assert seen[1][:2] == ["HeadersFrame", "DATA-END b'RBAC: access denied'"]
    assert seen[1][2:] in ([], ["RstStreamFrame"])
    assert seen[3][0] == "HeadersFrame" and seen[3][-1].startswith("DATA-END")


async def test_response_before_the_request_body_ends_releases_the_stream(client: HbonePool) -> None:
    """A gRPC server answers (trailers) while the client's stream is still open: the waypoint passes the answer
    on and then resets the client's stream with NO_ERROR (RFC 9113 §8.1) instead of holding it open for a body
    nobody wants; the connection serves the next call."""
    stream = await tunnel_to(client, GRPC_VIP, GRPC_PORT)
    h2c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    h2c.initiate_connection()
    seen: list[str] = []
    grpc_headers = [
        (":method", "POST"), (":scheme", "http"), (":path", "/test.Greeter/First"), (":authority", "hello-grpc"),
        ("content-type", "application/grpc"), ("te", "trailers"),
    ]  # fmt: skip
    try:
        h2c.send_headers(1, grpc_headers)
        h2c.send_data(1, b"\x00\x00\x00\x00\x03abc")  # one message; the stream stays open
        await stream.write(h2c.data_to_send())
        async with asyncio.timeout(10):
            while "reset" not in seen:
                data = await stream.read()
                assert data, f"tunnel closed: {seen}"
                for ev in h2c.receive_data(data):
                    if isinstance(ev, h2.events.DataReceived):
                        seen.append(ev.data[5:].decode())
                        h2c.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                    elif isinstance(ev, h2.events.TrailersReceived):
                        seen.append("grpc-status " + dict(ev.headers)[b"grpc-status"].decode())
                    elif isinstance(ev, h2.events.StreamReset) and ev.stream_id == 1:
                        seen.append("reset" if ev.error_code == 0 else f"reset {ev.error_code}")
                await stream.write(h2c.data_to_send())
    finally:
        stream.close()
    assert seen == ["first: abc", "grpc-status 0", "reset"]


async def test_streams_waiting_for_a_slow_reader_all_resume(client: HbonePool) -> None:
    """Two 4 MiB downloads to a client that grants big HTTP/2 windows but does not read its tunnel for a while:
    both responses wait for the tunnel to drain and both complete once it does (nothing is dropped or stuck)."""
    stream = await tunnel(client)
    h2c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    h2c.initiate_connection()
    h2c.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 2**31 - 1})
    h2c.increment_flow_control_window(2**31 - 1 - 65535)
    request = [(":method", "GET"), (":path", "/big"), (":scheme", "http"), (":authority", "greeter")]
    h2c.send_headers(1, request, end_stream=True)
    h2c.send_headers(3, request, end_stream=True)
    got = {1: 0, 3: 0}
    ended: set[int] = set()
    try:
        await stream.write(h2c.data_to_send())
        await asyncio.sleep(0.5)  # not reading: the waypoint's writes to this tunnel back up
        async with asyncio.timeout(30):
            while ended != {1, 3}:
                data = await stream.read()
                assert data, f"tunnel closed: {got}"
                for ev in h2c.receive_data(data):
                    if isinstance(ev, h2.events.DataReceived):
                        got[ev.stream_id] += len(ev.data)
                    elif isinstance(ev, h2.events.StreamEnded):
                        ended.add(ev.stream_id)
                await stream.write(h2c.data_to_send())
    finally:
        stream.close()
    assert got == {1: BIG, 3: BIG}
