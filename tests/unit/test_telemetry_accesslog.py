"""AccessLog: one line per connection, text or JSON, silent when off."""

from __future__ import annotations

import io
import json

import pytest

from ztunnel.telemetry.accesslog import AccessLog

SRC = "spiffe://cluster.local/ns/foo/sa/sleep"
DST = "spiffe://cluster.local/ns/bar/sa/httpbin"


def log_one(access: AccessLog, **overrides: object) -> None:
    kwargs: dict[str, object] = {
        "direction": "inbound",
        "src_addr": "127.0.10.1:40000",
        "dst_addr": "127.0.20.1:8000",
        "src_identity": SRC,
        "dst_identity": DST,
        "src_workload": "foo/sleep-1",
        "dst_workload": "bar/httpbin-1",
        "sent_bytes": 1234,
        "received_bytes": 56,
        "duration": 0.0125,
        "now": 1_700_000_000.5,
    }
    kwargs.update(overrides)
    access.log_connection(**kwargs)  # type: ignore[arg-type]


def test_json_line_has_every_field() -> None:
    out = io.StringIO()
    log_one(AccessLog("json", out))
    lines = out.getvalue().splitlines()
    assert len(lines) == 1
    record = json.loads(lines[0])
    assert record["time"] == "2023-11-14T22:13:20.500Z"
    assert record["scope"] == "access"
    assert record["src.addr"] == "127.0.10.1:40000"
    assert record["dst.addr"] == "127.0.20.1:8000"
    assert record["src.identity"] == SRC
    assert record["dst.identity"] == DST
    assert record["src.workload"] == "foo/sleep-1"
    assert record["dst.workload"] == "bar/httpbin-1"
    assert record["bytes_sent"] == 1234
    assert record["bytes_recv"] == 56
    assert record["duration_ms"] == 12.5
    assert record["direction"] == "inbound"
    assert record["response_flags"] == "-"
    assert "policy" not in record and "dst.service" not in record


def test_denied_connection_names_the_policy() -> None:
    out = io.StringIO()
    log_one(AccessLog("json", out), response_flags="DENY", policy="bar/deny-sleep", sent_bytes=0)
    record = json.loads(out.getvalue())
    assert record["policy"] == "bar/deny-sleep"
    assert record["response_flags"] == "DENY"


def test_text_line_is_key_value_and_quotes_when_needed() -> None:
    out = io.StringIO()
    log_one(AccessLog("text", out), direction="outbound", error="connect failed: refused")
    line = out.getvalue()
    assert line.endswith("\n") and line.count("\n") == 1
    assert " access connection complete " in line
    assert f"src.identity={SRC} " in line
    assert "direction=outbound" in line
    assert "bytes_sent=1234 bytes_recv=56" in line
    assert 'error="connect failed: refused"' in line


def test_off_writes_nothing() -> None:
    out = io.StringIO()
    access = AccessLog("off", out)
    log_one(access)
    assert out.getvalue() == ""
    assert not access.enabled


def test_broken_stream_does_not_raise() -> None:
    out = io.StringIO()
    out.close()
    log_one(AccessLog("text", out))


def test_unknown_format_is_rejected() -> None:
    with pytest.raises(ValueError, match="xml"):
        AccessLog("xml")  # type: ignore[arg-type]
