"""The waypoint tests' kit: the greeter topology in local mode (config, addresses, identities), a keep-alive
HTTP/1.1 app on a pod IP, the `ztunnel waypoint` process, and the source node proxy's side of a request
(HBONE to the waypoint with the client's SVID, CONNECT <Service VIP>:80, HTTP/1.1 inside)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import uvloop

from tests.integration.conftest import ZTUNNEL, ProxyProcess, start_proxy
from tests.support.certs import in_process_certs
from tests.support.eventually import eventually
from ztunnel.hbone.client import HbonePool, PoolKey
from ztunnel.hbone.protocol import Authority, HboneError
from ztunnel.hbone.stream import HboneStream
from ztunnel.hbone.tls_cache import TlsContexts
from ztunnel.identity.spiffe import SpiffeId
from ztunnel.net.streams import StreamClosed

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


def gateway_pod(gateway: str, namespace: str, ip: str) -> str:
    """The pod `<gateway>-0` of waypoint Gateway `gateway` on node-w (service account `gateway`), a YAML
    document without its `---`: one copy for every waypoint topology of the tests."""
    return (
        f"apiVersion: v1\nkind: Pod\nmetadata:\n  name: {gateway}-0\n  namespace: {namespace}\n"
        f"  uid: uid-{gateway}\n  labels: {{gateway.networking.k8s.io/gateway-name: {gateway}}}\n"
        f"spec: {{nodeName: node-w, serviceAccountName: {gateway}}}\n"
        f'status: {{podIP: "{ip}"}}\n'
    )


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
{gateway_pod("waypoint", "greet", WAYPOINT_IP)}---
{gateway_pod("drainer", "greet", DRAINER_IP)}---
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


def echo_service(vip: str, *ports: str) -> str:
    """Service `echo` (namespace greet, on the greeter pods) with these ports (each a flow mapping's body) and
    its L4 policy (ALLOW from the client's SVID), as YAML documents to append to CONFIG."""
    port_lines = "".join(f"  - {{{port}}}\n" for port in ports)
    return (
        "---\napiVersion: v1\nkind: Service\nmetadata: {name: echo, namespace: greet}\n"
        f"spec:\n  clusterIP: {vip}\n  selector: {{app: greeter-service}}\n  ports:\n{port_lines}"
        "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n"
        "metadata: {name: echo-l4, namespace: greet}\nspec:\n"
        '  targetRefs: [{kind: Service, group: "", name: echo}]\n  action: ALLOW\n  rules:\n  - from:\n'
        '    - source:\n        principals: ["cluster.local/ns/greet/sa/client"]\n'
    )


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


@contextlib.contextmanager
def greeter_cluster(workdir: Path, text: str) -> Iterator[tuple[Path, KeepAliveApp]]:
    """`text` as `workdir`/cluster.yaml and the greeter app up on GREETER_IP:APP_PORT, the ground a module's
    fixture starts its proxies on; yields (that file, the app) and closes the app after them."""
    config = workdir / "cluster.yaml"
    config.write_text(text)
    app = KeepAliveApp(GREETER_IP, APP_PORT)
    try:
        yield config, app
    finally:
        app.close()


def listening(ip: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((ip, port)) == 0


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


def wait_listening(proc: subprocess.Popen[bytes], log_path: Path, ip: str) -> None:
    """Until the waypoint listens on ip:15008; fails with its log if it exited instead."""
    eventually(lambda: proc.poll() is not None or listening(ip, 15008), 20, what="waypoint listening")
    assert proc.poll() is None, log_path.read_text()


@contextlib.contextmanager
def proxy_and_waypoint(
    config: Path, ca_dir: Path, workdir: Path, *args: str, namespace: str = "greet", ip: str = WAYPOINT_IP
) -> Iterator[tuple[ProxyProcess, subprocess.Popen[bytes], Path]]:
    """node-b's node proxy and `namespace`'s `waypoint` (with `args` after --name/--namespace), up until the
    waypoint listens on `ip`:15008; yields (proxy, waypoint, its log), stops the waypoint, then the proxy."""
    proxy = start_proxy("node-b", config, ca_dir, workdir)
    try:
        with running_waypoint(config, ca_dir, workdir, *args, namespace=namespace, ip=ip) as (waypoint, log_path):
            yield proxy, waypoint, log_path
    finally:
        proxy.stop()


@contextlib.contextmanager
def running_waypoint(
    config: Path, ca_dir: Path, workdir: Path, *args: str, namespace: str = "greet", ip: str = WAYPOINT_IP
) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    """`namespace`'s `waypoint` alone (`args` after --name/--namespace), for a test that keeps its node proxy
    longer than one waypoint: up until it listens on `ip`:15008; yields (waypoint, its log), then stops it."""
    waypoint, log_path = start_waypoint(config, ca_dir, workdir, "--name", "waypoint", "--namespace", namespace, *args)
    try:
        wait_listening(waypoint, log_path, ip)
        yield waypoint, log_path
    finally:
        stop(waypoint)


@contextlib.asynccontextmanager
async def client_pool(ca_dir: Path) -> AsyncIterator[HbonePool]:
    """The source node proxy's HBONE pool, certificates from the production path."""
    async with in_process_certs(ca_dir) as certs:
        pool = HbonePool(TlsContexts(certs))
        try:
            yield pool
        finally:
            pool.close()


async def tunnel(pool: HbonePool, vip: str = VIP) -> HboneStream:
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


async def one(pool: HbonePool, request: bytes, vip: str = VIP) -> tuple[int, bytes]:
    stream = await tunnel(pool, vip)
    try:
        await stream.write(request)
        status, _, body = await Responses(stream).next()
        return status, body
    finally:
        stream.close()


def get(path: str, method: str = "GET", body: bytes = b"") -> bytes:
    length = b"Content-Length: %d\r\n" % len(body) if body or method == "POST" else b""
    return b"%s %s HTTP/1.1\r\nHost: greeter.greet.svc.cluster.local\r\n%s\r\n%s" % (
        method.encode(),
        path.encode(),
        length,
        body,
    )


async def tunnel_to(pool: HbonePool, vip: str, port: int) -> HboneStream:
    """`tunnel` to any Service port (the source node proxy's CONNECT <vip>:<port> to the waypoint)."""
    key = PoolKey(CLIENT, WAYPOINT, (WAYPOINT_IP, 15008))
    return await pool.connect(key, Authority(vip, port), expected_identities=[WAYPOINT.uri])


@contextlib.asynccontextmanager
async def tcp_bridge(pool: HbonePool, vip: str = VIP, port: int = 80) -> AsyncIterator[int]:
    """A loopback TCP listener (127.0.0.1:<yielded port>) whose every connection is carried to the waypoint in
    its own HBONE tunnel (CONNECT <vip>:<port>), as a source node proxy does for a captured connection: lets
    clients we did not write (curl, node, grpcio) talk to the waypoint. Runs on the test's loop."""
    tasks: set[asyncio.Task[None]] = set()

    async def pipe(src: HboneStream | asyncio.StreamReader, dst: HboneStream | asyncio.StreamWriter) -> None:
        try:
            while data := await src.read(65536):
                if isinstance(dst, asyncio.StreamWriter):
                    dst.write(data)
                    await dst.drain()
                else:
                    await dst.write(data)
            if isinstance(dst, asyncio.StreamWriter):
                dst.write_eof()
            else:
                await dst.write_eof()
        except (ConnectionError, OSError, StreamClosed):
            pass

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        tasks.add(task)
        stream: HboneStream | None = None
        try:
            stream = await tunnel_to(pool, vip, port)
            await asyncio.gather(pipe(reader, stream), pipe(stream, writer))
        except (ConnectionError, OSError, StreamClosed, HboneError):
            pass
        finally:
            if stream is not None:
                stream.close()
            writer.close()
            tasks.discard(task)

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        for task in list(tasks):
            task.cancel()
        if tasks:
            await asyncio.wait(list(tasks), timeout=5)
        await server.wait_closed()


def metric_samples(port: int) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """The waypoint's /stats/prometheus on 127.0.0.1:`port` (--metrics-addr): value by (sample name, labels)."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/stats/prometheus", timeout=5) as r:
        text = r.read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def metric_sum(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    """The sum of `name`'s samples that carry all of `labels`."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)
