"""`ztunnel ca serve --source kubernetes` as a real process against the fake API server: it generates its CA
into a Secret, publishes the trust bundle in every namespace, and signs what a real proxy asks for with its
projected token file (TokenReview); refusals reach the caller as gRPC statuses; two replicas agree on the root."""

from __future__ import annotations

import base64
import os
import shutil
import signal
import socket
import subprocess
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography import x509

from tests.integration.conftest import ZTUNNEL, AppServer, ProxyProcess, recv_all, socks_connect
from tests.support.eventually import eventually
from tests.support.identity import free_port, spiffe
from tests.support.kubeapi import FakeKubeApi, namespace, pod
from ztunnel.identity.ca import CertificateAuthority, init_ca_dir
from ztunnel.identity.certs import generate_key, make_csr, uri_sans
from ztunnel.identity.proto import ca_pb2, ca_pb2_grpc, revocation_pb2
from ztunnel.identity.spiffe import SpiffeId

NODE, OTHER_NODE = "node-k", "node-j"
CLIENT, SERVER, PORT = "127.0.211.1", "127.0.211.2", 8080
PROXY_TOKEN = "projected-token-of-ztunnel-k"


@dataclass
class CAProcess:
    proc: subprocess.Popen[bytes]
    port: int
    ready_port: int
    log_path: Path
    metrics_port: int

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as r:
            return str(r.read().decode())

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.ready_port}/healthz/ready", timeout=5) as r:
                return r.status == 200
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode


def start_ca(api: FakeKubeApi, workdir: Path, name: str = "ca", *extra: str) -> CAProcess:
    port, ready, metrics = free_port(), free_port(), free_port()
    log_path = workdir / f"{name}.log"
    argv = [
        ZTUNNEL,
        "--log-level",
        "info",
        "ca",
        "serve",
        "--source",
        "kubernetes",
        "--kubeconfig",
        str(api.kubeconfig(workdir / f"{name}-kubeconfig")),
        "--ca-namespace",
        "istio-system",
        "--listen",
        f"127.0.0.1:{port}",
        "--readiness-addr",
        f"127.0.0.1:{ready}",
        "--metrics-addr",
        f"127.0.0.1:{metrics}",
        *extra,
    ]
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=workdir)
    return CAProcess(proc, port, ready, log_path, metrics)


def wait_ready(ca: CAProcess) -> None:
    eventually(lambda: ca.ready() or ca.proc.poll() is not None, 30, what="the CA ready")
    assert ca.proc.poll() is None, ca.log()


def bundle(api: FakeKubeApi, ns: str) -> str | None:
    cm = api.get("ConfigMap", "istio-ca-root-cert", ns)
    return cm["data"]["root-cert.pem"] if cm else None


def secret_root(api: FakeKubeApi) -> str:
    secret = api.get("Secret", "istio-ca-secret", "istio-system")
    assert secret is not None
    return base64.b64decode(secret["data"]["root-cert.pem"]).decode()


def cluster(api: FakeKubeApi) -> None:
    api.put_all(
        [
            namespace("istio-system"),
            namespace("kube", {"istio.io/dataplane-mode": "ambient"}),
            pod("ztunnel-k", "istio-system", node=NODE, ip="127.0.211.100", sa="ztunnel"),
            pod("server", "kube", node=NODE, ip=SERVER),
            pod("client", "kube", node=NODE, ip=CLIENT),
            pod("elsewhere", "kube", node=OTHER_NODE, ip="127.0.211.3"),
        ]
    )
    api.add_token(PROXY_TOKEN, "istio-system", "ztunnel", pod_name="ztunnel-k", node=NODE)


@pytest.fixture(scope="module")
def api() -> Iterator[FakeKubeApi]:
    with FakeKubeApi() as fake:
        cluster(fake)
        yield fake


@pytest.fixture(scope="module")
def ca(api: FakeKubeApi, tmp_path_factory: pytest.TempPathFactory) -> Iterator[CAProcess]:
    process = start_ca(api, tmp_path_factory.mktemp("ca-kube"))
    try:
        wait_ready(process)
        yield process
    finally:
        assert process.stop() == 0, process.log()


def csr(identity: str) -> bytes:
    return make_csr(generate_key(), SpiffeId.parse(identity))


async def ask(ca: CAProcess, roots: str, token: str, identity: str) -> list[str]:
    """Istio's CreateCertificate with a bearer token from a grpcio client (the proxy's own client: the proxy test)."""
    request = ca_pb2.IstioCertificateRequest(csr=csr(identity).decode(), validity_duration=3600)
    credentials = grpc.ssl_channel_credentials(roots.encode())
    async with grpc.aio.secure_channel(ca.address, credentials) as channel:
        stub = ca_pb2_grpc.IstioCertificateServiceStub(channel)
        response = await stub.CreateCertificate(request, metadata=[("authorization", f"Bearer {token}")], timeout=10)
    return list(response.cert_chain)


