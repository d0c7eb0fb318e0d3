"""The CA signer: every SVID field of DESIGN §4.3, CA directory checks, plugged-in roots, revocation."""

from __future__ import annotations

import datetime as dt
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID, NameOID

from ztunnel.identity.ca import (
    CA_CERT,
    CA_KEY,
    CRL,
    RETIRED_CRLS,
    ROOT_KEY,
    TRUST_BUNDLE,
    CAError,
    CertificateAuthority,
    IdentityRejectedError,
    InvalidRequestError,
    init_ca_dir,
    parse_csr,
)
from ztunnel.identity.certs import generate_key, key_to_pem, make_csr, split_pem_chain
from ztunnel.identity.spiffe import SpiffeId

WEB = SpiffeId.parse("spiffe://cluster.local/ns/shop/sa/web")


@pytest.fixture
def ca(tmp_path: Path) -> CertificateAuthority:
    init_ca_dir(tmp_path / "ca")
    return CertificateAuthority.load(tmp_path / "ca")


def _issue(ca: CertificateAuthority, **kw: object) -> tuple[x509.Certificate, list[bytes], ec.EllipticCurvePrivateKey]:
    key = generate_key()
    chain = ca.sign_csr(make_csr(key, WEB), **kw)  # type: ignore[arg-type]
    return x509.load_pem_x509_certificate(chain[0]), chain, key


def test_leaf_has_exactly_the_design_fields(ca: CertificateAuthority) -> None:
    before = dt.datetime.now(dt.UTC)
    leaf, chain, key = _issue(ca)
    # URI SAN only, critical
    san = leaf.extensions.get_extension_for_oid(ExtensionOID.SUBJECT_ALTERNATIVE_NAME)
    assert san.critical
    assert list(san.value) == [x509.UniformResourceIdentifier(WEB.uri)]
    # empty subject
    assert len(leaf.subject) == 0
    # KeyUsage digitalSignature + keyEncipherment, nothing else
    ku = leaf.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical
    assert ku.value.digital_signature and ku.value.key_encipherment
    assert not any(
        (ku.value.content_commitment, ku.value.data_encipherment, ku.value.key_agreement, ku.value.key_cert_sign)
    )
    assert not ku.value.crl_sign
    # EKU serverAuth + clientAuth
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    # the node's P-256 key is the certified key
    pub = leaf.public_key()
    assert isinstance(pub, ec.EllipticCurvePublicKey) and pub.curve.name == "secp256r1"
    assert pub.public_numbers() == key.public_key().public_numbers()
    # random ~128-bit serial: 127 bits (DER keeps it positive in 16 bytes), differs per cert
    assert 120 <= leaf.serial_number.bit_length() <= 127
    assert _issue(ca)[0].serial_number != leaf.serial_number
    # default TTL 24 h
    lifetime = leaf.not_valid_after_utc - before
    assert dt.timedelta(hours=24) - dt.timedelta(seconds=5) <= lifetime <= dt.timedelta(hours=24, seconds=5)
    assert leaf.not_valid_before_utc <= before
    # issued by the intermediate; chain is leaf, intermediate, root
    assert len(chain) == 3
    intermediate = x509.load_pem_x509_certificate(chain[1])
    root = x509.load_pem_x509_certificate(chain[2])
    assert leaf.issuer == intermediate.subject
    leaf.verify_directly_issued_by(intermediate)
    intermediate.verify_directly_issued_by(root)
    assert root.subject == root.issuer
    assert isinstance(leaf.signature_hash_algorithm, hashes.SHA256)


def test_ttl_is_bounded_by_the_ca_maximum(tmp_path: Path) -> None:
    init_ca_dir(tmp_path / "ca")
    ca = CertificateAuthority.load(tmp_path / "ca", max_ttl=dt.timedelta(hours=1))
    now = dt.datetime.now(dt.UTC)
    leaf, _, _ = _issue(ca, ttl=dt.timedelta(hours=48))
    assert leaf.not_valid_after_utc - now <= dt.timedelta(hours=1, seconds=5)
    short, _, _ = _issue(ca, ttl=dt.timedelta(seconds=6))
    assert short.not_valid_after_utc - now <= dt.timedelta(seconds=8)
    with pytest.raises(InvalidRequestError, match="positive"):
        _issue(ca, ttl=dt.timedelta(0))


