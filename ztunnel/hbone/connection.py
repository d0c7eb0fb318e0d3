"""One HBONE connection: HTTP/2 (h2's sans-IO core) over an mTLS transport, and its CONNECT streams.

The same class serves both sides. The client opens streams with `open_stream`; the server hands each
incoming request to `on_request` as an `HboneStream` that the caller answers with `respond(status)`.
Flow control gives backpressure end to end: a stream acknowledges received bytes only when its reader
consumes them, and `write` waits for window and for the TLS transport to drain.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import os
import time
from collections.abc import Callable, Sequence
from typing import cast

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
import hpack
from h2.errors import ErrorCodes
from h2.frame_buffer import FrameBuffer
from hyperframe.frame import (
    FRAMES,
    ContinuationFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    PushPromiseFrame,
    RstStreamFrame,
)

from ztunnel.hbone import dataframes
from ztunnel.hbone.protocol import (
    CONNECTION_WINDOW,
    EARLY_FLUSH,
    KEEPALIVE_INTERVAL,
    KEEPALIVE_TIMEOUT,
    MAX_FRAME_SIZE,
    MAX_HEADER_LIST,
    PREMATURE_RESET_BUDGET,
    SERVER_MAX_CONCURRENT_STREAMS,
    STATUS_BAD_REQUEST,
    STATUS_OK,
    STREAM_OPEN_BUDGET,
    STREAM_WINDOW,
    WRITE_BUFFER_CAP,
    Authority,
    ConnectRequest,
    HboneError,
    Rejection,
    connect_headers,
    response_status,
    validate_connect,
)
from ztunnel.hbone.streams import READ_CHUNK, PushTarget, StreamClosed
from ztunnel.identity.spiffe import SpiffeId

log = logging.getLogger("ztunnel.hbone")

RequestHandler = Callable[["HboneStream", ConnectRequest | Rejection], None]

# The DATA-frame fast paths (hbone/dataframes.py) need h2 internals; without them h2 does every frame.
FAST_DATA_FRAMES = dataframes.supported()


def _quiet_repr(frame: Frame) -> str:
    return f"<{type(frame).__mro__[1].__name__} stream_id={frame.stream_id}>"


# h2 builds `repr(frame)` for a trace log line on every received frame, even with logging off; for a
# 1 MiB DATA frame that is a hexlify of the whole payload (a third of the proxy's CPU in bulk transfers).
# Received frames are given these subclasses, whose repr costs nothing.
_QUIET: dict[type[Frame], type[Frame]] = {
    cls: type(f"_Quiet{cls.__name__}", (cls,), {"__repr__": _quiet_repr}) for cls in FRAMES.values()
}


_HEADERS, _CONTINUATION = 0x1, 0x9  # frame types whose payload is a header block fragment


class PeerTooCostly(h2.exceptions.ProtocolError):
    """The peer went past a limit of the work or memory it may cost us: GOAWAY(ENHANCE_YOUR_CALM)."""

    error_code = ErrorCodes.ENHANCE_YOUR_CALM


class StreamBudget:
    """A server connection's new streams and premature resets in the current second (rapid reset).

    A reset is premature when the peer resets a stream before we answered it: all the set-up work of the
    stream (handler, policy, upstream dial) is for nothing. Resets of answered tunnels are ordinary aborts
    and are not counted. Charged as h2 parses each frame, so a flood stops at the budget, not at the end of
    the read that carried it.
    """

    __slots__ = ("_conn", "_window_start", "open_limit", "opens", "reset_limit", "resets")

    def __init__(self, conn: HboneConnection, open_limit: int, reset_limit: int) -> None:
        self._conn = conn
        self.open_limit = open_limit
        self.reset_limit = reset_limit
        self._window_start = time.monotonic()
        self.opens = 0
        self.resets = 0

    def _roll(self) -> None:
        now = time.monotonic()
        if now - self._window_start >= 1.0:
            self._window_start = now
            self.opens = self.resets = 0

    def opened(self) -> None:
        self._roll()
        self.opens += 1
        if self.opens > self.open_limit:
            raise PeerTooCostly(f"more than {self.open_limit} new streams in a second")

    def reset(self, stream_id: int) -> None:
        conn = self._conn
        stream = conn.streams.get(stream_id)
        if stream is not None and stream.status is not None:
            return  # answered: an ordinary abort
        if stream is None and stream_id <= conn._requests_high:
            return  # a stream that already ended (its reset crossed our answer)
        self._roll()
        self.resets += 1
        if self.resets > self.reset_limit:
            raise PeerTooCostly(f"more than {self.reset_limit} streams reset before their answer in a second")


class PeerBudget:
    """App bytes one peer identity holds in this proxy across its server connections, both ways: `parked`,
    app data read for a stream that the peer granted no window for (or whose connection it does not read),
    and `unread`, DATA the peer sent that a local app has not taken yet (its window not given back). A
    stream that would take `parked + unread` past `limit` is reset with ENHANCE_YOUR_CALM, so what a
    hostile identity pins stays bounded however many connections and streams it opens; `resets` counts
    them. One add per DATA frame and one subtract per acknowledgement: nothing per byte."""

    __slots__ = ("connections", "limit", "on_reset", "parked", "resets", "unread")

    def __init__(self, limit: int, on_reset: Callable[[], None] | None = None) -> None:
        self.limit = limit
        self.on_reset = on_reset  # told of each reset (the proxy counts them in its metrics)
        self.parked = 0
        self.unread = 0
        self.resets = 0
        self.connections = 0  # kept by the owner (the server drops the budget with the last connection)


class _QuietFrameBuffer(FrameBuffer):
    """h2's frame buffer with cheap frame reprs, a header-block cap enforced as the frames arrive (h2 would
    hold up to 64 CONTINUATION frames of 1 MiB each before decoding), and the stream budget."""

    def __init__(self, server: bool) -> None:
        super().__init__(server=server)
        self.block = 0  # bytes of the header block being received (valid while _headers_buffer is not empty)
        self.budget: StreamBudget | None = None

    def __next__(self) -> Frame:
        frame = super().__next__()
        cls = type(frame)
        quiet = _QUIET.get(cls)
        if quiet is not None:
            frame.__class__ = quiet
        budget = self.budget
        if budget is not None:
            if cls is HeadersFrame:
                budget.opened()
            elif cls is RstStreamFrame:
                budget.reset(frame.stream_id)
        return frame

    def _update_header_buffer(self, f: Frame | None) -> Frame | None:
        if isinstance(f, (HeadersFrame, ContinuationFrame, PushPromiseFrame)):
            block = len(f.data) + (self.block if self._headers_buffer else 0)
            if block > MAX_HEADER_LIST:
                raise PeerTooCostly(f"a header block of more than {MAX_HEADER_LIST} bytes")
            self.block = block
        return super()._update_header_buffer(f)

    def pending_violation(self) -> tuple[ErrorCodes, str] | None:
        """A limit the partly received frame at the front of the buffer already breaks, by its header alone:
        refused now, before its payload is buffered."""
        pending = self._data
        if len(pending) < 9:
            return None
        length = int.from_bytes(pending[:3], "big")
        if length > MAX_FRAME_SIZE:
            return ErrorCodes.FRAME_SIZE_ERROR, "oversized HTTP/2 frame"
        block = length + (self.block if self._headers_buffer else 0)
        if pending[3] in (_HEADERS, _CONTINUATION) and block > MAX_HEADER_LIST:
            return ErrorCodes.ENHANCE_YOUR_CALM, f"a header block of more than {MAX_HEADER_LIST} bytes"
        return None


class _H2(h2.connection.H2Connection):
    """h2 with a graceful GOAWAY and cheap DATA frames.

    A NO_ERROR GOAWAY stops new streams but lets open ones finish: plain h2 moves the whole connection to
    CLOSED on any GOAWAY, which would cut streams that the peer explicitly promised to finish (drain,
    DESIGN §4.2).
    """

    def __init__(self, config: h2.config.H2Configuration) -> None:
        super().__init__(config=config)
        # HBONE header values are short and mostly indexed; Huffman coding them costs more CPU (on both
        # sides) than the few bytes it saves.
        self.encoder.encode = functools.partial(hpack.Encoder.encode, self.encoder, huffman=False)  # type: ignore[method-assign]
        self.incoming_buffer = _QuietFrameBuffer(server=not config.client_side)
        self.incoming_buffer.max_frame_size = self.max_inbound_frame_size
        for cls, quiet in _QUIET.items():
            if cls in self._frame_dispatch_table:
                self._frame_dispatch_table[quiet] = self._frame_dispatch_table[cls]

    def _receive_goaway_frame(self, frame: GoAwayFrame) -> tuple[list, list]:  # type: ignore[override]
        if frame.error_code != 0:
            return super()._receive_goaway_frame(frame)
        event = h2.events.ConnectionTerminated()
        event.error_code = ErrorCodes.NO_ERROR
        event.last_stream_id = frame.last_stream_id
        event.additional_data = frame.additional_data or None
        return [], [event]


def _decode_headers(headers: Sequence[tuple[bytes | str, bytes | str]]) -> list[tuple[str, str]]:
    """h2 hands headers over as bytes; HBONE headers are ASCII/UTF-8 text."""
    return [(n.decode() if isinstance(n, bytes) else n, v.decode() if isinstance(v, bytes) else v) for n, v in headers]


class HboneStream:
    """One tunnelled TCP connection (an HTTP/2 stream); implements the ByteStream interface."""

    __slots__ = (
        "_cancel_on_reset",
        "_chunks",
        "_conn",
        "_drain_to",
        "_eof",
        "_eof_pending",
        "_held_flow",
        "_parked",
        "_pending",
        "_push_to",
        "_pushing_paused",
        "_read_waiter",
        "_reset_code",
        "_response",
        "_window_waiter",
        "local_closed",
        "remote_closed",
        "request",
        "status",
        "stream_id",
    )

    def __init__(self, conn: HboneConnection, stream_id: int) -> None:
        self._conn = conn
        self.stream_id = stream_id
        self._chunks: collections.deque[tuple[bytes, int]] = collections.deque()
        self._eof = False
        self._reset_code: int | None = None
        self._read_waiter: asyncio.Future[None] | None = None
        self._window_waiter: asyncio.Future[None] | None = None
        self._response: asyncio.Future[int] | None = None
        self.local_closed = False
        self.remote_closed = False
        self.request: ConnectRequest | None = None
        self.status: int | None = None
        # push interface (see ztunnel.hbone.streams.PushStream)
        self._push_to: PushTarget | None = None
        self._drain_to: PushTarget | None = None
        self._pushing_paused = False
        self._held_flow = 0  # pushed on while the sink was full: acknowledged once it drains
        self._pending: collections.deque[bytes | memoryview] = collections.deque()  # waiting for window
        self._parked = 0  # bytes in _pending, charged to the connection's PeerBudget
        self._eof_pending = False
        self._cancel_on_reset: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return (
            f"<HboneStream {self.stream_id} local_closed={self.local_closed} remote_closed={self.remote_closed}"
            f" reset={self._reset_code}>"
        )

    @property
    def connection(self) -> HboneConnection:
        return self._conn

    @property
    def done(self) -> bool:
        return self._reset_code is not None or (self.local_closed and self.remote_closed)

    # ---- ByteStream ----------------------------------------------------------------------------
    async def read(self, n: int = READ_CHUNK) -> bytes:
        while not self._chunks:
            if self._reset_code is not None:
                raise StreamClosed(f"HBONE stream reset by peer (error {self._reset_code})")
            if self._eof:
                return b""
            self._read_waiter = self._conn.loop.create_future()
            try:
                await self._read_waiter
            finally:
                self._read_waiter = None
        data, flow = self._chunks.popleft()
        if len(data) > n:
            # flow >= len(data) (it counts padding too): the rest keeps what this part does not acknowledge
            self._chunks.appendleft((data[n:], flow - n))
            data = data[:n]
            flow = n
        if flow:
            self._ack(flow)
        return data

    async def write(self, data: bytes | memoryview) -> None:
        conn = self._conn
        rest: bytes | memoryview | None = data
        while rest:
            if self._reset_code is not None or self.local_closed or conn.closed.done():
                raise StreamClosed("HBONE stream is closed")
            if conn._write_paused:
                await conn._wait_writable()
                continue
            left = self._send_some(rest)  # the push path's sender: window, frame size, DATA fast path
            if left is not None and len(left) == len(rest):  # no window: wait for the peer's WINDOW_UPDATE
                self._window_waiter = conn.loop.create_future()
                try:
                    await self._window_waiter
                finally:
                    self._window_waiter = None
            rest = left

    async def write_eof(self) -> None:
        self._end_local()

    def _end_local(self) -> None:
        if self.local_closed or self._reset_code is not None:
            return
        self.local_closed = True
        try:
            self._conn.h2.end_stream(self.stream_id)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            pass
        self._conn._flush_soon()
        self._conn._maybe_done(self)

    def close(self) -> None:
        """Finish: half-close our side; if the peer still sends, cancel (like close() on TCP with unread data)."""
        if self.done:
            self._discard_unread()
            return
        if not self.remote_closed:
            self.abort()
            return
        self.local_closed = True
        try:
            self._conn.h2.end_stream(self.stream_id)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            pass
        self._conn._flush_soon()
        self._conn._maybe_done(self)

    def abort(self, code: ErrorCodes = ErrorCodes.CANCEL) -> None:
        self._discard_unread()
        if self._reset_code is not None:
            return
        self._reset_code = int(code)
        try:
            self._conn.h2.reset_stream(self.stream_id, code)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            pass
        self._conn._flush_soon()
        self._wake()
        self._conn._maybe_done(self)
        target = self._push_to or self._drain_to
        if target is not None:
            target.error(StreamClosed("HBONE stream aborted"))

    # ---- server side ---------------------------------------------------------------------------
    def cancel_on_reset(self, task: asyncio.Task[None] | None) -> None:
        """Cancel `task` (the set-up of this tunnel, e.g. its upstream dial) if the stream is reset or its
        connection fails before `cancel_on_reset(None)`: a peer that resets at once gets no dial done."""
        if task is not None and self._reset_code is not None:
            task.cancel()
            return
        self._cancel_on_reset = task

    def respond(self, status: int) -> None:
        """Answer the CONNECT: 200 opens the tunnel; anything else ends the stream."""
        self.status = status
        if self._reset_code is not None:
            return
        end = status != STATUS_OK
        try:
            self._conn.h2.send_headers(self.stream_id, [(":status", str(status))], end_stream=end)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            self._reset_code = int(ErrorCodes.STREAM_CLOSED)
        if end:
            self.local_closed = True
            self._discard_unread()
            if not self.remote_closed:  # we will never read the request body: release the peer
                try:
                    self._conn.h2.reset_stream(self.stream_id, ErrorCodes.NO_ERROR)
                except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
                    pass
                self._reset_code = int(ErrorCodes.NO_ERROR)
        self._conn._flush_soon()
        self._conn._maybe_done(self)

    def _discard_unread(self) -> None:
        """Give back the connection window held by bytes nobody will read.

        Received DATA counts against the connection window until acknowledged; a stream that ends with
        unread bytes would otherwise shrink that window for good, and after a few such resets every
        stream on the pooled connection waits forever for window (the iperf3 -P 4 deadlock).
        """
        self._pending.clear()
        if self._parked:
            self._unpark(self._parked)
        flow = self._held_flow
        self._held_flow = 0
        if self._chunks:
            flow += sum(f for _, f in self._chunks)
            self._chunks.clear()
        if flow:
            self._ack(flow)

    # ---- events from the connection ------------------------------------------------------------
    def _wake(self) -> None:
        for waiter in (self._read_waiter, self._window_waiter):
            if waiter is not None and not waiter.done():
                waiter.set_result(None)
        if self._response is not None and not self._response.done() and self._reset_code is not None:
            code = self._reset_code
            refused = code == ErrorCodes.REFUSED_STREAM  # never processed: the pool may send it again
            error = HboneError(f"the HBONE server reset the stream (error {code})", refused=refused)
            self._response.set_exception(error)

    def _on_data(self, data: bytes, flow: int) -> None:
        budget = self._conn.budget
        if budget is not None:  # charged until acknowledged (_ack): bytes the local app has not taken
            budget.unread += flow
            if budget.unread + budget.parked > budget.limit:
                self._chunks.append((data, flow))  # the reset's discard gives it back with the rest
                self._over_budget(budget)
                return
        target = self._push_to
        if target is not None and not self._chunks and not self._pushing_paused:
            target.data(data)
            if flow:
                self._consumed(flow)
            return
        self._chunks.append((data, flow))
        if self._read_waiter is not None and not self._read_waiter.done():
            self._read_waiter.set_result(None)

    def _consumed(self, flow: int) -> None:
        """Bytes handed to a push target: acknowledge them, unless the target is full (then once it drains)."""
        if self._pushing_paused and self._reset_code is None:
            self._held_flow += flow
        else:
            self._ack(flow)

    def _ack(self, flow: int) -> None:
        """Give received bytes' window back to the peer (the app took them, or nobody will) and uncharge them."""
        budget = self._conn.budget
        if budget is not None:
            budget.unread -= flow
        self._conn._acknowledge(self.stream_id, flow)

    def _on_eof(self) -> None:
        self._eof = True
        self.remote_closed = True
        self._wake()
        if self._push_to is not None and not self._chunks:
            self._push_to.eof()

    def _on_reset(self, code: int) -> None:
        self._discard_unread()  # like a TCP RST: what was not read yet is dropped (and its window returned)
        if self._reset_code is None:
            self._reset_code = code
        if self._cancel_on_reset is not None:
            self._cancel_on_reset.cancel()
            self._cancel_on_reset = None
        self._eof = True
        self._wake()
        target = self._push_to or self._drain_to
        if target is not None:
            target.error(StreamClosed(f"HBONE stream reset by peer (error {self._reset_code})"))

    def _on_window(self) -> None:
        if self._window_waiter is not None and not self._window_waiter.done():
            self._window_waiter.set_result(None)
        if self._pending:
            self._drain_pending()

    # ---- push interface (see ztunnel.hbone.streams.PushStream) ---------------------------------
    def start_pushing(self, target: PushTarget) -> None:
        self._push_to = target
        if self._reset_code is not None:
            target.error(StreamClosed(f"HBONE stream reset by peer (error {self._reset_code})"))
            return
        self._deliver_buffered()

    def _deliver_buffered(self) -> None:
        while self._chunks and not self._pushing_paused and self._push_to is not None:
            data, flow = self._chunks.popleft()
            self._push_to.data(data)
            if flow:
                self._consumed(flow)
        if not self._chunks and self._eof and self._push_to is not None and self._reset_code is None:
            self._push_to.eof()

    def pause_pushing(self) -> None:
        self._pushing_paused = True

    def resume_pushing(self) -> None:
        if not self._pushing_paused:
            return
        self._pushing_paused = False
        flow = self._held_flow
        if flow:
            self._held_flow = 0
            self._ack(flow)
        if self._chunks:
            self._deliver_buffered()

    def push(self, chunk: bytes) -> bool:
        if self._reset_code is not None or self.local_closed:
            raise StreamClosed("HBONE stream is closed")
        if self._pending:
            self._pending.append(chunk)
            self._park(len(chunk))
            return False
        rest = self._send_some(chunk)
        if self._reset_code is not None:  # the send's flush found the connection dead (write buffer cap)
            raise StreamClosed("HBONE stream is closed")
        if rest is not None:
            self._pending.append(rest)
            self._park(len(rest))
            self._wait_for_room()
            return False
        if self._conn._write_paused:
            self._wait_for_room()
            return False
        return True

    def push_eof(self) -> bool:
        if self._pending:
            self._eof_pending = True
            return False
        self._end_local()
        return True

    def notify_drained(self, target: PushTarget) -> None:
        self._drain_to = target

    def stop_pushing(self) -> None:
        self._push_to = None
        self._drain_to = None
        self._conn._push_blocked.pop(self.stream_id, None)

    def _send_some(self, chunk: bytes | memoryview) -> bytes | memoryview | None:
        """Send what window and frame size allow now; return the rest (None when all went)."""
        conn = self._conn
        if conn._write_paused:
            return chunk
        h2c = conn.h2
        if FAST_DATA_FRAMES and dataframes.send(h2c, self.stream_id, chunk):
            conn._flush_after_send()
            return None
        try:
            window = h2c.local_flow_control_window(self.stream_id)
        except h2.exceptions.StreamClosedError:
            raise StreamClosed("HBONE stream is closed") from None
        limit = h2c.max_outbound_frame_size
        size = len(chunk)
        try:
            if size <= window and size <= limit:  # the common case: one frame, the chunk as it is
                h2c.send_data(self.stream_id, chunk)
                conn._flush_after_send()
                return None
            view = memoryview(chunk)
            while view and window > 0:
                n = min(window, limit, len(view))
                h2c.send_data(self.stream_id, view[:n])
                view = view[n:]
                window -= n
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError) as e:
            raise StreamClosed(f"HBONE stream is closed ({e})") from None
        conn._flush_after_send()
        return view if view else None

    def _park(self, size: int) -> None:
        """Charge bytes that wait in _pending to the peer's budget; past it, reset this stream (raises)."""
        self._parked += size
        budget = self._conn.budget
        if budget is None:
            return
        budget.parked += size
        if budget.parked + budget.unread > budget.limit:
            self._over_budget(budget)
            raise StreamClosed("HBONE stream reset: the peer is over its memory budget")

    def _over_budget(self, budget: PeerBudget) -> None:
        """The peer identity holds more than its budget: reset this stream, which gives back what it holds."""
        budget.resets += 1
        if budget.on_reset is not None:
            budget.on_reset()
        if budget.resets == 1 or budget.resets % 1000 == 0:
            log.warning(
                "HBONE peer over its memory budget: stream reset (ENHANCE_YOUR_CALM)",
                extra={
                    "peer": self._conn.label,
                    "peer_identity": str(self._conn.peer_identity),
                    "parked": budget.parked,
                    "unread": budget.unread,
                    "resets": budget.resets,
                },
            )
        self.abort(ErrorCodes.ENHANCE_YOUR_CALM)

    def _unpark(self, size: int) -> None:
        self._parked -= size
        budget = self._conn.budget
        if budget is not None:
            budget.parked -= size

    def _wait_for_room(self) -> None:
        if self._conn._write_paused:
            self._conn._push_blocked[self.stream_id] = self

    def _drain_pending(self) -> None:
        """Window or the TLS transport has room again: send what waited, then tell the relay."""
        try:
            while self._pending:
                head = self._pending[0]
                rest = self._send_some(head)
                if self._reset_code is not None:  # the send's flush found the connection dead
                    return
                if rest is not None:
                    if len(rest) != len(head):
                        self._pending[0] = rest
                        self._unpark(len(head) - len(rest))
                    self._wait_for_room()
                    return
                self._pending.popleft()
                self._unpark(len(head))
            if self._eof_pending:
                self._eof_pending = False
                self._end_local()
        except StreamClosed as e:
            target = self._drain_to or self._push_to
            if target is not None:
                target.error(e)
            return
        if self._conn._write_paused:
            self._wait_for_room()
            return
        target = self._drain_to
        if target is not None:
            self._drain_to = None
            target.drained()


