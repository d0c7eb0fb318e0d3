"""h2 adapted to HBONE: a graceful GOAWAY, cheap frame reprs, limits enforced as frames arrive, our settings.

Everything that subclasses or patches h2 is here; the connection and its streams use the result through
h2's public API (plus the DATA fast paths of hbone/dataframes.py, which check the internals they need).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import h2.config
import h2.connection
import h2.events
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
from ztunnel.hbone.budgets import PeerTooCostly, StreamBudget
from ztunnel.hbone.protocol import (
    CONNECTION_WINDOW,
    MAX_FRAME_SIZE,
    MAX_HEADER_LIST,
    SERVER_MAX_CONCURRENT_STREAMS,
    STREAM_WINDOW,
)

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


class LimitedFrameBuffer(FrameBuffer):
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


class HboneH2(h2.connection.H2Connection):
    """h2 with a graceful GOAWAY, cheap DATA frames and HBONE's settings.

    A NO_ERROR GOAWAY stops new streams but lets open ones finish: plain h2 moves the whole connection to
    CLOSED on any GOAWAY, which would cut streams that the peer explicitly promised to finish (drain,
    DESIGN §4.2).
    """

    incoming_buffer: LimitedFrameBuffer

    def __init__(self, client_side: bool, budget: StreamBudget | None = None) -> None:
        # Headers stay bytes: a value that is not UTF-8 must fail its stream (400), not the connection.
        # Outbound headers are built by the caller (connect_headers, respond), so h2's per-header validation
        # and normalisation of them is skipped; received headers are still validated.
        config = h2.config.H2Configuration(
            client_side=client_side,
            header_encoding=None,
            validate_outbound_headers=False,
            normalize_outbound_headers=False,
        )
        super().__init__(config=config)
        # HBONE header values are short and mostly indexed; Huffman coding them costs more CPU (on both
        # sides) than the few bytes it saves.
        self.encoder.encode = functools.partial(hpack.Encoder.encode, self.encoder, huffman=False)  # type: ignore[method-assign]
        self.incoming_buffer = LimitedFrameBuffer(server=not client_side)
        self.incoming_buffer.max_frame_size = self.max_inbound_frame_size
        self.incoming_buffer.budget = budget
        for cls, quiet in _QUIET.items():
            if cls in self._frame_dispatch_table:
                self._frame_dispatch_table[quiet] = self._frame_dispatch_table[cls]

    def start(self) -> None:
        """Queue the preface with HBONE's settings and open the connection window to CONNECTION_WINDOW."""
        client_side = self.config.client_side
        settings = {
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
            h2.settings.SettingCodes.MAX_FRAME_SIZE: MAX_FRAME_SIZE,
            h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: SERVER_MAX_CONCURRENT_STREAMS,
            h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: MAX_HEADER_LIST,
        }
        if client_side:
            settings[h2.settings.SettingCodes.ENABLE_PUSH] = 0
        # Our settings are in force from the first byte (the peer learns them from our preface), so the
        # frame parser must accept big frames at once too.
        self.local_settings = h2.settings.Settings(client=client_side, initial_values=settings)
        self.max_inbound_frame_size = MAX_FRAME_SIZE
        self.incoming_buffer.max_frame_size = MAX_FRAME_SIZE
        self.initiate_connection()
        self.increment_flow_control_window(CONNECTION_WINDOW - 65535)

    def _receive_goaway_frame(self, frame: GoAwayFrame) -> tuple[list[Frame], list[h2.events.Event]]:
        if frame.error_code != 0:
            return super()._receive_goaway_frame(frame)
        event = h2.events.ConnectionTerminated()
        event.error_code = ErrorCodes.NO_ERROR
        event.last_stream_id = frame.last_stream_id
        event.additional_data = frame.additional_data or None
        return [], [event]


def decode_headers(headers: Sequence[tuple[bytes | str, bytes | str]]) -> list[tuple[str, str]]:
    """h2 hands headers over as bytes; HBONE headers are ASCII/UTF-8 text."""
    return [(n.decode() if isinstance(n, bytes) else n, v.decode() if isinstance(v, bytes) else v) for n, v in headers]
