"""The waypoint's HTTP/1.1 layer, sans-IO: one client connection, each request decided on its own.

Bytes in (`receive_data` from the client, `receive_upstream_data` from the upstream), events out
(`next_request_event`, `next_response_event`), bytes out (`data_to_client`, `data_to_upstream`). The owner
decides each `RequestReceived`: `allow()` forwards the head (and then the body as it arrives), `respond()`
/ `deny()` answers locally. No socket is touched here, so every rule below is tested with bytes.

Parsing. Heads (request and response) are parsed and validated by llhttp through `httptools`: it was
measured against h11 (bench/http1_parser_bench.py: 3.4 against 93 µs per request cycle) and rejects more
smuggling shapes on its own (CL+TE, duplicate Content-Length even when equal, obs-fold, bare LF). We find
each head's end ourselves (CRLFCRLF) and feed llhttp exactly that head, because httptools cannot stop at
a message's end (no pause, no offset): body framing (Content-Length counted, chunked decoded strictly here,
until-EOF for responses) is ours, which is what lets a pipelined next request wait, unparsed, until the
current one is answered. What llhttp lets through and we refuse: a missing or repeated Host (400), HTTP/0.9
and versions other than 1.0/1.1 (505), a target that is not origin-form (400: the path the policy sees must
be the path the upstream serves; the path is normalized, see `request_target`, and sent so), a fragment or
`%00` (400), CONNECT (501), transfer codings other than `chunked` (501), an Upgrade with a body (400), heads
over `Limits.max_head` or with more than `Limits.max_headers` fields (431). `Connection` may not name
Content-Length or Host (the body would reach the app as its next request), and a client's
x-forwarded-client-cert (any spelling) is neither decided on nor forwarded. A field value is what is left
between the whitespace around it (RFC 9112 §5), for the policy and the app alike.

Pipelining is handled in order, one request at a time: the next head is not parsed until the previous
response has ended, so it is decided on its own; its bytes wait in the buffer (the owner reads only after
NEED_DATA, so that is at most one read). Bodies stream: each read becomes one `RequestData`, framed for the
upstream as it goes; nothing is buffered whole. `100 Continue` is sent only after an allow (the upstream
never sees `Expect`). `Upgrade` (not `h2c`, which is stripped so HTTP/2 cannot slip past per-request
decisions) switches to a raw relay after an allowed request and the upstream's 101 (`TunnelOpened`); a
refused or declined one closes the connection.

HTTP/2 with prior knowledge is a separate connection class: the owner routes a connection whose first
bytes are `H2_PREFACE` there; this one answers such bytes 505 and closes.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from http import HTTPStatus
from typing import Final

import httptools

from ztunnel.policy.evaluation import PATH_NORMALIZATIONS, normalize_path

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DENIED_BODY = b"RBAC: access denied"  # what Istio's waypoint (Envoy's RBAC filter) answers


@dataclass(frozen=True, slots=True, kw_only=True)
class Limits:
    # 16 KiB: HAProxy's default buffer holds a head of that size; larger heads are answered 431.
    max_head: int = 16 * 1024
    # Envoy's default cap on header fields per request.
    max_headers: int = 100
    # A denied request's Content-Length body up to this is read and dropped to keep the connection; a larger
    # one (or a chunked or expected-to-continue one) closes the connection instead of reading it.
    max_discard: int = 64 * 1024
    # A chunk-size line with extensions longer than this is not a client we serve (400).
    max_chunk_line: int = 4096
    # How request paths are normalized before the policy sees them and the app gets them (`normalize_path`).
    path_normalization: str = "MERGE_SLASHES"
    # A request header whose name holds `_` (Envoy's headers_with_underscores_action): ALLOW (Envoy's and Istio's
    # default: passed on, though a CGI-style app reads `X_Admin` as `x-admin` where a DENY on x-admin does not
    # see it), REJECT_REQUEST (400) or DROP_HEADER (neither the policy nor the app sees it).
    headers_with_underscores: str = "ALLOW"


UNDERSCORE_ACTIONS = ("ALLOW", "REJECT_REQUEST", "DROP_HEADER")


# --- events (past tense, small) ---


@dataclass(slots=True, kw_only=True)
class RequestHead:
    """What the policy decides on; `headers` as received (names as sent, values raw bytes).

    Immutable through `Final` (mypy; compiled, assigning one raises AttributeError) rather than `frozen=True`: a
    frozen dataclass's __init__ sets each field through object.__setattr__, and the __init__ `dataclass` makes is
    Python even when mypyc compiles the class (ztunnel/compiled): ~4 % of the waypoint's CPU per request."""

    method: Final[bytes]
    target: Final[bytes]
    path: Final[bytes]  # target without the query
    host: Final[bytes]
    headers: Final[tuple[tuple[bytes, bytes], ...]]
    version: Final[bytes]  # b"1.1" or b"1.0"
    content_length: Final[int | None]
    chunked: Final[bool]
    keep_alive: Final[bool]
    upgrade: Final[bytes | None]  # the Upgrade protocol(s) asked for; None when not an upgrade (h2c is not one)
    expect_continue: Final[bool]

    def __init__(
        self,
        *,
        method: bytes,
        target: bytes,
        path: bytes,
        host: bytes,
        headers: tuple[tuple[bytes, bytes], ...],
        version: bytes,
        content_length: int | None,
        chunked: bool,
        keep_alive: bool,
        upgrade: bytes | None,
        expect_continue: bool,
    ) -> None:
        self.method, self.target, self.path, self.host, self.headers = method, target, path, host, headers
        self.version, self.content_length, self.chunked, self.keep_alive = version, content_length, chunked, keep_alive
        self.upgrade, self.expect_continue = upgrade, expect_continue

    @property
    def has_body(self) -> bool:
        return self.chunked or bool(self.content_length)

    @property
    def is_connect(self) -> bool:
        return self.method == b"CONNECT"

    def header(self, name: bytes) -> bytes | None:
        name = name.lower()
        size = len(name)
        for k, v in self.headers:
            if len(k) == size and k.lower() == name:
                return v
        return None


