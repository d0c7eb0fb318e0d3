"""SOCKS5 handshake (RFC 1928), sans-IO."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ztunnel.proxy.socks5 import ConnectRequest, Reply, Socks5Error, Socks5Handshake, reply

GREETING = b"\x05\x01\x00"
IPV4_REQUEST = b"\x05\x01\x00\x01\x0a\x00\x00\x01\x1f\x90"  # 10.0.0.1:8080


def test_connect_ipv4_in_one_read_with_pipelined_payload() -> None:
    step = Socks5Handshake().receive_data(GREETING + IPV4_REQUEST + b"GET / HTTP/1.1\r\n")
    assert step.send == b"\x05\x00"
    assert step.request == ConnectRequest("10.0.0.1", 8080)
    assert step.leftover == b"GET / HTTP/1.1\r\n"


def test_byte_by_byte() -> None:
    hs = Socks5Handshake()
    sent = b""
    request = None
    for b in GREETING + IPV4_REQUEST:
        step = hs.receive_data(bytes([b]))
        sent += step.send
        request = step.request or request
    assert sent == b"\x05\x00"
    assert request == ConnectRequest("10.0.0.1", 8080)
    assert hs.done


def test_ipv6_and_domain() -> None:
    v6 = b"\x05\x01\x00\x04" + bytes(15) + b"\x01" + b"\x00\x50"
    assert Socks5Handshake().receive_data(GREETING + v6).request == ConnectRequest("::1", 80)
    name = b"backend.shop.svc.cluster.local"
    dom = b"\x05\x01\x00\x03" + bytes([len(name)]) + name + b"\x00\x50"
    assert Socks5Handshake().receive_data(GREETING + dom).request == ConnectRequest(name.decode(), 80, True)
    lit = b"10.1.1.1"
    dom = b"\x05\x01\x00\x03" + bytes([len(lit)]) + lit + b"\x00\x50"
    assert Socks5Handshake().receive_data(GREETING + dom).request == ConnectRequest("10.1.1.1", 80)


@pytest.mark.parametrize(
    ("data", "answer"),
    [
        (b"\x04\x01\x00\x50", b""),  # SOCKS4
        (b"GET / HTTP/1.1\r\n", b""),
        (b"\x05\x01\x02", b"\x05\xff"),  # only username/password offered
        (GREETING + b"\x05\x02\x00\x01" + bytes(6), b"\x05\x00" + reply(Reply.COMMAND_NOT_SUPPORTED)),  # BIND
        (GREETING + b"\x05\x01\x00\x09" + bytes(6), b"\x05\x00" + reply(Reply.ADDRESS_TYPE_NOT_SUPPORTED)),
        (GREETING + b"\x05\x01\x00\x01" + bytes(6), b"\x05\x00" + reply(Reply.HOST_UNREACHABLE)),  # port 0
    ],
)
def test_garbage_is_refused_with_the_right_reply(data: bytes, answer: bytes) -> None:
    with pytest.raises(Socks5Error) as e:
        Socks5Handshake().receive_data(data)
    assert e.value.reply == answer


def test_endless_greeting_is_cut_off() -> None:
    hs = Socks5Handshake()
    with pytest.raises(Socks5Error):
        for _ in range(100):
            hs.receive_data(b"\x05\xff" + b"\x01" * 10)


@given(st.binary(max_size=700))
def test_arbitrary_bytes_never_crash(data: bytes) -> None:
    hs = Socks5Handshake()
    try:
        step = hs.receive_data(data)
    except Socks5Error:
        return
    if step.request is not None:
        assert 0 < step.request.port < 65536


def test_reply_encoding() -> None:
    assert reply(Reply.SUCCEEDED) == b"\x05\x00\x00\x01\x00\x00\x00\x00\x00\x00"
    assert reply(Reply.NOT_ALLOWED, ("::1", 80))[:4] == b"\x05\x02\x00\x04"


@pytest.mark.parametrize(
    ("name", "host", "is_domain"),
    [
        ("127.0.0.1", "127.0.0.1", False),
        ("::ffff:7f00:1", "::ffff:7f00:1", False),  # a literal: the outbound makes it canonical (127.0.0.1)
        ("fe80::1%eth0", "fe80::1%eth0", False),  # a literal the outbound refuses (a zone id)
        ("127.1", "127.1", True),  # inet_aton's short, hex, integer and octal forms are names, not addresses
        ("0x7f000001", "0x7f000001", True),
        ("2130706433", "2130706433", True),
        ("0177.0.0.1", "0177.0.0.1", True),
    ],
)
def test_a_domain_name_is_an_address_only_when_it_is_a_strict_literal(name: str, host: str, is_domain: bool) -> None:
    raw = name.encode()
    dom = b"\x05\x01\x00\x03" + bytes([len(raw)]) + raw + b"\x00\x50"
    assert Socks5Handshake().receive_data(GREETING + dom).request == ConnectRequest(host, 80, is_domain)
