"""JWT origin authentication at a lab waypoint (issue 12 acceptance; seeds 001 and 002), end to end with real curl.

The module's own lab: a Gateway `waypoint` (gatewayClassName istio-waypoint) that the lab deploys as a pod, the
namespace `demo` opted in with `istio.io/use-waypoint`, the greeter app behind it, a client pod, and a test issuer's
JWKS served over HTTP by a lab pod in the mesh (namespace `auth`). A RequestAuthentication names that issuer (RS256
and ES256 keys, by `jwksUri`) and a second one whose key is inline; an ALLOW policy wants a request principal for
/hello and the first issuer's `groups: admins` claim for /admin. Tokens are minted per test with the real clock
(tests/support/jwtkit.py keys).

The main `jwksUri` names the JWKS pod by its IP; a second rule names the JWKS Service by its name, which the
waypoint (its pod not enrolled, without the mesh's DNS) resolves through its config snapshot to a ready endpoint.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from tests.support import jwtkit
from tests.support.eventually import eventually
from tests.support.labapps import JWKS_SERVER, TESTAPP, pod, service, waypoint_gateway

from .conftest import HttpReply, LabHandle, running_lab

pytestmark = pytest.mark.netns  # root + network namespaces; conftest skips with the reason otherwise

ISSUER = "https://issuer.lab.test"  # keys fetched from the JWKS pod
INLINE_ISSUER = "https://inline.lab.test"  # key inline in the RequestAuthentication
AUDIENCE = "greeter.demo.svc.cluster.local"
URL = "http://greeter.demo.svc.cluster.local:8080"
JWKS_NAME_URI = "http://jwks.auth.svc.cluster.local:8000/jwks.json"
NAMED_ISSUER = "https://named.lab.test"  # its rule fetches the same key set by the Service name

RS256 = jwtkit.key("RS256", "lab-rs256")
ES256 = jwtkit.key("ES256", "lab-es256")
INLINE = jwtkit.key("ES256", "lab-inline", n=1)
FORGER = jwtkit.key("RS256", "lab-rs256", n=1)  # another RSA key under the issuer's kid: a bad signature


def token(key: jwtkit.TestKey, iss: str = ISSUER, aud: str = AUDIENCE, **claims: Any) -> str:
    """A token valid now (the waypoint checks `exp`/`nbf` against the real clock) unless CLAIMS say otherwise."""
    now = int(time.time())
    return key.sign(jwtkit.claims(iss=iss, aud=aud, **{"iat": now - 10, "exp": now + 600, **claims}))


def policies(jwks_uri: str) -> list[dict[str, Any]]:
    jwks_inline = jwtkit.jwks(INLINE)
    return [
        {
            "apiVersion": "security.istio.io/v1",
            "kind": "RequestAuthentication",
            "metadata": {"name": "greeter-jwt", "namespace": "demo"},
            "spec": {
                "selector": {"matchLabels": {"app": "greeter"}},
                "jwtRules": [
                    {"issuer": ISSUER, "jwksUri": jwks_uri, "audiences": [AUDIENCE]},
                    {"issuer": INLINE_ISSUER, "jwks": jwks_inline},
                ],
            },
        },
        {
            "apiVersion": "security.istio.io/v1",
            "kind": "AuthorizationPolicy",
            "metadata": {"name": "greeter-require-jwt", "namespace": "demo"},
            "spec": {
                "selector": {"matchLabels": {"app": "greeter"}},
                "action": "ALLOW",
                "rules": [
                    {"from": [{"source": {"requestPrincipals": ["*"]}}], "to": [{"operation": {"paths": ["/hello"]}}]},
                    {
                        "from": [{"source": {"requestPrincipals": [f"{ISSUER}/*"]}}],
                        "to": [{"operation": {"paths": ["/admin"]}}],
                        "when": [{"key": "request.auth.claims[groups]", "values": ["admins"]}],
                    },
                ],
            },
        },
    ]


def named_rule() -> dict[str, Any]:
    """A RequestAuthentication of its own for NAMED_ISSUER, its `jwksUri` the JWKS Service's name."""
    return {
        "apiVersion": "security.istio.io/v1",
        "kind": "RequestAuthentication",
        "metadata": {"name": "greeter-jwt-by-name", "namespace": "demo"},
        "spec": {
            "selector": {"matchLabels": {"app": "greeter"}},
            "jwtRules": [{"issuer": NAMED_ISSUER, "jwksUri": JWKS_NAME_URI}],
        },
    }


def cluster(jwks_file: str) -> list[dict[str, Any]]:
    ambient = {"istio.io/dataplane-mode": "ambient"}
    return [
        {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n1"}},
        {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n2"}},
        {
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {"name": "demo", "labels": {**ambient, "istio.io/use-waypoint": "waypoint"}},
        },
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "auth", "labels": ambient}},
        waypoint_gateway("waypoint", "demo"),
        pod("greeter", "demo", "n2", [TESTAPP, "--name", "greeter", "--port", "8080"], ports=[8080]),
        service("greeter", "demo", "10.96.10.10", {"http": 8080}),
        pod("client", "demo", "n1"),
        pod("jwks", "auth", "n1", [JWKS_SERVER, "--file", jwks_file, "--port", "8000"], ports=[8000]),
        service("jwks", "auth", "10.96.10.20", {"http": 8000}),
    ]


