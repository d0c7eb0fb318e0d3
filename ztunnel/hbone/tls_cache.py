"""SSL contexts per workload certificate, built once per certificate and CRL set (building one per
connection costs milliseconds of key loading and chain parsing).

A context is rebuilt when the leaf or the CRLs change: a context carries the revocations its peers are
checked against (`HboneContext.revocations`, read by `peer_identity` after the handshake), and a listener
keeps the context it was made with, so the server swaps to the newest one at ClientHello time.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass

from ztunnel.identity.certs import CertificateProvider, WorkloadCertificate
from ztunnel.identity.revocation import RevocationSet
from ztunnel.identity.spiffe import SpiffeId
from ztunnel.identity.tls import client_context, server_context


@dataclass
class _Entry:
    leaf_pem: bytes
    revocations: RevocationSet | None
    context: ssl.SSLContext
    certificate: WorkloadCertificate


class TlsContexts:
    """Client and server contexts for local identities, rebuilt only when the certificate changes."""

    def __init__(self, provider: CertificateProvider) -> None:
        self.provider = provider
        self._client: dict[SpiffeId, _Entry] = {}
        self._server: dict[SpiffeId, _Entry] = {}

    async def client(self, identity: SpiffeId) -> ssl.SSLContext:
        return self._context(self._client, await self.provider.get(identity), client_context)

    async def server(self, identity: SpiffeId) -> ssl.SSLContext:
        return self._context(self._server, await self.provider.get(identity), self._server_context)

    def _server_context(self, cert: WorkloadCertificate) -> ssl.SSLContext:
        ctx = server_context(cert)
        # No session tickets: a resumed TLS 1.3 session skips the client certificate check, and tickets are
        # sealed with the listener's first context, which the ClientHello swap below does not replace, so a
        # ticket taken before a revocation would outlive it. HBONE clients never resume anyway.
        ctx.num_tickets = 0
        identity = cert.identity

        def use_newest(ssl_object: ssl.SSLObject, _name: str | None, current: ssl.SSLContext) -> None:
            newest = self.cached_server(identity)
            if newest is not None and newest is not current:
                ssl_object.context = newest

        ctx.sni_callback = use_newest  # runs at every ClientHello, with or without SNI
        return ctx

    async def refresh(self, identity: SpiffeId) -> None:
        """Rebuild the contexts of `identity` if its certificate or CRL changed (rotation, revocation)."""
        cert = await self.provider.get(identity)
        if identity in self._server:
            self._context(self._server, cert, self._server_context)
        if identity in self._client:
            self._context(self._client, cert, client_context)

    def cached_server(self, identity: SpiffeId) -> ssl.SSLContext | None:
        """The newest server context we built for `identity`, without awaiting (for SNI-time swaps)."""
        entry = self._server.get(identity)
        return entry.context if entry else None

    def certificate(self, identity: SpiffeId) -> WorkloadCertificate | None:
        entry = self._server.get(identity) or self._client.get(identity)
        return entry.certificate if entry else None

    def identities(self) -> set[SpiffeId]:
        """Every identity with a cached context (what a CRL change must rebuild)."""
        return set(self._server) | set(self._client)

    def forget(self, identity: SpiffeId) -> None:
        self._client.pop(identity, None)
        self._server.pop(identity, None)

    @staticmethod
    def _context(cache: dict[SpiffeId, _Entry], cert: WorkloadCertificate, build: object) -> ssl.SSLContext:
        entry = cache.get(cert.identity)
        leaf = cert.chain_pem[0]
        if entry is None or entry.leaf_pem != leaf or entry.revocations != cert.revocations:
            assert callable(build)
            entry = _Entry(leaf, cert.revocations, build(cert), cert)
            cache[cert.identity] = entry
        return entry.context
