"""Revocation: how a CRL reaches every proxy, and what a proxy accepts as a CRL.

Distribution. In local mode (`--ca-dir`) the proxy reads `crl.pem` from the CA directory, which
`ztunnel ca revoke` rewrites. With a CA server (`--ca`) Istio's certificate API has no CRL, so the CA
server also serves `ztunnel.v1.RevocationService/GetRevocationList` (proto/revocation.proto) and the proxy
polls it over the same authenticated TLS channel it uses for certificates, sending the CRL number it holds
so an unchanged CRL costs a few bytes. Both sources are polled every few seconds by the certificate
manager; when the CA is unreachable the last good CRL stays in force.

Acceptance (`next_revocation_list`, sans-IO): a CRL is attacker-controlled input until verified. It must
be signed by a CA certificate that chains to the trust bundle. The proxy holds one CRL per signer key (a
`RevocationSet`): a CRL with a lower number than the one held from the same signer is a rollback and
refused, and a source cannot make a CRL go away by no longer sending it. When the CA's intermediate is
replaced, the CA keeps publishing the old intermediate's last CRL beside the new one's (`retired`), so
the old intermediate's revoked leaves stay refused until they expire.

Enforcement (the proxy, on every accepted change): the revocations travel with the TLS contexts and
`tls.peer_identity` refuses a listed peer leaf right after the handshake, on both sides; OpenSSL's own CRL
check is not used because it demands a CRL for every issuer, which refuses every peer of an intermediate
that has revoked nothing (and we cannot sign one for another CA). Open HBONE connections whose peer leaf
is now revoked are closed.
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

LOADED = "loaded"
UNCHANGED = "unchanged"
REJECTED = "rejected"
ERROR = "error"  # the source could not be asked (CA unreachable, unreadable file)


class RevocationError(ZtunnelError):
    """A CRL (or the chain of its signer) that must not be used; the text says why."""


@dataclass(frozen=True)
class RevocationList:
    """A CRL whose signature was checked against the trust bundle: one signer's revocations."""

    number: int
    issuer: x509.Name
    signer_key: bytes  # the signer's public key (DER): CRLs are told apart, and numbers compared, by it
    serials: frozenset[int]
    signer: x509.Certificate = field(repr=False, compare=False)
    pem: bytes = field(repr=False)

    def revokes(self, cert: x509.Certificate) -> bool:
        """True when `cert` (a peer leaf) is listed here and was signed by this CRL's signer.

        Matched by the signer's key, not its name: every `ztunnel ca init` names its intermediate alike, so
        two CAs (federated meshes, a replaced intermediate) share issuer names. The signature check runs
        only for a listed serial, so an unlisted leaf costs one set lookup.
        """
        if cert.serial_number not in self.serials:
            return False
        try:
            cert.verify_directly_issued_by(self.signer)
        except (ValueError, TypeError, InvalidSignature):
            return False
        return True


@dataclass(frozen=True)
class RevocationSet:
    """Every CRL in force, at most one per signer key, and the source's CRL number as of its last answer.

    A peer whose issuer has no CRL here is not revoked (there is nothing to check it against); a CRL is never
    dropped because the source stops sending it, only when its signer has expired (its leaves are then
    refused by the chain check anyway).
    """

    lists: tuple[RevocationList, ...] = ()
    number: int = 0  # what the source called its current CRL: sent back so an unchanged answer costs nothing
    serials: frozenset[int] = field(default=frozenset(), init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "serials", frozenset().union(*(crl.serials for crl in self.lists)))

    def __bool__(self) -> bool:
        return bool(self.lists)

    def revokes(self, cert: x509.Certificate) -> bool:
        """True when a CRL of the leaf's own signer lists it."""
        if cert.serial_number not in self.serials:
            return False
        return any(crl.revokes(cert) for crl in self.lists)

    def signer(self, signer_key: bytes) -> RevocationList | None:
        return next((crl for crl in self.lists if crl.signer_key == signer_key), None)


NO_REVOCATIONS = RevocationSet()


@dataclass(frozen=True)
class SignedRevocationList:
    """One CRL as a source publishes it: the CRL (DER or PEM) and the PEM chain of its signer."""

    crl: bytes
    issuer_chain: tuple[bytes, ...] = ()