async def refused(ca: CAProcess, roots: str, token: str, identity: str) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await ask(ca, roots, token, identity)
    return info.value


def test_the_ca_stores_its_root_and_publishes_it_in_every_namespace(api: FakeKubeApi, ca: CAProcess) -> None:
    root = secret_root(api)  # generated once, kept in the Secret
    assert "BEGIN CERTIFICATE" in root
    eventually(lambda: bundle(api, "kube") == root and bundle(api, "istio-system") == root, 30, what="bundles")
    api.put(namespace("created-later"))
    eventually(lambda: bundle(api, "created-later") == root, 30, what="the bundle in a namespace created later")
    cm = api.get("ConfigMap", "istio-ca-root-cert", "created-later")
    assert cm is not None and cm["metadata"]["labels"] == {"istio.io/config": "true"}


def test_a_proxy_gets_its_pods_svids_with_its_token_file(
    api: FakeKubeApi, ca: CAProcess, tmp_path: Path
) -> None:
    root = secret_root(api)
    root_file, token_file = tmp_path / "root-cert.pem", tmp_path / "istio-token"
    root_file.write_text(root)  # as the DaemonSet mounts the ConfigMap and the projected token
    token_file.write_text(PROXY_TOKEN)
    apps = AppServer()
    apps.echo(SERVER, PORT)
    metrics, admin, ready = free_port(), free_port(), free_port()
    log_path = tmp_path / "proxy.log"
    argv = [
        ZTUNNEL, "--log-level", "info", "proxy", "--node", NODE,
        "--source", "kubernetes", "--kubeconfig", str(api.kubeconfig(tmp_path / "kubeconfig")),
        "--ca", ca.address, "--ca-root", str(root_file), "--token-file", str(token_file),
        "--metrics-addr", f"127.0.0.1:{metrics}", "--admin-addr", f"127.0.0.1:{admin}",
        "--readiness-addr", f"127.0.0.1:{ready}",
    ]  # fmt: skip
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path)
    proxy = ProxyProcess(NODE, proc, metrics, admin, ready, log_path)
    try:
        eventually(lambda: proxy.ready() or proc.poll() is not None, 30, what="the proxy ready")
        assert proc.poll() is None, proxy.log()

        def echo() -> bytes:
            with socks_connect(CLIENT, (SERVER, PORT)) as s:  # client -> HBONE mTLS -> server, both SVIDs
                s.sendall(b"ping")
                s.shutdown(socket.SHUT_WR)
                return recv_all(s)

        assert echo() == b"ping"
        issued = [line for line in ca.log().splitlines() if "certificate issued" in line]
        assert any(spiffe("kube", "client") in line for line in issued), ca.log()
        assert any(spiffe("kube", "server") in line for line in issued), ca.log()
    finally:
        assert proxy.stop() == 0, proxy.log()
        apps.close()


async def test_refusals_reach_the_caller_as_grpc_statuses(api: FakeKubeApi, ca: CAProcess) -> None:
    root = secret_root(api)
    chain = await ask(ca, root, PROXY_TOKEN, spiffe("kube", "client"))
    assert uri_sans(x509.load_pem_x509_certificate(chain[0].encode())) == [spiffe("kube", "client")]
    assert chain[-1].strip() == root.strip()

    other = await refused(ca, root, PROXY_TOKEN, spiffe("kube", "elsewhere"))  # its pod runs on node-j
    assert other.code() is grpc.StatusCode.PERMISSION_DENIED and "node-j" in (other.details() or "")
    stranger = await refused(ca, root, PROXY_TOKEN, spiffe("kube", "nobody"))
    assert stranger.code() is grpc.StatusCode.PERMISSION_DENIED
    assert (await refused(ca, root, "forged", spiffe("kube", "client"))).code() is grpc.StatusCode.UNAUTHENTICATED
    api.add_token("wrong-audience", "istio-system", "ztunnel", pod_name="ztunnel-k", audiences=("kubernetes",))
    audience = await refused(ca, root, "wrong-audience", spiffe("kube", "client"))
    assert audience.code() is grpc.StatusCode.UNAUTHENTICATED

    api.add_token("fresh", "istio-system", "ztunnel", pod_name="ztunnel-k", node=NODE)  # not cached yet
    api.fail["tokenreviews"] = 503
    try:
        down = await refused(ca, root, "fresh", spiffe("kube", "client"))
        assert down.code() is grpc.StatusCode.UNAVAILABLE and "retry" in (down.details() or "")
    finally:
        del api.fail["tokenreviews"]
    assert await ask(ca, root, "fresh", spiffe("kube", "client"))  # the API is back: signed

    before = api.count("POST", "/tokenreviews")
    for _ in range(5):
        await ask(ca, root, PROXY_TOKEN, spiffe("kube", "server"))
    assert api.count("POST", "/tokenreviews") == before  # cached: a burst costs no review
    scrape = ca.metrics()
    assert 'ztunnel_ca_token_reviews_total{result="api_error"} 1.0' in scrape
    assert 'ztunnel_ca_certificates_total{result="refused"}' in scrape
    assert 'ztunnel_ca_token_reviews_total{result="cache_hit"}' in scrape


