"""SSL contexts per workload certificate, built once per certificate and CRL (building one per connection
costs milliseconds of key loading and chain parsing).

A context is rebuilt when the leaf or the CRL changes: OpenSSL cannot remove a CRL from a store, and a
context keeps the verification state it was built with, so a new CRL needs new contexts to reach new
handshakes (the server swaps to the newest one at ClientHello time).
"""

from __future__ import annotations

import ssl
import weakref
from dataclasses import dataclass

from ztunnel.identity.certs import CertificateProvider, WorkloadCertificate
from ztunnel.identity.spiffe import SpiffeId
from ztunnel.identity.tls import client_context, server_context


@dataclass
class _Entry:
    leaf_pem: bytes
    crl_pem: bytes
    context: ssl.SSLContext
    certificate: WorkloadCertificate


class TlsContexts:
    """Client and server contexts for local identities, rebuilt only when the certificate changes."""

    def __init__(self, provider: CertificateProvider) -> None:
        self.provider = provider
        self._client: dict[SpiffeId, _Entry] = {}
        self._server: dict[SpiffeId, _Entry] = {}
        # Server contexts handed out (to listeners): a connection takes its verify flags from the listener's
        # context at accept time and keeps them through the ClientHello swap, so these must ask for CRL
        # checks exactly when the newest context holds a CRL (weak: a closed listener lets its context go).
        self._handed: dict[SpiffeId, weakref.WeakSet[ssl.SSLContext]] = {}

    async def client(self, identity: SpiffeId) -> ssl.SSLContext:
        return self._context(self._client, await self.provider.get(identity), client_context)

    async def server(self, identity: SpiffeId) -> ssl.SSLContext:
        cert = await self.provider.get(identity)
        ctx = self._context(self._server, cert, self._server_context)
        self._handed.setdefault(identity, weakref.WeakSet()).add(ctx)
        return ctx

    def _server_context(self, cert: WorkloadCertificate) -> ssl.SSLContext:
        ctx = server_context(cert)
        for handed in self._handed.get(cert.identity, ()):
            if cert.crl_pem:
                handed.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
            else:
                handed.verify_flags &= ~ssl.VERIFY_CRL_CHECK_LEAF
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
        self._handed.pop(identity, None)

    @staticmethod
    def _context(cache: dict[SpiffeId, _Entry], cert: WorkloadCertificate, build: object) -> ssl.SSLContext:
        entry = cache.get(cert.identity)
        leaf = cert.chain_pem[0]
        if entry is None or entry.leaf_pem != leaf or entry.crl_pem != cert.crl_pem:
            assert callable(build)
            entry = _Entry(leaf, cert.crl_pem, build(cert), cert)
            cache[cert.identity] = entry
        return entry.context
