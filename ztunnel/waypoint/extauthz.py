"""External authorization (`action: CUSTOM`): asking the mesh config's `extensionProviders` as Envoy does.

Two APIs, each a sans-IO pair (build the question, read the answer) plus a thin async client:
- gRPC `envoy.service.auth.v3.Authorization/Check`: the CheckRequest is hand-encoded protobuf with Envoy's
  field numbers (`encode_check_request`) and the CheckResponse hand-decoded (`read_check_response`); the call
  itself goes over grpcio's asyncio channel (plaintext HTTP/2; the waypoint is its own process, so grpcio's
  RSS costs the node proxy nothing, and no generated code is needed: the channel passes bytes through).
- HTTP: the original method and `pathPrefix` + path, the request's Host, `Authorization` and the headers in
  `includeRequestHeadersInCheck`, plus `includeAdditionalHeadersInCheck`, and no body (`http_check_request`);
  a 200 allows (with `headersToUpstreamOnAllow` copied upstream), anything else is the answer the client gets
  (status, body, `headersToDownstreamOnDeny` or all headers) (`read_http_response`).

A provider that cannot be asked (refused, timed out, a malformed answer) is an error: `failOpen` allows, else
the client gets `statusOnError` (403). The provider's Service resolves through the config snapshot to a ready
endpoint's pod IP and target port, dialled directly in plaintext (as Istio's waypoint calls an in-mesh
authorizer without a sidecar); `resolve_provider` does that.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from ztunnel.config import names
from ztunnel.config.model import ClusterConfig, ExtAuthzProvider
from ztunnel.net.http import HttpResponseError, ResponseParser, exchange_async

log = logging.getLogger("ztunnel.waypoint.extauthz")

CHECK_METHOD = "/envoy.service.auth.v3.Authorization/Check"
DEFAULT_HTTP_HEADERS = ("host", "authorization", "content-length")  # Envoy's: with :method and :path
_HOP_BY_HOP = frozenset({"connection", "content-length", "transfer-encoding", "keep-alive", "upgrade", "host"})
MAX_ANSWER = 64 * 1024


@dataclass(frozen=True, slots=True)
class CheckAttributes:
    """What the authorizer is told about one request (Envoy's AttributeContext, the parts a waypoint knows)."""

    source_ip: str
    source_port: int
    source_principal: str
    destination_ip: str
    destination_port: int
    destination_principal: str
    method: str
    path: str  # the request target as received, query included
    host: str
    headers: tuple[tuple[str, str], ...]  # lowercase names, a repeated header joined with ","
    scheme: str = "http"
    protocol: str = "HTTP/1.1"


@dataclass(frozen=True, slots=True)
class AuthzVerdict:
    """The provider's answer. On a deny, `status`/`body`/`headers` are what the client gets."""

    allowed: bool
    reason: str
    status: int = 403
    body: bytes = b""
    headers: tuple[tuple[bytes, bytes], ...] = ()  # to the client on a deny, upstream on an allow
    remove_headers: frozenset[bytes] = field(default_factory=frozenset)  # upstream, lowercase, on an allow


def on_error(provider: ExtAuthzProvider, why: str) -> AuthzVerdict:
    """A provider that could not be asked: `failOpen` allows, else `statusOnError` with an empty body."""
    if provider.fail_open:
        return AuthzVerdict(True, f"ext-authz {provider.name} failed ({why}); failOpen allows")
    return AuthzVerdict(False, f"ext-authz {provider.name} failed ({why})", provider.status_on_error)


# ---------------------------------------------------------------------------------------------------
# Protobuf, by hand (proto3 wire format: varint keys, length-delimited messages and strings)
# ---------------------------------------------------------------------------------------------------
def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _len_field(number: int, data: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(data)) + data


def _str_field(number: int, value: str) -> bytes:
    return _len_field(number, value.encode()) if value else b""  # proto3 leaves defaults out


def _uint_field(number: int, value: int) -> bytes:
    return _varint(number << 3) + _varint(value) if value else b""


def _peer(ip: str, port: int, principal: str) -> bytes:
    # Peer{address=1: Address{socket_address=1: SocketAddress{address=2, port_value=3}}, principal=4}
    socket_address = _str_field(2, ip) + _uint_field(3, port)
    return _len_field(1, _len_field(1, socket_address)) + _str_field(4, principal)


def encode_check_request(a: CheckAttributes) -> bytes:
    """CheckRequest{attributes=1: AttributeContext{source=1, destination=2, request=4: Request{http=2}}}.

    HttpRequest: method=2, headers=3 (map entries key=1 value=2, with Envoy's :authority/:method/:path/:scheme
    pseudo headers first), path=4, host=5, scheme=6, size=9 (-1: unknown), protocol=10."""
    headers = [(":authority", a.host), (":method", a.method), (":path", a.path), (":scheme", a.scheme)]
    headers += [(k, v) for k, v in a.headers if k != "host"]
    entries = b"".join(_len_field(3, _str_field(1, k) + _str_field(2, v)) for k, v in headers)
    size = next((int(v) for k, v in a.headers if k == "content-length" and v.isdigit()), -1)
    http = (
        _str_field(2, a.method)
        + entries
        + _str_field(4, a.path)
        + _str_field(5, a.host)
        + _str_field(6, a.scheme)
        + _uint_field(9, size & 0xFFFFFFFFFFFFFFFF)  # int64: negative values are ten-byte varints
        + _str_field(10, a.protocol)
    )
    context = (
        _len_field(1, _peer(a.source_ip, a.source_port, a.source_principal))
        + _len_field(2, _peer(a.destination_ip, a.destination_port, a.destination_principal))
        + _len_field(4, _len_field(2, http))
    )
    return _len_field(1, context)


class ProtobufError(ValueError):
    pass


def _fields(data: bytes) -> Iterator[tuple[int, int | bytes]]:
    """(field number, value) of one message: an int for varint/fixed fields, bytes for length-delimited."""
    i, end = 0, len(data)

    def varint() -> int:
        nonlocal i
        shift = result = 0
        while True:
            if i >= end or shift > 63:
                raise ProtobufError("truncated varint")
            b = data[i]
            i += 1
            result |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                return result

    while i < end:
        key = varint()
        number, wire = key >> 3, key & 7
        if wire == 0:
            yield number, varint()
        elif wire == 2:
            n = varint()
            if i + n > end:
                raise ProtobufError("truncated field")
            yield number, data[i : i + n]
            i += n
        elif wire in (1, 5):
            n = 8 if wire == 1 else 4
            if i + n > end:
                raise ProtobufError("truncated field")
            yield number, int.from_bytes(data[i : i + n], "little")
            i += n
        else:
            raise ProtobufError(f"unsupported wire type {wire}")


def _message(data: int | bytes) -> bytes:
    if not isinstance(data, bytes):
        raise ProtobufError("expected a message")
    return data


def _header_options(data: bytes) -> tuple[bytes, bytes] | None:
    """HeaderValueOption{header=1: HeaderValue{key=1, value=2, raw_value=3}} -> (lowercase key, value)."""
    for number, value in _fields(data):
        if number == 1:
            key, val = b"", b""
            for n, v in _fields(_message(value)):
                if n == 1:
                    key = _message(v).lower()
                elif n in (2, 3):
                    val = _message(v)
            return (key, val) if key else None
    return None


def read_check_response(provider: ExtAuthzProvider, data: bytes) -> AuthzVerdict:
    """CheckResponse{status=1: google.rpc.Status{code=1, message=2}, denied_response=2, ok_response=3}.

    DeniedHttpResponse: status=1 (HttpStatus{code=1}; 403 when absent), headers=2, body=3.
    OkHttpResponse: headers=2 (added upstream), headers_to_remove=5."""
    try:
        code, message = 0, ""
        denied: bytes | None = None
        ok: bytes | None = None
        for number, value in _fields(data):
            if number == 1:
                for n, v in _fields(_message(value)):
                    if n == 1 and isinstance(v, int):
                        code = v
                    elif n == 2:
                        message = _message(v).decode("utf-8", "replace")
            elif number == 2:
                denied = _message(value)
            elif number == 3:
                ok = _message(value)
        if code == 0:
            add, remove = [], set()
            for n, v in _fields(ok or b""):
                if n == 2 and (h := _header_options(_message(v))) is not None:
                    add.append(h)
                elif n == 5:
                    remove.add(_message(v).lower())
            return AuthzVerdict(True, f"ext-authz {provider.name} allowed", 200, b"", tuple(add), frozenset(remove))
        status, body, headers = 403, b"", []
        for n, v in _fields(denied or b""):
            if n == 1:
                for n2, v2 in _fields(_message(v)):
                    if n2 == 1 and isinstance(v2, int) and 200 <= v2 <= 599:
                        status = v2
            elif n == 2 and (h := _header_options(_message(v))) is not None:
                headers.append(h)
            elif n == 3:
                body = _message(v)
        why = f"ext-authz {provider.name} denied (grpc status {code}{': ' + message if message else ''})"
        return AuthzVerdict(False, why, status, body, tuple(headers))
    except ProtobufError as e:
        return on_error(provider, f"malformed CheckResponse: {e}")


# ---------------------------------------------------------------------------------------------------
# The HTTP API
# ---------------------------------------------------------------------------------------------------
def _wanted(name: str, patterns: tuple[str, ...]) -> bool:
    """Istio's header list matching: exact, `prefix*` or `*suffix` (names lowercase)."""
    for p in patterns:
        if p == name or (p.endswith("*") and name.startswith(p[:-1])) or (p.startswith("*") and name.endswith(p[1:])):
            return True
    return False


def http_check_request(provider: ExtAuthzProvider, a: CheckAttributes) -> bytes:
    """The HTTP/1.1 request to the authorizer: original method, `pathPrefix` + original path, no body."""
    path = provider.path_prefix.rstrip("/") + a.path if provider.path_prefix else a.path
    lines = [f"{a.method} {path} HTTP/1.1", f"host: {a.host}"]
    for k, v in a.headers:
        if k in ("host", "content-length", "connection", "transfer-encoding", "expect", "upgrade"):
            continue
        if k in DEFAULT_HTTP_HEADERS or _wanted(k, provider.include_request_headers):
            lines.append(f"{k}: {v}")
    lines += [f"{k}: {v}" for k, v in provider.include_additional_headers]
    lines += ["content-length: 0", "connection: close"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def read_http_response(
    provider: ExtAuthzProvider, status: int, headers: tuple[tuple[str, str], ...], body: bytes
) -> AuthzVerdict:
    """200 allows, with the headers named in `headersToUpstreamOnAllow` (none when unset) copied upstream;
    any other status is the client's answer, with `headersToDownstreamOnDeny` (all when unset)."""
    encoded = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers]
    if status == 200:
        up = tuple((k, v) for k, v in encoded if _wanted(k.decode("latin-1"), provider.headers_to_upstream_on_allow))
        return AuthzVerdict(True, f"ext-authz {provider.name} allowed", 200, b"", up)
    allowed = provider.headers_to_downstream_on_deny
    down = tuple(
        (k, v)
        for k, v in encoded
        if k.decode("latin-1") not in _HOP_BY_HOP and (not allowed or _wanted(k.decode("latin-1"), allowed))
    )
    return AuthzVerdict(False, f"ext-authz {provider.name} denied with {status}", status, body, down)


# ---------------------------------------------------------------------------------------------------
# Where the provider is, and the clients
# ---------------------------------------------------------------------------------------------------
def resolve_provider(config: ClusterConfig, provider: ExtAuthzProvider) -> tuple[str, int] | str:
    """The provider's Service -> a ready endpoint's (pod IP, target port), or why there is none (config/names.py:
    `name.ns`, `name.ns.svc`, `name.ns.svc.cluster.local` or a ClusterIP; the mesh config has no namespace of
    its own to resolve a bare name in)."""
    where = names.resolve(config, provider.service, provider.port)
    if where is None:
        return f"provider {provider.name}: no Service {provider.service}"
    if isinstance(where, str):
        return f"provider {provider.name}: {where}"
    return where


class Authorizers:
    """The waypoint's ext-authz clients: one grpcio channel per authorizer address, HTTP one connection per
    check. `check` never raises: a provider that cannot be asked yields `on_error`'s verdict."""

    def __init__(self) -> None:
        self._channels: dict[tuple[str, int], Any] = {}

    async def check(self, config: ClusterConfig, provider: ExtAuthzProvider, a: CheckAttributes) -> AuthzVerdict:
        where = resolve_provider(config, provider)
        if isinstance(where, str):
            return on_error(provider, where)
        try:
            async with asyncio.timeout(provider.timeout):
                if provider.kind == "grpc":
                    return read_check_response(provider, await self._grpc(where, encode_check_request(a)))
                return await self._http(provider, where, http_check_request(provider, a))
        except TimeoutError:
            return on_error(provider, f"no answer within {provider.timeout:g}s")
        except (OSError, HttpResponseError) as e:
            return on_error(provider, str(e) or type(e).__name__)
        except Exception as e:  # grpc.aio.AioRpcError and friends: any failure of the call is the provider's
            return on_error(provider, f"{type(e).__name__}: {e}")

    async def _grpc(self, where: tuple[str, int], request: bytes) -> bytes:
        import grpc  # only when a gRPC provider is used

        channel = self._channels.get(where)
        if channel is None:
            host = f"[{where[0]}]" if ":" in where[0] else where[0]
            channel = self._channels[where] = grpc.aio.insecure_channel(f"{host}:{where[1]}")
        call = channel.unary_unary(CHECK_METHOD)  # no serializers: bytes in, bytes out
        answer = await call(request)
        if not isinstance(answer, bytes):
            raise HttpResponseError("CheckResponse is not bytes")
        return answer

    async def _http(self, provider: ExtAuthzProvider, where: tuple[str, int], request: bytes) -> AuthzVerdict:
        response = await exchange_async(where[0], where[1], request, ResponseParser(max_bytes=MAX_ANSWER))
        return read_http_response(provider, response.status, response.headers, response.body)

    async def close(self) -> None:
        channels, self._channels = self._channels, {}
        for channel in channels.values():
            await channel.close()
