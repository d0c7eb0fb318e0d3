"""A tiny HTTP/1.1 server for control ports: metrics, admin, readiness, and the node agent's CNI socket; and
the one small client the project's own processes use to ask such ports (the worker supervisor, the lab).

These ports see a handful of requests a minute (Prometheus scrapes, kubelet probes, an operator's
curl, a CNI ADD per pod), so the server answers one request per connection and closes it (no keep-alive). The request
parser is sans-IO (`RequestParser.feed(bytes)`), bounded in every dimension, and turns bad input into
a 4xx/5xx status rather than an exception that escapes: a scanner hitting the admin port must never
disturb the proxy. The client is the mirror image: one request per connection (`Connection: close`), a sans-IO
`ResponseParser` bounded in head and body size, and two thin I/O edges (`http_request` on a blocking socket,
`http_request_async` on asyncio). The CNI plugin keeps its own standard-library client: it ships alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import re
import socket
import ssl
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

log = logging.getLogger("ztunnel.net.http")

# Limits. A request head bigger than this is not a metrics scrape or a probe; answer 431.
MAX_HEAD_BYTES = 16 * 1024
MAX_HEADERS = 64
MAX_BODY_BYTES = 64 * 1024  # admin POSTs carry parameters in the query; bodies are small if any
REQUEST_TIMEOUT = 10.0  # whole request, so slow-loris clients cannot hold a connection slot
MAX_CONNECTIONS = 64  # concurrent connections per server; more are closed at once
CLOSE_GRACE = 1.0  # seconds close() lets in-flight handlers finish after their connection is aborted

_TOKEN = re.compile(rb"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_VERSION = re.compile(rb"^HTTP/(\d)\.(\d)$")
_HEAD_END = re.compile(rb"\r?\n\r?\n")


class HttpParseError(Exception):
    """The request cannot be served; `status` is what to answer."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass(frozen=True, slots=True, kw_only=True)
class Request:
    method: str
    target: str
    path: str
    query: Mapping[str, str]
    version: str
    headers: tuple[tuple[str, str], ...]  # names lowercased, in arrival order
    body: bytes = b""

    def header(self, name: str) -> str | None:
        name = name.lower()
        for k, v in self.headers:
            if k == name:
                return v
        return None


