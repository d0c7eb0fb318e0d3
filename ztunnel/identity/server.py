"""The CA server: Istio's `IstioCertificateService/CreateCertificate` over TLS, with node authorization.

The server's own TLS certificate is made at start from the same CA (serverAuth, DNS/IP SANs), so
clients verify it with the trust bundle they already hold. Every refusal is a gRPC status with a
message that says why; a bad request never stops the server.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import grpc
from google.protobuf.message import DecodeError

from ztunnel.config.model import ClusterConfig
from ztunnel.config.source import ConfigSource
from ztunnel.errors import ZtunnelError
from ztunnel.identity.authz import (
    CALLER_PEER,
    IMPERSONATED_IDENTITY,
    Authenticator,
    Caller,
    NodeAuthError,
    NodeTokens,
    Refusal,
    TokenFileError,
    check_request,
    load_node_tokens,
)
from ztunnel.identity.ca import DEFAULT_TTL, CAError, CertificateAuthority
from ztunnel.identity.certs import generate_key, key_to_pem
from ztunnel.identity.proto import ca_pb2, ca_pb2_grpc, revocation_pb2

log = logging.getLogger("ztunnel.ca")

MAX_REQUEST_BYTES = 64 * 1024  # a CSR is < 1 KiB; anything near this is abuse, refused before parsing
_STATUS = {
    Refusal.UNAUTHENTICATED: grpc.StatusCode.UNAUTHENTICATED,
    Refusal.PERMISSION_DENIED: grpc.StatusCode.PERMISSION_DENIED,
    Refusal.INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
    Refusal.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
}


class CAServerError(ZtunnelError):
    pass


def split_host_port(listen: str) -> tuple[str, int]:
    """`127.0.0.1:15012`, `[::1]:15012`, `localhost:0` -> (host, port)."""
    host, sep, port_text = listen.rpartition(":")
    if not sep or not host:
        raise CAServerError(f"--listen {listen!r}: expected HOST:PORT, e.g. 127.0.0.1:15012 or [::1]:15012")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        port = int(port_text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise CAServerError(f"--listen {listen!r}: the port must be a number from 0 to 65535")
    return host, port


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def server_names(host: str, dns_names: Sequence[str]) -> tuple[list[str], list[str]]:
    """DNS and IP SANs of the server cert: localhost and loopback, the listen IP, and each --dns-name."""
    dns = ["localhost"]
    ips = ["127.0.0.1", "::1"]
    for name in (host, *dns_names):
        if not name or name in ("0.0.0.0", "::"):
            continue  # a wildcard listen address names no host; give --dns-name for the real ones
        (ips if _is_ip(name) else dns).append(name)
    return list(dict.fromkeys(dns)), list(dict.fromkeys(ips))


class _CertificateService(ca_pb2_grpc.IstioCertificateServiceServicer):
    def __init__(self, server: CAServer) -> None:
        self._server = server

    async def CreateCertificate(  # the name is fixed by the .proto
        self, body: bytes, context: grpc.aio.ServicerContext
    ) -> ca_pb2.IstioCertificateResponse:
        metadata = {k.lower(): v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}
        peer = context.peer()
        CALLER_PEER.set(peer or "")
        try:
            caller = await self._server.authenticate(metadata.get("authorization"))
            chain = self._server.sign_body(body, metadata.get("authorization"), caller=caller)
        except NodeAuthError as e:
            log.warning("certificate refused: %s", e, extra={"peer": peer, "status": e.refusal.value})
            await context.abort(_STATUS[e.refusal], str(e))
            raise AssertionError("unreachable") from e  # abort raises
        return ca_pb2.IstioCertificateResponse(cert_chain=chain)


def _certificate_handler(service: _CertificateService) -> grpc.GenericRpcHandler:
    """CreateCertificate with the request body as bytes (no deserializer): the node is authenticated before
    the body is decoded, and a body that does not decode is INVALID_ARGUMENT, not an exception in grpc's
    deserializer (status UNKNOWN and a traceback in the log)."""
    return grpc.method_handlers_generic_handler(
        "istio.v1.auth.IstioCertificateService",
        {
            "CreateCertificate": grpc.unary_unary_rpc_method_handler(
                service.CreateCertificate,
                request_deserializer=None,
                response_serializer=ca_pb2.IstioCertificateResponse.SerializeToString,
            )
        },
    )


class _RevocationService:
    """Our own service beside Istio's API (which has no CRL): proxies poll it (ztunnel.identity.revocation).

    Like CreateCertificate, the body arrives as bytes: the node is authenticated before it is decoded.
    """

    def __init__(self, server: CAServer) -> None:
        self._server = server

    async def GetRevocationList(  # the name is fixed by the .proto
        self, body: bytes, context: grpc.aio.ServicerContext
    ) -> revocation_pb2.RevocationListResponse:
        metadata = {k.lower(): v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}
        CALLER_PEER.set(context.peer() or "")
        try:
            await self._server.authenticate(metadata.get("authorization"))
            return self._server.revocation_list(body, metadata.get("authorization"), authenticated=True)
        except NodeAuthError as e:
            log.warning("CRL request refused: %s", e, extra={"peer": context.peer(), "status": e.refusal.value})
            await context.abort(_STATUS[e.refusal], str(e))
            raise AssertionError("unreachable") from e  # abort raises
        except CAError as e:
            log.error("cannot publish the CRL: %s", e)
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"the CA cannot publish its CRL: {e}")
            raise AssertionError("unreachable") from e

    def handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(
            "ztunnel.v1.RevocationService",
            {
                "GetRevocationList": grpc.unary_unary_rpc_method_handler(
                    self.GetRevocationList,
                    request_deserializer=None,
                    response_serializer=revocation_pb2.RevocationListResponse.SerializeToString,
                )
            },
        )


class CAServer:
    """Owns one grpc.aio server; `start()` binds and returns the port, `stop()` drains it."""

    def __init__(
        self,
        ca: CertificateAuthority,
        tokens: NodeTokens | Authenticator,
        config: Callable[[], ClusterConfig | None],
        *,
        listen: str,
        dns_names: Sequence[str] = (),
        default_ttl: dt.timedelta = DEFAULT_TTL,
        max_request_bytes: int = MAX_REQUEST_BYTES,
    ) -> None:
        self.ca = ca
        self.tokens = tokens
        self.config = config
        self.host, self.requested_port = split_host_port(listen)
        self.dns_names = list(dns_names)
        self.default_ttl = default_ttl
        self.max_request_bytes = max_request_bytes
        self.port = 0
        self.issued = 0
        self.refused = 0
        self._server: grpc.aio.Server | None = None

    async def authenticate(self, authorization: str | None) -> Caller:
        """Who is calling (node token, or TokenReview with `--source kubernetes`); NodeAuthError if unknown."""
        try:
            return await self.tokens.authenticate(authorization)
        except NodeAuthError:
            self.refused += 1
            raise

    def _node_token_caller(self, authorization: str | None) -> Caller:
        """The synchronous path (tests, local mode): only a node token file can answer without I/O."""
        if not isinstance(self.tokens, NodeTokens):
            raise TypeError("this CA authenticates callers with I/O: await authenticate() and pass caller=")
        return Caller(self.tokens.node_for(authorization))

    def sign_body(self, body: bytes, authorization: str | None, *, caller: Caller | None = None) -> list[str]:
        """`sign` for a request still in its wire form: the token is checked first (or `caller` is the one
        `authenticate` found), so an unauthenticated caller gets UNAUTHENTICATED whatever it sent, and nothing
        of its body is parsed."""
        try:
            if caller is None:
                caller = self._node_token_caller(authorization)
            try:
                request = ca_pb2.IstioCertificateRequest.FromString(body)
            except DecodeError as e:
                raise NodeAuthError(
                    Refusal.INVALID_ARGUMENT, f"the request body is not an IstioCertificateRequest: {e}"
                ) from None
        except NodeAuthError:
            self.refused += 1
            raise
        return self.sign(request, authorization, caller=caller)

    def sign(
        self,
        request: ca_pb2.IstioCertificateRequest,
        authorization: str | None,
        *,
        node: str | None = None,
        caller: Caller | None = None,
    ) -> list[str]:
        """Authenticate the node (unless `node` or `caller` is already known), authorize the identity, sign.
        Raises NodeAuthError saying why not."""
        try:
            if caller is None:
                caller = Caller(node) if node is not None else self._node_token_caller(authorization)
            node = caller.node
            impersonated = ""
            if request.HasField("metadata") and IMPERSONATED_IDENTITY in request.metadata.fields:
                value = request.metadata.fields[IMPERSONATED_IDENTITY]
                if value.WhichOneof("kind") != "string_value":
                    raise NodeAuthError(Refusal.INVALID_ARGUMENT, f"metadata {IMPERSONATED_IDENTITY} must be a string")
                impersonated = value.string_value
            req = check_request(
                self.config(),
                node,
                request.csr,
                trust_domain=self.ca.trust_domain,
                impersonated=impersonated,
                caller=caller,
            )
            if request.validity_duration < 0:
                raise NodeAuthError(Refusal.INVALID_ARGUMENT, "validity_duration must not be negative")
            ttl = dt.timedelta(seconds=request.validity_duration) if request.validity_duration else self.default_ttl
            try:
                chain = self.ca.issue(req.identity, req.public_key, ttl)
            except CAError as e:
                raise NodeAuthError(Refusal.INVALID_ARGUMENT, str(e)) from e
        except NodeAuthError:
            self.refused += 1
            raise
        self.issued += 1
        log.info(
            "certificate issued",
            extra={"node": node, "caller": str(caller), "identity": req.identity.uri, "ttl_s": ttl.total_seconds()},
        )
        return [c.decode() for c in chain]

    def revocation_list(
        self, body: bytes, authorization: str | None, *, authenticated: bool = False
    ) -> revocation_pb2.RevocationListResponse:
        """The current CRL (and the replaced intermediates' last ones) for an authenticated node; only the
        number when it holds the current one already."""
        if not authenticated:
            self._node_token_caller(authorization)  # raises NodeAuthError: the same credential as for certificates
        try:
            request = revocation_pb2.RevocationListRequest.FromString(body)
        except DecodeError as e:
            raise NodeAuthError(Refusal.INVALID_ARGUMENT, "the request is not a RevocationListRequest") from e
        answer = self.ca.published_revocations(request.known_number)
        return revocation_pb2.RevocationListResponse(
            crl=answer.crl,
            number=answer.number,
            issuer_chain=[c.decode() for c in answer.issuer_chain],
            retired=[
                revocation_pb2.SignedRevocationList(crl=r.crl, issuer_chain=[c.decode() for c in r.issuer_chain])
                for r in answer.retired
            ],
        )

    def _credentials(self) -> grpc.ServerCredentials:
        key = generate_key()
        dns, ips = server_names(self.host, self.dns_names)
        chain = self.ca.issue_server_cert(key.public_key(), dns_names=dns, ip_addresses=ips)
        return grpc.ssl_server_credentials([(key_to_pem(key), b"".join(chain[:-1]) or chain[0])])

    async def start(self) -> int:
        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", self.max_request_bytes),
                ("grpc.max_send_message_length", 1024 * 1024),
                ("grpc.max_metadata_size", 16 * 1024),
                ("grpc.so_reuseport", 0),  # a second server on the same port must fail, not share it
            ],
            maximum_concurrent_rpcs=256,
        )
        server.add_generic_rpc_handlers((_certificate_handler(_CertificateService(self)),))
        server.add_generic_rpc_handlers((_RevocationService(self).handler(),))
        address = f"[{self.host}]:{self.requested_port}" if ":" in self.host else f"{self.host}:{self.requested_port}"
        try:
            self.port = server.add_secure_port(address, self._credentials())
        except RuntimeError as e:
            raise CAServerError(f"cannot listen on {address}: {e}; is the port in use?") from e
        if self.port == 0:
            raise CAServerError(f"cannot listen on {address}; is the port in use or the address not local?")
        await server.start()
        self._server = server
        log.info("CA server listening", extra={"address": f"{self.host}:{self.port}"})
        return self.port

    async def stop(self, grace: float = 1.0) -> None:
        if self._server is not None:
            server, self._server = self._server, None
            await server.stop(grace)

    async def wait(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()


async def watch_token_file(server: CAServer, path: Path, interval: float = 1.0) -> None:
    """Reload the node-token file when it changes (a node joins); keep the old tokens if the new file is bad."""

    def stamp() -> tuple[int, int, int, int] | None:
        try:
            st = os.stat(path)
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino, st.st_mode)

    last = stamp()
    while True:
        await asyncio.sleep(interval)
        now = stamp()
        if now == last:
            continue
        last = now
        try:
            server.tokens = NodeTokens(load_node_tokens(path))
        except TokenFileError as e:
            log.error("node token file rejected, keeping the previous tokens: %s", e)
            continue
        log.info("node token file reloaded", extra={"nodes": len(set(server.tokens.tokens.values()))})


async def run_ca_server(
    ca: CertificateAuthority,
    tokens: NodeTokens,
    config_files: Sequence[str],
    *,
    listen: str,
    dns_names: Sequence[str],
    default_ttl: dt.timedelta,
    stop: asyncio.Event,
    token_file: str | Path | None = None,
    source: ConfigSource | None = None,
) -> None:
    """The `ca serve` lifetime: load and watch the config (and token file), serve until `stop` is set.
    `source`: the Kubernetes API's (`--source kubernetes`) instead of the `config_files`."""
    from ztunnel.config.source import FileConfigSource

    if source is None:
        source = FileConfigSource(config_files, trust_domain=ca.trust_domain)
    source.load()  # a bad config at start is a user error (ConfigError), later ones keep the last good one
    server = CAServer(ca, tokens, lambda: source.current, listen=listen, dns_names=dns_names, default_ttl=default_ttl)
    await server.start()
    try:
        async with asyncio.TaskGroup() as tg:
            watchers = [tg.create_task(source.watch())]
            if token_file is not None:
                watchers.append(tg.create_task(watch_token_file(server, Path(token_file))))
            await stop.wait()
            for w in watchers:
                w.cancel()
    finally:
        await server.stop()
