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

from collections.abc import Callable
from typing import Any

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
    out += size.to_bytes(3, "big")
    out += b"\x00\x00"  # type DATA, no flags
    out += stream_id.to_bytes(4, "big")
    out += data
    conn.outbound_flow_control_window -= size
    st.outbound_flow_control_window -= size
    return True


def _due(window: Any, processed: int) -> bool:
    """Whether h2's window manager (`_maybe_update_window`) would emit an increment with `processed` bytes."""
    size: int = window.max_window_size
    return (window.current_window_size == 0 and processed > min(1024, size // 4)) or processed >= size // 2


def acknowledge(conn: h2.connection.H2Connection, stream_id: int, size: int) -> bool:
    """Count `size` processed bytes of an open stream as h2's `acknowledge_received_data` does when neither the
    connection's nor the stream's window is due a WINDOW_UPDATE (almost every call: h2 hands window back in
    halves); False (nothing done) otherwise, and then h2 must do it (it builds the frames)."""
    st = conn.streams.get(stream_id)
    if st is None or size <= 0 or st.state_machine.state not in _OPEN_STREAM:
        return False
    conn_window = conn._inbound_flow_control_window_manager
    stream_window = st._inbound_window_manager
    conn_processed = conn_window._bytes_processed + size
    stream_processed = stream_window._bytes_processed + size
    if _due(conn_window, conn_processed) or _due(stream_window, stream_processed):
        return False
    conn_window._bytes_processed = conn_processed
    stream_window._bytes_processed = stream_processed
    return True


def receive(
    conn: h2.connection.H2Connection,
    data: bytes | memoryview,
    receiver: Callable[[int], Callable[[bytes, int], None] | None],
) -> bytes | memoryview:
    """Take the plain DATA frames at the front of `data`; return the rest, for h2.

    `receiver(stream_id)` gives the callback for a stream's data, `(payload, flow_controlled_length)`,
    or None to leave that frame (and all after it) to h2. A callback runs only for a frame h2 would
    turn into one DataReceived event and nothing else, after the windows are charged as h2 charges them.
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
        if view[pos + 3] or view[pos + 4] or machine.state not in _OPEN_CONNECTION:
            break  # not DATA, or flags (END_STREAM, PADDED), or a closing connection: h2's
        length = int.from_bytes(view[pos : pos + 3], "big")
        frame_end = pos + _HEADER_SIZE + length
        if frame_end > end or length == 0 or length > max_size or length > conn_window.current_window_size:
            break
        stream_id = int.from_bytes(view[pos + 5 : pos + 9], "big") & 0x7FFFFFFF
        st = streams.get(stream_id)
        if (
            st is None
            or st.state_machine.state not in _MAY_RECEIVE
            or not st.state_machine.headers_received
            or st._expected_content_length is not None
            or length > st._inbound_window_manager.current_window_size
        ):
            break
        on_data = receiver(stream_id)
        if on_data is None:
            break
        conn_window.current_window_size -= length
        st._inbound_window_manager.current_window_size -= length
        payload = view[pos + _HEADER_SIZE : frame_end].tobytes()
        pos = frame_end
        on_data(payload, length)
    if pos == 0:
        return data
    return view[pos:]
