"""SOCKS5 server handshake (RFC 1928), sans-IO: CONNECT with "no authentication" only.

Feed bytes with `receive_data`; it returns what to send back and, once the request is complete, the
requested address. Anything else (other versions, methods, commands, truncated or oversized input) is a
`Socks5Error` carrying the reply to send before closing, so a garbage client gets a clear refusal.
"""

from __future__ import annotations

import enum
import ipaddress
import socket
import struct
from dataclasses import dataclass

VERSION = 5
METHOD_NO_AUTH = 0x00
METHOD_NONE_ACCEPTABLE = 0xFF
CMD_CONNECT = 0x01
ATYP_IPV4 = 0x01
ATYP_DOMAIN = 0x03
ATYP_IPV6 = 0x04


class Reply(enum.IntEnum):
    SUCCEEDED = 0x00
    GENERAL_FAILURE = 0x01
    NOT_ALLOWED = 0x02
    NETWORK_UNREACHABLE = 0x03
    HOST_UNREACHABLE = 0x04
    CONNECTION_REFUSED = 0x05
    TTL_EXPIRED = 0x06
    COMMAND_NOT_SUPPORTED = 0x07
    ADDRESS_TYPE_NOT_SUPPORTED = 0x08


class Socks5Error(Exception):
    """The client broke the protocol; send `reply` (may be empty) and close."""

    def __init__(self, message: str, reply: bytes = b"") -> None:
        super().__init__(message)
        self.reply = reply


@dataclass(frozen=True, slots=True)
class ConnectRequest:
    # An IP literal as sent (the outbound makes it canonical: `::ffff:10.0.0.1` is 10.0.0.1), or a domain name
    # when the client sent one (ATYP 3) that is not a strict literal: `127.1`, `0x7f000001`, `2130706433` and
    # `0177.0.0.1` stay names, and the proxy resolves names only to Service ClusterIPs, never with DNS.
    host: str
    port: int
    is_domain: bool = False


@dataclass(frozen=True, slots=True)
class Step:
    """Result of feeding bytes: bytes to send now, the request once complete, and bytes read past it."""

    send: bytes = b""
    request: ConnectRequest | None = None
    leftover: bytes = b""


_UNBOUND = ("0.0.0.0", 0)


def _build_reply(code: int, bind: tuple[str, int]) -> bytes:
    addr = ipaddress.ip_address(bind[0])
    atyp = ATYP_IPV4 if addr.version == 4 else ATYP_IPV6
    return bytes([VERSION, int(code), 0, atyp]) + addr.packed + struct.pack("!H", bind[1])


# Every reply the proxy sends carries the unspecified bind address: built once, not per connection.
_UNBOUND_REPLIES = {code: _build_reply(code, _UNBOUND) for code in Reply}


def reply(code: Reply, bind: tuple[str, int] = _UNBOUND) -> bytes:
    if bind == _UNBOUND:
        cached = _UNBOUND_REPLIES.get(code)
        if cached is not None:
            return cached
    return _build_reply(code, bind)


class Socks5Handshake:
    """Server side of one SOCKS5 negotiation."""

    # A greeting lists at most 255 methods and a request is at most 4+1+255+2 bytes: anything that
    # buffers more before completing is not SOCKS5.
    MAX_BUFFER = 600

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._state = "greeting"

    @property
    def done(self) -> bool:
        return self._state == "done"

    def receive_data(self, data: bytes) -> Step:
        if self._state in ("done", "failed"):
            raise Socks5Error("the SOCKS5 handshake is already over")
        self._buffer += data
        if len(self._buffer) > self.MAX_BUFFER:
            self._state = "failed"
            raise Socks5Error("SOCKS5 handshake too long", reply(Reply.GENERAL_FAILURE))
        send = b""
        if self._state == "greeting":
            out = self._greeting()
            if out is None:
                return Step()
            send = out
        if self._state == "request":
            try:
                request = self._request()
            except Socks5Error as e:  # keep the method reply of this same call in front of the error
                raise Socks5Error(str(e), send + e.reply) from None
            if request is None:
                return Step(send=send)
            self._state = "done"
            leftover = bytes(self._buffer)
            self._buffer.clear()
            return Step(send=send, request=request, leftover=leftover)
        return Step(send=send)

    def _greeting(self) -> bytes | None:
        buf = self._buffer
        if len(buf) < 1:
            return None
        if buf[0] != VERSION:
            self._state = "failed"
            raise Socks5Error(f"not a SOCKS5 client (version byte {buf[0]:#04x})")
        if len(buf) < 2 or len(buf) < 2 + buf[1]:
            return None
        n = buf[1]
        methods = bytes(buf[2 : 2 + n])
        del buf[: 2 + n]
        if METHOD_NO_AUTH not in methods:
            self._state = "failed"
            raise Socks5Error(
                "the SOCKS5 client offers no acceptable authentication method (only 'no authentication' is supported)",
                bytes([VERSION, METHOD_NONE_ACCEPTABLE]),
            )
        self._state = "request"
        return bytes([VERSION, METHOD_NO_AUTH])

    def _request(self) -> ConnectRequest | None:
        buf = self._buffer
        if len(buf) < 4:
            return None
        ver, cmd, _rsv, atyp = buf[0], buf[1], buf[2], buf[3]
        if ver != VERSION:
            self._state = "failed"
            raise Socks5Error(f"bad SOCKS5 request version {ver:#04x}", reply(Reply.GENERAL_FAILURE))
        if atyp == ATYP_IPV4:
            need = 4 + 4 + 2
        elif atyp == ATYP_IPV6:
            need = 4 + 16 + 2
        elif atyp == ATYP_DOMAIN:
            if len(buf) < 5:
                return None
            need = 5 + buf[4] + 2
        else:
            self._state = "failed"
            raise Socks5Error(
                f"SOCKS5 address type {atyp:#04x} is not supported", reply(Reply.ADDRESS_TYPE_NOT_SUPPORTED)
            )
        if len(buf) < need:
            return None
        if cmd != CMD_CONNECT:
            self._state = "failed"
            raise Socks5Error(
                f"SOCKS5 command {cmd:#04x} is not supported (only CONNECT)", reply(Reply.COMMAND_NOT_SUPPORTED)
            )
        port = buf[need - 2] << 8 | buf[need - 1]
        if atyp == ATYP_IPV4:
            host, is_domain = socket.inet_ntoa(bytes(buf[4:8])), False
        elif atyp == ATYP_IPV6:
            host, is_domain = str(ipaddress.IPv6Address(bytes(buf[4:20]))), False
        else:
            try:
                host = bytes(buf[5 : 5 + buf[4]]).decode("ascii")
            except UnicodeDecodeError:
                self._state = "failed"
                raise Socks5Error("SOCKS5 domain name is not ASCII", reply(Reply.HOST_UNREACHABLE)) from None
            is_domain = True
            try:  # a literal sent as a domain is still an address
                host, is_domain = str(ipaddress.ip_address(host)), False
            except ValueError:
                pass
        del buf[:need]
        if port == 0:
            self._state = "failed"
            raise Socks5Error("SOCKS5 request for port 0", reply(Reply.HOST_UNREACHABLE))
        return ConnectRequest(host, port, is_domain)
