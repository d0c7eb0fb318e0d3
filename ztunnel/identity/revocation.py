"""Revocation: how a CRL reaches every proxy, and what a proxy accepts as a CRL.

Distribution. In local mode (`--ca-dir`) the proxy reads `crl.pem` from the CA directory, which
`ztunnel ca revoke` rewrites. With a CA server (`--ca`) Istio's certificate API has no CRL, so the CA
server also serves `ztunnel.v1.RevocationService/GetRevocationList` (proto/revocation.proto) and the proxy
polls it over the same authenticated TLS channel it uses for certificates, sending the CRL number it holds
so an unchanged CRL costs a few bytes. Both sources are polled every few seconds by the certificate
manager; when the CA is unreachable the last good CRL stays in force.

Acceptance (`next_revocation_list`, sans-IO): a CRL is attacker-controlled input until verified. It must
be signed by a CA certificate that chains to the trust bundle, and a CRL from the same signer with a lower
number than the one held is a rollback and refused, as is an answer that would drop the CRL held while the
signer is unchanged. A CRL from a new signer (the CA's intermediate was replaced) starts its own numbering.

Enforcement (the proxy, on every accepted change): TLS contexts are rebuilt with the new CRL (OpenSSL
cannot remove a CRL from a store) and open HBONE connections whose peer leaf is now revoked are closed.
"""

from __future__ import annotations

import datetime as dt
import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

from ztunnel.errors import ZtunnelError
from ztunnel.identity.certs import split_pem_chain

LOADED = "loaded"
UNCHANGED = "unchanged"
CLEARED = "cleared"
REJECTED = "rejected"
ERROR = "error"  # the source could not be asked (CA unreachable, unreadable file)


class RevocationError(ZtunnelError):
    """A CRL (or the chain of its signer) that must not be used; the text says why."""


@dataclass(frozen=True)
class RevocationList:
    """A CRL whose signature was checked against the trust bundle: what the proxy enforces."""

    number: int
    issuer: x509.Name
    signer_key: bytes  # the signer's public key (DER): numbers are compared per signer only
    serials: frozenset[int]
    pem: bytes = field(repr=False)  # what OpenSSL loads into the TLS contexts

    def revokes(self, cert: x509.Certificate) -> bool:
        """True when `cert` (a peer leaf) is on this list: same issuer, listed serial."""
        return cert.serial_number in self.serials and cert.issuer == self.issuer


@dataclass(frozen=True)
class RevocationAnswer:
    """What a CRL source answered: the CRL (DER or PEM; empty: none, or unchanged), its number, the signer chain."""

    crl: bytes
    number: int
    issuer_chain: tuple[bytes, ...] = ()


@dataclass(frozen=True)
class RevocationUpdate:
    """The outcome of one poll: LOADED, UNCHANGED, CLEARED, REJECTED or ERROR (with `reason`); `current` is in force."""

    result: str
    current: RevocationList | None
    reason: str = ""


def _load_crl(data: bytes) -> x509.CertificateRevocationList:
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            return x509.load_pem_x509_crl(data)
        return x509.load_der_x509_crl(data)
    except ValueError as e:
        raise RevocationError(f"the CRL does not parse ({_first_line(e)})") from e


def _public_key_der(cert: x509.Certificate) -> bytes:
    return cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _check_signer_chain(chain: Sequence[x509.Certificate], roots: Sequence[x509.Certificate], now: dt.datetime) -> None:
    """Each certificate issued by the next, all CAs valid now, and the last a root or issued by one."""
    for cert in chain:
        if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
            raise RevocationError(f"CRL signer chain: {cert.subject.rfc4514_string()!r} is not valid now")
        try:
            bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        except x509.ExtensionNotFound:
            bc = None
        if bc is None or not bc.ca:
            raise RevocationError(f"CRL signer chain: {cert.subject.rfc4514_string()!r} is not a CA certificate")
    for child, parent in itertools.pairwise(chain):
        try:
            child.verify_directly_issued_by(parent)
        except (ValueError, TypeError, InvalidSignature) as e:
            raise RevocationError(
                f"CRL signer chain: {child.subject.rfc4514_string()!r} is not issued by the next certificate"
            ) from e
    last = chain[-1]
    if last in roots:
        return
    for root in roots:
        try:
            last.verify_directly_issued_by(root)
        except (ValueError, TypeError, InvalidSignature):
            continue
        return
    raise RevocationError("the CRL's signer does not chain to the trust bundle")


