"""ext-authz (CUSTOM) request building and verdicts for both of Envoy's APIs, and the mesh config's providers.

The gRPC CheckRequest is spelled out byte for byte from Envoy's published field numbers (tag bytes written
by hand: 0x0a = field 1 length-delimited, 0x12 = field 2, ...), independently of the encoder under test."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from ztunnel.config.loader import ConfigError, build_config, load_documents, read_mesh
from ztunnel.config.model import ExtAuthzProvider
from ztunnel.waypoint.extauthz import (
    CheckAttributes,
    encode_check_request,
    http_check_request,
    on_error,
    read_check_response,
    read_http_response,
    resolve_provider,
)

GRPC = ExtAuthzProvider("kyverno", "grpc", "kyverno.authz.svc.cluster.local", 9000)
HTTP = ExtAuthzProvider(
    "sample",
    "http",
    "ext-authz.authz.svc.cluster.local",
    8000,
    path_prefix="/check",
    include_request_headers=("x-ext-authz", "x-user-*"),
    include_additional_headers=(("x-added", "yes"),),
    headers_to_upstream_on_allow=("x-ext-authz-check-result",),
    headers_to_downstream_on_deny=("x-ext-authz-check-result", "content-type"),
)
ATTRS = CheckAttributes(
    source_ip="10.0.0.1",
    source_port=5000,
    source_principal="spiffe://a",
    destination_ip="10.0.0.2",
    destination_port=8080,
    destination_principal="spiffe://b",
    method="GET",
    path="/book",
    host="h",
    headers=(),
)


def ld(tag: int, payload: bytes) -> bytes:
    n = len(payload)
    assert n < 1 << 14
    return bytes([tag, n] if n < 128 else [tag, n & 0x7F | 0x80, n >> 7]) + payload  # the length as a varint


def test_check_request_bytes_use_envoys_field_numbers() -> None:
    def peer(ip: bytes, port_varint: bytes, principal: bytes) -> bytes:
        socket_address = ld(0x12, ip) + b"\x18" + port_varint  # address=2, port_value=3
        # Peer.address=1 > Address.socket_address=1; Peer.principal=4
        return ld(0x0A, ld(0x0A, socket_address)) + ld(0x22, principal)

    def entry(k: bytes, v: bytes) -> bytes:
        return ld(0x1A, ld(0x0A, k) + ld(0x12, v))  # headers=3, map entry key=1 value=2

    http = (
        ld(0x12, b"GET")  # method=2
        + entry(b":authority", b"h")
        + entry(b":method", b"GET")
        + entry(b":path", b"/book")
        + entry(b":scheme", b"http")
        + ld(0x22, b"/book")  # path=4
        + ld(0x2A, b"h")  # host=5
        + ld(0x32, b"http")  # scheme=6
        + b"\x48" + b"\xff" * 9 + b"\x01"  # size=9: -1 as int64
        + ld(0x52, b"HTTP/1.1")  # protocol=10
    )
    context = (
        ld(0x0A, peer(b"10.0.0.1", b"\x88\x27", b"spiffe://a"))  # source=1, port 5000
        + ld(0x0A + 8, peer(b"10.0.0.2", b"\x90\x3f", b"spiffe://b"))  # destination=2, port 8080
        + ld(0x22, ld(0x12, http))  # request=4 > http=2
    )
    assert encode_check_request(ATTRS) == ld(0x0A, context)  # CheckRequest.attributes=1


def test_check_request_carries_all_headers_and_size() -> None:
    data = encode_check_request(_attrs(headers=(("x-a", "1"),)))
    assert ld(0x1A, ld(0x0A, b"x-a") + ld(0x12, b"1")) in data
    sized = encode_check_request(_attrs(headers=(("content-length", "5"),)))
    assert b"\x48\x05" in sized


def _attrs(**kw: Any) -> CheckAttributes:
    return replace(ATTRS, **kw)


def test_check_response_ok_adds_headers_upstream() -> None:
    header = ld(0x12, ld(0x0A, ld(0x0A, b"X-User") + ld(0x12, b"alice")))  # OkHttpResponse.headers=2
    answer = ld(0x0A, b"") + ld(0x1A, header + ld(0x2A, b"authorization"))  # status OK; ok_response=3
    v = read_check_response(GRPC, answer)
    assert v.allowed and v.headers == ((b"x-user", b"alice"),) and v.remove_headers == {b"authorization"}


def test_check_response_denied_gives_status_headers_body() -> None:
    header = ld(0x12, ld(0x0A, ld(0x0A, b"x-why") + ld(0x12, b"kyverno")))  # headers=2
    denied = ld(0x0A, b"\x08\x91\x03") + header + ld(0x1A, b"nope")  # status=1 {code=1: 401}, body=3
    answer = ld(0x0A, b"\x08\x07" + ld(0x12, b"denied")) + ld(0x12, denied)  # code 7 PERMISSION_DENIED; 401
    v = read_check_response(GRPC, answer)
    assert (v.allowed, v.status, v.body, v.headers) == (False, 401, b"nope", ((b"x-why", b"kyverno"),))
    bare = read_check_response(GRPC, ld(0x0A, b"\x08\x07"))
    assert (bare.allowed, bare.status, bare.body) == (False, 403, b"")


def test_malformed_check_response_is_an_error() -> None:
    assert read_check_response(GRPC, b"\x0a\x05ab") == on_error(GRPC, "malformed CheckResponse: truncated field")
    v = read_check_response(GRPC, b"\x0a\x05ab")
    assert (v.allowed, v.status) == (False, 403)


def test_http_request_has_prefix_default_and_listed_headers_only() -> None:
    a = _attrs(
        method="POST",
        path="/book?x=1",
        host="testapp-1.demo:8080",
        headers=(
            ("host", "testapp-1.demo:8080"),
            ("authorization", "Bearer t"),
            ("x-ext-authz", "allow"),
            ("x-user-id", "7"),
            ("cookie", "secret"),
            ("content-length", "3"),
        ),
    )
    assert http_check_request(HTTP, a) == (
        b"POST /check/book?x=1 HTTP/1.1\r\nhost: testapp-1.demo:8080\r\nauthorization: Bearer t\r\n"
        b"x-ext-authz: allow\r\nx-user-id: 7\r\nx-added: yes\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
    )


def test_http_verdicts() -> None:
    ok = read_http_response(HTTP, 200, (("x-ext-authz-check-result", "allowed"), ("x-other", "1")), b"")
    assert ok.allowed and ok.headers == ((b"x-ext-authz-check-result", b"allowed"),)
    no = read_http_response(
        HTTP, 403, (("x-ext-authz-check-result", "denied"), ("x-other", "1"), ("content-length", "6")), b"denied"
    )
    assert (no.allowed, no.status, no.body, no.headers) == (
        False,
        403,
        b"denied",
        ((b"x-ext-authz-check-result", b"denied"),),
    )
    everything = ExtAuthzProvider("p", "http", "a.b", 1)  # headersToDownstreamOnDeny unset: all but framing
    v = read_http_response(everything, 401, (("www-authenticate", "Basic"), ("content-length", "0")), b"")
    assert v.headers == ((b"www-authenticate", b"Basic"),)


def test_error_fails_closed_with_status_on_error_or_open() -> None:
    assert (on_error(HTTP, "x").allowed, on_error(HTTP, "x").status) == (False, 403)
    p = ExtAuthzProvider("p", "http", "a.b", 1, status_on_error=503)
    assert on_error(p, "x").status == 503
    assert on_error(ExtAuthzProvider("p", "http", "a.b", 1, fail_open=True), "x").allowed


MESH = """\
apiVersion: v1
kind: Namespace
metadata: {name: authz}
---
apiVersion: v1
kind: Pod
metadata: {name: authz-0, namespace: authz, uid: u1, labels: {app: authz}}
spec: {nodeName: n, containers: [{name: a, ports: [{name: grpc, containerPort: 9191}]}]}
status: {podIP: 10.1.0.5}
---
apiVersion: v1
kind: Service
metadata: {name: kyverno, namespace: authz}
spec: {clusterIP: 10.96.1.1, selector: {app: authz}, ports: [{port: 9000, targetPort: grpc}]}
---
apiVersion: v1
kind: ConfigMap
metadata: {name: istio, namespace: istio-system}
data:
  mesh: |
    extensionProviders:
    - name: kyverno
      envoyExtAuthzGrpc: {service: kyverno.authz.svc.cluster.local, port: 9000, timeout: 250ms}
    - name: sample
      envoyExtAuthzHttp:
        service: ext-authz.authz.svc.cluster.local
        port: 8000
        pathPrefix: /check
        failOpen: true
        statusOnError: "503"
        includeRequestHeadersInCheck: [X-Ext-Authz]
        includeAdditionalHeadersInCheck: {x-added: "yes"}
        headersToUpstreamOnAllow: [x-ext-authz-check-result]
        headersToDownstreamOnDeny: [content-type]
    - name: zipkin
      zipkin: {service: zipkin.istio-system.svc.cluster.local, port: 9411}
