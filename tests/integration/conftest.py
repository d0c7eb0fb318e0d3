"""Local-mode fixtures: a CA, node proxies as real subprocesses, and small apps on pod IPs (loopback).

Pod IPs live in 127.0.110.0/24 (node-a), 127.0.120.0/24 (node-b), 127.0.130.0/24 (node-c, no proxy) and
127.0.140.0/24 (outside the mesh), so these tests never collide with the demo's 127.0.10/20 addresses.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import ssl
import struct
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, cast

import h2.config
import h2.connection
import h2.events
import pytest
import uvloop

from tests.support.certs import in_process_certs
from tests.support.echo import Echo
from tests.support.eventually import eventually
from tests.support.identity import free_port
from ztunnel.identity.manager import CertificateManager

T = TypeVar("T")

ROOT = Path(__file__).resolve().parents[2]
ZTUNNEL = str(Path(sys.executable).with_name("ztunnel"))

NODE_A_CLIENT = "127.0.110.1"
NODE_A_METRICS_CLIENT = "127.0.110.2"
NODE_A_DENIED_CLIENT = "127.0.110.3"
NODE_A_CONC_CLIENT = "127.0.110.4"
NODE_B_SERVER = "127.0.120.1"
NODE_B_STRICT = "127.0.120.2"
NODE_C_TARGET = "127.0.130.1"
OUTSIDE = "127.0.140.1"
SERVICE_IP = "10.96.0.20"
EMPTY_SERVICE_IP = "10.96.0.21"
ECHO_PORT = 8080
HTTP_PORT = 8081
NODE_B_SERVER6 = "::1"  # IPv6 loopback: one address, so one IPv6 pod (when the machine has IPv6)
ECHO6_PORT = 18080


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


def _pod(name: str, node: str, sa: str, ip: str, *, labels: str = "", ports: tuple[int, ...] = ()) -> str:
    extra_labels = f", {labels}" if labels else ""
    containers = ""
    if ports:
        plist = ", ".join(f"{{containerPort: {p}}}" for p in ports)
        containers = f", containers: [{{name: app, ports: [{plist}]}}]"
    return (
        "---\napiVersion: v1\nkind: Pod\n"
        f"metadata: {{name: {name}, namespace: shop, uid: uid-{name}, labels: {{app: {name}{extra_labels}}}}}\n"
        f"spec: {{nodeName: {node}, serviceAccountName: {sa}{containers}}}\n"
        f'status: {{podIP: "{ip}"}}\n'
    )


def mesh_config(ipv6: bool = False) -> str:
    """The shared local mesh: clients on node-a, servers on node-b, a proxy-less node-c, one outside pod."""
    return (
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}\n"
        + (_pod("server6", "node-b", "server6", NODE_B_SERVER6, ports=(ECHO6_PORT,)) if ipv6 else "")
        + _pod("client", "node-a", "client", NODE_A_CLIENT)
        + _pod("metrics-client", "node-a", "metrics", NODE_A_METRICS_CLIENT)
        + _pod("denied-client", "node-a", "denied", NODE_A_DENIED_CLIENT)
        + _pod("conc-client", "node-a", "conc", NODE_A_CONC_CLIENT)
        + _pod("server", "node-b", "server", NODE_B_SERVER, ports=(ECHO_PORT,))
        + _pod("strict", "node-b", "strict", NODE_B_STRICT, ports=(ECHO_PORT,))
        + _pod("target", "node-c", "target", NODE_C_TARGET)
        + _pod("outside", "node-b", "outside", OUTSIDE, labels="istio.io/dataplane-mode: none")
        + "---\napiVersion: v1\nkind: Service\nmetadata: {name: server, namespace: shop}\n"
        f"spec: {{clusterIP: {SERVICE_IP}, selector: {{app: server}},"
        f" ports: [{{port: 80, targetPort: {ECHO_PORT}}}]}}\n"
        + "---\napiVersion: v1\nkind: Service\nmetadata: {name: nobody, namespace: shop}\n"
        f"spec: {{clusterIP: {EMPTY_SERVICE_IP}, selector: {{app: nobody}}, ports: [{{port: 80}}]}}\n"
        + "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n"
        "metadata: {name: deny-denied, namespace: shop}\n"
        "spec:\n  selector: {matchLabels: {app: server}}\n  action: DENY\n"
        "  rules: [{from: [{source: {principals: [cluster.local/ns/shop/sa/denied]}}]}]\n"
        + "---\napiVersion: security.istio.io/v1\nkind: PeerAuthentication\n"
        "metadata: {name: strict, namespace: shop}\n"
        "spec: {selector: {matchLabels: {app: strict}}, mtls: {mode: STRICT}}\n"
    )


# ---- proxies ---------------------------------------------------------------------------------------
@dataclass
class ProxyProcess:
    node: str
    proc: subprocess.Popen[bytes]
    metrics_port: int
    admin_port: int
    readiness_port: int
    log_path: Path

    def http(self, port: int, path: str, method: str = "GET") -> tuple[int, str]:
        req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method)
        try:
            with urllib.request.urlopen(req, timeout=5) as resp:
                return resp.status, resp.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return 0, ""

    def ready(self) -> bool:
        return self.http(self.readiness_port, "/healthz/ready")[0] == 200

    def config_dump(self) -> dict[str, Any]:
        status, body = self.http(self.admin_port, "/config_dump")
        assert status == 200, body
        dump: dict[str, Any] = json.loads(body)
        return dump

    def metrics(self) -> str:
        status, body = self.http(self.metrics_port, "/metrics")
        assert status == 200
        return body

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 15.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def start_proxy(
    node: str,
    config: Path,
    ca_dir: Path,
    workdir: Path,
    *extra: str,
    wait_ready: bool = True,
    ca_args: tuple[str, ...] | None = None,
) -> ProxyProcess:
    """A proxy subprocess; `ca_args` replaces `--ca-dir ca_dir` (e.g. `--ca HOST:PORT --ca-root R --token-file T`)."""
    metrics, admin, ready = free_port(), free_port(), free_port()
    log_path = workdir / f"proxy-{node}-{admin}.log"
    argv = [
        ZTUNNEL,
        "--log-level",
        "info",
        "proxy",
        "--node",
        node,
        "-f",
        str(config),
        *(ca_args if ca_args is not None else ("--ca-dir", str(ca_dir))),
        "--metrics-addr",
        f"127.0.0.1:{metrics}",
        "--admin-addr",
        f"127.0.0.1:{admin}",
        "--readiness-addr",
        f"127.0.0.1:{ready}",
        *extra,
    ]
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=workdir)
    p = ProxyProcess(node, proc, metrics, admin, ready, log_path)
    if wait_ready:
        try:
            eventually(lambda: p.ready() or p.proc.poll() is not None, 20, what=f"proxy {node} ready")
        except AssertionError:
            p.stop()
            raise
        if p.proc.poll() is not None:
            raise AssertionError(f"proxy {node} exited with {p.proc.returncode}:\n{p.log()}")
    return p


# ---- apps --------------------------------------------------------------------------------------------
class AppServer:
    """Echo (with half-close) and tiny HTTP apps on pod IPs, served by one asyncio loop in a thread."""

    def __init__(self) -> None:
        self.loop = uvloop.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="apps", daemon=True)
        self._servers: list[asyncio.Server] = []
        self.connections = 0  # accepted by any app here (the bench's blast app counts itself in too)
        self._echo_app = Echo()
        self._thread.start()

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    async def _echo(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        await self._echo_app(reader, writer)

    async def _http(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            await reader.readuntil(b"\r\n\r\n")
            host = writer.get_extra_info("sockname")[0]
            body = f"hello from {host}\n".encode()
            writer.write(b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
            await writer.drain()
        except (ConnectionError, OSError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    def echo(self, ip: str, port: int = ECHO_PORT) -> None:
        self._servers.append(self._run(asyncio.start_server(self._echo, ip, port, reuse_address=True, backlog=2048)))

    def http(self, ip: str, port: int = HTTP_PORT) -> None:
        self._servers.append(self._run(asyncio.start_server(self._http, ip, port, reuse_address=True)))

    def close(self) -> None:
        async def shutdown() -> None:
            for s in self._servers:
                s.close()
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()

        with contextlib.suppress(Exception):
            self._run(shutdown())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        self.loop.close()


# ---- SOCKS5 client -------------------------------------------------------------------------------
class SocksRefused(ConnectionError):
    def __init__(self, code: int) -> None:
        super().__init__(f"SOCKS5 reply {code}")
        self.code = code


def socks_connect(proxy_ip: str, dst: tuple[str, int], timeout: float = 10.0) -> socket.socket:
    """A blocking SOCKS5 CONNECT through `<proxy_ip>:15080`; raises SocksRefused with the reply code."""
    s = socket.create_connection((proxy_ip, 15080), timeout=timeout)
    try:
        s.sendall(b"\x05\x01\x00")
        assert _recv_exact(s, 2) == b"\x05\x00"
        if ":" in dst[0]:
            address = b"\x04" + socket.inet_pton(socket.AF_INET6, dst[0])
        else:
            address = b"\x01" + socket.inet_aton(dst[0])
        s.sendall(b"\x05\x01\x00" + address + struct.pack("!H", dst[1]))
        head = _recv_exact(s, 4)
        if len(head) < 2:
            raise SocksRefused(-1)
        if head[1] != 0:
            raise SocksRefused(head[1])
        _recv_exact(s, 6 if head[3] == 1 else 18)
    except BaseException:
        s.close()
        raise
    return s


def _recv_exact(s: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            break
        buf += chunk
    return buf


def recv_all(s: socket.socket) -> bytes:
    chunks = []
    while chunk := s.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def socks_echo(client_ip: str, dst: tuple[str, int], payload: bytes = b"ping") -> bytes:
    """`payload` from `client_ip`'s SOCKS5 listener to `dst`, the write side shut after it: all that came back."""
    with socks_connect(client_ip, dst) as s:
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        return recv_all(s)


