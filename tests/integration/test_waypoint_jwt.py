"""RequestAuthentication at the waypoint process, as the app sees it: a verified token's `Authorization` header
does not reach the app, the claims (nested too) and the payload arrive in the headers the rule names, a client's
own copy of those headers is replaced, a cookie token is read, and a bad token is answered 401 without reaching
the app; a jwksUri that never answers fails at the rule's `timeout`, counted in the waypoint's metrics; a
RequestAuthentication with `targetRefs` applies through its waypoint Gateway or to its Service only. The
cluster, the destination node proxy and the app are test_waypoint_local's."""

from __future__ import annotations

import base64
import json
import socket
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.eventually import eventually
from tests.support.identity import free_port
from tests.support.jwtkit import claims, jwks, key
from tests.support.waypoint import (
    APP_PORT,
    CONFIG,
    GREETER_IP,
    KeepAliveApp,
    Responses,
    client_pool,
    proxy_and_waypoint,
    tunnel,
)
from ztunnel.hbone.client import HbonePool

ISS = "https://issuer.test"
ES = key("ES256")
GATEWAY_ISS = "https://gateway.test"  # its RequestAuthentication targets the waypoint Gateway
GATEWAY_KEY = key("RS256")
ORPHAN_ISS = "https://orphan.test"  # its RequestAuthentication targets another Service
ORPHAN_KEY = key("ES256", n=1)
REQUEST_AUTHENTICATION = f"""\
---
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {{name: greeter-jwt, namespace: greet}}
spec:
  selector: {{matchLabels: {{app: greeter-service}}}}
  jwtRules:
  - issuer: {ISS}
    jwks: '{jwks(ES)}'
    fromHeaders: [{{name: Authorization, prefix: "Bearer "}}]
    fromCookies: [session]
    outputPayloadToHeader: x-jwt-payload
    outputClaimToHeaders:
    - {{header: x-jwt-sub, claim: sub}}
    - {{header: x-jwt-role, claim: realm.role}}
    timeout: 2s
  - issuer: https://remote.test
    jwksUri: http://127.0.0.1:SILENT_PORT/jwks
    timeout: 300ms
---
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {{name: at-the-waypoint, namespace: greet}}
spec:
  targetRefs: [{{group: gateway.networking.k8s.io, kind: Gateway, name: waypoint}}]
  jwtRules: [{{issuer: {GATEWAY_ISS}, jwks: '{jwks(GATEWAY_KEY)}'}}]
---
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {{name: for-orphan, namespace: greet}}
spec:
  targetRefs: [{{group: "", kind: Service, name: orphan}}]
  jwtRules: [{{issuer: {ORPHAN_ISS}, jwks: '{jwks(ORPHAN_KEY)}'}}]
"""


@dataclass
class Running:
    ca_dir: Path
    app: KeepAliveApp
    log: Path
    metrics_port: int
    jwks_uri: str


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory, ca_dir: Path) -> Iterator[Running]:
    workdir = tmp_path_factory.mktemp("waypoint-jwt")
    config = workdir / "cluster.yaml"
    silent = socket.socket()  # a JWKS server that takes connections (the backlog) and never answers
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    silent_port = silent.getsockname()[1]
    config.write_text(CONFIG + REQUEST_AUTHENTICATION.replace("SILENT_PORT", str(silent_port)))
    app = KeepAliveApp(GREETER_IP, APP_PORT)
    metrics_port = free_port()
    try:
        with proxy_and_waypoint(config, ca_dir, workdir, "--metrics-addr", f"127.0.0.1:{metrics_port}") as (_, _, log):
            yield Running(ca_dir, app, log, metrics_port, f"http://127.0.0.1:{silent_port}/jwks")
    finally:
        app.close()
        silent.close()


@pytest.fixture
async def client(running: Running) -> AsyncIterator[HbonePool]:
    async with client_pool(running.ca_dir) as pool:
        yield pool


def _token() -> str:
    now = int(time.time())
    return ES.sign(claims(iss=ISS, sub="alice", realm={"role": "ops"}, iat=now - 10, exp=now + 600))