"""


def test_mesh_config_providers_and_resolution() -> None:
    cfg = build_config(load_documents(MESH, "mesh.yaml"))
    assert sorted(cfg.extension_providers) == ["kyverno", "sample"]
    grpc = cfg.extension_providers["kyverno"]
    assert (grpc.kind, grpc.port, grpc.timeout) == ("grpc", 9000, 0.25)
    assert (grpc.fail_open, grpc.status_on_error) == (False, 403)
    http = cfg.extension_providers["sample"]
    assert (http.path_prefix, http.fail_open, http.status_on_error) == ("/check", True, 503)
    assert http.include_request_headers == ("x-ext-authz",) and http.include_additional_headers == (("x-added", "yes"),)
    assert resolve_provider(cfg, grpc) == ("10.1.0.5", 9191)  # the ready endpoint's pod IP and target port
    assert resolve_provider(cfg, http) == "provider sample: no Service ext-authz.authz.svc.cluster.local"


@pytest.mark.parametrize(
    ("edit", "field"),
    [
        ("port: 9000, timeout: 250ms", "extensionProviders[0].envoyExtAuthzGrpc.port"),
        ("port: 9000, timeout: soon", "extensionProviders[0].envoyExtAuthzGrpc.timeout"),
        ("service: kyverno.authz.svc.cluster.local, ", "extensionProviders[0].envoyExtAuthzGrpc.service"),
    ],
)
def test_bad_provider_names_file_object_field(edit: str, field: str) -> None:
    bad = {"port: 9000, timeout: 250ms": "port: 0", "port: 9000, timeout: soon": "port: 9000, timeout: soon"}
    text = MESH.replace("port: 9000, timeout: 250ms", bad[edit]) if edit in bad else MESH.replace(edit, "")
    with pytest.raises(ConfigError) as e:
        build_config(load_documents(text, "mesh.yaml"))
    message = str(e.value)
    assert "mesh.yaml" in message and "ConfigMap istio-system/istio" in message and field in message, message


def test_mesh_config_file(tmp_path: Path) -> None:
    mesh = MESH.split("  mesh: |\n", 1)[1]
    path = tmp_path / "mesh.yaml"
    path.write_text("\n".join(line[4:] for line in mesh.splitlines()))
    assert sorted(read_mesh(path).extension_providers) == ["kyverno", "sample"]
    path.write_text("extensionProviders:\n- name: x\n  envoyExtAuthzHttp: {service: a.b, port: 1, failOpen: maybe}\n")
    with pytest.raises(ConfigError) as e:
        read_mesh(path)
    assert str(path) in str(e.value) and "extensionProviders[0].envoyExtAuthzHttp.failOpen" in str(e.value)


@pytest.mark.parametrize(("port", "parsed"), [('"9000"', 9000), ("'9000'", 9000), ('"90x"', None), ('"0"', None)])
def test_a_port_written_as_a_string_is_read_as_istio_reads_it(port: str, parsed: int | None) -> None:
    """Seed 003 writes `port: "9000"`: MeshConfig is read through protobuf's JSON mapping, where a uint32 may be a
    decimal string."""
    text = MESH.replace("port: 9000, timeout: 250ms", f"port: {port}")
    if parsed is None:
        with pytest.raises(ConfigError, match=r"envoyExtAuthzGrpc\.port"):
            build_config(load_documents(text, "mesh.yaml"))
    else:
        assert build_config(load_documents(text, "mesh.yaml")).extension_providers["kyverno"].port == parsed
