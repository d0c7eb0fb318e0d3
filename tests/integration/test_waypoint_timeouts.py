"""The waypoint's timeouts, through the `ztunnel waypoint` process with short ones set by flag:

- an idle keep-alive HTTP/1.1 connection is closed after --idle-timeout (each request restarts the clock), an
  idle h2c connection too, after a GOAWAY;
- a client that sends its request head a byte a second (slowloris) is cut after --request-headers-timeout:
  HTTP/1.1 with a 408 then the close, h2c with a GOAWAY then the close;
- an upstream that accepts and never answers is cut after --response-timeout: the client gets 504 `upstream
  request timeout` (HTTP/1.1, and h2c to an HTTP/1.1 app and to an h2c one);
- the flags are bounded and validated, and documented in --help.

The cluster is the kit's greeter, plus a `mute` Service whose pod (on node-b, served by the node proxy) accepts
connections and never answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import h2.config
import h2.connection
import h2.events
import pytest
from hyperframe.frame import Frame, GoAwayFrame, HeadersFrame, SettingsFrame

from tests.integration.conftest import ZTUNNEL
from tests.support.eventually import eventually_async
from tests.support.waypoint import (
    APP_PORT,
    CONFIG,
    GREETER_IP,
    KeepAliveApp,
    Responses,
    client_pool,
    get,
    proxy_and_waypoint,
    tunnel,
    tunnel_to,
)
from ztunnel.hbone.client import HbonePool
from ztunnel.hbone.stream import HboneStream
from ztunnel.net.streams import StreamClosed

IDLE = 3.0
HEADERS = 1.0
RESPONSE = 1.0
MUTE_IP = "127.0.165.30"
MUTE_VIP = "10.96.0.80"
H2_PORT = 81  # the mute Service's port declared grpc: the waypoint speaks h2c upstream
HTTP_PORT = 82  # declared http: a silent client is HTTP/1.1 there (elsewhere the sniff makes it TCP)
EXTRA = f"""\
---
apiVersion: v1
kind: Pod
metadata: {{name: mute, namespace: greet, uid: uid-mute, labels: {{app: mute}}}}
spec:
  nodeName: node-b
  serviceAccountName: mute
  containers: [{{name: app, ports: [{{containerPort: {APP_PORT}}}]}}]
status: {{podIP: "{MUTE_IP}"}}
---
apiVersion: v1
kind: Service
metadata: {{name: mute, namespace: greet}}
spec:
  clusterIP: {MUTE_VIP}
  selector: {{app: mute}}
  ports:
  - {{port: 80, targetPort: {APP_PORT}}}
  - {{port: {H2_PORT}, targetPort: {APP_PORT}, name: grpc-mute}}
  - {{port: {HTTP_PORT}, targetPort: {APP_PORT}, name: http-mute}}
"""
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
SETTINGS = SettingsFrame(0).serialize()
# a literal header block: :method GET, :scheme http, :path /hello, :authority greeter (static-table indices)
GET_HELLO = b"\x82\x86\x04\x06/hello\x01\x07greeter"


@dataclass
class Setup:
    ca_dir: Path
    log: Path


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, ca_dir: Path) -> Iterator[Setup]:
    workdir = tmp_path_factory.mktemp("waypoint-timeouts")
    config = workdir / "cluster.yaml"
    config.write_text(CONFIG + EXTRA)
    app = KeepAliveApp(GREETER_IP, APP_PORT)
    timeouts = (
        *("--idle-timeout", f"{IDLE}s", "--request-headers-timeout", f"{HEADERS}s"),
        *("--response-timeout", f"{RESPONSE}s"),
    )
    try:
        with proxy_and_waypoint(config, ca_dir, workdir, *timeouts) as (_, _, log):
            yield Setup(ca_dir, log)
    finally:
        app.close()


@pytest.fixture
async def client(setup: Setup) -> AsyncIterator[HbonePool]:
    async with client_pool(setup.ca_dir) as pool:
        yield pool


@pytest.fixture
async def mute() -> AsyncIterator[list[bytes]]:
    """The mute pod's app: accepts, reads whatever comes (kept: the requests did arrive), never answers."""
    got: list[bytes] = []
    writers: set[asyncio.StreamWriter] = set()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.add(writer)
        try:
            with contextlib.suppress(ConnectionError):
                while data := await reader.read(65536):
                    got.append(data)
        finally:
            writer.close()
            writers.discard(writer)

    server = await asyncio.start_server(serve, MUTE_IP, APP_PORT, reuse_address=True)
    try:
        yield got
    finally:
        server.close()
        for writer in list(writers):  # a connection the waypoint still holds would keep its handler
            writer.transport.abort()
        async with asyncio.timeout(5):
            await server.wait_closed()
        await eventually_async(lambda: not writers, timeout=5, interval=0.01, what="the mute app's handlers to end")


