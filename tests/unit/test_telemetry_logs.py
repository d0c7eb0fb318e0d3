"""Log lines stay one line per event, whatever a peer put in the strings they carry (issue 10, item 7)."""

from __future__ import annotations

import io
import json
import logging

import pytest

from ztunnel.telemetry.accesslog import AccessLog
from ztunnel.telemetry.logs import MAX_VALUE_CHARS, JsonFormatter, TextFormatter, escape, text_value

HOSTILE = "a\r\nFAKE LINE\x00"
BIG = "x" * 60_000


def _record(msg: str, args: tuple[object, ...] = (), **extra: object) -> logging.LogRecord:
    record = logging.LogRecord("ztunnel.test", logging.WARNING, __file__, 1, msg, args, None)
    record.__dict__.update(extra)
    return record


@pytest.mark.parametrize("formatter", [TextFormatter(), JsonFormatter()], ids=["text", "json"])
def test_control_characters_in_message_and_extra_stay_on_one_line(formatter: logging.Formatter) -> None:
    line = formatter.format(_record("h2 error: %s", (HOSTILE,), peer=HOSTILE, reason=HOSTILE.encode()))
    assert line.splitlines() == [line]
    assert "\r" not in line and "\x00" not in line and "\n" not in line
    if isinstance(formatter, JsonFormatter):
        event = json.loads(line)
        assert event["msg"] == "h2 error: " + HOSTILE  # JSON escapes; a JSON reader gets the value back
        assert event["peer"] == HOSTILE
    else:
        assert "h2 error: a\\r\\nFAKE LINE\\x00 " in line
        assert 'peer="a\\r\\nFAKE LINE\\x00"' in line
    assert "FAKE LINE" in line


@pytest.mark.parametrize("formatter", [TextFormatter(), JsonFormatter()], ids=["text", "json"])
def test_a_60kb_value_is_truncated_with_its_length_noted(formatter: logging.Formatter) -> None:
    line = formatter.format(_record("bad authority %s", (BIG,), authority=BIG))
    assert len(line) < 4 * MAX_VALUE_CHARS
    assert "60014 chars" in line and "60000 chars" in line  # message and extra both say how long they were
    if isinstance(formatter, JsonFormatter):
        event = json.loads(line)
        assert event["authority"].startswith("x" * MAX_VALUE_CHARS)
        assert "60000 chars" in event["authority"]


def test_other_control_and_line_breaking_characters_are_escaped() -> None:
    # ESC (terminal escapes), DEL, NEL and U+2028 (line breaks to str.splitlines and some log viewers)
    assert escape("\x1b[31mred\x7f\x85\u2028") == "\\x1b[31mred\\x7f\\x85\\u2028"
    assert escape("plain ünïcode, spaces") == "plain ünïcode, spaces"
    assert escape("C:\\dir") == "C:\\\\dir"  # an escaped newline cannot be forged with a literal backslash
    assert text_value("a b") == '"a b"' and text_value('x="1"') == '"x=\\"1\\""' and text_value("ok") == "ok"


def test_access_log_lines_escape_and_truncate_peer_strings() -> None:
    for fmt in ("text", "json"):
        out = io.StringIO()
        AccessLog(fmt, out).log_connection(  # type: ignore[arg-type]
            direction="inbound",
            src_addr="127.0.0.1:1",
            dst_addr=BIG,
            error=HOSTILE,
            traceparent="00-\x00\r\n",
            now=0.0,
        )
        text = out.getvalue()
        assert text.endswith("\n") and text.count("\n") == 1, fmt
        assert "\r" not in text and "\x00" not in text
        assert len(text) < 4 * MAX_VALUE_CHARS and "60000 chars" in text
        if fmt == "json":
            assert json.loads(text)["error"] == HOSTILE
        else:
            assert 'error="a\\r\\nFAKE LINE\\x00"' in text
