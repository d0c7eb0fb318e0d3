"""The CA's TokenReview authentication against hostile callers (issue 14, review): forged claims, replaced pods,
an API that omits the audience, tokens replayed or minted for another audience, a flood of invalid tokens."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import tests.unit.test_identity_kube as base
from tests.support.kubeapi import FakeKubeApi, namespace, pod
from ztunnel.identity.authz import Refusal


@pytest.fixture
def api() -> Iterator[FakeKubeApi]:
    with FakeKubeApi() as fake:
        fake.put_all(
            [
                namespace("istio-system"),
                namespace("shop"),
                pod("ztunnel-a", "istio-system", node="node-a", ip="10.0.0.1", sa="ztunnel"),
                pod("web", "shop", node="node-a", ip="10.1.0.1", sa="web"),
            ]
        )
        yield fake


def _jwt(claims: dict[str, object]) -> str:
    def part(value: dict[str, object]) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()

    return f"{part({'alg': 'RS256', 'kid': 'k'})}.{part(claims)}.c2lnbmF0dXJl"


def _pod_uid(api: FakeKubeApi) -> Callable[[str, str], str | None]:
    """The CA's pod cache, as up to date as the API (the fake's store)."""

    def lookup(ns: str, name: str) -> str | None:
        obj = api.get("Pod", name, ns)
        return str(obj["metadata"]["uid"]) if obj else None

    return lookup


async def test_a_forged_node_claim_gets_nothing(api: FakeKubeApi, tmp_path: Path) -> None:
    """A pod's token that claims another node (the API would never bind it so; a forged review answer or a
    confused API) is refused: the node is the pod's spec.nodeName, read from the API."""
    api.add_token("forged-node", "shop", "web", pod_name="web", node="node-b")
    error = await base.refusal(base.authenticator(api, tmp_path), "forged-node")
    assert error.refusal is Refusal.PERMISSION_DENIED and "bound to node 'node-b'" in str(error)


async def test_a_cached_review_dies_with_its_pod(api: FakeKubeApi, tmp_path: Path) -> None:
    """Kubernetes stops accepting a bound token once its pod is deleted; the CA's 60 s review cache kept
    accepting it (a deleted-and-recreated pod of the same name got the old token's caller back)."""
    api.add_token("web-old", "shop", "web", pod_name="web", node="node-a")
    auth = base.authenticator(api, tmp_path, pod_uid=_pod_uid(api))
    assert (await auth.authenticate("Bearer web-old")).node == "node-a"
    assert (await auth.authenticate("Bearer web-old")).node == "node-a"
    assert (base.reviews(api), auth.stats.cache_hits) == (1, 1)
    api.delete("Pod", "web", "shop")
    recreated = pod("web", "shop", node="node-a", ip="10.1.0.9", sa="web")
    recreated["metadata"]["uid"] = "uid-of-the-new-web"
    api.put(recreated)
    error = await base.refusal(auth, "web-old")
    assert error.refusal is Refusal.UNAUTHENTICATED and "uid-of-the-new-web" in str(error)
    assert base.reviews(api) == 2 and auth.stats.stale == 1


async def test_an_answer_without_our_audience_is_refused(api: FakeKubeApi, tmp_path: Path) -> None:
    api.add_token("web", "shop", "web", pod_name="web")
    api.reviews_omit_audiences = True
    error = await base.refusal(base.authenticator(api, tmp_path), "web")
    assert error.refusal is Refusal.UNAUTHENTICATED and "not for audience 'istio-ca'" in str(error)


async def test_expired_and_wrong_audience_jwts_cost_no_review(api: FakeKubeApi, tmp_path: Path) -> None:
    now = time.time()
    expired = _jwt({"aud": ["istio-ca"], "exp": int(now - 3600), "sub": "system:serviceaccount:shop:web"})
    other = _jwt({"aud": ["https://kubernetes.default.svc"], "exp": int(now + 3600)})
    fresh = _jwt({"aud": ["istio-ca"], "exp": int(now + 3600)})
    auth = base.authenticator(api, tmp_path)
    for _ in range(50):  # replayed: each refused from its claims
        e1 = await base.refusal(auth, expired)
        e2 = await base.refusal(auth, other)
    assert e1.refusal is Refusal.UNAUTHENTICATED and "expired at" in str(e1)
    assert e2.refusal is Refusal.UNAUTHENTICATED and "'https://kubernetes.default.svc', not 'istio-ca'" in str(e2)
    assert base.reviews(api) == 0 and auth.stats.prechecked == 100
    # One that may be good is reviewed (and refused by the API: the fake does not know it).
    assert "does not accept the token" in str(await base.refusal(auth, fresh))
    assert base.reviews(api) == 1
    # Just expired, within the clock skew allowed: the API decides.
    await base.refusal(auth, _jwt({"aud": "istio-ca", "exp": int(now - 5)}))
    assert base.reviews(api) == 2
