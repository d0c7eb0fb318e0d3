"""An attacker with a valid workload identity against the waypoint: requests the AuthorizationPolicy denies must
not reach the app, and what the policy matched must be what the app receives.

Two Services select the greeter pod: `greeter` (ALLOW `/public/*` only, DENY `/admin*`) and `guarded` (DENY
`/admin*`, DENY `DELETE`, DENY host `secret.greet`; everything else allowed), so a trick that slips past the DENY
is not hidden by a missing ALLOW. The app (tests/support/waypoint.KeepAliveApp) records every head it gets;
each case checks the answer and the target the app saw. Bytes are written raw into the HBONE tunnel (the source
node proxy's side), h2c ones with h2's own validation off.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import h2.config
import h2.connection
import h2.events
import pytest

from tests.support.waypoint import (
    APP_PORT,
    CLIENT,
    CONFIG,
    VIP,
    WAYPOINT,
    WAYPOINT_IP,
    KeepAliveApp,
    Responses,
    client_pool,
    greeter_cluster,
    proxy_and_waypoint,
    tunnel,
)
from ztunnel.hbone.client import HbonePool, PoolKey
from ztunnel.hbone.protocol import Authority
from ztunnel.hbone.stream import HboneStream
from ztunnel.net.streams import StreamClosed

GUARDED_VIP = "10.96.0.69"
GUARDED_IP = "127.0.165.2"  # its own pod: a Service's policies apply to its endpoints, whatever VIP was dialled
BASE = CONFIG.split("apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy")[0]
POLICIES = f"""\
apiVersion: v1
kind: Pod
metadata: {{name: guarded, namespace: greet, uid: uid-guarded, labels: {{app: guarded}}}}
spec:
  nodeName: node-b
  serviceAccountName: guarded
  containers: [{{name: app, ports: [{{containerPort: {APP_PORT}}}]}}]
