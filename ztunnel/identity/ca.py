"""The certificate authority: a root (or the operator's) and an intermediate that signs SVIDs.

Files in the CA directory use Istio's plugged-in CA names so an operator's existing layout works:
root-cert.pem, ca-cert.pem, ca-key.pem (intermediate), cert-chain.pem (intermediate..root), plus
root-key.pem when the root was generated here and crl.pem for revocations.
"""

from __future__ import annotations

import datetime as dt
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ztunnel.errors import ZtunnelError
from ztunnel.identity.certs import generate_key, key_to_pem, split_pem_chain, uri_sans
from ztunnel.identity.spiffe import SpiffeId, SpiffeIdError

DEFAULT_TTL = dt.timedelta(hours=24)
DEFAULT_MAX_TTL = dt.timedelta(days=7)
ROOT_TTL = dt.timedelta(days=3650)
INTERMEDIATE_TTL = dt.timedelta(days=365)
CLOCK_SKEW = dt.timedelta(minutes=1)  # backdate notBefore so a peer slightly behind still accepts

ROOT_CERT = "root-cert.pem"
ROOT_KEY = "root-key.pem"
CA_CERT = "ca-cert.pem"
CA_KEY = "ca-key.pem"
CERT_CHAIN = "cert-chain.pem"
CRL = "crl.pem"
TRUST_BUNDLE = "trust-bundle.pem"  # optional extra roots, for root rotation


class CAError(ZtunnelError):
    pass


def random_serial() -> int:
    """128 random bits, positive and non-zero as X.509 requires."""
    return secrets.randbits(127) | (1 << 126)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, 0o600)


def _ca_cert(
    subject: x509.Name,
    issuer: x509.Name,
    public_key: ec.EllipticCurvePublicKey,
    signing_key: ec.EllipticCurvePrivateKey,
    ttl: dt.timedelta,
    path_length: int | None,
    issuer_key: ec.EllipticCurvePublicKey,
) -> x509.Certificate:
    now = _now()
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(random_serial())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + ttl)
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key), critical=False)
        .sign(signing_key, hashes.SHA256())
    )


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def init_ca_dir(
    directory: str | Path,
    *,
    trust_domain: str = "cluster.local",
    root_cert_file: str | Path | None = None,
    root_key_file: str | Path | None = None,
    force: bool = False,
) -> Path:
    """Create a root (or use the operator's) and an intermediate under it, in `directory`."""
    d = Path(directory)
    if (d / CA_KEY).exists() and not force:
        raise CAError(f"{d}: a CA already exists here ({CA_KEY}); pass --force to replace it")
    d.mkdir(parents=True, exist_ok=True)
    os.chmod(d, 0o700)
    org = x509.NameAttribute(NameOID.ORGANIZATION_NAME, trust_domain)
    if root_cert_file or root_key_file:
        if not (root_cert_file and root_key_file):
            raise CAError("give both --root-cert and --root-key to plug in your own root")
        root_cert = x509.load_pem_x509_certificate(Path(root_cert_file).read_bytes())
        loaded = serialization.load_pem_private_key(Path(root_key_file).read_bytes(), password=None)
        if not isinstance(loaded, ec.EllipticCurvePrivateKey):
            raise CAError(f"{root_key_file}: only ECDSA root keys are supported")
        root_key = loaded
        if root_cert.public_key().public_numbers() != root_key.public_key().public_numbers():
            raise CAError(f"{root_key_file} is not the key of {root_cert_file}; give the matching pair")
    else:
        root_key = generate_key()
        name = x509.Name([org, x509.NameAttribute(NameOID.COMMON_NAME, "ztunnel root CA")])
        root_cert = _ca_cert(name, name, root_key.public_key(), root_key, ROOT_TTL, None, root_key.public_key())
        _write_private(d / ROOT_KEY, key_to_pem(root_key))
    int_key = generate_key()
    int_name = x509.Name([org, x509.NameAttribute(NameOID.COMMON_NAME, "ztunnel intermediate CA")])
    int_cert = _ca_cert(
        int_name, root_cert.subject, int_key.public_key(), root_key, INTERMEDIATE_TTL, 0, root_key.public_key()
    )
    _write_private(d / CA_KEY, key_to_pem(int_key))
    (d / CA_CERT).write_bytes(_pem(int_cert))
    (d / ROOT_CERT).write_bytes(_pem(root_cert))
    (d / CERT_CHAIN).write_bytes(_pem(int_cert) + _pem(root_cert))
    (d / "trust-domain").write_text(trust_domain + "\n")
    return d