def get(lab: LabHandle, path: str, bearer: str | None = None) -> HttpReply:
    headers = [f"authorization: Bearer {bearer}"] if bearer is not None else []
    return lab.http("demo/client", URL + path, *headers)


def app_saw(reply: HttpReply) -> dict[str, Any]:
    """What the greeter app answered it got (it echoes method, path and headers as JSON)."""
    assert reply.status == 200, reply
    seen: dict[str, Any] = json.loads(reply.body)
    assert seen["app"] == "greeter"
    return seen


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabHandle]:
    work = tmp_path_factory.mktemp("jwtlab")
    jwks_file = work / "jwks.json"
    jwks_file.write_text(jwtkit.jwks(RS256, ES256))
    started = time.monotonic()
    with running_lab(f"jw{os.getpid()}", cluster(str(jwks_file)), work) as handle:
        handle.require("node-agent", "proxy")
        jwks_uri = f"http://{handle.pod_ip('auth/jwks')}:8000/jwks.json"
        handle.apply(yaml.safe_dump_all(policies(jwks_uri)))
        # the waypoint fetches the key set once its pod runs: a valid token passes once it has the keys
        eventually(
            lambda: get(handle, "/hello", token(RS256)).status == 200,
            60,
            0.5,
            what="a valid RS256 token to be accepted (the waypoint up and the JWKS fetched)",
        )
        print(f"jwt lab ready in {time.monotonic() - started:.1f}s")
        yield handle


def test_valid_rs256_and_es256_tokens_reach_the_app(lab: LabHandle) -> None:
    for key in (RS256, ES256):
        seen = app_saw(get(lab, "/hello", token(key)))
        assert seen["path"] == "/hello"
        assert "authorization" not in seen["headers"]  # forwardOriginalToken is false: the waypoint removes it


def test_a_groups_claim_condition_is_honoured(lab: LabHandle) -> None:
    for key in (RS256, ES256):
        assert app_saw(get(lab, "/admin", token(key, groups=["users", "admins"])))["path"] == "/admin"
        denied = get(lab, "/admin", token(key, groups=["users"]))
        assert (denied.status, denied.body) == (403, "RBAC: access denied")
        denied = get(lab, "/admin", token(key))  # no groups claim at all
        assert (denied.status, denied.body) == (403, "RBAC: access denied")


def test_invalid_tokens_get_401(lab: LabHandle) -> None:
    now = int(time.time())
    bad = {
        "expired": token(RS256, iat=now - 7200, exp=now - 3600),
        "wrong issuer": token(RS256, iss="https://elsewhere.test"),
        "wrong audience": token(ES256, aud="someone-else"),
        "bad signature": token(FORGER),
        "garbage": "not-a-jwt",
        "inline issuer, wrong key": token(ES256, iss=INLINE_ISSUER),
    }
    before = len(lab.pod_log("demo/greeter"))
    for what, jwt in bad.items():
        reply = get(lab, "/hello", jwt)
        assert reply.status == 401, (what, reply)
    assert len(lab.pod_log("demo/greeter")) == before  # none of them reached the app


def test_a_missing_token_is_403_under_a_request_principals_policy(lab: LabHandle) -> None:
    reply = get(lab, "/hello")
    assert (reply.status, reply.body) == (403, "RBAC: access denied")


def test_an_inline_jwks_verifies_its_issuers_tokens(lab: LabHandle) -> None:
    assert app_saw(get(lab, "/hello", token(INLINE, iss=INLINE_ISSUER, aud=None)))["path"] == "/hello"
    # authenticated, but /admin wants a principal of the other issuer
    reply = get(lab, "/admin", token(INLINE, iss=INLINE_ISSUER, aud=None, groups=["admins"]))
    assert (reply.status, reply.body) == (403, "RBAC: access denied")


def test_a_jwks_uri_by_service_name_is_fetched(lab: LabHandle) -> None:
    lab.apply(yaml.safe_dump(named_rule()))
    try:
        eventually(
            lambda: get(lab, "/hello", token(RS256, iss=NAMED_ISSUER, aud=None)).status == 200,
            5,  # `lab apply` returns once the waypoint has the rule; its new jwksUri is fetched at once
            0.5,
            what=f"a token of {NAMED_ISSUER} to verify with the keys from {JWKS_NAME_URI}",
        )
    finally:
        lab.delete(yaml.safe_dump(named_rule()))


def test_cached_keys_still_verify_once_the_jwks_server_is_gone(lab: LabHandle) -> None:
    """Last in the module: it deletes the JWKS pod."""
    fetches = [e for e in lab.pod_log("auth/jwks") if e.get("event") == "fetch"]
    assert fetches and fetches[0]["status"] == 200, fetches  # the waypoint fetched the key set from the pod
    waypoint_ip = lab.pod_ip("demo/waypoint-0")
    assert {f["peer"] for f in fetches} == {waypoint_ip}
    lab.delete(json.dumps(pod("jwks", "auth", "n1")))
    code, _ = lab.curl("demo/client", JWKS_NAME_URI, max_time=2)
    assert code != 0  # nothing serves the key set any more
    for key in (RS256, ES256):  # fresh tokens, verified with the keys the waypoint kept
        assert app_saw(get(lab, "/hello", token(key)))["path"] == "/hello"
