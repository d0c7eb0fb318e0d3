"""The node proxy's side of the CA API: send a CSR with the node token, get the chain back."""

from __future__ import annotations

import datetime as dt

import grpc
from google.protobuf import struct_pb2

from ztunnel.errors import ZtunnelError
from ztunnel.identity.authz import IMPERSONATED_IDENTITY
from ztunnel.identity.proto import ca_pb2, ca_pb2_grpc

DEFAULT_TIMEOUT = 10.0


class CAClientError(ZtunnelError):
    """The CA refused or could not be reached; `code` is the gRPC status (None for a bad answer)."""

    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.code = code


class CAClient:
    """A grpc.aio channel to the CA over TLS, verified with the trust bundle. Create inside the loop.

    The channel is opened on first use and kept; `close()` ends it.
    """

    def __init__(
        self,
        address: str,
        root_pem: bytes | str,
        token: str,
        *,
        server_name: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        self.address = address
        self.root_pem = root_pem.encode() if isinstance(root_pem, str) else root_pem
        self.token = token
        self.server_name = server_name
        self.timeout = timeout
        self._channel: grpc.aio.Channel | None = None
        self._stub: ca_pb2_grpc.IstioCertificateServiceStub | None = None

    def _get_stub(self) -> ca_pb2_grpc.IstioCertificateServiceStub:
        if self._stub is None:
            options: list[tuple[str, int | str]] = [
                # Reconnect soon after the CA comes back; our own backoff paces the requests.
                ("grpc.initial_reconnect_backoff_ms", 200),
                ("grpc.min_reconnect_backoff_ms", 200),
                ("grpc.max_reconnect_backoff_ms", 2000),
            ]
            if self.server_name:
                options.append(("grpc.ssl_target_name_override", self.server_name))
            creds = grpc.ssl_channel_credentials(root_certificates=self.root_pem)
            self._channel = grpc.aio.secure_channel(self.address, creds, options=options)
            self._stub = ca_pb2_grpc.IstioCertificateServiceStub(self._channel)
        return self._stub

    async def create_certificate(
        self,
        csr_pem: bytes | str,
        ttl: dt.timedelta | float,
        *,
        impersonated_identity: str = "",
    ) -> list[str]:
        """Return the chain, leaf first and root last; raise CAClientError saying why not."""
        seconds = ttl.total_seconds() if isinstance(ttl, dt.timedelta) else float(ttl)
        request = ca_pb2.IstioCertificateRequest(
            csr=csr_pem.decode() if isinstance(csr_pem, bytes) else csr_pem,
            validity_duration=max(1, round(seconds)),
        )
        if impersonated_identity:
            request.metadata.CopyFrom(struct_pb2.Struct())
            request.metadata.fields[IMPERSONATED_IDENTITY].string_value = impersonated_identity
        try:
            response = await self._get_stub().CreateCertificate(
                request, metadata=(("authorization", f"Bearer {self.token}"),), timeout=self.timeout
            )
        except grpc.aio.AioRpcError as e:
            details = (e.details() or "").strip().splitlines()
            raise CAClientError(
                f"CA at {self.address}: {e.code().name}: {details[0] if details else 'no details'}", e.code()
            ) from e
        chain = list(response.cert_chain)
        if not chain:
            raise CAClientError(f"CA at {self.address} answered with an empty certificate chain")
        return chain

    async def close(self) -> None:
        if self._channel is not None:
            channel, self._channel, self._stub = self._channel, None, None
            await channel.close()
