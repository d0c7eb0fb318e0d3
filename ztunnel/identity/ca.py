"""The certificate authority: a root (or the operator's) and an intermediate that signs SVIDs.

Files in the CA directory use Istio's plugged-in CA names so an operator's existing layout works:
root-cert.pem, ca-cert.pem, ca-key.pem (intermediate), cert-chain.pem (intermediate..root), plus
root-key.pem when the root was generated here, crl.pem for revocations, and retired-crls.pem: the last
CRL of each replaced intermediate (followed by that intermediate's chain), published beside crl.pem until
it expires, so replacing the intermediate does not bring its revoked leaves back.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import itertools
import os
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ztunnel.errors import ZtunnelError
from ztunnel.identity.certs import generate_key, key_to_pem, split_pem_chain, uri_sans
from ztunnel.identity.revocation import (
    RevocationAnswer,
    RevocationError,
    SignedRevocationList,
    verify_revocation_list,
)
from ztunnel.identity.spiffe import SpiffeId, SpiffeIdError

DEFAULT_TTL = dt.timedelta(hours=24)
DEFAULT_MAX_TTL = dt.timedelta(days=7)
ROOT_TTL = dt.timedelta(days=3650)
INTERMEDIATE_TTL = dt.timedelta(days=365)
SERVER_TTL = dt.timedelta(days=365)  # the CA server's own TLS cert, re-made at each start
CRL_TTL = dt.timedelta(days=365)  # a CRL past nextUpdate fails every handshake, so keep it long; re-signed on revoke
CLOCK_SKEW = dt.timedelta(minutes=1)  # backdate notBefore so a peer slightly behind still accepts

ROOT_CERT = "root-cert.pem"
ROOT_KEY = "root-key.pem"
CA_CERT = "ca-cert.pem"
CA_KEY = "ca-key.pem"
CERT_CHAIN = "cert-chain.pem"
CRL = "crl.pem"
RETIRED_CRLS = "retired-crls.pem"  # replaced intermediates' last CRLs, each followed by its signer chain
TRUST_BUNDLE = "trust-bundle.pem"  # optional extra roots, for root rotation


# An operator's plugged-in root or intermediate may be RSA (Istio's sample cacerts are); what we make is ECDSA P-256.
CAKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
CAPublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey
MIN_RSA_BITS = 2048


class CAError(ZtunnelError):
    """The CA directory or a signing request is unusable; the text says which and what to do."""


class InvalidRequestError(CAError):
    """The request is malformed: not PEM, not a CSR, a bad signature, a key type we do not sign."""


class IdentityRejectedError(CAError):
    """The CSR is well formed but asks for an identity this CA will not sign."""


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
    signing_key: CAKey,
    ttl: dt.timedelta,
    path_length: int | None,
    issuer_key: CAPublicKey,
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
    try:
        SpiffeId.parse(f"spiffe://{trust_domain}/ns/default/sa/default")
    except SpiffeIdError as e:
        raise CAError(f"--trust-domain {trust_domain!r}: {e}") from e
    if bool(root_cert_file) != bool(root_key_file):
        raise CAError("give both --root-cert and --root-key to plug in your own root")
    org = x509.NameAttribute(NameOID.ORGANIZATION_NAME, trust_domain)
    generated: ec.EllipticCurvePrivateKey | None = None
    root_key: CAKey
    if root_cert_file and root_key_file:
        root_cert = _read_cert(Path(root_cert_file))
        root_key = _read_key(Path(root_key_file))
        if not _same_key(root_cert, root_key):
            raise CAError(f"{root_key_file} is not the key of {root_cert_file}; give the matching pair")
        bc = _basic_constraints(root_cert)
        if bc is None or not bc.ca:
            raise CAError(f"{root_cert_file}: not a CA certificate (basicConstraints CA:TRUE is missing)")
    else:
        root_key = generated = generate_key()
        name = x509.Name([org, x509.NameAttribute(NameOID.COMMON_NAME, "ztunnel root CA")])
        root_cert = _ca_cert(name, name, root_key.public_key(), root_key, ROOT_TTL, None, root_key.public_key())
    d.mkdir(parents=True, exist_ok=True)
    os.chmod(d, 0o700)
    if generated is not None:
        _write_private(d / ROOT_KEY, key_to_pem(generated))
    elif (d / ROOT_KEY).exists():
        (d / ROOT_KEY).unlink()  # a replaced self-made root's key must not linger next to the plugged-in one
    last_number = _retire_crl(d, _now())
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
    if last_number:  # the new intermediate's CRL continues the numbering: proxies send the number they hold
        _write_crl(d, int_cert, int_key, {}, last_number + 1)
    return d


def _retire_crl(d: Path, now: dt.datetime) -> int:
    """Before the intermediate is replaced: append its CRL (and its chain) to retired-crls.pem, drop the
    retired CRLs that have expired, remove crl.pem. Returns the highest CRL number seen (0: none)."""
    retired = _read_retired(d / RETIRED_CRLS) if (d / RETIRED_CRLS).exists() else []
    numbers = [_crl_number(x509.load_pem_x509_crl(r.crl)) for r in retired]
    path = d / CRL
    if path.exists():
        try:
            crl = x509.load_pem_x509_crl(path.read_bytes())
        except ValueError as e:
            raise CAError(f"{path}: not a PEM CRL ({_first_line(e)}); remove it before replacing the CA") from e
        numbers.append(_crl_number(crl))
        chain_file = d / CERT_CHAIN if (d / CERT_CHAIN).exists() else d / CA_CERT
        if len(crl) and chain_file.exists():
            retired.append(SignedRevocationList(path.read_bytes(), tuple(split_pem_chain(chain_file.read_bytes()))))
    kept = [r for r in retired if _still_valid(x509.load_pem_x509_crl(r.crl), now)]
    if kept:
        tmp = d / (RETIRED_CRLS + ".tmp")
        tmp.write_bytes(b"".join(r.crl.rstrip(b"\n") + b"\n" + b"".join(r.issuer_chain) for r in kept))
        os.replace(tmp, d / RETIRED_CRLS)
    elif (d / RETIRED_CRLS).exists():
        (d / RETIRED_CRLS).unlink()
    if path.exists():
        path.unlink()  # signed by the replaced intermediate: the new one signs crl.pem from now on
    return max(numbers, default=0)


_PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----.+?-----END \1-----\n?", re.DOTALL)


def _read_retired(path: Path) -> list[SignedRevocationList]:
    """retired-crls.pem: each X509 CRL block followed by the certificates of its signer chain."""
    out: list[tuple[bytes, list[bytes]]] = []
    for m in _PEM_BLOCK.finditer(path.read_bytes()):
        block = m.group(0).rstrip(b"\n") + b"\n"
        if m.group(1) == b"X509 CRL":
            try:
                x509.load_pem_x509_crl(block)
            except ValueError as e:
                raise CAError(f"{path}: holds a broken CRL ({_first_line(e)}); remove that block") from e
            out.append((block, []))
        elif m.group(1) == b"CERTIFICATE" and out:
            out[-1][1].append(block)
    return [SignedRevocationList(crl, tuple(chain)) for crl, chain in out]


def _crl_number(crl: x509.CertificateRevocationList) -> int:
    try:
        return crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    except x509.ExtensionNotFound:
        return 0


def _still_valid(crl: x509.CertificateRevocationList, now: dt.datetime) -> bool:
    return crl.next_update_utc is None or crl.next_update_utc > now


def _write_crl(
    d: Path,
    signer: x509.Certificate,
    key: CAKey,
    entries: dict[int, dt.datetime],
    number: int,
) -> None:
    """Sign crl.pem with the intermediate and write it atomically (readers never see half a file)."""
    now = _now()
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(signer.subject)
        .last_update(now - CLOCK_SKEW)
        .next_update(min(now + CRL_TTL, signer.not_valid_after_utc))
        .add_extension(x509.CRLNumber(number), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()), critical=False)
    )
    for serial, when in sorted(entries.items()):
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(when).build()
        )
    crl = builder.sign(key, hashes.SHA256())
    tmp = d / (CRL + ".tmp")
    tmp.write_bytes(crl.public_bytes(serialization.Encoding.PEM))
    os.replace(tmp, d / CRL)


def _read_cert(path: Path) -> x509.Certificate:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CAError(f"{path}: cannot read ({e.strerror})") from e
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError as e:
        raise CAError(f"{path}: not a PEM certificate ({_first_line(e)})") from e


def _read_key(path: Path) -> CAKey:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CAError(f"{path}: cannot read ({e.strerror})") from e
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as e:
        raise CAError(f"{path}: not an unencrypted PEM private key ({_first_line(e)})") from e
    if isinstance(key, rsa.RSAPrivateKey) and key.key_size < MIN_RSA_BITS:
        raise CAError(f"{path}: an RSA key of {key.key_size} bits is too weak; use {MIN_RSA_BITS} bits or more")
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise CAError(f"{path}: only ECDSA and RSA keys are supported")
    return key


def _same_key(cert: x509.Certificate, key: CAKey) -> bool:
    pub, mine = cert.public_key(), key.public_key()
    if isinstance(pub, ec.EllipticCurvePublicKey) and isinstance(mine, ec.EllipticCurvePublicKey):
        return pub.public_numbers() == mine.public_numbers()
    if isinstance(pub, rsa.RSAPublicKey) and isinstance(mine, rsa.RSAPublicKey):
        return pub.public_numbers() == mine.public_numbers()
    return False


def _basic_constraints(cert: x509.Certificate) -> x509.BasicConstraints | None:
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        return None


def _first_line(e: Exception) -> str:
    """Library errors can span lines; a user error is one line."""
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


@dataclass(frozen=True)
class SigningRequest:
    """A checked CSR: the one SPIFFE id it asks for and the key to certify."""

    identity: SpiffeId
    public_key: ec.EllipticCurvePublicKey


def parse_csr(csr_pem: bytes | str, trust_domain: str) -> SigningRequest:
    """Check a CSR for an SVID; raise InvalidRequestError or IdentityRejectedError saying why."""
    data = csr_pem.encode() if isinstance(csr_pem, str) else csr_pem
    if b"-----BEGIN CERTIFICATE REQUEST-----" not in data and b"-----BEGIN NEW CERTIFICATE REQUEST-----" not in data:
        raise InvalidRequestError("the CSR is not PEM: expected a -----BEGIN CERTIFICATE REQUEST----- block")
    try:
        csr = x509.load_pem_x509_csr(data)
    except ValueError as e:
        raise InvalidRequestError(
            f"the CSR PEM does not decode to a certificate signing request ({_first_line(e)})"
        ) from e
    try:
        signature_ok = csr.is_signature_valid
        pub = csr.public_key()
    except (ValueError, TypeError) as e:
        raise InvalidRequestError(f"the CSR cannot be checked ({_first_line(e)})") from e
    if not signature_ok:
        raise InvalidRequestError("the CSR signature does not verify with its own key")
    if not isinstance(pub, ec.EllipticCurvePublicKey) or pub.curve.name != "secp256r1":
        raise InvalidRequestError("the CSR key must be ECDSA P-256")
    sans = uri_sans_of_csr(csr)
    if len(sans) != 1:
        raise IdentityRejectedError(
            f"the CSR must carry exactly one SAN, the SPIFFE id as a URI; it has {len(sans)}"
            + (f" ({', '.join(sans)})" if sans else "")
        )
    try:
        identity = SpiffeId.parse(sans[0])
    except SpiffeIdError as e:
        raise IdentityRejectedError(f"the CSR's SAN: {e}") from e
    if identity.trust_domain != trust_domain:
        raise IdentityRejectedError(
            f"the CSR asks for trust domain {identity.trust_domain!r}; this CA signs only {trust_domain!r}"
        )
    return SigningRequest(identity, pub)


@dataclass
class CertificateAuthority:
    """Signs SVIDs with the intermediate key. Load with `CertificateAuthority.load(dir)`."""

    directory: Path
    trust_domain: str
    signing_cert: x509.Certificate
    signing_key: CAKey
    chain_pem: list[bytes]  # signing cert .. root
    roots_pem: bytes
    max_ttl: dt.timedelta = DEFAULT_MAX_TTL
    # (mtime, size, inode) of crl.pem -> (DER, number): a CA server answers every proxy's poll from this
    _published: tuple[tuple[int, int, int], bytes, int] | None = field(default=None, init=False, repr=False)
    _retired: tuple[tuple[int, int, int], tuple[SignedRevocationList, ...]] | None = field(
        default=None, init=False, repr=False
    )

    @classmethod
    def load(cls, directory: str | Path, *, max_ttl: dt.timedelta = DEFAULT_MAX_TTL) -> CertificateAuthority:
        d = Path(directory)
        if not d.is_dir():
            raise CAError(f"{d}: no such CA directory; create it with `ztunnel ca init --dir {d}`")
        for name in (CA_CERT, CA_KEY, ROOT_CERT):
            if not (d / name).is_file():
                raise CAError(f"{d}: missing {name}; create the CA with `ztunnel ca init --dir {d}`")
        cert = _read_cert(d / CA_CERT)
        key = _read_key(d / CA_KEY)
        if not _same_key(cert, key):
            raise CAError(f"{d}: {CA_KEY} does not match {CA_CERT}; restore the pair or run `ztunnel ca init --force`")
        root_pem = (d / ROOT_CERT).read_bytes()
        root_pems = split_pem_chain(root_pem)
        if not root_pems:
            raise CAError(f"{d / ROOT_CERT}: holds no PEM certificate")
        chain_file = d / CERT_CHAIN
        chain = split_pem_chain(chain_file.read_bytes()) if chain_file.exists() else []
        if not chain:
            chain = [_pem(cert), root_pems[0]]
        _check_chain(d, cert, chain, root_pems)
        roots = root_pem
        if (d / TRUST_BUNDLE).exists():
            roots = roots.rstrip(b"\n") + b"\n" + (d / TRUST_BUNDLE).read_bytes()
        td_file = d / "trust-domain"
        td = td_file.read_text().strip() if td_file.exists() else "cluster.local"
        return cls(d, td, cert, key, chain, roots, max_ttl)

    def check_csr(self, csr_pem: bytes | str, *, expected_identity: SpiffeId | None = None) -> SigningRequest:
        req = parse_csr(csr_pem, self.trust_domain)
        if expected_identity is not None and req.identity != expected_identity:
            raise IdentityRejectedError(
                f"the CSR's SAN {req.identity} differs from the identity asked for ({expected_identity})"
            )
        return req

    def sign_csr(
        self,
        csr_pem: bytes | str,
        *,
        ttl: dt.timedelta = DEFAULT_TTL,
        expected_identity: SpiffeId | None = None,
    ) -> list[bytes]:
        """Check the CSR and return the chain, leaf first, root last."""
        req = self.check_csr(csr_pem, expected_identity=expected_identity)
        return self.issue(req.identity, req.public_key, ttl)

    def _not_after(self, ttl: dt.timedelta, now: dt.datetime) -> dt.datetime:
        if ttl <= dt.timedelta(0):
            raise InvalidRequestError("the requested validity must be positive")
        ttl = min(ttl, self.max_ttl)
        return min(now + ttl, self.signing_cert.not_valid_after_utc)

    def issue(self, identity: SpiffeId, public_key: ec.EllipticCurvePublicKey, ttl: dt.timedelta) -> list[bytes]:
        """An SVID: URI SAN only (critical), empty subject, both EKUs, random serial, TTL capped by max_ttl."""
        now = _now()
        not_after = self._not_after(ttl, now)
        leaf = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([]))
            .issuer_name(self.signing_cert.subject)
            .public_key(public_key)
            .serial_number(random_serial())
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(not_after)
            .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(identity.uri)]), critical=True)
            .add_extension(_LEAF_KEY_USAGE, critical=True)
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

    def issue_server_cert(
        self,
        public_key: ec.EllipticCurvePublicKey,
        *,
        dns_names: Sequence[str],
        ip_addresses: Sequence[str],
        ttl: dt.timedelta = SERVER_TTL,
    ) -> list[bytes]:
        """The CA server's own TLS certificate: serverAuth, DNS/IP SANs, so clients verify it with the bundle.

        Separate from SVIDs on purpose: it names a host, not a workload, and is not bounded by max_ttl.
        """
        now = _now()
        if ttl <= dt.timedelta(0):
            raise InvalidRequestError("the server certificate validity must be positive")
        not_after = min(now + ttl, self.signing_cert.not_valid_after_utc)
        names: list[x509.GeneralName] = []
        for dns in dict.fromkeys(dns_names):
            names.append(x509.DNSName(dns))
        for ip in dict.fromkeys(ip_addresses):
            names.append(x509.IPAddress(ipaddress.ip_address(ip)))
        if not names:
            raise CAError("a server certificate needs at least one DNS name or IP address")
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, (list(dns_names) or list(ip_addresses))[0])])
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self.signing_cert.subject)
            .public_key(public_key)
            .serial_number(random_serial())
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(not_after)
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(_LEAF_KEY_USAGE, critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.signing_key.public_key()), critical=False
            )
            .sign(self.signing_key, hashes.SHA256())
        )
        return [_pem(cert), *self.chain_pem]

    # ---- revocation -----------------------------------------------------------------------------
    def revoked_serials(self) -> list[int]:
        crl = self._load_crl()
        return [r.serial_number for r in crl] if crl is not None else []

    def crl_pem(self) -> bytes:
        """The current CRL (signed by the intermediate, the issuer of every leaf), or b"" if none."""
        path = self.directory / CRL
        return path.read_bytes() if path.exists() else b""

    def published_crl(self) -> tuple[bytes, int]:
        """The CRL to distribute, as DER, and its CRL number; (b"", 0) when nothing is revoked.

        Re-read and re-verified only when crl.pem changed (`ztunnel ca revoke` runs in another process).
        Raises CAError when the file is broken or not signed by this CA's intermediate.
        """
        path = self.directory / CRL
        try:
            st = path.stat()
        except FileNotFoundError:
            self._published = None
            return b"", 0
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        if self._published is None or self._published[0] != stamp:
            crl = self._load_crl()
            if crl is None:
                return b"", 0
            try:
                number = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
            except x509.ExtensionNotFound:
                raise CAError(f"{path}: the CRL has no CRL number; remove it and revoke again") from None
            self._published = (stamp, crl.public_bytes(serialization.Encoding.DER), number)
        return self._published[1], self._published[2]

    def published_revocations(self, known_number: int = 0) -> RevocationAnswer:
        """What a proxy polling with `known_number` gets: only the number when it holds the current CRL,
        else crl.pem (DER) with the intermediate's chain and the retired CRLs still worth enforcing."""
        der, number = self.published_crl()
        if number and number == known_number:
            return RevocationAnswer(b"", number)
        return RevocationAnswer(der, number, tuple(self.chain_pem), self.retired_crls())

    def retired_crls(self) -> tuple[SignedRevocationList, ...]:
        """retired-crls.pem, without the CRLs that expired or whose signer no longer chains to our roots
        (a proxy would refuse them); re-read only when the file changed."""
        path = self.directory / RETIRED_CRLS
        try:
            st = path.stat()
        except FileNotFoundError:
            return ()
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        if self._retired is None or self._retired[0] != stamp:
            usable = []
            for retired in _read_retired(path):
                try:
                    verify_revocation_list(retired.crl, retired.issuer_chain, self.roots_pem)
                except RevocationError:
                    continue
                der = x509.load_pem_x509_crl(retired.crl).public_bytes(serialization.Encoding.DER)
                usable.append(SignedRevocationList(der, retired.issuer_chain))
            self._retired = (stamp, tuple(usable))
        return self._retired[1]

    def _load_crl(self) -> x509.CertificateRevocationList | None:
        path = self.directory / CRL
        if not path.exists():
            return None
        try:
            crl = x509.load_pem_x509_crl(path.read_bytes())
        except ValueError as e:
            raise CAError(f"{path}: not a PEM CRL ({_first_line(e)}); remove it and revoke again") from e
        if crl.issuer != self.signing_cert.subject or not crl.is_signature_valid(self.signing_key.public_key()):
            raise CAError(f"{path}: not signed by this CA's intermediate; remove it and revoke again")
        return crl

    def revoke(self, serials: Sequence[int]) -> list[int]:
        """Add serials to crl.pem (idempotent) and re-sign it; returns every revoked serial."""
        existing = self._load_crl()
        now = _now()
        entries: dict[int, dt.datetime] = {}
        if existing is not None:
            for r in existing:
                entries[r.serial_number] = r.revocation_date_utc
        for serial in serials:
            if serial <= 0:
                raise CAError(f"serial {serial:x} is not a valid certificate serial (must be positive)")
            entries.setdefault(serial, now)
        number = _crl_number(existing) + 1 if existing is not None else 1
        _write_crl(self.directory, self.signing_cert, self.signing_key, entries, number)
        return sorted(entries)