async def _eof(stream: HboneStream, timeout: float) -> tuple[bytes, float]:
    """Everything the waypoint sends until it ends the tunnel, and when that was (monotonic)."""
    buf = b""
    with contextlib.suppress(StreamClosed):
        async with asyncio.timeout(timeout):
            while chunk := await stream.read():
                buf += chunk
    return buf, time.monotonic()


def _frames(data: bytes) -> list[Frame]:
    out = []
    pos = 0
    while pos + 9 <= len(data):
        frame, length = Frame.parse_frame_header(memoryview(data[pos : pos + 9]))
        frame.parse_body(memoryview(data[pos + 9 : pos + 9 + length]))
        out.append(frame)
        pos += 9 + length
    return out


async def _trickle(stream: HboneStream, data: bytes) -> None:
    """Slowloris: `data` one byte a second (until the waypoint ends the tunnel)."""
    with contextlib.suppress(StreamClosed):
        for i in range(len(data)):
            await stream.write(data[i : i + 1])
            await asyncio.sleep(1.0)


def _log_lines(log: Path, text: str) -> list[str]:
    return [line for line in log.read_text().splitlines() if text in line]


# --- idle connections ---


async def test_an_idle_http1_connection_is_closed_after_the_idle_timeout(client: HbonePool) -> None:
    stream = await tunnel(client)
    try:
        responses = Responses(stream)
        await stream.write(get("/hello"))
        assert (await responses.next())[0] == 200
        await asyncio.sleep(IDLE * 0.6)  # idle for a while, but less than the timeout: the connection is kept
        await stream.write(get("/hello"))
        status, _, body = await responses.next()
        answered = time.monotonic()
        assert (status, body.endswith(b"#2\n")) == (200, True)  # the same upstream connection, kept alive
        rest, closed = await _eof(stream, IDLE + 10)
    finally:
        stream.close()
    assert rest == b""
    assert IDLE * 0.9 <= closed - answered < IDLE + 5  # counted from the last request, not the first


async def test_an_idle_h2c_connection_gets_a_goaway_then_is_closed(client: HbonePool) -> None:
    stream = await tunnel(client)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
    conn.initiate_connection()
    request = [(":method", "GET"), (":scheme", "http"), (":path", "/hello"), (":authority", "greeter")]
    conn.send_headers(1, request, end_stream=True)
    try:
        await stream.write(conn.data_to_send())
        ended = None
        async with asyncio.timeout(10):
            while ended is None:
                data = await stream.read()
                assert data, "tunnel closed before the response"
                for ev in conn.receive_data(data):
                    if isinstance(ev, h2.events.StreamEnded):
                        ended = time.monotonic()
                    assert not isinstance(ev, h2.events.ConnectionTerminated), ev
        rest, closed = await _eof(stream, IDLE + 10)
    finally:
        stream.close()
    goaways = [f for f in _frames(rest) if isinstance(f, GoAwayFrame)]
    assert [(g.error_code, g.last_stream_id) for g in goaways] == [(0, 1)]
    assert IDLE * 0.9 <= closed - ended < IDLE + 5


async def test_a_client_that_never_sends_a_head_is_idle_not_slow(client: HbonePool) -> None:
    """The head's clock starts with its first byte: a connection that says nothing is closed at the idle timeout,
    without a 408."""
    stream = await tunnel_to(client, MUTE_VIP, HTTP_PORT)
    try:
        opened = time.monotonic()
        rest, closed = await _eof(stream, IDLE + 10)
    finally:
        stream.close()
    assert rest == b""
    assert IDLE * 0.9 <= closed - opened < IDLE + 5


# --- slowloris ---


async def test_a_slow_http1_request_head_gets_408_then_the_close(setup: Setup, client: HbonePool) -> None:
    before = len(_log_lines(setup.log, "request head too slow"))
    stream = await tunnel(client)
    try:
        started = time.monotonic()
        await stream.write(b"GET /hello HTTP/1.1\r\n")  # a request line, then the headers a byte a second
        trickle = asyncio.get_running_loop().create_task(_trickle(stream, b"Host: greeter\r\nX-Slow: 1\r\n\r\n"))
        try:
            status, headers, body = await Responses(stream).next()
            answered = time.monotonic()
            rest, _ = await _eof(stream, 10)
        finally:
            trickle.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await trickle
    finally:
        stream.close()
    assert (status, headers.get(b"connection"), body) == (408, b"close", b"request timeout")
    assert rest == b""
    assert HEADERS * 0.9 <= answered - started < HEADERS + 3
    assert len(_log_lines(setup.log, "request head too slow")) == before + 1


