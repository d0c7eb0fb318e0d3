"""CUSTOM policies at the waypoint process, local mode, with real authorizers (seed 003, simplified).

- testapp-1 uses a gRPC `envoy.service.auth.v3.Authorization/Check` server written for this test (grpcio with
  a generic handler; messages from tests/fixtures/envoy_ext_authz.proto, our own write-up of Envoy's field
  numbers, compiled with grpc_tools at set-up) holding the seed's rule: only GET /book.
- testapp-2 uses an HTTP authorizer: only GET /movie; its 403 body and listed headers reach the client.
- testapp-3's provider has no listener (fail closed: 403), testapp-4's is the same with failOpen (allowed).
The authorizers are plain pods outside the mesh, dialled on their pod IP:targetPort in plaintext.
"""

from __future__ import annotations

import asyncio
import importlib.util
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import ModuleType
from typing import Any

import grpc
import pytest
from grpc_tools import protoc

from tests.support.waypoint import (
    KeepAliveApp,
    Responses,
    client_pool,
    gateway_pod,
    proxy_and_waypoint,
    start_waypoint,
    stop,
    wait_listening,
)
from ztunnel.hbone.client import HbonePool, PoolKey
from ztunnel.hbone.protocol import Authority
from ztunnel.identity.spiffe import SpiffeId

APP_IPS = ["127.0.166.1", "127.0.166.2", "127.0.166.3", "127.0.166.4"]  # testapp-1 .. testapp-4
VIPS = ["10.96.2.1", "10.96.2.2", "10.96.2.3", "10.96.2.4"]
WAYPOINT_IP = "127.0.166.10"
MESH_WAYPOINT_IP = "127.0.166.11"  # a second waypoint, started by its own test with --mesh-config
SILENT_IP, SILENT_PORT = "127.0.166.33", 9300  # accepts, never answers
GRPC_IP, GRPC_PORT = "127.0.166.30", 9191
HTTP_IP, HTTP_PORT = "127.0.166.31", 8000
GONE_IP, GONE_PORT = "127.0.166.32", 9999  # nothing listens there
APP_PORT = 8080
CLIENT = SpiffeId.parse("spiffe://cluster.local/ns/demo/sa/client")
WAYPOINT = SpiffeId.parse("spiffe://cluster.local/ns/demo/sa/waypoint")
MESH_WAYPOINT = SpiffeId.parse("spiffe://cluster.local/ns/demo/sa/meshwp")
PROTO = Path(__file__).resolve().parents[1] / "fixtures" / "envoy_ext_authz.proto"
BOOK_ONLY = "The GET method is restricted to the /book path."


def _app(i: int) -> str:
    return f"""\
---
apiVersion: v1
kind: Pod
metadata: {{name: testapp-{i}, namespace: demo, uid: uid-testapp-{i}, labels: {{app: testapp-{i}}}}}
spec:
  nodeName: node-b
  serviceAccountName: testapp-{i}
  containers: [{{name: app, ports: [{{containerPort: {APP_PORT}}}]}}]
status: {{podIP: "{APP_IPS[i - 1]}"}}
---
apiVersion: v1
kind: Service
metadata: {{name: testapp-{i}, namespace: demo}}
spec: {{clusterIP: {VIPS[i - 1]}, selector: {{app: testapp-{i}}}, ports: [{{port: 80, targetPort: {APP_PORT}}}]}}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: ext-authz-{i}, namespace: demo}}
spec:
  targetRefs: [{{kind: Service, group: "", name: testapp-{i}}}]
  action: CUSTOM
  provider: {{name: {["kyverno", "sample", "gone", "gone-open"][i - 1]}}}
  rules: [{{to: [{{operation: {{paths: ["/book", "/movie", "/x"]}}}}]}}]
"""


def _authz(name: str, ip: str, port: int, service_port: int) -> str:
    return f"""\
---
apiVersion: v1
kind: Pod
metadata: {{name: {name}-0, namespace: authz, uid: uid-{name}, labels: {{app: {name}}}}}
spec: {{nodeName: node-a, serviceAccountName: {name}, containers: [{{name: a, ports: [{{containerPort: {port}}}]}}]}}
status: {{podIP: "{ip}"}}
---
apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: authz}}
spec:
  clusterIP: 10.96.3.{port % 200}
  selector: {{app: {name}}}
  ports: [{{port: {service_port}, targetPort: {port}}}]
"""


