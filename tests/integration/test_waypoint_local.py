"""The waypoint process end to end in local mode: the test is the source node proxy (HBONE with the client's
SVID to the waypoint, CONNECT <Service VIP>:80), the waypoint decides each HTTP/1.1 request and forwards the
allowed ones over HBONE to the destination node proxy (a real `ztunnel proxy`), which hands them to a
keep-alive HTTP/1.1 app on the pod IP.

The greeter policy (seed 002: ALLOW GET `*/hello`) is attached to the Service with `targetRefs`, the ambient
form: the destination node proxy does not apply it at L4 (a selector-bound L7 ALLOW would deny every tunnel
there, waypoint's included, until the node proxy learns which workloads use a waypoint).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
import threading
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import uvloop

from tests.integration.conftest import ZTUNNEL, ProxyProcess, start_proxy
from tests.support.certs import in_process_certs
from tests.support.eventually import eventually
from tests.support.identity import free_port
from ztunnel.hbone.client import HbonePool, PoolKey
from ztunnel.hbone.protocol import Authority
from ztunnel.hbone.stream import HboneStream
from ztunnel.hbone.tls_cache import TlsContexts
from ztunnel.identity.spiffe import SpiffeId

GREETER_IP = "127.0.165.1"
WAYPOINT_IP = "127.0.165.10"
DRAINER_IP = "127.0.165.11"  # a second waypoint, stopped by its own test
VIP = "10.96.0.65"
ORPHAN_VIP = "10.96.0.66"  # its one endpoint's node (node-c) runs no proxy
EMPTY_VIP = "10.96.0.67"  # no endpoint at all
ORPHAN_IP = "127.0.165.20"
APP_PORT = 8080
CLIENT = SpiffeId.parse("spiffe://cluster.local/ns/greet/sa/client")
WAYPOINT = SpiffeId.parse("spiffe://cluster.local/ns/greet/sa/waypoint")
DRAINER = SpiffeId.parse("spiffe://cluster.local/ns/greet/sa/drainer")
SLOW_CHUNKS = 10  # /slow: this many 1 KiB chunks, 0.1 s apart

CONFIG = f"""\
apiVersion: v1
kind: Namespace
metadata: {{name: greet, labels: {{istio.io/dataplane-mode: ambient}}}}
---
apiVersion: v1
kind: Pod
metadata: {{name: greeter, namespace: greet, uid: uid-greeter, labels: {{app: greeter-service}}}}
spec:
  nodeName: node-b
  serviceAccountName: greeter
  containers: [{{name: app, ports: [{{containerPort: {APP_PORT}}}]}}]
status: {{podIP: "{GREETER_IP}"}}
---
apiVersion: v1
kind: Pod
metadata:
  name: waypoint-0
  namespace: greet
  uid: uid-waypoint
  labels: {{gateway.networking.k8s.io/gateway-name: waypoint}}
spec: {{nodeName: node-w, serviceAccountName: waypoint}}
status: {{podIP: "{WAYPOINT_IP}"}}
---
apiVersion: v1
kind: Pod
metadata:
  name: drainer-0
  namespace: greet
  uid: uid-drainer
  labels: {{gateway.networking.k8s.io/gateway-name: drainer}}
