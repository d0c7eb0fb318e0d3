"""TLS contexts for HBONE: TLS 1.3 only, ALPN h2, certificates required on both sides.

Keys are handed to OpenSSL through an anonymous memfd so they never touch a filesystem.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Iterable

from ztunnel.errors import ZtunnelError
from ztunnel.identity.certs import WorkloadCertificate
from ztunnel.identity.spiffe import SpiffeId, SpiffeIdError


class PeerIdentityError(ZtunnelError):
    """The peer's certificate does not carry the identity we need (secure naming, trust domain)."""


def _load_chain_from_memory(ctx: ssl.SSLContext, cert: WorkloadCertificate) -> None:
    fd = os.memfd_create("svid", os.MFD_CLOEXEC)
    try:
        os.write(fd, cert.cert_chain_without_root() + cert.key_pem)
        ctx.load_cert_chain(f"/proc/self/fd/{fd}")
    finally:
        os.close(fd)


def _load_crl_from_memory(ctx: ssl.SSLContext, crl_pem: bytes) -> None:
    """`cadata` takes certificates only; a CRL must come through a file, so hand OpenSSL a memfd."""
    fd = os.memfd_create("crl", os.MFD_CLOEXEC)
    try:
        os.write(fd, crl_pem)
        ctx.load_verify_locations(cafile=f"/proc/self/fd/{fd}")
    finally:
        os.close(fd)


def _base_context(purpose: ssl.Purpose, cert: WorkloadCertificate) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if purpose is ssl.Purpose.CLIENT_AUTH else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.set_alpn_protocols(["h2"])
    ctx.check_hostname = False  # SPIFFE ids are URI SANs; we check them ourselves after the handshake
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cadata=cert.roots_pem.decode())
    if cert.crl_pem:
        # The CRL must be signed by the leaf's issuer (our intermediate). With it loaded OpenSSL requires a
        # CRL for every peer leaf's issuer, so a peer from another intermediate fails until its CRL is added.
        _load_crl_from_memory(ctx, cert.crl_pem)
        ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    _load_chain_from_memory(ctx, cert)
    return ctx


def server_context(cert: WorkloadCertificate) -> ssl.SSLContext:
    return _base_context(ssl.Purpose.CLIENT_AUTH, cert)


def client_context(cert: WorkloadCertificate) -> ssl.SSLContext:
    return _base_context(ssl.Purpose.SERVER_AUTH, cert)


def peer_identity(ssl_object: ssl.SSLObject | ssl.SSLSocket) -> SpiffeId:
    """The first spiffe:// URI SAN of the verified peer certificate."""
    peer = ssl_object.getpeercert()
    if not peer:
        raise PeerIdentityError("the peer presented no certificate")
    for kind, value in peer.get("subjectAltName", ()):
        if kind == "URI" and value.startswith("spiffe://"):
            try:
                return SpiffeId.parse(value)
            except SpiffeIdError as e:
                raise PeerIdentityError(str(e)) from e
    raise PeerIdentityError("the peer certificate has no spiffe:// URI SAN")


def check_secure_naming(actual: SpiffeId, expected: Iterable[str]) -> None:
    """Client side: the server must be one of the identities expected for the destination."""
    allowed = set(expected)
    if actual.uri not in allowed:
        raise PeerIdentityError(
            f"server identity {actual} is not one of the identities expected for the destination "
            f"({', '.join(sorted(allowed)) or 'none'})"
        )