CONFIG = (
    f"""\
apiVersion: v1
kind: Namespace
metadata: {{name: demo, labels: {{istio.io/dataplane-mode: ambient}}}}
---
apiVersion: v1
kind: Namespace
metadata: {{name: authz}}
---
{gateway_pod("waypoint", "demo", WAYPOINT_IP)}---
{gateway_pod("meshwp", "demo", MESH_WAYPOINT_IP)}---
apiVersion: v1
kind: ConfigMap
metadata: {{name: istio, namespace: istio-system}}
data:
  mesh: |
    extensionProviders:
    - name: kyverno
      envoyExtAuthzGrpc: {{service: kyverno.authz.svc.cluster.local, port: 9000, timeout: 2s}}
    - name: sample
      envoyExtAuthzHttp:
        service: ext-authz.authz.svc.cluster.local
        port: 8000
        pathPrefix: /check
        timeout: 2s
        includeRequestHeadersInCheck: [x-ext-authz]
        headersToUpstreamOnAllow: [x-ext-authz-check-result]
        headersToDownstreamOnDeny: [x-ext-authz-check-result, content-type]
    - name: gone
      envoyExtAuthzGrpc: {{service: gone.authz.svc.cluster.local, port: 9000, timeout: 1s}}
    - name: gone-open
      envoyExtAuthzHttp: {{service: gone.authz.svc.cluster.local, port: 9000, timeout: 1s, failOpen: true}}
"""
    + "".join(_app(i) for i in (1, 2, 3, 4))
    + _authz("kyverno", GRPC_IP, GRPC_PORT, 9000)
    + _authz("ext-authz", HTTP_IP, HTTP_PORT, 8000)
    + _authz("gone", GONE_IP, GONE_PORT, 9000)
    + _authz("silent", SILENT_IP, SILENT_PORT, 9000)
)
# --mesh-config for the second waypoint: `gone` is now the HTTP authorizer (testapp-3 then gets its answers)
MESH_FILE = """\
extensionProviders:
- name: gone
  envoyExtAuthzHttp: {service: ext-authz.authz.svc.cluster.local, port: 8000, pathPrefix: /check}
"""


def _messages(tmp: Path) -> ModuleType:
    """The test's own CheckRequest/CheckResponse classes, compiled from the fixture .proto."""
    assert protoc.main(["protoc", f"-I{PROTO.parent}", f"--python_out={tmp}", PROTO.name]) == 0
    spec = importlib.util.spec_from_file_location("envoy_ext_authz_pb2", tmp / "envoy_ext_authz_pb2.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


class GrpcAuthorizer:
    """Seed 003's rule for testapp-1: GET /book only, anything else denied 403 with the rule's message."""

    def __init__(self, pb: ModuleType) -> None:
        self.pb = pb
        self.seen: list[Any] = []  # CheckRequest messages
        handler = grpc.unary_unary_rpc_method_handler(self.check)  # bytes in, bytes out
        self.server = grpc.server(ThreadPoolExecutor(max_workers=2))
        self.server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler("envoy.service.auth.v3.Authorization", {"Check": handler}),)
        )
        assert self.server.add_insecure_port(f"{GRPC_IP}:{GRPC_PORT}") == GRPC_PORT
        self.server.start()

    def check(self, body: bytes, context: grpc.ServicerContext) -> bytes:
        pb = self.pb
        request = pb.CheckRequest.FromString(body)
        self.seen.append(request)
        http = request.attributes.request.http
        if http.method == "GET" and http.path == "/book":
            ok = pb.OkHttpResponse(headers=[pb.HeaderValueOption(header=pb.HeaderValue(key="x-checked", value="1"))])
            answer = pb.CheckResponse(status=pb.RpcStatus(code=0), ok_response=ok)
        else:
            denied = pb.DeniedHttpResponse(status=pb.HttpStatus(code=403), body=BOOK_ONLY)
            answer = pb.CheckResponse(status=pb.RpcStatus(code=7, message="denied"), denied_response=denied)
        return bytes(answer.SerializeToString())


