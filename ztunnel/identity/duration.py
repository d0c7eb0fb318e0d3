"""Durations as operators write them (`24h`, `30m`, `6s`, `1h30m`, `7d`), as Go and kubectl spell them."""

from __future__ import annotations

import datetime as dt
import re

from ztunnel.errors import ZtunnelError

_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


class DurationError(ZtunnelError):
    pass


def parse_duration(text: str) -> dt.timedelta:
    """Parse `24h`, `1h30m`, `6s`, `500ms`, `7d`; a bare number means seconds."""
    s = text.strip()
    if not s:
        raise DurationError("empty duration; write it like 24h, 30m or 6s")
    if re.fullmatch(r"\d+(?:\.\d+)?", s):
        seconds = float(s)
    else:
        pos = 0
        seconds = 0.0
        for m in _PART.finditer(s):
            if m.start() != pos:
                break
            seconds += float(m.group(1)) * _UNIT_SECONDS[m.group(2)]
            pos = m.end()
        if pos != len(s) or pos == 0:
            raise DurationError(f"{text!r} is not a duration; write it like 24h, 1h30m, 30m or 6s")
    if seconds <= 0:
        raise DurationError(f"{text!r}: a duration must be positive")
    return dt.timedelta(seconds=seconds)


def format_duration(value: dt.timedelta) -> str:
    """The short form back, for messages: 86400s -> 24h."""
    total = int(value.total_seconds())
    if total and total % 3600 == 0:
        return f"{total // 3600}h"
    if total and total % 60 == 0:
        return f"{total // 60}m"
    return f"{value.total_seconds():g}s"
