"""What a proxy accepts as a CRL: signed by a CA of the trust bundle, never a rollback, never unverified;
one CRL per signer key, and a leaf is revoked only by a CRL of its own signer."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from tests.support.svids import issue
from ztunnel.identity.ca import CertificateAuthority, init_ca_dir
from ztunnel.identity.certs import generate_key
from ztunnel.identity.revocation import (
    LOADED,
    NO_REVOCATIONS,
    REJECTED,
    UNCHANGED,
    RevocationAnswer,
    RevocationError,
    RevocationSet,
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


def answer(ca: CertificateAuthority, serials: list[int] | None = None, known: int = 0) -> RevocationAnswer:
    if serials:
        ca.revoke(serials)
    return ca.published_revocations(known)


def held(ca: CertificateAuthority, current: RevocationSet = NO_REVOCATIONS) -> RevocationSet:
    """What a proxy holds after polling `ca` once (its CRLs accepted)."""
    update = next_revocation_list(current, answer(ca, known=current.number), ca.roots_pem)
    assert update.result in (LOADED, UNCHANGED), update.reason
    return update.current


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
    loaded = next_revocation_list(NO_REVOCATIONS, second, ca.roots_pem)
    assert loaded.result == LOADED and loaded.current.number == 2 and loaded.current.lists[0].number == 2
    rollback = next_revocation_list(loaded.current, first, ca.roots_pem)
    assert rollback.result == REJECTED and rollback.current is loaded.current and "rollback" in rollback.reason
    assert next_revocation_list(loaded.current, second, ca.roots_pem).result == UNCHANGED
    not_modified = RevocationAnswer(b"", 2)  # the CA's "you hold the current one"
    assert ca.published_revocations(2) == not_modified
    assert next_revocation_list(loaded.current, not_modified, ca.roots_pem).current is loaded.current
    third = answer(ca, [11])
    assert next_revocation_list(loaded.current, third, ca.roots_pem).current.serials == {7, 9, 11}


def test_a_bad_answer_keeps_the_crl_in_force(ca: CertificateAuthority, other: CertificateAuthority) -> None:
    kept = held(ca)
    forged = next_revocation_list(kept, answer(other, [8]), ca.roots_pem)
    assert forged.result == REJECTED and forged.current is kept
    # a source that stops publishing (or names another signer) cannot take a CRL away
    for empty in (RevocationAnswer(b"", 0, tuple(ca.chain_pem)), RevocationAnswer(b"", 0, tuple(other.chain_pem))):
        update = next_revocation_list(kept, empty, ca.roots_pem)
        assert update.result == UNCHANGED and update.current.lists == kept.lists


def test_replacing_the_intermediate_keeps_its_revocations(ca: CertificateAuthority, tmp_path: Path) -> None:
    """Review finding 3: `ca init --force` under the same root used to delete crl.pem, and the proxy then
    cleared the CRL, so the old intermediate's revoked leaves (still chaining to the root) were accepted."""
    revoked_old = issue(ca.directory, ["spiffe://cluster.local/ns/shop/sa/web"]).leaf
    ca.revoke([revoked_old.serial_number, 8])
    kept = held(ca)
    assert kept.revokes(revoked_old) and kept.number == 1
    root_cert, root_key = _copy(ca.directory, "root-cert.pem", tmp_path), _copy(ca.directory, "root-key.pem", tmp_path)
    init_ca_dir(ca.directory, root_cert_file=root_cert, root_key_file=root_key, force=True)  # a new intermediate
    renewed = CertificateAuthority.load(ca.directory)
    after = held(renewed, kept)
    assert after.revokes(revoked_old), "the old intermediate's revoked leaf is accepted again"
    assert after.number == 2  # the new intermediate's CRL continues the numbering (proxies send theirs)
    # the new intermediate revokes its own leaves; both CRLs stay in force, one per signer
    revoked_new = issue(ca.directory, ["spiffe://cluster.local/ns/shop/sa/db"]).leaf
    renewed.revoke([revoked_new.serial_number])
    both = held(renewed, after)
    assert both.revokes(revoked_old) and both.revokes(revoked_new) and len(both.lists) == 2
    assert renewed.published_revocations(both.number) == RevocationAnswer(b"", 3)
    # a proxy that starts after the replacement gets both from a full answer
    fresh = held(renewed)
    assert fresh.revokes(revoked_old) and fresh.revokes(revoked_new)


def test_a_crl_revokes_only_leaves_of_its_own_signer_key(
    ca: CertificateAuthority, other: CertificateAuthority
) -> None:
    """Review finding 4: both CAs name their intermediate "ztunnel intermediate CA"; a CRL of one listing
    serial S must not revoke the other's leaf with serial S (it did: the match was by issuer name)."""
    ours = issue(ca.directory, ["spiffe://cluster.local/ns/shop/sa/web"]).leaf
    theirs = issue(other.directory, ["spiffe://cluster.local/ns/shop/sa/web"], serial=ours.serial_number).leaf
    assert ours.issuer == theirs.issuer and ours.serial_number == theirs.serial_number
    ca.revoke([ours.serial_number])
    crls = held(ca)
    assert crls.revokes(ours)
    assert not crls.revokes(theirs)
    assert not crls.lists[0].revokes(theirs)


def test_one_crl_per_signer_with_its_own_rollback_check(
    ca: CertificateAuthority, other: CertificateAuthority
) -> None:
    """Two CAs of one trust bundle (federation, root rotation): each signer's CRL is held and numbered apart."""
    roots = ca.roots_pem + other.roots_pem
    ca.revoke([7])
    ca.revoke([8])
    other.revoke([9])
    mine = next_revocation_list(NO_REVOCATIONS, ca.published_revocations(), roots).current
    both = next_revocation_list(mine, other.published_revocations(), roots)
    assert both.result == LOADED and {crl.number for crl in both.current.lists} == {1, 2}
    assert both.current.serials == {7, 8, 9}
    # the other signer's number 1 is not a rollback of our number 2, and does not replace it
    again = next_revocation_list(both.current, other.published_revocations(), roots)
    assert again.result == UNCHANGED and again.current.serials == {7, 8, 9}


def _copy(directory: Path, name: str, tmp_path: Path) -> Path:
    target = tmp_path / f"saved-{name}"
    target.write_bytes((directory / name).read_bytes())
    return target