@dataclass
class CertificateAuthority:
    """Signs SVIDs with the intermediate key. Load with `CertificateAuthority.load(dir)`."""

    directory: Path
    trust_domain: str
    signing_cert: x509.Certificate
    signing_key: ec.EllipticCurvePrivateKey
    chain_pem: list[bytes]  # signing cert .. root
    roots_pem: bytes
    max_ttl: dt.timedelta = DEFAULT_MAX_TTL

    @classmethod
    def load(cls, directory: str | Path, *, max_ttl: dt.timedelta = DEFAULT_MAX_TTL) -> CertificateAuthority:
        d = Path(directory)
        for name in (CA_CERT, CA_KEY, ROOT_CERT):
            if not (d / name).is_file():
                raise CAError(f"{d}: missing {name}; create the CA with `ztunnel ca init --dir {d}`")
        try:
            cert = x509.load_pem_x509_certificate((d / CA_CERT).read_bytes())
        except ValueError as e:
            raise CAError(f"{d / CA_CERT}: not a PEM certificate ({e})") from e
        try:
            key = serialization.load_pem_private_key((d / CA_KEY).read_bytes(), password=None)
        except (ValueError, TypeError) as e:
            raise CAError(f"{d / CA_KEY}: not an unencrypted PEM private key ({e})") from e
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise CAError(f"{d / CA_KEY}: only ECDSA keys are supported")
        if cert.public_key().public_numbers() != key.public_key().public_numbers():
            raise CAError(f"{d}: {CA_KEY} does not match {CA_CERT}; restore the pair or run `ztunnel ca init --force`")
        chain_file = d / CERT_CHAIN
        chain = split_pem_chain(chain_file.read_bytes()) if chain_file.exists() else []
        root_pem = (d / ROOT_CERT).read_bytes()
        if not chain:
            chain = [_pem(cert), *split_pem_chain(root_pem)]
        roots = root_pem
        if (d / TRUST_BUNDLE).exists():
            roots = roots.rstrip(b"\n") + b"\n" + (d / TRUST_BUNDLE).read_bytes()
        td_file = d / "trust-domain"
        td = td_file.read_text().strip() if td_file.exists() else "cluster.local"
        return cls(d, td, cert, key, chain, roots, max_ttl)

    def sign_csr(
        self,
        csr_pem: bytes | str,
        *,
        ttl: dt.timedelta = DEFAULT_TTL,
        expected_identity: SpiffeId | None = None,
    ) -> list[bytes]:
        """Check the CSR and return the chain, leaf first, root last."""
        data = csr_pem.encode() if isinstance(csr_pem, str) else csr_pem
        try:
            csr = x509.load_pem_x509_csr(data)
        except ValueError as e:
            raise CAError(f"the CSR is not a PEM certificate signing request ({e})") from e
        if not csr.is_signature_valid:
            raise CAError("the CSR signature does not verify")
        sans = uri_sans_of_csr(csr)
        if len(sans) != 1:
            raise CAError(f"the CSR must carry exactly one URI SAN (the SPIFFE id); it has {len(sans)}")
        try:
            identity = SpiffeId.parse(sans[0])
        except SpiffeIdError as e:
            raise CAError(f"the CSR's SAN: {e}") from e
        if identity.trust_domain != self.trust_domain:
            raise CAError(
                f"the CSR asks for trust domain {identity.trust_domain!r}; this CA signs {self.trust_domain!r}"
            )
        if expected_identity is not None and identity != expected_identity:
            raise CAError(f"the CSR's SAN {identity} differs from the identity asked for ({expected_identity})")
        pub = csr.public_key()
        if not isinstance(pub, ec.EllipticCurvePublicKey) or pub.curve.name != "secp256r1":
            raise CAError("the CSR key must be ECDSA P-256")
        return self.issue(identity, pub, ttl)

    def issue(self, identity: SpiffeId, public_key: ec.EllipticCurvePublicKey, ttl: dt.timedelta) -> list[bytes]:
        if ttl <= dt.timedelta(0):
            raise CAError("the requested validity must be positive")
        ttl = min(ttl, self.max_ttl)
        now = _now()
        not_after = min(now + ttl, self.signing_cert.not_valid_after_utc)
        leaf = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([]))
            .issuer_name(self.signing_cert.subject)
            .public_key(public_key)
            .serial_number(random_serial())
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(not_after)
            .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(identity.uri)]), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=True,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False,
            )
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.signing_key.public_key()), critical=False
            )
            .sign(self.signing_key, hashes.SHA256())
        )
        return [_pem(leaf), *self.chain_pem]


def uri_sans_of_csr(csr: x509.CertificateSigningRequest) -> list[str]:
    try:
        ext = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return []
    others = [n for n in ext.value if not isinstance(n, x509.UniformResourceIdentifier)]
    uris = ext.value.get_values_for_type(x509.UniformResourceIdentifier)
    return uris + [str(o) for o in others]


__all__ = ["CAError", "CertificateAuthority", "init_ca_dir", "random_serial", "uri_sans"]
