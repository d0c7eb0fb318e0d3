"""TLS contexts for HBONE: TLS 1.3 only, ALPN h2, certificates required on both sides.

Keys are handed to OpenSSL through an anonymous memfd so they never touch a filesystem. Revocation is
checked by `peer_identity` right after the handshake, against the CRLs the context carries, not by
OpenSSL: its CRL check demands a CRL for every issuer, so holding one CRL would refuse every peer of
another intermediate or root (ztunnel.identity.revocation).
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import os
import socket
import ssl
from collections.abc import Iterable

from cryptography import x509

from ztunnel.errors import ZtunnelError
from ztunnel.identity.certs import WorkloadCertificate
from ztunnel.identity.revocation import NO_REVOCATIONS, RevocationSet
from ztunnel.identity.spiffe import SpiffeId, SpiffeIdError


class PeerIdentityError(ZtunnelError):
    """The peer's certificate does not carry the identity we need (secure naming, trust domain)."""


class PeerRevokedError(PeerIdentityError):
    """The peer's certificate is on a CRL of its own issuer."""


class HboneContext(ssl.SSLContext):
    """An SSLContext that also carries the revocations its handshakes' peers are checked against."""

    revocations: RevocationSet = NO_REVOCATIONS


def _load_chain_from_memory(ctx: ssl.SSLContext, cert: WorkloadCertificate) -> None:
    fd = os.memfd_create("svid", os.MFD_CLOEXEC)
    try:
        os.write(fd, cert.cert_chain_without_root() + cert.key_pem)
        ctx.load_cert_chain(f"/proc/self/fd/{fd}")
    finally:
        os.close(fd)


def _base_context(purpose: ssl.Purpose, cert: WorkloadCertificate) -> HboneContext:
    ctx = HboneContext(ssl.PROTOCOL_TLS_SERVER if purpose is ssl.Purpose.CLIENT_AUTH else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.set_alpn_protocols(["h2"])
    ctx.check_hostname = False  # SPIFFE ids are URI SANs; we check them ourselves after the handshake
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cadata=cert.roots_pem.decode())
    if cert.revocations is not None:
        ctx.revocations = cert.revocations
    _load_chain_from_memory(ctx, cert)
    return ctx


def server_context(cert: WorkloadCertificate) -> HboneContext:
    ctx = _base_context(ssl.Purpose.CLIENT_AUTH, cert)
    ctx.sslobject_class = AlertingSSLObject
    return ctx


def client_context(cert: WorkloadCertificate) -> HboneContext:
    return _base_context(ssl.Purpose.SERVER_AUTH, cert)


def peer_identity(ssl_object: ssl.SSLObject | ssl.SSLSocket) -> SpiffeId:
    """The SPIFFE id of the verified peer leaf, which must be an X.509-SVID (see `svid_identity`) and not
    revoked by a CRL of its issuer that the connection's context carries (`HboneContext.revocations`)."""
    der = ssl_object.getpeercert(binary_form=True)
    if not der:
        raise PeerIdentityError("the peer presented no certificate")
    identity, leaf = _svid(der)
    revocations = getattr(ssl_object.context, "revocations", NO_REVOCATIONS)
    if leaf.serial_number in revocations.serials and revocations.revokes(leaf):
        raise PeerRevokedError(
            f"the peer certificate of {identity} (serial {leaf.serial_number:x}) is revoked by its issuer's CRL"
        )
    return identity


def _quoted(text: str, limit: int = 256) -> str:
    """A peer's string in an error message: repr'd, clipped, with its length when clipped."""
    return repr(text) if len(text) <= limit else f"{text[:limit]!r}... ({len(text)} chars)"


def svid_identity(der: bytes) -> SpiffeId:
    """The SPIFFE id of a DER leaf certificate, refusing what the X.509-SVID spec forbids in a leaf."""
    return _svid(der)[0]


