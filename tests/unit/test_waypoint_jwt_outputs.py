"""RequestAuthentication's less common `jwtRules` fields, from YAML to the bytes the waypoint sends upstream:
`fromCookies`, `outputClaimToHeaders` (nested claims, Envoy's value forms), `outputPayloadToHeader`,
`forwardOriginalToken` and `timeout` (the JWKS fetch deadline), and the errors their validation gives."""

from __future__ import annotations

import asyncio
import base64
import json
from typing import Any

import pytest
from test_policy_support import engine_of, policy

from tests.support.clock import FakeClock
from tests.support.jwtkit import NOW, claims, jwks, key
from tests.support.waypoint_config import BASE, CLIENT, VIP, config
from ztunnel.config.loader import load_documents
from ztunnel.hbone.protocol import Authority
from ztunnel.policy.decision import ConnectionAttributes
from ztunnel.policy.engine import PolicyEngine
from ztunnel.policy.peerauth import parse_request_authentication
from ztunnel.waypoint.http1 import Http1Connection, RequestReceived
from ztunnel.waypoint.jwks import FETCH_TIMEOUT, JwksRefresher
from ztunnel.waypoint.jwt import JwtRule, KeyStore, claim_value, remote_timeouts
from ztunnel.waypoint.server import EndpointPicker, RequestDecider

ISS = "https://issuer.test"
ES = key("ES256")


def request_authentication(**rule: Any) -> str:
    body = {k: v for k, v in {"issuer": ISS, "jwks": jwks(ES), **rule}.items() if v is not None}
    return policy("jwt", {"jwtRules": [body]}, namespace="greet", kind="RequestAuthentication")


def forward(ra_yaml: str, raw: bytes) -> tuple[bool, bytes]:
    """One request through the decider and `Http1Connection.allow` as the server applies a verdict: (allowed,
    the request head the upstream gets)."""
    cfg = config(BASE + "---\n" + ra_yaml)
    conn = Http1Connection()
    conn.receive_data(raw)
    ev = conn.next_request_event()
    assert isinstance(ev, RequestReceived), ev
    picked = EndpointPicker().pick(cfg, Authority(VIP, 80))
    assert not isinstance(picked, str), picked
    attrs = ConnectionAttributes(CLIENT, "127.0.110.1", picked.workload, picked.target.ip, picked.target.port)
    engine = PolicyEngine.from_config(cfg)
    assert engine.errors == [], engine.errors
    verdict = RequestDecider(engine, KeyStore(lambda uri: None), clock=lambda: NOW).decide(ev.head, attrs)
    if not verdict.allowed:
        return False, b""
    conn.allow(verdict.add_headers, remove=verdict.remove_headers)
    return True, conn.data_to_upstream()


def get(*headers: bytes) -> bytes:
    return b"GET /hello HTTP/1.1\r\nHost: greeter\r\n" + b"".join(h + b"\r\n" for h in headers) + b"\r\n"


def upstream_headers(head: bytes) -> list[tuple[bytes, bytes]]:
    lines = head.split(b"\r\n\r\n", 1)[0].split(b"\r\n")[1:]
    return [(k.lower(), v.strip()) for k, _, v in (line.partition(b":") for line in lines)]