def socks_refused(client_ip: str, dst: tuple[str, int]) -> bool:
    """Whether an echo from `client_ip` to `dst` is refused (a SOCKS5 error reply or a failed connection)."""
    try:
        socks_echo(client_ip, dst)
    except (SocksRefused, ConnectionError):
        return True
    return False


# ---- the shared mesh -------------------------------------------------------------------------------
@dataclass
class LocalMesh:
    workdir: Path
    ca_dir: Path
    config: Path
    a: ProxyProcess
    b: ProxyProcess
    apps: AppServer
    ipv6: bool = False


@pytest.fixture(scope="session")
def ca_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from ztunnel.identity.ca import init_ca_dir

    d = tmp_path_factory.mktemp("ca") / "ca"
    init_ca_dir(d)
    return d


@pytest.fixture
async def certs(ca_dir: Path) -> AsyncIterator[CertificateManager]:
    """The proxy's certificate path (`--ca-dir`): an in-process CertificateManager on the session CA."""
    async with in_process_certs(ca_dir) as manager:
        yield manager


@pytest.fixture(scope="session")
def local_mesh(tmp_path_factory: pytest.TempPathFactory, ca_dir: Path) -> Iterator[LocalMesh]:
    """node-a and node-b proxies (subprocesses) on one config, echo/HTTP apps on node-b and outside."""
    workdir = tmp_path_factory.mktemp("mesh")
    config = workdir / "cluster.yaml"
    ipv6 = ipv6_loopback()
    config.write_text(mesh_config(ipv6))
    apps = AppServer()
    procs: list[ProxyProcess] = []
    try:
        for ip in (NODE_B_SERVER, NODE_B_STRICT, OUTSIDE):
            apps.echo(ip)
        if ipv6:
            apps.echo(NODE_B_SERVER6, ECHO6_PORT)
        apps.http(NODE_B_SERVER)
        procs.append(start_proxy("node-a", config, ca_dir, workdir))
        procs.append(start_proxy("node-b", config, ca_dir, workdir))
        yield LocalMesh(workdir, ca_dir, config, procs[0], procs[1], apps, ipv6=ipv6)
    finally:
        for p in procs:
            p.stop()
        apps.close()