# The events are plain (not frozen) dataclasses, read-only by convention: a frozen dataclass's __init__ sets each
# field through object.__setattr__, which costs about 0.2 us a field in CPython, and there are several per request.
# Their __init__ is written out: the one `dataclass` generates is Python even when mypyc compiles the class
# (ztunnel/compiled), and ran interpreted for every event.


@dataclass(slots=True)
class RequestReceived:
    head: RequestHead

    def __init__(self, head: RequestHead) -> None:
        self.head = head


@dataclass(slots=True)
class RequestData:
    data: bytes

    def __init__(self, data: bytes) -> None:
        self.data = data


@dataclass(slots=True)
class RequestEnded:
    pass


@dataclass(frozen=True, slots=True)
class RequestRejected:
    """Bad input: the answer is queued in `data_to_client()`; send it and close the connection."""

    status: int
    reason: str


@dataclass(slots=True, kw_only=True)
class ResponseReceived:
    status: int
    reason: bytes
    headers: tuple[tuple[bytes, bytes], ...]
    grpc_status: bytes | None = None  # a trailers-only gRPC answer's status (HTTP/1.1 trailers are not read)

    def __init__(
        self, *, status: int, reason: bytes, headers: tuple[tuple[bytes, bytes], ...], grpc_status: bytes | None = None
    ) -> None:
        self.status, self.reason, self.headers, self.grpc_status = status, reason, headers, grpc_status


@dataclass(slots=True)
class ResponseData:
    data: bytes

    def __init__(self, data: bytes) -> None:
        self.data = data


@dataclass(slots=True)
class ResponseEnded:
    keep_alive: bool  # False: flush data_to_client() and close the client connection

    def __init__(self, keep_alive: bool) -> None:
        self.keep_alive = keep_alive


@dataclass(frozen=True, slots=True)
class TunnelOpened:
    """101 to an allowed Upgrade or 2xx to an allowed CONNECT: relay raw bytes both ways from now on."""


class _Signal(enum.Enum):
    NEED_DATA = "need data"  # read more from that side (b"" for its EOF)
    PAUSED = "paused"  # nothing to do on that side until the owner decides or the other side moves
    CLOSED = "closed"  # the connection is over: flush data_to_client() and close
    INFORMATIONAL = "informational"  # (internal) a 1xx head was handled: the final head comes next


NEED_DATA = _Signal.NEED_DATA
PAUSED = _Signal.PAUSED
CLOSED = _Signal.CLOSED
_INFORMATIONAL = _Signal.INFORMATIONAL  # never returned by next_response_event

RequestEvent = RequestReceived | RequestData | RequestEnded | RequestRejected | _Signal
ResponseEvent = ResponseReceived | ResponseData | ResponseEnded | TunnelOpened | _Signal


class Http1Error(Exception):
    """The owner called a method the connection's state does not allow (a bug in the owner)."""