status: {{podIP: "{GUARDED_IP}"}}
---
apiVersion: v1
kind: Service
metadata: {{name: guarded, namespace: greet}}
spec: {{clusterIP: {GUARDED_VIP}, selector: {{app: guarded}}, ports: [{{port: 80, targetPort: {APP_PORT}}}]}}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: public-only, namespace: greet}}
spec:
  targetRefs: [{{kind: Service, group: "", name: greeter}}]
  action: ALLOW
  rules: [{{to: [{{operation: {{paths: ["/public/*"]}}}}]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: peer-cert-rule, namespace: greet}}
spec:
  targetRefs: [{{kind: Service, group: "", name: greeter}}]
  action: ALLOW
  rules:
  - to: [{{operation: {{paths: ["/by-cert"]}}}}]
    when: [{{key: "request.headers[x-forwarded-client-cert]", values: ["*/sa/admin"]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: no-admin, namespace: greet}}
spec:
  targetRefs: [{{kind: Service, group: "", name: greeter}}, {{kind: Service, group: "", name: guarded}}]
  action: DENY
  rules:
  - to: [{{operation: {{paths: ["/admin*"]}}}}]
  - to: [{{operation: {{methods: ["DELETE"]}}}}]
  - to: [{{operation: {{hosts: ["secret.greet"]}}}}]
  - from: [{{source: {{notRemoteIpBlocks: ["{GUARDED_IP}/32"]}}}}]
    to: [{{operation: {{paths: ["/ops*"]}}}}]
"""


@dataclass
class Setup:
    ca_dir: Path
    greeter: KeepAliveApp
    guarded: KeepAliveApp



@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, ca_dir: Path) -> Iterator[Setup]:
    workdir = tmp_path_factory.mktemp("waypoint-bypass")
    guarded = KeepAliveApp(GUARDED_IP, APP_PORT)
    try:
        with greeter_cluster(workdir, BASE + POLICIES) as (config, app), proxy_and_waypoint(config, ca_dir, workdir):
            yield Setup(ca_dir, app, guarded)
    finally:
        guarded.close()


@pytest.fixture
async def client(setup: Setup) -> AsyncIterator[HbonePool]:
    async with client_pool(setup.ca_dir) as pool:
        yield pool


def _seen(app: KeepAliveApp, before: int) -> list[bytes]:
    """Request lines the app received since `before` heads."""
    return [h.split(b"\r\n", 1)[0] for h in app.heads[before:]]


async def _exchange(pool: HbonePool, raw: bytes, vip: str, *, answers: int = 1) -> list[tuple[int, bytes]]:
    """Write `raw` in one tunnel; the answers read until `answers` came or the waypoint closed."""
    stream = await tunnel(pool, vip)
    out: list[tuple[int, bytes]] = []
    try:
        await stream.write(raw)
        responses = Responses(stream)
        for _ in range(answers):
            try:
                status, _, body = await responses.next()
            except EOFError:
                break
            out.append((status, body))
    finally:
        stream.close()
    return out


def _req(target: bytes, method: bytes = b"GET", host: bytes = b"greeter", extra: bytes = b"") -> bytes:
    return b"%s %s HTTP/1.1\r\nHost: %s\r\n%s\r\n" % (method, target, host, extra)


# (name, target, ALLOW-/public/* service's answer, the app's request line then (None: not reached))
PATH_CASES = [
    ("double slash", b"//admin", 403, None),
    ("dot segment", b"/./admin", 403, None),
    ("dot-dot out of public", b"/public/../admin", 403, None),
    ("encoded dot-dot", b"/public/%2e%2e/admin", 403, None),
    ("encoded dot-dot upper", b"/public/%2E%2E/admin", 403, None),
    ("encoded letter", b"/public/../%61dmin", 403, None),
    ("backslash", b"/public/..\\admin", 403, None),
    ("backslash dot-dot", b"/public\\..\\admin", 403, None),
    ("fragment", b"/public/#/../admin", 400, None),
    ("query dot-dot", b"/public/x?/../../admin", 200, b"GET /public/x?/../../admin HTTP/1.1"),
    ("NUL encoded", b"/public/%00/../admin", 400, None),
    ("allowed, normalized", b"/public/a/./b/../c", 200, b"GET /public/a/c HTTP/1.1"),
    ("allowed, encoded unreserved", b"/public/%7Euser", 200, b"GET /public/~user HTTP/1.1"),
    ("encoded slash kept", b"/public/..%2Fadmin", 200, b"GET /public/..%2Fadmin HTTP/1.1"),
]


@pytest.mark.parametrize(("target", "status", "seen"), [c[1:] for c in PATH_CASES], ids=[c[0] for c in PATH_CASES])
async def test_path_tricks_http1(
    client: HbonePool, setup: Setup, target: bytes, status: int, seen: bytes | None
) -> None:
    before = len(setup.greeter.heads)
    answers = await _exchange(client, _req(target), VIP)
    assert answers and answers[0][0] == status, answers
    assert _seen(setup.greeter, before) == ([seen] if seen else [])


# The DENY-only Service: what slips past `/admin*` there would reach the app.
DENY_CASES = [
    ("double slash", b"//admin"),
    ("dot segment", b"/./admin"),
    ("dot-dot", b"/x/../admin"),
    ("encoded dot-dot", b"/x/%2e%2e/admin"),
    ("encoded letters", b"/%61%64min"),
    ("backslash", b"/x\\..\\admin"),
    ("triple slash", b"///admin/x"),
]


# Istio's own semantics, kept so that a policy means here what it means there: paths are case-sensitive, `;` is
# not a separator, `%25` is never decoded twice, `*` is OPTIONS' own. (An app that folds case or reads `..;` as
# `..` needs its policy written for that, as Istio's best practices say.)
AS_ISTIO = [
    ("upper case", b"GET", b"/ADMIN", 200, b"GET /ADMIN HTTP/1.1"),
    ("matrix param", b"GET", b"/admin;x=1", 403, None),
    ("tomcat dot-dot-semicolon", b"GET", b"/x/..;/admin", 200, b"GET /x/..;/admin HTTP/1.1"),
    ("double-encoded", b"GET", b"/%2561dmin", 200, b"GET /%2561dmin HTTP/1.1"),
    ("query only", b"GET", b"/x?/admin", 200, b"GET /x?/admin HTTP/1.1"),
    ("asterisk", b"OPTIONS", b"*", 200, b"OPTIONS * HTTP/1.1"),
    ("absolute-form", b"GET", b"http://greeter/admin", 400, None),
]


@pytest.mark.parametrize(
    ("method", "target", "status", "seen"), [c[1:] for c in AS_ISTIO], ids=[c[0] for c in AS_ISTIO]
)
async def test_as_istio_http1(
    client: HbonePool, setup: Setup, method: bytes, target: bytes, status: int, seen: bytes | None
) -> None:
    before = len(setup.guarded.heads)
    answers = await _exchange(client, _req(target, method), GUARDED_VIP)
    assert answers and answers[0][0] == status, answers
    assert _seen(setup.guarded, before) == ([seen] if seen else [])


async def test_forwarded_for_does_not_choose_the_remote_ip(client: HbonePool, setup: Setup) -> None:
    """numTrustedProxies is 0 at the waypoint: `remoteIpBlocks` reads the connection's client, never the
    client's own X-Forwarded-For."""
    before = len(setup.guarded.heads)
    spoofed = _req(b"/ops", extra=b"X-Forwarded-For: %s\r\n" % GUARDED_IP.encode())
    answers = await _exchange(client, spoofed, GUARDED_VIP)
    assert answers[0][0] == 403
    assert _seen(setup.guarded, before) == []


async def test_hbone_forwarded_for_another_pod_is_not_trusted(client: HbonePool, setup: Setup) -> None:
    """The CONNECT's `forwarded: for=` naming a pod of another identity: the waypoint keeps the TCP peer."""
    before = len(setup.guarded.heads)
    key = PoolKey(CLIENT, WAYPOINT, (WAYPOINT_IP, 15008))
    stream = await client.connect(
        key, Authority(GUARDED_VIP, 80), expected_identities=[WAYPOINT.uri], forwarded_for=(GUARDED_IP, 40000)
    )
    try:
        await stream.write(_req(b"/ops"))
        status, _, _ = await Responses(stream).next()
    finally:
        stream.close()
    assert status == 403
    assert _seen(setup.guarded, before) == []


@pytest.mark.parametrize("target", [c[1] for c in DENY_CASES], ids=[c[0] for c in DENY_CASES])
async def test_deny_admin_tricks_http1(client: HbonePool, setup: Setup, target: bytes) -> None:
    before = len(setup.guarded.heads)
    answers = await _exchange(client, _req(target), GUARDED_VIP)
    assert answers and answers[0][0] == 403, answers
    assert _seen(setup.guarded, before) == []


async def test_connection_header_cannot_drop_content_length(client: HbonePool, setup: Setup) -> None:
    """`Connection: content-length` named the framing header hop-by-hop: the head went upstream without it and
    the body, a second request, was read by the app as the next request, never decided."""
    smuggled = b"GET /admin HTTP/1.1\r\nHost: greeter\r\n\r\n"
    raw = _req(b"/public/x", b"POST", extra=b"Connection: content-length\r\nContent-Length: %d\r\n" % len(smuggled))
    before = len(setup.greeter.heads)
    answers = await _exchange(client, raw + smuggled + _req(b"/public/y"), VIP, answers=2)
    assert [s for s, _ in answers] == [200, 200], answers  # /public/y behind it: the app read all before
    assert not any(b"/admin" in line for line in _seen(setup.greeter, before)), _seen(setup.greeter, before)


async def test_connect_is_not_served(client: HbonePool, setup: Setup) -> None:
    """A CONNECT the DENY does not name (no path) would become a raw tunnel to an app that answers 2xx, and the
    requests inside it would never be decided."""
    before = len(setup.guarded.heads)
    raw = b"CONNECT greeter:80 HTTP/1.1\r\nHost: greeter:80\r\n\r\n" + _req(b"/admin")
    answers = await _exchange(client, raw, GUARDED_VIP, answers=2)
    assert answers and answers[0][0] in (403, 405, 501), answers
    assert not any(b"/admin" in line for line in _seen(setup.guarded, before))


async def test_upgrade_the_app_declines_relays_nothing_more(client: HbonePool, setup: Setup) -> None:
    """The app answers 200 to an Upgrade it does not speak: the connection ends, the pipelined /admin behind it
    is never relayed unchecked."""
    before = len(setup.guarded.heads)
    raw = _req(b"/x", extra=b"Connection: Upgrade\r\nUpgrade: foo\r\n") + _req(b"/admin")
    answers = await _exchange(client, raw, GUARDED_VIP, answers=2)
    assert answers[0][0] == 200
    assert _seen(setup.guarded, before) == [b"GET /x HTTP/1.1"]


async def test_pipelined_behind_a_denied_request_is_decided(client: HbonePool, setup: Setup) -> None:
    before = len(setup.guarded.heads)
    raw = _req(b"/admin") + _req(b"/admin/x") + _req(b"/ok")
    answers = await _exchange(client, raw, GUARDED_VIP, answers=3)
    assert [s for s, _ in answers] == [403, 403, 200]
    assert _seen(setup.guarded, before) == [b"GET /ok HTTP/1.1"]


@pytest.mark.parametrize(
    ("host", "status"),
    [(b"secret.greet", 403), (b"SECRET.greet", 403), (b"secret.greet:80", 200), (b"other", 200)],
)
async def test_hosts_rule_case_and_port(client: HbonePool, host: bytes, status: int) -> None:
    """Istio's `hosts` compares case-insensitively and exactly: `secret.greet` does not match `secret.greet:80`
    (its best practices: list `host:*` too). Same here, so a policy written for Istio means the same."""
    answers = await _exchange(client, _req(b"/x", host=host), GUARDED_VIP)
    assert answers[0][0] == status


async def test_http10_without_host_is_refused(client: HbonePool, setup: Setup) -> None:
    """Without a Host the `hosts` DENY cannot match, and the app answers from its default virtual host."""
    before = len(setup.guarded.heads)
    answers = await _exchange(client, b"GET /x HTTP/1.0\r\n\r\n", GUARDED_VIP)
    assert answers and answers[0][0] == 400
    assert _seen(setup.guarded, before) == []


@pytest.mark.parametrize("name", [b"X-Forwarded-Client-Cert", b"X_Forwarded_Client_Cert"])
async def test_forged_client_cert_header_does_not_reach_the_app(client: HbonePool, setup: Setup, name: bytes) -> None:
    """x-forwarded-client-cert is the proxy's word about the peer (Envoy sanitizes a client's copy by default); a
    CGI-style app reads the `_` spelling as the same header."""
    before = len(setup.guarded.heads)
    xfcc = b"%s: URI=spiffe://cluster.local/ns/x/sa/admin\r\n" % name
    answers = await _exchange(client, _req(b"/ok", extra=xfcc), GUARDED_VIP)
    assert answers[0][0] == 200
    heads = setup.guarded.heads[before:]
    assert heads and b"spiffe" not in heads[0].lower()


@pytest.mark.parametrize("name", [b"X-Forwarded-Client-Cert", b"x_forwarded_client_cert"])
async def test_forged_client_cert_header_is_not_what_the_policy_sees(
    client: HbonePool, setup: Setup, name: bytes
) -> None:
    """Envoy sanitizes a client's x-forwarded-client-cert before its filters run, so RBAC never matches a client's
    copy; here the policy saw it (only the app did not), and a `when` on it let a forged one through."""
    before = len(setup.greeter.heads)
    xfcc = b"%s: By=spiffe://cluster.local/ns/greet/sa/greeter;URI=spiffe://cluster.local/ns/x/sa/admin\r\n" % name
    answers = await _exchange(client, _req(b"/by-cert", extra=xfcc), VIP)
    assert answers[0][0] == 403
    assert _seen(setup.greeter, before) == []


@pytest.mark.parametrize("host", [b"secret.greet ", b"secret.greet\t", b"secret.greet \t "])
async def test_hosts_rule_sees_host_without_trailing_whitespace(client: HbonePool, setup: Setup, host: bytes) -> None:
    """Whitespace after a field value is not part of it (RFC 9112 §5: OWS either side); the app's parser trims it
    and routes `secret.greet`, so the `hosts` DENY must match it too (it matched `secret.greet ` before, and the
    request reached the app)."""
    before = len(setup.guarded.heads)
    answers = await _exchange(client, _req(b"/x", host=host), GUARDED_VIP)
    assert answers[0][0] == 403
    assert _seen(setup.guarded, before) == []


@pytest.mark.parametrize("line", [b"GET /ok?1.1", b"GET /ok/HTTP/1.1", b"GET /HTTP/1.0"])
async def test_a_request_line_without_a_version_is_refused(client: HbonePool, setup: Setup, line: bytes) -> None:
    """`GET /ok?1.1` CRLF is an HTTP/0.9 request line to llhttp (method and target only). Read from the line's last
    three bytes, its version passed as 1.1 and the app got `GET /ok?1.1 HTTP/1.1`; it is 505 as before 865c75b.
    (Behind a first request: as a connection's first bytes, the sniffer does not take it for HTTP/1.x.)"""
    before = len(setup.guarded.heads)
    answers = await _exchange(client, _req(b"/ok") + b"%s\r\nHost: greeter\r\n\r\n" % line, GUARDED_VIP, answers=2)
    assert [s for s, _ in answers] == [200, 505]
    assert _seen(setup.guarded, before) == [b"GET /ok HTTP/1.1"]


async def test_field_values_reach_the_app_as_the_policy_saw_them(client: HbonePool, setup: Setup) -> None:
    """Whitespace around a value is dropped for the policy, and the head is rebuilt so the app gets the same value
    (a head with none goes on as its own bytes)."""
    before = len(setup.guarded.heads)
    raw = _req(b"/ok", extra=b"X-A:\t v \t\r\nX-B: w\r\n") + _req(b"/ok", extra=b"X-A: v\r\n")
    answers = await _exchange(client, raw, GUARDED_VIP, answers=2)
    assert [s for s, _ in answers] == [200, 200]
    heads = setup.guarded.heads[before:]
    assert heads == [
        b"GET /ok HTTP/1.1\r\nHost: greeter\r\nX-A: v\r\nX-B: w\r\n\r\n",
        b"GET /ok HTTP/1.1\r\nHost: greeter\r\nX-A: v\r\n\r\n",
    ]


# --- h2c ---


async def _h2(pool: HbonePool, vip: str, headers: list[tuple[bytes, bytes]], body: bytes | None = None) -> int | str:
    """One h2c request with h2's outbound checks off: the status, or "reset"/"closed"."""
    stream: HboneStream = await tunnel(pool, vip)
    conn = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=True, validate_outbound_headers=False, normalize_outbound_headers=False)
    )
    conn.initiate_connection()
    sid = conn.get_next_available_stream_id()
    conn.send_headers(sid, headers, end_stream=body is None)
    if body is not None:
        conn.send_data(sid, body, end_stream=True)
    try:
        await stream.write(conn.data_to_send())
        async with asyncio.timeout(10):
            while True:
                data = await stream.read()
                if not data:
                    return "closed"
                for ev in conn.receive_data(data):
                    if isinstance(ev, h2.events.ResponseReceived) and ev.stream_id == sid:
                        return int(dict(ev.headers)[b":status"])
                    if isinstance(ev, h2.events.StreamReset) and ev.stream_id == sid:
                        return "reset"
                    if isinstance(ev, h2.events.ConnectionTerminated):
                        return "closed"
                await stream.write(conn.data_to_send())
    except StreamClosed:
        return "closed"
    finally:
        stream.close()


