"""The byte-stream interface every relay path speaks, and its TCP implementation.

A TCP connection and an HBONE stream look the same to the relay: `read(n)` returns up to n bytes (b"" at
EOF), `write(data)` returns once the data is accepted within the flow-control / buffer limits,
`write_eof()` half-closes, `close()` ends gracefully and `abort()` resets. Reads hand out the chunks the
transport delivered (no copying into a shared buffer), so per-byte work stays in C.

Both also speak a callback ("push") interface that the relay uses for its steady state: a source hands each
chunk to a `PushTarget` from inside the transport callback that received it, and the target writes it to the
other stream at once. No future, no task step and no coroutine resumption per chunk; backpressure is a
`pause_pushing()` of the source until the sink calls `drained()`.
"""

from __future__ import annotations

import asyncio
import collections
import socket
import struct
from typing import Protocol, cast

# How much a TCP connection may buffer from its peer before we stop reading from the socket. The kernel's
# own buffers then push back on the sender, so a slow consumer never makes the proxy hold more than this.
TCP_READ_BUFFER_LIMIT = 512 * 1024
READ_CHUNK = 256 * 1024


class ByteStream(Protocol):
    async def read(self, n: int = READ_CHUNK) -> bytes: ...

    async def write(self, data: bytes | memoryview) -> None: ...

    async def write_eof(self) -> None: ...

    def close(self) -> None: ...

    def abort(self) -> None: ...


class StreamClosed(ConnectionError):
    """Writing to a stream whose peer is gone."""


class PushTarget(Protocol):
    """What a pushing source calls (one direction of a relay); `drained` is called by a sink that was full."""

    def data(self, chunk: bytes) -> None: ...

    def eof(self) -> None: ...

    def error(self, exc: BaseException) -> None: ...

    def drained(self) -> None: ...


class PushStream(ByteStream, Protocol):
    """A ByteStream that can also be relayed with callbacks.

    As a source: `start_pushing(target)` first delivers what is buffered, then every chunk as it arrives,
    then `eof()` or `error()`; `pause_pushing()`/`resume_pushing()` stop and restart delivery (the peer is
    pushed back by the kernel or by HTTP/2 flow control). As a sink: `push(chunk)` writes now and returns
    False when the sink is full, in which case it calls `target.drained()` once it has room again;
    `push_eof()` half-closes, returning False if queued data must go first (then `drained()` follows).
    `stop_pushing()` detaches both roles.
    """

    def start_pushing(self, target: PushTarget) -> None: ...

    def pause_pushing(self) -> None: ...

    def resume_pushing(self) -> None: ...

    def push(self, chunk: bytes) -> bool: ...

    def push_eof(self) -> bool: ...

    def notify_drained(self, target: PushTarget) -> None: ...

    def stop_pushing(self) -> None: ...


