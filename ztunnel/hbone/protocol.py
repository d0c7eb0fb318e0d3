"""HBONE wire rules, sans-IO: the CONNECT request, its authority, the settings and the status codes.

Everything here is a pure function or constant so client and server agree by construction and the rules
are tested without sockets (DESIGN §4.2).
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import cast

from hpack import NeverIndexedHeaderTuple

from ztunnel.errors import ZtunnelError
from ztunnel.ports import HBONE_PORT as HBONE_PORT  # defined once, in ztunnel.ports

# Flow control: a stream may have 4 MiB in flight, a connection 16 MiB. Bigger windows buy throughput on
# long fat links; the receive buffer of a slow reader is bounded by exactly these numbers.
# Why an HBONE connection was refused after TLS: the `reason` label of ztunnel_tls_failures_total and the
# response flag of the connections that needed it (DESIGN §4.2).
TLS_FAILURE = "TLS_FAILURE"  # the handshake failed (unknown CA, bad certificate, reset)
IDENTITY_ERROR = "IDENTITY_ERROR"  # the peer's SVID is not an expected identity (or trust domain)

STREAM_WINDOW = 4 * 1024 * 1024
CONNECTION_WINDOW = 16 * 1024 * 1024
MAX_FRAME_SIZE = 1024 * 1024
# The client opens another pooled connection past this many streams, so one TLS connection (one core on
# the peer) never carries everything.
MAX_STREAMS_PER_CONNECTION = 100
# What the server allows: a little above the client's limit so a well-behaved pool never hits
# REFUSED_STREAM, and no more: every open stream may pin up to about 1 MiB of the proxy's memory toward a
# peer that grants no window (README "Limits under attack"), so this bounds one connection's share (was 1000).
SERVER_MAX_CONCURRENT_STREAMS = 128
# Limits under attack (README "Limits under attack"): what a hostile peer can pin in a proxy, at most. A
# peer is a (verified identity, client address) pair: an identity is a service account, shared by every
# replica on every node, and the address a connection comes from is its client node (a node proxy dials
# HBONE from its own netns), so what one address uses up is never taken from the same identity elsewhere.
#   per peer, both ways: PEER_BUDGET (64 MiB) of app bytes across its connections: DATA it sent that the
#       local app has not taken (its window not given back: a stream's share <= STREAM_WINDOW, a
#       connection's <= CONNECTION_WINDOW), and app data read for a stream it grants no window (the one
#       chunk <= streams.READ_CHUNK, 256 KiB, it had no window for; the upstream socket pauses at once);
#       the stream that would go past it is reset (ENHANCE_YOUR_CALM)
#   per connection, received: one partial frame (MAX_FRAME_SIZE, 1 MiB) + the TLS read buffer (256 KiB) +
#       a header block (64 KiB) + what the local apps' TCP transports hold under their high-water mark
#       before the stream stops pushing (SERVER_MAX_CONCURRENT_STREAMS x 64 KiB = 8 MiB)
#   per connection, not sent: WRITE_BUFFER_CAP (8 MiB) in the TLS write buffer (a peer that does not read
#       its socket; the connection is aborted past it) + EARLY_FLUSH (1 MiB) h2 queued meanwhile
#   so ~19 MiB per connection, and a peer holds at most PEER_MAX_CONNECTIONS (256) of them:
#   64 MiB + 256 x 19 MiB ~ 4.8 GiB per (identity, client address) at the very worst (every connection
#   with 128 stalled streams, a peer that does not read, and partial frames). An attacker holding one SVID
#   key can spend that from each address it can connect from (its pod's; through its node's proxy, the
#   node's, which the identity's replicas on that node share), which takes nothing from the same
#   identity's replicas on other nodes: their node proxies connect from their own addresses, each with its
#   own count and budget.
#   per server: MAX_INBOUND_CONNECTIONS connections however many identities and addresses there are, each
#       at most ~19 MiB + the budget bytes it can hold (<= CONNECTION_WINDOW unread + 128 x 256 KiB parked
#       = 48 MiB), so a fixed bound (was: unbounded, N identities x 4.8 GiB); reaching it takes SVIDs on
#       MAX_INBOUND_CONNECTIONS / 256 client addresses and every connection at its own worst case.
#   What the kernel holds in socket buffers is not counted.
WRITE_BUFFER_CAP = 8 * 1024 * 1024
EARLY_FLUSH = 1024 * 1024  # HTTP/2 output queued in one loop iteration past which it is written at once
PEER_BUDGET = 64 * 1024 * 1024
# Concurrent inbound HBONE connections one peer (identity, client address) may hold; the next is closed
# right after its handshake. A client node's pool opens one connection per source identity and destination
# pod, and another per MAX_STREAMS_PER_CONNECTION tunnels (10,000 tunnels to one pod, the bench's largest
# step, take 100), so 256 covers a node's pods (110 by default) with room for a burst and a drain's overlap
# while the per-peer worst case above stays a fixed number.
PEER_MAX_CONNECTIONS = 256
# Concurrent inbound HBONE connections one server (node proxy) holds in all; the next is closed right after
# its handshake. It keeps the per-server worst case above a fixed number whatever the count of identities
# and addresses. Legitimately a server holds one connection per (client node, source identity, local pod):
# 16,384 is e.g. 100 client nodes x 16 identities x 10 pods. An idle connection costs the proxy ~74 KiB
# (1,000 from 1,000 addresses: +72 MiB RSS), so ~1.2 GiB at the cap, and a descriptor each, well within
# the hard open-files limit the proxy raises its own to.
MAX_INBOUND_CONNECTIONS = 16384
# The largest header block (HEADERS + CONTINUATION frames) and decoded header list accepted, advertised as
# SETTINGS_MAX_HEADER_LIST_SIZE. A CONNECT's headers take a few hundred bytes; the block is counted as its
# frames arrive, so a peer cannot make the proxy buffer more than this (plus one read) per connection.
MAX_HEADER_LIST = 64 * 1024
# Per connection and second (server side): new streams, and streams the peer resets before they were
# answered. A flood of HEADERS+RST_STREAM pairs (HTTP/2 "rapid reset", CVE-2023-44487) makes the proxy do
# the set-up work of every stream for nothing; past either budget the connection gets
# GOAWAY(ENHANCE_YOUR_CALM). A proxy worker sets up ~1,000 tunnels a second in all, and a legitimate
# client gives up on a tunnel before its answer only when its own app does.
STREAM_OPEN_BUDGET = 4000
PREMATURE_RESET_BUDGET = 200
KEEPALIVE_INTERVAL = 10.0
KEEPALIVE_TIMEOUT = 20.0

STATUS_OK = 200
STATUS_BAD_REQUEST = 400
STATUS_UNAUTHORIZED = 401
STATUS_UNAVAILABLE = 503


class HboneError(ZtunnelError):
    """A tunnel could not be set up or broke; `status` is the HTTP status when the server answered.

    `refused`: the server did not process the request at all (REFUSED_STREAM, or a stream above a
    GOAWAY's last stream id), so it may be sent again on another connection (RFC 9113 §8.7).
    """

    def __init__(self, message: str, *, status: int | None = None, refused: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.refused = refused


class AuthorityError(HboneError):
    def __init__(self, message: str) -> None:
        super().__init__(message, status=STATUS_BAD_REQUEST)


@dataclass(frozen=True, slots=True)
class Authority:
    """The tunnel target: an IP literal (v4 or v6) and a port."""

    ip: str
    port: int

    def __str__(self) -> str:
        return format_authority(self.ip, self.port)


def format_authority(ip: str, port: int) -> str:
    """`ip:port`, with brackets for IPv6 (`[::1]:8080`)."""
    canonical, version = _canonical_ip(ip)
    return f"[{canonical}]:{port}" if version == 6 else f"{canonical}:{port}"


@functools.lru_cache(maxsize=4096)
def _canonical_ip(ip: str) -> tuple[str, int]:
    """The canonical text and version of an IP literal; cached, as the same few addresses recur on every
    connection (parsing one with ipaddress costs more than the rest of the CONNECT headers)."""
    addr = ipaddress.ip_address(ip)
    return str(addr), addr.version


# The longest authority a workload address can have: `[` + 45 (IPv6 text with an embedded IPv4) + `]:65535`.
MAX_AUTHORITY_LENGTH = 53
_PORT_DIGITS = frozenset("0123456789")
PEER_TEXT_SHOWN = 256  # how much of a peer-controlled string an error message quotes


def quote_peer_text(text: str, limit: int = PEER_TEXT_SHOWN) -> str:
    """`text` quoted for an error message or log line: repr (control characters escaped), at most `limit`
    characters of it, and the full length when clipped, so a peer cannot make us log megabytes."""
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text)} chars)"


def parse_authority(text: str) -> Authority:
    """Parse `ip:port` / `[v6]:port`. Host names are refused: HBONE addresses workloads by IP.

    The length is checked before anything else, and the peer's text is quoted once, clipped (it ends up in
    the refusal's log line and access log)."""
    if len(text) > MAX_AUTHORITY_LENGTH:
        raise AuthorityError(f"malformed authority {quote_peer_text(text)}: longer than any ip:port")
    if text.startswith("["):
        end = text.find("]")
        if end < 0 or text[end + 1 : end + 2] != ":":
            raise AuthorityError(f"malformed authority {text!r}: expected [ipv6]:port")
        host, port_text = text[1:end], text[end + 2 :]
        want_version = 6
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or not host:
            raise AuthorityError(f"malformed authority {text!r}: expected ip:port")
        want_version = 4
    # ASCII digits only: str.isdigit() also takes `²` (which int() refuses) and other scripts' digits.
    if not port_text or len(port_text) > 5 or not _PORT_DIGITS.issuperset(port_text) or not 0 < int(port_text) < 65536:
        raise AuthorityError(f"malformed authority {text!r}: port must be 1-65535")
    if "%" in host:
        raise AuthorityError(f"malformed authority {text!r}: a scoped address (%zone) is not a workload address")
    try:
        canonical, version = _canonical_ip(host)
    except ValueError:
        raise AuthorityError(f"malformed authority {text!r}: the host is not an IP address") from None
    if version != want_version:
        raise AuthorityError(f"malformed authority {text!r}: IPv6 addresses need brackets")
    return Authority(canonical, int(port_text))


# The same few targets recur on every tunnel; Authority is immutable, so parses can be shared.
_parse_target = functools.lru_cache(maxsize=4096)(parse_authority)


def connect_headers(
    target: Authority, *, forwarded_for: tuple[str, int] | None = None, extra: Sequence[tuple[str, str]] = ()
) -> list[tuple[str, str]]:
    """The request headers of one tunnel."""
    headers = [(":method", "CONNECT"), (":authority", str(target))]
    if forwarded_for is not None:
        # Never indexed: a client port is different on every tunnel, so indexing it only churns the HPACK
        # table (and makes every later lookup in it slower).
        forwarded = NeverIndexedHeaderTuple("forwarded", f'for="{format_authority(*forwarded_for)}"')
        headers.append(cast(tuple[str, str], forwarded))
    headers.extend(extra)
    return headers


@dataclass(frozen=True, slots=True)
class ConnectRequest:
    """A valid CONNECT as the server sees it."""

    target: Authority
    forwarded_for: tuple[str, int] | None
    headers: Mapping[str, str]

    @property
    def traceparent(self) -> str | None:
        """The W3C `traceparent` the caller sent, if well formed (it goes into log lines, so nothing else)."""
        value = self.headers.get("traceparent", "").strip().lower()
        return value if TRACEPARENT.fullmatch(value) else None

    @property
    def baggage(self) -> str | None:
        return self.headers.get("baggage")


TRACEPARENT = re.compile(r"[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}")


def trace_headers(traceparent: str | None = None, baggage: str | None = None) -> list[tuple[str, str]]:
    """The optional tracing headers of a CONNECT (DESIGN §4.2), for callers that know them (waypoints)."""
    out: list[tuple[str, str]] = []
    if traceparent:
        out.append(("traceparent", traceparent))
    if baggage:
        out.append(("baggage", baggage))
    return out


@dataclass(frozen=True, slots=True)
class Rejection:
    status: int
    reason: str


def parse_forwarded_for(value: str) -> tuple[str, int] | None:
    """The `for=` element of a Forwarded header (RFC 7239), if it is an ip:port; otherwise None."""
    for element in value.split(";"):
        for pair in element.split(","):
            key, _, raw = pair.strip().partition("=")
            if key.strip().lower() != "for":
                continue
            raw = raw.strip().strip('"')
            try:
                a = parse_authority(raw)
            except AuthorityError:
                try:
                    return (str(ipaddress.ip_address(raw.strip("[]"))), 0)
                except ValueError:
                    return None
            return (a.ip, a.port)
    return None


def validate_connect(headers: Sequence[tuple[str, str]]) -> ConnectRequest | Rejection:
    """Server side: is this request a tunnel we can serve? (400 otherwise)"""
    fields: dict[str, str] = {}
    for name, value in headers:
        fields.setdefault(name.lower(), value)
    method = fields.get(":method", "")
    if method != "CONNECT":
        return Rejection(STATUS_BAD_REQUEST, f"method {quote_peer_text(method) if method else '(none)'} is not CONNECT")
    if ":protocol" in fields:
        return Rejection(STATUS_BAD_REQUEST, "extended CONNECT is not supported")
    try:
        target = _parse_target(fields.get(":authority", ""))
    except AuthorityError as e:
        return Rejection(STATUS_BAD_REQUEST, str(e))
    forwarded = parse_forwarded_for(fields["forwarded"]) if "forwarded" in fields else None
    return ConnectRequest(target=target, forwarded_for=forwarded, headers=fields)


def response_status(headers: Sequence[tuple[str, str]]) -> int:
    for name, value in headers:
        if name == ":status":
            try:
                return int(value)
            except ValueError:
                break
    raise HboneError("the HBONE server sent a response without a valid :status")