class RequestParser:
    """Sans-IO parser of one HTTP/1.x request: feed bytes until it returns a `Request`.

    Raises `HttpParseError` with the status to answer for malformed or oversized input. Accepts bare
    LF line ends (as curl/nc users type them) but not obsolete header folding or chunked bodies.
    """

    def __init__(
        self, *, max_head: int = MAX_HEAD_BYTES, max_headers: int = MAX_HEADERS, max_body: int = MAX_BODY_BYTES
    ) -> None:
        self._buf = bytearray()
        self._max_head = max_head
        self._max_headers = max_headers
        self._max_body = max_body
        self._head: tuple[str, str, str, tuple[tuple[str, str], ...]] | None = None
        self._body_len = 0
        self.request: Request | None = None

    def feed(self, data: bytes) -> Request | None:
        if self.request is not None:
            return self.request  # one request per connection: anything after it is ignored
        self._buf += data
        if self._head is None:
            m = _HEAD_END.search(self._buf)
            if m is None:
                if len(self._buf) > self._max_head:
                    raise HttpParseError(431, "request head too large")
                return None
            if m.start() > self._max_head:
                raise HttpParseError(431, "request head too large")
            head = bytes(self._buf[: m.start()])
            del self._buf[: m.end()]
            self._head = self._parse_head(head)
        method, target, version, headers = self._head
        if len(self._buf) < self._body_len:
            return None
        body = bytes(self._buf[: self._body_len])
        split = urlsplit(target)
        self.request = Request(
            method=method,
            target=target,
            path=unquote(split.path),
            query=dict(parse_qsl(split.query, keep_blank_values=True)),
            version=version,
            headers=headers,
            body=body,
        )
        return self.request

    def _parse_head(self, head: bytes) -> tuple[str, str, str, tuple[tuple[str, str], ...]]:
        lines = head.split(b"\n")
        lines = [line[:-1] if line.endswith(b"\r") else line for line in lines]
        while lines and not lines[0]:
            lines.pop(0)  # RFC 9112 §2.2: ignore empty lines before the request line
        if not lines:
            raise HttpParseError(400, "empty request")
        parts = lines[0].split(b" ")
        if len(parts) != 3:
            raise HttpParseError(400, "malformed request line")
        method, target, version = parts
        if not _TOKEN.match(method):
            raise HttpParseError(400, "malformed method")
        vm = _VERSION.match(version)
        if vm is None:
            raise HttpParseError(400, "malformed HTTP version")
        if vm.group(1) != b"1":
            raise HttpParseError(505, "only HTTP/1.0 and HTTP/1.1 are served")
        if not target.startswith(b"/") or any(b < 0x21 or b > 0x7E for b in target):
            raise HttpParseError(400, "malformed request target: expected an absolute path")
        header_lines = lines[1:]
        if len(header_lines) > self._max_headers:
            raise HttpParseError(431, "too many header fields")
        headers: list[tuple[str, str]] = []
        for line in header_lines:
            if line[:1] in (b" ", b"\t"):
                raise HttpParseError(400, "obsolete header line folding is not accepted")
            name, sep, value = line.partition(b":")
            if not sep or not _TOKEN.match(name):
                raise HttpParseError(400, "malformed header field")
            if any((b < 0x20 and b != 0x09) or b == 0x7F for b in value):
                raise HttpParseError(400, "control character in header value")
            headers.append((name.decode("ascii").lower(), value.strip(b" \t").decode("latin-1")))
        if any(k == "transfer-encoding" for k, _ in headers):
            raise HttpParseError(501, "transfer-encoding is not supported; send content-length")
        lengths = {v for k, v in headers if k == "content-length"}
        if len(lengths) > 1:
            raise HttpParseError(400, "conflicting content-length fields")
        if lengths:
            (raw,) = lengths
            if not raw.isdigit() or not raw.isascii() or len(raw) > 12:
                raise HttpParseError(400, "malformed content-length")
            self._body_len = int(raw)
            if self._body_len > self._max_body:
                raise HttpParseError(413, "request body too large")
        return method.decode("ascii"), target.decode("ascii"), version.decode("ascii"), tuple(headers)


AfterResponse = Callable[[], Awaitable[None] | None]


@dataclass(slots=True)
class Response:
    status: int = 200
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"
    headers: tuple[tuple[str, str], ...] = ()
    # Runs once the response has been written and the connection closed (e.g. a drain after
    # /quitquitquit, which may close this very server).
    after: AfterResponse | None = field(default=None, repr=False)

    @classmethod
    def text(cls, text: str, status: int = 200) -> Response:
        return cls(status, (text if text.endswith("\n") else text + "\n").encode())

    @classmethod
    def json(cls, value: Any, status: int = 200) -> Response:
        return cls(status, json.dumps(value, indent=2, default=str).encode() + b"\n", "application/json")


def render_response(response: Response, *, head_only: bool = False) -> bytes:
    try:
        reason = HTTPStatus(response.status).phrase
    except ValueError:
        reason = "Unknown"
    lines = [
        f"HTTP/1.1 {response.status} {reason}",
        f"Content-Type: {response.content_type}",
        f"Content-Length: {len(response.body)}",
        "Connection: close",
        *(f"{k}: {v}" for k, v in response.headers),
    ]
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return head if head_only else head + response.body


Handler = Callable[[Request], "Response | Awaitable[Response]"]
Routes = Mapping[str, Mapping[str, Handler]]  # path -> method -> handler