def transfer_size() -> int:
    """Bytes for the bulk transfer test: ZTUNNEL_TEST_TRANSFER_MB (default 1 GiB each way, ~20 s here)."""
    return int(os.environ.get("ZTUNNEL_TEST_TRANSFER_MB", "1024")) * 1024 * 1024


async def raw_hbone_status(
    ctx: ssl.SSLContext,
    address: tuple[str, int],
    headers: list[tuple[str, str]],
    *,
    local_addr: tuple[str, int] | None = None,
) -> int | None:
    """Send one request with plain h2 (none of the project's HBONE code) and return the response :status."""
    reader, writer = await asyncio.open_connection(*address, ssl=ctx, server_hostname="", local_addr=local_addr)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    conn.initiate_connection()
    sid = conn.get_next_available_stream_id()
    conn.send_headers(sid, headers, end_stream=False)
    writer.write(conn.data_to_send())
    try:
        async with asyncio.timeout(10):
            while data := await reader.read(65536):
                for event in conn.receive_data(data):
                    if isinstance(event, h2.events.ResponseReceived) and event.stream_id == sid:
                        # header_encoding utf-8: h2 gives str headers (its annotations say bytes)
                        return int(cast("dict[str, str]", dict(event.headers))[":status"])
                writer.write(conn.data_to_send())
        return None
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await writer.wait_closed()
