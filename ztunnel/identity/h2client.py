"""The node proxy's side of the CA API without grpcio: unary gRPC calls over h2 + TLS.

Istio's `IstioCertificateService/CreateCertificate` (DESIGN §4.3) and our
`ztunnel.v1.RevocationService/GetRevocationList` (proto/revocation.proto), the wire the CA server serves
with grpcio, but without loading grpcio/protobuf here: those cost the proxy about 15 MB of RSS for calls
it makes once per rotation and every few seconds for the CRL. The messages are small enough to encode by
hand; the tests check them byte for byte against the messages generated from the .protos.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import enum
import ssl
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import h2.config
import h2.connection
import h2.events
import h2.exceptions

from ztunnel.errors import ZtunnelError
from ztunnel.identity.authz import IMPERSONATED_IDENTITY
from ztunnel.identity.revocation import RevocationAnswer, SignedRevocationList

DEFAULT_TIMEOUT = 10.0
METHOD_PATH = "/istio.v1.auth.IstioCertificateService/CreateCertificate"
REVOCATION_PATH = "/ztunnel.v1.RevocationService/GetRevocationList"
MAX_RESPONSE = 1 << 20  # a chain of a few PEM certificates; more is not an answer


class GrpcStatus(enum.IntEnum):
    """gRPC status codes (the names grpcio's StatusCode uses)."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


class CAClientError(ZtunnelError):
    """The CA refused or could not be reached; `code` is the gRPC status (None for a bad answer)."""

    def __init__(self, message: str, code: GrpcStatus | None = None) -> None:
        super().__init__(message)
        self.code = code


# ---- protobuf, by hand ---------------------------------------------------------------------------
def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _field_bytes(number: int, value: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(value)) + value


def encode_request(csr_pem: str, validity_seconds: int, impersonated_identity: str = "") -> bytes:
    """IstioCertificateRequest{csr=1, validity_duration=2, metadata=3 (Struct{fields=1: map<string, Value>})}."""
    out = _field_bytes(1, csr_pem.encode()) + _varint(2 << 3 | 0) + _varint(validity_seconds)
    if impersonated_identity:
        value = _field_bytes(3, impersonated_identity.encode())  # Value.string_value = 3
        entry = _field_bytes(1, IMPERSONATED_IDENTITY.encode()) + _field_bytes(2, value)
        out += _field_bytes(3, _field_bytes(1, entry))
    return out


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise ValueError("truncated varint")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def _fields(data: bytes) -> Iterator[tuple[int, int | bytes]]:
    """(field number, value) of each field: varints as int, length-delimited as bytes; fixed ones skipped."""
    pos = 0
    while pos < len(data):
        key, pos = _read_varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _read_varint(data, pos)
            yield number, value
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        elif wire == 2:
            size, pos = _read_varint(data, pos)
            if pos + size > len(data):
                raise ValueError("truncated field")
            yield number, data[pos : pos + size]
            pos += size
        else:
            raise ValueError(f"unsupported wire type {wire}")
    if pos != len(data):
        raise ValueError("truncated message")


def decode_response(data: bytes) -> list[str]:
    """IstioCertificateResponse{repeated string cert_chain = 1}; other fields are skipped."""
    return [v.decode() for number, v in _fields(data) if number == 1 and isinstance(v, bytes)]


def encode_revocation_request(known_number: int) -> bytes:
    """RevocationListRequest{uint64 known_number = 1} (proto3: a zero is not sent)."""
    return _varint(1 << 3 | 0) + _varint(known_number) if known_number else b""


def decode_revocation_response(data: bytes) -> RevocationAnswer:
    """RevocationListResponse{bytes crl = 1, uint64 number = 2, repeated string issuer_chain = 3,
    repeated SignedRevocationList{bytes crl = 1, repeated string issuer_chain = 2} retired = 4}."""
    crl = b""
    number = 0
    chain: list[bytes] = []
    retired: list[SignedRevocationList] = []
    for field, value in _fields(data):
        if field == 1 and isinstance(value, bytes):
            crl = value
        elif field == 2 and isinstance(value, int):
            number = value
        elif field == 3 and isinstance(value, bytes):
            chain.append(value)
        elif field == 4 and isinstance(value, bytes):
            retired_crl, retired_chain = b"", []
            for inner, part in _fields(value):
                if inner == 1 and isinstance(part, bytes):
                    retired_crl = part
                elif inner == 2 and isinstance(part, bytes):
                    retired_chain.append(part)
            retired.append(SignedRevocationList(retired_crl, tuple(retired_chain)))
    return RevocationAnswer(crl, number, tuple(chain), tuple(retired))


# ---- the call ------------------------------------------------------------------------------------
class _Call(asyncio.Protocol):
    """One HTTP/2 connection carrying one gRPC request; `result` gets (status, message, body)."""

    def __init__(self, headers: list[tuple[str, str]], body: bytes) -> None:
        self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
        self.headers = headers
        self.body = body
        self.transport: asyncio.Transport | None = None
        self.result: asyncio.Future[tuple[int, str, bytes]] = asyncio.get_running_loop().create_future()
        self._data = bytearray()
        self._status: int | None = None
        self._message = ""
        self._http_status = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.h2.initiate_connection()
        self.h2.send_headers(1, self.headers)
        self.h2.send_data(1, self.body, end_stream=True)  # a CSR is far below the 64 KiB initial window
        self._flush()

    def data_received(self, data: bytes) -> None:
        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError as e:
            self._finish(GrpcStatus.INTERNAL, f"HTTP/2 protocol error: {e}")
            return
        for event in events:
            if isinstance(event, h2.events.DataReceived):
                self._data += event.data
                self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                if len(self._data) > MAX_RESPONSE:
                    self._finish(GrpcStatus.RESOURCE_EXHAUSTED, "response too large")
                    return
            elif isinstance(event, (h2.events.ResponseReceived, h2.events.TrailersReceived)):
                for raw_name, raw_value in event.headers or []:
                    # the connection decodes headers to str; h2's types say bytes
                    name = raw_name.decode() if isinstance(raw_name, bytes) else raw_name
                    value = raw_value.decode() if isinstance(raw_value, bytes) else raw_value
                    if name == ":status":
                        self._http_status = int(value)
                    elif name == "grpc-status":
                        self._status = int(value)
                    elif name == "grpc-message":
                        self._message = urllib.parse.unquote(value)
            elif isinstance(event, h2.events.StreamEnded):
                self._end()
            elif isinstance(event, h2.events.StreamReset):
                self._finish(GrpcStatus.UNAVAILABLE, f"stream reset (HTTP/2 error {event.error_code})")
            elif isinstance(event, h2.events.ConnectionTerminated):
                self._finish(GrpcStatus.UNAVAILABLE, "the CA closed the connection")
        self._flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self._finish(GrpcStatus.UNAVAILABLE, f"connection lost ({exc})" if exc else "connection closed")

    def _end(self) -> None:
        if self._status is None:
            self._finish(GrpcStatus.UNKNOWN, f"no grpc-status in the answer (HTTP {self._http_status})")
        else:
            self._finish(self._status, self._message, bytes(self._data))

    def _finish(self, status: int, message: str, body: bytes = b"") -> None:
        if not self.result.done():
            self.result.set_result((status, message, body))
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def _flush(self) -> None:
        data = self.h2.data_to_send()
        if data and self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)


