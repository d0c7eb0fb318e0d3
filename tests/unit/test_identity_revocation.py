"""What a proxy accepts as a CRL: signed by a CA of the trust bundle, never a rollback, never unverified."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from ztunnel.identity.ca import CertificateAuthority, init_ca_dir
from ztunnel.identity.certs import generate_key
from ztunnel.identity.revocation import (
    CLEARED,
    LOADED,
    REJECTED,
    UNCHANGED,
    RevocationAnswer,
    RevocationError,
    next_revocation_list,
    verify_revocation_list,
)


@pytest.fixture
def ca(tmp_path: Path) -> CertificateAuthority:
    init_ca_dir(tmp_path / "ca")
    return CertificateAuthority.load(tmp_path / "ca")


@pytest.fixture
def other(tmp_path: Path) -> CertificateAuthority:
    """Another CA with the same names (ztunnel root CA / intermediate CA), so only keys tell them apart."""
    init_ca_dir(tmp_path / "other")
    return CertificateAuthority.load(tmp_path / "other")


def answer(ca: CertificateAuthority, serials: list[int] | None = None) -> RevocationAnswer:
    if serials:
        ca.revoke(serials)
    der, number = ca.published_crl()
    return RevocationAnswer(der, number, tuple(ca.chain_pem))


def test_a_crl_of_the_trusted_ca_is_verified_and_read(ca: CertificateAuthority) -> None:
    crl = verify_revocation_list(answer(ca, [7, 9]).crl, ca.chain_pem, ca.roots_pem)
    assert crl.number == 1 and crl.serials == {7, 9}
    assert crl.pem.startswith(b"-----BEGIN X509 CRL-----")
    assert verify_revocation_list(ca.crl_pem(), ca.chain_pem, ca.roots_pem) == crl  # PEM works too


def test_a_crl_from_a_ca_outside_the_trust_bundle_is_refused(
    ca: CertificateAuthority, other: CertificateAuthority
) -> None:
    forged = answer(other, [7])
    with pytest.raises(RevocationError, match="does not chain to the trust bundle"):
        verify_revocation_list(forged.crl, forged.issuer_chain, ca.roots_pem)
    # the other CA's CRL presented with our chain: same issuer name, wrong key
    with pytest.raises(RevocationError, match="signature does not verify"):
        verify_revocation_list(forged.crl, ca.chain_pem, ca.roots_pem)


def test_a_tampered_or_unsigned_crl_is_refused(ca: CertificateAuthority) -> None:
    der = bytearray(answer(ca, [7]).crl)
    der[-10] ^= 0x01  # inside the signature
    with pytest.raises(RevocationError):
        verify_revocation_list(bytes(der), ca.chain_pem, ca.roots_pem)
    with pytest.raises(RevocationError, match="does not parse"):
        verify_revocation_list(b"\x30\x03garbage", ca.chain_pem, ca.roots_pem)
    with pytest.raises(RevocationError, match="no signer chain"):
        verify_revocation_list(ca.crl_pem(), [], ca.roots_pem)


def test_an_expired_crl_is_refused(ca: CertificateAuthority) -> None:
    now = dt.datetime.now(dt.UTC)
    crl = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.signing_cert.subject)
        .last_update(now - dt.timedelta(days=2))
        .next_update(now - dt.timedelta(days=1))
        .add_extension(x509.CRLNumber(5), critical=False)
        .sign(ca.signing_key, hashes.SHA256())
    )
    with pytest.raises(RevocationError, match="expired"):
        verify_revocation_list(crl.public_bytes(serialization.Encoding.DER), ca.chain_pem, ca.roots_pem)


def test_a_signer_that_is_not_a_ca_is_refused(ca: CertificateAuthority) -> None:
    key = generate_key()
    leaf_pem = ca.issue_server_cert(key.public_key(), dns_names=["ca.example"], ip_addresses=[])[0]
    leaf = x509.load_pem_x509_certificate(leaf_pem)
    now = dt.datetime.now(dt.UTC)
    crl = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(leaf.subject)
        .last_update(now)
        .next_update(now + dt.timedelta(days=1))
        .add_extension(x509.CRLNumber(5), critical=False)
        .sign(key, hashes.SHA256())
    )
    with pytest.raises(RevocationError, match="not a CA certificate"):
        verify_revocation_list(crl.public_bytes(serialization.Encoding.DER), [leaf_pem, *ca.chain_pem], ca.roots_pem)


def test_newer_loads_same_is_unchanged_older_is_a_rollback(ca: CertificateAuthority) -> None:
    first = answer(ca, [7])
    second = answer(ca, [9])
    held = next_revocation_list(None, second, ca.roots_pem)
    assert held.result == LOADED and held.current is not None and held.current.number == 2
    rollback = next_revocation_list(held.current, first, ca.roots_pem)
    assert rollback.result == REJECTED and rollback.current is held.current and "rollback" in rollback.reason
    assert next_revocation_list(held.current, second, ca.roots_pem).result == UNCHANGED
    not_modified = RevocationAnswer(b"", 2, second.issuer_chain)  # the CA's "you hold the current one"
    assert next_revocation_list(held.current, not_modified, ca.roots_pem).result == UNCHANGED
    third = answer(ca, [11])
    assert next_revocation_list(held.current, third, ca.roots_pem).current.serials == {7, 9, 11}  # type: ignore[union-attr]


def test_a_bad_answer_keeps_the_crl_in_force(ca: CertificateAuthority, other: CertificateAuthority) -> None:
    held = next_revocation_list(None, answer(ca, [7]), ca.roots_pem).current
    forged = next_revocation_list(held, answer(other, [8]), ca.roots_pem)
    assert forged.result == REJECTED and forged.current is held
    gone = next_revocation_list(held, RevocationAnswer(b"", 0, tuple(ca.chain_pem)), ca.roots_pem)
    assert gone.result == REJECTED and gone.current is held and "no CRL" in gone.reason
    # an empty answer naming an unverifiable signer cannot clear it either
    unverified = next_revocation_list(held, RevocationAnswer(b"", 0, tuple(other.chain_pem)), ca.roots_pem)
    assert unverified.result == REJECTED and unverified.current is held


def test_a_new_intermediate_of_the_same_root_starts_its_own_numbering(ca: CertificateAuthority, tmp_path: Path) -> None:
    held = next_revocation_list(None, answer(ca, [7, 8]), ca.roots_pem).current
    assert held is not None and held.number == 1
    ca.revoke([9])  # number 2 from the old intermediate
    held = next_revocation_list(held, answer(ca), ca.roots_pem).current
    assert held is not None and held.number == 2
    root_cert, root_key = _copy(ca.directory, "root-cert.pem", tmp_path), _copy(ca.directory, "root-key.pem", tmp_path)
    init_ca_dir(ca.directory, root_cert_file=root_cert, root_key_file=root_key, force=True)  # a new intermediate
    renewed = CertificateAuthority.load(ca.directory)
    cleared = next_revocation_list(held, RevocationAnswer(b"", 0, tuple(renewed.chain_pem)), ca.roots_pem)
    assert cleared.result == CLEARED and cleared.current is None
    fresh = next_revocation_list(held, answer(renewed, [10]), ca.roots_pem)
    assert fresh.result == LOADED and fresh.current is not None and fresh.current.number == 1


def _copy(directory: Path, name: str, tmp_path: Path) -> Path:
    target = tmp_path / f"saved-{name}"
    target.write_bytes((directory / name).read_bytes())
    return target