class HttpAuthorizer:
    """testapp-2's: GET /movie only (under pathPrefix /check); a denial says so with its own headers."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str, dict[str, str]]] = []
        seen = self.seen

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self._answer()

            def do_POST(self) -> None:
                self._answer()

            def _answer(self) -> None:
                seen.append((self.command, self.path, {k.lower(): v for k, v in self.headers.items()}))
                if self.command == "GET" and self.path == "/check/movie":
                    self.send_response(200)
                    self.send_header("x-ext-authz-check-result", "allowed")
                    self.send_header("x-not-listed", "1")
                    self.send_header("content-length", "0")
                    self.end_headers()
                    return
                body = b"denied by ext_authz for testapp-2"
                self.send_response(403)
                self.send_header("x-ext-authz-check-result", "denied")
                self.send_header("x-secret", "internal")
                self.send_header("content-type", "text/html")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer((HTTP_IP, HTTP_PORT), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


@dataclass
class Setup:
    workdir: Path
    ca_dir: Path
    apps: list[KeepAliveApp]
    grpc_authz: GrpcAuthorizer
    http_authz: HttpAuthorizer
    waypoint_log: Path


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, ca_dir: Path) -> Iterator[Setup]:
    workdir = tmp_path_factory.mktemp("extauthz")
    config = workdir / "cluster.yaml"
    config.write_text(CONFIG)
    pb = _messages(workdir)
    apps = [KeepAliveApp(ip, APP_PORT) for ip in APP_IPS]
    grpc_authz = GrpcAuthorizer(pb)
    http_authz = HttpAuthorizer()
    try:
        with proxy_and_waypoint(config, ca_dir, workdir, namespace="demo", ip=WAYPOINT_IP) as (_, _, log_path):
            yield Setup(workdir, ca_dir, apps, grpc_authz, http_authz, log_path)
    finally:
        grpc_authz.server.stop(0).wait(5)
        http_authz.close()
        for app in apps:
            app.close()
        sys.modules.pop("envoy_ext_authz_pb2", None)


@pytest.fixture
async def client(setup: Setup) -> AsyncIterator[HbonePool]:
    async with client_pool(setup.ca_dir) as pool:
        yield pool


async def request(
    pool: HbonePool, app: int, path: str, extra: str = "", waypoint: tuple[SpiffeId, str] = (WAYPOINT, WAYPOINT_IP)
) -> tuple[int, dict[bytes, bytes], bytes]:
    """GET `path` from testapp-<app> through the waypoint, as the source node proxy would send it."""
    key = PoolKey(CLIENT, waypoint[0], (waypoint[1], 15008))
    stream = await pool.connect(key, Authority(VIPS[app - 1], 80), expected_identities=[waypoint[0].uri])
    try:
        host = f"testapp-{app}.demo.svc.cluster.local:8080"
        await stream.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n{extra}\r\n".encode())
        return await Responses(stream).next()
    finally:
        stream.close()


async def test_grpc_authorizer_decides_with_envoys_attributes(setup: Setup, client: HbonePool) -> None:
    status, _, body = await request(client, 1, "/book", "x-user: alice\r\n")
    assert (status, body) == (200, b"hello GET /book (0 body bytes) #1\n")
    assert b"\r\nx-checked: 1" in setup.apps[0].heads[-1]  # the OK response's header went upstream
    status, _, body = await request(client, 1, "/movie")
    assert (status, body) == (403, BOOK_ONLY.encode())
    first = setup.grpc_authz.seen[-2].attributes
    assert first.source.principal == CLIENT.uri
    assert (first.destination.address.socket_address.address, first.destination.address.socket_address.port_value) == (
        APP_IPS[0],
        APP_PORT,
    )
    assert first.destination.principal == "spiffe://cluster.local/ns/demo/sa/testapp-1"
    http = first.request.http
    assert (http.method, http.path, http.host, http.scheme, http.protocol) == (
        "GET",
        "/book",
        "testapp-1.demo.svc.cluster.local:8080",
        "http",
        "HTTP/1.1",
    )
    assert http.headers[":path"] == "/book" and http.headers["x-user"] == "alice"


async def test_http_authorizer_headers_both_ways(setup: Setup, client: HbonePool) -> None:
    status, _, _ = await request(client, 2, "/movie", "x-ext-authz: yes\r\ncookie: secret\r\n")
    assert status == 200
    head = setup.apps[1].heads[-1]
    assert b"\r\nx-ext-authz-check-result: allowed" in head and b"x-not-listed" not in head
    method, path, headers = setup.http_authz.seen[-1]
    assert (method, path, headers["x-ext-authz"]) == ("GET", "/check/movie", "yes")
    assert headers["host"] == "testapp-2.demo.svc.cluster.local:8080"
    assert "cookie" not in headers  # not in includeRequestHeadersInCheck
    status, response_headers, body = await request(client, 2, "/book")
    assert (status, body) == (403, b"denied by ext_authz for testapp-2")
    assert response_headers[b"x-ext-authz-check-result"] == b"denied"
    assert response_headers[b"content-type"] == b"text/html"
    assert b"x-secret" not in response_headers  # not in headersToDownstreamOnDeny


async def test_a_path_outside_the_custom_rules_never_reaches_the_authorizer(setup: Setup, client: HbonePool) -> None:
    grpc_before, http_before = len(setup.grpc_authz.seen), len(setup.http_authz.seen)
    for app in (1, 2, 3):
        status, _, body = await request(client, app, "/public")
        assert (status, body) == (200, b"hello GET /public (0 body bytes) #1\n")
    assert (len(setup.grpc_authz.seen), len(setup.http_authz.seen)) == (grpc_before, http_before)


async def test_unreachable_authorizer_denies_unless_fail_open(setup: Setup, client: HbonePool) -> None:
    status, _, body = await request(client, 3, "/x")
    assert (status, body) == (403, b"")
    status, _, body = await request(client, 4, "/x")
    assert (status, body) == (200, b"hello GET /x (0 body bytes) #1\n")
    log = setup.waypoint_log.read_text()
    assert "ext-authz gone failed" in log, log[-2000:]



async def test_mesh_config_file_replaces_the_configmaps_providers(setup: Setup, client: HbonePool) -> None:
    mesh = setup.workdir / "mesh.yaml"
    mesh.write_text(MESH_FILE)
    config = setup.workdir / "cluster.yaml"
    (setup.workdir / "meshwp").mkdir(exist_ok=True)
    args = ("--name", "meshwp", "--namespace", "demo", "--mesh-config", str(mesh), "--drain-timeout", "0.5s")
    proc, log_path = start_waypoint(config, setup.ca_dir, setup.workdir / "meshwp", *args)
    try:
        wait_listening(proc, log_path, MESH_WAYPOINT_IP)
        status, _, body = await request(client, 3, "/x", waypoint=(MESH_WAYPOINT, MESH_WAYPOINT_IP))
        assert (status, body) == (403, b"denied by ext_authz for testapp-2")  # the HTTP authorizer answered
        assert setup.http_authz.seen[-1][:2] == ("GET", "/check/x")
    finally:
        stop(proc)


async def test_a_silent_authorizer_times_out_and_fails_closed(setup: Setup) -> None:
    from ztunnel.config.loader import build_config, load_documents
    from ztunnel.config.model import ExtAuthzProvider
    from ztunnel.waypoint.extauthz import Authorizers, CheckAttributes

    accepted: list[asyncio.StreamWriter] = []

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)  # read nothing, answer nothing

    server = await asyncio.start_server(hold, SILENT_IP, SILENT_PORT)
    authorizers = Authorizers()
    try:
        cfg = build_config(load_documents(CONFIG, "cluster.yaml"))
        attrs = CheckAttributes("10.0.0.1", 1, "", "10.0.0.2", 2, "", "GET", "/", "h", ())
        for kind in ("http", "grpc"):
            provider = ExtAuthzProvider("silent", kind, "silent.authz.svc.cluster.local", 9000, timeout=0.3)
            loop = asyncio.get_running_loop()
            started = loop.time()
            verdict = await authorizers.check(cfg, provider, attrs)
            assert (verdict.allowed, verdict.status) == (False, 403), verdict
            assert "no answer within 0.3s" in verdict.reason and loop.time() - started < 2
        assert accepted  # it was reached: the timeout, not a refusal, decided
    finally:
        await authorizers.close()
        for w in accepted:
            w.close()
        server.close()
        await server.wait_closed()
