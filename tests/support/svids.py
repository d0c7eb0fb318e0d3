"""SVIDs for test clients and servers that are not a proxy: signed as `ztunnel ca issue` signs them, or forged.

`signed_svid` goes through the CA's own API (a CSR checked and signed by the CA directory's intermediate).
The forgeries chain to a real test CA but break the X.509-SVID rules (CA powers, several URI SANs): OpenSSL
verifies their chain and accepts them; only our SVID checks refuse them, so tests can show those checks on
both sides of a real handshake. A proxy under test gets its certificates from `CertificateManager`, as in
production (tests/support/certs.py).
"""

from __future__ import annotations

import datetime as dt
import re
import ssl
import subprocess
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from ztunnel.identity.ca import CertificateAuthority
from ztunnel.identity.certs import WorkloadCertificate, generate_key, key_to_pem, make_csr
from ztunnel.identity.spiffe import SpiffeId

# name -> (URI SANs after the identity, basicConstraints CA, keyCertSign, cRLSign)
FORGERIES: dict[str, tuple[tuple[str, ...], bool, bool, bool]] = {
    "CA:TRUE": ((), True, False, False),
    "keyCertSign": ((), False, True, False),
    "cRLSign": ((), False, False, True),
    "a second spiffe URI SAN": (("spiffe://cluster.local/ns/shop/sa/other",), False, False, False),
    "a second, non-SPIFFE URI SAN": (("https://example.com/x",), False, False, False),
}


def signed_svid(
    ca_dir: Path, identity: SpiffeId | str, ttl: dt.timedelta = dt.timedelta(hours=1)
) -> WorkloadCertificate:
    """A valid SVID for `identity` from the CA in `ca_dir`, made the way `ztunnel ca issue` makes one."""
    spiffe_id = identity if isinstance(identity, SpiffeId) else SpiffeId.parse(identity)
    ca = CertificateAuthority.load(ca_dir)
    key = generate_key()
    chain = ca.sign_csr(make_csr(key, spiffe_id), ttl=ttl, expected_identity=spiffe_id)
    return WorkloadCertificate(spiffe_id, key_to_pem(key), tuple(chain), ca.roots_pem)


def forged_svid(ca_dir: Path, identity: str, forgery: str) -> WorkloadCertificate:
    """An SVID for `identity`, signed by the CA in `ca_dir`, with the flaw named `forgery` (see FORGERIES)."""
    extra_uris, is_ca, cert_sign, crl_sign = FORGERIES[forgery]
    return issue(ca_dir, [identity, *extra_uris], is_ca=is_ca, key_cert_sign=cert_sign, crl_sign=crl_sign)


def issue(
    ca_dir: Path,
    uris: Sequence[str],
    *,
    is_ca: bool = False,
    key_cert_sign: bool = False,
    crl_sign: bool = False,
    valid: tuple[dt.timedelta, dt.timedelta] = (dt.timedelta(minutes=-5), dt.timedelta(hours=1)),
    self_signed: bool = False,
    serial: int | None = None,
) -> WorkloadCertificate:
    """A leaf for `uris` signed by the CA in `ca_dir` (or by its own key), valid from now+valid[0] to
    now+valid[1], with a random serial unless `serial` is given."""
    ca = CertificateAuthority.load(ca_dir)
    key = generate_key()
    now = dt.datetime.now(dt.UTC)
    signer = key if self_signed else ca.signing_key
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(x509.Name([]) if self_signed else ca.signing_cert.subject)
        .public_key(key.public_key())
        .serial_number(serial if serial is not None else x509.random_serial_number())
        .not_valid_before(now + valid[0])
        .not_valid_after(now + valid[1])
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(u) for u in uris]), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=True,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=key_cert_sign,
                crl_sign=crl_sign,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
        .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(signer.public_key()), critical=False)
        .sign(signer, hashes.SHA256())
    )
    pem = leaf.public_bytes(serialization.Encoding.PEM)
    chain = (pem,) if self_signed else (pem, *ca.chain_pem)
    return WorkloadCertificate(SpiffeId.parse(uris[0]), key_to_pem(key), chain, ca.roots_pem)


class FixedProvider:
    """A CertificateProvider that hands out one certificate whatever the identity asked for."""

    def __init__(self, cert: WorkloadCertificate) -> None:
        self.cert = cert

    async def get(self, identity: SpiffeId) -> WorkloadCertificate:
        return self.cert


def cli_issued(ca_dir: Path, workdir: Path, name: str, identity: str) -> tuple[str, ssl.SSLContext]:
    """An SVID for `identity` from `ztunnel ca issue` (files `<name>.pem`, `.key`, `-bundle.pem` in `workdir`):
    its serial (hex, as the command prints it) and a TLS 1.3 h2 client context presenting it."""
    from tests.integration.conftest import ZTUNNEL

    cert, key, bundle = (workdir / f"{name}{ext}" for ext in (".pem", ".key", "-bundle.pem"))
    out = subprocess.run(
        [
            *(ZTUNNEL, "ca", "issue", "--dir", str(ca_dir), "--id", identity),
            *("--cert-out", str(cert), "--key-out", str(key), "--bundle-out", str(bundle)),
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    serial = re.search(r"serial ([0-9a-f]+)", out)
    assert serial, out
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False
    ctx.set_alpn_protocols(["h2"])
    ctx.load_verify_locations(cafile=str(bundle))
    ctx.load_cert_chain(str(cert), str(key))
    return serial.group(1), ctx