class _Reject(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class _NoCallbacks:
    """llhttp's protocol object for a response head: no callbacks (see `_HeadSink`)."""

    __slots__ = ()


_NO_CALLBACKS = _NoCallbacks()


# --- framing (ours: httptools cannot stop at a message's end) ---


class _Chunked:
    """Strict chunked decoder: hex size (no sign, no spaces), extensions dropped, CRLF exactly, trailers
    read (bounded, checked) and dropped."""

    __slots__ = ("done", "limits", "remaining", "state", "trailer_bytes")

    # one assignment per state: mypyc (ztunnel/compiled.py) compiles only plain assignments in a class body
    SIZE = 0
    DATA = 1
    DATA_CRLF = 2
    TRAILER = 3

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.state = self.SIZE
        self.remaining = 0
        self.trailer_bytes = 0
        self.done = False

    def step(self, buf: bytes, pos: int) -> tuple[int, bytes | None]:
        """Consume from `buf[pos:]`; return the new position and a data piece (None: none yet). Raises
        `_Reject` on bad framing; returns `pos` unchanged when it needs more bytes."""
        while True:
            if self.state == self.DATA:
                n = min(self.remaining, len(buf) - pos)
                if n == 0:
                    return pos, None
                self.remaining -= n
                if self.remaining == 0:
                    self.state = self.DATA_CRLF
                piece = buf if (pos == 0 and n == len(buf)) else buf[pos : pos + n]  # slice-ok: n > 0
                return pos + n, piece
            eol = buf.find(b"\r\n", pos)
            if self.state == self.DATA_CRLF:
                if len(buf) - pos < 2:
                    return pos, None
                if eol != pos:
                    raise _Reject(400, "chunk data not followed by CRLF")
                pos += 2
                self.state = self.SIZE
                continue
            if eol < 0:
                if len(buf) - pos > self.limits.max_chunk_line:
                    raise _Reject(400, "chunk line too long")
                if b"\n" in buf[pos:]:
                    raise _Reject(400, "bare LF in chunked framing")
                return pos, None
            line = buf[pos:eol]  # slice-ok: eol >= pos (found from pos)
            if b"\n" in line or b"\r" in line:
                raise _Reject(400, "bare CR or LF in chunked framing")
            pos = eol + 2
            if self.state == self.SIZE:
                size_part = line.split(b";", 1)[0]
                if not 0 < len(size_part) <= 16 or size_part.strip(b"0123456789abcdefABCDEF"):
                    raise _Reject(400, "invalid chunk size")
                if len(line) > self.limits.max_chunk_line or _has_ctl(line):
                    raise _Reject(400, "invalid chunk extension")
                size = int(size_part, 16)
                if size == 0:
                    self.state = self.TRAILER
                else:
                    self.remaining = size
                    self.state = self.DATA
                continue
            # trailer section: lines until the empty one
            if not line:
                self.done = True
                return pos, None
            self.trailer_bytes += len(line) + 2
            if self.trailer_bytes > self.limits.max_head:
                raise _Reject(431, "trailers too large")
            name, colon, _ = line.partition(b":")
            if not colon or not name or name.strip(_TOKEN_CHARS) or _has_ctl(line):
                raise _Reject(400, "invalid trailer field")


_TOKEN_CHARS = b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
_CTL = bytes(c for c in range(32) if c != 9) + b"\x7f"


def _has_ctl(data: bytes) -> bool:
    return len(data.translate(None, _CTL)) != len(data)


class _Body:
    """How one message body is framed: Content-Length (counted), chunked, until EOF, or none."""

    __slots__ = ("chunked", "remaining", "until_eof")

    def __init__(self, *, length: int = 0, chunked: _Chunked | None = None, until_eof: bool = False) -> None:
        self.remaining = length
        self.chunked = chunked
        self.until_eof = until_eof


# --- head collection (httptools callbacks) ---


class _HeadSink:
    """llhttp's callbacks for one request head: its target and its end. Header fields are not taken from
    callbacks (a Python call per field): once llhttp accepted a head, its field lines are split where they are
    classified (`_build_head`, `_next_response_head`). llhttp refused bare CR/LF, obs-fold, whitespace before the
    colon and non-token names, so each line is `name:value`; a request value loses the whitespace around it (llhttp's
    own callback kept the trailing part), a response value its leading whitespace, as llhttp's callback gives it."""

    __slots__ = ("complete", "url")

    def __init__(self) -> None:
        self.url = b""
        self.complete = False

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_headers_complete(self) -> None:
        self.complete = True


_HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"transfer-encoding",
        b"upgrade",
        b"http2-settings",
        b"expect",  # answered here (100 Continue after an allow)
        b"trailer",  # trailers are dropped, so is their announcement
    }
)
# What a request field's (lowercase) name means here; a name not in _REQUEST_FIELDS is forwarded as it is.
_HOST = 1
_CONTENT_LENGTH = 2
_TRANSFER_ENCODING = 3
_CONNECTION = 4
_UPGRADE = 5
_EXPECT = 6
_DROPPED = 7  # the other hop-by-hop fields
_GRPC_STATUS = 8
_CONTENT_TYPE = 9  # forwarded; kept for the request's telemetry
_SANITIZED = 10  # a client's copy is neither decided on nor forwarded
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
# Named in a client's Connection header, these are still the message's own (framing, routing), never dropped.
_END_TO_END = frozenset({b"content-length", b"host"})
# The proxy's word about the peer: a client's copy never reaches the app (Envoy's default, SANITIZE).
SANITIZED_HEADERS = frozenset({b"x-forwarded-client-cert"})
_REQUEST_FIELDS: dict[bytes, int] = {
    **dict.fromkeys(_HOP_BY_HOP, _DROPPED),
    **dict.fromkeys(SANITIZED_HEADERS, _SANITIZED),
    b"host": _HOST,
    b"content-length": _CONTENT_LENGTH,
    b"transfer-encoding": _TRANSFER_ENCODING,
    b"connection": _CONNECTION,
    b"upgrade": _UPGRADE,
    b"expect": _EXPECT,
    b"content-type": _CONTENT_TYPE,
}
_RESPONSE_FIELDS: dict[bytes, int] = {
    **dict.fromkeys(_HOP_BY_HOP, _DROPPED),
    b"content-length": _CONTENT_LENGTH,
    b"transfer-encoding": _TRANSFER_ENCODING,
    b"connection": _CONNECTION,
    b"upgrade": _UPGRADE,
    b"grpc-status": _GRPC_STATUS,
}


def fold_name(low: bytes) -> bytes:
    """A lower-case field name as CGI-style apps (WSGI, PHP, nginx's fastcgi) read it: `_` and `-` are one, so
    a client's `x_jwt_payload` is the app's `x-jwt-payload` and goes wherever that one goes."""
    return low.replace(b"_", b"-") if b"_" in low else low

# --- paths: Istio's normalization (security/normalization in its docs), the same bytes for policy and app ---


_PATH_WORK = re.compile(rb"[#%\\?]|/\.|//")  # the first byte that may need work (a `?` ends the path)


class BadTarget(ValueError):
    """A request target the waypoint refuses (400): the reason is the client's answer."""


def request_target(target: bytes, method: bytes, normalization: str = "MERGE_SLASHES") -> tuple[bytes, bytes]:
    """(the target as forwarded, its path as the policy matches it), both normalized alike, or BadTarget.

    Only origin-form (and `*` for OPTIONS): the path the policy sees must be the path the app serves. A fragment
    is refused (Envoy's default; an app resolving `/public/#/../admin` would serve /admin) and so is `%00`
    (always, as Istio); the path is then normalized (policy.evaluation.normalize_path: `%2e%2e`, `\\`, dot
    segments, `//`), the query left as sent (Istio: the app sees it unchanged)."""
    m = _PATH_WORK.search(target)  # one C scan: most paths have nothing to normalize
    if (m is None or (target[m.start()] == 0x3F and b"#" not in target)) and target.startswith(b"/"):
        return target, target if m is None else target[: m.start()]
    if target == b"*" and method == b"OPTIONS":
        return target, target
    if not target.startswith(b"/"):
        raise BadTarget("request target must be a path (origin-form)")
    if b"#" in target:
        raise BadTarget("request target has a fragment (#)")
    path, sep, query = target.partition(b"?")
    if b"%00" in path:
        raise BadTarget("request path has %00")
    if b"%" in path or b"\\" in path or b"//" in path or b"/." in path:
        path = normalize_path(path.decode("latin-1"), normalization).encode("latin-1")
    return path + sep + query, path


