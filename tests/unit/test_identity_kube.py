"""The CA's Kubernetes side against the fake API server over TLS on loopback: TokenReview and the caller's pod,
the node rule applied to the pod's node, the review cache, the CA kept in a Secret, the trust bundle ConfigMaps."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import json
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from tests.support.eventually import eventually_async
from tests.support.identity import spiffe, two_node_config_yaml
from tests.support.kubeapi import (
    FakeKubeApi,
    ca_server,
    kube_authenticator,
    kube_client,
    namespace,
    pod,
    refused,
    review_count,
)
from ztunnel.config.kube.client import KubeClient, from_kubeconfig
from ztunnel.config.loader import build_config, load_documents
from ztunnel.identity.authz import Caller, NodeAuthError, Refusal
from ztunnel.identity.ca import CA_KEY, ROOT_KEY, CAError, CertificateAuthority, init_ca_dir
from ztunnel.identity.certs import generate_key, make_csr, uri_sans
from ztunnel.identity.kube import (
    ConfigMapPublisher,
    KubeAuthenticator,
    TrustBundlePublisher,
    ensure_ca_secret,
    load_kube_ca,
    revocation_content,
    sync_mounted_revocations,
    token_expiry,
)
from ztunnel.identity.proto import ca_pb2
from ztunnel.identity.server import CAServer
from ztunnel.identity.spiffe import SpiffeId

PROXY_A, PROXY_B, WEB_TOKEN = "proxy-a-token", "proxy-b-token", "web-token"


@pytest.fixture
def api() -> Iterator[FakeKubeApi]:
    with FakeKubeApi() as fake:
        fake.put_all(
            [
                namespace("istio-system"),
                namespace("shop"),
                pod("ztunnel-a", "istio-system", node="node-a", ip="10.0.0.1", sa="ztunnel"),
                pod("ztunnel-b", "istio-system", node="node-b", ip="10.0.0.2", sa="ztunnel"),
                pod("web", "shop", node="node-a", ip="10.1.0.1", sa="web"),
            ]
        )
        fake.add_token(PROXY_A, "istio-system", "ztunnel", pod_name="ztunnel-a", node="node-a")
        fake.add_token(PROXY_B, "istio-system", "ztunnel", pod_name="ztunnel-b")  # no node claim (before 1.30)
        fake.add_token(WEB_TOKEN, "shop", "web", pod_name="web", node="node-a")
        yield fake


async def test_a_review_gives_the_callers_pod_node_and_identity(api: FakeKubeApi, tmp_path: Path) -> None:
    auth = kube_authenticator(api, tmp_path)
    caller = await auth.authenticate(f"Bearer {PROXY_A}")
    assert caller == Caller(
        "node-a", SpiffeId.parse(spiffe("istio-system", "ztunnel")), True, "pod istio-system/ztunnel-a on node-a"
    )
    assert (await auth.authenticate(f"Bearer {PROXY_B}")).node == "node-b"  # from spec.nodeName alone
    web = await auth.authenticate(f"Bearer {WEB_TOKEN}")
    assert (web.node, web.node_proxy, str(web.identity)) == ("node-a", False, spiffe("shop", "web"))
    assert api.count("GET", "/namespaces/istio-system/pods/ztunnel-a") == 1  # the pod read back from the API


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> CertificateAuthority:
    return CertificateAuthority.load(init_ca_dir(tmp_path_factory.mktemp("ca") / "ca"))


async def sign(server: CAServer, token: str, identity: str) -> list[str]:
    caller = await server.authenticate(f"Bearer {token}")
    request = ca_pb2.IstioCertificateRequest(csr=make_csr(generate_key(), SpiffeId.parse(identity)).decode())
    return server.sign(request, f"Bearer {token}", caller=caller)


async def test_a_node_proxy_gets_the_identities_of_its_nodes_pods_only(
    api: FakeKubeApi, tmp_path: Path, ca: CertificateAuthority
) -> None:
    server = ca_server(kube_authenticator(api, tmp_path), ca)
    chain = await sign(server, PROXY_A, spiffe("shop", "web"))
    assert uri_sans(x509.load_pem_x509_certificate(chain[0].encode())) == [spiffe("shop", "web")]
    with pytest.raises(NodeAuthError) as other:
        await sign(server, PROXY_A, spiffe("shop", "db"))  # db runs on node-b
    assert other.value.refusal is Refusal.PERMISSION_DENIED
    assert "node 'node-a' may not have a certificate for spiffe://cluster.local/ns/shop/sa/db" in str(other.value)
    assert "node-b" in str(other.value)
    await sign(server, PROXY_B, spiffe("shop", "db"))  # node-b's proxy may
    with pytest.raises(NodeAuthError) as web:
        await sign(server, PROXY_B, spiffe("shop", "web"))
    assert web.value.refusal is Refusal.PERMISSION_DENIED
    assert (server.issued, server.refused) == (2, 2)


async def test_a_pod_that_is_not_a_node_proxy_gets_its_own_identity_only(
    api: FakeKubeApi, tmp_path: Path, ca: CertificateAuthority
) -> None:
    server = ca_server(kube_authenticator(api, tmp_path), ca)
    assert await sign(server, WEB_TOKEN, spiffe("shop", "web"))
    with pytest.raises(NodeAuthError) as info:
        await sign(server, WEB_TOKEN, spiffe("shop", "shared"))  # shared-a runs on node-a too
    assert info.value.refusal is Refusal.PERMISSION_DENIED
    assert "may have only its own identity" in str(info.value) and "--node-proxy-account" in str(info.value)


async def test_tokens_the_api_does_not_accept_are_refused(api: FakeKubeApi, tmp_path: Path) -> None:
    api.add_token("other-audience", "istio-system", "ztunnel", pod_name="ztunnel-a", audiences=("kubernetes",))
    api.add_token("legacy", "istio-system", "ztunnel")
    auth = kube_authenticator(api, tmp_path)
    unknown = await refused(auth, "forged")
    assert unknown.refusal is Refusal.UNAUTHENTICATED
    assert "does not accept the token: invalid bearer token" in str(unknown)
    audience = await refused(auth, "other-audience")
    assert audience.refusal is Refusal.UNAUTHENTICATED and "token audiences is invalid" in str(audience)
    legacy = await refused(auth, "legacy")
    assert legacy.refusal is Refusal.UNAUTHENTICATED and "not bound to a pod" in str(legacy)
    assert review_count(api) == 3  # each was reviewed (and nothing refused was cached: asked again, reviewed again)
    await refused(auth, "forged")
    assert review_count(api) == 4


async def test_an_api_that_is_not_audience_aware_is_not_trusted(api: FakeKubeApi, tmp_path: Path) -> None:
    api.reviews_omit_audiences = True
    error = await refused(kube_authenticator(api, tmp_path), PROXY_A)
    assert error.refusal is Refusal.UNAUTHENTICATED
    assert "not for audience 'istio-ca'" in str(error) and "audience: istio-ca" in str(error)


async def test_the_audience_is_configurable(api: FakeKubeApi, tmp_path: Path) -> None:
    api.add_token("custom", "istio-system", "ztunnel", pod_name="ztunnel-a", audiences=("mesh-ca",))
    assert (await kube_authenticator(api, tmp_path, audience="mesh-ca").authenticate("Bearer custom")).node == "node-a"
    assert (await refused(kube_authenticator(api, tmp_path), "custom")).refusal is Refusal.UNAUTHENTICATED


async def test_the_pod_is_checked_against_the_api(api: FakeKubeApi, tmp_path: Path) -> None:
    api.add_token("replaced", "istio-system", "ztunnel", pod_name="ztunnel-a", pod_uid="uid-of-an-older-pod")
    api.add_token("moved", "istio-system", "ztunnel", pod_name="ztunnel-a", node="node-b")
    api.add_token("gone", "istio-system", "ztunnel", pod_name="ztunnel-z")
    api.add_token("other-sa", "shop", "db", pod_name="web")
    auth = kube_authenticator(api, tmp_path)
    replaced = await refused(auth, "replaced")
    assert replaced.refusal is Refusal.UNAUTHENTICATED and "uid-of-an-older-pod" in str(replaced)
    moved = await refused(auth, "moved")
    assert moved.refusal is Refusal.PERMISSION_DENIED
    assert "bound to node 'node-b'" in str(moved) and "runs on 'node-a'" in str(moved)
    gone = await refused(auth, "gone")
    assert gone.refusal is Refusal.UNAUTHENTICATED and "istio-system/ztunnel-z no longer exists" in str(gone)
    assert (await refused(auth, "other-sa")).refusal is Refusal.PERMISSION_DENIED


@pytest.mark.parametrize(("plural", "status"), [("tokenreviews", 503), ("tokenreviews", 0), ("pods", 500)])
async def test_api_failures_refuse_with_unavailable_and_are_not_cached(
    api: FakeKubeApi, tmp_path: Path, plural: str, status: int
) -> None:
    auth = kube_authenticator(api, tmp_path)
    api.fail[plural] = status
    error = await refused(auth, PROXY_A)
    assert error.refusal is Refusal.UNAVAILABLE and "retry" in str(error)
    assert "Kubernetes API" in str(error) or "review" in str(error)
    assert auth.stats.api_errors == 1
    del api.fail[plural]
    assert (await auth.authenticate(f"Bearer {PROXY_A}")).node == "node-a"


async def test_an_unreachable_api_refuses_within_the_timeout(tmp_path: Path) -> None:
    with FakeKubeApi() as fake:
        kubeconfig = fake.kubeconfig(tmp_path / "kubeconfig")
    auth = KubeAuthenticator(KubeClient(from_kubeconfig(kubeconfig)), trust_domain="cluster.local", timeout=2)
    started = time.monotonic()
    error = await refused(auth, PROXY_A)
    assert error.refusal is Refusal.UNAVAILABLE and "unreachable" in str(error)
    assert time.monotonic() - started < 2.5


async def test_reviews_are_cached_for_a_while_and_shared_in_flight(api: FakeKubeApi, tmp_path: Path) -> None:
    now = [1000.0]
    auth = kube_authenticator(api, tmp_path, clock=lambda: now[0], ttl=60.0)
    callers = await asyncio.gather(*(auth.authenticate(f"Bearer {PROXY_A}") for _ in range(20)))
    assert {c.node for c in callers} == {"node-a"}
    assert review_count(api) == 1 and auth.stats.shared == 19
    now[0] += 59
    await auth.authenticate(f"Bearer {PROXY_A}")
    assert review_count(api) == 1 and auth.stats.cache_hits == 1
    now[0] += 2  # past the TTL: reviewed again (a revoked token stops working within a minute)
    await auth.authenticate(f"Bearer {PROXY_A}")
    assert review_count(api) == 2


async def test_the_cache_is_bounded_and_never_outlives_the_token(api: FakeKubeApi, tmp_path: Path) -> None:
    now = [1000.0]
    auth = kube_authenticator(api, tmp_path, clock=lambda: now[0], max_entries=2)
    for token in (PROXY_A, PROXY_B, WEB_TOKEN):
        await auth.authenticate(f"Bearer {token}")
    assert len(auth._cache) == 2
    await auth.authenticate(f"Bearer {PROXY_A}")  # the least recently used: evicted, reviewed again
    assert review_count(api) == 4
    claims = base64.urlsafe_b64encode(json.dumps({"exp": 1005}).encode()).decode().rstrip("=")
    jwt = f"eyJhbGciOiJSUzI1NiJ9.{claims}.c2ln"
    assert token_expiry(jwt) == 1005.0 and token_expiry("opaque") is None
    api.add_token(jwt, "istio-system", "ztunnel", pod_name="ztunnel-a")
    await auth.authenticate(f"Bearer {jwt}")
    now[0] += 6  # the token expired at 1005: the cached review goes with it
    await auth.authenticate(f"Bearer {jwt}")
    assert review_count(api) == 6


# ---- the CA's keys ---------------------------------------------------------------------------------------


def _secret_root(api: FakeKubeApi, name: str = "istio-ca-secret") -> bytes:
    secret = api.get("Secret", name, "istio-system")
    assert secret is not None
    return base64.b64decode(secret["data"]["root-cert.pem"])


async def test_a_generated_ca_is_stored_once_and_read_back(api: FakeKubeApi, tmp_path: Path) -> None:
    c = kube_client(api, tmp_path)
    first = await ensure_ca_secret(c, "istio-system", "istio-ca-secret", "cluster.local")
    assert first["root-cert.pem"] == _secret_root(api) and CA_KEY in first and ROOT_KEY in first
    again = await ensure_ca_secret(c, "istio-system", "istio-ca-secret", "cluster.local")
    assert again == first and api.count("POST", "/secrets") == 1


async def test_two_replicas_racing_to_store_the_ca_agree(api: FakeKubeApi, tmp_path: Path) -> None:
    import threading

    api.hold_creates["secrets"] = hold = threading.Event()
    c = kube_client(api, tmp_path)
    both = [asyncio.create_task(ensure_ca_secret(c, "istio-system", "istio-ca-secret", "cluster.local")) for _ in "ab"]
    await eventually_async(lambda: api.count("POST", "/secrets") == 2, 30, what="both replicas creating the Secret")
    hold.set()
    a, b = await asyncio.gather(*both)
    assert a == b and a["root-cert.pem"] == _secret_root(api)


async def test_a_plugged_in_cacerts_dir_is_used_as_is(api: FakeKubeApi, tmp_path: Path) -> None:
    made = init_ca_dir(tmp_path / "made", trust_domain="example.org")
    mounted = tmp_path / "cacerts"  # what `kubectl create secret generic cacerts --from-file=...` mounts
    mounted.mkdir()
    for name in ("ca-cert.pem", "ca-key.pem", "root-cert.pem", "cert-chain.pem"):
        (mounted / name).write_bytes((made / name).read_bytes())
    ca = await load_kube_ca(
        kube_client(api, tmp_path), mounted=mounted, namespace="istio-system", secret="istio-ca-secret",
        trust_domain="example.org", work_dir=tmp_path,
    )
    assert ca.roots_pem == (made / "root-cert.pem").read_bytes() and ca.trust_domain == "example.org"
    assert ca.directory != mounted and api.count("GET", "/secrets/istio-ca-secret") == 0
    empty = tmp_path / "empty"  # the optional Secret volume when no cacerts exists
    empty.mkdir()
    generated = await load_kube_ca(
        kube_client(api, tmp_path), mounted=empty, namespace="istio-system", secret="istio-ca-secret",
        trust_domain="cluster.local", work_dir=tmp_path,
    )
    assert generated.roots_pem == _secret_root(api)
    with pytest.raises(CAError, match=re.escape("trust domain 'cluster.local', not --trust-domain 'example.org'")):
        await load_kube_ca(
            kube_client(api, tmp_path), mounted=None, namespace="istio-system", secret="istio-ca-secret",
            trust_domain="example.org", work_dir=tmp_path,
        )


# ---- the trust bundle ------------------------------------------------------------------------------------


async def test_the_trust_bundle_reaches_every_namespace_and_is_repaired(api: FakeKubeApi, tmp_path: Path) -> None:
    publisher = TrustBundlePublisher(kube_client(api, tmp_path), b"ROOTS\n", resync=3600, retry=0.05)
    names = ["istio-system", "shop"]
    task = asyncio.create_task(publisher.run(lambda: list(names)))
    try:

        def bundle(ns: str) -> str | None:
            cm = api.get("ConfigMap", "istio-ca-root-cert", ns)
            return cm["data"]["root-cert.pem"] if cm else None

        async def until(check: Callable[[], bool]) -> None:
            await eventually_async(check, 30, what="the ConfigMaps as expected")

        await until(lambda: bundle("shop") == "ROOTS\n" and bundle("istio-system") == "ROOTS\n")
        api.put(namespace("late"))  # a namespace created later: published once the source says it changed
        names.append("late")
        publisher.wake.set()
        await until(lambda: bundle("late") == "ROOTS\n")
        cm = api.get("ConfigMap", "istio-ca-root-cert", "shop")
        assert cm is not None
        cm["data"]["root-cert.pem"] = "tampered"
        api.put(cm)
        publisher.published.discard("shop")  # what the resync does for every namespace
        publisher.wake.set()
        await until(lambda: bundle("shop") == "ROOTS\n")
        assert api.count("PATCH", "/configmaps/istio-ca-root-cert") == 1
        api.put(namespace("brand-new"))
        api.fail["configmaps"] = 503
        names.append("brand-new")
        publisher.wake.set()
        await until(lambda: "brand-new" in publisher.failed)
        del api.fail["configmaps"]
        await until(lambda: bundle("brand-new") == "ROOTS\n")  # retried without another wake
        await until(lambda: publisher.failed == {})  # (the fake stores it before the publisher has its answer)
    finally:
        task.cancel()


# ---- the CRLs beside it ----------------------------------------------------------------------------------


async def test_the_crl_configmap_follows_the_revocations_and_drops_stale_keys(
    api: FakeKubeApi, tmp_path: Path
) -> None:
    made = init_ca_dir(tmp_path / "made")
    ca = CertificateAuthority.load(made)
    assert revocation_content(ca.published_revocations(0)) == ({}, {})  # nothing revoked: nothing published
    ca.revoke([0xABC])
    data, binary = revocation_content(ca.published_revocations(0))
    assert data["number"] == "1" and data["issuer-chain.pem"].startswith("-----BEGIN CERTIFICATE-----")
    crl = x509.load_der_x509_crl(base64.b64decode(binary["crl.der"]))
    assert [r.serial_number for r in crl] == [0xABC]

    publisher = ConfigMapPublisher(kube_client(api, tmp_path), "ztunnel-ca-crl", {})
    await publisher.publish(["shop"])
    assert api.get("ConfigMap", "ztunnel-ca-crl", "shop") is None  # empty: not published
    publisher.set_content(data, {**binary, "retired-0.der": "AAAA"})
    await publisher.publish(["shop"])
    cm = api.get("ConfigMap", "ztunnel-ca-crl", "shop")
    assert cm is not None and cm["data"]["number"] == "1" and set(cm["binaryData"]) == {"crl.der", "retired-0.der"}
    publisher.set_content({**data, "number": "2"}, binary)
    await publisher.publish(["shop"])
    cm = api.get("ConfigMap", "ztunnel-ca-crl", "shop")
    assert cm is not None and cm["data"]["number"] == "2" and set(cm["binaryData"]) == {"crl.der"}


def test_the_mounted_crl_files_are_followed(tmp_path: Path) -> None:
    mounted, work = tmp_path / "mounted", tmp_path / "work"
    mounted.mkdir()
    work.mkdir()
    assert not sync_mounted_revocations(mounted, work)
    (mounted / "crl.pem").write_bytes(b"one")
    assert sync_mounted_revocations(mounted, work) and (work / "crl.pem").read_bytes() == b"one"
    assert not sync_mounted_revocations(mounted, work)
    (mounted / "crl.pem").unlink()
    assert sync_mounted_revocations(mounted, work) and not (work / "crl.pem").exists()


async def test_the_ca_client_reads_its_token_file_for_every_call(tmp_path: Path, ca: CertificateAuthority) -> None:
    """A projected token rotates (the kubelet rewrites it, the old one expires): the proxy's client must send the
    current one, not the one it read at start."""
    from ztunnel.identity.authz import NodeTokens
    from ztunnel.identity.h2client import CAClient, CAClientError, GrpcStatus

    config = build_config(load_documents(two_node_config_yaml(), "two-nodes.yaml"))
    server = CAServer(ca, NodeTokens({"first": "node-a"}), lambda: config, listen="127.0.0.1:0")
    port = await server.start()
    try:
        token_file = tmp_path / "istio-token"
        token_file.write_text("first\n")
        client = CAClient(f"127.0.0.1:{port}", ca.roots_pem, token_file)
        web = spiffe("shop", "web")
        assert await client.create_certificate(make_csr(generate_key(), SpiffeId.parse(web)), 3600)
        server.tokens = NodeTokens({"rotated": "node-a"})  # the old token is no longer valid
        token_file.write_text("rotated\n")
        assert await client.create_certificate(make_csr(generate_key(), SpiffeId.parse(web)), 3600)
        server.tokens = NodeTokens({"third": "node-a"})
        with pytest.raises(CAClientError) as stale:
            await client.create_certificate(make_csr(generate_key(), SpiffeId.parse(web)), 3600)
        assert stale.value.code is GrpcStatus.UNAUTHENTICATED
        token_file.unlink()
        with pytest.raises(CAClientError, match="cannot read the token file"):
            await client.create_certificate(make_csr(generate_key(), SpiffeId.parse(web)), 3600)
        assert server.issued == 2
    finally:
        await server.stop()


async def test_a_caller_that_goes_away_does_not_fail_the_others_sharing_its_review(
    api: FakeKubeApi, tmp_path: Path
) -> None:
    import threading

    api.hold_creates["tokenreviews"] = hold = threading.Event()
    auth = kube_authenticator(api, tmp_path)
    first = asyncio.create_task(auth.authenticate(f"Bearer {PROXY_A}"))
    await eventually_async(lambda: review_count(api) == 1, 30, what="the review sent")
    second = asyncio.create_task(auth.authenticate(f"Bearer {PROXY_A}"))
    await asyncio.sleep(0)  # the second joins the review in flight
    first.cancel()  # its RPC was cancelled (the proxy gave up or went away)
    hold.set()
    assert (await second).node == "node-a"
    assert first.cancelled() and review_count(api) == 1


def _rsa_ca(
    name: str, key: rsa.RSAPrivateKey, issuer: x509.Certificate | None, issuer_key: rsa.RSAPrivateKey
) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    org = x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Istio")
    subject = x509.Name([org, x509.NameAttribute(NameOID.COMMON_NAME, name)])
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.subject if issuer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None if issuer is None else 0), critical=True)
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True
        )
        .sign(issuer_key, hashes.SHA256())
    )


async def test_an_rsa_cacerts_as_istios_samples_make_it_signs_svids_and_crls(api: FakeKubeApi, tmp_path: Path) -> None:
    """Istio's sample plugged-in certs (tools/certs) are RSA: an operator moving over keeps them."""
    root_key = rsa.generate_private_key(65537, 2048)
    int_key = rsa.generate_private_key(65537, 2048)
    root = _rsa_ca("Root CA", root_key, None, root_key)
    intermediate = _rsa_ca("Intermediate CA", int_key, root, root_key)
    pem = serialization.Encoding.PEM
    mounted = tmp_path / "cacerts"
    mounted.mkdir()
    (mounted / "root-cert.pem").write_bytes(root.public_bytes(pem))
    (mounted / "ca-cert.pem").write_bytes(intermediate.public_bytes(pem))
    (mounted / "cert-chain.pem").write_bytes(intermediate.public_bytes(pem) + root.public_bytes(pem))
    (mounted / "ca-key.pem").write_bytes(
        int_key.private_bytes(pem, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption())
    )
    ca = await load_kube_ca(
        kube_client(api, tmp_path), mounted=mounted, namespace="istio-system", secret="istio-ca-secret",
        trust_domain="cluster.local", work_dir=tmp_path,
    )
    signed = ca.sign_csr(make_csr(generate_key(), SpiffeId.parse(spiffe("shop", "web"))))
    chain = [x509.load_pem_x509_certificate(c) for c in signed]
    chain[0].verify_directly_issued_by(intermediate)
    assert uri_sans(chain[0]) == [spiffe("shop", "web")] and chain[-1] == root
    ca.revoke([chain[0].serial_number])
    der, number = ca.published_crl()
    assert number == 1 and x509.load_der_x509_crl(der).is_signature_valid(int_key.public_key())
    weak = rsa.generate_private_key(65537, 1024)
    (mounted / "ca-key.pem").write_bytes(
        weak.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    with pytest.raises(CAError, match="1024 bits is too weak"):
        CertificateAuthority.load(mounted)


async def test_a_flood_of_distinct_tokens_holds_at_most_a_few_reviews_at_once(
    api: FakeKubeApi, tmp_path: Path
) -> None:
    import threading

    api.hold_creates["tokenreviews"] = hold = threading.Event()
    auth = kube_authenticator(api, tmp_path, max_concurrent=4)
    flood = [asyncio.create_task(auth.authenticate(f"Bearer forged-{i}")) for i in range(12)]
    await eventually_async(lambda: review_count(api) >= 4, 30, what="four reviews sent")
    for _ in range(20):  # give the others every chance to go out too
        await asyncio.sleep(0.01)
    assert review_count(api) == 4
    hold.set()
    results = await asyncio.gather(*flood, return_exceptions=True)
    assert all(isinstance(r, NodeAuthError) and r.refusal is Refusal.UNAUTHENTICATED for r in results)
    assert review_count(api) == 12
