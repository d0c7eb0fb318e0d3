"""HTTP/2 DATA frames of open tunnels, sent and received without h2's per-frame machinery.

A tunnel's bytes are almost all plain DATA frames on an open stream. For each one, h2 builds frame and
flag objects, runs two state machines, logs, and copies the payload four times (about 12 µs to send and
20 µs to receive a 1 KiB frame here, a tenth of a proxy's CPU per request). These two functions handle
exactly the frames whose outcome h2 would not change, and keep h2's own flow-control accounting and
output buffer, so h2 stays the source of truth for everything else: any frame that is not a plain DATA
frame of an open stream with window to spare goes to h2 as before (and h2 raises the protocol errors).

They use h2 attributes that are not public API (the output buffer, window managers, stream states);
`supported()` checks them once, and without them everything goes through h2. `acknowledge` is the same for
received bytes handed back: only the bookkeeping when neither window is due a WINDOW_UPDATE.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from typing import Protocol

import h2.config
import h2.connection
from h2.connection import ConnectionState
from h2.stream import StreamState

_OPEN_CONNECTION = (ConnectionState.CLIENT_OPEN, ConnectionState.SERVER_OPEN)
# The states in which h2 lets DATA out / in without a transition or an event other than DataReceived.
_MAY_SEND = (StreamState.OPEN, StreamState.HALF_CLOSED_REMOTE)
_MAY_RECEIVE = (StreamState.OPEN, StreamState.HALF_CLOSED_LOCAL)
_OPEN_STREAM = (StreamState.OPEN, StreamState.HALF_CLOSED_LOCAL, StreamState.HALF_CLOSED_REMOTE)  # h2's `open`
_HEADER_SIZE = 9
# A frame header as three fields: (length << 8 | type), flags, R bit + stream id. Sent DATA has type and flags 0
# (the pad byte); struct reads and writes it in one call, without a slice or an int per field.
_DATA_HEADER = struct.Struct(">IxI")
_FRAME_HEADER = struct.Struct(">IBI")


class DataSink(Protocol):
    """A stream's receiving end, as `receive` needs it (HboneStream is one)."""

    reset_code: int | None  # a reset stream takes no DATA here: h2 decides (and acknowledges) what comes for it

    def on_data(self, data: bytes, flow: int) -> None: ...


def supported() -> bool:
    """Whether this h2 has the internals both fast paths rely on (checked on a throwaway connection)."""
    try:
        c = h2.connection.H2Connection(config=h2.config.H2Configuration(client_side=True))
        c.initiate_connection()
        c.send_headers(1, [(":method", "GET"), (":path", "/"), (":scheme", "https"), (":authority", "x")])
        st = c.streams[1]
        return (
            isinstance(c._data_to_send, bytearray)
            and isinstance(c._inbound_flow_control_window_manager.current_window_size, int)
            and isinstance(c.outbound_flow_control_window, int)
            and isinstance(st.outbound_flow_control_window, int)
            and isinstance(st._inbound_window_manager.current_window_size, int)
            and isinstance(st.state_machine.state, StreamState)
            and hasattr(st.state_machine, "headers_received")
            and hasattr(st, "_expected_content_length")
            and isinstance(c.state_machine.state, ConnectionState)
            and isinstance(c._inbound_flow_control_window_manager._bytes_processed, int)
            and isinstance(st._inbound_window_manager._bytes_processed, int)
            and isinstance(st._inbound_window_manager.max_window_size, int)
            and isinstance(c.incoming_buffer._data, bytearray)
            and hasattr(c.incoming_buffer, "_preamble_len")
            and hasattr(c.incoming_buffer, "_headers_buffer")
        )
    except Exception:
        return False