class CAClient:
    """Calls the CA over TLS (verified with the trust bundle), one connection per call: rotations are rare."""

    def __init__(
        self,
        address: str,
        root_pem: bytes | str,
        token: str | Path,
        *,
        server_name: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        """`token`: the bearer token, or the file holding it, read again for every call: a projected
        service-account token is rotated by the kubelet and expires (12 h in deploy/), so one read at start
        would stop every renewal once it does."""
        self.address = address
        self.root_pem = root_pem.encode() if isinstance(root_pem, str) else root_pem
        self.token = token
        self.server_name = server_name
        self.timeout = timeout
        self._context: ssl.SSLContext | None = None

    def _ssl_context(self) -> ssl.SSLContext:
        if self._context is None:
            ctx = ssl.create_default_context(cadata=self.root_pem.decode())
            ctx.set_alpn_protocols(["h2"])
            self._context = ctx
        return self._context

    def _host_port(self) -> tuple[str, int]:
        host, sep, port = self.address.rpartition(":")
        if not sep or not port.isdigit():
            raise CAClientError(f"CA address {self.address!r} is not HOST:PORT")
        return host.strip("[]"), int(port)

    async def create_certificate(
        self,
        csr_pem: bytes | str,
        ttl: dt.timedelta | float,
        *,
        impersonated_identity: str = "",
    ) -> list[str]:
        """Return the chain, leaf first and root last; raise CAClientError saying why not."""
        seconds = ttl.total_seconds() if isinstance(ttl, dt.timedelta) else float(ttl)
        message = encode_request(
            csr_pem.decode() if isinstance(csr_pem, bytes) else csr_pem,
            max(1, round(seconds)),
            impersonated_identity,
        )
        data = await self._unary(METHOD_PATH, message)
        try:
            chain = decode_response(data)
        except (ValueError, UnicodeDecodeError) as e:
            raise CAClientError(f"CA at {self.address} answered with a malformed certificate chain: {e}") from None
        if not chain:
            raise CAClientError(f"CA at {self.address} answered with an empty certificate chain")
        return chain

    async def get_revocation_list(self, known_number: int = 0) -> RevocationAnswer:
        """The CA's current CRL (unverified: the caller checks it), or only its number when we hold it already."""
        data = await self._unary(REVOCATION_PATH, encode_revocation_request(known_number))
        try:
            return decode_revocation_response(data)
        except ValueError as e:
            raise CAClientError(f"CA at {self.address} answered with a malformed revocation list: {e}") from None

    async def _unary(self, path: str, message: bytes) -> bytes:
        """One call on a new connection; the answer's protobuf message, or CAClientError saying why not."""
        host, port = self._host_port()
        headers = [
            (":method", "POST"),
            (":scheme", "https"),
            (":path", path),
            (":authority", self.address),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
            ("grpc-timeout", f"{max(1, int(self.timeout * 1000))}m"),
            ("authorization", f"Bearer {self._bearer()}"),
        ]
        body = b"\x00" + len(message).to_bytes(4, "big") + message
        loop = asyncio.get_running_loop()
        call: _Call | None = None
        try:
            async with asyncio.timeout(self.timeout):
                _, call = await loop.create_connection(
                    lambda: _Call(headers, body),
                    host,
                    port,
                    ssl=self._ssl_context(),
                    server_hostname=self.server_name or host,
                )
                status, detail, data = await call.result
        except TimeoutError:
            raise CAClientError(
                f"CA at {self.address}: DEADLINE_EXCEEDED: no answer within {self.timeout:g}s",
                GrpcStatus.DEADLINE_EXCEEDED,
            ) from None
        except (OSError, ssl.SSLError) as e:
            raise CAClientError(f"CA at {self.address}: UNAVAILABLE: {e}", GrpcStatus.UNAVAILABLE) from None
        finally:
            if call is not None and call.transport is not None:
                call.transport.close()
        if status != GrpcStatus.OK:
            code = GrpcStatus(status) if status in GrpcStatus._value2member_map_ else GrpcStatus.UNKNOWN
            first = detail.strip().splitlines()
            raise CAClientError(f"CA at {self.address}: {code.name}: {first[0] if first else 'no details'}", code)
        if len(data) < 5 or data[0] != 0 or int.from_bytes(data[1:5], "big") != len(data) - 5:
            raise CAClientError(f"CA at {self.address} answered with a malformed gRPC message")
        return data[5:]

    def _bearer(self) -> str:
        if not isinstance(self.token, Path):
            return self.token
        try:
            return self.token.read_text().strip()
        except (OSError, UnicodeDecodeError) as e:
            why = e.strerror if isinstance(e, OSError) else "not UTF-8"
            raise CAClientError(f"CA at {self.address}: cannot read the token file {self.token}: {why}") from None

    async def close(self) -> None:
        """Nothing stays open between calls."""
