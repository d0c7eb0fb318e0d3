"""A sans-IO codec for the DNS messages the node proxy answers (RFC 1035), standard library only.

Only what a stub resolver sends is parsed: one question, names without compression. Everything
else a client may send is hostile input: `parse_query` raises `DnsFormatError` (never anything
else) and `formerr_for` builds the FORMERR reply when at least the id could be read. Answers point
their owner name at the question (offset 12), so they carry no name bytes of their own.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

TYPE_A = 1
TYPE_AAAA = 28
TYPE_OPT = 41  # EDNS(0) pseudo-record: its class is the sender's UDP payload size (RFC 6891)
CLASS_IN = 1

RCODE_NOERROR = 0
RCODE_FORMERR = 1
RCODE_SERVFAIL = 2
RCODE_NXDOMAIN = 3
RCODE_NOTIMP = 4

MAX_MESSAGE = 65535  # the TCP length prefix's range; UDP callers pass their datagram as is
MAX_NAME = 255  # octets on the wire, RFC 1035 §2.3.4
UDP_ANSWER_LIMIT = 512  # without EDNS a reply over this is truncated (TC) and the client retries on TCP

_HEADER = struct.Struct("!HHHHHH")
_QUESTION_TAIL = struct.Struct("!HH")
_ANSWER_TAIL = struct.Struct("!HHHIH")  # pointer, type, class, ttl, rdlength

_QR = 0x8000
_OPCODE_MASK = 0x7800
_AA = 0x0400
_TC = 0x0200
_RD = 0x0100
_RA = 0x0080


class DnsFormatError(ValueError):
    """The bytes are not a query this codec answers (the reply is FORMERR, or nothing if no id)."""


@dataclass(frozen=True)
class Query:
    id: int
    flags: int
    name: str  # lower case, without the trailing dot; "" for the root
    qtype: int
    qclass: int
    question: bytes  # the question section as received, echoed in the reply

    @property
    def recursion_desired(self) -> bool:
        return bool(self.flags & _RD)


def parse_query(data: bytes) -> Query:
    """Parse a standard query with exactly one question; any other input raises DnsFormatError."""
    if len(data) < _HEADER.size or len(data) > MAX_MESSAGE:
        raise DnsFormatError(f"message of {len(data)} bytes")
    msg_id, flags, qdcount, ancount, nscount, _arcount = _HEADER.unpack_from(data)
    if flags & _QR:
        raise DnsFormatError("a response, not a query")
    if flags & _OPCODE_MASK:
        raise DnsFormatError("opcode other than QUERY")
    if qdcount != 1 or ancount or nscount:
        raise DnsFormatError(f"{qdcount} questions, {ancount} answers, {nscount} authority records")
    labels: list[str] = []
    pos = _HEADER.size
    wire_len = 1
    while True:
        if pos >= len(data):
            raise DnsFormatError("name runs past the message")
        length = data[pos]
        pos += 1
        if length == 0:
            break
        if length > 63:
            raise DnsFormatError("compressed or extended label in the question")
        wire_len += length + 1
        if wire_len > MAX_NAME or pos + length > len(data):
            raise DnsFormatError("name too long or truncated")
        labels.append(data[pos : pos + length].decode("latin-1").lower())
        pos += length
    if pos + _QUESTION_TAIL.size > len(data):
        raise DnsFormatError("question truncated")
    qtype, qclass = _QUESTION_TAIL.unpack_from(data, pos)
    pos += _QUESTION_TAIL.size
    return Query(msg_id, flags, ".".join(labels), qtype, qclass, bytes(data[_HEADER.size : pos]))


def formerr_for(data: bytes) -> bytes | None:
    """The FORMERR reply to bytes that did not parse, or None when not even an id could be read."""
    if len(data) < 2:
        return None
    (msg_id,) = struct.unpack_from("!H", data)
    if len(data) >= 4 and struct.unpack_from("!H", data, 2)[0] & _QR:
        return None  # never answer a response: two servers would bounce FORMERRs forever
    return _HEADER.pack(msg_id, _QR | RCODE_FORMERR, 0, 0, 0, 0)


def build_response(
    query: Query,
    rcode: int,
    addresses: tuple[str, ...] = (),
    *,
    ttl: int = 30,
    authoritative: bool = True,
    limit: int = MAX_MESSAGE,
) -> bytes:
    """The reply to `query`: `addresses` as A/AAAA records of the question's name.

    Records that would take the reply past `limit` are left out and TC is set (RFC 2181 §9).
    """
    flags = _QR | (query.flags & _RD) | _RA | (rcode & 0xF)
    if authoritative:
        flags |= _AA
    body = bytearray(query.question)
    count = 0
    for address in addresses:
        ip = ipaddress.ip_address(address)
        rtype = TYPE_A if ip.version == 4 else TYPE_AAAA
        record = _ANSWER_TAIL.pack(0xC000 | _HEADER.size, rtype, CLASS_IN, ttl, len(ip.packed)) + ip.packed
        if _HEADER.size + len(body) + len(record) > limit:
            flags |= _TC
            break
        body += record
        count += 1
    return _HEADER.pack(query.id, flags, 1, count, 0, 0) + bytes(body)


def udp_payload_size(data: bytes, query: Query) -> int:
    """The largest UDP reply the asker takes: its EDNS(0) payload size when the additional section starts with
    an OPT record (values under 512 count as 512, RFC 6891 §6.2.5), else 512."""
    (arcount,) = struct.unpack_from("!H", data, 10)
    pos = _HEADER.size + len(query.question)
    if arcount and pos + 5 <= len(data) and data[pos] == 0:  # OPT's owner is the root
        rtype, size = struct.unpack_from("!HH", data, pos + 1)
        if rtype == TYPE_OPT:
            return max(UDP_ANSWER_LIMIT, int(size))
    return UDP_ANSWER_LIMIT


def is_truncated(data: bytes) -> bool:
    """Has this reply its TC bit set (the answer did not fit: ask again over TCP)?"""
    return len(data) >= 4 and bool(struct.unpack_from("!H", data, 2)[0] & _TC)


def response_id(data: bytes) -> int | None:
    """The id of a response from an upstream resolver, or None if it is not a response."""
    if len(data) < _HEADER.size:
        return None
    msg_id, flags = struct.unpack_from("!HH", data)
    return msg_id if flags & _QR else None


def encode_query(msg_id: int, name: str, qtype: int, *, recursion_desired: bool = True) -> bytes:
    """A query (tests and the health of the forwarding path); labels over 63 octets are refused."""
    out = bytearray(_HEADER.pack(msg_id, _RD if recursion_desired else 0, 1, 0, 0, 0))
    for label in [part for part in name.rstrip(".").split(".") if part]:
        raw = label.encode("ascii")
        if len(raw) > 63:
            raise ValueError(f"label {label!r} is over 63 octets")
        out += bytes([len(raw)]) + raw
    out += b"\x00" + _QUESTION_TAIL.pack(qtype, CLASS_IN)
    return bytes(out)


@dataclass(frozen=True)
class Reply:
    """A decoded reply, for tests and clients: rcode, flags and the A/AAAA addresses it carries."""

    id: int
    rcode: int
    authoritative: bool
    truncated: bool
    addresses: tuple[str, ...]


def decode_reply(data: bytes) -> Reply:
    """Decode a reply built by `build_response` (answers pointing at the question); DnsFormatError if not."""
    if len(data) < _HEADER.size:
        raise DnsFormatError("short reply")
    msg_id, flags, qdcount, ancount, _ns, _ar = _HEADER.unpack_from(data)
    pos = _HEADER.size
    for _ in range(qdcount):
        while pos < len(data) and data[pos] != 0:
            pos += data[pos] + 1
        pos += 1 + _QUESTION_TAIL.size
    addresses: list[str] = []
    for _ in range(ancount):
        if pos + _ANSWER_TAIL.size > len(data):
            raise DnsFormatError("answer truncated")
        _ptr, rtype, _cls, _ttl, rdlen = _ANSWER_TAIL.unpack_from(data, pos)
        pos += _ANSWER_TAIL.size
        rdata = data[pos : pos + rdlen]
        pos += rdlen
        if rtype in (TYPE_A, TYPE_AAAA) and len(rdata) in (4, 16):
            addresses.append(str(ipaddress.ip_address(rdata)))
    return Reply(msg_id, flags & 0xF, bool(flags & _AA), bool(flags & _TC), tuple(addresses))