spec: {{nodeName: node-w, serviceAccountName: drainer}}
status: {{podIP: "{DRAINER_IP}"}}
---
apiVersion: v1
kind: Service
metadata: {{name: greeter, namespace: greet}}
spec: {{clusterIP: {VIP}, selector: {{app: greeter-service}}, ports: [{{port: 80, targetPort: {APP_PORT}}}]}}
---
apiVersion: v1
kind: Pod
metadata: {{name: orphan, namespace: greet, uid: uid-orphan, labels: {{app: orphan}}}}
spec: {{nodeName: node-c, serviceAccountName: orphan}}
status: {{podIP: "{ORPHAN_IP}"}}
---
apiVersion: v1
kind: Service
metadata: {{name: orphan, namespace: greet}}
spec: {{clusterIP: {ORPHAN_VIP}, selector: {{app: orphan}}, ports: [{{port: 80, targetPort: {APP_PORT}}}]}}
---
apiVersion: v1
kind: Service
metadata: {{name: empty, namespace: greet}}
spec: {{clusterIP: {EMPTY_VIP}, selector: {{app: nobody}}, ports: [{{port: 80, targetPort: {APP_PORT}}}]}}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: greeter-service, namespace: greet}}
spec:
  targetRefs: [{{kind: Service, group: "", name: greeter}}]
  action: ALLOW
  rules:
  - to:
    - operation:
        methods: ["GET"]
        paths: ["*/hello", "/big", "/slow"]
  - to:
    - operation:
        methods: ["POST"]
        paths: ["/upload"]
"""
BIG = 4 * 1024 * 1024


class KeepAliveApp:
    """An HTTP/1.1 keep-alive app on the greeter's pod IP (its own loop in a thread): answers every request
    with `hello <method> <path> (<n> body bytes) #<i on this connection>`."""

    def __init__(self, ip: str, port: int) -> None:
        self.loop = uvloop.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="greeter", daemon=True)
        self.thread.start()
        self.heads: list[bytes] = []
        self.server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._serve, ip, port, reuse_address=True), self.loop
        ).result(10)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        i = 0
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                self.heads.append(head)
                method, target, _ = head.split(b"\r\n", 1)[0].split(b" ", 2)
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                body = await reader.readexactly(length)
                i += 1
                if b"\r\nupgrade: websocket" in head.lower():
                    writer.write(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n")
                    writer.write(b"Upgrade: websocket\r\n\r\n")
                    while data := await reader.read(65536):  # raw echo from now on
                        writer.write(data)
                        await writer.drain()
                    return
                if target == b"/slow":
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (SLOW_CHUNKS * 1024))
                    for _ in range(SLOW_CHUNKS):
                        writer.write(b"s" * 1024)
                        await writer.drain()
                        await asyncio.sleep(0.1)
                    continue
                if target == b"/big":
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % BIG)
                    for _ in range(BIG // 65536):
                        writer.write(b"x" * 65536)
                        await writer.drain()
                    continue
                text = b"hello %s %s (%d body bytes) #%d\n" % (method, target, len(body), i)
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n" % len(text))
                writer.write(text)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()

    def close(self) -> None:
        async def shutdown() -> None:
            self.server.close()
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(shutdown(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@dataclass
class Setup:
    workdir: Path
    ca_dir: Path
    proxy: ProxyProcess
    waypoint: subprocess.Popen[bytes]
    waypoint_log: Path
    app: KeepAliveApp


def _listening(ip: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((ip, port)) == 0


def _ready(port: int) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz/ready", timeout=2) as r:
            return int(r.status)
    except urllib.error.HTTPError as e:
        return e.code
    except (urllib.error.URLError, OSError):
        return 0


def start_waypoint(config: Path, ca_dir: Path, workdir: Path, *args: str) -> tuple[subprocess.Popen[bytes], Path]:
    log_path = workdir / "waypoint.log"
    argv = [ZTUNNEL, "--log-level", "info", "waypoint", *args, "-f", str(config), "--ca-dir", str(ca_dir)]
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=workdir)
    return proc, log_path


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, ca_dir: Path) -> Iterator[Setup]:
    workdir = tmp_path_factory.mktemp("waypoint")
    config = workdir / "cluster.yaml"
    config.write_text(CONFIG)
    app = KeepAliveApp(GREETER_IP, APP_PORT)
    proxy: ProxyProcess | None = None
    waypoint: subprocess.Popen[bytes] | None = None
    try:
        proxy = start_proxy("node-b", config, ca_dir, workdir)
        waypoint, log_path = start_waypoint(config, ca_dir, workdir, "--name", "waypoint", "--namespace", "greet")
        eventually(
            lambda: waypoint.poll() is not None or _listening(WAYPOINT_IP, 15008), 20, what="waypoint listening"
        )
        assert waypoint.poll() is None, log_path.read_text()
        yield Setup(workdir, ca_dir, proxy, waypoint, log_path, app)
    finally:
        if waypoint is not None:
            stop(waypoint)
        if proxy is not None:
            proxy.stop()
        app.close()


@pytest.fixture
async def client(setup: Setup) -> AsyncIterator[HbonePool]:
    async with in_process_certs(setup.ca_dir) as certs:
        pool = HbonePool(TlsContexts(certs))
        try:
            yield pool
        finally:
            pool.close()


async def _tunnel(pool: HbonePool, vip: str = VIP) -> HboneStream:
    """What the source node proxy does for a client of the Service: HBONE to the waypoint, CONNECT VIP:80."""
    key = PoolKey(CLIENT, WAYPOINT, (WAYPOINT_IP, 15008))
    return await pool.connect(key, Authority(vip, 80), expected_identities=[WAYPOINT.uri])


class Responses:
    """Reads HTTP/1.1 responses (Content-Length framed, as both the app and the waypoint's answers are)."""

    def __init__(self, stream: HboneStream) -> None:
        self.stream = stream
        self.buf = b""

    async def _more(self) -> None:
        data = await self.stream.read()
        if not data:
            raise EOFError(f"tunnel closed; have {self.buf!r}")
        self.buf += data

    async def next(self) -> tuple[int, dict[bytes, bytes], bytes]:
        async with asyncio.timeout(10):
            while b"\r\n\r\n" not in self.buf:
                await self._more()
            head, self.buf = self.buf.split(b"\r\n\r\n", 1)
            lines = head.split(b"\r\n")
            status = int(lines[0].split(b" ")[1])
            headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(b":") for line in lines[1:])}
            length = int(headers.get(b"content-length", b"0"))
            while len(self.buf) < length:
                await self._more()
            body, self.buf = self.buf[:length], self.buf[length:]
            return status, headers, body


