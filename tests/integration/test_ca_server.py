"""The CA server over real TLS sockets on loopback, spoken to with stubs generated from the Istio .proto."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import ssl
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from google.protobuf import struct_pb2

from tests.support.eventually import eventually_async
from tests.support.identity import free_port, pod_yaml, spiffe, two_node_config_yaml, write_token_file
from ztunnel.config.loader import build_config, load_documents
from ztunnel.identity.authz import NodeTokens, load_node_tokens
from ztunnel.identity.ca import CertificateAuthority, init_ca_dir
from ztunnel.identity.certs import generate_key, make_csr, uri_sans
from ztunnel.identity.proto import ca_pb2, ca_pb2_grpc
from ztunnel.identity.server import CAServer, run_ca_server
from ztunnel.identity.spiffe import SpiffeId

StatusCode = grpc.StatusCode


async def _is_ok(answer: Awaitable[StatusCode]) -> bool:
    return await answer is StatusCode.OK


@dataclass
class Running:
    server: CAServer
    ca: CertificateAuthority
    tokens: dict[str, str]
    channel: grpc.aio.Channel
    stub: ca_pb2_grpc.IstioCertificateServiceStub

    async def call(
        self,
        csr: bytes | str,
        *,
        node: str | None = "node-a",
        token: str | None = None,
        validity: int = 0,
        impersonated: str = "",
    ) -> list[str]:
        request = ca_pb2.IstioCertificateRequest(
            csr=csr.decode() if isinstance(csr, bytes) else csr, validity_duration=validity
        )
        if impersonated:
            request.metadata.CopyFrom(struct_pb2.Struct())
            request.metadata.fields["ImpersonatedIdentity"].string_value = impersonated
        metadata = []
        if token is None and node is not None:
            token = self.tokens[node]
        if token is not None:
            metadata.append(("authorization", f"Bearer {token}"))
        response = await self.stub.CreateCertificate(request, metadata=metadata, timeout=5)
        return list(response.cert_chain)


def _csr(identity: str) -> bytes:
    return make_csr(generate_key(), SpiffeId.parse(identity))


@pytest.fixture
async def running(tmp_path: Path) -> AsyncIterator[Running]:
    init_ca_dir(tmp_path / "ca")
    ca = CertificateAuthority.load(tmp_path / "ca")
    tokens = write_token_file(tmp_path / "tokens.yaml")
    config = build_config(load_documents(two_node_config_yaml(), "two-nodes.yaml"))
    server = CAServer(ca, NodeTokens(load_node_tokens(tmp_path / "tokens.yaml")), lambda: config, listen="127.0.0.1:0")
    port = await server.start()
    channel = grpc.aio.secure_channel(f"127.0.0.1:{port}", grpc.ssl_channel_credentials(ca.roots_pem))
    try:
        yield Running(server, ca, tokens, channel, ca_pb2_grpc.IstioCertificateServiceStub(channel))
    finally:
        await channel.close()
        await server.stop(0)


async def _status(coro: object) -> tuple[StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await coro  # type: ignore[misc]
    return info.value.code(), info.value.details() or ""


async def test_node_gets_a_chain_for_its_own_pod(running: Running) -> None:
    chain = await running.call(_csr(spiffe("shop", "web")), validity=3600)
    assert len(chain) == 3
    leaf = x509.load_pem_x509_certificate(chain[0].encode())
    assert uri_sans(leaf) == [spiffe("shop", "web")]
    assert chain[-1].encode() == (running.ca.directory / "root-cert.pem").read_bytes()
    lifetime = leaf.not_valid_after_utc.timestamp() - time.time()
    assert 3590 < lifetime <= 3600
    default = x509.load_pem_x509_certificate((await running.call(_csr(spiffe("shop", "shared"))))[0].encode())
    assert abs(default.not_valid_after_utc.timestamp() - time.time() - 86400) < 10  # 0 = the CA default, 24 h
    impersonated = await running.call(_csr(spiffe("shop", "web")), impersonated=spiffe("shop", "web"))
    assert uri_sans(x509.load_pem_x509_certificate(impersonated[0].encode())) == [spiffe("shop", "web")]


async def test_node_authorization_matrix_over_the_wire(running: Running) -> None:
    # a pod only on node-b
    code, msg = await _status(running.call(_csr(spiffe("shop", "db"))))
    assert code is StatusCode.PERMISSION_DENIED and "node-b" in msg
    # node-b's own token does get it
    assert await running.call(_csr(spiffe("shop", "db")), node="node-b")
    # a made-up identity
    code, msg = await _status(running.call(_csr(spiffe("shop", "ghost"))))
    assert code is StatusCode.PERMISSION_DENIED and "no pod" in msg
    # SAN differs from the impersonated identity
    code, msg = await _status(running.call(_csr(spiffe("shop", "web")), impersonated=spiffe("shop", "shared")))
    assert code is StatusCode.PERMISSION_DENIED and "differs" in msg
    # two SANs
    two = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.UniformResourceIdentifier(spiffe("shop", "web")),
                    x509.UniformResourceIdentifier(spiffe("shop", "shared")),
                ]
            ),
            critical=True,
        )
        .sign(generate_key(), hashes.SHA256())
        .public_bytes(serialization.Encoding.PEM)
    )
    code, msg = await _status(running.call(two))
    assert code is StatusCode.PERMISSION_DENIED and "exactly one SAN" in msg
    # another trust domain
    code, msg = await _status(running.call(_csr(spiffe("shop", "web", "other.example"))))
    assert code is StatusCode.PERMISSION_DENIED and "other.example" in msg
    assert running.server.refused == 5


async def test_bad_input_is_refused_and_the_server_keeps_serving(running: Running) -> None:
    web = spiffe("shop", "web")
    cases = [
        (
            running.call("-----BEGIN CERTIFICATE REQUEST-----\n!!!\n-----END CERTIFICATE REQUEST-----\n"),
            StatusCode.INVALID_ARGUMENT,
            "does not decode",
        ),
        (running.call("this is not a csr"), StatusCode.INVALID_ARGUMENT, "not PEM"),
        (running.call(_csr(web), token="not-a-token"), StatusCode.UNAUTHENTICATED, "unknown node token"),
        (running.call(_csr(web), node=None), StatusCode.UNAUTHENTICATED, "Bearer"),
        (running.call(_csr(web), validity=-5), StatusCode.INVALID_ARGUMENT, "negative"),
        (running.call("A" * 100_000), StatusCode.RESOURCE_EXHAUSTED, "larger than max"),
    ]
    for coro, want, words in cases:
        code, msg = await _status(coro)
        assert code is want, msg
        assert words in msg and "\n" not in msg
    # still serving, to the same and to a fresh connection
    assert await running.call(_csr(web))
    channel = grpc.aio.secure_channel(
        f"127.0.0.1:{running.server.port}", grpc.ssl_channel_credentials(running.ca.roots_pem)
    )
    try:
        stub = ca_pb2_grpc.IstioCertificateServiceStub(channel)
        req = ca_pb2.IstioCertificateRequest(csr=_csr(web).decode())
        resp = await stub.CreateCertificate(req, metadata=[("authorization", f"Bearer {running.tokens['node-a']}")])
        assert len(resp.cert_chain) == 3
    finally:
        await channel.close()


async def test_server_cert_is_from_the_same_root_and_names_the_host(running: Running) -> None:
    ctx = ssl.create_default_context(cadata=running.ca.roots_pem.decode())
    ctx.set_alpn_protocols(["h2"])
    _reader, writer = await asyncio.open_connection(
        "127.0.0.1", running.server.port, ssl=ctx, server_hostname="localhost"
    )
    try:
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    finally:
        writer.close()
    cert = x509.load_der_x509_certificate(der)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in san.get_values_for_type(x509.DNSName)
    assert "127.0.0.1" in [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == []  # not an SVID


async def test_new_pods_become_signable_without_restart(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    init_ca_dir(tmp_path / "ca")
    ca = CertificateAuthority.load(tmp_path / "ca")
    tokens = write_token_file(tmp_path / "tokens.yaml")
    config_file = tmp_path / "cluster.yaml"
    config_file.write_text(two_node_config_yaml())
    stop = asyncio.Event()
    port = free_port()
    serve = asyncio.create_task(
        run_ca_server(
            ca,
            NodeTokens(load_node_tokens(tmp_path / "tokens.yaml")),
            [str(config_file)],
            listen=f"127.0.0.1:{port}",
            dns_names=[],
            default_ttl=dt.timedelta(hours=1),
            stop=stop,
        )
    )
    channel = grpc.aio.secure_channel(f"127.0.0.1:{port}", grpc.ssl_channel_credentials(ca.roots_pem))
    stub = ca_pb2_grpc.IstioCertificateServiceStub(channel)
    md = [("authorization", f"Bearer {tokens['node-a']}")]

    async def ask(sa: str) -> StatusCode:
        req = ca_pb2.IstioCertificateRequest(csr=_csr(spiffe("shop", sa)).decode())
        try:
            await stub.CreateCertificate(req, metadata=md, timeout=5, wait_for_ready=True)
        except grpc.aio.AioRpcError as e:
            return e.code()
        return StatusCode.OK

    try:
        assert await ask("api") is StatusCode.PERMISSION_DENIED
        config_file.write_text(two_node_config_yaml() + pod_yaml("api", "shop", "node-a", "api", "10.1.0.9"))
        await eventually_async(
            lambda: _is_ok(ask("api")), 5, interval=0.1, what="the new pod signable after the config edit"
        )
        # a broken edit keeps the last good config: first see that the CA read and rejected it, then ask
        caplog.clear()
        caplog.set_level(logging.ERROR, logger="ztunnel.config")
        config_file.write_text("kind: Pod\nmetadata: [broken\n")

        def rejected() -> bool:
            msgs = [r.getMessage() for r in caplog.records if r.name == "ztunnel.config"]
            return any("config rejected" in m and str(config_file) in m for m in msgs)

        await eventually_async(rejected, 5, what="the CA's rejection of the broken edit")
        assert await ask("api") is StatusCode.OK
    finally:
        await channel.close()
        stop.set()
        await asyncio.wait_for(serve, 5)


async def _raw_call(running: Running, body: bytes, metadata: list[tuple[str, str]]) -> tuple[StatusCode, str]:
    """CreateCertificate with `body` sent as is: what a client that is not a proxy may send."""
    method = running.channel.unary_unary("/istio.v1.auth.IstioCertificateService/CreateCertificate")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await method(body, metadata=metadata, timeout=5)
    return info.value.code(), info.value.details() or ""


async def test_a_garbage_body_is_refused_with_a_status_and_no_traceback(
    running: Running, caplog: pytest.LogCaptureFixture
) -> None:
    garbage = b"\xff\xff\xff\xff\x0f\x00garbage\r\n"
    caplog.set_level(logging.DEBUG)
    # no token: refused before the body is even decoded
    code, msg = await _raw_call(running, garbage, [])
    assert code is StatusCode.UNAUTHENTICATED and "Bearer" in msg
    code, msg = await _raw_call(running, garbage, [("authorization", "Bearer not-a-token")])
    assert code is StatusCode.UNAUTHENTICATED and "unknown node token" in msg
    # a valid token and a body that is not an IstioCertificateRequest
    code, msg = await _raw_call(running, garbage, [("authorization", f"Bearer {running.tokens['node-a']}")])
    assert code is StatusCode.INVALID_ARGUMENT and "IstioCertificateRequest" in msg
    assert not [r for r in caplog.records if r.exc_info or "Traceback" in r.getMessage()]
    assert running.server.refused == 3
    assert await running.call(_csr(spiffe("shop", "web")))  # still serving