# ---- from YAML to the upstream request ------------------------------------------------------------------
def test_cookie_token_verified_and_claims_nested_and_payload_reach_the_upstream() -> None:
    ra = request_authentication(
        fromCookies=["session"],
        outputPayloadToHeader="x-jwt-payload",
        outputClaimToHeaders=[
            {"header": "x-jwt-sub", "claim": "sub"},
            {"header": "X-Jwt-Role", "claim": "realm.access.role"},
            {"header": "x-jwt-admin", "claim": "admin"},
        ],
    )
    c = claims(realm={"access": {"role": "ops"}}, admin=True)
    token = ES.sign(c).encode()
    allowed, head = forward(ra, get(b"Cookie: theme=dark; session=" + token, b"X-Jwt-Role: root", b"Accept: */*"))
    assert allowed
    got = upstream_headers(head)
    assert (b"x-jwt-sub", b"alice") in got and (b"x-jwt-admin", b"true") in got
    assert [v for k, v in got if k == b"x-jwt-role"] == [b"ops"]  # the client's own copy is replaced
    (payload,) = [v for k, v in got if k == b"x-jwt-payload"]
    assert json.loads(base64.urlsafe_b64decode(payload + b"=" * (-len(payload) % 4))) == c
    assert (b"cookie", b"theme=dark; session=" + token) in got  # Envoy leaves cookie tokens in place
    # A bad token in the cookie is a 401, not a pass: the cookie is read.
    assert forward(ra, get(b"Cookie: session=" + token[:-4] + b"AAAA")) == (False, b"")


def test_token_header_stripped_by_default_and_kept_with_forward_original_token() -> None:
    token = ES.sign(claims()).encode()
    request = get(b"Authorization: Bearer " + token, b"Accept: */*")
    allowed, head = forward(request_authentication(), request)
    assert allowed and b"authorization" not in head.lower() and b"Accept: */*" in head
    allowed, head = forward(request_authentication(forwardOriginalToken=True), request)
    assert allowed and b"Authorization: Bearer " + token in head


def test_a_claim_that_would_split_the_header_is_not_written() -> None:
    ra = request_authentication(outputClaimToHeaders=[{"header": "x-name", "claim": "name"}])
    token = ES.sign(claims(name="eve\r\nx-admin: true")).encode()
    allowed, head = forward(ra, get(b"Authorization: Bearer " + token))
    assert allowed and b"x-admin" not in head.lower() and b"x-name" not in head.lower()
    token = ES.sign(claims(name="Zoë")).encode()
    allowed, head = forward(ra, get(b"Authorization: Bearer " + token))
    assert allowed and b"\r\nx-name: Zo\xc3\xab\r\n" in head  # UTF-8 on the wire, as Envoy sends it


def test_claim_values_in_envoys_forms() -> None:
    c: dict[str, Any] = {
        "s": "x",
        "i": 1532389700,
        "f": 1.5,
        "whole": 3.0,
        "neg": -3,
        "t": False,
        "groups": ["admin", "dev"],
        "obj": {"b": 1, "a": "z"},
        "n": None,
        "nested": {"k": {"v": 7}},
    }
    assert [claim_value(c, p) for p in ("s", "i", "f", "whole", "neg", "t")] == [
        "x",
        "1532389700",
        "1.500000",
        "3",
        "-3.000000",
        "false",
    ]
    assert base64.b64decode(claim_value(c, "groups") or "") == b'["admin","dev"]'
    assert base64.b64decode(claim_value(c, "obj") or "") == b'{"a":"z","b":1}'
    assert claim_value(c, "nested.k.v") == "7" and claim_value(c, "nested.k.w") is None
    assert claim_value(c, "n") is None and claim_value(c, "s.x") is None


# ---- validation --------------------------------------------------------------------------------------------
def test_the_new_fields_reach_the_model() -> None:
    ra = parse_request_authentication(
        load_documents(
            request_authentication(
                jwks=None,
                jwksUri="https://issuer.test/jwks",
                fromCookies=["session", "token"],
                outputClaimToHeaders=[{"header": "x-sub", "claim": "sub"}, {"header": "x-r", "claim": "a.b"}],
                timeout="1.5s",
            ),
            "ra.yaml",
        )[0]
    )
    (rule,) = ra.jwt_rules
    assert rule.from_cookies == ("session", "token")
    assert rule.output_claim_to_headers == (("x-sub", "sub"), ("x-r", "a.b"))
    assert rule.timeout == 1.5
    waypoint_rule = JwtRule.from_policy(rule)
    assert [(c.header, c.claim) for c in waypoint_rule.output_claim_to_headers] == [("x-sub", "sub"), ("x-r", "a.b")]
    assert remote_timeouts([waypoint_rule]) == {"https://issuer.test/jwks": 1.5}


