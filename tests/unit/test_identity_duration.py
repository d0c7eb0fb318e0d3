"""Small parsers of the CA commands: durations, serials, listen addresses and server cert names."""

from __future__ import annotations

import datetime as dt

import pytest

from ztunnel.identity.commands import CommandError, parse_serial
from ztunnel.identity.duration import DurationError, format_duration, parse_duration
from ztunnel.identity.server import CAServerError, server_names, split_host_port


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("24h", 86400), ("6s", 6), ("30m", 1800), ("1h30m", 5400), ("7d", 604800), ("500ms", 0.5), ("90", 90)],
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == dt.timedelta(seconds=seconds)


@pytest.mark.parametrize("text", ["", "h", "24x", "0s", "1h 30m", "-5s", "s24"])
def test_bad_durations_are_refused(text: str) -> None:
    with pytest.raises(DurationError):
        parse_duration(text)


def test_format_duration() -> None:
    assert format_duration(dt.timedelta(hours=24)) == "24h"
    assert format_duration(dt.timedelta(minutes=30)) == "30m"
    assert format_duration(dt.timedelta(seconds=6)) == "6s"


def test_serials_are_hex_as_openssl_prints_them() -> None:
    assert parse_serial("1A2B") == 0x1A2B
    assert parse_serial("0x1a2b") == 0x1A2B
    assert parse_serial("1a:2b") == 0x1A2B
    assert parse_serial("serial=1A2B") == 0x1A2B
    for bad in ("xyz", "0", ""):
        with pytest.raises(CommandError):
            parse_serial(bad)


def test_listen_addresses() -> None:
    assert split_host_port("127.0.0.1:15012") == ("127.0.0.1", 15012)
    assert split_host_port("[::1]:0") == ("::1", 0)
    assert split_host_port("localhost:80") == ("localhost", 80)
    for bad in ("15012", ":15012", "host:port", "host:70000"):
        with pytest.raises(CAServerError):
            split_host_port(bad)


def test_server_cert_names() -> None:
    dns, ips = server_names("10.0.0.5", ["ca.istio-system.svc", "192.168.1.1"])
    assert dns == ["localhost", "ca.istio-system.svc"]
    assert ips == ["127.0.0.1", "::1", "10.0.0.5", "192.168.1.1"]
    assert server_names("0.0.0.0", []) == (["localhost"], ["127.0.0.1", "::1"])
