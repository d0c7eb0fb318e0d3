"""Secure naming: the client proxy refuses an HBONE server that is not who the destination should be.

A fake HBONE server stands at the proxy-less node-c pod's address (127.0.130.1:15008). The real node-a
proxy must reject it when it presents another identity's SVID, an SVID from another CA, or one from
another trust domain, and the client's connection must fail (never a plaintext fallback).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.integration.conftest import NODE_A_CLIENT, NODE_C_TARGET, LocalMesh, SocksRefused, socks_connect
from tests.support.echo import echo_tunnel
from tests.support.svids import FORGERIES, FixedProvider, forged_svid, signed_svid
from ztunnel.hbone.server import HboneServer, InboundTunnel
from ztunnel.hbone.tls_cache import TlsContexts
from ztunnel.identity.ca import init_ca_dir
from ztunnel.identity.certs import WorkloadCertificate
from ztunnel.identity.spiffe import SpiffeId
from ztunnel.net.listen import listening_socket

TARGET_PORT = 7000


class FakeServer:
    """An HBONE server at node-c's pod address presenting whatever identity the test chooses."""

    def __init__(self, ca_dir: Path, identity: str, cert: WorkloadCertificate | None = None) -> None:
        self.contexts = TlsContexts(FixedProvider(cert if cert is not None else signed_svid(ca_dir, identity)))
        self.identity = SpiffeId.parse(identity)
        self.tunnels: list[str] = []
        self.server = HboneServer(self.contexts, self._handle)
        self._listener: asyncio.Server | None = None

    async def _handle(self, tunnel: InboundTunnel) -> None:
        self.tunnels.append(tunnel.peer_identity.uri)
        await echo_tunnel(tunnel)

    async def __aenter__(self) -> FakeServer:
        self._listener = await self.server.listen(listening_socket(NODE_C_TARGET, 15008), self.identity)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._listener is not None
        self._listener.close()
        self.server.abort()
        await self._listener.wait_closed()


class PlaintextTarget:
    """A plain TCP listener on the target's app port: anything that went around the tunnel lands here."""

    def __init__(self) -> None:
        self.connections = 0
        self.received = b""

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            self.received += await reader.read(1024)
            writer.write(b"plaintext reply")
            await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()


@pytest.fixture
async def plaintext_target() -> AsyncIterator[PlaintextTarget]:
    target = PlaintextTarget()
    server = await asyncio.start_server(target._accept, NODE_C_TARGET, TARGET_PORT, reuse_address=True)
    try:
        yield target
    finally:
        server.close()
        await server.wait_closed()


def _metric(mesh: LocalMesh, name: str, **labels: str) -> float:
    total = 0.0
    for line in mesh.a.metrics().splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def _failures(mesh: LocalMesh, reason: str) -> tuple[float, float]:
    """(ztunnel_tls_failures_total{reason}, closed connections to the target with that response flag)."""
    return (
        _metric(mesh, "ztunnel_tls_failures_total", reason=reason),
        _metric(
            mesh,
            "istio_tcp_connections_closed_total",
            reporter="source",
            destination_workload="target",
            response_flags=reason,
        ),
    )


def _through_proxy() -> bytes:
    with socks_connect(NODE_A_CLIENT, (NODE_C_TARGET, TARGET_PORT)) as s:
        s.sendall(b"hello")
        return s.recv(100)


async def test_the_right_identity_is_accepted(local_mesh: LocalMesh) -> None:
    async with FakeServer(local_mesh.ca_dir, "spiffe://cluster.local/ns/shop/sa/target") as fake:
        assert await asyncio.to_thread(_through_proxy) == b"hello"
    assert fake.tunnels == ["spiffe://cluster.local/ns/shop/sa/client"]


@pytest.mark.parametrize(
    ("case", "identity", "reason"),
    [
        ("another identity, same CA", "spiffe://cluster.local/ns/shop/sa/server", "IDENTITY_ERROR"),
        ("another trust domain, same root", "spiffe://other.local/ns/shop/sa/target", "IDENTITY_ERROR"),
        ("the right identity from another CA", "spiffe://cluster.local/ns/shop/sa/target", "TLS_FAILURE"),
        ("another trust domain, another CA", "spiffe://other.local/ns/shop/sa/target", "TLS_FAILURE"),
    ],
)
async def test_a_server_with_the_wrong_svid_is_rejected(
    local_mesh: LocalMesh, plaintext_target: PlaintextTarget, tmp_path: Path, case: str, identity: str, reason: str
) -> None:
    ca = local_mesh.ca_dir
    trust_domain = SpiffeId.parse(identity).trust_domain
    if case.endswith("same root"):
        ca = init_ca_dir(
            tmp_path / "other-ca",
            trust_domain=trust_domain,
            root_cert_file=local_mesh.ca_dir / "root-cert.pem",
            root_key_file=local_mesh.ca_dir / "root-key.pem",
        )
    elif case != "another identity, same CA":
        ca = init_ca_dir(tmp_path / "other-ca", trust_domain=trust_domain)
    before = await asyncio.to_thread(_failures, local_mesh, reason)
    async with FakeServer(ca, identity) as fake:
        with pytest.raises((SocksRefused, ConnectionError)):
            await asyncio.to_thread(_through_proxy)
    assert fake.tunnels == []  # nothing was tunnelled
    assert (plaintext_target.connections, plaintext_target.received) == (0, b"")  # nothing went around it
    # Secure naming counts an IDENTITY_ERROR, a failed handshake a TLS_FAILURE (DESIGN §4.2), in the TLS
    # failure counter and as the response flag of the refused connection.
    after = await asyncio.to_thread(_failures, local_mesh, reason)
    assert after == (before[0] + 1, before[1] + 1)
    assert re.search(rf"HBONE connection failed .*reason={reason}", local_mesh.a.log())


@pytest.mark.parametrize("forgery", sorted(FORGERIES))
async def test_a_server_leaf_that_is_not_an_svid_is_rejected(
    local_mesh: LocalMesh, plaintext_target: PlaintextTarget, forgery: str
) -> None:
    # The right identity first, from the mesh's own CA, but not an X.509-SVID (CA powers or a second URI).
    target = "spiffe://cluster.local/ns/shop/sa/target"
    before = await asyncio.to_thread(_failures, local_mesh, "IDENTITY_ERROR")
    async with FakeServer(local_mesh.ca_dir, target, forged_svid(local_mesh.ca_dir, target, forgery)) as fake:
        with pytest.raises((SocksRefused, ConnectionError)):
            await asyncio.to_thread(_through_proxy)
    assert fake.tunnels == []
    assert (plaintext_target.connections, plaintext_target.received) == (0, b"")
    after = await asyncio.to_thread(_failures, local_mesh, "IDENTITY_ERROR")
    assert after == (before[0] + 1, before[1] + 1)


async def test_a_mesh_destination_whose_proxy_is_down_fails_closed(
    local_mesh: LocalMesh, plaintext_target: PlaintextTarget
) -> None:
    # Nobody listens on 127.0.130.1:15008 but the app port answers in plaintext: the connection must fail
    # instead of going out in plaintext.
    with pytest.raises(SocksRefused):
        await asyncio.to_thread(_through_proxy)
    assert (plaintext_target.connections, plaintext_target.received) == (0, b"")
