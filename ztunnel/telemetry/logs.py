"""Structured logging: one event per line, as text (`key=value`) or JSON.

Log lines carry strings a peer chose (an HBONE authority, an h2 error text, a CSR's fields). Every format
escapes control and line-breaking characters, so a peer can neither split a line nor make the file binary
to grep, and cuts long values, saying how long they were. That work is done in the formatters, per line
written; nothing on the relay path logs.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from typing import Any

_RESERVED = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}

MAX_VALUE_CHARS = 1024  # a message or field longer than this is cut (a SPIFFE id or address is < 300)
MAX_ERROR_CHARS = 16 * 1024  # tracebacks are longer, and worth keeping whole when they are ours
_NAMED_ESCAPES = {"\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}
_QUOTE_IF = re.compile(r'[ "=\\]')  # characters that would break `key=value` parsing if left bare
_JSON_DEPTH = 4


def truncate(s: str, limit: int = MAX_VALUE_CHARS) -> str:
    """`s`, or its first `limit` characters and a note of its full length."""
    if len(s) <= limit:
        return s
    return f"{s[:limit]}...[truncated, {len(s)} chars]"


def _escape_char(c: str) -> str:
    named = _NAMED_ESCAPES.get(c)
    if named is not None:
        return named
    code = ord(c)
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def escape(s: str) -> str:
    """Non-printable characters (C0/C1 controls, DEL, line and paragraph separators) as `\\r`, `\\n`,
    `\\t`, `\\xNN`, `\\uNNNN`; a backslash doubled, so an escape cannot be forged. Printable text,
    non-ASCII letters included, is kept as it is."""
    if s.isprintable() and "\\" not in s:
        return s  # the common case: one C-level scan
    return "".join(c if c.isprintable() and c != "\\" else _escape_char(c) for c in s)


def text_value(value: object, limit: int = MAX_VALUE_CHARS) -> str:
    """A value for `key=value` text: truncated, escaped, and in double quotes when it is empty or holds
    a space, `"`, `=` or a backslash."""
    s = value if isinstance(value, str) else str(value)
    if len(s) > limit:
        s = truncate(s, limit)
    if s and s.isprintable() and _QUOTE_IF.search(s) is None:
        return s  # the common case: two C-level scans
    return '"' + escape(s).replace('"', '\\"') + '"'


def json_value(value: object, depth: int = 0) -> Any:
    """A value for a JSON event: strings truncated (JSON itself escapes control characters), numbers,
    booleans and null as they are, containers walked a few levels deep, anything else as its str()."""
    if isinstance(value, str):
        return truncate(value)
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if depth < _JSON_DEPTH:
        if isinstance(value, (list, tuple)):
            return [json_value(v, depth + 1) for v in value[:100]]
        if isinstance(value, dict):
            return {truncate(str(k)): json_value(v, depth + 1) for k, v in list(value.items())[:100]}
    return truncate(str(value))


def _timestamp(record: logging.LogRecord) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"


def _extras(record: logging.LogRecord) -> list[tuple[str, object]]:
    return [(k, v) for k, v in record.__dict__.items() if k not in _RESERVED and not k.startswith("_")]


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        event: dict[str, Any] = {
            "time": _timestamp(record),
            "level": record.levelname.lower(),
            "scope": record.name,
            "msg": truncate(record.getMessage()),
        }
        for k, v in _extras(record):
            event[k] = json_value(v)
        if record.exc_info:
            event["error"] = truncate(self.formatException(record.exc_info), MAX_ERROR_CHARS)
        return json.dumps(event, default=str)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        msg = escape(truncate(record.getMessage()))
        line = f"{_timestamp(record)} {record.levelname.lower():5} {record.name} {msg}"
        extra = " ".join(f"{k}={text_value(v)}" for k, v in _extras(record))
        if extra:
            line += " " + extra
        if record.exc_info:
            line += " error=" + text_value(self.formatException(record.exc_info), MAX_ERROR_CHARS)
        return line


def formatter_for(fmt: str) -> logging.Formatter:
    return JsonFormatter() if fmt == "json" else TextFormatter()


def configure_logging(level: str = "info", fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter_for(fmt))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