def _h2_head(path: bytes, method: bytes = b"GET", authority: bytes = b"greeter") -> list[tuple[bytes, bytes]]:
    return [(b":method", method), (b":scheme", b"http"), (b":authority", authority), (b":path", path)]


H2_CASES = [
    ("CRLF in :path smuggles a request", _h2_head(b"/ok HTTP/1.1\r\nHost: greeter\r\n\r\nGET /admin")),
    ("CRLF in :method", _h2_head(b"/ok", b"GET /admin HTTP/1.1\r\nHost: greeter\r\n\r\nGET")),
    ("CRLF in :authority", _h2_head(b"/ok", authority=b"greeter\r\n\r\nGET /admin HTTP/1.1\r\nHost: x")),
    ("lower-case DELETE", _h2_head(b"/x", b"delete")),
    ("dot-dot", _h2_head(b"/x/../admin")),
    ("double slash", _h2_head(b"//admin")),
    ("encoded dot-dot", _h2_head(b"/x/%2e%2e/admin")),
    ("backslash", _h2_head(b"/x\\..\\admin")),
    ("host differs from :authority", [*_h2_head(b"/x", authority=b"greeter"), (b"host", b"secret.greet")]),
    ("transfer-encoding", [*_h2_head(b"/x", b"POST"), (b"transfer-encoding", b"chunked")]),
    ("connection", [*_h2_head(b"/x"), (b"connection", b"close")]),
    ("upper-case name", [*_h2_head(b"/x"), (b"X-Admin", b"1")]),
    ("duplicate :path", [*_h2_head(b"/x"), (b":path", b"/admin")]),
    ("no authority", [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/x")]),
]


@pytest.mark.parametrize("headers", [c[1] for c in H2_CASES], ids=[c[0] for c in H2_CASES])
async def test_h2c_tricks(client: HbonePool, setup: Setup, headers: list[tuple[bytes, bytes]]) -> None:
    before = len(setup.guarded.heads)
    result = await _h2(client, GUARDED_VIP, headers)
    seen = _seen(setup.guarded, before)
    assert not any(b"admin" in line.lower() or b"DELETE" in line.upper() for line in seen), (result, seen)
    if seen:  # what the app got is what was allowed
        assert result == 200, (result, seen)
    for head in setup.guarded.heads[before:]:
        assert b"secret" not in head.lower(), head
        assert b"\r\nhost: \r\n" not in head.lower(), head  # a Host-less request a `hosts` DENY cannot see


@pytest.mark.parametrize("name", [b"x-forwarded-client-cert", b"x_forwarded_client_cert"])
async def test_forged_client_cert_header_is_not_what_the_policy_sees_h2c(
    client: HbonePool, setup: Setup, name: bytes
) -> None:
    """As its HTTP/1.1 twin: the policy (and ext-authz) decide on the h2c head without a client's copy; here h2c
    kept it for them (only the app lost it), and the `when` on it let a forged one through (200)."""
    before = len(setup.greeter.heads)
    xfcc = b"By=spiffe://cluster.local/ns/greet/sa/greeter;URI=spiffe://cluster.local/ns/x/sa/admin"
    result = await _h2(client, VIP, [*_h2_head(b"/by-cert"), (name, xfcc)])
    assert result == 403
    assert _seen(setup.greeter, before) == []


async def test_h2c_content_length_disagreeing_with_data(client: HbonePool, setup: Setup) -> None:
    """Content-Length 0 and a DATA frame holding a request: the app must not read it as a second request."""
    before = len(setup.guarded.heads)
    smuggled = b"GET /admin HTTP/1.1\r\nHost: greeter\r\n\r\n"
    await _h2(client, GUARDED_VIP, [*_h2_head(b"/x", b"POST"), (b"content-length", b"0")], smuggled)
    assert not any(b"/admin" in line for line in _seen(setup.guarded, before))
