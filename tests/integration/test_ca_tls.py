"""SVIDs in real mTLS handshakes on loopback: revocation (CRLs, one per signer) and trust bundles with
several roots."""

from __future__ import annotations

import asyncio
import dataclasses
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from tests.support.svids import issue
from ztunnel.hbone.tls_cache import TlsContexts
from ztunnel.identity.ca import TRUST_BUNDLE, CertificateAuthority, init_ca_dir
from ztunnel.identity.certs import WorkloadCertificate, generate_key, key_to_pem, make_csr
from ztunnel.identity.revocation import NO_REVOCATIONS, RevocationSet, next_revocation_list
from ztunnel.identity.spiffe import SpiffeId
from ztunnel.identity.tls import PeerIdentityError, PeerRevokedError, client_context, peer_identity, server_context

WEB = SpiffeId.parse("spiffe://cluster.local/ns/shop/sa/web")
DB = SpiffeId.parse("spiffe://cluster.local/ns/shop/sa/db")


def svid(
    ca: CertificateAuthority,
    identity: SpiffeId,
    *,
    roots: bytes | None = None,
    crl: RevocationSet | None = None,
) -> WorkloadCertificate:
    key = generate_key()
    chain = ca.sign_csr(make_csr(key, identity), expected_identity=identity)
    return WorkloadCertificate(identity, key_to_pem(key), tuple(chain), roots or ca.roots_pem, crl)


def crls(*cas: CertificateAuthority, held: RevocationSet = NO_REVOCATIONS) -> RevocationSet:
    """What a proxy holds once it has polled each CA (verified against the CAs' roots together)."""
    roots = b"".join(ca.roots_pem for ca in cas)
    for ca in cas:
        held = next_revocation_list(held, ca.published_revocations(), roots).current
    return held


@asynccontextmanager
async def tls_server(cert: WorkloadCertificate) -> AsyncIterator[tuple[int, list[SpiffeId]]]:
    """An mTLS echo server that records each verified client identity."""
    seen: list[SpiffeId] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            seen.append(peer_identity(writer.get_extra_info("ssl_object")))
            writer.write(await reader.readexactly(4))
            await writer.drain()
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=server_context(cert))
    try:
        yield server.sockets[0].getsockname()[1], seen
    finally:
        server.close()
        await server.wait_closed()


async def exchange(port: int, cert: WorkloadCertificate) -> SpiffeId:
    """Handshake as `cert`, send 4 bytes and read them back; returns the server's identity."""
    async with asyncio.timeout(5):
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client_context(cert))
        try:
            server_id = peer_identity(writer.get_extra_info("ssl_object"))
            writer.write(b"ping")
            await writer.drain()
            assert await reader.readexactly(4) == b"ping"
            return server_id
        finally:
            writer.close()


@pytest.fixture
def ca(tmp_path: Path) -> CertificateAuthority:
    init_ca_dir(tmp_path / "ca")
    return CertificateAuthority.load(tmp_path / "ca")


async def test_mutual_tls_between_two_svids(ca: CertificateAuthority) -> None:
    async with tls_server(svid(ca, DB)) as (port, seen):
        assert await exchange(port, svid(ca, WEB)) == DB
    assert seen == [WEB]


async def test_revoked_server_cert_fails_the_clients_handshake(ca: CertificateAuthority) -> None:
    server_cert = svid(ca, DB)
    ca.revoke([server_cert.serial])
    client = svid(ca, WEB, crl=crls(ca))
    async with tls_server(server_cert) as (port, _seen):
        with pytest.raises(PeerRevokedError, match="revoked"):
            await exchange(port, client)
        # a fresh, unrevoked server cert from the same CA is still accepted under the same CRL
    async with tls_server(svid(ca, DB)) as (port, _seen):
        assert await exchange(port, client) == DB


async def test_revoked_client_cert_is_refused_by_the_server(ca: CertificateAuthority) -> None:
    revoked_client = svid(ca, WEB)
    ca.revoke([revoked_client.serial])
    server_cert = svid(ca, DB, crl=crls(ca))
    async with tls_server(server_cert) as (port, seen):
        # TLS 1.3: the client finishes first; the server refuses the leaf and closes before echoing
        with pytest.raises((ssl.SSLError, ConnectionError, asyncio.IncompleteReadError)):
            await exchange(port, revoked_client)
        assert seen == []
        assert await exchange(port, svid(ca, WEB)) == DB
    assert seen == [WEB]


async def test_bundle_with_two_roots_accepts_leaves_of_either(tmp_path: Path) -> None:
    """Root rotation: the old root's leaves stay trusted by peers already holding the new root."""
    old = init_ca_dir(tmp_path / "old")
    new = init_ca_dir(tmp_path / "new")
    (new / TRUST_BUNDLE).write_bytes((old / "root-cert.pem").read_bytes())
    (old / TRUST_BUNDLE).write_bytes((new / "root-cert.pem").read_bytes())
    old_ca, new_ca = CertificateAuthority.load(old), CertificateAuthority.load(new)
    assert old_ca.roots_pem.count(b"BEGIN CERTIFICATE") == 2
    leaf_from_root1 = svid(old_ca, WEB)
    async with tls_server(svid(new_ca, DB)) as (port, seen):
        assert await exchange(port, leaf_from_root1) == DB
    assert seen == [WEB]
    # control: a peer whose bundle holds only the new root rejects the old root's leaf
    only_new = svid(new_ca, DB, roots=(new / "root-cert.pem").read_bytes())
    async with tls_server(only_new) as (port, seen):
        with pytest.raises((ssl.SSLError, ConnectionError, asyncio.IncompleteReadError)):
            await exchange(port, svid(old_ca, WEB, roots=old_ca.roots_pem))
        assert seen == []