@pytest.mark.parametrize(
    ("rule", "field", "words"),
    [
        ({"fromCookies": [""]}, "fromCookies[0]", "is empty"),
        ({"fromCookies": "session"}, "fromCookies", "must be a list"),
        ({"fromParams": [""]}, "fromParams[0]", "is empty"),
        ({"outputClaimToHeaders": [{"header": "x-a"}]}, "outputClaimToHeaders[0].claim", "is required"),
        ({"outputClaimToHeaders": [{"claim": "sub"}]}, "outputClaimToHeaders[0].header", "is required"),
        ({"outputClaimToHeaders": [{"header": "x a", "claim": "s"}]}, "outputClaimToHeaders[0].header", "not a header"),
        (
            {"outputClaimToHeaders": [{"header": "x-a", "claim": "sub"}, {"header": "X-A", "claim": "iss"}]},
            "outputClaimToHeaders[1].header",
            "named twice",
        ),
        ({"outputClaimToHeaders": [{"header": "x-a", "claim": "s", "to": 1}]}, "outputClaimToHeaders[0].to", "unknown"),
        ({"outputPayloadToHeader": "x-p\r\nx-admin: 1"}, "outputPayloadToHeader", "not a header name"),
        ({"timeout": "0s"}, "timeout", "at least 1ms"),
        ({"timeout": "soon"}, "timeout", "not a duration"),
        ({"timeout": 5}, "timeout", "must be a duration"),
        ({"fromHeaders": [{"name": "x-t", "prefix": 3}]}, "fromHeaders[0].prefix", "must be a string"),
    ],
)
def test_bad_fields_are_rejected_naming_file_object_and_field(rule: dict[str, Any], field: str, words: str) -> None:
    engine, _ = engine_of(request_authentication(**rule))
    (error,) = engine.errors
    text = str(error)
    assert "RequestAuthentication greet/jwt" in text and f"spec.jwtRules[0].{field}" in text, text
    assert words in text, text


# ---- timeout: the JWKS fetch deadline -------------------------------------------------------------------
def test_remote_timeouts_default_and_longest_wins() -> None:
    rules = [
        JwtRule(ISS, jwks_uri="http://a/keys"),
        JwtRule("https://b", jwks_uri="http://b/keys", timeout=0.5),
        JwtRule("https://b2", jwks_uri="http://b/keys", timeout=2.0),
        JwtRule("https://c", jwks='{"keys": []}', jwks_uri="http://c/ignored", timeout=9.0),
    ]
    assert remote_timeouts(rules) == {"http://a/keys": FETCH_TIMEOUT, "http://b/keys": 2.0}


async def test_a_jwks_server_that_never_answers_fails_at_the_rules_timeout() -> None:
    """Before, the refresher waited as long as the fetcher's fixed 5 s, whatever the rule said."""
    clock = FakeClock()
    calls: list[str] = []

    async def hang(uri: str) -> bytes:
        calls.append(uri)
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    refresher = JwksRefresher({"http://a/keys": 0.05}, fetch=hang, clock=clock)
    loop = asyncio.get_running_loop()
    started = loop.time()
    async with asyncio.timeout(3):
        assert await refresher.refresh_due() == 1
    assert loop.time() - started < 1.0
    remote = refresher.remotes["http://a/keys"]
    assert remote.fetch_failed == 1 and "no answer within 0.05s" in remote.last_error
    # A config change gives the URI a new timeout and keeps it (and its schedule); a new URI is due at once.
    assert refresher.track({"http://a/keys": 2.0, "http://b/keys": 0.05}) == ["http://b/keys"]
    assert refresher.remotes["http://a/keys"].timeout == 2.0 and refresher.remotes["http://a/keys"].fetch_failed == 1
    async with asyncio.timeout(3):
        assert await refresher.refresh_due() == 1  # b only: a waits for its retry
    assert calls == ["http://a/keys", "http://b/keys"]
