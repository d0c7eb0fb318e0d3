"""Certificates for the proxy: the identity manager when it is available, else a small in-process signer.

The fallback signs with the CA directory directly (local mode and tests); it caches one certificate per
identity and re-signs at half-life, which is all the data plane needs from the CertificateProvider protocol.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from pathlib import Path

from ztunnel.identity.ca import CertificateAuthority
from ztunnel.identity.certs import WorkloadCertificate, generate_key, key_to_pem, make_csr, split_pem_chain
from ztunnel.identity.spiffe import SpiffeId


class SigningProvider:
    """CertificateProvider backed by a CertificateAuthority in this process."""

    def __init__(self, ca: CertificateAuthority, *, ttl: dt.timedelta = dt.timedelta(hours=24)) -> None:
        self.ca = ca
        self.ttl = ttl
        self._certs: dict[SpiffeId, WorkloadCertificate] = {}
        self._locks: dict[SpiffeId, asyncio.Lock] = {}

    @classmethod
    def from_dir(cls, ca_dir: str | Path, *, ttl: dt.timedelta = dt.timedelta(hours=24)) -> SigningProvider:
        return cls(CertificateAuthority.load(ca_dir), ttl=ttl)

    def _fresh(self, cert: WorkloadCertificate | None) -> bool:
        if cert is None:
            return False
        now = dt.datetime.now(dt.UTC)
        return now < cert.not_before + (cert.not_after - cert.not_before) / 2

    async def get(self, identity: SpiffeId) -> WorkloadCertificate:
        cert = self._certs.get(identity)
        if self._fresh(cert):
            assert cert is not None
            return cert
        lock = self._locks.setdefault(identity, asyncio.Lock())
        async with lock:
            cert = self._certs.get(identity)
            if self._fresh(cert):
                assert cert is not None
                return cert
            cert = self.sign(identity)
            self._certs[identity] = cert
            return cert

    def sign(self, identity: SpiffeId) -> WorkloadCertificate:
        key = generate_key()
        chain = self.ca.sign_csr(make_csr(key, identity), ttl=self.ttl, expected_identity=identity)
        roots = b"".join(split_pem_chain(self.ca.roots_pem))
        return WorkloadCertificate(identity=identity, key_pem=key_to_pem(key), chain_pem=tuple(chain), roots_pem=roots)

    def forget(self, identity: SpiffeId) -> None:
        self._certs.pop(identity, None)

    def cached(self, identity: SpiffeId) -> WorkloadCertificate | None:
        return self._certs.get(identity)
