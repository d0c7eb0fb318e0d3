"""HboneConnection client and server driven against each other over an in-memory transport (no sockets)."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
from h2.errors import ErrorCodes
from hyperframe.frame import GoAwayFrame, PingFrame, SettingsFrame
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.support.eventually import eventually_async
from tests.support.memory import Handler, MemoryTransport, connect_pair
from ztunnel.hbone import connection as connection_module
from ztunnel.hbone.budgets import PeerBudget
from ztunnel.hbone.connection import TLS_READ_BUFFER, TLS_READ_BUFFER_IDLE, HboneConnection
from ztunnel.hbone.protocol import (
    MAX_HEADER_LIST,
    PREMATURE_RESET_BUDGET,
    STREAM_WINDOW,
    Authority,
    ConnectRequest,
    HboneError,
    Rejection,
)
from ztunnel.hbone.stream import HboneStream
from ztunnel.net.streams import StreamClosed


async def test_connect_half_close_and_reply() -> None:
    handler = Handler()
    client, _server, _, _ = connect_pair(handler)
    await client.ready
    stream = await client.open_stream(Authority("10.0.0.1", 8080), forwarded_for=("10.0.0.2", 4444))
    served = await handler.streams.get()
    request = handler.verdicts[0]
    assert isinstance(request, ConnectRequest)
    assert request.target == Authority("10.0.0.1", 8080)
    assert request.forwarded_for == ("10.0.0.2", 4444)
    await stream.write(b"hello")
    await stream.write_eof()
    assert await served.read() == b"hello"
    assert await served.read() == b""  # the client's half-close arrives as EOF...
    await served.write(b"reply after EOF")  # ...while the other direction still flows
    await served.write_eof()
    assert await stream.read() == b"reply after EOF"
    assert await stream.read() == b""
    assert stream.done and served.done
    assert client.is_idle


async def test_a_slow_reader_bounds_the_buffer_with_the_stream_window() -> None:
    handler = Handler()
    client, _server, _, _ = connect_pair(handler)
    stream = await client.open_stream(Authority("10.0.0.1", 8080))
    served = await handler.streams.get()
    payload = b"x" * (3 * STREAM_WINDOW)
    writer = asyncio.create_task(stream.write(payload))
    for _ in range(50):
        await asyncio.sleep(0)
    assert not writer.done()  # blocked on flow control: the server has not read anything
    buffered = sum(len(d) for d, _ in served._chunks)
    assert 0 < buffered <= STREAM_WINDOW
    received = 0
    while received < len(payload):
        received += len(await served.read())
    await writer
    assert received == len(payload)


async def _fill_unread(writer: HboneStream, size: int) -> None:
    """Write `size` bytes that the peer never reads (the writer stops when the stream window is full)."""
    task = asyncio.create_task(writer.write(b"z" * size))
    for _ in range(50):
        await asyncio.sleep(0)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


@pytest.mark.parametrize("who_aborts", ["receiver", "sender", "both"])
async def test_streams_reset_with_unread_data_give_the_connection_window_back(who_aborts: str) -> None:
    """Regression (iperf3 -P 4 deadlock): bytes a stream received but nobody read still count against the
    connection window; a stream reset with such bytes must acknowledge them, or after a few resets the
    connection window is gone and every stream on the pooled connection waits forever."""
    handler = Handler()
    client, _server, _, _ = connect_pair(handler)
    for _ in range(8):  # 8 x 4 MiB unread > the 16 MiB connection window
        stream = await client.open_stream(Authority("10.0.0.1", 8080))
        served = await handler.streams.get()
        await _fill_unread(served, STREAM_WINDOW)
        await _fill_unread(stream, STREAM_WINDOW)
        if who_aborts in ("receiver", "both"):
            stream.abort()
        if who_aborts in ("sender", "both"):
            served.abort()
        for _ in range(20):
            await asyncio.sleep(0)
        if who_aborts == "sender":
            stream.abort()  # the relay aborts its side too once the peer's reset arrived
        for _ in range(20):
            await asyncio.sleep(0)
    stream = await client.open_stream(Authority("10.0.0.1", 8080))
    served = await handler.streams.get()
    await asyncio.wait_for(served.write(b"still flowing"), 2)
    assert await asyncio.wait_for(stream.read(), 2) == b"still flowing"
    await asyncio.wait_for(stream.write(b"both ways"), 2)
    assert await asyncio.wait_for(served.read(), 2) == b"both ways"


async def test_non_connect_and_bad_authority_are_answered_400() -> None:
    handler = Handler()
    client, _server, _, _ = connect_pair(handler)
    await client.ready
    for headers in (
        [(":method", "GET"), (":scheme", "https"), (":path", "/"), (":authority", "10.0.0.1:80")],
        [(":method", "CONNECT"), (":authority", "name:80")],
    ):
        stream_id = client.h2.get_next_available_stream_id()
        client.h2.send_headers(stream_id, headers)
        stream = HboneStream(client, stream_id)
        response = stream.expect_response()
        client.streams[stream_id] = stream
        client._flush()
        assert await response == 400
    assert all(isinstance(v, Rejection) and v.status == 400 for v in handler.verdicts)


async def test_a_non_200_answer_raises_with_the_status() -> None:
    def deny(stream: HboneStream, verdict: ConnectRequest | Rejection) -> None:
        stream.respond(401)

    client, _server, _, _ = connect_pair(deny)
    with pytest.raises(HboneError) as e:
        await client.open_stream(Authority("10.0.0.1", 8080))
    assert e.value.status == 401
    assert client.is_idle


async def test_goaway_lets_open_streams_finish_and_refuses_new_ones() -> None:
    handler = Handler()
    client, server, _, _ = connect_pair(handler)
    stream = await client.open_stream(Authority("10.0.0.1", 8080))
    served = await handler.streams.get()
    server.goaway()
    for _ in range(5):
        await asyncio.sleep(0)
    assert client.draining and not client.is_available(100)
    await stream.write(b"still flowing")
    assert await served.read() == b"still flowing"
    await served.write(b"back")
    assert await stream.read() == b"back"
    # A new stream after GOAWAY is refused by the server.
    with pytest.raises(HboneError):
        await client.open_stream(Authority("10.0.0.1", 8080))
    await stream.write_eof()
    await served.write_eof()
    assert await served.read() == b""
    assert await stream.read() == b""
    for _ in range(5):
        await asyncio.sleep(0)
    assert server.is_closed  # the last stream ended: the draining connection closed


async def test_malformed_frames_fail_the_connection_and_its_streams() -> None:
    handler = Handler()
    client, server, _, st = connect_pair(handler)
    stream = await client.open_stream(Authority("10.0.0.1", 8080))
    await handler.streams.get()
    server.data_received(b"\x00\x00\x04\x00\x00\x00\x00\x00\x00abcd")  # DATA on stream 0
    assert server.closed.done()
    assert b"\x07" in bytes(st.written[-17:])  # a GOAWAY frame (type 7) went out
    for _ in range(5):
        await asyncio.sleep(0)
    with pytest.raises((StreamClosed, HboneError)):
        await stream.write(b"x")
        await stream.read()


async def test_an_announced_oversized_frame_is_refused_before_buffering_it() -> None:
    handler = Handler()
    client, server, _, _ = connect_pair(handler)
    await client.ready
    server.data_received(b"\x10\x00\x00\x00\x00\x00\x00\x00\x01" + b"\x00" * 100)  # a 1 MiB DATA frame begins
    assert not server.closed.done()  # exactly the max frame size is allowed
    server2_client, server2, _, _ = connect_pair(handler)
    await server2_client.ready
    server2.data_received(b"\xff\xff\xff\x00\x00\x00\x00\x00\x01")
    assert server2.closed.done()


async def test_keepalive_closes_a_connection_whose_peer_stopped_answering() -> None:
    handler = Handler()
    client, _server, ct, _ = connect_pair(handler, client_keepalive=(0.05, 0.15))
    await client.ready
    await asyncio.sleep(0.4)
    assert not client.closed.done()  # PINGs are answered: the idle connection stays up
    ct.peer = None  # the network eats everything from now on
    await asyncio.wait_for(client.closed, 2)


async def test_a_header_that_is_not_utf8_fails_only_its_stream() -> None:
    import hpack

    handler = Handler()
    client, server, _, _ = connect_pair(handler)
    await client.ready
    block = hpack.Encoder().encode([(b":method", b"CONNECT"), (b":authority", b"\xff\xfe:80")])
    server.data_received(len(block).to_bytes(3, "big") + b"\x01\x04" + (1).to_bytes(4, "big") + block)
    assert isinstance(handler.verdicts[0], Rejection) and handler.verdicts[0].status == 400
    assert not server.closed.done()


@settings(max_examples=300, deadline=None)
@given(
    frame_type=st.integers(0, 12),
    flags=st.integers(0, 255),
    stream_id=st.sampled_from([0, 1, 2, 3, 0x7FFFFFFF]),
    payload=st.binary(max_size=64),
)
def test_random_frames_never_escape_the_connection(frame_type: int, flags: int, stream_id: int, payload: bytes) -> None:
    """Any one frame is either handled (the connection stays up) or ends this connection with a GOAWAY (a
    protocol error, or the peer's own GOAWAY). The connection catches every exception, so what would show a
    bug is its "HBONE ... failed" internal-error log line or an exception reaching the loop: neither may happen."""
    internal_errors: list[str] = []

    class Recorder(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            internal_errors.append(record.getMessage())

    async def run() -> None:
        asyncio.get_running_loop().set_exception_handler(lambda _loop, context: internal_errors.append(str(context)))
        client, server, _, st = connect_pair(Handler())
        await client.ready
        sent_before = len(st.written)
        frame = len(payload).to_bytes(3, "big") + bytes([frame_type, flags]) + stream_id.to_bytes(4, "big") + payload
        server.data_received(frame)
        for _ in range(3):
            await asyncio.sleep(0)
        error_goaway = frame_type == 7 and stream_id == 0 and len(payload) >= 8 and payload[4:8] != bytes(4)
        if server.closed.done() and not error_goaway:  # (the peer ended it with an error: nothing to tell it)
            assert _goaway_code(bytes(st.written[sent_before:])) is not None  # the peer was told why

    recorder = Recorder(logging.ERROR)
    hbone_log = logging.getLogger("ztunnel.hbone")
    hbone_log.addHandler(recorder)
    try:
        asyncio.run(run())
    finally:
        hbone_log.removeHandler(recorder)
    assert internal_errors == []


class EndOnDrain:
    """A relay direction that, once its sink drains, ends the stream (as a finished relay does)."""

    def __init__(self, stream: HboneStream) -> None:
        self.stream = stream
        self.drained_calls = 0
        self.errors: list[BaseException] = []

    def data(self, chunk: bytes) -> None:
        pass

    def eof(self) -> None:
        pass

    def error(self, exc: BaseException) -> None:
        self.errors.append(exc)

    def drained(self) -> None:
        self.drained_calls += 1
        self.stream.stop_pushing()
        self.stream.abort()


async def test_streams_that_end_when_the_connection_window_reopens_do_not_break_the_connection() -> None:
    """A connection-level WINDOW_UPDATE resumes every waiting stream; streams that then end leave the
    stream table while it is being walked (this failed the whole HBONE connection: iperf3 -P 4 lost its
    control connection)."""
    handler = Handler()
    client, _server, _, _ = connect_pair(handler)
    await client.ready
    block = b"w" * STREAM_WINDOW
    filling = []
    for port in range(4):  # 4 x 4 MiB: the whole 16 MiB connection window, nobody reading yet
        s = await client.open_stream(Authority("10.0.0.1", 9000 + port))
        s.push(block)
        filling.append((s, await handler.streams.get()))
    waiting = []
    for port in range(3):
        s = await client.open_stream(Authority("10.0.0.1", 9100 + port))
        assert s.push(b"x" * 1000) is False  # no connection window left: queued
        target = EndOnDrain(s)
        s.notify_drained(target)
        waiting.append(target)
    for _, served in filling[:2]:  # the server reads 8 MiB: a connection WINDOW_UPDATE goes back
        got = 0
        while got < STREAM_WINDOW:
            got += len(await served.read())
    await eventually_async(lambda: all(t.drained_calls for t in waiting), 5, interval=0.01, what="every sink drained")
    assert not client.closed.done()
    assert all(s.stream_id in client.streams for s, _ in filling)
    assert not any(t.stream.stream_id in client.streams for t in waiting)


async def test_only_a_connection_with_tunnels_holds_the_big_tls_read_buffer() -> None:
    handler = Handler()
    client, _server, _, _ = connect_pair(handler)
    await client.ready
    assert len(client.get_buffer(-1)) == TLS_READ_BUFFER_IDLE  # idle: PINGs and the next CONNECT
    stream = await client.open_stream(Authority("10.0.0.1", 8080))
    served = await handler.streams.get()
    assert len(client.get_buffer(-1)) == TLS_READ_BUFFER  # a tunnel may carry a bulk transfer
    await stream.write_eof()
    assert await served.read() == b""
    await served.write_eof()
    assert await stream.read() == b""
    assert client.is_idle
    assert len(client.get_buffer(-1)) == TLS_READ_BUFFER_IDLE
    assert client._read_buffer is None  # the 256 KiB went back


async def test_a_goaway_that_overtakes_a_new_stream_refuses_it_as_retryable() -> None:
    """The HEADERS of a new stream go out at the end of the loop iteration; a GOAWAY whose last stream id
    is below it means the server never saw it: HboneError(refused=True), which the pool sends again."""
    handler = Handler()
    client, _server, _, _ = connect_pair(handler)
    await client.ready
    opening = asyncio.ensure_future(client.open_stream(Authority("10.0.0.1", 8080)))
    # open_stream ran up to its wait for the answer
    await eventually_async(lambda: client.streams, 5, interval=0, what="the stream opened")
    client.data_received(GoAwayFrame(stream_id=0, last_stream_id=0, error_code=0).serialize())
    with pytest.raises(HboneError) as failure:
        await opening
    assert failure.value.refused
    assert client.draining


async def test_only_a_refusal_is_retryable() -> None:
    def reset(code: ErrorCodes):  # type: ignore[no-untyped-def]
        def on_request(stream: HboneStream, verdict: ConnectRequest | Rejection) -> None:
            stream.abort(code)

        return on_request

    for code, retryable in ((ErrorCodes.REFUSED_STREAM, True), (ErrorCodes.CANCEL, False)):
        client, _server, _, _ = connect_pair(reset(code))
        await client.ready
        with pytest.raises(HboneError) as failure:
            await client.open_stream(Authority("10.0.0.1", 8080))
        assert failure.value.refused is retryable


# ---- floods (issue 10): a hostile peer's cost is bounded as its frames arrive ---------------------------
_END_HEADERS = 0x4
_CONNECT_BLOCK = b"\x02\x07CONNECT\x01\x0c10.0.0.1:808"  # HPACK literals: :method CONNECT, :authority


def _frame(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    return len(payload).to_bytes(3, "big") + bytes([kind, flags]) + stream_id.to_bytes(4, "big") + payload


def _goaway_code(written: bytes | bytearray) -> int | None:
    """The error code of the last GOAWAY among the frames a connection wrote."""
    pos, code = 0, None
    while pos + 9 <= len(written):
        length = int.from_bytes(written[pos : pos + 3], "big")
        if written[pos + 3] == 0x7:
            code = int.from_bytes(written[pos + 13 : pos + 17], "big")
        pos += 9 + length
    return code


async def test_a_continuation_flood_is_refused_at_the_header_block_cap() -> None:
    """HEADERS without END_HEADERS then CONTINUATION frames: h2 alone buffers up to 64 frames (64 MiB
    with 1 MiB frames) before decoding; the block is capped at MAX_HEADER_LIST as the frames arrive."""
    handler = Handler()
    client, server, _, st = connect_pair(handler)
    await client.ready
    server.data_received(_frame(0x1, 0, 1, _CONNECT_BLOCK))
    fragment = b"\x00" * (16 * 1024)
    for _ in range(MAX_HEADER_LIST // len(fragment) - 1):  # just under the cap: still receiving
        server.data_received(_frame(0x9, 0, 1, fragment))
    assert not server.closed.done()
    server.data_received(_frame(0x9, 0, 1, fragment))  # past it
    assert server.closed.done()
    assert _goaway_code(st.written) == ErrorCodes.ENHANCE_YOUR_CALM
    assert handler.verdicts == []

    # A 1 MiB CONTINUATION is refused by its frame header, before its payload is buffered.
    client, server, _, st = connect_pair(handler)
    await client.ready
    server.data_received(_frame(0x1, 0, 1, _CONNECT_BLOCK) + (1 << 20).to_bytes(3, "big") + b"\x09\x00" + b"\0\0\0\1")
    assert server.closed.done()
    assert _goaway_code(st.written) == ErrorCodes.ENHANCE_YOUR_CALM


async def test_rapid_reset_gets_goaway_enhance_your_calm_and_no_handler() -> None:
    """HEADERS(CONNECT)+RST_STREAM pairs (CVE-2023-44487): a stream reset in the read that opened it never
    reaches the handler, and past PREMATURE_RESET_BUDGET in a second the connection is told to calm down."""
    handler = Handler()
    client, server, _, st = connect_pair(handler)
    await client.ready
    pairs = b"".join(
        _frame(0x1, _END_HEADERS, sid, _CONNECT_BLOCK) + _frame(0x3, 0, sid, (8).to_bytes(4, "big"))
        for sid in range(1, 2 * (PREMATURE_RESET_BUDGET + 50), 2)
    )
    server.data_received(pairs[: len(pairs) // 2])
    assert handler.verdicts == []  # every stream of that read was reset before its handler ran
    assert not server.closed.done()
    server.data_received(pairs[len(pairs) // 2 :])
    assert server.closed.done()
    assert _goaway_code(st.written) == ErrorCodes.ENHANCE_YOUR_CALM
    assert handler.verdicts == []


async def test_a_reset_during_the_handlers_set_up_cancels_it() -> None:
    """A stream reset after its handler started (its upstream dial under way) cancels that work."""
    dialing: list[asyncio.Task[None]] = []

    def on_request(stream: HboneStream, verdict: ConnectRequest | Rejection) -> None:
        async def dial() -> None:
            await asyncio.sleep(3600)  # an upstream dial that never completes

        task = asyncio.ensure_future(dial())
        stream.cancel_on_reset(task)
        dialing.append(task)

    client, server, _, _ = connect_pair(on_request)
    await client.ready
    server.data_received(_frame(0x1, _END_HEADERS, 1, _CONNECT_BLOCK))
    assert len(dialing) == 1 and not dialing[0].done()
    server.data_received(_frame(0x3, 0, 1, (8).to_bytes(4, "big")))
    await asyncio.gather(dialing[0], return_exceptions=True)
    assert dialing[0].cancelled()
    assert not server.closed.done()


async def test_resets_of_answered_tunnels_are_not_counted_against_the_peer() -> None:
    """Aborting tunnels after their 200 is ordinary (an app's RST): more than the premature-reset budget of
    them in a second leaves the connection up."""
    handler = Handler()
    client, server, _, _ = connect_pair(handler)
    for _ in range(PREMATURE_RESET_BUDGET + 20):
        stream = await client.open_stream(Authority("10.0.0.1", 8080))
        await handler.streams.get()
        stream.abort()
    stream = await client.open_stream(Authority("10.0.0.1", 8080))
    served = await handler.streams.get()
    await stream.write(b"still up")
    assert await served.read() == b"still up"
    assert not server.closed.done() and not client.closed.done()


class StuckTransport(MemoryTransport):
    """A peer that never reads its socket: every write stays in our write buffer."""

    def write(self, data: Any) -> None:
        if self.closing:
            return
        self.in_flight += len(data)
        if self.in_flight > self.high and not self.paused:
            self.paused = True
            assert self.protocol is not None
            self.protocol.pause_writing()


async def test_a_peer_that_does_not_read_is_cut_off_at_the_write_buffer_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    """PINGs from a peer that never reads the answers: the ACKs pile up in the TLS write buffer (with no cap
    before); past WRITE_BUFFER_CAP the connection is aborted."""
    monkeypatch.setattr(connection_module, "WRITE_BUFFER_CAP", 64 * 1024)
    server = HboneConnection(client_side=False, on_request=Handler(), keepalive_interval=0)
    transport = StuckTransport(high=16 * 1024)
    transport.protocol = server
    server.connection_made(transport)
    pings = PingFrame(0, opaque_data=b"12345678").serialize() * 5000  # 5,000 ACKs of 17 bytes: 85 KB
    server.data_received(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + SettingsFrame(0).serialize() + pings)
    await asyncio.sleep(0)  # the flush at the end of the loop iteration
    assert server.closed.done()
    assert transport.closing
    assert transport.in_flight < 64 * 1024 + 5000 * 17 + 1024


async def test_data_a_local_app_does_not_take_is_charged_to_the_peer_budget() -> None:
    """A peer that sends on streams whose app never reads: the bytes wait in the proxy, up to the stream and
    connection windows of every connection (unbounded per identity before). They are charged to the
    identity's budget until read; the stream whose DATA takes it over the limit is reset (ENHANCE_YOUR_CALM)
    and gives its share back, and reading returns the rest."""
    handler = Handler()
    client, server, _, _ = connect_pair(handler)
    resets: list[None] = []
    budget = PeerBudget(6 * 1024 * 1024, lambda: resets.append(None))
    server.budget = budget
    pairs = []
    for _ in range(3):  # 3 x 3 MiB unread > 6 MiB
        stream = await client.open_stream(Authority("10.0.0.1", 8080))
        pairs.append((stream, await handler.streams.get()))
    for stream, _served in pairs:
        await _fill_unread(stream, 3 * 1024 * 1024)
    for _ in range(20):
        await asyncio.sleep(0)
    reset = [served for _stream, served in pairs if served.reset_code == ErrorCodes.ENHANCE_YOUR_CALM]
    assert len(reset) == 1 and budget.resets == 1 and len(resets) == 1
    assert 0 < budget.unread <= budget.limit
    assert budget.unread == sum(f for _stream, served in pairs for _d, f in served._chunks)
    with pytest.raises(StreamClosed):
        await reset[0].read()  # the reset stream's bytes are gone
    for _stream, served in pairs:
        while served._chunks:
            await served.read()
    assert budget.unread == 0


async def test_a_read_takes_the_queued_chunks_up_to_n_with_one_acknowledgement() -> None:
    handler = Handler()
    client, _server, _, _ = connect_pair(handler)
    stream = await client.open_stream(Authority("10.0.0.1", 8080))
    served = await handler.streams.get()
    for part in (b"one ", b"two ", b"three"):  # three DATA frames, queued unread
        await served.write(part)
        for _ in range(5):
            await asyncio.sleep(0)
    budget = _UnchargeCounter()
    client.budget = budget  # each acknowledgement gives its bytes back to the budget once: counted there
    budget.unread = sum(f for _d, f in stream._chunks)
    h2_window = client.h2.streams[stream.stream_id]._inbound_window_manager
    processed = h2_window._bytes_processed
    assert await stream.read(9) == b"one two "  # "three" would go past n: left for the next read
    assert budget.acks == [8]
    assert await stream.read(2) == b"th"
    assert await stream.read() == b"ree"
    assert budget.acks == [8, 2, 3]
    assert h2_window._bytes_processed == processed + 13  # and h2 counted each of them as processed


class _UnchargeCounter(PeerBudget):
    """A budget that records each uncharge (`unread -= n`, one per acknowledgement of received DATA)."""

    __slots__ = ("_unread", "acks")

    def __init__(self) -> None:
        self.acks: list[int] = []
        self._unread = 0
        super().__init__(1 << 30)

    @property
    def unread(self) -> int:
        return self._unread

    @unread.setter
    def unread(self, value: int) -> None:
        if value < self._unread:
            self.acks.append(self._unread - value)
        self._unread = value