class TcpStreamProtocol(asyncio.Protocol):
    """asyncio protocol feeding a `TcpStream`: chunk queue with a read limit, drain for writers."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._chunks: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._eof = False
        self._error: BaseException | None = None
        self._read_waiter: asyncio.Future[None] | None = None
        self._drain_waiter: asyncio.Future[None] | None = None
        self._paused_reading = False
        self._paused_writing = False
        self._push_to: PushTarget | None = None  # the relay direction this connection's bytes go to
        self._drain_to: PushTarget | None = None  # the relay direction waiting for this one to drain
        self._pushing_paused = False
        # Kept: asyncio.get_running_loop() costs a getpid() system call on every call (3.11).
        self.loop = asyncio.get_running_loop()
        self.closed: asyncio.Future[None] = self.loop.create_future()

    # ---- asyncio callbacks ---------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass asyncio's
        if type(transport).__module__.startswith("uvloop"):
            return  # uvloop sets TCP_NODELAY on every TCP transport; asking for the socket costs a getsockname()
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass

    def data_received(self, data: bytes) -> None:
        if self._push_to is not None and not self._chunks and not self._pushing_paused:
            self._push_to.data(data)
            return
        self._chunks.append(data)
        self._buffered += len(data)
        if self._buffered > TCP_READ_BUFFER_LIMIT and not self._paused_reading and self.transport is not None:
            self._paused_reading = True
            self.transport.pause_reading()
        self._wake_reader()

    def eof_received(self) -> bool:
        self._eof = True
        self._wake_reader()
        if self._push_to is not None and not self._chunks:
            self._push_to.eof()
        return True  # keep the transport open: half-close, we may still write

    def connection_lost(self, exc: Exception | None) -> None:
        self._eof = True
        if exc is not None:
            self._error = exc
        self._wake_reader()
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_exception(StreamClosed("connection lost"))
        if not self.closed.done():
            self.closed.set_result(None)
        target = self._push_to or self._drain_to
        if target is not None:
            if self._error is not None:  # a reset, or our own abort (which reports no error here)
                target.error(StreamClosed(f"connection lost: {self._error}"))
            elif self._drain_to is not None:
                target.error(StreamClosed("connection lost"))
            elif not self._chunks:
                target.eof()

    def pause_writing(self) -> None:
        self._paused_writing = True

    def resume_writing(self) -> None:
        self._paused_writing = False
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_result(None)
        target = self._drain_to
        if target is not None:
            self._drain_to = None
            target.drained()

    def _wake_reader(self) -> None:
        if self._read_waiter is not None and not self._read_waiter.done():
            self._read_waiter.set_result(None)


class TcpStream:
    """A ByteStream over a TCP (or unix) transport."""

    def __init__(self, transport: asyncio.Transport, protocol: TcpStreamProtocol) -> None:
        self.transport = transport
        self.protocol = protocol

    @classmethod
    async def connect(
        cls, host: str, port: int, *, local_addr: tuple[str, int] | None = None, sock: socket.socket | None = None
    ) -> TcpStream:
        loop = asyncio.get_running_loop()
        if sock is not None:
            transport, protocol = await loop.create_connection(TcpStreamProtocol, sock=sock)
        else:
            transport, protocol = await loop.create_connection(TcpStreamProtocol, host, port, local_addr=local_addr)
        return cls(transport, protocol)

    @property
    def peername(self) -> tuple[str, int]:
        peer = self.transport.get_extra_info("peername")
        return (peer[0], peer[1]) if peer else ("", 0)

    @property
    def sockname(self) -> tuple[str, int]:
        name = self.transport.get_extra_info("sockname")
        return (name[0], name[1]) if name else ("", 0)

    def unread(self, data: bytes) -> None:
        """Put back bytes a handshake parser read past its end (they belong to the payload)."""
        if data:
            self.protocol._chunks.appendleft(data)
            self.protocol._buffered += len(data)

    async def read(self, n: int = READ_CHUNK) -> bytes:
        p = self.protocol
        while not p._chunks:
            if p._eof:
                if p._error is not None:  # a reset is not an EOF: the relay must pass it on as a reset
                    raise StreamClosed(f"connection lost: {p._error}")
                return b""
            p._read_waiter = p.loop.create_future()
            try:
                await p._read_waiter
            finally:
                p._read_waiter = None
        chunk = p._chunks.popleft()
        if len(chunk) > n:
            p._chunks.appendleft(chunk[n:])
            chunk = chunk[:n]
        p._buffered -= len(chunk)
        if p._paused_reading and p._buffered <= TCP_READ_BUFFER_LIMIT // 2:
            p._paused_reading = False
            self.transport.resume_reading()
        return chunk

    async def write(self, data: bytes | memoryview) -> None:
        if self.transport.is_closing():
            raise StreamClosed("the TCP connection is closed")
        self.transport.write(data)
        p = self.protocol
        if p._paused_writing:
            p._drain_waiter = p.loop.create_future()
            try:
                await p._drain_waiter
            finally:
                p._drain_waiter = None

    async def write_eof(self) -> None:
        if not self.transport.is_closing() and self.transport.can_write_eof():
            self.transport.write_eof()

    def close(self) -> None:
        self.transport.close()

    def abort(self) -> None:
        """Close with a TCP RST (SO_LINGER 0), so the peer sees a reset rather than a clean EOF."""
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except OSError:
                pass
        p = self.protocol
        if p._error is None:
            # The transport reports the loss without an error: a relay that starts on this stream only
            # afterwards must see a reset, not a clean EOF to pass on.
            p._error = ConnectionAbortedError("aborted")
        self.transport.abort()
        target = p._push_to or p._drain_to
        if target is not None:
            target.error(StreamClosed("TCP connection aborted"))

    async def wait_closed(self) -> None:
        await self.protocol.closed

    # ---- push interface (see PushStream) -------------------------------------------------------
    def start_pushing(self, target: PushTarget) -> None:
        p = self.protocol
        p._push_to = target
        self._deliver_buffered()

    def _deliver_buffered(self) -> None:
        p = self.protocol
        while p._chunks and not p._pushing_paused and p._push_to is not None:
            chunk = p._chunks.popleft()
            p._buffered -= len(chunk)
            p._push_to.data(chunk)
        if p._paused_reading and p._buffered <= TCP_READ_BUFFER_LIMIT // 2 and not p._eof and not p._pushing_paused:
            p._paused_reading = False
            self.transport.resume_reading()
        if p._chunks or p._push_to is None:
            return
        if p._eof:
            if p._error is not None:
                p._push_to.error(StreamClosed(f"connection lost: {p._error}"))
            else:
                p._push_to.eof()

    def pause_pushing(self) -> None:
        # The socket stops at once: the sink (an HBONE peer granting no window) holds the chunk it could
        # not send, and nothing more is read for it. Read ahead up to TCP_READ_BUFFER_LIMIT, every stalled
        # tunnel pinned ~0.6 MiB; the two epoll_ctl calls per pause cost nothing measurable in bulk transfers.
        p = self.protocol
        p._pushing_paused = True
        if not p._paused_reading and p.transport is not None and not p.transport.is_closing():
            p._paused_reading = True
            p.transport.pause_reading()

    def resume_pushing(self) -> None:
        p = self.protocol
        if p._pushing_paused:
            p._pushing_paused = False
            if p._chunks:
                self._deliver_buffered()
            elif p._paused_reading and not p._eof:
                p._paused_reading = False
                self.transport.resume_reading()

    def push(self, chunk: bytes) -> bool:
        transport = self.transport
        if transport.is_closing():
            raise StreamClosed("the TCP connection is closed")
        transport.write(chunk)
        return not self.protocol._paused_writing

    def push_eof(self) -> bool:
        if not self.transport.is_closing() and self.transport.can_write_eof():
            self.transport.write_eof()
        return True

    def notify_drained(self, target: PushTarget) -> None:
        self.protocol._drain_to = target

    def stop_pushing(self) -> None:
        self.protocol._push_to = None
        self.protocol._drain_to = None
