"""The waypoint's pure parts (waypoint/server.py): which endpoint a request goes to, and what is done with it
(RequestAuthentication, then check_l7; CUSTOM pending on its provider), plus the header removal `Http1Connection.allow`
applies for the JWT edits."""

from __future__ import annotations

import json

from tests.support.jwtkit import NOW, claims, jwks, key
from tests.support.waypoint_config import BASE, CLIENT, VIP, config
from ztunnel.config.model import ClusterConfig
from ztunnel.hbone.protocol import Authority
from ztunnel.policy.decision import ConnectionAttributes
from ztunnel.policy.engine import PolicyEngine
from ztunnel.waypoint.extauthz import AuthzVerdict
from ztunnel.waypoint.http1 import Http1Connection, RequestHead, RequestReceived
from ztunnel.waypoint.jwt import KeyStore
from ztunnel.waypoint.server import EndpointPicker, RequestDecider, Verdict, after_ext_authz, source_ip

ISS = "https://issuer.test"
RS = key("RS256")
JWT = (
    "---\napiVersion: security.istio.io/v1\nkind: RequestAuthentication\n"
    "metadata: {name: jwt, namespace: greet}\n"
    f"spec:\n  jwtRules:\n  - issuer: {ISS}\n    jwks: {json.dumps(jwks(RS))}\n"
    "    outputPayloadToHeader: x-jwt-payload\n"
)
CUSTOM = (
    "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n"
    "metadata: {name: ext, namespace: greet}\n"
    "spec:\n  action: CUSTOM\n  provider: {name: authz}\n  rules: [{to: [{operation: {paths: ['/ext*']}}]}]\n"
)


def head(raw: bytes) -> RequestHead:
    conn = Http1Connection()
    conn.receive_data(raw)
    ev = conn.next_request_event()
    assert isinstance(ev, RequestReceived), ev
    return ev.head


def decide(cfg: ClusterConfig, raw: bytes) -> Verdict:
    engine = PolicyEngine.from_config(cfg)
    picked = EndpointPicker().pick(cfg, Authority(VIP, 80))
    assert not isinstance(picked, str), picked
    attrs = ConnectionAttributes(CLIENT, "127.0.110.1", picked.workload, picked.target.ip, picked.target.port)
    return RequestDecider(engine, KeyStore(lambda uri: None), clock=lambda: NOW).decide(head(raw), attrs)


def get(path: str, method: bytes = b"GET", extra: bytes = b"") -> bytes:
    return b"%s %s HTTP/1.1\r\nHost: greeter\r\n%s\r\n" % (method, path.encode(), extra)


# --- endpoints ---


def test_round_robin_over_ready_endpoints_with_named_target_port() -> None:
    cfg = config(BASE)
    picker = EndpointPicker()
    picks = [picker.pick(cfg, Authority(VIP, 80)) for _ in range(4)]
    targets = [p.target for p in picks if not isinstance(p, str)]
    assert targets == [Authority("127.0.165.1", 8080), Authority("127.0.165.2", 8080)] * 2  # greeter-c not ready
    first = picks[0]
    assert not isinstance(first, str)
    assert first.proxy_address == ("127.0.165.1", 15008)
    assert first.expected_identities == ("spiffe://cluster.local/ns/greet/sa/greeter-a",)


def test_the_current_endpoint_is_kept_while_it_is_ready() -> None:
    cfg = config(BASE)
    picker = EndpointPicker()
    first = picker.pick(cfg, Authority(VIP, 80))
    assert not isinstance(first, str)
    assert [picker.pick(cfg, Authority(VIP, 80), first) for _ in range(3)] == [first] * 3
    not_ready = 'podIP: "127.0.165.1", conditions: [{type: Ready, status: "False"}]'
    gone = config(BASE.replace('podIP: "127.0.165.1"', not_ready))
    other = picker.pick(gone, Authority(VIP, 80), first)
    assert not isinstance(other, str) and other.target == Authority("127.0.165.2", 8080)


def test_no_endpoint_says_why() -> None:
    cfg = config(BASE)
    picker = EndpointPicker()
    assert picker.pick(cfg, Authority("10.96.9.9", 80)) == "10.96.9.9 is not a Service address"
    assert picker.pick(cfg, Authority(VIP, 81)) == "service greet/greeter has no port 81"
    empty = config(BASE.replace("app: greeter-service}}\n", "app: other}}\n"))
    assert picker.pick(empty, Authority(VIP, 80)) == "service greet/greeter has no ready mesh endpoint for port 80"


