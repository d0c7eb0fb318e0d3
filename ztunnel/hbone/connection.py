"""One HBONE connection: HTTP/2 (h2's sans-IO core, adapted in hbone/http2.py) over an mTLS transport.

The same class serves both sides. The client opens streams with `open_stream`; the server hands each
incoming request to `on_request` as an `HboneStream` that the caller answers with `respond(status)`. The
connection lends the TLS transport its read buffer, batches what h2 queues into one write per loop
iteration, caps what a peer that does not read can make it hold, keeps the pool's accounting, and turns
h2's events into calls on its streams (one handler per event type, `_HANDLERS`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, cast

import h2.events
import h2.exceptions
from h2.errors import ErrorCodes
from hyperframe.frame import GoAwayFrame

from ztunnel.hbone import dataframes
from ztunnel.hbone.budgets import PeerBudget, PeerTooCostly, StreamBudget
from ztunnel.hbone.http2 import FAST_DATA_FRAMES, HboneH2, decode_headers
from ztunnel.hbone.keepalive import Keepalive
from ztunnel.hbone.protocol import (
    EARLY_FLUSH,
    KEEPALIVE_INTERVAL,
    KEEPALIVE_TIMEOUT,
    PREMATURE_RESET_BUDGET,
    STATUS_BAD_REQUEST,
    STATUS_OK,
    STREAM_OPEN_BUDGET,
    WRITE_BUFFER_CAP,
    Authority,
    ConnectRequest,
    HboneError,
    Rejection,
    connect_headers,
    validate_connect,
)
from ztunnel.hbone.stream import HboneStream, StreamOwner
from ztunnel.identity.spiffe import SpiffeId
from ztunnel.net.streams import StreamClosed

log = logging.getLogger("ztunnel.hbone")

RequestHandler = Callable[[HboneStream, ConnectRequest | Rejection], None]


# Sizes of a connection's TLS read buffers. As a BufferedProtocol the connection lends the TLS transport a
# reused buffer to decrypt into; as a plain Protocol uvloop would allocate a fresh 256 KiB bytes object for
# every `SSLObject.read` (an mmap, mremap and munmap per read: a third of the proxy's system calls at
# 1,000 requests/s). The big one, kept while the connection carries tunnels, lets a bulk transfer decrypt
# 16 records per read (64 KiB: −24 % / −36 % iperf3 -P1 / -P4, medians of 4 A/B rounds); an idle pooled
# connection (PINGs, the next CONNECT) reads into a small one, so a node with many peers does not hold
# 256 KiB for each of them.
TLS_READ_BUFFER = 256 * 1024
TLS_READ_BUFFER_IDLE = 16 * 1024


class HboneConnection(StreamOwner):
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
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.client_side = client_side
        self.on_request = on_request
        self.on_connected = on_connected
        self.label = label
        self._clock = clock
        self.keepalive = Keepalive(keepalive_interval, keepalive_timeout, clock)
        # the server's rapid-reset limits, charged as h2 parses each frame
        budget = StreamBudget(STREAM_OPEN_BUDGET, PREMATURE_RESET_BUDGET, self._is_abort, clock)
        self.h2 = HboneH2(client_side, None if client_side else budget)
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
        self.idle_since = clock()
        self.opened_at = clock()
        self.streams_total = 0
        self.peer_identity: SpiffeId | None = None  # set by the owner (pool or server) after the handshake
        self.budget: PeerBudget | None = None  # the peer identity's, set by the server after the handshake
        self._write_cap_hit = False
        self.write_paused = False  # the transport is over its high-water mark
        self._writable: asyncio.Future[None] | None = None
        self._push_blocked: dict[int, HboneStream] = {}  # pushing streams waiting for the transport to drain
        self._read_buffer: memoryview | None = None  # the big one, while there are streams
        self._idle_buffer: memoryview | None = None
        self._lent: memoryview | None = None  # the one the transport is filling
        self._keepalive_timer: asyncio.TimerHandle | None = None
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
            self.transport.abort()
            return
        self.h2.start()
        self._flush()
        if self.keepalive.enabled:
            self._keepalive_timer = self.loop.call_later(self.keepalive.interval, self._keepalive_tick)

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
        self.keepalive.last_received = self._clock()
        if FAST_DATA_FRAMES:
            try:
                data = dataframes.receive(self.h2, data, self.streams)
            except Exception as e:
                log.exception("HBONE data handling failed, closing the connection", extra={"peer": self.label})
                self._fail(HboneError(f"internal error: {e}"))
                return
            if not data or self.is_closed:
                # The fast path queues nothing itself; what its sinks queued (a reset, DATA relayed back on this
                # connection) is sent with this iteration's frames. No flush when nothing is queued: the reader
                # usually answers on another connection, and an empty flush is a loop callback for nothing.
                if self.h2._data_to_send:
                    self.flush_soon()
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
        self.flush_soon()
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
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)
        self._writable = None
        if self._push_blocked:
            blocked = list(self._push_blocked.values())
            self._push_blocked.clear()
            for stream in blocked:
                if not self.write_paused:
                    stream.send_pending()
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
        response = stream.expect_response()
        self.streams[stream_id] = stream
        self.streams_total += 1
        # With the other frames of this loop iteration: streams opened together share a TLS record. A GOAWAY
        # that overtakes the HEADERS refuses the stream (REFUSED_STREAM), and the pool retries it elsewhere.
        self.flush_soon()
        try:
            status = await response
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
    def flush_soon(self) -> None:
        """Send what h2 queued at the end of this loop iteration: the frames of every stream touched in it
        (a tunnel's HEADERS, its first DATA, another's END_STREAM, the WINDOW_UPDATEs) then share one TLS
        record and one write instead of one each."""
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self._flush)

    def flush_after_send(self) -> None:
        """After DATA went into h2's output: written now once it is big, so that the transport pauses the
        other streams' sends of this loop iteration (128 streams x 256 KiB would be queued otherwise)."""
        if len(self.h2._data_to_send) >= EARLY_FLUSH:
            self._flush()
        elif not self._flush_scheduled:  # flush_soon, inline: this runs for every DATA frame sent
            self._flush_scheduled = True
            self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        h2c = self.h2
        data: bytes | bytearray
        if FAST_DATA_FRAMES:
            # h2's output buffer itself, replaced by a new one (data_to_send() copies it to bytes first): the
            # transport gets a buffer nobody writes to again.
            data = h2c._data_to_send
            if data:
                h2c._data_to_send = bytearray()
        else:
            data = h2c.data_to_send()
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

    async def wait_writable(self) -> None:
        if self.closed.done():
            raise StreamClosed("HBONE connection closed")
        if self._writable is None:
            self._writable = self.loop.create_future()
        waiter = self._writable
        closed = self.closed
        await asyncio.wait([waiter, closed], return_when=asyncio.FIRST_COMPLETED)

    def acknowledge(self, stream_id: int, size: int) -> None:
        if self.is_closed:
            return
        if FAST_DATA_FRAMES and dataframes.acknowledge(self.h2, stream_id, size):
            return  # no WINDOW_UPDATE due: nothing to send
        try:
            self.h2.acknowledge_received_data(size, stream_id)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            return
        self.flush_soon()

    def forget_if_done(self, stream: HboneStream) -> None:
        if stream.done and self.streams.pop(stream.stream_id, None) is not None and self.is_idle:
            self.idle_since = self._clock()
            if self.draining:
                self.close()
            elif self.on_idle is not None:
                self.on_idle(self)

    def notify_writable(self, stream: HboneStream) -> None:
        self._push_blocked[stream.stream_id] = stream

    def cancel_notify_writable(self, stream: HboneStream) -> None:
        self._push_blocked.pop(stream.stream_id, None)

    def _is_abort(self, stream_id: int) -> bool:
        """For the stream budget: a reset of `stream_id` now is an ordinary abort, not a premature reset."""
        stream = self.streams.get(stream_id)
        if stream is not None:
            return stream.status is not None  # answered
        return stream_id <= self._requests_high  # already ended (its reset crossed our answer)

    # ---- h2 events -----------------------------------------------------------------------------
    def _dispatch(self, event: h2.events.Event) -> None:
        handler = _HANDLERS.get(type(event))
        if handler is not None:
            handler(self, event)

    def _on_data(self, event: h2.events.DataReceived) -> None:
        stream = self.streams.get(event.stream_id)
        if stream is None or stream.reset_code is not None:
            self.acknowledge(event.stream_id, event.flow_controlled_length)
        else:
            stream.on_data(event.data, event.flow_controlled_length)

    def _on_window_updated(self, event: h2.events.WindowUpdated) -> None:
        if event.stream_id == 0:
            self._on_windows()
        else:
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                stream.on_window()

    def _on_windows(self, _event: h2.events.Event | None = None) -> None:
        """The connection window or the peer's initial window changed: every stream may send again."""
        for stream in list(self.streams.values()):  # a stream that drains may end and leave the dict
            stream.on_window()

    def _on_stream_ended(self, event: h2.events.StreamEnded) -> None:
        stream = self.streams.get(event.stream_id)
        if stream is not None:
            stream.on_eof()
            self.forget_if_done(stream)

    def _on_response(self, event: h2.events.ResponseReceived) -> None:
        stream = self.streams.get(event.stream_id)
        if stream is None:
            return
        stream.on_response(event.headers or [])
        if event.stream_ended is not None:
            stream.on_eof()
            self.forget_if_done(stream)

    def _on_trailers(self, event: h2.events.TrailersReceived) -> None:
        stream = self.streams.get(event.stream_id)
        if stream is not None and event.stream_ended is not None:
            stream.on_eof()
            self.forget_if_done(stream)

    def _on_stream_reset(self, event: h2.events.StreamReset) -> None:
        stream = self.streams.get(event.stream_id)
        if stream is not None:
            self._end_by_reset(stream, int(event.error_code))

    def _end_by_reset(self, stream: HboneStream, code: int) -> None:
        stream.on_reset(code)
        stream.local_closed = stream.remote_closed = True
        self.forget_if_done(stream)

    def _on_settings_acknowledged(self, _event: h2.events.SettingsAcknowledged) -> None:
        if not self.ready.done():
            self.ready.set_result(None)

    def _on_ping_ack(self, event: h2.events.PingAckReceived) -> None:
        if event.ping_data is not None:
            self.keepalive.acknowledged(event.ping_data)

    def _on_terminated(self, event: h2.events.ConnectionTerminated) -> None:
        self.draining = True
        if event.error_code != ErrorCodes.NO_ERROR:
            self._fail(HboneError(f"the peer closed the HBONE connection ({event.error_code!r})"))
            return
        last = event.last_stream_id or 0
        ours = 1 if self.client_side else 0
        for stream in list(self.streams.values()):
            if stream.stream_id > last and stream.stream_id % 2 == ours:
                self._end_by_reset(stream, int(ErrorCodes.REFUSED_STREAM))  # never processed: may be retried
        if self.is_idle:
            self.close()

    def _on_request(self, event: h2.events.RequestReceived) -> None:
        self._requests_high = max(self._requests_high, event.stream_id)
        h2_stream = self.h2.streams.get(event.stream_id)
        if h2_stream is None or h2_stream.closed:
            return  # reset by the peer in the same read (rapid reset): nothing to hand over, no handler
        stream = HboneStream(self, event.stream_id)
        self.streams[event.stream_id] = stream
        self.streams_total += 1
        if event.stream_ended is not None:
            stream.on_eof()
        if self.client_side or self.on_request is None:
            stream.abort(ErrorCodes.REFUSED_STREAM)
            return
        if self.draining:
            stream.abort(ErrorCodes.REFUSED_STREAM)
            return
        try:
            headers = decode_headers(event.headers or [])
        except UnicodeDecodeError:
            verdict: ConnectRequest | Rejection = Rejection(STATUS_BAD_REQUEST, "a request header is not UTF-8")
        else:
            verdict = validate_connect(headers)
        if isinstance(verdict, ConnectRequest):
            stream.request = verdict
        self.on_request(stream, verdict)

    def _fail(self, exc: BaseException) -> None:
        if self._keepalive_timer is not None:
            self._keepalive_timer.cancel()
            self._keepalive_timer = None
        for stream in list(self.streams.values()):
            stream.on_connection_failed(exc)
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
        self._keepalive_timer = None
        if self.is_closed:
            return
        keepalive = self.keepalive
        if keepalive.expired():
            log.info("HBONE keepalive timed out, closing", extra={"peer": self.label})
            self._fail(HboneError("keepalive timeout"))
            return
        ping = keepalive.tick()
        if ping is not None:
            try:
                self.h2.ping(ping)
            except h2.exceptions.ProtocolError:
                pass
            self._flush()
        self._keepalive_timer = self.loop.call_later(keepalive.period, self._keepalive_tick)


# What each h2 event does to the connection; events not listed (PINGs h2 answers itself, priority, ...)
# change nothing here.
_HANDLERS: dict[type[h2.events.Event], Callable[[HboneConnection, Any], None]] = {
    h2.events.DataReceived: HboneConnection._on_data,
    h2.events.WindowUpdated: HboneConnection._on_window_updated,
    h2.events.StreamEnded: HboneConnection._on_stream_ended,
    h2.events.RequestReceived: HboneConnection._on_request,
    h2.events.ResponseReceived: HboneConnection._on_response,
    h2.events.StreamReset: HboneConnection._on_stream_reset,
    h2.events.RemoteSettingsChanged: HboneConnection._on_windows,
    h2.events.SettingsAcknowledged: HboneConnection._on_settings_acknowledged,
    h2.events.PingAckReceived: HboneConnection._on_ping_ack,
    h2.events.ConnectionTerminated: HboneConnection._on_terminated,
    h2.events.TrailersReceived: HboneConnection._on_trailers,
}
