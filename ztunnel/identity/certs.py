"""Workload certificates (X.509 SVIDs) and the keys and CSRs made for them on the node.

The private key lives only in memory: it is generated here, never sent anywhere and never written to
persistent disk (TLS contexts load it through an anonymous memfd, see `ztunnel.identity.tls`).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Protocol

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from ztunnel.identity.spiffe import SpiffeId

if TYPE_CHECKING:  # revocation imports this module
    from ztunnel.identity.revocation import RevocationSet


def generate_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def key_to_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def make_csr(key: ec.EllipticCurvePrivateKey, identity: SpiffeId) -> bytes:
    """A CSR with the SPIFFE id as its only URI SAN and an empty subject."""
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(identity.uri)]), critical=True)
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM)


def uri_sans(cert: x509.Certificate) -> list[str]:
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return []
    return ext.value.get_values_for_type(x509.UniformResourceIdentifier)


def split_pem_chain(pem: bytes | str) -> list[bytes]:
    """Split concatenated PEM certificates into one PEM block each."""
    data = pem.encode() if isinstance(pem, str) else pem
    marker = b"-----END CERTIFICATE-----"
    out = []
    for part in data.split(marker):
        start = part.find(b"-----BEGIN CERTIFICATE-----")
        if start >= 0:
            out.append(part[start:] + marker + b"\n")
    return out


@dataclass(frozen=True)
class WorkloadCertificate:
    """An SVID in hand: key, chain (leaf first, root last) and the trust bundle to verify peers."""

    identity: SpiffeId
    key_pem: bytes = field(repr=False)
    chain_pem: tuple[bytes, ...]
    roots_pem: bytes
    revocations: RevocationSet | None = None  # the CRLs in force when it was handed out (None: none held)

    @cached_property
    def leaf(self) -> x509.Certificate:
        """Parsed once per object: `get()` checks expiry on every connection."""
        return x509.load_pem_x509_certificate(self.chain_pem[0])

    @property
    def not_before(self) -> dt.datetime:
        return self.leaf.not_valid_before_utc

    @property
    def not_after(self) -> dt.datetime:
        return self.leaf.not_valid_after_utc

    @property
    def serial(self) -> int:
        return self.leaf.serial_number

    def cert_chain_without_root(self) -> bytes:
        """What a TLS endpoint presents: leaf and intermediates (the peer already has the root)."""
        chain = list(self.chain_pem)
        if len(chain) > 1:
            chain = chain[:-1]
        return b"".join(chain)


class CertificateProvider(Protocol):
    """What the data plane needs from identity: a valid SVID for a local workload identity.

    `CertificateManager` (ztunnel.identity.manager) implements it; tests may use any object with this shape.
    """

    async def get(self, identity: SpiffeId) -> WorkloadCertificate: ...
