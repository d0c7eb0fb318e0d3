"""What each side of the agent <-> proxy protocol does with a message, sans-IO (DESIGN §4.7).

The sessions hold the protocol's state (who was mentioned since the hello, which request an ack answers)
and say what to do; the callers do the I/O (listeners in a pod netns, iptables, the socket). So the
snapshot rules — a restarted proxy is told every pod again, and drops the pods it was not told about —
are tested without sockets or root.
"""

from __future__ import annotations

import itertools
from collections.abc import Container, Iterable
from dataclasses import dataclass
from typing import Any

from ztunnel.inpod.protocol import (
    PROTOCOL_VERSION,
    Ack,
    AddWorkload,
    DelWorkload,
    Hello,
    KeepWorkload,
    Message,
    SnapshotSent,
)


class ProxySession:
    """The proxy's side of one agent connection."""

    def __init__(self) -> None:
        self.seen: set[str] = set()  # uids added or kept since the hello
        self.synced = False

    @staticmethod
    def hello() -> Hello:
        return Hello(version=PROTOCOL_VERSION)

    def added(self, msg: AddWorkload) -> None:
        self.seen.add(msg.uid)

    def keep(self, msg: KeepWorkload, held: Container[str]) -> Ack:
        """Keep a pod the proxy still serves; nack one it does not have (the agent then re-adds it)."""
        self.seen.add(msg.uid)
        return Ack(id=msg.id) if msg.uid in held else Ack(id=msg.id, ok=False, error="unknown")

    def deleted(self, msg: DelWorkload) -> None:
        self.seen.discard(msg.uid)

    def snapshot_sent(self, held: Iterable[str]) -> list[str]:
        """The uids to drop: held by the proxy but not mentioned by the agent since the hello."""
        self.synced = True
        return [uid for uid in held if uid not in self.seen]


@dataclass(frozen=True, slots=True)
class AckCheck:
    """How a reply answers a request: `ok`; or `refused` (the proxy said no, with `error`); or neither,
    a protocol failure (`error` says what arrived instead), after which the link is dropped."""

    ok: bool
    refused: bool = False
    error: str = ""


class AgentSession:
    """The agent's side: checks the proxy's hello, numbers requests and matches each ack to its request."""

    def __init__(self) -> None:
        self._ids = itertools.count(1)

    @staticmethod
    def check_hello(msg: Message | None) -> str:
        """"" when `msg` is a hello this agent speaks; otherwise why the connection is refused."""
        if isinstance(msg, Hello) and msg.version == PROTOCOL_VERSION:
            return ""
        return f"expected hello v{PROTOCOL_VERSION}, got {msg!r}"

    def add(self, uid: str, workload: dict[str, Any], netns_fd: int) -> AddWorkload:
        return AddWorkload(id=next(self._ids), uid=uid, workload=workload, netns_fd=netns_fd)

    def delete(self, uid: str) -> DelWorkload:
        return DelWorkload(id=next(self._ids), uid=uid)

    def snapshot_sent(self) -> SnapshotSent:
        return SnapshotSent(id=next(self._ids))

    @staticmethod
    def check_ack(request: AddWorkload | DelWorkload | KeepWorkload | SnapshotSent, reply: Message | None) -> AckCheck:
        if reply is None:
            return AckCheck(ok=False, error="the node proxy disconnected")
        if not isinstance(reply, Ack) or reply.id != request.id:
            return AckCheck(ok=False, error=f"unexpected reply from the node proxy: {reply!r}")
        if not reply.ok:
            return AckCheck(ok=False, refused=True, error=reply.error)
        return AckCheck(ok=True)