@functools.lru_cache(maxsize=1024)
def _svid(der: bytes) -> tuple[SpiffeId, x509.Certificate]:
    """The SPIFFE id and the parsed leaf of a DER leaf certificate (see `svid_identity`).

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
        return SpiffeId.parse(uris[0]), cert
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


class HandshakeWatch:
    """One accepted connection's server-side handshake, as `AlertingSSLObject` sees it: the fatal error
    OpenSSL raised (with its reason) and the socket to end once OpenSSL's alert has gone out."""

    __slots__ = ("error", "loop", "sock")

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
        self.loop = loop
        self.sock = sock
        self.error: ssl.SSLError | None = None

    def end(self) -> None:
        """Send FIN after the alert: the client reads both and closes, and so do we, having read what it
        sent (closing with unread input would send a reset, which can reach the client before the alert)."""
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # already gone


# Set by the accepting task for the handshake it runs: the transport's callbacks (and so the SSLObject's
# do_handshake) run in a copy of that task's context, which is how the SSLObject finds its connection.
HANDSHAKE_WATCH: contextvars.ContextVar[HandshakeWatch | None] = contextvars.ContextVar(
    "ztunnel_handshake_watch", default=None
)


class AlertingSSLObject(ssl.SSLObject):
    """Server side: a failed handshake sends OpenSSL's alert ("certificate expired", "unknown ca"...) before
    the connection closes.

    asyncio's and uvloop's TLS transports close the socket as soon as do_handshake raises, dropping the alert
    OpenSSL has just written to the outgoing buffer: the client sees a bare EOF and no reason. Reporting the
    failure once as "want read" makes the transport send that buffer; the watch keeps the real error and
    ends our sending side on the next loop iteration. The connection closes when the client does (or sends
    more, which raises the error again), at the latest at the handshake timeout. Without a watch (a context
    used outside `HboneServer`) nothing changes.
    """

    def do_handshake(self) -> None:
        try:
            super().do_handshake()
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError, ssl.SSLSyscallError):
            raise
        except ssl.SSLError as e:
            watch = HANDSHAKE_WATCH.get()
            if watch is None or watch.error is not None:
                raise
            watch.error = e
            watch.loop.call_soon(watch.end)
            raise ssl.SSLWantReadError("handshake failed; sending the alert") from e


# Why a server-side handshake failed: the `reason` label of ztunnel_hbone_handshake_failures_total.
_VERIFY_REASONS = {
    9: "not_yet_valid",  # X509_V_ERR_CERT_NOT_YET_VALID
    10: "expired",  # X509_V_ERR_CERT_HAS_EXPIRED
    18: "self_signed",  # X509_V_ERR_DEPTH_ZERO_SELF_SIGNED_CERT
    19: "self_signed",  # X509_V_ERR_SELF_SIGNED_CERT_IN_CHAIN
    2: "untrusted",  # X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT
    20: "untrusted",  # X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY
    21: "untrusted",  # X509_V_ERR_UNABLE_TO_VERIFY_LEAF_SIGNATURE
    23: "revoked",  # X509_V_ERR_CERT_REVOKED
}
HANDSHAKE_FAILURE_REASONS = (
    "expired",
    "not_yet_valid",
    "self_signed",
    "untrusted",
    "revoked",
    "bad_certificate",
    "no_certificate",
    "peer_alert",
    "protocol",
    "timeout",
    "closed",
    "overload",  # dropped unfinished: the server had too many handshakes in progress (hbone/server.py)
)


def handshake_failure_reason(error: BaseException) -> str:
    """Classify a server-side handshake failure into one of HANDSHAKE_FAILURE_REASONS."""
    if isinstance(error, ssl.SSLCertVerificationError):
        return _VERIFY_REASONS.get(error.verify_code, "bad_certificate")
    if isinstance(error, ssl.SSLError):
        reason = error.reason or ""
        if reason == "PEER_DID_NOT_RETURN_A_CERTIFICATE":
            return "no_certificate"
        if "ALERT" in reason:  # the client refused us (e.g. TLSV1_ALERT_UNKNOWN_CA)
            return "peer_alert"
        return "protocol"
    if isinstance(error, (TimeoutError, ConnectionAbortedError)):  # uvloop's handshake timeout is the latter
        return "timeout"
    return "closed"