_LEAF_KEY_USAGE = x509.KeyUsage(
    digital_signature=True,
    content_commitment=False,
    key_encipherment=True,
    data_encipherment=False,
    key_agreement=False,
    key_cert_sign=False,
    crl_sign=False,
    encipher_only=False,
    decipher_only=False,
)


def _check_chain(d: Path, signing_cert: x509.Certificate, chain_pem: list[bytes], root_pems: list[bytes]) -> None:
    """ca-cert.pem must head cert-chain.pem, each cert must be issued by the next, and the last be a root."""
    try:
        certs = [x509.load_pem_x509_certificate(p) for p in chain_pem]
        roots = [x509.load_pem_x509_certificate(p) for p in root_pems]
    except ValueError as e:
        raise CAError(f"{d}: {CERT_CHAIN} or {ROOT_CERT} holds a broken certificate ({_first_line(e)})") from e
    if certs[0] != signing_cert:
        raise CAError(
            f"{d}: {CERT_CHAIN} must start with {CA_CERT}; rebuild it as ca-cert then its issuers up to the root"
        )
    for child, parent in itertools.pairwise(certs):
        try:
            child.verify_directly_issued_by(parent)
        except (ValueError, TypeError, InvalidSignature) as e:
            raise CAError(
                f"{d}: in {CERT_CHAIN}, {child.subject.rfc4514_string()!r} is not issued by the next certificate"
            ) from e
    if certs[-1] not in roots:
        raise CAError(f"{d}: {CERT_CHAIN} does not end with the root in {ROOT_CERT}; add the root or fix {ROOT_CERT}")


def uri_sans_of_csr(csr: x509.CertificateSigningRequest) -> list[str]:
    """Every SAN of the CSR as text, URIs first (a non-URI SAN makes the CSR unsignable)."""
    try:
        ext = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return []
    others = [n for n in ext.value if not isinstance(n, x509.UniformResourceIdentifier)]
    uris = ext.value.get_values_for_type(x509.UniformResourceIdentifier)
    return uris + [str(o.value) for o in others]


__all__ = [
    "CAError",
    "CertificateAuthority",
    "IdentityRejectedError",
    "InvalidRequestError",
    "SigningRequest",
    "init_ca_dir",
    "parse_csr",
    "random_serial",
    "uri_sans",
]