async def test_a_slow_h2c_header_block_gets_a_goaway_then_the_close(setup: Setup, client: HbonePool) -> None:
    before = len(_log_lines(setup.log, "request head too slow"))
    stream = await tunnel(client)
    try:
        started = time.monotonic()
        await stream.write(PREFACE + SETTINGS)
        headers = HeadersFrame(1, data=GET_HELLO, flags=("END_HEADERS", "END_STREAM")).serialize()
        trickle = asyncio.get_running_loop().create_task(_trickle(stream, headers))
        try:
            rest, closed = await _eof(stream, 10)
        finally:
            trickle.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await trickle
    finally:
        stream.close()
    frames = _frames(rest)
    assert not [f for f in frames if isinstance(f, HeadersFrame)]  # the request never got through
    goaways = [f for f in frames if isinstance(f, GoAwayFrame)]
    assert [g.error_code for g in goaways] == [0]
    assert HEADERS * 0.9 <= closed - started < IDLE  # the head's clock, not the idle one
    lines = _log_lines(setup.log, "request head too slow")
    assert len(lines) == before + 1 and "HTTP/2" in lines[-1], lines


# --- an upstream that does not answer ---


async def test_an_upstream_that_never_answers_gets_the_http1_client_a_504(client: HbonePool, mute: list[bytes]) -> None:
    stream = await tunnel(client, MUTE_VIP)
    try:
        started = time.monotonic()
        await stream.write(b"GET /x HTTP/1.1\r\nHost: mute\r\n\r\n")
        status, headers, body = await Responses(stream).next()
        answered = time.monotonic()
        rest, _ = await _eof(stream, 10)
    finally:
        stream.close()
    assert (status, body, headers.get(b"connection")) == (504, b"upstream request timeout", b"close")
    assert rest == b""
    assert b"GET /x HTTP/1.1" in b"".join(mute)  # it was forwarded: the app just never answered
    assert RESPONSE * 0.9 <= answered - started < RESPONSE + 3


async def _h2c_get(stream: HboneStream, path: str, authority: str) -> tuple[str, bytes, float]:
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
    conn.initiate_connection()
    request = [(":method", "GET"), (":scheme", "http"), (":path", path), (":authority", authority)]
    conn.send_headers(1, request, end_stream=True)
    started = time.monotonic()
    await stream.write(conn.data_to_send())
    status, body = "", b""
    async with asyncio.timeout(10):
        while True:
            data = await stream.read()
            assert data, f"tunnel closed: {status} {body!r}"
            for ev in conn.receive_data(data):
                if isinstance(ev, h2.events.ResponseReceived):
                    status = dict(ev.headers)[b":status"].decode()
                elif isinstance(ev, h2.events.DataReceived):
                    body += ev.data
                    conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                elif isinstance(ev, h2.events.StreamEnded):
                    return status, body, time.monotonic() - started
            await stream.write(conn.data_to_send())


@pytest.mark.parametrize("port", [80, H2_PORT], ids=["http1-upstream", "h2c-upstream"])
async def test_an_upstream_that_never_answers_gets_the_h2c_client_a_504(
    client: HbonePool, mute: list[bytes], port: int
) -> None:
    stream = await tunnel_to(client, MUTE_VIP, port)
    try:
        status, body, took = await _h2c_get(stream, "/x", "mute")
    finally:
        stream.close()
    assert (status, body) == ("504", b"upstream request timeout")
    assert RESPONSE * 0.9 <= took < RESPONSE + 3


# --- the flags ---


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--idle-timeout", "soon", "--idle-timeout: 'soon' is not a duration"),
        ("--request-headers-timeout", "-1s", "--request-headers-timeout:"),
        ("--response-timeout", "25h", "--response-timeout: '25h' is over 24h"),
    ],
)
def test_a_bad_timeout_flag_is_refused_naming_it(tmp_path: Path, flag: str, value: str, message: str) -> None:
    result = subprocess.run(
        [ZTUNNEL, "waypoint", "--name", "w", "--namespace", "n", "--ca-dir", str(tmp_path), flag, value],
        capture_output=True,
        timeout=30,
    )
    assert result.returncode != 0
    assert message in result.stderr.decode(), result.stderr.decode()


def test_the_timeout_flags_are_in_help() -> None:
    out = subprocess.run([ZTUNNEL, "waypoint", "--help"], capture_output=True, timeout=30).stdout.decode()
    for flag in ("--idle-timeout", "--request-headers-timeout", "--response-timeout"):
        assert flag in out
