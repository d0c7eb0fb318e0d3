"""HBONE wire rules: authorities, CONNECT validation, Forwarded parsing."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ztunnel.hbone.protocol import (
    Authority,
    AuthorityError,
    ConnectRequest,
    Rejection,
    connect_headers,
    format_authority,
    parse_authority,
    parse_forwarded_for,
    validate_connect,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("10.0.0.1:8080", Authority("10.0.0.1", 8080)),
        ("[::1]:80", Authority("::1", 80)),
        ("[fd00:0::1]:443", Authority("fd00::1", 443)),
    ],
)
def test_parse_authority(text: str, expected: Authority) -> None:
    assert parse_authority(text) == expected


@pytest.mark.parametrize(
    "text",
    ["", "10.0.0.1", "10.0.0.1:", "10.0.0.1:0", "10.0.0.1:65536", "host:80", "::1:80", "[::1]80", "[10.0.0.1]:80"],
)
def test_malformed_authorities_are_400(text: str) -> None:
    with pytest.raises(AuthorityError) as e:
        parse_authority(text)
    assert e.value.status == 400


@given(st.ip_addresses(), st.integers(1, 65535))
def test_format_then_parse_round_trips(ip: object, port: int) -> None:
    text = format_authority(str(ip), port)
    assert parse_authority(text) == Authority(str(ip), port)


def test_connect_headers_and_validation_agree() -> None:
    headers = connect_headers(Authority("fd00::7", 9090), forwarded_for=("10.1.2.3", 5555))
    assert headers[:2] == [(":method", "CONNECT"), (":authority", "[fd00::7]:9090")]
    verdict = validate_connect(headers)
    assert isinstance(verdict, ConnectRequest)
    assert verdict.target == Authority("fd00::7", 9090)
    assert verdict.forwarded_for == ("10.1.2.3", 5555)


@pytest.mark.parametrize(
    "headers",
    [
        [(":method", "GET"), (":path", "/"), (":authority", "10.0.0.1:80")],
        [(":method", "CONNECT"), (":authority", "example.com:80")],
        [(":method", "CONNECT"), (":protocol", "websocket"), (":authority", "10.0.0.1:80")],
        [(":method", "CONNECT")],
    ],
)
def test_bad_requests_are_rejected_with_400(headers: list[tuple[str, str]]) -> None:
    verdict = validate_connect(headers)
    assert isinstance(verdict, Rejection) and verdict.status == 400


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ('for="10.0.0.1:1234"', ("10.0.0.1", 1234)),
        ('for="[::1]:80";proto=https', ("::1", 80)),
        ("for=10.0.0.2", ("10.0.0.2", 0)),
        ("by=10.0.0.3", None),
        ('for="unknown"', None),
    ],
)
def test_forwarded_for(value: str, expected: tuple[str, int] | None) -> None:
    assert parse_forwarded_for(value) == expected


@pytest.mark.parametrize(
    "text",
    [
        "10.0.0.1:8080\u00b2",  # superscript two: str.isdigit() says yes, int() says no
        "10.0.0.1:\u0668\u0660",  # Arabic-Indic digits: int() would take them as 80
        "[::1]:\uff18\uff10",  # fullwidth digits
        "10.0.0.1:000080",  # more digits than a port has
        "[fe80::1%eth0]:80",  # a scoped address is no workload's address
    ],
)
def test_ports_and_hosts_outside_ascii_ip_port_are_400(text: str) -> None:
    with pytest.raises(AuthorityError) as e:
        parse_authority(text)
    assert e.value.status == 400
    verdict = validate_connect([(":method", "CONNECT"), (":authority", text)])
    assert isinstance(verdict, Rejection) and verdict.status == 400


def test_a_huge_authority_is_quoted_once_and_clipped() -> None:
    text = "1" * 60_000 + ":80"
    verdict = validate_connect([(":method", "CONNECT"), (":authority", text)])
    assert isinstance(verdict, Rejection) and verdict.status == 400
    assert len(verdict.reason) < 400, verdict.reason
    assert verdict.reason.count("1" * 200) == 1  # the peer's text appears once, clipped
    assert "60003 chars" in verdict.reason
    method = validate_connect([(":method", "G" * 60_000), (":authority", "10.0.0.1:80")])
    assert isinstance(method, Rejection) and len(method.reason) < 400


def test_forwarded_with_non_ascii_digits_is_ignored() -> None:
    assert parse_forwarded_for('for="10.0.0.1:8080\u00b2"') is None
