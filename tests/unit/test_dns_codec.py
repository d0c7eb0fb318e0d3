"""The DNS codec (sans-IO): hostile bytes give FORMERR or nothing, never an exception; round trips."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ztunnel.config.model import ClusterConfig
from ztunnel.net import dns
from ztunnel.proxy.dns import DnsServer, DnsTable

LABEL = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=63)


@given(st.binary(max_size=600))
def test_random_bytes_never_raise_anything_but_format_error(data: bytes) -> None:
    try:
        query = dns.parse_query(data)
    except dns.DnsFormatError:
        reply = dns.formerr_for(data)
        assert reply is None or dns.decode_reply(reply).rcode == dns.RCODE_FORMERR
    else:
        dns.build_response(query, dns.RCODE_NOERROR, ("10.0.0.1",))


@given(st.lists(LABEL, min_size=1, max_size=3), st.integers(0, 0xFFFF), st.sampled_from([1, 28, 33, 16]))
def test_query_round_trip(labels: list[str], msg_id: int, qtype: int) -> None:
    name = ".".join(labels)
    query = dns.parse_query(dns.encode_query(msg_id, name.upper(), qtype))
    assert (query.id, query.name, query.qtype, query.qclass) == (msg_id, name, qtype, dns.CLASS_IN)
    assert query.recursion_desired


@given(st.lists(st.ip_addresses().map(str), max_size=8), st.integers(0, 0xFFFF))
def test_answer_round_trip(addresses: list[str], msg_id: int) -> None:
    query = dns.parse_query(dns.encode_query(msg_id, "web.demo.svc.cluster.local", dns.TYPE_A))
    reply = dns.decode_reply(dns.build_response(query, dns.RCODE_NOERROR, tuple(addresses)))
    assert (reply.id, reply.rcode, reply.authoritative, reply.truncated) == (msg_id, 0, True, False)
    assert reply.addresses == tuple(addresses)


def test_reply_over_the_udp_limit_is_truncated_with_tc() -> None:
    query = dns.parse_query(dns.encode_query(7, "big.demo.svc.cluster.local", dns.TYPE_AAAA))
    many = tuple(f"fd00::{i:x}" for i in (range(1, 40)))
    reply_bytes = dns.build_response(query, dns.RCODE_NOERROR, many, limit=dns.UDP_ANSWER_LIMIT)
    reply = dns.decode_reply(reply_bytes)
    assert len(reply_bytes) <= dns.UDP_ANSWER_LIMIT and reply.truncated
    assert 0 < len(reply.addresses) < len(many)


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (dns.encode_query(1, "a.b", 1)[:-2], "question truncated"),
        (b"\x00\x01\x81\x00" + dns.encode_query(1, "a", 1)[4:], "a response"),
        (b"\x00\x01\x01\x00\x00\x02" + dns.encode_query(1, "a", 1)[6:], "2 questions"),
        (dns.encode_query(1, "a", 1)[:12] + b"\xc0\x0c\x00\x01\x00\x01", "compressed"),
        (dns.encode_query(1, "a", 1)[:12] + (b"\x3f" + b"a" * 63) * 5, "too long"),
    ],
)
def test_malformed_queries_are_format_errors(data: bytes, why: str) -> None:
    with pytest.raises(dns.DnsFormatError, match=why):
        dns.parse_query(data)


def test_formerr_keeps_the_id_and_a_response_gets_no_reply() -> None:
    reply = dns.formerr_for(b"\x12\x34\x01\x00garbage")
    assert reply is not None
    decoded = dns.decode_reply(reply)
    assert (decoded.id, decoded.rcode) == (0x1234, dns.RCODE_FORMERR)
    assert dns.formerr_for(b"\x12\x34\x81\x80") is None
    assert dns.formerr_for(b"\x12") is None


@given(st.binary(max_size=300))
def test_the_server_answers_random_bytes_with_a_reply_or_nothing(data: bytes) -> None:
    table = DnsTable.from_config(ClusterConfig(namespaces={}, workloads=(), services=(), nodes={}))
    reply = asyncio.run(DnsServer(lambda: table, None).answer(data, "demo", limit=dns.UDP_ANSWER_LIMIT))
    if reply is not None:  # a query answered (NXDOMAIN, SERVFAIL: no upstream) or FORMERR, with its id
        assert len(reply) <= dns.UDP_ANSWER_LIMIT
        assert dns.decode_reply(reply).id == data[0] << 8 | data[1]


def test_udp_payload_size_from_edns_and_the_tc_bit() -> None:
    plain = dns.encode_query(1, "example.org", dns.TYPE_A)
    assert dns.udp_payload_size(plain, dns.parse_query(plain)) == 512
    opt = b"\x00" + (41).to_bytes(2, "big") + (4096).to_bytes(2, "big") + b"\x00\x00\x00\x00\x00\x00"
    with_edns = plain[:10] + b"\x00\x01" + plain[12:] + opt  # arcount 1, an OPT record
    assert dns.udp_payload_size(with_edns, dns.parse_query(with_edns)) == 4096
    small = with_edns[: len(plain) + 3] + (100).to_bytes(2, "big") + with_edns[len(plain) + 5 :]
    assert dns.udp_payload_size(small, dns.parse_query(small)) == 512  # under 512 counts as 512
    not_opt = with_edns[: len(plain) + 1] + (1).to_bytes(2, "big") + with_edns[len(plain) + 3 :]
    assert dns.udp_payload_size(not_opt, dns.parse_query(not_opt)) == 512
    query = dns.parse_query(plain)
    many = tuple(f"10.0.{i // 250}.{i % 250}" for i in range(100))
    assert dns.is_truncated(dns.build_response(query, 0, many, limit=512))
    assert not dns.is_truncated(dns.build_response(query, 0, many))
    assert not dns.is_truncated(b"\x00")