class _Holder:
    """A CertificateProvider whose certificates the test replaces (as the manager does on a new CRL)."""

    def __init__(self, *certs: WorkloadCertificate) -> None:
        self.certs = {c.identity: c for c in certs}

    async def get(self, identity: SpiffeId) -> WorkloadCertificate:
        return self.certs[identity]

    def set_crl(self, crl: RevocationSet) -> None:
        self.certs = {i: dataclasses.replace(c, revocations=crl) for i, c in self.certs.items()}


async def test_a_new_crl_reaches_a_running_listener_and_new_client_contexts(ca: CertificateAuthority) -> None:
    """The listener's context was built before anything was revoked; a CRL arriving later must still apply."""
    server_cert, client_cert = svid(ca, DB), svid(ca, WEB)
    holder = _Holder(server_cert, client_cert)
    contexts = TlsContexts(holder)
    revoked_client, kept_client = svid(ca, WEB), svid(ca, WEB)
    server = await asyncio.start_server(_echo4, "127.0.0.1", 0, ssl=await contexts.server(DB))
    port = server.sockets[0].getsockname()[1]
    try:
        assert await exchange(port, revoked_client) == DB
        ca.revoke([revoked_client.serial])
        holder.set_crl(crls(ca))
        await contexts.refresh(DB)
        with pytest.raises((ssl.SSLError, ConnectionError, asyncio.IncompleteReadError)):
            await exchange(port, revoked_client)
        assert await exchange(port, kept_client) == DB
    finally:
        server.close()
        await server.wait_closed()
    # the client side: a server whose certificate is now revoked is refused by a context made after the CRL
    revoked_server = svid(ca, DB)
    ca.revoke([revoked_server.serial])
    holder.set_crl(crls(ca))
    async with tls_server(revoked_server) as (port, _seen):
        async with asyncio.timeout(5):
            _reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=await contexts.client(WEB))
        try:
            with pytest.raises(PeerRevokedError, match="revoked"):
                peer_identity(writer.get_extra_info("ssl_object"))
        finally:
            writer.close()


async def _echo4(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Echo 4 bytes to a client whose leaf `peer_identity` accepts (as HboneServer checks it)."""
    try:
        peer_identity(writer.get_extra_info("ssl_object"))
        writer.write(await reader.readexactly(4))
        await writer.drain()
    except (PeerIdentityError, ConnectionError, asyncio.IncompleteReadError):
        pass
    finally:
        writer.close()


def _two_roots(tmp_path: Path) -> tuple[CertificateAuthority, CertificateAuthority]:
    """Two CAs (root and intermediate each) that trust each other's root: root rotation, or federation."""
    old = init_ca_dir(tmp_path / "old")
    new = init_ca_dir(tmp_path / "new")
    (new / TRUST_BUNDLE).write_bytes((old / "root-cert.pem").read_bytes())
    (old / TRUST_BUNDLE).write_bytes((new / "root-cert.pem").read_bytes())
    return CertificateAuthority.load(old), CertificateAuthority.load(new)


async def test_a_crl_of_one_ca_leaves_the_other_cas_peers_connecting(tmp_path: Path) -> None:
    """Review finding 4: with OpenSSL's CRL check, holding one CRL made every leaf of another intermediate
    fail ("unable to get certificate CRL"); now only the leaves that CRL lists are refused."""
    old_ca, new_ca = _two_roots(tmp_path)
    revoked = svid(old_ca, WEB)
    old_ca.revoke([revoked.serial])
    held = crls(old_ca)
    async with tls_server(svid(new_ca, DB, crl=held)) as (port, seen):
        assert await exchange(port, svid(new_ca, WEB)) == DB  # the other CA's leaf
        assert await exchange(port, svid(old_ca, WEB)) == DB  # an unlisted leaf of the CRL's CA
        with pytest.raises((ssl.SSLError, ConnectionError, asyncio.IncompleteReadError)):
            await exchange(port, revoked)
    assert seen == [WEB, WEB]
    # the client side: a server of the other CA is accepted by a client holding the first CA's CRL
    async with tls_server(svid(new_ca, DB)) as (port, _seen):
        assert await exchange(port, svid(old_ca, WEB, crl=held)) == DB


async def test_a_ca_with_the_same_names_is_not_touched_by_the_others_crl(tmp_path: Path) -> None:
    """Review finding 4, same-name variant: every `ca init` names its CAs alike, so OpenSSL took the first
    CA's CRL for the second's leaves (CRL signature failure) and names could not tell them apart."""
    first, second = _two_roots(tmp_path)
    assert first.signing_cert.subject == second.signing_cert.subject
    revoked = issue(first.directory, [WEB.uri])
    twin = issue(second.directory, [WEB.uri], serial=revoked.serial)  # same issuer name, same serial
    first.revoke([revoked.serial])
    async with tls_server(svid(first, DB, crl=crls(first, second))) as (port, seen):
        assert await exchange(port, dataclasses.replace(twin, roots_pem=second.roots_pem)) == DB
        with pytest.raises((ssl.SSLError, ConnectionError, asyncio.IncompleteReadError)):
            await exchange(port, dataclasses.replace(revoked, roots_pem=first.roots_pem))
    assert seen == [WEB]
