"""In-memory transports that drive two protocol objects against each other on one event loop (no sockets).

`connect_pair` joins an HBONE client and server; `Handler` is the server's request callback that tests read.
"""

from __future__ import annotations

import asyncio
from typing import Any, Protocol

from ztunnel.hbone.connection import HboneConnection
from ztunnel.hbone.protocol import ConnectRequest, Rejection
from ztunnel.hbone.stream import HboneStream


class Receiver(Protocol):
    """What the transport drives: an asyncio.Protocol, or HboneConnection (a BufferedProtocol that also takes
    whole chunks through data_received)."""

    def data_received(self, data: bytes) -> None: ...
    def connection_lost(self, exc: Exception | None) -> None: ...
    def pause_writing(self) -> None: ...
    def resume_writing(self) -> None: ...


class MemoryTransport(asyncio.Transport):
    """Delivers writes to the peer protocol on the next loop iteration; pauses the writer past `high`."""

    def __init__(self, high: int = 1 << 20) -> None:
        super().__init__()
        self.peer: MemoryTransport | None = None
        self.protocol: Receiver | None = None
        self.closing = False
        self.high = high
        self.in_flight = 0
        self.paused = False
        self.written = bytearray()

    def write(self, data: Any) -> None:
        if self.closing:
            return
        data = bytes(data)
        self.written += data
        self.in_flight += len(data)
        if self.in_flight > self.high and not self.paused:
            self.paused = True
            assert self.protocol is not None
            self.protocol.pause_writing()
        asyncio.get_running_loop().call_soon(self._deliver, data)

    def _deliver(self, data: bytes) -> None:
        self.in_flight -= len(data)
        if self.paused and self.in_flight <= self.high // 2:
            self.paused = False
            assert self.protocol is not None
            self.protocol.resume_writing()
        if self.peer is not None and not self.peer.closing and self.peer.protocol is not None:
            self.peer.protocol.data_received(data)

    def is_closing(self) -> bool:
        return self.closing

    def get_write_buffer_size(self) -> int:
        return self.in_flight

    def close(self) -> None:
        if self.closing:
            return
        self.closing = True
        loop = asyncio.get_running_loop()
        loop.call_soon(self._lost)
        if self.peer is not None:
            loop.call_soon(self.peer._lost_from_peer)

    abort = close

    def _lost(self) -> None:
        assert self.protocol is not None
        self.protocol.connection_lost(None)

    def _lost_from_peer(self) -> None:
        if not self.closing:
            self.closing = True
            self._lost()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.9", 5555), "sockname": ("127.0.0.8", 15008)}.get(name, default)

    def can_write_eof(self) -> bool:
        return False


def connect_pair(
    on_request: Any, *, client_keepalive: tuple[float, float] | None = None
) -> tuple[HboneConnection, HboneConnection, MemoryTransport, MemoryTransport]:
    """`client_keepalive` is the client's (interval, timeout); keepalive is off otherwise."""
    interval, timeout = client_keepalive or (0, 1)
    client = HboneConnection(client_side=True, keepalive_interval=interval, keepalive_timeout=timeout)
    server = HboneConnection(client_side=False, on_request=on_request, keepalive_interval=0)
    ct, st = MemoryTransport(), MemoryTransport()
    ct.peer, st.peer = st, ct
    ct.protocol, st.protocol = client, server
    server.connection_made(st)
    client.connection_made(ct)
    return client, server, ct, st


class Handler:
    """Server side: records requests; answers 200 to CONNECTs and the Rejection's status otherwise."""

    def __init__(self) -> None:
        self.streams: asyncio.Queue[HboneStream] = asyncio.Queue()
        self.verdicts: list[ConnectRequest | Rejection] = []

    def __call__(self, stream: HboneStream, verdict: ConnectRequest | Rejection) -> None:
        self.verdicts.append(verdict)
        if isinstance(verdict, Rejection):
            stream.respond(verdict.status)
            return
        stream.respond(200)
        self.streams.put_nowait(stream)