def send(conn: h2.connection.H2Connection, stream_id: int, data: bytes | memoryview) -> bool:
    """Queue `data` as one DATA frame if h2 would send it unchanged; False (nothing done) otherwise."""
    size = len(data)
    st = conn.streams.get(stream_id)
    if (
        st is None
        or size == 0
        or size > conn.max_outbound_frame_size
        or size > conn.outbound_flow_control_window
        or size > st.outbound_flow_control_window
        or st.state_machine.state not in _MAY_SEND
        or conn.state_machine.state not in _OPEN_CONNECTION
    ):
        return False
    out = conn._data_to_send
    out += _DATA_HEADER.pack(size << 8, stream_id)
    out += data
    conn.outbound_flow_control_window -= size
    st.outbound_flow_control_window -= size
    return True


def acknowledge(conn: h2.connection.H2Connection, stream_id: int, size: int) -> bool:
    """Count `size` processed bytes of an open stream as h2's `acknowledge_received_data` does when neither the
    connection's nor the stream's window is due a WINDOW_UPDATE (almost every call: h2 hands window back in
    halves); False (nothing done) otherwise, and then h2 must do it (it builds the frames)."""
    st = conn.streams.get(stream_id)
    if st is None or size <= 0 or st.state_machine.state not in _OPEN_STREAM:
        return False
    conn_window = conn._inbound_flow_control_window_manager
    stream_window = st._inbound_window_manager
    conn_processed: int = conn_window._bytes_processed + size
    stream_processed: int = stream_window._bytes_processed + size
    # Due, as h2's WindowManager._maybe_update_window decides: half the window processed, or the window shut
    # and more than min(1024, a quarter of it) processed. Written out for both windows: this runs per read.
    conn_max: int = conn_window.max_window_size
    stream_max: int = stream_window.max_window_size
    if (
        conn_processed >= conn_max // 2
        or stream_processed >= stream_max // 2
        or (conn_window.current_window_size == 0 and conn_processed > min(1024, conn_max // 4))
        or (stream_window.current_window_size == 0 and stream_processed > min(1024, stream_max // 4))
    ):
        return False
    conn_window._bytes_processed = conn_processed
    stream_window._bytes_processed = stream_processed
    return True


def receive(
    conn: h2.connection.H2Connection, data: bytes | memoryview, sinks: Mapping[int, DataSink]
) -> bytes | memoryview:
    """Take the plain DATA frames at the front of `data`; return the rest, for h2.

    `sinks[stream_id].on_data(payload, flow_controlled_length)` takes a frame's bytes; a stream with no sink, or
    whose sink was reset, leaves that frame (and all after it) to h2. A sink gets only a frame h2 would turn
    into one DataReceived event and nothing else, after the windows are charged as h2 charges them.
    What is returned starts at a frame boundary, or is `data` itself when nothing was taken.
    """
    buffer = conn.incoming_buffer
    if buffer._data or buffer._preamble_len or buffer._headers_buffer:
        return data
    view = memoryview(data)
    end = len(view)
    pos = 0
    conn_window = conn._inbound_flow_control_window_manager
    max_size = conn.max_inbound_frame_size
    streams = conn.streams
    machine = conn.state_machine
    while end - pos >= _HEADER_SIZE:
        head, flags, stream_id = _FRAME_HEADER.unpack_from(view, pos)
        if head & 0xFF or flags or machine.state not in _OPEN_CONNECTION:
            break  # not DATA, or flags (END_STREAM, PADDED), or a closing connection: h2's
        length: int = head >> 8
        frame_end = pos + _HEADER_SIZE + length
        if frame_end > end or length == 0 or length > max_size or length > conn_window.current_window_size:
            break
        stream_id &= 0x7FFFFFFF
        st = streams.get(stream_id)
        if st is None:
            break
        stream_window = st._inbound_window_manager
        if (
            st.state_machine.state not in _MAY_RECEIVE
            or not st.state_machine.headers_received
            or st._expected_content_length is not None
            or length > stream_window.current_window_size
        ):
            break
        sink = sinks.get(stream_id)
        if sink is None or sink.reset_code is not None:
            break
        conn_window.current_window_size -= length
        stream_window.current_window_size -= length
        payload = view[pos + _HEADER_SIZE : frame_end].tobytes()  # slice-ok: a memoryview
        pos = frame_end
        sink.on_data(payload, length)
    if pos == 0:
        return data
    return view[pos:]
