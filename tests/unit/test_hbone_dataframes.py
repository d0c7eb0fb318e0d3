"""The DATA-frame fast paths against h2 itself: same bytes out, same data in, same windows, same errors."""

from __future__ import annotations

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import pytest
from hyperframe.frame import DataFrame, PingFrame, WindowUpdateFrame
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.support.h2pair import CONNECT, connect_pair
from ztunnel.hbone import dataframes


def windows(conn: h2.connection.H2Connection) -> tuple[int, ...]:
    out = [conn.outbound_flow_control_window, conn._inbound_flow_control_window_manager.current_window_size]
    for sid in sorted(conn.streams):
        s = conn.streams[sid]
        out += [sid, s.outbound_flow_control_window, s._inbound_window_manager.current_window_size]
    return tuple(out)


def test_this_h2_is_supported() -> None:
    # If an h2 upgrade removes an internal the fast paths use, this fails (and the proxy falls back to h2).
    assert dataframes.supported()


@pytest.mark.parametrize("size", [1, 1024, 16384])
def test_send_writes_what_h2_writes(size: int) -> None:
    a, _ = connect_pair()
    b, _ = connect_pair()
    data = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
    a.send_data(1, data)
    assert dataframes.send(b, 1, data)
    assert b.data_to_send() == a.data_to_send()
    assert windows(b) == windows(a)


def test_send_declines_what_h2_must_decide() -> None:
    client, _ = connect_pair()
    assert not dataframes.send(client, 1, b"")  # nothing to send
    assert not dataframes.send(client, 1, b"x" * (client.max_outbound_frame_size + 1))  # too big a frame
    assert not dataframes.send(client, 5, b"x")  # no such stream
    client.end_stream(3)
    assert not dataframes.send(client, 3, b"x")  # half-closed by us: h2 raises, not us
    client.outbound_flow_control_window = 10
    assert not dataframes.send(client, 1, b"x" * 11)  # beyond the window
    assert dataframes.send(client, 1, b"x" * 10)


def feed_h2(conn: h2.connection.H2Connection, chunks: list[bytes]) -> list[tuple[int, bytes, int, bool]]:
    got = []
    for chunk in chunks:
        for event in conn.receive_data(chunk):
            if isinstance(event, h2.events.DataReceived):
                got.append((event.stream_id, event.data, event.flow_controlled_length, event.stream_ended is not None))
    return got


class Sink:
    """A stream's receiving end for `dataframes.receive`: records what it is given."""

    def __init__(self, sid: int, got: list[tuple[int, bytes, int, bool]], reset_code: int | None = None) -> None:
        self.sid = sid
        self.got = got
        self.reset_code = reset_code

    def on_data(self, data: bytes, flow: int) -> None:
        self.got.append((self.sid, data, flow, False))


def feed_fast(conn: h2.connection.H2Connection, chunks: list[bytes]) -> list[tuple[int, bytes, int, bool]]:
    got: list[tuple[int, bytes, int, bool]] = []
    sinks = {sid: Sink(sid, got) for sid in (1, 3)}
    for chunk in chunks:
        rest = dataframes.receive(conn, chunk, sinks)
        if rest:
            got += feed_h2(conn, [bytes(rest)])
    return got


def data_frame(sid: int, payload: bytes, *flags: str, pad: int | None = None) -> bytes:
    f = DataFrame(sid, data=payload)
    for flag in flags:
        f.flags.add(flag)
    if pad is not None:
        f.flags.add("PADDED")
        f.pad_length = pad
    return f.serialize()


def test_receive_gives_what_h2_gives_and_charges_the_same_windows() -> None:
    wire = b"".join(
        [
            data_frame(1, b"a" * 1000),
            data_frame(3, b"b" * 10),
            PingFrame(0, opaque_data=b"12345678").serialize(),
            data_frame(1, b"c" * 5, pad=7),
            data_frame(3, b"d" * 3, "END_STREAM"),
            data_frame(1, b"e" * 20),
        ]
    )
    _, slow = connect_pair()
    _, fast = connect_pair()
    assert feed_fast(fast, [wire]) == feed_h2(slow, [wire])
    assert windows(fast) == windows(slow)
    assert fast.data_to_send() == slow.data_to_send()  # the PING ack, from h2 in both


def test_receive_leaves_a_partial_frame_to_h2() -> None:
    wire = data_frame(1, b"a" * 100) + data_frame(1, b"b" * 100)
    _, slow = connect_pair()
    _, fast = connect_pair()
    chunks = [wire[:50], wire[50:120], wire[120:]]
    assert feed_fast(fast, chunks) == feed_h2(slow, chunks)
    assert windows(fast) == windows(slow)


def test_receive_refused_stream_goes_to_h2() -> None:
    _, server = connect_pair()
    wire = data_frame(1, b"a") + data_frame(3, b"b")
    got: list[tuple[int, bytes, int, bool]] = []
    rest = dataframes.receive(server, wire, {1: Sink(1, got)})  # no sink for 3
    assert bytes(rest) == data_frame(3, b"b")
    assert got == [(1, b"a", 1, False)]


