"""TLS contexts for HBONE: TLS 1.3 only, ALPN h2, certificates required on both sides.

Keys are handed to OpenSSL through an anonymous memfd so they never touch a filesystem.
"""

from __future__ import annotations

import functools
import os
import ssl
from collections.abc import Iterable

from cryptography import x509

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
    """The SPIFFE id of the verified peer leaf, which must be an X.509-SVID (see `svid_identity`)."""
    der = ssl_object.getpeercert(binary_form=True)
    if not der:
        raise PeerIdentityError("the peer presented no certificate")
    return svid_identity(der)


def _quoted(text: str, limit: int = 256) -> str:
    """A peer's string in an error message: repr'd, clipped, with its length when clipped."""
    return repr(text) if len(text) <= limit else f"{text[:limit]!r}... ({len(text)} chars)"


@functools.lru_cache(maxsize=1024)
def svid_identity(der: bytes) -> SpiffeId:
    """The SPIFFE id of a DER leaf certificate, refusing what the X.509-SVID spec forbids in a leaf.

    Exactly one URI SAN, a spiffe:// one (a second one would make "the" identity a matter of order), and no
    CA powers: basicConstraints CA:TRUE, keyUsage keyCertSign or cRLSign (SPIFFE X.509-SVID §4.1, §4.3).
    OpenSSL checks the chain but accepts any of these in a leaf. Cached by the DER bytes: peers present the
    same leaf on every connection; failures are not cached (lru_cache keeps only returned values).
    """
    try:
        cert = x509.load_der_x509_certificate(der)
        extensions = cert.extensions
    except (ValueError, x509.DuplicateExtension, x509.UnsupportedGeneralNameType) as e:
        raise PeerIdentityError(f"the peer certificate cannot be parsed: {e}") from None
    try:
        constraints = extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        constraints = None
    if constraints is not None and constraints.ca:
        raise PeerIdentityError("the peer certificate is a CA certificate (basicConstraints CA:TRUE), not an SVID")
    try:
        usage = extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        usage = None
    if usage is not None and (usage.key_cert_sign or usage.crl_sign):
        raise PeerIdentityError("the peer certificate may sign certificates or CRLs (keyUsage), not an SVID")
    try:
        uris = extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
            x509.UniformResourceIdentifier
        )
    except x509.ExtensionNotFound:
        uris = []
    if len(uris) != 1:
        shown = ", ".join(_quoted(u, 128) for u in uris[:3]) + (", ..." if len(uris) > 3 else "")
        raise PeerIdentityError(
            "the peer certificate has no spiffe:// URI SAN"
            if not uris
            else f"the peer certificate has {len(uris)} URI SANs ({shown}); an SVID has exactly one"
        )
    if not uris[0].startswith("spiffe://"):
        raise PeerIdentityError(f"the peer certificate's URI SAN {_quoted(uris[0])} is not a spiffe:// id")
    try:
        return SpiffeId.parse(uris[0])
    except SpiffeIdError:
        raise PeerIdentityError(
            f"the peer certificate's URI SAN {_quoted(uris[0])} is not a workload id "
            "(spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>)"
        ) from None


def check_secure_naming(actual: SpiffeId, expected: Iterable[str]) -> None:
    """Client side: the server must be one of the identities expected for the destination."""
    allowed = set(expected)
    if actual.uri not in allowed:
        raise PeerIdentityError(
            f"server identity {actual} is not one of the identities expected for the destination "
            f"({', '.join(sorted(allowed)) or 'none'})"
        )