# Sizes of a connection's TLS read buffers. As a BufferedProtocol the connection lends the TLS transport a
# reused buffer to decrypt into; as a plain Protocol uvloop would allocate a fresh 256 KiB bytes object for
# every `SSLObject.read` (an mmap, mremap and munmap per read: a third of the proxy's system calls at
# 1,000 requests/s). The big one, kept while the connection carries tunnels, lets a bulk transfer decrypt
# 16 records per read (64 KiB: −24 % / −36 % iperf3 -P1 / -P4, medians of 4 A/B rounds); an idle pooled
# connection (PINGs, the next CONNECT) reads into a small one, so a node with many peers does not hold
# 256 KiB for each of them.
TLS_READ_BUFFER = 256 * 1024
TLS_READ_BUFFER_IDLE = 16 * 1024


class HboneConnection(asyncio.BufferedProtocol):
    """HTTP/2 over one TLS connection. Create with `client()` / `server()` factories."""

    def __init__(
        self,
        *,
        client_side: bool,
        on_request: RequestHandler | None = None,
        on_connected: Callable[[HboneConnection], bool] | None = None,
        keepalive_interval: float = KEEPALIVE_INTERVAL,
        keepalive_timeout: float = KEEPALIVE_TIMEOUT,
        label: str = "",
    ) -> None:
        self.client_side = client_side
        self.on_request = on_request
        self.on_connected = on_connected
        self.keepalive_interval = keepalive_interval
        self.keepalive_timeout = keepalive_timeout
        self.label = label
        # Headers stay bytes: a value that is not UTF-8 must fail its stream (400), not the connection.
        # Outbound headers are built here (connect_headers, respond), so h2's per-header validation and
        # normalisation of them is skipped; received headers are still validated.
        config = h2.config.H2Configuration(
            client_side=client_side,
            header_encoding=None,
            validate_outbound_headers=False,
            normalize_outbound_headers=False,
        )
        self.h2 = _H2(config=config)
        if not client_side:
            self.h2.incoming_buffer.budget = StreamBudget(self, STREAM_OPEN_BUDGET, PREMATURE_RESET_BUDGET)
        self._requests_high = 0  # the highest stream id handed to on_request (or skipped as already reset)
        self.transport: asyncio.Transport | None = None
        self.streams: dict[int, HboneStream] = {}
        # Kept: asyncio.get_running_loop() costs a getpid() system call on every call (3.11).
        self.loop = loop = asyncio.get_running_loop()
        self.ready: asyncio.Future[None] = loop.create_future()
        self.closed: asyncio.Future[None] = loop.create_future()
        self.draining = False
        self.reserved = 0  # streams promised by the pool but not yet opened
        self._flush_scheduled = False
        self.idle_since = time.monotonic()
        self.opened_at = time.monotonic()
        self.streams_total = 0
        self.peer_identity: SpiffeId | None = None  # set by the owner (pool or server) after the handshake
        self.budget: PeerBudget | None = None  # the peer identity's, set by the server after the handshake
        self._write_cap_hit = False
        self._write_paused = False
        self._writable: asyncio.Future[None] | None = None
        self._push_blocked: dict[int, HboneStream] = {}  # pushing streams waiting for the transport to drain
        self._read_buffer: memoryview | None = None  # the big one, while there are streams
        self._idle_buffer: memoryview | None = None
        self._lent: memoryview | None = None  # the one the transport is filling
        self._ping_outstanding: bytes | None = None
        self._ping_sent_at = 0.0
        self._last_received = time.monotonic()
        self._keepalive: asyncio.TimerHandle | None = None
        # Called when the last stream ends or the connection closes (the pool reaps or forgets it).
        self.on_idle: Callable[[HboneConnection], None] | None = None

    def __repr__(self) -> str:
        state = "closed" if self.closed.done() else ("draining" if self.draining else "open")
        return f"<HboneConnection {self.label} {state} streams={len(self.streams)} reserved={self.reserved}>"

    # ---- pool accounting -----------------------------------------------------------------------
    @property
    def active_streams(self) -> int:
        return len(self.streams) + self.reserved

    @property
    def is_closed(self) -> bool:
        return self.closed.done() or self.transport is None or self.transport.is_closing()

    def is_available(self, max_streams: int) -> bool:
        return not self.draining and not self.is_closed and self.active_streams < max_streams

    @property
    def is_idle(self) -> bool:
        return not self.streams and self.reserved == 0

    # ---- asyncio protocol ----------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass asyncio's
        if self.on_connected is not None and not self.on_connected(self):
            transport.abort()
            return
        settings = {
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
            h2.settings.SettingCodes.MAX_FRAME_SIZE: MAX_FRAME_SIZE,
            h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: SERVER_MAX_CONCURRENT_STREAMS,
            h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: MAX_HEADER_LIST,
        }
        if self.client_side:
            settings[h2.settings.SettingCodes.ENABLE_PUSH] = 0
        # Our settings are in force from the first byte (the peer learns them from our preface), so the
        # frame parser must accept big frames at once too.
        self.h2.local_settings = h2.settings.Settings(client=self.client_side, initial_values=settings)
        self.h2.max_inbound_frame_size = MAX_FRAME_SIZE
        self.h2.incoming_buffer.max_frame_size = MAX_FRAME_SIZE
        self.h2.initiate_connection()
        self.h2.increment_flow_control_window(CONNECTION_WINDOW - 65535)
        self._flush()
        if self.keepalive_interval > 0:
            self._keepalive = asyncio.get_running_loop().call_later(self.keepalive_interval, self._keepalive_tick)

    def get_buffer(self, sizehint: int) -> memoryview:
        if self.streams:
            if self._read_buffer is None:
                self._read_buffer = memoryview(bytearray(TLS_READ_BUFFER))
            self._lent = self._read_buffer
        else:
            self._read_buffer = None  # idle: give the big one back (nothing refers to it between reads)
            if self._idle_buffer is None:
                self._idle_buffer = memoryview(bytearray(TLS_READ_BUFFER_IDLE))
            self._lent = self._idle_buffer
        return self._lent

    def buffer_updated(self, nbytes: int) -> None:
        assert self._lent is not None
        # h2 and the DATA fast path copy out what they keep before returning, so the view can go in as it is
        self.data_received(self._lent[:nbytes])

    def data_received(self, data: bytes | memoryview) -> None:
        self._last_received = time.monotonic()
        if FAST_DATA_FRAMES:
            try:
                data = dataframes.receive(self.h2, data, self._data_receiver)
            except Exception as e:
                log.exception("HBONE data handling failed, closing the connection", extra={"peer": self.label})
                self._fail(HboneError(f"internal error: {e}"))
                return
            if not data or self.is_closed:
                self._flush_soon()
                return
        try:
            events = self.h2.receive_data(data)
        except Exception as e:  # ProtocolError, or anything else garbage makes h2 raise: this connection only
            if isinstance(e, PeerTooCostly):
                log.warning(
                    "HBONE peer over a limit, closing the connection (GOAWAY ENHANCE_YOUR_CALM)",
                    extra={"peer": self.label, "peer_identity": str(self.peer_identity), "error": str(e)},
                )
            else:
                log.info("HBONE protocol error, closing the connection", extra={"peer": self.label, "error": str(e)})
            self._flush()
            if self.transport is not None:
                self.transport.close()  # flushes the GOAWAY h2 queued, then closes
            self._fail(HboneError(f"HTTP/2 protocol error: {e}"))
            return
        try:
            for event in events:
                self._dispatch(event)
        except Exception as e:
            log.exception("HBONE event handling failed, closing the connection", extra={"peer": self.label})
            self._fail(HboneError(f"internal error: {e}"))
            return
        self._flush_soon()
        # h2 checks a frame only once the whole frame is buffered; refuse an announced oversized frame (or
        # header block fragment) now, so a peer cannot make us buffer up to 16 MiB per connection.
        violation = self.h2.incoming_buffer.pending_violation()
        if violation is not None:
            code, why = violation
            log.info("HBONE peer announced a frame over a limit, closing", extra={"peer": self.label, "error": why})
            try:
                self.h2.close_connection(code)
            except h2.exceptions.ProtocolError:
                pass
            self._flush()
            if self.transport is not None:
                self.transport.close()
            self._fail(HboneError(why))

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(StreamClosed(f"HBONE connection lost ({exc})" if exc else "HBONE connection closed"))

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)
        self._writable = None
        if self._push_blocked:
            blocked = list(self._push_blocked.values())
            self._push_blocked.clear()
            for stream in blocked:
                if not self._write_paused:
                    stream._drain_pending()
                else:
                    self._push_blocked[stream.stream_id] = stream

    # ---- commands ------------------------------------------------------------------------------
    async def open_stream(
        self,
        target: Authority,
        *,
        forwarded_for: tuple[str, int] | None = None,
        extra: Sequence[tuple[str, str]] = (),
        reserved: bool = False,
    ) -> HboneStream:
        """Client: send CONNECT and wait for the answer; raise HboneError unless it is 200.

        With `reserved`, a slot the pool reserved on this connection becomes the stream (no await in
        between, so the pool never sees the slot counted twice or not at all).
        """
        try:
            if self.is_closed:
                raise HboneError("the HBONE connection is closed")
            stream_id = self.h2.get_next_available_stream_id()
            self.h2.send_headers(stream_id, connect_headers(target, forwarded_for=forwarded_for, extra=extra))
        except (h2.exceptions.ProtocolError, h2.exceptions.NoAvailableStreamIDError) as e:
            raise HboneError(f"cannot open an HBONE stream: {e}") from None
        finally:
            if reserved:
                self.reserved -= 1
        stream = HboneStream(self, stream_id)
        stream._response = self.loop.create_future()
        self.streams[stream_id] = stream
        self.streams_total += 1
        # With the other frames of this loop iteration: streams opened together share a TLS record. A GOAWAY
        # that overtakes the HEADERS refuses the stream (REFUSED_STREAM), and the pool retries it elsewhere.
        self._flush_soon()
        try:
            status = await stream._response
        except BaseException:
            stream.abort()
            raise
        stream.status = status
        if status != STATUS_OK:
            stream.abort()
            raise HboneError(f"the HBONE server answered {status}", status=status)
        return stream

    def goaway(self) -> None:
        """Drain: tell the peer to open no new streams; open ones finish (graceful GOAWAY, NO_ERROR)."""
        if self.draining or self.is_closed:
            self.draining = True
            return
        self.draining = True
        frame = GoAwayFrame(stream_id=0, last_stream_id=self.h2.highest_inbound_stream_id, error_code=0)
        assert self.transport is not None
        self._flush()  # frames h2 already queued go first
        self.transport.write(frame.serialize())
        if self.is_idle:
            self.close()

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            try:
                self.h2.close_connection()
            except h2.exceptions.ProtocolError:
                pass
            self._flush()
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    # ---- internals -----------------------------------------------------------------------------
    def _flush_soon(self) -> None:
        """Send what h2 queued at the end of this loop iteration: the frames of every stream touched in it
        (a tunnel's HEADERS, its first DATA, another's END_STREAM, the WINDOW_UPDATEs) then share one TLS
        record and one write instead of one each."""
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self._flush)

    def _flush_after_send(self) -> None:
        """After DATA went into h2's output: written now once it is big, so that the transport pauses the
        other streams' sends of this loop iteration (128 streams x 256 KiB would be queued otherwise)."""
        if len(self.h2._data_to_send) >= EARLY_FLUSH:
            self._flush()
        else:
            self._flush_soon()

    def _flush(self) -> None:
        self._flush_scheduled = False
        data = self.h2.data_to_send()
        transport = self.transport
        if data and transport is not None and not transport.is_closing():
            transport.write(data)
            # DATA stops at the high-water mark (pause_writing); what still grows past it is the peer's
            # doing: answers (PING ACKs, RST_STREAMs, SETTINGS ACKs) to a peer that does not read.
            if transport.get_write_buffer_size() > WRITE_BUFFER_CAP and not self._write_cap_hit:
                self._write_cap_hit = True
                log.warning(
                    "HBONE peer does not read: write buffer over its cap, aborting the connection",
                    extra={"peer": self.label, "peer_identity": str(self.peer_identity), "cap": WRITE_BUFFER_CAP},
                )
                self._fail(HboneError(f"the peer does not read (over {WRITE_BUFFER_CAP} bytes unsent)"))

    async def _wait_writable(self) -> None:
        if self.closed.done():
            raise StreamClosed("HBONE connection closed")
        if self._writable is None:
            self._writable = self.loop.create_future()
        waiter = self._writable
        closed = self.closed
        await asyncio.wait([waiter, closed], return_when=asyncio.FIRST_COMPLETED)

    def _acknowledge(self, stream_id: int, size: int) -> None:
        if self.is_closed:
            return
        try:
            self.h2.acknowledge_received_data(size, stream_id)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            return
        self._flush_soon()

    def _maybe_done(self, stream: HboneStream) -> None:
        if stream.done and self.streams.pop(stream.stream_id, None) is not None and self.is_idle:
            self.idle_since = time.monotonic()
            if self.draining:
                self.close()
            elif self.on_idle is not None:
                self.on_idle(self)

    def _data_receiver(self, stream_id: int) -> Callable[[bytes, int], None] | None:
        """For the DATA fast path: the stream that takes a frame's bytes, if it is open and ours."""
        stream = self.streams.get(stream_id)
        if stream is None or stream._reset_code is not None:
            return None  # h2 decides (and acknowledges) what arrives for a stream we are done with
        return stream._on_data

    def _dispatch(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.DataReceived):
            stream = self.streams.get(event.stream_id)
            if stream is None or stream._reset_code is not None:
                self._acknowledge(event.stream_id, event.flow_controlled_length)
            else:
                stream._on_data(event.data, event.flow_controlled_length)
        elif isinstance(event, h2.events.WindowUpdated):
            if event.stream_id == 0:
                for s in list(self.streams.values()):  # a stream that drains may end and leave the dict
                    s._on_window()
            else:
                s = self.streams.get(event.stream_id)
                if s is not None:
                    s._on_window()
        elif isinstance(event, h2.events.StreamEnded):
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                stream._on_eof()
                self._maybe_done(stream)
        elif isinstance(event, h2.events.RequestReceived):
            self._on_request(event)
        elif isinstance(event, h2.events.ResponseReceived):
            stream = self.streams.get(event.stream_id)
            if stream is not None and stream._response is not None and not stream._response.done():
                try:
                    stream._response.set_result(response_status(_decode_headers(event.headers or [])))
                except HboneError as e:
                    stream._response.set_exception(e)
            if event.stream_ended is not None and stream is not None:
                stream._on_eof()
                self._maybe_done(stream)
        elif isinstance(event, h2.events.StreamReset):
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                stream._on_reset(int(event.error_code))
                stream.local_closed = stream.remote_closed = True
                self._maybe_done(stream)
        elif isinstance(event, h2.events.RemoteSettingsChanged):
            for s in list(self.streams.values()):
                s._on_window()
        elif isinstance(event, h2.events.SettingsAcknowledged):
            if not self.ready.done():
                self.ready.set_result(None)
        elif isinstance(event, h2.events.PingAckReceived):
            if event.ping_data == self._ping_outstanding:
                self._ping_outstanding = None
        elif isinstance(event, h2.events.ConnectionTerminated):
            self.draining = True
            if event.error_code != ErrorCodes.NO_ERROR:
                self._fail(HboneError(f"the peer closed the HBONE connection ({event.error_code!r})"))
                return
            last = event.last_stream_id or 0
            for s in list(self.streams.values()):
                if s.stream_id > last and s.stream_id % 2 == (1 if self.client_side else 0):
                    s._on_reset(int(ErrorCodes.REFUSED_STREAM))
                    s.local_closed = s.remote_closed = True
                    self._maybe_done(s)
            if self.is_idle:
                self.close()
        elif isinstance(event, h2.events.TrailersReceived):
            stream = self.streams.get(event.stream_id)
            if stream is not None and event.stream_ended is not None:
                stream._on_eof()
                self._maybe_done(stream)

    def _on_request(self, event: h2.events.RequestReceived) -> None:
        self._requests_high = max(self._requests_high, event.stream_id)
        h2_stream = self.h2.streams.get(event.stream_id)
        if h2_stream is None or h2_stream.closed:
            return  # reset by the peer in the same read (rapid reset): nothing to hand over, no handler
        stream = HboneStream(self, event.stream_id)
        self.streams[event.stream_id] = stream
        self.streams_total += 1
        if event.stream_ended is not None:
            stream._on_eof()
        if self.client_side or self.on_request is None:
            stream.abort(ErrorCodes.REFUSED_STREAM)
            return
        if self.draining:
            stream.abort(ErrorCodes.REFUSED_STREAM)
            return
        try:
            headers = _decode_headers(event.headers or [])
        except UnicodeDecodeError:
            verdict: ConnectRequest | Rejection = Rejection(STATUS_BAD_REQUEST, "a request header is not UTF-8")
        else:
            verdict = validate_connect(headers)
        if isinstance(verdict, ConnectRequest):
            stream.request = verdict
        self.on_request(stream, verdict)

    def _fail(self, exc: BaseException) -> None:
        if self._keepalive is not None:
            self._keepalive.cancel()
            self._keepalive = None
        for stream in list(self.streams.values()):
            stream._on_reset(int(ErrorCodes.CANCEL))
            if stream._response is not None and not stream._response.done():
                stream._response.set_exception(HboneError(str(exc)))
        self.streams.clear()
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)
        if not self.ready.done():
            self.ready.set_exception(HboneError(str(exc)))
            self.ready.exception()  # retrieved: nobody may be waiting
        if self.transport is not None and not self.transport.is_closing():
            self.transport.abort()
        if not self.closed.done():
            self.closed.set_result(None)
            if self.on_idle is not None:
                self.on_idle(self)

    def _keepalive_tick(self) -> None:
        """PING every interval; no answer (and no traffic) within the timeout closes the connection."""
        self._keepalive = None
        if self.is_closed:
            return
        now = time.monotonic()
        if self._ping_outstanding is not None:
            if (
                now - self._ping_sent_at >= self.keepalive_timeout
                and now - self._last_received >= self.keepalive_timeout
            ):
                log.info("HBONE keepalive timed out, closing", extra={"peer": self.label})
                self._fail(HboneError("keepalive timeout"))
                return
        else:
            self._ping_outstanding = os.urandom(8)
            self._ping_sent_at = now
            try:
                self.h2.ping(self._ping_outstanding)
            except h2.exceptions.ProtocolError:
                pass
            self._flush()
        delay = min(self.keepalive_interval, self.keepalive_timeout / 2)
        self._keepalive = asyncio.get_running_loop().call_later(delay, self._keepalive_tick)
