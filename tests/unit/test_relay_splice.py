"""The spliced relay (push interface) against in-memory HBONE connections and a scripted TCP-like end."""

from __future__ import annotations

import asyncio
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from tests.support.eventually import eventually_async
from tests.support.memory import Handler, MemoryTransport, connect_pair
from ztunnel.hbone.connection import HboneConnection
from ztunnel.hbone.protocol import CONNECTION_WINDOW, MAX_FRAME_SIZE, Authority
from ztunnel.net.streams import PushTarget, StreamClosed
from ztunnel.proxy.relay import relay


class ScriptedEnd:
    """A PushStream standing in for a TCP connection: records what it is sent, is full until `drain()`.

    Chunks are kept as the objects it was handed (like a transport's write buffer that does not copy),
    so a chunk that aliases a reused buffer would show up as corrupted bytes.
    """

    def __init__(self, *, full: bool = False) -> None:
        self.chunks: list[Any] = []
        self.full = full
        self.eof = False
        self.closed = False
        self.aborted = False
        self.push_to: PushTarget | None = None
        self.drain_to: PushTarget | None = None

    @property
    def received(self) -> bytes:
        return b"".join(bytes(c) for c in self.chunks)

    # ByteStream (unused by the splice, present for the interface)
    async def read(self, n: int = 0) -> bytes:
        raise NotImplementedError

    async def write(self, data: Any) -> None:
        raise NotImplementedError

    async def write_eof(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = True

    # push interface
    def start_pushing(self, target: PushTarget) -> None:
        self.push_to = target

    def pause_pushing(self) -> None:
        pass

    def resume_pushing(self) -> None:
        pass

    def push(self, chunk: Any) -> bool:
        if self.closed or self.aborted:
            raise StreamClosed("closed")
        self.chunks.append(chunk)
        return not self.full

    def push_eof(self) -> bool:
        self.eof = True
        return True

    def notify_drained(self, target: PushTarget) -> None:
        self.drain_to = target

    def stop_pushing(self) -> None:
        self.push_to = None
        self.drain_to = None

    def drain(self, *, full_again: bool = False) -> None:
        """Room again (until the next chunk, with `full_again`)."""
        self.full = full_again
        target, self.drain_to = self.drain_to, None
        if target is not None:
            target.drained()


async def until(predicate: Any, what: str, timeout: float = 5) -> None:
    """`eventually_async`, polled every millisecond: these waits are for the loop's own callbacks."""
    await eventually_async(predicate, timeout, interval=0.001, what=what)


async def test_streams_that_half_close_while_their_sink_is_full_give_the_connection_window_back() -> None:
    """The peer sends a chunk the sink cannot take at once, with END_STREAM, while our side keeps the
    tunnel open (a server that answered and half-closed, a client that goes on). Once the sink drains,
    the credit held back for that chunk must go back to the shared connection window: held until the
    relay ends, a few such tunnels use up the whole window and every stream on the pooled connection
    stalls."""
    handler = Handler()
    client, _server, _, _ = connect_pair(handler)
    await client.ready
    relays = []
    ends = []
    block = b"d" * MAX_FRAME_SIZE
    try:
        for port in range(CONNECTION_WINDOW // MAX_FRAME_SIZE + 4):  # more than the connection window in all
            stream = await client.open_stream(Authority("10.0.0.1", 7000 + port))
            served = await handler.streams.get()
            end = ScriptedEnd(full=True)
            relays.append(asyncio.create_task(relay(served, end)))
            # the last DATA frame carries END_STREAM (h2 peers may do so; ours sends an empty frame)
            await until(
                lambda s=stream: client.h2.local_flow_control_window(s.stream_id) >= len(block),
                f"no connection window left after {port} tunnels: the client stalled",
            )
            client.h2.send_data(stream.stream_id, block, end_stream=True)
            client._flush()
            while not end.eof:  # every chunk fills the sink; the last one is still queued at the EOF
                await until(lambda end=end: end.eof or end.drain_to is not None, "the sink never saw the EOF")
                if not end.eof:
                    end.drain(full_again=True)
            end.drain()
            assert end.received == block
            ends.append(end)
        assert not any(r.done() for r in relays)  # all tunnels still open the other way
    finally:
        for r in relays:
            r.cancel()
        await asyncio.gather(*relays, return_exceptions=True)


class BufferedMemoryTransport(MemoryTransport):
    """Delivers through the peer's BufferedProtocol interface the way a TLS transport does: decrypts into
    the one buffer `get_buffer` lends, in reads that split frames anywhere, and reuses (here: scribbles
    over) that buffer as soon as `buffer_updated` returns."""

    READ = 16 * 1024 + 7

    def _deliver(self, data: bytes) -> None:
        self.in_flight -= len(data)
        if self.paused and self.in_flight <= self.high // 2:
            self.paused = False
            assert self.protocol is not None
            self.protocol.resume_writing()
        peer = self.peer
        if peer is None or peer.closing or peer.protocol is None:
            return
        protocol = peer.protocol
        assert isinstance(protocol, HboneConnection)
        view = memoryview(data)
        while view:
            buf = protocol.get_buffer(len(view))
            n = min(len(buf), len(view), self.READ)
            buf[:n] = view[:n]
            protocol.buffer_updated(n)
            buf[:n] = b"\xee" * n  # the next read overwrites the buffer
            view = view[n:]


def buffered_pair(on_request: Any) -> tuple[HboneConnection, HboneConnection]:
    client = HboneConnection(client_side=True, keepalive_interval=0)
    server = HboneConnection(client_side=False, on_request=on_request, keepalive_interval=0)
    ct, st = BufferedMemoryTransport(), BufferedMemoryTransport()
    ct.peer, st.peer = st, ct
    ct.protocol, st.protocol = client, server
    server.connection_made(st)
    client.connection_made(ct)
    return client, server


async def test_chunks_received_through_the_reused_tls_read_buffer_stay_intact() -> None:
    """The connection lends one reused buffer to the TLS transport. Received DATA must not alias it: a
    chunk queued for a slow reader, or sitting in a sink's write buffer (which keeps the object it was
    given), would be overwritten by the next read."""
    handler = Handler()
    client, _server = buffered_pair(handler)
    await client.ready
    payload = bytes(i * 7 % 251 for i in range(3 * 1024 * 1024 + 11))

    # 1. queued unread in the stream (nobody reading) while more reads reuse the buffer
    stream = await client.open_stream(Authority("10.0.0.1", 8080))
    served = await handler.streams.get()
    for i in range(0, len(payload), 100_003):
        await stream.write(payload[i : i + 100_003])
    await stream.write_eof()
    await until(lambda: served._eof, "the EOF never arrived")
    assert all(isinstance(d, bytes) for d, _ in served._chunks)
    got = b""
    while chunk := await served.read():
        got += chunk
    assert got == payload

    # 2. spliced into a sink that keeps the chunk objects it was handed
    stream = await client.open_stream(Authority("10.0.0.1", 8081))
    served = await handler.streams.get()
    end = ScriptedEnd()
    relaying = asyncio.create_task(relay(served, end))
    try:
        for i in range(0, len(payload), 100_003):
            await stream.write(payload[i : i + 100_003])
        await stream.write_eof()
        await until(lambda: end.eof, "the EOF never reached the sink")
        assert end.received == payload
    finally:
        relaying.cancel()
        await asyncio.gather(relaying, return_exceptions=True)


class ScriptedSource(ScriptedEnd):
    """A ScriptedEnd that also sends: honours pause/resume like a TCP stream (queues while paused)."""

    def __init__(self, *, full: bool = False) -> None:
        super().__init__(full=full)
        self.paused = False
        self.queue: list[bytes | None] = []  # None: the EOF

    def start_pushing(self, target: PushTarget) -> None:
        self.push_to = target
        self._deliver()

    def pause_pushing(self) -> None:
        self.paused = True

    def resume_pushing(self) -> None:
        self.paused = False
        self._deliver()

    def send(self, chunk: bytes | None) -> None:
        self.queue.append(chunk)
        self._deliver()

    def _deliver(self) -> None:
        while self.queue and not self.paused and self.push_to is not None:
            chunk = self.queue.pop(0)
            if chunk is None:
                self.push_to.eof()
            else:
                self.push_to.data(chunk)


def _inbound_credit_held(conn: HboneConnection) -> int:
    """Connection-level bytes received but not yet acknowledged (h2's inbound window accounting)."""
    manager = conn.h2._inbound_flow_control_window_manager
    return manager.max_window_size - manager.current_window_size - manager._bytes_processed


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["peer_sends", "peer_ends_with", "end_sends", "drain", "fill", "peer_reads", "tick"]),
            st.integers(min_value=1, max_value=300_000),
        ),
        max_size=40,
    )
)
def test_random_schedules_keep_bytes_in_order_and_give_all_credit_back(ops: list[tuple[str, int]]) -> None:
    """Whatever the interleaving of writes, full/draining sinks and reads: every byte arrives once and in
    order, each EOF after its bytes, the relay ends cleanly, and no connection credit stays held."""

    async def run() -> None:
        handler = Handler()
        client, server, _, _ = connect_pair(handler)
        await client.ready
        stream = await client.open_stream(Authority("10.0.0.1", 8080))
        served = await handler.streams.get()
        end = ScriptedSource()
        relaying = asyncio.create_task(relay(served, end))
        up = bytearray()  # what the peer sent (arrives at `end`)
        down = bytearray()  # what `end` sent (arrives at the peer)
        got = bytearray()
        writers: list[asyncio.Task[None]] = []
        try:
            for i, (op, n) in enumerate(ops):
                data = bytes([i % 251]) * n
                if op == "peer_sends" and not stream.local_closed:
                    writers.append(asyncio.create_task(stream.write(data)))
                    up += data
                elif (
                    op == "peer_ends_with"  # END_STREAM on a DATA frame with data (other h2 peers do that)
                    and not stream.local_closed
                    and all(w.done() for w in writers)
                    and client.h2.local_flow_control_window(stream.stream_id) >= n
                    and n <= client.h2.max_outbound_frame_size
                ):
                    client.h2.send_data(stream.stream_id, data, end_stream=True)
                    client._flush()
                    stream.local_closed = True
                    up += data
                elif op == "end_sends":
                    end.send(data)
                    down += data
                elif op == "drain":
                    end.drain()
                elif op == "fill":
                    end.full = True
                elif op == "peer_reads" and stream._chunks:
                    got += await stream.read(n)
                for _ in range(3):
                    await asyncio.sleep(0)
            end.drain()  # a sink with room again: nothing received stays unacknowledged, tunnel still open
            for _ in range(10):
                await asyncio.sleep(0)
            assert _inbound_credit_held(server) == 0
            end.send(None)
            while not stream.remote_closed or stream._chunks:  # read everything `end` sent, and its EOF
                if end.drain_to is not None:
                    end.drain()
                chunk = await asyncio.wait_for(stream.read(), 5)
                if not chunk:
                    break
                got += chunk
            for w in writers:
                await asyncio.wait_for(w, 5)
            await stream.write_eof()  # (nothing if the peer's last DATA frame ended the stream)

            def finished() -> bool:
                if end.drain_to is not None:
                    end.drain()
                return relaying.done()

            await until(finished, "the relay did not end")
            counters = relaying.result()
            assert counters.error is None
            assert bytes(got) == bytes(down)
            assert end.received == bytes(up)
            assert end.eof and end.closed and not end.aborted
            await until(lambda: not client.streams and not server.streams, "the streams stayed open")
            assert _inbound_credit_held(server) == 0
            assert _inbound_credit_held(client) == 0
        finally:
            relaying.cancel()
            for w in writers:
                w.cancel()
            await asyncio.gather(relaying, *writers, return_exceptions=True)

    asyncio.run(run())