async def _one(pool: HbonePool, request: bytes, vip: str = VIP) -> tuple[int, bytes]:
    stream = await _tunnel(pool, vip)
    try:
        await stream.write(request)
        status, _, body = await Responses(stream).next()
        return status, body
    finally:
        stream.close()


def _get(path: str, method: str = "GET", body: bytes = b"") -> bytes:
    length = b"Content-Length: %d\r\n" % len(body) if body or method == "POST" else b""
    return b"%s %s HTTP/1.1\r\nHost: greeter.greet.svc.cluster.local\r\n%s\r\n%s" % (
        method.encode(),
        path.encode(),
        length,
        body,
    )


async def test_allowed_get_reaches_the_app(client: HbonePool) -> None:
    status, body = await _one(client, _get("/hello"))
    assert (status, body) == (200, b"hello GET /hello (0 body bytes) #1\n")


async def test_other_path_denied(client: HbonePool) -> None:
    assert await _one(client, _get("/version")) == (403, b"RBAC: access denied")


async def test_post_denied(client: HbonePool) -> None:
    assert await _one(client, _get("/hello", "POST", b"x=1")) == (403, b"RBAC: access denied")


async def test_keep_alive_allowed_then_denied_then_allowed_reuses_the_upstream(client: HbonePool) -> None:
    stream = await _tunnel(client)
    responses = Responses(stream)
    try:
        got = []
        for request in (_get("/hello"), _get("/version"), _get("/api/hello")):
            await stream.write(request)
            status, headers, body = await responses.next()
            got.append((status, body))
            assert headers.get(b"connection") != b"close"
    finally:
        stream.close()
    # the third request is the app connection's second: one upstream stream carried both allowed requests
    assert got == [
        (200, b"hello GET /hello (0 body bytes) #1\n"),
        (403, b"RBAC: access denied"),
        (200, b"hello GET /api/hello (0 body bytes) #2\n"),
    ]