def parse_host_port(value: str, *, default_host: str = "127.0.0.1") -> tuple[str, int]:
    """`HOST:PORT`, `[v6]:PORT` or `:PORT` -> (host, port), for the --*-addr flags."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{value!r} is not HOST:PORT (e.g. 127.0.0.1:15020 or [::1]:15020)")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"{value!r}: write an IPv6 host in brackets, e.g. [::1]:15020")
    return host or default_host, int(port)


class HttpServer:
    """Serves `routes` on host:port; `start()` returns once listening (port 0 picks a free port)."""

    def __init__(
        self,
        host: str,
        port: int,
        routes: Routes,
        *,
        name: str = "http",
        sock: socket.socket | None = None,
        max_body: int = MAX_BODY_BYTES,
    ) -> None:
        self.host = host
        self._max_body = max_body
        self._requested_port = port
        self._sock = sock  # an already bound socket (e.g. a private unix socket) instead of host:port
        self._routes = routes
        self.name = name
        self._server: asyncio.Server | None = None
        self._handlers: dict[asyncio.Task[Any], asyncio.StreamWriter] = {}
        self._after_tasks: set[asyncio.Task[Any]] = set()

    @property
    def port(self) -> int:
        """The bound port (the real one when started with port 0)."""
        if self._server is None or not self._server.sockets:
            raise RuntimeError(f"{self.name} server is not listening")
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    async def start(self) -> None:
        if self._sock is not None:
            self._server = await asyncio.start_server(self._serve, sock=self._sock)
            return
        self._server = await asyncio.start_server(self._serve, self.host, self._requested_port, reuse_address=True)
        log.debug("%s server listening", self.name, extra={"addr": self.address})

    async def close(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        # Abort in-flight connections rather than cancelling their tasks: the handler then ends on
        # its own (a cancelled stream-callback task makes asyncio log an error on 3.11).
        for writer in self._handlers.values():
            writer.transport.abort()
        if self._handlers:
            _, stuck = await asyncio.wait(list(self._handlers), timeout=CLOSE_GRACE)
            for task in stuck:  # a handler awaiting something slow: cancel as the last resort
                task.cancel()
        await server.wait_closed()

    async def __aenter__(self) -> HttpServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is None or len(self._handlers) >= MAX_CONNECTIONS:
            writer.close()
            return
        self._handlers[task] = writer
        response: Response | None = None
        head_only = False
        try:
            try:
                async with asyncio.timeout(REQUEST_TIMEOUT):
                    request = await self._read_request(reader)
                head_only = request.method == "HEAD"
                response = await self._dispatch(request)
            except HttpParseError as e:
                response = Response.text(e.reason, e.status)
            except TimeoutError:
                response = Response.text("request timeout", 408)
            except (ConnectionError, OSError):
                response = None
            if response is not None and not writer.is_closing():
                with contextlib.suppress(ConnectionError):
                    writer.write(render_response(response, head_only=head_only))
                    await writer.drain()
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
            self._handlers.pop(task, None)
        if response is not None and response.after is not None:
            self._run_after(response.after)

    async def _read_request(self, reader: asyncio.StreamReader) -> Request:
        parser = RequestParser(max_body=self._max_body)
        while True:
            data = await reader.read(65536)
            if not data:
                raise HttpParseError(400, "connection closed before the request was complete")
            request = parser.feed(data)
            if request is not None:
                return request

    async def _dispatch(self, request: Request) -> Response:
        methods = self._routes.get(request.path)
        if methods is None:
            return Response.text(f"no such path {request.path}; try / for a list", 404)
        handler = methods.get("GET" if request.method == "HEAD" else request.method)
        if handler is None:
            allow = ", ".join(sorted(methods))
            return Response(405, f"use {allow}\n".encode(), headers=(("Allow", allow),))
        try:
            result = handler(request)
            if inspect.isawaitable(result):
                result = await result
            return result
        except Exception:
            log.exception("%s server: handler for %s failed", self.name, request.path)
            return Response.text("internal error; see the proxy log", 500)

    def _run_after(self, after: AfterResponse) -> None:
        try:
            result = after()
        except Exception:
            log.exception("%s server: post-response action failed", self.name)
            return
        if inspect.isawaitable(result):

            async def run() -> None:
                try:
                    await result
                except Exception:
                    log.exception("%s server: post-response action failed", self.name)

            task = asyncio.ensure_future(run())
            self._after_tasks.add(task)  # keep a reference; not cancelled by close()
            task.add_done_callback(self._after_tasks.discard)


# ---- client ---------------------------------------------------------------------------------------------------

MAX_RESPONSE_BYTES = 64 * 1024 * 1024  # a /metrics or /config_dump of a big node; anything bigger is refused
_STATUS_LINE = re.compile(rb"^HTTP/1\.[01] ([1-9]\d\d)(?: [^\r\n]*)?$")
_CLIENT_READ = 65536


class HttpResponseError(OSError):
    """The answer is not an HTTP/1.x response this client reads, or is bigger than its limit.

    An OSError, like a refused or timed-out connection, so callers that only need "could it be asked" catch one type.
    """


@dataclass(frozen=True, slots=True)
class ClientResponse:
    status: int
    headers: tuple[tuple[str, str], ...]  # names lowercased, in arrival order
    body: bytes

    def header(self, name: str) -> str | None:
        name = name.lower()
        for k, v in self.headers:
            if k == name:
                return v
        return None


def render_request(method: str, host: str, port: int, path: str, body: bytes = b"") -> bytes:
    """One HTTP/1.1 request that asks the server to close the connection after answering."""
    if not _TOKEN.match(method.encode()):
        raise ValueError(f"{method!r} is not an HTTP method")
    if not path.startswith("/") or any(not 0x21 <= ord(c) <= 0x7E for c in path):
        raise ValueError(f"{path!r} is not a request target: expected an absolute path, percent-encoded")
    authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    lines = [f"{method} {path} HTTP/1.1", f"Host: {authority}", "Connection: close"]
    if body or method not in ("GET", "HEAD"):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii") + body


class ResponseParser:
    """Sans-IO parser of the one response to a `Connection: close` request: `feed` bytes, then `eof()`.

    `feed` returns the response as soon as its Content-Length is in; without one the body runs to the end of the
    connection and `eof` returns it. Raises `HttpResponseError` for input that is not a response, a head over
    `max_head` or a response over `max_bytes`: a confused or hostile server costs a bounded amount of memory.
    """

    def __init__(self, *, head_only: bool = False, max_head: int = MAX_HEAD_BYTES, max_bytes: int = MAX_RESPONSE_BYTES):
        self._buf = bytearray()
        self._head_only = head_only  # the answer to HEAD: a Content-Length but no body
        self._max_head = max_head
        self._max_bytes = max_bytes
        self._head: tuple[int, tuple[tuple[str, str], ...], int | None] | None = None

    def feed(self, data: bytes) -> ClientResponse | None:
        self._buf += data
        if len(self._buf) > self._max_bytes:
            raise HttpResponseError(f"response larger than {self._max_bytes} bytes")
        if self._head is None:
            m = _HEAD_END.search(self._buf)
            if m is None:
                if len(self._buf) > self._max_head:
                    raise HttpResponseError(f"response head larger than {self._max_head} bytes")
                return None
            self._head = self._parse_head(bytes(self._buf[: m.start()]))
            del self._buf[: m.end()]
        status, headers, length = self._head
        if length is not None and len(self._buf) >= length:
            return ClientResponse(status, headers, bytes(self._buf[:length]))
        return None

    def eof(self) -> ClientResponse:
        """The response at the end of the connection; an error if it ended early."""
        if self._head is None:
            raise HttpResponseError("connection closed before a complete response head" if self._buf else "no response")
        status, headers, length = self._head
        if length is not None and len(self._buf) < length:
            raise HttpResponseError(f"connection closed after {len(self._buf)} of {length} body bytes")
        return ClientResponse(status, headers, bytes(self._buf))

    def _parse_head(self, head: bytes) -> tuple[int, tuple[tuple[str, str], ...], int | None]:
        status, headers = parse_response_head(head)
        if any(k == "transfer-encoding" for k, _ in headers):
            raise HttpResponseError("transfer-encoding in a response is not supported")  # our servers never send it
        lengths = {v for k, v in headers if k == "content-length"}
        if len(lengths) > 1 or any(not (v.isascii() and v.isdigit()) or len(v) > 12 for v in lengths):
            raise HttpResponseError(f"malformed content-length: {sorted(lengths)}")
        length = int(next(iter(lengths))) if lengths else None
        if self._head_only or status in (204, 304) or status < 200:
            length = 0
        if length is not None and length > self._max_bytes:
            raise HttpResponseError(f"response larger than {self._max_bytes} bytes (content-length {length})")
        return status, headers, length


def parse_response_head(head: bytes) -> tuple[int, tuple[tuple[str, str], ...]]:
    """A response head (without its blank line): the status and the headers (names lowercased, in arrival order);
    HttpResponseError if it is not an HTTP/1.x one. The framing (length, chunked) is the caller's to read."""
    lines = [line[:-1] if line.endswith(b"\r") else line for line in head.split(b"\n")]
    m = _STATUS_LINE.match(lines[0])
    if m is None:
        raise HttpResponseError(f"not an HTTP/1.x status line: {lines[0][:80]!r}")
    headers: list[tuple[str, str]] = []
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or not _TOKEN.match(name):
            raise HttpResponseError(f"malformed response header line: {line[:80]!r}")
        headers.append((name.decode("ascii").lower(), value.strip(b" \t").decode("latin-1")))
    return int(m.group(1)), tuple(headers)