def _headers(head: bytes) -> list[tuple[bytes, bytes]]:
    lines = head.split(b"\r\n\r\n", 1)[0].split(b"\r\n")[1:]
    return [(k.strip().lower(), v.strip()) for k, _, v in (line.partition(b":") for line in lines)]


def _request(*headers: bytes) -> bytes:
    head = b"GET /hello HTTP/1.1\r\nHost: greeter.greet.svc.cluster.local\r\n"
    return head + b"".join(h + b"\r\n" for h in headers) + b"\r\n"


async def test_the_app_gets_the_claims_not_the_token_and_a_bad_token_is_401(
    client: HbonePool, running: Running
) -> None:
    token = _token().encode()
    stream = await tunnel(client)
    responses = Responses(stream)
    try:
        seen = len(running.app.heads)
        await stream.write(_request(b"Authorization: Bearer " + token, b"X-Jwt-Role: root"))
        status, _, body = await responses.next()
        assert (status, body.startswith(b"hello GET /hello")) == (200, True)
        headers = _headers(running.app.heads[seen])
        names = [k for k, _ in headers]
        assert b"authorization" not in names  # forwardOriginalToken is false
        assert (b"x-jwt-sub", b"alice") in headers and [v for k, v in headers if k == b"x-jwt-role"] == [b"ops"]
        (payload,) = [v for k, v in headers if k == b"x-jwt-payload"]
        assert json.loads(base64.urlsafe_b64decode(payload + b"=" * (-len(payload) % 4)))["realm"] == {"role": "ops"}

        await stream.write(_request(b"Cookie: theme=dark; session=" + token))  # same connection, cookie token
        status, _, _ = await responses.next()
        headers = _headers(running.app.heads[seen + 1])
        assert status == 200 and (b"x-jwt-sub", b"alice") in headers
        assert (b"cookie", b"theme=dark; session=" + token) in headers

        await stream.write(_request(b"Cookie: session=" + token[:-6] + b"AAAAAA"))
        status, _, body = await responses.next()
        assert (status, body) == (401, b"Jwt verification fails")
        assert len(running.app.heads) == seen + 2  # never reached the app
    finally:
        stream.close()


def _metric(port: int, line_start: str) -> float | None:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/stats/prometheus", timeout=5) as r:
        text = r.read().decode()
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(line_start)]
    return values[0] if values else None


def test_a_silent_jwks_uri_fails_at_the_rules_timeout_and_is_counted(running: Running) -> None:
    errors = f'ztunnel_jwks_fetches_total{{result="error",uri="{running.jwks_uri}"}}'
    eventually(lambda: (_metric(running.metrics_port, errors) or 0) >= 1, 10, what="a failed JWKS fetch counted")
    assert "no answer within 0.3s" in running.log.read_text()  # the rule's 300ms, not the 5 s default


async def test_request_authentications_by_target_refs_apply_through_their_waypoint_or_service_only(
    client: HbonePool, running: Running
) -> None:
    now = int(time.time())
    times = {"iat": now - 10, "exp": now + 600}
    stream = await tunnel(client)
    responses = Responses(stream)
    try:
        seen = len(running.app.heads)
        gateway_token = GATEWAY_KEY.sign(claims(iss=GATEWAY_ISS, sub="bob", **times)).encode()
        await stream.write(_request(b"Authorization: Bearer " + gateway_token))
        status, _, body = await responses.next()
        assert (status, body.startswith(b"hello GET /hello")) == (200, True)  # the waypoint's rule verified it
        orphan_token = ORPHAN_KEY.sign(claims(iss=ORPHAN_ISS, sub="eve", **times)).encode()
        await stream.write(_request(b"Authorization: Bearer " + orphan_token))
        status, _, body = await responses.next()
        assert (status, body) == (401, b"Jwt verification fails")  # that rule is the orphan Service's, not greeter's
        assert len(running.app.heads) == seen + 1
    finally:
        stream.close()
