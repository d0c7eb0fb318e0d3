"""Node agent <-> node proxy messages (DESIGN §4.7), sans-IO.

One JSON object per SOCK_SEQPACKET datagram. The proxy connects and sends `hello`; the agent then
sends `add` (with exactly one netns fd attached), `keep`, `del` and `snapshot-sent`, one at a
time, and the proxy answers each with an `ack` (ok true/false) carrying the same `id`.
`encode` gives the bytes and the fds to attach; `decode` checks a datagram and its fds. The socket edge
is `inpod.channel`; what each side does with the messages is `inpod.session`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

from ztunnel.errors import ZtunnelError

PROTOCOL_VERSION = 1
MAX_DATAGRAM = 64 * 1024  # generous for one workload's info; bigger datagrams are a protocol error


class ProtocolError(ZtunnelError):
    """A datagram that is not a valid message (bad JSON, unknown type, wrong number of fds)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Hello:
    version: int = PROTOCOL_VERSION


@dataclass(frozen=True, slots=True, kw_only=True)
class AddWorkload:
    """Enroll a pod: `netns_fd` is the pod's network namespace (owned by the receiver after decode)."""

    id: int
    uid: str
    workload: dict[str, Any] = field(default_factory=dict)
    netns_fd: int = -1


@dataclass(frozen=True, slots=True, kw_only=True)
class KeepWorkload:
    """Before snapshot-sent: keep this pod if you have it (the agent lost its netns but it still runs)."""

    id: int
    uid: str


@dataclass(frozen=True, slots=True, kw_only=True)
class DelWorkload:
    id: int
    uid: str


@dataclass(frozen=True, slots=True, kw_only=True)
class SnapshotSent:
    """Every enrolled pod has been sent; the proxy drops the ones it was not told about."""

    id: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Ack:
    id: int
    ok: bool = True
    error: str = ""


Message = Hello | AddWorkload | KeepWorkload | DelWorkload | SnapshotSent | Ack

_TYPES: dict[type, str] = {
    Hello: "hello",
    AddWorkload: "add",
    KeepWorkload: "keep",
    DelWorkload: "del",
    SnapshotSent: "snapshot-sent",
    Ack: "ack",
}


def encode(msg: Message) -> tuple[bytes, list[int]]:
    """Message -> (datagram, fds to attach with socket.send_fds)."""
    body: dict[str, Any] = {"type": _TYPES[type(msg)]}
    fds: list[int] = []
    if isinstance(msg, Hello):
        body["version"] = msg.version
    elif isinstance(msg, AddWorkload):
        if msg.netns_fd < 0:
            raise ProtocolError("add needs a netns fd")
        body.update(id=msg.id, uid=msg.uid, workload=msg.workload)
        fds.append(msg.netns_fd)
    elif isinstance(msg, KeepWorkload | DelWorkload):
        body.update(id=msg.id, uid=msg.uid)
    elif isinstance(msg, SnapshotSent):
        body["id"] = msg.id
    elif isinstance(msg, Ack):
        body.update(id=msg.id, ok=msg.ok)
        if msg.error:
            body["error"] = msg.error
    data = json.dumps(body, separators=(",", ":")).encode()
    if len(data) > MAX_DATAGRAM:
        raise ProtocolError(f"message of {len(data)} bytes is over the {MAX_DATAGRAM}-byte limit")
    return data, fds


def _str(body: dict[str, Any], key: str) -> str:
    v = body.get(key)
    if not isinstance(v, str) or not v:
        raise ProtocolError(f"{body.get('type')} needs a non-empty string {key!r}")
    return v


def _int(body: dict[str, Any], key: str) -> int:
    v = body.get(key)
    if not isinstance(v, int) or isinstance(v, bool):
        raise ProtocolError(f"{body.get('type')} needs an integer {key!r}")
    return v


def decode(data: bytes, fds: list[int] | None = None) -> Message:
    """Datagram (+ received fds) -> Message. On error every received fd is closed before raising."""
    fds = list(fds or [])
    try:
        try:
            body = json.loads(data)
        except (ValueError, UnicodeDecodeError) as e:
            raise ProtocolError(f"not JSON: {e}") from e
        if not isinstance(body, dict):
            raise ProtocolError("a message is a JSON object")
        kind = body.get("type")
        if kind == "add":
            if len(fds) != 1:
                raise ProtocolError(f"add carries exactly one netns fd, got {len(fds)}")
            workload = body.get("workload", {})
            if not isinstance(workload, dict):
                raise ProtocolError("add: 'workload' must be an object")
            return AddWorkload(id=_int(body, "id"), uid=_str(body, "uid"), workload=workload, netns_fd=fds[0])
        if fds:
            raise ProtocolError(f"{kind} carries no fds, got {len(fds)}")
        if kind == "hello":
            return Hello(version=_int(body, "version"))
        if kind == "keep":
            return KeepWorkload(id=_int(body, "id"), uid=_str(body, "uid"))
        if kind == "del":
            return DelWorkload(id=_int(body, "id"), uid=_str(body, "uid"))
        if kind == "snapshot-sent":
            return SnapshotSent(id=_int(body, "id"))
        if kind == "ack":
            ok = body.get("ok")
            if not isinstance(ok, bool):
                raise ProtocolError("ack needs a boolean 'ok'")
            return Ack(id=_int(body, "id"), ok=ok, error=str(body.get("error", "")))
        raise ProtocolError(f"unknown message type {kind!r}")
    except ProtocolError:
        for fd in fds:
            _close(fd)
        raise


def _close(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass
