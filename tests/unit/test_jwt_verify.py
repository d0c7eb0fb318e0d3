"""Request authentication (waypoint/jwt.py): every accepted algorithm, each reason a present token is refused
(401), a missing token (unauthenticated), rule selection by issuer, token locations, and the upstream edits."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import jwt as pyjwt
import pytest
from test_policy_support import Conn, decide

from tests.support.jwtkit import ALL_ALGS, NOW, claims, hand_made, hmac_with_public_key, jwks, key
from ztunnel.config.loader import build_config, load_documents
from ztunnel.policy.engine import PolicyEngine
from ztunnel.waypoint.jwks import KeySet, parse_jwks
from ztunnel.waypoint.jwt import (
    Authenticated,
    ClaimToHeader,
    Failure,
    JwtRule,
    KeyStore,
    NoToken,
    Outcome,
    Rejected,
    RequestTokens,
    authenticate,
    claim_value,
    header_edits,
    payload_of,
)

ISS = "https://issuer.test"
FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "policy"


def inline(*keys: Any, **fields: Any) -> JwtRule:
    return JwtRule(issuer=fields.pop("issuer", ISS), jwks=jwks(*keys), **fields)


def run(rules: list[JwtRule], headers: list[tuple[str, str]] | None = None, query: str = "", **kw: Any) -> Outcome:
    store = KeyStore(lambda uri: None)
    return authenticate(RequestTokens(headers or [], query), rules, store, kw.pop("now", NOW), **kw)


def bearer(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


def rejected(outcome: Outcome, reason: Failure) -> Rejected:
    assert isinstance(outcome, Rejected), outcome
    assert outcome.reason is reason, outcome.message()
    assert outcome.status == 401
    return outcome


@pytest.mark.parametrize("alg", ALL_ALGS)
def test_every_accepted_algorithm_verifies(alg: str) -> None:
    k = key(alg)
    out = run([inline(k)], bearer(k.sign(claims(groups=["admin", "dev"]))))
    assert isinstance(out, Authenticated), out
    assert out.principal == f"{ISS}/alice"
    assert out.claims["groups"] == ["admin", "dev"]
    assert out.found.location.name == "authorization"


def test_missing_token_is_unauthenticated_not_rejected() -> None:
    rule = inline(key("RS256"))
    assert run([rule]) == NoToken()
    assert run([rule], [("authorization", "Basic dXNlcjpwdw==")]) == NoToken()  # not a bearer token
    assert run([rule], [("authorization", "Bearer ")]) == NoToken()
    assert run([], bearer(key("RS256").sign(claims()))) == NoToken()  # no rules: nothing reads tokens


@pytest.mark.parametrize(
    ("token_claims", "reason"),
    [
        (claims(exp=int(NOW) - 61), Failure.EXPIRED),
        (claims(nbf=int(NOW) + 61), Failure.NOT_YET_VALID),
        (claims(iss="https://other.test"), Failure.UNKNOWN_ISSUER),
        (claims(iss=None), Failure.UNKNOWN_ISSUER),
        (claims(aud="someone-else"), Failure.WRONG_AUDIENCE),
        (claims(aud=None), Failure.WRONG_AUDIENCE),
        (claims(exp="tomorrow"), Failure.MALFORMED),
    ],
)
def test_each_claim_failure_is_401_with_its_reason(token_claims: dict[str, Any], reason: Failure) -> None:
    k = key("RS256")
    rule = inline(k, audiences=("bookstore",))
    out = rejected(run([rule], bearer(k.sign(token_claims))), reason)
    assert reason.value in out.message()


def test_clock_skew_is_60s_either_way() -> None:
    k = key("ES256")
    rule = inline(k)
    assert isinstance(run([rule], bearer(k.sign(claims(exp=int(NOW) - 59)))), Authenticated)
    assert isinstance(run([rule], bearer(k.sign(claims(nbf=int(NOW) + 59)))), Authenticated)
    assert isinstance(run([rule], bearer(k.sign(claims(iat=int(NOW) + 3000)))), Authenticated)  # iat: type only
    rejected(run([rule], bearer(k.sign(claims(exp=int(NOW) - 5))), clock_skew=0), Failure.EXPIRED)


def test_audiences_any_match_and_envoy_normalisation() -> None:
    k = key("RS256")
    rule = inline(k, audiences=("bookstore_web", "https://api.example.com/"))
    for aud in ("bookstore_web", ["x", "bookstore_web"], "api.example.com", "http://api.example.com"):
        assert isinstance(run([rule], bearer(k.sign(claims(aud=aud)))), Authenticated), aud
    no_aud_rule = inline(k)  # none configured: any audience, or none
    assert isinstance(run([no_aud_rule], bearer(k.sign(claims(aud="whatever")))), Authenticated)
    rejected(run([rule], bearer(k.sign(claims(aud="bookstore")))), Failure.WRONG_AUDIENCE)


def test_bad_signature() -> None:
    good, impostor = key("RS256"), key("RS256", n=1)
    forged = impostor.sign(claims(), kid=good.kid)  # same kid, another key
    rejected(run([inline(good)], bearer(forged)), Failure.BAD_SIGNATURE)
    token = good.sign(claims())
    head, _, sig = token.split(".")
    tampered = f"{head}.{hand_made({}, claims(sub='mallory')).split('.')[1]}.{sig}"
    rejected(run([inline(good)], bearer(tampered)), Failure.BAD_SIGNATURE)


@pytest.mark.parametrize(
    "garbage",
    ["garbage", "a.b.c", "a.b", "....", hand_made({"alg": "RS256"}, {}).replace(".", ".!!", 1), "e30.bm90IGpzb24.c2ln"],
)
def test_garbage_is_malformed(garbage: str) -> None:
    rejected(run([inline(key("RS256"))], bearer(garbage)), Failure.MALFORMED)


def test_payload_that_is_not_an_object_is_malformed() -> None:
    k = key("RS256")
    token = pyjwt.api_jws.encode(b"[1, 2]", k.private, algorithm="RS256", headers={"kid": k.kid})
    rejected(run([inline(k)], bearer(token)), Failure.MALFORMED)


def test_none_and_hmac_are_refused_even_with_the_public_key() -> None:
    k = key("RS256")
    rule = inline(k)
    rejected(run([rule], bearer(hand_made({"alg": "none"}, claims()))), Failure.UNSUPPORTED_ALGORITHM)
    out = rejected(run([rule], bearer(hmac_with_public_key(k, claims()))), Failure.UNSUPPORTED_ALGORITHM)
    assert "HS256" in out.detail


def test_alg_must_fit_the_key_type_and_the_key_alg() -> None:
    rsa, ec = key("RS256"), key("ES256")
    # An ES256 token whose kid names the RSA key: no key of the right type.
    rejected(run([inline(rsa)], bearer(ec.sign(claims(), kid=rsa.kid))), Failure.NO_MATCHING_KEY)
    # A key pinned to RS256 is not used for a PS256 token, even though both are RSA.
    pinned = JwtRule(issuer=ISS, jwks=f'{{"keys": [{json.dumps(rsa.jwk(alg="RS256"))}]}}')
    ps_token = key("PS256").sign(claims(), kid=rsa.kid)
    rejected(run([pinned], bearer(ps_token)), Failure.NO_MATCHING_KEY)
    # ES384 token vs a P-256 key with the same kid.
    rejected(run([inline(ec)], bearer(key("ES384").sign(claims(), kid=ec.kid))), Failure.NO_MATCHING_KEY)


def test_kid_selects_the_key_and_a_key_without_kid_fits_any() -> None:
    a, b = key("RS256", n=0), key("RS256", kid="other", n=1)
    rule = inline(a, b)
    assert isinstance(run([rule], bearer(b.sign(claims()))), Authenticated)
    rejected(run([rule], bearer(b.sign(claims(), kid="unknown"))), Failure.NO_MATCHING_KEY)
    jwk = b.jwk()
    del jwk["kid"]
    anonymous = JwtRule(issuer=ISS, jwks=json.dumps({"keys": [jwk]}))
    assert isinstance(run([anonymous], bearer(b.sign(claims(), kid="whatever"))), Authenticated)


def test_rule_is_chosen_by_issuer() -> None:
    ka, kb = key("RS256", n=0), key("ES256")
    rules = [inline(ka, issuer="https://a.test"), inline(kb, issuer="https://b.test")]
    out = run(rules, bearer(kb.sign(claims(iss="https://b.test", sub="bob"))))
    assert isinstance(out, Authenticated) and out.principal == "https://b.test/bob" and out.rule is rules[1]
    # Issuer a's name on a token signed with b's key: checked against a's keys only.
    rejected(run(rules, bearer(kb.sign(claims(iss="https://a.test"), kid=ka.kid))), Failure.NO_MATCHING_KEY)


def test_same_issuer_in_two_policies_either_may_accept() -> None:
    old, new = key("RS256", n=0), key("RS256", kid="new", n=1)
    rules = [inline(old), inline(new)]
    assert isinstance(run(rules, bearer(new.sign(claims()))), Authenticated)


def test_no_keys_yet_is_401() -> None:
    k = key("RS256")
    remote = JwtRule(issuer=ISS, jwks_uri="http://127.0.0.1:9/jwks")
    rejected(run([remote], bearer(k.sign(claims()))), Failure.NO_KEYS)
    broken = JwtRule(issuer=ISS, jwks='{"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}')
    store = KeyStore(lambda uri: None)
    out = authenticate(RequestTokens(bearer(k.sign(claims()))), [broken], store, NOW)
    rejected(out, Failure.NO_KEYS)
    assert "oct" in store.errors[ISS]


def test_inline_jwks_wins_over_jwks_uri() -> None:
    k = key("RS256")
    rule = JwtRule(issuer=ISS, jwks=jwks(k), jwks_uri="http://127.0.0.1:9/jwks")
    store = KeyStore(lambda uri: pytest.fail("jwksUri must not be used when jwks is set"))
    assert isinstance(authenticate(RequestTokens(bearer(k.sign(claims()))), [rule], store, NOW), Authenticated)


# ---- locations ----------------------------------------------------------------------------------------
def test_default_locations_header_and_access_token_param() -> None:
    k = key("RS256")
    token = k.sign(claims())
    assert isinstance(run([inline(k)], [("authorization", f"bearer {token}")]), Authenticated)  # scheme case
    out = run([inline(k)], query=f"a=1&access_token={token}")
    assert isinstance(out, Authenticated) and out.found.location.kind == "param"


def test_from_headers_prefix_params_cookies() -> None:
    k = key("ES256")
    token = k.sign(claims())
    rule = inline(k, from_headers=(("X-Jwt", "Token "), ("x-raw", "")), from_params=("jwt",), from_cookies=("session",))
    for headers, query in [
        ([("x-jwt", f"Token {token}")], ""),
        ([("x-raw", token)], ""),
        ([], f"jwt={token}"),
        ([("cookie", f"theme=dark; session={token}; x=1")], ""),
        ([("cookie", f'session="{token}"')], ""),
    ]:
        assert isinstance(run([rule], headers, query), Authenticated), (headers, query)
    assert run([rule], [("x-jwt", f"token {token}")]) == NoToken()  # a configured prefix is exact
    # A rule with its own locations does not read the default ones.
    assert run([rule], bearer(token)) == NoToken()
    assert run([rule], query=f"access_token={token}") == NoToken()


def test_issuer_known_but_not_at_that_location_is_401() -> None:
    ka, kb = key("RS256"), key("ES256")
    rules = [inline(ka, issuer="https://a.test", from_headers=(("x-a", ""),)), inline(kb, issuer="https://b.test")]
    out = rejected(run(rules, bearer(ka.sign(claims(iss="https://a.test")))), Failure.UNKNOWN_ISSUER)
    assert "not read from" in out.detail


def test_several_tokens_all_must_verify_and_the_first_is_the_principal() -> None:
    ka, kb = key("RS256"), key("ES256")
    rules = [inline(ka, issuer="https://a.test"), inline(kb, issuer="https://b.test", from_headers=(("x-b", ""),))]
    a_tok = ka.sign(claims(iss="https://a.test", sub="alice"))
    b_tok = kb.sign(claims(iss="https://b.test", sub="bob"))
    out = run(rules, [*bearer(a_tok), ("x-b", b_tok)])
    assert isinstance(out, Authenticated) and out.principal == "https://a.test/alice" and len(out.tokens) == 2
    expired_b = kb.sign(claims(iss="https://b.test", exp=int(NOW) - 3600))
    rejected(run(rules, [*bearer(a_tok), ("x-b", expired_b)]), Failure.EXPIRED)


# ---- upstream edits ---------------------------------------------------------------------------------
def test_token_header_removed_unless_forwarded() -> None:
    k = key("RS256")
    token = k.sign(claims())
    request = [("host", "svc"), *bearer(token), ("accept", "*/*")]
    for forward, kept in ((False, False), (True, True)):
        rule = inline(k, forward_original_token=forward)
        out = run([rule], request)
        upstream = header_edits([rule], out).apply(request)
        assert (("authorization", f"Bearer {token}") in upstream) is kept
        assert ("host", "svc") in upstream and ("accept", "*/*") in upstream
    # a token from a query parameter leaves the request target alone
    rule = inline(k)
    out = run([rule], query=f"access_token={token}")
    assert header_edits([rule], out).remove == ()


def test_output_payload_and_claims_to_headers() -> None:
    k = key("ES256")
    c = claims(groups=["admin", "dev"], realm={"role": "ops", "level": 3}, admin=True, aud="bookstore")
    rule = inline(
        k,
        forward_original_token=True,
        output_payload_to_header="X-Jwt-Payload",
        output_claim_to_headers=(
            ClaimToHeader("x-sub", "sub"),
            ClaimToHeader("x-groups", "groups"),
            ClaimToHeader("x-role", "realm.role"),
            ClaimToHeader("x-level", "realm.level"),
            ClaimToHeader("x-admin", "admin"),
            ClaimToHeader("x-realm", "realm"),  # an object: base64 of its JSON, as Envoy writes it
            ClaimToHeader("x-missing", "nope"),
        ),
    )
    request = [*bearer(k.sign(c)), ("x-jwt-payload", "spoofed"), ("x-role", "root")]
    out = run([rule], request)
    upstream = dict(header_edits([rule], out).apply(request))
    assert payload_of(upstream["x-jwt-payload"]) == c
    assert upstream["x-sub"] == "alice" and json.loads(base64.b64decode(upstream["x-groups"])) == ["admin", "dev"]
    assert upstream["x-role"] == "ops" and upstream["x-level"] == "3" and upstream["x-admin"] == "true"
    assert json.loads(base64.b64decode(upstream["x-realm"])) == c["realm"] and "x-missing" not in upstream
    # Without a token the client's own copies of the output headers do not reach the application.
    plain = [("x-jwt-payload", "spoofed"), ("x-role", "root"), ("accept", "*/*")]
    assert header_edits([rule], run([rule], plain)).apply(plain) == [("accept", "*/*")]
    assert base64.b64decode(claim_value({"n": [1, "a", False]}, "n") or "") == b'[1,"a",false]'


# ---- the seeds' legacy origins ------------------------------------------------------------------------
def rules_for(policy_yaml: str, file: str, ns: str, pod: str) -> tuple[list[JwtRule], PolicyEngine, Any]:
    config = build_config(load_documents(policy_yaml, file))
    engine = PolicyEngine.from_config(config)
    w = config.workload(ns, pod)
    assert w is not None
    rules = [JwtRule.from_policy(r) for ra in engine.request_authentications_for(w) for r in ra.jwt_rules]
    return rules, engine, config


def test_seed001_keycloak_origin_verifies_with_its_jwks_uri_keys() -> None:
    """Seed 001: `origins: - jwt: {issuer: keycloak, jwksUri}` on the customer service."""
    rules, _, _ = rules_for((FIXTURES / "seed001_customer.yaml").read_text(), "seed001.yaml", "customer", "customer-1")
    (rule,) = rules
    assert rule.issuer == "http://keycloak:8080/auth/realms/istio"
    assert rule.jwks_uri == "http://keycloak:8080/auth/realms/istio/protocol/openid-connect/certs"
    k = key("RS256")
    fetched: dict[str, KeySet] = {rule.jwks_uri: parse_jwks(jwks(k))}
    store = KeyStore(fetched.get)
    token = k.sign(claims(iss=rule.issuer, sub="customer-user"))
    out = authenticate(RequestTokens(bearer(token)), rules, store, NOW)
    assert isinstance(out, Authenticated) and out.principal == f"{rule.issuer}/customer-user"
    other = key("ES256").sign(claims(iss="https://accounts.google.com"))
    rejected(authenticate(RequestTokens(bearer(other)), rules, store, NOW), Failure.UNKNOWN_ISSUER)


SEED002_ORIGIN = """
apiVersion: v1
kind: Namespace
metadata: {name: foo, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Pod
metadata: {name: server, namespace: foo, labels: {app: server}}
spec: {serviceAccountName: server, nodeName: node-1}
status: {podIP: 10.244.1.70}
---
apiVersion: authentication.istio.io/v1alpha1
kind: Policy
metadata: {name: default, namespace: foo}
spec:
  origins:
  - jwt:
      issuer: https://accounts.google.com
      jwksUri: https://www.googleapis.com/oauth2/v3/certs
      trigger_rules:
      - excluded_paths:
        - exact: /health
"""


def test_seed002_google_origin_with_trigger_rules() -> None:
    """Seed 002's origin snippet: Google tokens verify; no token is 403 except on the excluded /health."""
    rules, engine, config = rules_for(SEED002_ORIGIN, "seed002.yaml", "foo", "server")
    (rule,) = rules
    k = key("RS256")
    store = KeyStore({"https://www.googleapis.com/oauth2/v3/certs": parse_jwks(jwks(k))}.get)
    out = authenticate(RequestTokens(bearer(k.sign(claims(iss=rule.issuer, sub="1234")))), rules, store, NOW)
    assert isinstance(out, Authenticated) and out.principal == "https://accounts.google.com/1234"
    l7 = {"source": None, "dest": "foo/server", "layer": "l7"}
    with_token = Conn(**l7, path="/api", request_principal=out.principal, claims=dict(out.claims))
    assert decide(engine, config, with_token).allowed
    assert not decide(engine, config, Conn(**l7, path="/api")).allowed
    assert decide(engine, config, Conn(**l7, path="/health")).allowed