def test_forwarded_source_trusted_only_for_the_callers_own_pod() -> None:
    cfg = config(BASE)
    a = "spiffe://cluster.local/ns/greet/sa/greeter-a"
    peer = ("127.0.0.9", 40000)
    assert source_ip(cfg, ("127.0.165.1", 5000), a, peer) == "127.0.165.1"
    assert source_ip(cfg, ("127.0.165.2", 5000), a, peer) == "127.0.0.9"  # greeter-b's address, not a's
    assert source_ip(cfg, ("192.0.2.1", 5000), a, peer) == "127.0.0.9"  # no pod
    assert source_ip(cfg, None, a, peer) == "127.0.0.9"


# --- decisions ---


def test_greeter_policy_per_request() -> None:
    cfg = config(BASE)
    ok = decide(cfg, get("/hello"))
    assert ok.allowed and ok.policy == "greet/greeter-service"
    for raw in (get("/version"), get("/hello", b"POST", b"Content-Length: 0\r\n")):
        v = decide(cfg, raw)
        assert (v.allowed, v.status, v.body) == (False, 403, b"RBAC: access denied"), v


def test_custom_policy_leaves_the_verdict_pending_on_its_provider() -> None:
    cfg = config(BASE + CUSTOM)
    v = decide(cfg, get("/ext/1"))
    assert (v.allowed, v.policy) == (False, "greet/ext")
    assert v.custom is not None and v.custom.custom_providers == ("authz",)
    assert decide(cfg, get("/hello")).custom is None  # outside the CUSTOM rules: the provider is never asked


def test_after_ext_authz_deny_is_the_providers_answer_allow_defers_to_allow_policies() -> None:
    cfg = config(BASE + CUSTOM.replace("paths: ['/ext*']", "paths: ['*']"))
    pending = decide(cfg, get("/hello"))
    denied = after_ext_authz(pending, AuthzVerdict(False, "no", 401, b"go away", ((b"x-why", b"policy"),)))
    assert (denied.allowed, denied.status, denied.body, denied.response_headers) == (
        False,
        401,
        b"go away",
        ((b"x-why", b"policy"),),
    )
    assert denied.denied_by == "ext_authz"  # an authorizer's 401 is not a JWT failure (was logged as jwt)
    allowed = after_ext_authz(pending, AuthzVerdict(True, "ok", headers=((b"x-user", b"alice"),)))
    assert allowed.allowed and allowed.add_headers == ((b"x-user", b"alice"),) and b"x-user" in allowed.remove_headers
    other = after_ext_authz(decide(cfg, get("/version")), AuthzVerdict(True, "ok"))  # the ALLOW policy still decides
    assert (other.allowed, other.status, other.body, other.denied_by) == (False, 403, b"RBAC: access denied", "rbac")


def test_jwt_bad_token_401_good_token_allowed_with_header_edits() -> None:
    cfg = config(BASE + JWT)
    bad = decide(cfg, get("/hello", extra=b"Authorization: Bearer not.a.jwt\r\n"))
    assert (bad.allowed, bad.status, bad.body, bad.denied_by) == (False, 401, b"Jwt verification fails", "jwt")
    token = RS.sign(claims(iss=ISS, sub="alice")).encode()
    good = decide(cfg, get("/hello", extra=b"Authorization: Bearer %s\r\nX-Jwt-Payload: forged\r\n" % token))
    assert good.allowed, good
    assert good.remove_headers == {b"authorization", b"x-jwt-payload"}
    assert good.add_headers == ((b"x-jwt-payload", token.split(b".")[1]),)
    none = decide(cfg, get("/hello"))  # no token: unauthenticated, and a client's own payload header still goes
    assert none.allowed and none.add_headers == () and none.remove_headers == {b"x-jwt-payload"}


# --- Http1Connection.allow(remove=...) ---


def test_allow_removes_named_headers_before_adding() -> None:
    conn = Http1Connection()
    conn.receive_data(get("/hello", extra=b"Authorization: Bearer t\r\nX-Sub: forged\r\nAccept: */*\r\n"))
    assert isinstance(conn.next_request_event(), RequestReceived)
    conn.allow(((b"x-sub", b"alice"),), remove=frozenset({b"authorization", b"x-sub"}))
    assert conn.data_to_upstream() == (
        b"GET /hello HTTP/1.1\r\nHost: greeter\r\nAccept: */*\r\nx-sub: alice\r\n\r\n"
    )