def test_init_writes_private_keys_0600_and_refuses_to_overwrite(tmp_path: Path) -> None:
    d = init_ca_dir(tmp_path / "ca")
    for name in (CA_KEY, ROOT_KEY):
        assert stat.S_IMODE((d / name).stat().st_mode) == 0o600
    old = (d / CA_CERT).read_bytes()
    with pytest.raises(CAError, match="--force"):
        init_ca_dir(d)
    assert (d / CA_CERT).read_bytes() == old
    CertificateAuthority.load(d).revoke([5])
    init_ca_dir(d, force=True)
    assert (d / CA_CERT).read_bytes() != old
    # crl.pem is the new intermediate's (nothing revoked, the numbering goes on); the old one's CRL is
    # kept in retired-crls.pem, but not published here: its root was replaced too, so nothing trusts it
    renewed = CertificateAuthority.load(d)
    crl = x509.load_pem_x509_crl((d / CRL).read_bytes())
    assert crl.is_signature_valid(renewed.signing_key.public_key()) and len(crl) == 0
    assert crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number == 2
    assert (d / RETIRED_CRLS).read_bytes().count(b"BEGIN X509 CRL") == 1
    assert renewed.published_revocations().retired == ()


def test_trust_domain_is_recorded_and_enforced(tmp_path: Path) -> None:
    init_ca_dir(tmp_path / "ca", trust_domain="example.org")
    ca = CertificateAuthority.load(tmp_path / "ca")
    assert ca.trust_domain == "example.org"
    with pytest.raises(IdentityRejectedError, match=r"example\.org"):
        ca.sign_csr(make_csr(generate_key(), WEB))
    with pytest.raises(CAError, match="trust-domain"):
        init_ca_dir(tmp_path / "bad", trust_domain="Not A Domain")


def _operator_root(tmp_path: Path) -> tuple[Path, Path]:
    key = generate_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "operator root")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = tmp_path / "op-root.pem", tmp_path / "op-root-key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key_to_pem(key))
    return cert_file, key_file


def test_plugged_in_root_signs_the_intermediate_and_its_key_stays_out(tmp_path: Path) -> None:
    cert_file, key_file = _operator_root(tmp_path)
    d = init_ca_dir(tmp_path / "ca", root_cert_file=cert_file, root_key_file=key_file)
    assert not (d / ROOT_KEY).exists()
    ca = CertificateAuthority.load(d)
    _, chain, _ = _issue(ca)
    op_root = x509.load_pem_x509_certificate(cert_file.read_bytes())
    assert x509.load_pem_x509_certificate(chain[-1]) == op_root
    x509.load_pem_x509_certificate(chain[1]).verify_directly_issued_by(op_root)


def test_plugged_in_root_errors_are_one_line(tmp_path: Path) -> None:
    cert_file, key_file = _operator_root(tmp_path)
    (tmp_path / "other").mkdir()
    other_cert, _ = _operator_root(tmp_path / "other")
    with pytest.raises(CAError, match="both --root-cert and --root-key"):
        init_ca_dir(tmp_path / "a", root_cert_file=cert_file)
    with pytest.raises(CAError, match="is not the key of") as mismatch:
        init_ca_dir(tmp_path / "b", root_cert_file=other_cert, root_key_file=key_file)
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n")
    with pytest.raises(CAError, match="not a PEM certificate") as bad_pem:
        init_ca_dir(tmp_path / "c", root_cert_file=garbage, root_key_file=key_file)
    with pytest.raises(CAError, match="cannot read"):
        init_ca_dir(tmp_path / "d", root_cert_file=tmp_path / "missing.pem", root_key_file=key_file)
    for e in (mismatch.value, bad_pem.value):
        assert "\n" not in str(e)
    assert not (tmp_path / "b").exists()  # nothing half-made


def test_load_reports_missing_or_mismatched_key_in_one_line(tmp_path: Path) -> None:
    a = init_ca_dir(tmp_path / "a")
    b = init_ca_dir(tmp_path / "b")
    (a / CA_KEY).write_bytes((b / CA_KEY).read_bytes())
    with pytest.raises(CAError, match="does not match") as mismatch:
        CertificateAuthority.load(a)
    (b / CA_KEY).unlink()
    with pytest.raises(CAError, match=f"missing {CA_KEY}") as missing:
        CertificateAuthority.load(b)
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / CA_KEY).write_text("junk")
    (tmp_path / "c" / CA_CERT).write_bytes((b / CA_CERT).read_bytes())
    (tmp_path / "c" / "root-cert.pem").write_bytes((b / "root-cert.pem").read_bytes())
    with pytest.raises(CAError, match="not an unencrypted PEM private key") as junk:
        CertificateAuthority.load(tmp_path / "c")
    with pytest.raises(CAError, match="no such CA directory"):
        CertificateAuthority.load(tmp_path / "nowhere")
    for e in (mismatch.value, missing.value, junk.value):
        assert "\n" not in str(e)