def http_request(
    host: str,
    port: int,
    method: str = "GET",
    path: str = "/",
    body: bytes = b"",
    *,
    timeout: float = 2.0,
    sock: socket.socket | None = None,
    max_bytes: int = MAX_RESPONSE_BYTES,
) -> ClientResponse:
    """One request on a blocking socket, all of it within `timeout` seconds; raises OSError if it cannot be made.

    `sock`: a socket already connected to host:port (e.g. made inside another network namespace), which this
    call closes; without it, a new connection.
    """
    deadline = time.monotonic() + timeout
    request = render_request(method, host, port, path, body)
    parser = ResponseParser(head_only=method == "HEAD", max_bytes=max_bytes)
    if sock is None:
        sock = socket.create_connection((host, port), timeout=timeout)
    with sock:
        sock.settimeout(max(deadline - time.monotonic(), 0.001))
        sock.sendall(request)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no complete response from {host}:{port}{path} within {timeout:g}s")
            sock.settimeout(remaining)
            data = sock.recv(_CLIENT_READ)
            if not data:
                return parser.eof()
            response = parser.feed(data)
            if response is not None:
                return response


async def http_request_async(
    host: str,
    port: int,
    method: str = "GET",
    path: str = "/",
    body: bytes = b"",
    *,
    timeout: float = 2.0,
    max_bytes: int = MAX_RESPONSE_BYTES,
) -> ClientResponse:
    """`http_request` on the running event loop; raises OSError (TimeoutError included) if it cannot be made."""
    request = render_request(method, host, port, path, body)
    parser = ResponseParser(head_only=method == "HEAD", max_bytes=max_bytes)
    async with asyncio.timeout(timeout):
        return await exchange_async(host, port, request, parser)


async def exchange_async(
    host: str,
    port: int,
    request: bytes,
    parser: ResponseParser,
    *,
    tls: ssl.SSLContext | None = None,
    server_hostname: str | None = None,
) -> ClientResponse:
    """Send one rendered request on a new connection (TLS with `tls`) and read its response with `parser`,
    which bounds it; the caller bounds the time. Raises OSError, or HttpResponseError for a bad answer.
    `server_hostname`: the TLS name to send and verify when `host` is an address resolved from it."""
    if tls is None:
        reader, writer = await asyncio.open_connection(host, port)
    else:
        reader, writer = await asyncio.open_connection(host, port, ssl=tls, server_hostname=server_hostname)
    try:
        writer.write(request)
        await writer.drain()
        while True:
            data = await reader.read(_CLIENT_READ)
            response = parser.feed(data) if data else parser.eof()
            if response is not None:
                return response
    finally:
        writer.close()