def verified_signer(
    issuer_chain: Sequence[bytes], roots_pem: bytes, *, now: dt.datetime | None = None
) -> x509.Certificate:
    """The first certificate of `issuer_chain`, once the chain is checked against the trust bundle."""
    now = now or dt.datetime.now(dt.UTC)
    try:
        chain = [x509.load_pem_x509_certificate(p) for c in issuer_chain for p in split_pem_chain(c)]
        roots = [x509.load_pem_x509_certificate(p) for p in split_pem_chain(roots_pem)]
    except ValueError as e:
        raise RevocationError(
            f"the CRL signer chain or trust bundle holds a broken certificate ({_first_line(e)})"
        ) from e
    if not chain:
        raise RevocationError("no signer chain came with the CRL: it cannot be verified")
    if not roots:
        raise RevocationError("no trust bundle to verify the CRL with")
    _check_signer_chain(chain, roots, now)
    return chain[0]


def verify_revocation_list(
    crl_data: bytes, issuer_chain: Sequence[bytes], roots_pem: bytes, *, now: dt.datetime | None = None
) -> RevocationList:
    """Parse a CRL and check it: signed by issuer_chain[0], which chains to a root of `roots_pem`.

    Raises RevocationError saying what is wrong; never returns an unverified list.
    """
    now = now or dt.datetime.now(dt.UTC)
    crl = _load_crl(crl_data)
    signer = verified_signer(issuer_chain, roots_pem, now=now)
    if crl.issuer != signer.subject:
        raise RevocationError(
            f"the CRL's issuer {crl.issuer.rfc4514_string()!r} is not its signer {signer.subject.rfc4514_string()!r}"
        )
    try:
        usage = signer.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        usage = None
    if usage is not None and not usage.crl_sign:
        raise RevocationError(f"{signer.subject.rfc4514_string()!r} may not sign CRLs (keyUsage lacks cRLSign)")
    if not crl.is_signature_valid(signer.public_key()):  # type: ignore[arg-type]
        raise RevocationError("the CRL's signature does not verify with its signer's key")
    if crl.next_update_utc is not None and crl.next_update_utc < now:
        raise RevocationError(
            f"the CRL expired at {crl.next_update_utc.isoformat()} (nextUpdate); the CA must re-sign it"
        )
    try:
        number = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    except x509.ExtensionNotFound:
        raise RevocationError("the CRL has no CRL number: rollbacks could not be detected") from None
    return RevocationList(
        number=number,
        issuer=crl.issuer,
        signer_key=_public_key_der(signer),
        serials=frozenset(r.serial_number for r in crl),
        pem=crl.public_bytes(serialization.Encoding.PEM),
    )


def next_revocation_list(
    current: RevocationList | None, answer: RevocationAnswer, roots_pem: bytes, *, now: dt.datetime | None = None
) -> RevocationUpdate:
    """Decide what one answer of a CRL source does to the CRL held (no I/O: the manager acts on the result)."""
    if not answer.crl:
        if current is None:
            return RevocationUpdate(UNCHANGED, None)
        if answer.number and answer.number == current.number:
            return RevocationUpdate(UNCHANGED, current)  # "you have the current one"
        try:
            signer = _public_key_der(verified_signer(answer.issuer_chain, roots_pem, now=now))
        except RevocationError:
            signer = None
        if signer is not None and signer != current.signer_key:
            return RevocationUpdate(CLEARED, None)  # a new CA intermediate (checked), which has revoked nothing yet
        return RevocationUpdate(
            REJECTED,
            current,
            f"the CA publishes no CRL any more (number {answer.number}) while CRL {current.number} is held: "
            "refused as a rollback; restart the proxy if the CA was re-created",
        )
    try:
        fresh = verify_revocation_list(answer.crl, answer.issuer_chain, roots_pem, now=now)
    except RevocationError as e:
        return RevocationUpdate(REJECTED, current, str(e))
    if current is not None and fresh.signer_key == current.signer_key:
        if fresh.number < current.number:
            return RevocationUpdate(
                REJECTED, current, f"CRL number {fresh.number} is lower than the {current.number} held (rollback)"
            )
        if fresh.number == current.number:
            return RevocationUpdate(UNCHANGED, current)
    return RevocationUpdate(LOADED, fresh)


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


__all__ = [
    "CLEARED",
    "ERROR",
    "LOADED",
    "REJECTED",
    "UNCHANGED",
    "RevocationAnswer",
    "RevocationError",
    "RevocationList",
    "RevocationUpdate",
    "next_revocation_list",
    "verified_signer",
    "verify_revocation_list",
]
