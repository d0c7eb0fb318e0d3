"""Access log: one line per proxied connection, written when it closes (the waypoint: one per request).

The shape follows istio/ztunnel's `connection complete` event (src.*, dst.*, direction, bytes,
duration) so the same log queries work. Lines go straight to a stream rather than through `logging`:
the access log is data an operator opts into, and must not change with the log level. Addresses, errors
and trace ids can come from a peer: values are escaped and truncated as in every log format (logs.py).
"""

from __future__ import annotations

import json
import sys
import time
from typing import Literal, TextIO

from ztunnel.telemetry.logs import MAX_VALUE_CHARS, text_value, truncate

AccessLogFormat = Literal["text", "json", "off"]
Direction = Literal["inbound", "outbound"]
FORMATS: tuple[str, ...] = ("text", "json", "off")
MAX_PATH_CHARS = 256  # a request path in the access log (the full one can be 8 KiB of client bytes)


def _timestamp(now: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now * 1000) % 1000:03d}Z"


class AccessLog:
    """Writes connection records to `stream` as text (`key=value`) or JSON, or nothing with `off`."""

    def __init__(self, format: AccessLogFormat = "text", stream: TextIO | None = None) -> None:
        if format not in FORMATS:
            raise ValueError(f"access log format {format!r} is not one of {', '.join(FORMATS)}")
        self.format: AccessLogFormat = format
        self.stream = stream if stream is not None else sys.stderr

    @property
    def enabled(self) -> bool:
        return self.format != "off"

    def log_connection(
        self,
        *,
        direction: Direction,
        src_addr: str,
        dst_addr: str,
        src_identity: str | None = None,
        dst_identity: str | None = None,
        src_workload: str | None = None,
        dst_workload: str | None = None,
        dst_service: str | None = None,
        sent_bytes: int = 0,
        received_bytes: int = 0,
        duration: float = 0.0,
        response_flags: str = "-",
        policy: str | None = None,
        error: str | None = None,
        now: float | None = None,
        traceparent: str | None = None,
    ) -> None:
        """Log one closed connection.

        `sent_bytes` went to the client (response direction) and `received_bytes` came from it, as in
        the Istio metrics; `duration` is in seconds; `policy` names the policy that denied it, if any.
        Addresses are `ip:port` strings. Never raises on a broken stream: logging must not kill a relay.
        """
        if self.format == "off":
            return
        record: dict[str, object] = {
            "src.addr": src_addr,
            "src.workload": src_workload,
            "src.identity": src_identity,
            "dst.addr": dst_addr,
            "dst.service": dst_service,
            "dst.workload": dst_workload,
            "dst.identity": dst_identity,
            "direction": direction,
            "bytes_sent": sent_bytes,
            "bytes_recv": received_bytes,
            "duration_ms": round(duration * 1000, 3),
            "response_flags": response_flags or "-",
        }
        if policy:
            record["policy"] = policy
        if error:
            record["error"] = error
        if traceparent:
            record["traceparent"] = traceparent
        self._write(record, "connection complete", now)

    def log_request(
        self,
        *,
        method: str,
        path: str,
        status: int,
        duration: float,
        request_bytes: int,
        response_bytes: int,
        src_addr: str,
        src_identity: str | None = None,
        src_workload: str | None = None,
        dst_workload: str | None = None,
        dst_service: str | None = None,
        upstream: str | None = None,
        policy: str | None = None,
        reason: str | None = None,
        now: float | None = None,
    ) -> None:
        """Log one HTTP request the waypoint decided (`request complete`): what was asked, the answer, and what
        decided it (`policy`, the deciding AuthorizationPolicy, and/or `reason`: jwt, rbac, upstream error).
        `path` comes from the client: clipped to `MAX_PATH_CHARS` and escaped like every value."""
        if self.format == "off":
            return
        record: dict[str, object] = {
            "method": method,
            "path": truncate(path, MAX_PATH_CHARS) if len(path) > MAX_PATH_CHARS else path,
            "response_code": status,
            "src.addr": src_addr,
            "src.workload": src_workload,
            "src.identity": src_identity,
            "dst.service": dst_service,
            "dst.workload": dst_workload,
            "upstream": upstream,
            "bytes_recv": request_bytes,
            "bytes_sent": response_bytes,
            "duration_ms": round(duration * 1000, 3),
            "policy": policy,
            "reason": reason,
        }
        self._write(record, "request complete", now)

    def _write(self, record: dict[str, object], msg: str, now: float | None) -> None:
        ts = _timestamp(time.time() if now is None else now)
        if self.format == "json":
            line = json.dumps(
                {"time": ts, "level": "info", "scope": "access", "msg": msg}
                | {
                    k: truncate(v) if isinstance(v, str) and len(v) > MAX_VALUE_CHARS else v  # JSON escapes the rest
                    for k, v in record.items()
                    if v is not None
                }
            )
        else:
            fields = " ".join(f"{k}={text_value(v)}" for k, v in record.items() if v is not None)
            line = f"{ts} info  access {msg} {fields}"
        try:
            self.stream.write(line + "\n")
            self.stream.flush()
        except (OSError, ValueError):
            pass  # a closed or full stream loses log lines, never connections