def test_chain_must_lead_to_the_root(tmp_path: Path) -> None:
    a = init_ca_dir(tmp_path / "a")
    b = init_ca_dir(tmp_path / "b")
    (a / "root-cert.pem").write_bytes((b / "root-cert.pem").read_bytes())
    with pytest.raises(CAError, match="does not end with the root"):
        CertificateAuthority.load(a)


def test_trust_bundle_holds_extra_roots(tmp_path: Path) -> None:
    a = init_ca_dir(tmp_path / "a")
    b = init_ca_dir(tmp_path / "b")
    (a / TRUST_BUNDLE).write_bytes((b / "root-cert.pem").read_bytes())
    roots = split_pem_chain(CertificateAuthority.load(a).roots_pem)
    assert roots == [(a / "root-cert.pem").read_bytes(), (b / "root-cert.pem").read_bytes()]


def _csr_with_sans(names: list[x509.GeneralName], key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> bytes:
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=True)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def test_parse_csr_refusals() -> None:
    uri = x509.UniformResourceIdentifier
    k = generate_key()
    assert parse_csr(make_csr(k, WEB), "cluster.local").identity == WEB
    cases: list[tuple[bytes, type[CAError], str]] = [
        (b"hello", InvalidRequestError, "not PEM"),
        (
            b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
            InvalidRequestError,
            "does not decode",
        ),
        (_csr_with_sans([], k), IdentityRejectedError, "exactly one SAN"),
        (_csr_with_sans([uri(WEB.uri), uri("spiffe://cluster.local/ns/shop/sa/db")], k), IdentityRejectedError, "2"),
        (_csr_with_sans([uri(WEB.uri), x509.DNSName("web.shop")], k), IdentityRejectedError, "web.shop"),
        (_csr_with_sans([uri("spiffe://other.td/ns/shop/sa/web")], k), IdentityRejectedError, "other.td"),
        (_csr_with_sans([uri("https://example.com/x")], k), IdentityRejectedError, "SPIFFE"),
        (
            _csr_with_sans([uri(WEB.uri)], rsa.generate_private_key(public_exponent=65537, key_size=1024)),
            InvalidRequestError,
            "P-256",
        ),
    ]
    for pem, exc, words in cases:
        with pytest.raises(exc, match=words) as info:
            parse_csr(pem, "cluster.local")
        assert "\n" not in str(info.value)


def test_tampered_csr_signature_is_refused() -> None:
    der = x509.load_pem_x509_csr(make_csr(generate_key(), WEB)).public_bytes(serialization.Encoding.DER)
    forged = der.replace(b"sa/web", b"sa/wex")  # same length, so the structure parses; the signature must not
    pem = x509.load_der_x509_csr(forged).public_bytes(serialization.Encoding.PEM)
    with pytest.raises(InvalidRequestError, match="signature"):
        parse_csr(pem, "cluster.local")


def test_revoke_writes_a_crl_signed_by_the_intermediate(ca: CertificateAuthority) -> None:
    leaf, _, _ = _issue(ca)
    assert ca.crl_pem() == b""
    assert ca.revoke([leaf.serial_number]) == [leaf.serial_number]
    assert ca.revoke([leaf.serial_number, 42]) == sorted([leaf.serial_number, 42])  # idempotent
    crl = x509.load_pem_x509_crl(ca.crl_pem())
    assert crl.issuer == ca.signing_cert.subject
    assert crl.is_signature_valid(ca.signing_key.public_key())
    assert crl.get_revoked_certificate_by_serial_number(leaf.serial_number) is not None
    assert crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number == 2
    assert crl.next_update_utc is not None and crl.next_update_utc > dt.datetime.now(dt.UTC) + dt.timedelta(days=30)
    assert sorted(CertificateAuthority.load(ca.directory).revoked_serials()) == sorted([leaf.serial_number, 42])
