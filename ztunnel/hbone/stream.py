"""One HBONE tunnel: an HTTP/2 CONNECT stream, read and written as a byte stream or relayed by callbacks.

Flow control gives backpressure end to end: a stream acknowledges received bytes only when its reader
consumes them, and `write` waits for window and for the TLS transport to drain. The stream sees its
connection only through `StreamOwner`; the connection drives the stream through the `on_*` methods.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Sequence

import h2.exceptions
from h2.errors import ErrorCodes

from ztunnel.hbone import dataframes
from ztunnel.hbone.budgets import PeerBudget
from ztunnel.hbone.http2 import FAST_DATA_FRAMES, HboneH2, decode_headers
from ztunnel.hbone.protocol import STATUS_OK, ConnectRequest, HboneError, response_status
from ztunnel.identity.spiffe import SpiffeId
from ztunnel.net.streams import READ_CHUNK, PushTarget, StreamClosed

log = logging.getLogger("ztunnel.hbone")


class StreamOwner(asyncio.BufferedProtocol):
    """What a stream needs of its connection: HboneConnection's base class. A base class, not a Protocol: compiled
    (mypyc), a stream then reads these attributes and calls these methods directly, not by name (per DATA chunk)."""

    h2: HboneH2
    loop: asyncio.AbstractEventLoop
    closed: asyncio.Future[None]
    budget: PeerBudget | None  # the peer identity's (server side), charged for DATA parked or unread
    write_paused: bool  # the TLS transport is over its high-water mark
    label: str
    peer_identity: SpiffeId | None

    def flush_soon(self) -> None:
        """Send what h2 queued at the end of this loop iteration."""
        raise NotImplementedError

    def flush_after_send(self) -> None:
        """DATA went into h2's output: send it now if it is big, else at the end of the iteration."""
        raise NotImplementedError

    async def wait_writable(self) -> None:
        """Return once the transport takes data again (or the connection closed)."""
        raise NotImplementedError

    def acknowledge(self, stream_id: int, size: int) -> None:
        """Give `size` received bytes of window back to the peer."""
        raise NotImplementedError

    def notify_writable(self, stream: HboneStream) -> None:
        """Call `stream.send_pending()` once the transport takes data again."""
        raise NotImplementedError

    def cancel_notify_writable(self, stream: HboneStream) -> None:
        raise NotImplementedError

    def forget_if_done(self, stream: HboneStream) -> None:
        """The stream's state changed: once it is done, it leaves the connection."""
        raise NotImplementedError


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
        "_response",
        "_window_waiter",
        "local_closed",
        "remote_closed",
        "request",
        "reset_code",
        "status",
        "stream_id",
    )

    def __init__(self, conn: StreamOwner, stream_id: int) -> None:
        self._conn = conn
        self.stream_id = stream_id
        self._chunks: collections.deque[tuple[bytes, int]] = collections.deque()
        self._eof = False
        self.reset_code: int | None = None
        self._read_waiter: asyncio.Future[None] | None = None
        self._window_waiter: asyncio.Future[None] | None = None
        self._response: asyncio.Future[int] | None = None
        self.local_closed = False
        self.remote_closed = False
        self.request: ConnectRequest | None = None
        self.status: int | None = None
        # push interface (see ztunnel.net.streams.PushStream)
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
            f" reset={self.reset_code}>"
        )

    @property
    def connection(self) -> StreamOwner:
        return self._conn

    @property
    def done(self) -> bool:
        return self.reset_code is not None or (self.local_closed and self.remote_closed)

    # ---- ByteStream ----------------------------------------------------------------------------
    async def read(self, n: int = READ_CHUNK) -> bytes:
        while not self._chunks:
            if self.reset_code is not None:
                raise StreamClosed(f"HBONE stream reset by peer (error {self.reset_code})")
            if self._eof:
                return b""
            self._read_waiter = self._conn.loop.create_future()
            try:
                await self._read_waiter
            finally:
                self._read_waiter = None
        chunks = self._chunks
        data, flow = chunks.popleft()
        if len(data) > n:
            # flow >= len(data) (it counts padding too): the rest keeps what this part does not acknowledge
            chunks.appendleft((data[n:], flow - n))
            data = data[:n]
            flow = n
        elif chunks and len(data) + len(chunks[0][0]) <= n:  # several DATA frames queued: one read, one ack
            parts, size = [data], len(data)
            while chunks and size + len(chunks[0][0]) <= n:
                more, more_flow = chunks.popleft()
                parts.append(more)
                size += len(more)
                flow += more_flow
            data = b"".join(parts)
        if flow:
            self._ack(flow)
        return data

    async def write(self, data: bytes | memoryview) -> None:
        conn = self._conn
        if (  # the common case in one step: an open stream, window to spare, one DATA frame
            FAST_DATA_FRAMES
            and self.reset_code is None
            and not self.local_closed
            and not conn.write_paused
            and not conn.closed.done()
            and dataframes.send(conn.h2, self.stream_id, data)
        ):
            conn.flush_after_send()
            return
        rest: bytes | memoryview | None = data
        while rest:
            if self.reset_code is not None or self.local_closed or conn.closed.done():
                raise StreamClosed("HBONE stream is closed")
            if conn.write_paused:
                await conn.wait_writable()
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
        if self.local_closed or self.reset_code is not None:
            return
        self.local_closed = True
        try:
            self._conn.h2.end_stream(self.stream_id)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            pass
        self._conn.flush_soon()
        self._conn.forget_if_done(self)

    def close(self) -> None:
        """Finish: half-close our side; if the peer still sends, cancel (like close() on TCP with unread data)."""
        if self.done:
            self._discard_unread()
            return
        if not self.remote_closed:
            self.abort()
            return
        self._end_local()  # not done and the peer finished: our side is still open

    def abort(self, code: ErrorCodes = ErrorCodes.CANCEL) -> None:
        self._discard_unread()
        if self.reset_code is not None:
            return
        self.reset_code = int(code)
        try:
            self._conn.h2.reset_stream(self.stream_id, code)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            pass
        self._conn.flush_soon()
        self._wake()
        self._conn.forget_if_done(self)
        target = self._push_to or self._drain_to
        if target is not None:
            target.error(StreamClosed("HBONE stream aborted"))

    # ---- client side ---------------------------------------------------------------------------
    def expect_response(self) -> asyncio.Future[int]:
        """The status the server answers the CONNECT with (an HboneError if the stream is reset first)."""
        self._response = self._conn.loop.create_future()
        return self._response

    def on_response(self, headers: Sequence[tuple[bytes | str, bytes | str]]) -> None:
        response = self._response
        if response is not None and not response.done():
            try:
                response.set_result(response_status(decode_headers(headers)))
            except HboneError as e:
                response.set_exception(e)


    # ---- server side ---------------------------------------------------------------------------
    def cancel_on_reset(self, task: asyncio.Task[None] | None) -> None:
        """Cancel `task` (the set-up of this tunnel, e.g. its upstream dial) if the stream is reset or its
        connection fails before `cancel_on_reset(None)`: a peer that resets at once gets no dial done."""
        if task is not None and self.reset_code is not None:
            task.cancel()
            return
        self._cancel_on_reset = task

    def respond(self, status: int) -> None:
        """Answer the CONNECT: 200 opens the tunnel; anything else ends the stream."""
        self.status = status
        if self.reset_code is not None:
            return
        end = status != STATUS_OK
        try:
            self._conn.h2.send_headers(self.stream_id, [(":status", str(status))], end_stream=end)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            self.reset_code = int(ErrorCodes.STREAM_CLOSED)
        if end:
            self.local_closed = True
            self._discard_unread()
            if not self.remote_closed:  # we will never read the request body: release the peer
                try:
                    self._conn.h2.reset_stream(self.stream_id, ErrorCodes.NO_ERROR)
                except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
                    pass
                self.reset_code = int(ErrorCodes.NO_ERROR)
        self._conn.flush_soon()
        self._conn.forget_if_done(self)

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
        if self._response is not None and not self._response.done() and self.reset_code is not None:
            code = self.reset_code
            refused = code == ErrorCodes.REFUSED_STREAM  # never processed: the pool may send it again
            error = HboneError(f"the HBONE server reset the stream (error {code})", refused=refused)
            self._response.set_exception(error)

    def on_data(self, data: bytes, flow: int) -> None:
        conn = self._conn
        budget = conn.budget
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
        if self._pushing_paused and self.reset_code is None:
            self._held_flow += flow
        else:
            self._ack(flow)

    def _ack(self, flow: int) -> None:
        """Give received bytes' window back to the peer (the app took them, or nobody will) and uncharge them.

        Almost always no WINDOW_UPDATE is due, and the DATA fast path's bookkeeping is all there is to do: done
        here, without the connection's (which checks it is open and, when one is due, has h2 build it)."""
        conn = self._conn
        budget = conn.budget
        if budget is not None:
            budget.unread -= flow
        if not (FAST_DATA_FRAMES and dataframes.acknowledge(conn.h2, self.stream_id, flow)):
            conn.acknowledge(self.stream_id, flow)

    def on_eof(self) -> None:
        self._eof = True
        self.remote_closed = True
        self._wake()
        if self._push_to is not None and not self._chunks:
            self._push_to.eof()

    def on_reset(self, code: int) -> None:
        self._discard_unread()  # like a TCP RST: what was not read yet is dropped (and its window returned)
        if self.reset_code is None:
            self.reset_code = code
        if self._cancel_on_reset is not None:
            self._cancel_on_reset.cancel()
            self._cancel_on_reset = None
        self._eof = True
        self._wake()
        target = self._push_to or self._drain_to
        if target is not None:
            target.error(StreamClosed(f"HBONE stream reset by peer (error {self.reset_code})"))

    def on_connection_failed(self, exc: BaseException) -> None:
        self.on_reset(int(ErrorCodes.CANCEL))
        if self._response is not None and not self._response.done():
            self._response.set_exception(HboneError(str(exc)))

    def on_window(self) -> None:
        if self._window_waiter is not None and not self._window_waiter.done():
            self._window_waiter.set_result(None)
        if self._pending:
            self.send_pending()

    # ---- push interface (see ztunnel.net.streams.PushStream) ---------------------------------
    def start_pushing(self, target: PushTarget) -> None:
        self._push_to = target
        if self.reset_code is not None:
            target.error(StreamClosed(f"HBONE stream reset by peer (error {self.reset_code})"))
            return
        self._deliver_buffered()

    def _deliver_buffered(self) -> None:
        while self._chunks and not self._pushing_paused and self._push_to is not None:
            data, flow = self._chunks.popleft()
            self._push_to.data(data)
            if flow:
                self._consumed(flow)
        if not self._chunks and self._eof and self._push_to is not None and self.reset_code is None:
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
        if self.reset_code is not None or self.local_closed:
            raise StreamClosed("HBONE stream is closed")
        if self._pending:
            self._pending.append(chunk)
            self._park(len(chunk))
            return False
        conn = self._conn
        rest: bytes | memoryview | None
        if FAST_DATA_FRAMES and not conn.write_paused and dataframes.send(conn.h2, self.stream_id, chunk):
            conn.flush_after_send()  # _send_some's common case, inline (per chunk relayed)
            rest = None
        else:
            rest = self._send_some(chunk)
        if self.reset_code is not None:  # the send's flush found the connection dead (write buffer cap)
            raise StreamClosed("HBONE stream is closed")
        if rest is not None:
            self._pending.append(rest)
            self._park(len(rest))
            self._wait_for_room()
            return False
        if conn.write_paused:
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
        self._conn.cancel_notify_writable(self)

    def _send_some(self, chunk: bytes | memoryview) -> bytes | memoryview | None:
        """Send what window and frame size allow now; return the rest (None when all went)."""
        conn = self._conn
        if conn.write_paused:
            return chunk
        h2c = conn.h2
        if FAST_DATA_FRAMES and dataframes.send(h2c, self.stream_id, chunk):
            conn.flush_after_send()
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
                conn.flush_after_send()
                return None
            view = memoryview(chunk)
            while view and window > 0:
                n = min(window, limit, len(view))
                h2c.send_data(self.stream_id, view[:n])
                view = view[n:]
                window -= n
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError) as e:
            raise StreamClosed(f"HBONE stream is closed ({e})") from None
        conn.flush_after_send()
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
        if self._conn.write_paused:
            self._conn.notify_writable(self)

    def send_pending(self) -> None:
        """Window or the TLS transport has room again: send what waited, then tell the relay."""
        try:
            while self._pending:
                head = self._pending[0]
                rest = self._send_some(head)
                if self.reset_code is not None:  # the send's flush found the connection dead
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
        if self._conn.write_paused:
            self._wait_for_room()
            return
        target = self._drain_to
        if target is not None:
            self._drain_to = None
            target.drained()