@settings(max_examples=100, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(["peer_sends", "end_sends", "drain", "fill", "tick"]), st.integers(1, 300_000)),
        max_size=20,
    ),
    st.sampled_from(["peer", "end"]),
)
def test_random_schedules_end_in_a_reset_on_both_sides(ops: list[tuple[str, int]], who: str) -> None:
    """A reset at any point (sink full or not, source paused or not) reaches the other side as a reset,
    and the credit of everything received but never delivered goes back to the connection."""

    async def run() -> None:
        handler = Handler()
        client, server, _, _ = connect_pair(handler)
        await client.ready
        stream = await client.open_stream(Authority("10.0.0.1", 8080))
        served = await handler.streams.get()
        end = ScriptedSource()
        relaying = asyncio.create_task(relay(served, end))
        writers: list[asyncio.Task[None]] = []
        try:
            for _ in range(3):
                await asyncio.sleep(0)
            for i, (op, n) in enumerate(ops):
                if op == "peer_sends":
                    writers.append(asyncio.create_task(stream.write(bytes([i % 251]) * n)))
                elif op == "end_sends":
                    end.send(bytes([i % 251]) * n)
                elif op == "drain":
                    end.drain()
                elif op == "fill":
                    end.full = True
                for _ in range(3):
                    await asyncio.sleep(0)
            if who == "peer":
                stream.abort()
                await until(lambda: relaying.done(), "the relay did not end")
                assert end.aborted and not end.closed
            else:
                assert end.push_to is not None
                end.push_to.error(StreamClosed("connection reset"))
                await until(lambda: relaying.done(), "the relay did not end")
                assert end.aborted
                try:
                    while await asyncio.wait_for(stream.read(), 5):
                        pass
                except StreamClosed:
                    pass
                else:
                    raise AssertionError("a reset arrived as a clean EOF")
            assert relaying.result().error
            await until(lambda: not client.streams and not server.streams, "the streams stayed open")
            await until(
                lambda: _inbound_credit_held(server) == 0 and _inbound_credit_held(client) == 0,
                "connection credit stayed held after the reset",
            )
        finally:
            relaying.cancel()
            for w in writers:
                w.cancel()
            await asyncio.gather(relaying, *writers, return_exceptions=True)

    asyncio.run(run())


async def test_byte_counters_count_only_what_the_sink_took() -> None:
    """A chunk the sink refused (it was gone) is not counted as sent: the metrics report delivered bytes."""
    source, sink = ScriptedEnd(), ScriptedEnd()
    relaying = asyncio.create_task(relay(source, sink))
    await until(lambda: source.push_to is not None and sink.push_to is not None, "the splice never started")
    assert source.push_to is not None
    source.push_to.data(b"12345")
    sink.closed = True  # the other side went away
    source.push_to.data(b"678")
    counters = await asyncio.wait_for(relaying, 5)
    assert counters.a_to_b == 5 and counters.error
    assert sink.received == b"12345"