async def test_denied_request_with_body_keeps_the_connection(client: HbonePool) -> None:
    stream = await _tunnel(client)
    responses = Responses(stream)
    try:
        await stream.write(_get("/hello", "POST", b"a" * 1000) + _get("/hello"))
        first = await responses.next()
        second = await responses.next()
    finally:
        stream.close()
    assert (first[0], first[2]) == (403, b"RBAC: access denied")
    assert (second[0], second[2]) == (200, b"hello GET /hello (0 body bytes) #1\n")


async def test_tunnel_to_a_non_service_address_is_refused(client: HbonePool) -> None:
    from ztunnel.hbone.protocol import HboneError

    key = PoolKey(CLIENT, WAYPOINT, (WAYPOINT_IP, 15008))
    with pytest.raises(HboneError) as e:
        await client.connect(key, Authority(GREETER_IP, APP_PORT), expected_identities=[WAYPOINT.uri])
    assert "400" in str(e.value)


def test_waypoint_refuses_to_start_without_its_pod(setup: Setup) -> None:
    proc, log_path = start_waypoint(
        setup.workdir / "cluster.yaml", setup.ca_dir, setup.workdir, "--name", "nope", "--namespace", "greet"
    )
    try:
        assert proc.wait(20) != 0
    finally:
        stop(proc)
    text = log_path.read_text()
    assert "no pod for waypoint greet/nope" in text and "gateway.networking.k8s.io/gateway-name: nope" in text