def test_receive_leaves_a_reset_streams_data_to_h2() -> None:
    _, server = connect_pair()
    wire = data_frame(1, b"a") + data_frame(3, b"b")
    got: list[tuple[int, bytes, int, bool]] = []
    rest = dataframes.receive(server, wire, {1: Sink(1, got), 3: Sink(3, got, reset_code=8)})
    assert bytes(rest) == data_frame(3, b"b")
    assert got == [(1, b"a", 1, False)]


def test_a_peer_overrunning_the_window_still_gets_h2s_flow_control_error() -> None:
    _, server = connect_pair()
    server._inbound_flow_control_window_manager.current_window_size = 10
    wire = data_frame(1, b"x" * 11)
    rest = dataframes.receive(server, wire, {1: Sink(1, [])})
    assert bytes(rest) == wire
    with pytest.raises(h2.exceptions.FlowControlError):
        server.receive_data(bytes(rest))


def test_data_before_the_response_headers_is_h2s_protocol_error() -> None:
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    server = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    client.initiate_connection()
    server.initiate_connection()
    server.receive_data(client.data_to_send())
    client.receive_data(server.data_to_send())
    client.send_headers(1, CONNECT)
    server.receive_data(client.data_to_send())
    wire = data_frame(1, b"early")  # the server "answers" with DATA before HEADERS
    rest = dataframes.receive(client, wire, {1: Sink(1, [])})
    assert bytes(rest) == wire
    with pytest.raises(h2.exceptions.ProtocolError):
        client.receive_data(bytes(rest))


frames = st.lists(
    st.one_of(
        st.tuples(st.sampled_from([1, 3]), st.binary(min_size=1, max_size=300)).map(lambda t: data_frame(*t)),
        st.tuples(st.sampled_from([1, 3]), st.binary(max_size=50), st.integers(0, 20)).map(
            lambda t: data_frame(t[0], t[1], pad=t[2])
        ),
        st.just(PingFrame(0, opaque_data=b"abcdefgh").serialize()),
        st.integers(1, 1000).map(lambda n: WindowUpdateFrame(0, window_increment=n).serialize()),
    ),
    max_size=12,
)


@settings(max_examples=150, deadline=None)
@given(frames, st.lists(st.integers(1, 400), max_size=8))
def test_any_frame_mix_split_anywhere_reads_the_same_as_h2(wire_frames: list[bytes], cuts: list[int]) -> None:
    wire = b"".join(wire_frames)
    chunks, pos = [], 0
    for cut in cuts:
        chunks.append(wire[pos : pos + cut])
        pos += cut
    chunks.append(wire[pos:])
    chunks = [c for c in chunks if c]
    _, slow = connect_pair()
    _, fast = connect_pair()
    assert feed_fast(fast, chunks) == feed_h2(slow, chunks)
    assert windows(fast) == windows(slow)
    assert fast.data_to_send() == slow.data_to_send()


def ack_fast(conn: h2.connection.H2Connection, sid: int, size: int) -> None:
    """What HboneConnection.acknowledge does: the fast path, else h2."""
    if not dataframes.acknowledge(conn, sid, size):
        conn.acknowledge_received_data(size, sid)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([1, 3]), st.integers(1, 16384), st.booleans()), min_size=1, max_size=40))
def test_acknowledge_sends_the_window_updates_h2_sends(steps: list[tuple[int, int, bool]]) -> None:
    # Each step: the client sends `size` bytes on a stream (as window allows); the server acknowledges them at
    # once or holds them for a later step. Both servers' output (the WINDOW_UPDATEs) and windows stay h2's.
    client_a, server_a = connect_pair()
    client_b, server_b = connect_pair()
    held: dict[int, int] = {1: 0, 3: 0}
    for sid, size, now in steps:
        size = min(size, client_a.local_flow_control_window(sid))
        if size:
            for client, server in ((client_a, server_a), (client_b, server_b)):
                client.send_data(sid, b"x" * size)
                server.receive_data(client.data_to_send())
            held[sid] += size
        if now or not size:
            for s in (1, 3):
                if held[s]:
                    server_a.acknowledge_received_data(held[s], s)
                    ack_fast(server_b, s, held[s])
                    held[s] = 0
        out_a, out_b = server_a.data_to_send(), server_b.data_to_send()
        assert out_b == out_a
        client_a.receive_data(out_a)
        client_b.receive_data(out_b)
        assert windows(server_b) == windows(server_a)
        assert windows(client_b) == windows(client_a)


def test_acknowledge_leaves_a_due_window_update_to_h2() -> None:
    _, server = connect_pair()
    assert not dataframes.acknowledge(server, 1, 40000)  # half of the 65,535 window: a WINDOW_UPDATE is due
    assert not dataframes.acknowledge(server, 5, 10)  # no such stream
    assert dataframes.acknowledge(server, 1, 100)
    assert server.data_to_send() == b""