@dataclass(frozen=True)
class RevocationAnswer:
    """What a CRL source answered: the current signer's CRL (DER or PEM; empty: none, or unchanged), its
    number, the signer chain, and the last CRLs of replaced signers whose leaves may still be in use."""

    crl: bytes
    number: int
    issuer_chain: tuple[bytes, ...] = ()
    retired: tuple[SignedRevocationList, ...] = ()


@dataclass(frozen=True)
class RevocationUpdate:
    """The outcome of one poll: LOADED, UNCHANGED, REJECTED or ERROR (with `reason`); `current` is in force."""

    result: str
    current: RevocationSet
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


def _certificates(pem: bytes) -> list[x509.Certificate]:
    """Every certificate of a PEM bundle; none for an empty one."""
    return x509.load_pem_x509_certificates(pem) if b"-----BEGIN" in pem else []


def verified_signer(
    issuer_chain: Sequence[bytes], roots_pem: bytes, *, now: dt.datetime | None = None
) -> x509.Certificate:
    """The first certificate of `issuer_chain`, once the chain is checked against the trust bundle."""
    now = now or dt.datetime.now(dt.UTC)
    try:
        chain = [cert for c in issuer_chain for cert in _certificates(c)]
        roots = _certificates(roots_pem)
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
        signer=signer,
        pem=crl.public_bytes(serialization.Encoding.PEM),
    )


def next_revocation_list(
    current: RevocationSet, answer: RevocationAnswer, roots_pem: bytes, *, now: dt.datetime | None = None
) -> RevocationUpdate:
    """Decide what one answer of a CRL source does to the CRLs held (no I/O: the manager acts on the result).

    Each CRL offered is verified on its own and replaces the one held from the same signer key only when its
    number is higher; a refused one leaves the rest of the answer usable. CRLs of signers the answer does
    not mention stay (a replaced intermediate's leaves are still valid until they expire).
    """
    now = now or dt.datetime.now(dt.UTC)
    kept = tuple(crl for crl in current.lists if crl.signer.not_valid_after_utc >= now)
    changed = len(kept) != len(current.lists)
    if not answer.crl and not answer.retired:  # "you hold the current one", or the source publishes none
        if changed or answer.number != current.number:
            return RevocationUpdate(LOADED if changed else UNCHANGED, RevocationSet(kept, answer.number))
        return RevocationUpdate(UNCHANGED, current)
    by_signer = {crl.signer_key: crl for crl in kept}
    problems: list[str] = []
    main_refused = False
    offered = ((SignedRevocationList(answer.crl, answer.issuer_chain),) if answer.crl else ()) + answer.retired
    for i, signed in enumerate(offered):
        try:
            fresh = verify_revocation_list(signed.crl, signed.issuer_chain, roots_pem, now=now)
        except RevocationError as e:
            problems.append(str(e))
            main_refused = main_refused or (i == 0 and bool(answer.crl))
            continue
        held = by_signer.get(fresh.signer_key)
        if held is not None and fresh.number < held.number:
            problems.append(f"CRL number {fresh.number} is lower than the {held.number} held (rollback)")
            main_refused = main_refused or (i == 0 and bool(answer.crl))
            continue
        if held is None or fresh.number > held.number:
            by_signer[fresh.signer_key] = fresh
            changed = True
    # A refused current CRL keeps the old number, so the source sends it again (and we say so again).
    number = current.number if main_refused else answer.number
    reason = "; ".join(problems)
    if changed:
        return RevocationUpdate(LOADED, RevocationSet(tuple(by_signer.values()), number), reason)
    held_set = current if number == current.number else RevocationSet(current.lists, number)
    return RevocationUpdate(REJECTED if problems else UNCHANGED, held_set, reason)


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


__all__ = [
    "ERROR",
    "LOADED",
    "NO_REVOCATIONS",
    "REJECTED",
    "UNCHANGED",
    "RevocationAnswer",
    "RevocationError",
    "RevocationList",
    "RevocationSet",
    "RevocationUpdate",
    "SignedRevocationList",
    "next_revocation_list",
    "verified_signer",
    "verify_revocation_list",
]
