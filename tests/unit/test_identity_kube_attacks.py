"""The CA's TokenReview authentication against hostile callers (issue 14, review): forged claims, replaced pods,
an API that omits the audience, tokens replayed or minted for another audience, a flood of invalid tokens."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.identity import spiffe
from tests.support.kubeapi import FakeKubeApi, ca_server, kube_authenticator, namespace, pod, refused, review_count
from ztunnel.identity.authz import CALLER_PEER, Refusal
from ztunnel.identity.ca import CertificateAuthority, init_ca_dir
from ztunnel.identity.certs import generate_key, make_csr
from ztunnel.identity.kube import RefusalBudget, peer_address
from ztunnel.identity.spiffe import SpiffeId


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


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> CertificateAuthority:
    return CertificateAuthority.load(init_ca_dir(tmp_path_factory.mktemp("ca") / "ca"))


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
    error = await refused(kube_authenticator(api, tmp_path), "forged-node")
    assert error.refusal is Refusal.PERMISSION_DENIED and "bound to node 'node-b'" in str(error)


async def test_a_cached_review_dies_with_its_pod(api: FakeKubeApi, tmp_path: Path) -> None:
    """Kubernetes stops accepting a bound token once its pod is deleted; the CA's 60 s review cache kept
    accepting it (a deleted-and-recreated pod of the same name got the old token's caller back)."""
    api.add_token("web-old", "shop", "web", pod_name="web", node="node-a")
    auth = kube_authenticator(api, tmp_path, pod_uid=_pod_uid(api))
    assert (await auth.authenticate("Bearer web-old")).node == "node-a"
    assert (await auth.authenticate("Bearer web-old")).node == "node-a"
    assert (review_count(api), auth.stats.cache_hits) == (1, 1)
    api.delete("Pod", "web", "shop")
    recreated = pod("web", "shop", node="node-a", ip="10.1.0.9", sa="web")
    recreated["metadata"]["uid"] = "uid-of-the-new-web"
    api.put(recreated)
    error = await refused(auth, "web-old")
    assert error.refusal is Refusal.UNAUTHENTICATED and "uid-of-the-new-web" in str(error)
    assert review_count(api) == 2 and auth.stats.stale == 1


async def test_an_answer_without_our_audience_is_refused(api: FakeKubeApi, tmp_path: Path) -> None:
    api.add_token("web", "shop", "web", pod_name="web")
    api.reviews_omit_audiences = True
    error = await refused(kube_authenticator(api, tmp_path), "web")
    assert error.refusal is Refusal.UNAUTHENTICATED and "not for audience 'istio-ca'" in str(error)


async def test_expired_and_wrong_audience_jwts_cost_no_review(api: FakeKubeApi, tmp_path: Path) -> None:
    now = time.time()
    expired = _jwt({"aud": ["istio-ca"], "exp": int(now - 3600), "sub": "system:serviceaccount:shop:web"})
    other = _jwt({"aud": ["https://kubernetes.default.svc"], "exp": int(now + 3600)})
    fresh = _jwt({"aud": ["istio-ca"], "exp": int(now + 3600)})
    auth = kube_authenticator(api, tmp_path)
    for _ in range(50):  # replayed: each refused from its claims
        e1 = await refused(auth, expired)
        e2 = await refused(auth, other)
    assert e1.refusal is Refusal.UNAUTHENTICATED and "expired at" in str(e1)
    assert e2.refusal is Refusal.UNAUTHENTICATED and "'https://kubernetes.default.svc', not 'istio-ca'" in str(e2)
    assert review_count(api) == 0 and auth.stats.prechecked == 100
    # One that may be good is reviewed (and refused by the API: the fake does not know it).
    assert "does not accept the token" in str(await refused(auth, fresh))
    assert review_count(api) == 1
    # Just expired, within the clock skew allowed: the API decides.
    await refused(auth, _jwt({"aud": "istio-ca", "exp": int(now - 5)}))
    assert review_count(api) == 2


async def test_a_caller_flooding_fresh_invalid_tokens_costs_a_bounded_number_of_reviews(
    api: FakeKubeApi, tmp_path: Path, ca: CertificateAuthority
) -> None:
    """Each fresh forged token (well formed, our audience, not expired) is worth a review; per caller (gRPC peer
    address) a burst of refused reviews is allowed, then one per 2 s: 60 tokens in a row cost 20 reviews, not 60.
    Another caller is not affected, nor a good token already reviewed (cached)."""
    from ztunnel.identity.h2client import CAClient, CAClientError, GrpcStatus

    api.add_token("web", "shop", "web", pod_name="web", node="node-a")
    auth = kube_authenticator(api, tmp_path)
    server = ca_server(auth, ca)
    port = await server.start()
    web = SpiffeId.parse(spiffe("shop", "web"))
    token_file = tmp_path / "token"
    try:
        token_file.write_text("web")
        client = CAClient(f"127.0.0.1:{port}", ca.roots_pem, token_file)
        assert await client.create_certificate(make_csr(generate_key(), web), 3600)  # reviewed once, cached
        exp = int(time.time() + 3600)
        codes = []
        started = time.monotonic()
        for i in range(60):
            token_file.write_text(_jwt({"aud": ["istio-ca"], "exp": exp, "jti": str(i)}))
            with pytest.raises(CAClientError) as info:
                await client.create_certificate(make_csr(generate_key(), web), 3600)
            codes.append(info.value.code)
        assert set(codes) == {GrpcStatus.UNAUTHENTICATED}
        refilled = int((time.monotonic() - started) * 0.5)  # a slow run earns a review back every 2 s
        forged_reviews = review_count(api) - 1
        assert 20 <= forged_reviews <= 20 + refilled and auth.stats.throttled == 60 - forged_reviews
        assert "too many refused tokens from 127.0.0.1" in str(info.value)
        token_file.write_text("web")  # the good token: from the cache, no review, still served
        assert await client.create_certificate(make_csr(generate_key(), web), 3600)
        assert review_count(api) == 1 + forged_reviews
    finally:
        await server.stop()
    # Another caller has its own budget (the peer is what the CA server saw).
    CALLER_PEER.set("ipv6:[fd00::7]:40000")
    assert "does not accept the token" in str(await refused(auth, _jwt({"aud": "istio-ca", "exp": exp})))
    assert review_count(api) == 2 + forged_reviews


def test_the_budget_refills_with_time() -> None:
    now = [0.0]
    budget = RefusalBudget(burst=2, rate=0.5, max_peers=2, clock=lambda: now[0])
    budget.charge("a")
    budget.charge("a")
    assert budget.exhausted("a") and not budget.exhausted("b")
    now[0] = 2.0
    assert not budget.exhausted("a")
    budget.charge("a")
    assert budget.exhausted("a")
    budget.charge("b")
    budget.charge("c")  # past max_peers: the least recently charged ("a") is forgotten, with its debt
    assert not budget.exhausted("a")
    assert [peer_address(p) for p in ("ipv4:10.0.0.1:4000", "ipv6:[fd00::1]:4000", "unix:/x")] == [
        "10.0.0.1",
        "fd00::1",
        "unix:/x",
    ]