def _tokens(value: bytes) -> set[bytes]:
    return {t.strip().lower() for t in value.split(b",")}


class _C(enum.Enum):  # the client (request) side
    IDLE = 1  # waiting for a head
    DECIDING = 2  # head delivered; the owner allows or answers
    BODY = 3  # allowed: body forwarded as it comes
    DISCARD = 4  # answered locally: the body is read and dropped
    DONE = 5  # request ended; waiting for the response to end
    TUNNEL = 6
    CLOSED = 7


class _R(enum.Enum):  # the upstream (response) side
    IDLE = 1  # nothing asked of the upstream
    HEAD = 2
    BODY = 3
    DONE = 4  # response ended (or answered locally)
    TUNNEL = 5


class Http1Connection:
    """One client connection of the waypoint (server side), and the response direction from the upstream."""

    def __init__(self, limits: Limits | None = None) -> None:
        self.limits = limits or Limits()
        self._in = b""  # client bytes not consumed yet: self._in[self._pos:]
        self._pos = 0
        self._up_in = b""
        self._up_pos = 0
        self._to_client: list[bytes] = []
        self._to_upstream: list[bytes] = []
        self._c = _C.IDLE
        self._r = _R.IDLE
        self._sink = _HeadSink()
        self._parser = httptools.HttpRequestParser(self._sink)
        self._parser_clean = True  # False after a head whose message llhttp would go on parsing
        self._head: RequestHead | None = None
        self._fwd_headers: list[tuple[bytes, bytes]] = []  # the deciding request's fields as they go upstream
        self._fwd_head: bytes | None = None  # its whole head, when it goes upstream unchanged
        # the last request head's Content-Type (its first field; `RequestHead.header` without the walk)
        self.request_content_type: bytes | None = None
        self._req_body: _Body | None = None
        self._resp_body: _Body | None = None
        self._resp_chunked_out = False  # re-encode response data as chunks for the client
        self._keep_alive = True
        self._client_eof = False
        self._upstream_eof = False
        self._head_scanned = 0  # bytes of an incomplete head already searched for its end

    # --- output ---

    def data_to_client(self) -> bytes:
        parts = self._to_client  # (not a shared helper: one Python call less, three times a request)
        if not parts:
            return b""
        out = parts[0] if len(parts) == 1 else b"".join(parts)
        parts.clear()
        return out

    def data_to_upstream(self) -> bytes:
        parts = self._to_upstream
        if not parts:
            return b""
        out = parts[0] if len(parts) == 1 else b"".join(parts)
        parts.clear()
        return out

    @property
    def closed(self) -> bool:
        return self._c is _C.CLOSED

    @property
    def buffered(self) -> int:
        """Client bytes received and not consumed yet (the next read waits while this is a full read)."""
        return len(self._in) - self._pos

    @property
    def tunnel(self) -> bool:
        return self._c is _C.TUNNEL

    # --- input ---

    def receive_data(self, data: bytes) -> None:
        """Bytes from the client; b"" is its EOF. In a tunnel they go straight to the upstream."""
        if self._c is _C.TUNNEL:
            if data:
                self._to_upstream.append(data)
            return
        if not data:
            self._client_eof = True
        else:
            self._in = _append(self._in, self._pos, data)
            self._pos = 0

    def receive_upstream_data(self, data: bytes) -> None:
        """Bytes from the upstream; b"" is its EOF. In a tunnel they go straight to the client."""
        if self._r is _R.TUNNEL:
            if data:
                self._to_client.append(data)
            return
        if not data:
            self._upstream_eof = True
        else:
            self._up_in = _append(self._up_in, self._up_pos, data)
            self._up_pos = 0

    # --- the request direction ---

    def next_request_event(self) -> RequestEvent:
        c = self._c
        try:
            if c is _C.IDLE:
                if self._r is not _R.IDLE:
                    return PAUSED
                return self._next_head()
            if c is _C.BODY or c is _C.DISCARD:
                return self._next_request_body()
        except _Reject as exc:
            return self._reject(exc.status, exc.reason)
        if c is _C.CLOSED:
            return CLOSED
        return PAUSED  # DECIDING, DONE, TUNNEL

    def _next_head(self) -> RequestEvent:
        buf, pos = self._in, self._pos
        if pos == len(buf):  # nothing buffered (a keep-alive connection between requests)
            if self._client_eof:
                self._c = _C.CLOSED
                return CLOSED
            return NEED_DATA
        while buf.startswith(b"\r\n", pos):  # empty lines before a request line are ignored (RFC 9112 §2.2)
            pos += 2
        self._pos = pos
        end = buf.find(b"\r\n\r\n", pos + max(0, self._head_scanned - 3))
        if end < 0:
            pending = len(buf) - pos
            if pending > self.limits.max_head:
                raise _Reject(431, f"request head over {self.limits.max_head} bytes")
            if self._client_eof:
                self._c = _C.CLOSED
                return CLOSED  # a client closing between requests, or mid-head: nothing to answer
            if buf.find(b"\n\n", pos) >= 0 or buf.find(b"\n\r\n", pos) >= 0:
                raise _Reject(400, "bare LF in the request head")
            self._head_scanned = pending
            return NEED_DATA
        end += 4
        self._head_scanned = 0
        if buf.startswith(b"PRI * HTTP/2.0\r\n", pos):
            raise _Reject(505, "HTTP/2 prior knowledge on the HTTP/1.1 connection")
        if end - pos > self.limits.max_head:
            raise _Reject(431, f"request head over {self.limits.max_head} bytes")
        sink = self._sink
        sink.url = b""
        sink.complete = False
        if not self._parser_clean:
            self._parser = httptools.HttpRequestParser(sink)
        parser = self._parser
        try:
            parser.feed_data(buf if pos == 0 and end == len(buf) else memoryview(buf)[pos:end])
        except httptools.HttpParserUpgrade:
            pass  # Upgrade or CONNECT: decided below
        except httptools.HttpParserError as exc:
            self._parser_clean = False
            raise _Reject(400, str(exc)) from None
        self._pos = end
        if not sink.complete:  # cannot happen for a CRLFCRLF-terminated head llhttp accepted
            self._parser_clean = False
            raise _Reject(400, "incomplete request head")
        head = self._build_head(parser, buf, pos, end)
        self._parser_clean = not (head.chunked or head.content_length or parser.should_upgrade())
        self._head = head
        self._c = _C.DECIDING
        return RequestReceived(head)

    def _build_head(self, parser: httptools.HttpRequestParser, buf: bytes, pos: int, end: int) -> RequestHead:
        """The head llhttp accepted in `buf[pos:end]`, checked (see the module docstring); what goes upstream is
        kept for `allow`: the fields as they go, and the head's own bytes when they can go unchanged."""
        sink = self._sink
        line_end = buf.find(b"\r\n", pos)
        # llhttp accepted `method SP target SP HTTP/x.y` CRLF, or HTTP/0.9's `method SP target` CRLF, whose target
        # (no space in it) may end in `1.1` too: the last three bytes are a version only after ` HTTP/`
        version = b"0.9"
        if buf.startswith(b" HTTP/", max(pos, line_end - 9)):
            version = buf[line_end - 3 : line_end]  # slice-ok: ` HTTP/` is at or after pos >= 0, before line_end
        if version != b"1.1" and version != b"1.0":
            if buf.startswith(b"\n", pos):  # llhttp skipped an empty line ended by a bare LF; `line_end` is not ours
                raise _Reject(400, "bare LF in the request head")
            raise _Reject(505, f"HTTP/{parser.get_http_version()} is not served here")
        method = parser.get_method()
        if method == b"CONNECT":  # a tunnel to an app answering 2xx would carry requests never decided
            raise _Reject(501, "CONNECT is not served by the waypoint")
        url = sink.url
        try:
            target, path = request_target(url, method, self.limits.path_normalization)
        except BadTarget as exc:
            raise _Reject(400, str(exc)) from None
        # An empty range is sliced as [i:i], never [i:j] with j < i: compiled, mypyc (2.4.1) raises SystemError
        # ("Negative size passed to PyBytes_FromStringAndSize") for that instead of answering b"". Twice below too.
        block = buf[line_end + 2 : max(line_end + 2, end - 4)]  # its field lines (see `_HeadSink`)
        lines = block.split(b"\r\n") if block else []
        if len(lines) > self.limits.max_headers:
            raise _Reject(431, f"more than {self.limits.max_headers} header fields")
        underscores = self.limits.headers_with_underscores
        received: list[tuple[bytes, bytes]] = []
        # A value's trailing whitespace is not its own (RFC 9112 §5: OWS either side), which llhttp keeps: the app's
        # parser trims it, so the policy must see `Host: secret.greet ` as `secret.greet` (a `hosts` DENY missed
        # it), and the app gets the head rebuilt with the value the policy saw.
        # (`find`, not `in`: bytes' `in` tries its argument as an int first, ~0.1 us more a call)
        dropped = buf.find(b" \r", line_end + 2, end) >= 0 or buf.find(b"\t\r", line_end + 2, end) >= 0
        host: bytes | None = None
        hosts = 0
        length: int | None = None
        te: bytes | None = None
        conn_tokens: set[bytes] = set()
        upgrade: bytes | None = None
        expect: bytes | None = None
        content_type: bytes | None = None
        for line in lines:
            name, _, value = line.partition(b":")
            value = value.strip(b" \t")
            low = name.lower()
            kind = _REQUEST_FIELDS.get(low)
            if kind is None:  # most fields: forwarded as they are
                if b"_" in low:  # (no name in _REQUEST_FIELDS has one)
                    if underscores == "REJECT_REQUEST":
                        raise _Reject(400, f"header {name.decode('latin-1')!r} has an underscore in its name")
                    if underscores == "DROP_HEADER" or fold_name(low) in SANITIZED_HEADERS:
                        dropped = True
                        continue  # neither the policy nor the app sees it
                received.append((name, value))
                continue
            if kind == _SANITIZED:  # as Envoy's SANITIZE: gone before any filter (RBAC, ext-authz) sees the request
                dropped = True
                continue
            received.append((name, value))
            if kind == _HOST:
                host = value
                hosts += 1
                continue
            if kind == _CONTENT_LENGTH:
                length = int(value)  # llhttp allowed digits only, and one field
                continue
            if kind == _CONTENT_TYPE:
                if content_type is None:
                    content_type = value
                continue
            dropped = True  # the rest are hop-by-hop: not forwarded
            if kind == _TRANSFER_ENCODING:
                te = value if te is None else te + b"," + value
            elif kind == _CONNECTION:
                conn_tokens |= _tokens(value)
            elif kind == _UPGRADE:
                upgrade = value
            elif kind == _EXPECT:
                expect = value.strip().lower()
        if hosts != 1:  # HTTP/1.0 too: a `hosts` rule would not match a Host-less request the app may still route
            raise _Reject(400, "a request needs exactly one Host header")
        chunked = False
        if te is not None:
            if te.strip().lower() != b"chunked":
                raise _Reject(501, "only Transfer-Encoding: chunked is served")
            chunked = True
        if expect is not None and expect != b"100-continue":
            raise _Reject(417, "unknown expectation")
        if upgrade is not None and (b"upgrade" not in conn_tokens or b"h2c" in _tokens(upgrade)):
            upgrade = None  # h2c is stripped: HTTP/2 inside would escape per-request decisions
        conn_tokens -= _END_TO_END  # `Connection: content-length` would send the body as the app's next request
        if (upgrade is not None or method == b"CONNECT") and (chunked or length):
            raise _Reject(400, "an Upgrade or CONNECT request carries no body")
        keep_alive = (b"close" not in conn_tokens) if version == b"1.1" else (b"keep-alive" in conn_tokens)
        self.request_content_type = content_type
        if dropped:
            self._fwd_headers = [
                (n, v)
                for n, v in received
                if (low := n.lower()) not in _HOP_BY_HOP and low not in conn_tokens
            ]
            self._fwd_head = None
        else:
            self._fwd_headers = received
            # nothing to drop or trim and a request line as `allow` writes it: the head goes upstream as it came
            canonical = target is url and line_end - pos == len(method) + len(url) + 10 and version == b"1.1"
            self._fwd_head = buf[pos:end] if canonical else None  # slice-ok: end was found searching from pos
        return RequestHead(
            method=method,
            target=target,
            path=path,
            host=host or b"",
            headers=tuple(received),
            version=version,
            content_length=length,
            chunked=chunked,
            keep_alive=keep_alive,
            upgrade=upgrade,
            expect_continue=expect is not None,
        )

    def _next_request_body(self) -> RequestEvent:
        body = self._req_body
        assert body is not None
        buf, pos = self._in, self._pos
        piece: bytes | None = None
        while True:
            if body.chunked is not None:
                if body.chunked.done:
                    break
                pos, piece = body.chunked.step(buf, pos)
            else:
                if body.remaining == 0:
                    break
                n = min(body.remaining, len(buf) - pos)
                if n:
                    body.remaining -= n
                    piece = buf if (pos == 0 and n == len(buf)) else buf[pos : pos + n]  # slice-ok: n > 0
                    pos += n
            self._pos = pos
            if piece is None:
                if body.chunked is not None and body.chunked.done:
                    break
                if self._client_eof:
                    self._c = _C.CLOSED  # the client gave up mid-body: abort the upstream too
                    return CLOSED
                return NEED_DATA
            if self._c is _C.BODY:
                if self._head is not None and self._head.chunked:
                    self._to_upstream += (b"%x\r\n" % len(piece), piece, b"\r\n")
                else:
                    self._to_upstream.append(piece)
                return RequestData(piece)
            piece = None  # DISCARD: dropped
        self._pos = pos
        discarding = self._c is _C.DISCARD
        if self._head is not None and self._head.chunked and not discarding:
            self._to_upstream.append(b"0\r\n\r\n")
        self._c = _C.DONE
        self._maybe_next_cycle()
        if discarding:
            return self.next_request_event()
        return RequestEnded()

    # --- the owner's decision ---

    def allow(
        self, extra_headers: tuple[tuple[bytes, bytes], ...] = (), *, remove: frozenset[bytes] = frozenset()
    ) -> None:
        """Forward the request: its head is queued for the upstream now, its body as it arrives. Header fields
        named in `remove` (lowercase) are dropped first (a JWT the rule does not forward, a client's own copy of
        a header the waypoint writes)."""
        head = self._deciding()
        if self._fwd_head is not None and not remove and not extra_headers:
            self._to_upstream.append(self._fwd_head)  # nothing to change: the head as the client sent it
        else:
            parts = [head.method, b" ", head.target, b" HTTP/1.1\r\n"]
            if remove:
                remove = frozenset(fold_name(n) for n in remove)
            for name, value in self._fwd_headers:
                if remove and fold_name(name.lower()) in remove:
                    continue
                parts += (name, b": ", value, b"\r\n")
            for name, value in extra_headers:
                parts += (name, b": ", value, b"\r\n")
            if head.chunked:
                parts.append(b"Transfer-Encoding: chunked\r\n")
            if head.upgrade is not None:
                parts += (b"Connection: Upgrade\r\nUpgrade: ", head.upgrade, b"\r\n")
            parts.append(b"\r\n")
            self._to_upstream.append(b"".join(parts))
        self._fwd_head = None
        self._r = _R.HEAD
        self._resp_body = None
        if head.chunked or head.content_length:
            if head.expect_continue and head.version == b"1.1":
                self._to_client.append(_CONTINUE)
            chunked = _Chunked(self.limits) if head.chunked else None
            self._req_body = _Body(length=head.content_length or 0, chunked=chunked)
            self._c = _C.BODY
        else:
            self._c = _C.DONE

    def deny(self) -> None:
        """Istio's answer to a request the policy denies: 403, `RBAC: access denied`."""
        self.respond(403, DENIED_BODY)

    def respond(
        self,
        status: int,
        body: bytes = b"",
        *,
        content_type: bytes = b"text/plain",
        headers: tuple[tuple[bytes, bytes], ...] = (),
    ) -> None:
        """Answer the request locally (it never reaches the upstream). The connection stays open only when
        the rest of the request can be read and dropped cheaply; otherwise the answer says close."""
        head = self._deciding()
        small = not head.content_length or (head.content_length <= self.limits.max_discard and not head.expect_continue)
        keep = (
            small
            and head.keep_alive
            and head.upgrade is None
            and not head.is_connect
            and not head.chunked
        )
        self._to_client.append(_local_response(status, body, content_type, headers, keep, head))
        self._r = _R.DONE
        if not keep:
            self._keep_alive = False
            self._c = _C.CLOSED
            return
        if head.content_length:
            self._req_body = _Body(length=head.content_length)
            self._c = _C.DISCARD
        else:
            self._c = _C.DONE
            self._maybe_next_cycle()

    def _deciding(self) -> RequestHead:
        if self._c is not _C.DECIDING or self._head is None:
            raise Http1Error(f"no request is waiting for a decision (state {self._c.name})")
        return self._head

    def _reject(self, status: int, reason: str) -> RequestRejected:
        self._to_client.append(_local_response(status, reason.encode() + b"\n", b"text/plain", (), False, None))
        self._c = _C.CLOSED
        self._keep_alive = False
        return RequestRejected(status, reason)

    # --- the response direction ---

    def next_response_event(self) -> ResponseEvent:
        r = self._r
        try:
            if r is _R.HEAD:
                # a loop, not a call per 1xx head: an app's read of thousands of them was as deep a recursion
                while (ev := self._next_response_head()) is _INFORMATIONAL:
                    pass
                return ev
            if r is _R.BODY:
                return self._next_response_body()
        except _Reject as exc:
            return self._bad_gateway(exc.reason)
        if self._c is _C.CLOSED and r is not _R.TUNNEL:
            return CLOSED
        return PAUSED

    def _next_response_head(self) -> ResponseEvent:
        head = self._head
        assert head is not None
        buf, pos = self._up_in, self._up_pos
        end = buf.find(b"\r\n\r\n", pos)
        if end < 0:
            if len(buf) - pos > self.limits.max_head:
                raise _Reject(502, "upstream response head too large")
            if self._upstream_eof:
                raise _Reject(502, "upstream closed before its response head")
            return NEED_DATA
        end += 4
        parser = httptools.HttpResponseParser(_NO_CALLBACKS)
        try:
            parser.feed_data(buf if pos == 0 and end == len(buf) else memoryview(buf)[pos:end])
        except httptools.HttpParserUpgrade:
            pass
        except httptools.HttpParserError as exc:
            raise _Reject(502, f"upstream response: {exc}") from None
        self._up_pos = end
        status = parser.get_status_code()
        while buf.startswith(b"\r\n", pos):  # empty lines llhttp skipped
            pos += 2
        line_end = buf.find(b"\r\n", pos)
        # (an empty head, CRLF CRLF, is no head: the status line after it may have no CRLF yet, `line_end` -1)
        if line_end < 0 or line_end + 4 > end or not buf.startswith(b"HTTP/", pos):
            raise _Reject(502, "upstream response has no status line")
        version = buf[pos + 5 : pos + 8]  # slice-ok: llhttp accepted `HTTP/x.y SP ddd [SP reason]`
        if version != b"1.1" and version != b"1.0":
            raise _Reject(502, f"upstream answered HTTP/{parser.get_http_version()}")
        reason = buf[pos + 13 : max(pos + 13, line_end)]
        block = buf[line_end + 2 : max(line_end + 2, end - 4)]  # its field lines (see `_HeadSink`)
        lines = block.split(b"\r\n") if block else []
        if len(lines) > self.limits.max_headers:
            raise _Reject(502, f"upstream response has more than {self.limits.max_headers} header fields")
        fields: list[tuple[bytes, bytes]] = []
        length: int | None = None
        chunked = False
        conn_tokens: set[bytes] = set()
        upgrade: bytes | None = None
        grpc_status: bytes | None = None
        dropped = False
        for line in lines:
            name, _, value = line.partition(b":")
            value = value.lstrip(b" \t")
            fields.append((name, value))
            kind = _RESPONSE_FIELDS.get(name.lower())
            if kind is None:  # most fields: forwarded as they are
                continue
            if kind == _CONTENT_LENGTH:
                length = int(value)
                continue
            if kind == _GRPC_STATUS:
                grpc_status = value
                continue
            dropped = True  # hop-by-hop: not forwarded
            if kind == _TRANSFER_ENCODING:
                if value.strip().lower() != b"chunked":
                    raise _Reject(502, "upstream used a transfer coding other than chunked")
                chunked = True
            elif kind == _CONNECTION:
                conn_tokens |= _tokens(value)
            elif kind == _UPGRADE and upgrade is None:
                upgrade = value
        if chunked and length is not None:
            raise _Reject(502, "upstream response has both Content-Length and Transfer-Encoding")
        if dropped or version != b"1.1":
            fwd = [(n, v) for n, v in fields if (low := n.lower()) not in _HOP_BY_HOP and low not in conn_tokens]
            out = [b"HTTP/1.1 %d " % status, reason, b"\r\n", *_fields(fwd)]
        else:
            # nothing to drop: the status line and fields as they came
            out = [buf[pos : end - 2]]  # slice-ok: pos <= line_end and line_end + 4 <= end (checked above)
        event = ResponseReceived(status=status, reason=reason, headers=tuple(fields), grpc_status=grpc_status)
        tunnel = status == 101 and head.upgrade is not None  # (CONNECT was refused: a 2xx opens no tunnel here)
        if 100 <= status < 200 and not tunnel:
            if status == 101:
                raise _Reject(502, "upstream switched protocols unasked")
            if status != 100 and head.version == b"1.1":  # 100 was ours to send; other 1xx go on
                out.append(b"\r\n")
                self._to_client.append(b"".join(out))
            return _INFORMATIONAL
        if tunnel:
            if head.upgrade is not None:
                out += (b"Connection: Upgrade\r\nUpgrade: ", upgrade or head.upgrade, b"\r\n")
            out.append(b"\r\n")
            self._to_client.append(b"".join(out))
            self._r = _R.TUNNEL
            self._c = _C.TUNNEL
            rest_up = self._up_in[self._up_pos :]
            rest_client = self._in[self._pos :]
            self._up_in, self._in, self._up_pos, self._pos = b"", b"", 0, 0
            if rest_up:
                self._to_client.append(rest_up)
            if rest_client:
                self._to_upstream.append(rest_client)
            return TunnelOpened()
        resp_keep = (b"close" not in conn_tokens) if version == b"1.1" else (b"keep-alive" in conn_tokens)
        no_body = head.method == b"HEAD" or status in (204, 304)
        self._resp_chunked_out = False
        if no_body:
            body = _Body()
        elif chunked:
            body = _Body(chunked=_Chunked(self.limits))
            if head.version == b"1.1":
                self._resp_chunked_out = True
                out.append(b"Transfer-Encoding: chunked\r\n")
            else:
                resp_keep = False  # an HTTP/1.0 client gets the decoded body, ended by close
        elif length is not None:
            body = _Body(length=length)
        else:
            body = _Body(until_eof=True)
            resp_keep = False
        # Upgrade/CONNECT refused upstream, or a request body still arriving: the connection ends here.
        if not (resp_keep and head.keep_alive and head.upgrade is None and self._c is _C.DONE):  # CONNECT: refused
            self._keep_alive = False
            out.append(b"Connection: close\r\n")
        elif head.version == b"1.0":
            out.append(b"Connection: keep-alive\r\n")
        out.append(b"\r\n")
        self._to_client.append(b"".join(out))
        self._resp_body = body
        self._r = _R.BODY
        return event

    def _next_response_body(self) -> ResponseEvent:
        body = self._resp_body
        assert body is not None
        buf, pos = self._up_in, self._up_pos
        piece: bytes | None = None
        if body.chunked is not None:
            pos, piece = body.chunked.step(buf, pos)
            done = body.chunked.done and piece is None
        elif body.until_eof:
            if len(buf) > pos:
                piece = buf if pos == 0 else buf[pos:]
                pos = len(buf)
            done = piece is None and self._upstream_eof
        else:
            n = min(body.remaining, len(buf) - pos)
            if n:
                body.remaining -= n
                piece = buf if (pos == 0 and n == len(buf)) else buf[pos : pos + n]  # slice-ok: n > 0
                pos += n
            done = body.remaining == 0 and piece is None
        self._up_pos = pos
        if piece is not None:
            if self._resp_chunked_out:
                self._to_client += (b"%x\r\n" % len(piece), piece, b"\r\n")
            else:
                self._to_client.append(piece)
            return ResponseData(piece)
        if not done:
            if self._upstream_eof:
                self._keep_alive = False
                self._c = _C.CLOSED  # truncated response: the client learns it from the close
                return CLOSED
            return NEED_DATA
        if self._resp_chunked_out:
            self._to_client.append(b"0\r\n\r\n")
        self._r = _R.DONE
        keep = self._keep_alive
        if not keep:
            self._c = _C.CLOSED
        self._maybe_next_cycle()
        return ResponseEnded(keep_alive=keep)

    def _bad_gateway(self, reason: str) -> ResponseEvent:
        self._keep_alive = False
        if self._r is _R.HEAD:  # nothing of the response reached the client yet: say why
            self._to_client.append(_local_response(502, reason.encode() + b"\n", b"text/plain", (), False, self._head))
        self._r = _R.DONE
        self._c = _C.CLOSED
        return CLOSED

    def _maybe_next_cycle(self) -> None:
        """Both directions of this request are done: the connection takes the next request (or ends)."""
        if self._c is _C.DONE and self._r is _R.DONE:
            if self._keep_alive and (self._head is None or self._head.keep_alive):
                self._c = _C.IDLE
                self._r = _R.IDLE
                self._head = None
                self._req_body = self._resp_body = None
            else:
                self._c = _C.CLOSED