async def test_large_bodies_stream_both_ways(client: HbonePool) -> None:
    stream = await _tunnel(client)
    responses = Responses(stream)
    try:
        await stream.write(b"POST /upload HTTP/1.1\r\nHost: greeter\r\nContent-Length: %d\r\n\r\n" % BIG)
        chunk = b"u" * 65536
        for _ in range(BIG // len(chunk)):
            await stream.write(chunk)
        status, _, body = await responses.next()
        assert (status, body) == (200, b"hello POST /upload (%d body bytes) #1\n" % BIG)
        await stream.write(_get("/big"))
        status, _, body = await responses.next()
        assert (status, len(body), body.count(b"x")) == (200, BIG, BIG)
    finally:
        stream.close()


def test_denials_are_logged_with_the_request(setup: Setup) -> None:
    def logged() -> bool:
        text = setup.waypoint_log.read_text()
        return "request denied" in text and "/version" in text

    asyncio.run(_deny_once(setup))
    eventually(logged, 10, what="the denial in the waypoint's log")


async def _deny_once(setup: Setup) -> None:
    async with in_process_certs(setup.ca_dir) as certs:
        pool = HbonePool(TlsContexts(certs))
        try:
            assert await _one(pool, _get("/version")) == (403, b"RBAC: access denied")
        finally:
            pool.close()


def test_config_reload_changes_the_decision(setup: Setup) -> None:
    path = setup.workdir / "cluster.yaml"
    changed = CONFIG.replace('paths: ["*/hello", "/big", "/slow"]', 'paths: ["*/hello", "/big", "/slow", "/version"]')
    assert changed != CONFIG

    def write(text: str) -> None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.replace(path)

    def version_status() -> int:
        return asyncio.run(_status_of(setup, "/version"))

    try:
        write(changed)
        eventually(lambda: version_status() == 200, 15, what="/version allowed after the reload")
    finally:
        write(CONFIG)
    eventually(lambda: version_status() == 403, 15, what="/version denied again")


async def _status_of(setup: Setup, path: str) -> int:
    async with in_process_certs(setup.ca_dir) as certs:
        pool = HbonePool(TlsContexts(certs))
        try:
            return (await _one(pool, _get(path)))[0]
        finally:
            pool.close()


async def test_expect_100_continue_only_after_an_allow(client: HbonePool) -> None:
    stream = await _tunnel(client)
    responses = Responses(stream)
    expect = b"POST /upload HTTP/1.1\r\nHost: greeter\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n"
    try:
        await stream.write(expect)
        status, _, _ = await responses.next()
        assert status == 100
        await stream.write(b"abcde")
        status, _, body = await responses.next()
        assert (status, body) == (200, b"hello POST /upload (5 body bytes) #1\n")
        await stream.write(expect.replace(b"/upload", b"/version"))
        status, headers, body = await responses.next()  # no 100: the body is never asked for
        assert (status, body) == (403, b"RBAC: access denied")
        assert headers[b"connection"] == b"close"
    finally:
        stream.close()


async def test_allowed_upgrade_relays_raw_bytes(client: HbonePool) -> None:
    stream = await _tunnel(client)
    responses = Responses(stream)
    try:
        await stream.write(
            b"GET /ws/hello HTTP/1.1\r\nHost: greeter\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
        )
        status, headers, _ = await responses.next()
        assert (status, headers[b"upgrade"]) == (101, b"websocket")
        raw = b"\x81\x05raw-1 not http\r\n\r\n"  # a parser would choke on it: only a relay passes it
        await stream.write(raw)
        async with asyncio.timeout(10):
            while len(responses.buf) < len(raw):
                await responses._more()
        assert responses.buf == raw
        await stream.write_eof()
        async with asyncio.timeout(10):
            assert await stream.read() == b""  # the app's EOF came back through both proxies
    finally:
        stream.close()


async def test_denied_upgrade_is_answered_and_closed(client: HbonePool) -> None:
    stream = await _tunnel(client)
    try:
        await stream.write(
            b"GET /ws/other HTTP/1.1\r\nHost: greeter\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
        )
        status, headers, body = await Responses(stream).next()
        assert (status, body, headers[b"connection"]) == (403, b"RBAC: access denied", b"close")
        async with asyncio.timeout(10):
            assert await stream.read() == b""
    finally:
        stream.close()


def test_sigterm_lets_an_open_response_finish(setup: Setup) -> None:
    ready_port = free_port()
    proc, log_path = start_waypoint(
        setup.workdir / "cluster.yaml",
        setup.ca_dir,
        setup.workdir,
        *("--name", "drainer", "--namespace", "greet", "--readiness-addr", f"127.0.0.1:{ready_port}"),
    )
    try:
        eventually(lambda: proc.poll() is not None or _ready(ready_port) == 200, 20, what="drainer ready")
        assert proc.poll() is None, log_path.read_text()
        assert _listening(DRAINER_IP, 15008)

        async def slow_response_across_sigterm() -> tuple[int, bytes]:
            async with in_process_certs(setup.ca_dir) as certs:
                pool = HbonePool(TlsContexts(certs))
                try:
                    key = PoolKey(CLIENT, DRAINER, (DRAINER_IP, 15008))
                    stream = await pool.connect(key, Authority(VIP, 80), expected_identities=[DRAINER.uri])
                    responses = Responses(stream)
                    await stream.write(_get("/slow"))
                    async with asyncio.timeout(10):
                        await responses._more()  # the response has started
                    proc.terminate()
                    status, _, body = await responses.next()
                    stream.close()
                    return status, body
                finally:
                    pool.close()

        status, body = asyncio.run(slow_response_across_sigterm())
        assert (status, body) == (200, b"s" * 1024 * SLOW_CHUNKS)
        assert proc.wait(15) == 0
        assert "shutting down: draining connections" in log_path.read_text()
    finally:
        stop(proc)


async def test_upstream_failures_are_answered_503(client: HbonePool) -> None:
    assert await _one(client, _get("/hello"), ORPHAN_VIP) == (503, b"upstream connect error")
    assert await _one(client, _get("/hello"), EMPTY_VIP) == (503, b"no healthy upstream")