async def test_two_ca_replicas_racing_to_store_the_root_agree(tmp_path: Path) -> None:
    with FakeKubeApi() as api:
        cluster(api)
        hold = api.hold_creates["secrets"] = threading.Event()
        first, second = start_ca(api, tmp_path, "ca-1"), start_ca(api, tmp_path, "ca-2")
        try:
            eventually(lambda: api.count("POST", "/secrets") == 2, 30, what="both replicas creating the Secret")
            hold.set()
            wait_ready(first)
            wait_ready(second)
            root = secret_root(api)
            for replica in (first, second):  # each one's TLS and chain verify with the one stored root
                assert (await ask(replica, root, PROXY_TOKEN, spiffe("kube", "client")))[-1].strip() == root.strip()
            assert "another CA replica stored its CA first" in first.log() + second.log()
            eventually(lambda: bundle(api, "kube") == root, 30, what="the bundle published by the replicas")
        finally:
            hold.set()
            codes = first.stop(), second.stop()
            assert codes == (0, 0), first.log() + second.log()


async def crl_number(ca: CAProcess, roots: str, token: str) -> int:
    """ztunnel.v1.RevocationService/GetRevocationList with the caller's projected token."""
    credentials = grpc.ssl_channel_credentials(roots.encode())
    async with grpc.aio.secure_channel(ca.address, credentials) as channel:
        call = channel.unary_unary(
            "/ztunnel.v1.RevocationService/GetRevocationList",
            request_serializer=revocation_pb2.RevocationListRequest.SerializeToString,
            response_deserializer=revocation_pb2.RevocationListResponse.FromString,
        )
        answer = await call(
            revocation_pb2.RevocationListRequest(), metadata=[("authorization", f"Bearer {token}")], timeout=10
        )
    return int(answer.number)


async def test_a_plugged_in_cacerts_and_its_crls_are_served_and_published(tmp_path: Path) -> None:
    made = init_ca_dir(tmp_path / "operator-ca")  # the operator's CA, plugged in as the cacerts Secret
    operator = CertificateAuthority.load(made)
    operator.revoke([0x1234])
    mounted = tmp_path / "cacerts"
    mounted.mkdir()
    for name in ("ca-cert.pem", "ca-key.pem", "root-cert.pem", "cert-chain.pem", "crl.pem"):
        shutil.copy(made / name, mounted / name)
    root = (made / "root-cert.pem").read_text()
    with FakeKubeApi() as api:
        cluster(api)
        ca = start_ca(api, tmp_path, "ca-plugged", "--dir", str(mounted))
        try:
            wait_ready(ca)
            assert api.get("Secret", "istio-ca-secret", "istio-system") is None  # nothing generated
            assert (await ask(ca, root, PROXY_TOKEN, spiffe("kube", "client")))[-1].strip() == root.strip()

            def crl_map() -> dict | None:  # type: ignore[type-arg]
                return api.get("ConfigMap", "ztunnel-ca-crl", "kube")

            eventually(lambda: bundle(api, "kube") == root and crl_map() is not None, 30, what="both ConfigMaps")
            cm = crl_map()
            assert cm is not None and cm["data"]["number"] == "1"
            crl = x509.load_der_x509_crl(base64.b64decode(cm["binaryData"]["crl.der"]))
            assert [r.serial_number for r in crl] == [0x1234]
            assert await crl_number(ca, root, PROXY_TOKEN) == 1  # the gRPC path, authenticated by TokenReview
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await crl_number(ca, root, "forged")
            assert info.value.code() is grpc.StatusCode.UNAUTHENTICATED

            operator.revoke([0x5678])  # the operator revokes and updates the Secret: the mount changes
            tmp = mounted / "crl.pem.new"
            shutil.copy(made / "crl.pem", tmp)
            os.replace(tmp, mounted / "crl.pem")
            eventually(lambda: (crl_map() or {}).get("data", {}).get("number") == "2", 30, what="the new CRL")
            assert await crl_number(ca, root, PROXY_TOKEN) == 2
        finally:
            assert ca.stop() == 0, ca.log()