def _local_response(
    status: int,
    body: bytes,
    content_type: bytes,
    headers: tuple[tuple[bytes, bytes], ...],
    keep_alive: bool,
    head: RequestHead | None,
) -> bytes:
    try:
        phrase = HTTPStatus(status).phrase.encode()
    except ValueError:
        phrase = b"Unknown"
    start = b"HTTP/1.1 %d %s\r\ncontent-length: %d\r\ncontent-type: %s\r\n"
    parts = [start % (status, phrase, len(body), content_type)]
    parts += _fields(headers)
    if not keep_alive:
        parts.append(b"connection: close\r\n")
    elif head is not None and head.version == b"1.0":
        parts.append(b"connection: keep-alive\r\n")
    parts.append(b"\r\n")
    if head is None or head.method != b"HEAD":
        parts.append(body)
    return b"".join(parts)


def _fields(headers: list[tuple[bytes, bytes]] | tuple[tuple[bytes, bytes], ...]) -> list[bytes]:
    parts: list[bytes] = []
    for name, value in headers:
        parts += (name, b": ", value, b"\r\n")
    return parts


def _append(buf: bytes, pos: int, data: bytes) -> bytes:
    """The unconsumed rest of `buf` with `data` after it; no copy when nothing was left."""
    if pos >= len(buf):
        return bytes(data)
    return buf[pos:] + data


__all__ = [
    "CLOSED",
    "DENIED_BODY",
    "H2_PREFACE",
    "NEED_DATA",
    "PATH_NORMALIZATIONS",
    "PAUSED",
    "SANITIZED_HEADERS",
    "UNDERSCORE_ACTIONS",
    "BadTarget",
    "Http1Connection",
    "Http1Error",
    "Limits",
    "RequestData",
    "RequestEnded",
    "RequestHead",
    "RequestReceived",
    "RequestRejected",
    "ResponseData",
    "ResponseEnded",
    "ResponseReceived",
    "TunnelOpened",
    "fold_name",
    "request_target",
]
