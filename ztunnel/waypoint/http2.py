"""The waypoint's HTTP/2 layer (h2c, prior knowledge), sans-IO: one connection, client-facing or upstream.

`H2Conn` is h2 (adapted as HBONE's: hbone/http2.HboneH2, so the same frame-level limits hold: a header block
capped as its frames arrive, announced oversized frames refused by their header, new streams and premature
resets per second on the StreamBudget) with the waypoint's own settings, its events turned into a few small
ones: a validated request head (`RequestStarted`, an http1.RequestHead with version b"2", so RequestDecider,
ext-authz and telemetry treat both protocols alike), `Data`, `Trailers`, `Ended`, `Reset`, `WindowOpened`,
`ResponseStarted` (upstream side) and `Closed` (GOAWAY sent or received: the connection is over).

Flow control is the backpressure: received DATA is given back to the peer (`ack`) only once the owner has
passed it on, so what one connection can hold is its windows (`H2Limits`); `send_data` sends no more than
the peer's window and says how much went. Malformed input is the connection's end, with the code h2 (or
our limits) give: PROTOCOL_ERROR for a bad preface or frames where they may not be, FRAME_SIZE_ERROR for an
oversized frame, ENHANCE_YOUR_CALM for header blocks over the cap, CONTINUATION floods, and rapid reset.
A request that is well-framed but not one we serve (a target that is not a path, CONNECT, a bad
content-length) gets an answer on its stream only (`BadRequest`, queued here), the other streams go on.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import cast

import h2.connection
import h2.events
import h2.exceptions
import h2.settings
import hpack
from h2.connection import ConnectionInputs
from h2.errors import ErrorCodes
from h2.exceptions import ProtocolError
from h2.stream import StreamInputs
from h2.utilities import CONNECTION_HEADERS
from hpack import HeaderTuple
from hpack.table import HeaderTable
from hyperframe.frame import Frame, GoAwayFrame, HeadersFrame

from ztunnel.hbone.budgets import StreamBudget
from ztunnel.hbone.http2 import FAST_DATA_FRAMES, HboneH2
from ztunnel.hbone.protocol import MAX_HEADER_LIST, PREMATURE_RESET_BUDGET, STREAM_OPEN_BUDGET
from ztunnel.waypoint.http1 import SANITIZED_HEADERS, BadTarget, RequestHead, fold_name, request_target

H2C_PREFACE_LINE = b"PRI * HTTP/2.0\r\n"  # the first line of the h2c preface: routes a connection here
_HEADER_FRAMES = (0x1, 0x9)  # HEADERS, CONTINUATION: frames whose payload is a header block fragment


@dataclass(frozen=True, slots=True, kw_only=True)
class H2Limits:
    # Envoy's default SETTINGS_MAX_CONCURRENT_STREAMS is 2^31-1; 100 is what RFC 9113 recommends as a floor
    # and what HBONE's pool uses per connection: with the windows below it bounds one connection's memory.
    max_concurrent_streams: int = 100
    # A stream's and the connection's receive windows (bytes held for the peer until passed on): 256 KiB
    # keeps a gRPC stream at line rate on loopback; the connection's 1 MiB caps what 100 streams pin.
    stream_window: int = 256 * 1024
    connection_window: int = 1024 * 1024
    max_frame_size: int = 16 * 1024  # the protocol's default: no peer has to split less than it expects
    max_header_list: int = MAX_HEADER_LIST  # also the cap hbone/http2.LimitedFrameBuffer applies to a block
    open_budget: int = STREAM_OPEN_BUDGET  # new streams per second (rapid reset, as HBONE's)
    reset_budget: int = PREMATURE_RESET_BUDGET  # streams reset before their answer, per second
    path_normalization: str = "MERGE_SLASHES"  # as http1.Limits: the mesh config's pathNormalization
    headers_with_underscores: str = "ALLOW"  # as http1.Limits: ALLOW, REJECT_REQUEST (400) or DROP_HEADER


# --- events ---


@dataclass(frozen=True, slots=True)
class RequestStarted:
    stream_id: int
    head: RequestHead
    ended: bool  # no body follows (END_STREAM on the HEADERS)


@dataclass(frozen=True, slots=True)
class BadRequest:
    """A request refused on its stream (its answer is queued); the connection goes on."""

    stream_id: int
    status: int
    reason: str
    head: RequestHead | None


@dataclass(frozen=True, slots=True)
class ResponseStarted:
    stream_id: int
    status: int
    headers: tuple[tuple[bytes, bytes], ...]  # regular fields (no pseudo-headers)
    ended: bool


@dataclass(frozen=True, slots=True)
class Data:
    stream_id: int
    data: bytes
    flow: int  # window to give back (`ack`) once passed on (padding included)


@dataclass(frozen=True, slots=True)
class Trailers:
    stream_id: int
    headers: tuple[tuple[bytes, bytes], ...]


@dataclass(frozen=True, slots=True)
class Ended:
    stream_id: int


@dataclass(frozen=True, slots=True)
class Reset:
    stream_id: int
    code: int


@dataclass(frozen=True, slots=True)
class WindowOpened:
    stream_id: int  # 0: the connection's window or the initial window changed (every stream may send)


@dataclass(frozen=True, slots=True)
class Closed:
    """The connection is over: a GOAWAY was received (`ours` False) or sent for bad input (`ours` True)."""

    code: int
    reason: str
    ours: bool
    last_stream_id: int = 0


Event = RequestStarted | BadRequest | ResponseStarted | Data | Trailers | Ended | Reset | WindowOpened | Closed

# Connection-specific fields (RFC 9113 §8.2.2) that never cross from HTTP/1.1 to HTTP/2 or back.
HOP_BY_HOP = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade", b"te", b"http2-settings"}
)


class _H2(HboneH2):
    """HBONE's h2 adaptation with the waypoint's settings (smaller windows and frames than a tunnel's), and three
    of h2's per-request costs cut (each doing what h2 does, not less):

    - received header blocks are checked by `check_received` (h2's inbound validation, one pass with C-level
      byte checks) instead of h2's chain of generators with per-byte Python loops;
    - HPACK goes through `_Encoder`/`_Decoder` (static-table literals out, all-indexed blocks in without
      hpack's per-field calls);
    - h2 counts open streams (walking every stream it holds) at each new stream; below the limit that count
      is not needed (see `_open_streams`)."""

    def __init__(self, client_side: bool, limits: H2Limits, budget: StreamBudget | None) -> None:
        super().__init__(client_side, budget)
        self.limits = limits
        self.client = client_side
        self.config.validate_inbound_headers = False  # check_received does it, in _receive_headers_frame
        self.encoder = _Encoder()
        decoder = _Decoder()
        decoder.max_header_list_size = self.decoder.max_header_list_size
        decoder.max_allowed_table_size = self.decoder.max_allowed_table_size
        self.decoder = decoder

    def start(self) -> None:
        limits = self.limits
        settings = {
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: limits.stream_window,
            h2.settings.SettingCodes.MAX_FRAME_SIZE: limits.max_frame_size,
            h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: limits.max_concurrent_streams,
            h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: limits.max_header_list,
        }
        if self.config.client_side:
            settings[h2.settings.SettingCodes.ENABLE_PUSH] = 0
        self.local_settings = h2.settings.Settings(client=self.config.client_side, initial_values=settings)
        self.max_inbound_frame_size = limits.max_frame_size
        self.incoming_buffer.max_frame_size = limits.max_frame_size
        self.initiate_connection()
        if limits.connection_window > 65535:
            self.increment_flow_control_window(limits.connection_window - 65535)

    def _receive_headers_frame(self, frame: HeadersFrame) -> tuple[list[Frame], list[h2.events.Event]]:
        frames, events = super()._receive_headers_frame(frame)
        for ev in events:  # h2 validates where it builds this event; we do it right after, before anyone sees it
            if isinstance(ev, h2.events.RequestReceived):
                check_received(cast("list[tuple[bytes, bytes]]", ev.headers or []), _REQUEST)
            elif isinstance(ev, (h2.events.ResponseReceived, h2.events.InformationalResponseReceived)):
                check_received(cast("list[tuple[bytes, bytes]]", ev.headers or []), _RESPONSE)
            elif isinstance(ev, h2.events.TrailersReceived):
                check_received(cast("list[tuple[bytes, bytes]]", ev.headers or []), _TRAILERS)
        return frames, events

    def _open_streams(self, remainder: int) -> int:
        """h2 walks every stream it holds (dropping the closed ones) to count the open ones each time a stream
        opens. Every caller compares the count with a limit (h2: the peer's or our SETTINGS_MAX_CONCURRENT_STREAMS,
        H2Conn.open_streams: the peer's): below it, the number of streams held is an upper bound that gives the
        same answer, so the walk (and the drop of closed streams, which h2 defers anyway) waits until that many
        are held."""
        held = len(self.streams)
        inbound = remainder == (0 if self.client else 1)
        limit = (self.local_settings if inbound else self.remote_settings).max_concurrent_streams
        if held < limit:
            return held
        return super()._open_streams(remainder)


class H2Conn:
    """One h2c connection of the waypoint: `client_side` False faces the client (requests in), True faces an
    app (requests out). Bytes in with `receive`, events out; bytes out with `data_to_send`."""

    def __init__(self, *, client_side: bool, limits: H2Limits | None = None) -> None:
        self.limits = limits or H2Limits()
        self._answered: set[int] = set()  # server: streams we answered (a reset of one is not premature)
        self._high = 0  # server: highest stream id seen
        budget = None
        if not client_side:
            budget = StreamBudget(self.limits.open_budget, self.limits.reset_budget, self._is_abort)
        self.h2 = _H2(client_side, self.limits, budget)
        self.h2.start()
        self.closed: Closed | None = None
        self._goaway_last: int | None = None  # a graceful GOAWAY was sent: streams above this are refused
        self._extra_out = b""

    def _is_abort(self, stream_id: int) -> bool:
        """A reset of this stream costs us nothing: we answered it, or it is over (closed, or dropped by h2)."""
        if stream_id in self._answered:
            return True
        if stream_id > self._high:
            return False
        stream = self.h2.streams.get(stream_id)
        return stream is None or stream.closed

    # --- bytes ---

    @property
    def dead(self) -> bool:
        """Nothing more is read or sent (a GOAWAY for an error, either way); a graceful one lets streams end."""
        return self.closed is not None and (self.closed.ours or self.closed.code != 0)

    def receive(self, data: bytes | memoryview) -> list[Event]:
        if self.dead:
            return []
        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError as e:  # h2 queued GOAWAY with the error's code
            code = int(getattr(e, "error_code", ErrorCodes.PROTOCOL_ERROR))
            self.closed = Closed(code, str(e) or type(e).__name__, True)
            self._ensure_goaway(code)
            return [self.closed]
        out: list[Event] = []
        for ev in events:
            self._translate(ev, out)
        if self.closed is None:
            violation = self.h2.incoming_buffer.pending_violation()
            pending = self.h2.incoming_buffer._data  # a frame header waiting for its payload
            if len(pending) >= 9 and int.from_bytes(pending[:3], "big") > self.limits.max_frame_size:
                violation = (ErrorCodes.FRAME_SIZE_ERROR, "a frame over SETTINGS_MAX_FRAME_SIZE")
            if violation is not None:
                code, why = violation
                self.closed = Closed(int(code), why, True)
                self._ensure_goaway(int(code))
                out.append(self.closed)
        return out

    def _ensure_goaway(self, code: int) -> None:
        try:
            self.h2.close_connection(code)
        except h2.exceptions.ProtocolError:
            pass

    def data_to_send(self) -> bytes:
        data = self.h2.data_to_send()
        if self._extra_out:
            data, self._extra_out = data + self._extra_out, b""
        return data

    # --- events ---

    def _translate(self, ev: h2.events.Event, out: list[Event]) -> None:
        if isinstance(ev, h2.events.DataReceived):
            assert ev.stream_id is not None and ev.data is not None
            out.append(Data(ev.stream_id, ev.data, ev.flow_controlled_length or 0))
            if ev.stream_ended is not None:
                out.append(Ended(ev.stream_id))
        elif isinstance(ev, h2.events.RequestReceived):
            assert ev.stream_id is not None
            self._high = max(self._high, ev.stream_id)
            if self._goaway_last is not None and ev.stream_id > self._goaway_last:
                self.reset(ev.stream_id, ErrorCodes.REFUSED_STREAM)  # after our GOAWAY: never processed
                return
            ended = ev.stream_ended is not None
            limits = self.limits
            headers = cast("list[tuple[bytes, bytes]]", ev.headers or [])  # bytes: header_encoding is None
            head = request_head(headers, limits.path_normalization, limits.headers_with_underscores)
            if isinstance(head, RequestHead):
                out.append(RequestStarted(ev.stream_id, head, ended))
            else:
                status, reason = head
                self.respond(ev.stream_id, status, reason.encode() + b"\n")
                if not ended:
                    self.reset(ev.stream_id, ErrorCodes.NO_ERROR)
                out.append(BadRequest(ev.stream_id, status, reason, None))
        elif isinstance(ev, h2.events.ResponseReceived):
            assert ev.stream_id is not None
            status = 0
            fields = []
            for name, value in ev.headers or []:
                n, v = _b(name), _b(value)
                if n == b":status":
                    status = int(v)
                elif not n.startswith(b":"):
                    fields.append((n, v))
            out.append(ResponseStarted(ev.stream_id, status, tuple(fields), ev.stream_ended is not None))
            if ev.stream_ended is not None:
                out.append(Ended(ev.stream_id))
        elif isinstance(ev, h2.events.TrailersReceived):
            assert ev.stream_id is not None
            out.append(Trailers(ev.stream_id, tuple((_b(n), _b(v)) for n, v in ev.headers or [])))
            out.append(Ended(ev.stream_id))
        elif isinstance(ev, h2.events.StreamEnded):
            assert ev.stream_id is not None
            out.append(Ended(ev.stream_id))
        elif isinstance(ev, h2.events.StreamReset):
            assert ev.stream_id is not None
            out.append(Reset(ev.stream_id, int(ev.error_code or 0)))
        elif isinstance(ev, h2.events.WindowUpdated):
            out.append(WindowOpened(ev.stream_id or 0))
        elif isinstance(ev, h2.events.RemoteSettingsChanged):
            out.append(WindowOpened(0))
        elif isinstance(ev, h2.events.ConnectionTerminated):
            code = int(ev.error_code or 0)
            self.closed = Closed(code, "GOAWAY from the peer", False, ev.last_stream_id or 0)
            out.append(self.closed)
        # InformationalResponseReceived (1xx from an app) is dropped; PINGs and SETTINGS h2 answers itself

    # --- commands ---

    def send_request(
        self, head: RequestHead, scheme: bytes, extra: tuple[tuple[bytes, bytes], ...], remove: frozenset[bytes], *,
        end_stream: bool,
    ) -> int:
        """Client side: open a stream for `head` (as the client sent it, minus `remove`, plus `extra`)."""
        sid = self.h2.get_next_available_stream_id()
        if remove:
            remove = frozenset(fold_name(n) for n in remove)
        fields = [
            (b":method", head.method),
            (b":scheme", scheme),
            (b":authority", head.host),
            (b":path", head.target),
        ]
        for name, value in head.headers:
            low = name.lower()
            if low in HOP_BY_HOP and not (low == b"te" and value.strip().lower() == b"trailers"):
                continue
            if low == b"host" or low == b"expect":  # a 100 went to the client already
                continue
            if fold_name(low) in SANITIZED_HEADERS or (remove and fold_name(low) in remove):
                continue
            fields.append((low, value))
        fields += [(k.lower(), v) for k, v in extra]
        self.h2.send_headers(sid, fields, end_stream=end_stream)
        return sid

    def send_response(
        self, stream_id: int, status: int, headers: tuple[tuple[bytes, bytes], ...] | list[tuple[bytes, bytes]], *,
        end_stream: bool = False,
    ) -> bool:
        """Server side: the response head; False when the stream is gone (reset meanwhile)."""
        answered = self._answered
        answered.add(stream_id)
        if len(answered) > _ANSWERED_KEPT:  # only streams h2 still holds need remembering (see _is_abort)
            streams = self.h2.streams
            self._answered = {sid for sid in answered if sid in streams}
        fields = [(b":status", b"%d" % status)]
        for name, value in headers:
            low = name.lower()
            if low in HOP_BY_HOP or low.startswith(b":"):
                continue
            fields.append((low, value))
        try:
            if status < 200 or not self._send_head(stream_id, fields, end_stream):
                self.h2.send_headers(stream_id, fields, end_stream=end_stream)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            return False
        return True

    def _send_head(self, stream_id: int, fields: list[tuple[bytes, bytes]], end_stream: bool) -> bool:
        """A final response head as h2's send_headers queues it (the same state-machine inputs in its order, so
        the same errors; the same encoder), without its per-header passes and frame objects. False (nothing
        done) when h2 itself must: a client side, a stream h2 does not hold, a table size change to signal (the
        encoder's only state), a head over one frame, or an h2 without the internals this relies on
        (hbone/dataframes.supported)."""
        conn = self.h2
        stream = conn.streams.get(stream_id)
        encoder = conn.encoder
        if not FAST_DATA_FRAMES or conn.client or stream is None or encoder.header_table.resized:
            return False
        block = encoder.encode(fields)  # _Encoder with no resize pending: no state touched, so it may go first
        if len(block) > conn.max_outbound_frame_size:
            return False
        conn.state_machine.process_input(ConnectionInputs.SEND_HEADERS)
        machine = stream.state_machine
        machine.process_input(StreamInputs.SEND_HEADERS)
        flags = _END_HEADERS
        if end_stream:
            machine.process_input(StreamInputs.SEND_END_STREAM)
            flags |= _END_STREAM
        elif machine.trailers_sent:
            raise h2.exceptions.ProtocolError("Trailers must have END_STREAM set.")
        stream.request_method = None  # as h2 records it from a response's fields
        out = conn._data_to_send
        out += _FRAME_HEADER.pack(len(block) << 8 | _HEADERS_TYPE, flags, stream_id)
        out += block
        return True

    def respond(
        self, stream_id: int, status: int, body: bytes, headers: tuple[tuple[bytes, bytes], ...] = (), *,
        content_type: bytes = b"text/plain",
    ) -> None:
        """A local answer, whole (a short body: always within the initial window of a fresh stream)."""
        fields = [(b"content-type", content_type), (b"content-length", b"%d" % len(body)), *headers]
        if not self.send_response(stream_id, status, fields, end_stream=not body):
            return
        if body:
            if self.window(stream_id) >= len(body):  # the usual case: one DATA frame with END_STREAM
                self.h2.send_data(stream_id, body, end_stream=True)
            elif self.send_data(stream_id, body) == len(body):
                self.end(stream_id)
            else:  # no window for even this little: give up on the stream
                self.reset(stream_id, ErrorCodes.INTERNAL_ERROR)

    def window(self, stream_id: int) -> int:
        try:
            return min(self.h2.local_flow_control_window(stream_id), self.h2.max_outbound_frame_size)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError, KeyError):
            return -1

    def send_data(self, stream_id: int, data: bytes | memoryview) -> int:
        """Send what the peer's windows allow of `data`; how many bytes went (-1: the stream is gone)."""
        sent = 0
        view = memoryview(data)
        try:
            while sent < len(view):
                n = min(self.h2.local_flow_control_window(stream_id), self.h2.max_outbound_frame_size, len(view) - sent)
                if n <= 0:
                    break
                self.h2.send_data(stream_id, view[sent : sent + n])
                sent += n
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError, KeyError):
            return -1 if sent == 0 else sent
        return sent

    def send_last(self, stream_id: int, data: bytes) -> bool:
        """`data` as the stream's last DATA frame (END_STREAM) when the windows take it whole; False (nothing
        sent) otherwise, or when the stream is gone."""
        if not data or self.window(stream_id) < len(data):
            return False
        try:
            if not self._send_last_frame(stream_id, data):
                self.h2.send_data(stream_id, data, end_stream=True)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            return False
        return True

    def _send_last_frame(self, stream_id: int, data: bytes) -> bool:
        """`data` (within both windows and one frame: send_last checked) as one DATA frame with END_STREAM, as
        h2's send_data queues it (its state-machine inputs and window accounting) without its frame objects;
        False (nothing done) when h2 itself must."""
        conn: h2.connection.H2Connection = self.h2  # (as h2's type: mypyc compiles the window updates on it)
        stream = conn.streams.get(stream_id)
        if not FAST_DATA_FRAMES or stream is None:
            return False
        conn.state_machine.process_input(ConnectionInputs.SEND_DATA)
        machine = stream.state_machine
        machine.process_input(StreamInputs.SEND_DATA)
        machine.process_input(StreamInputs.SEND_END_STREAM)
        size = len(data)
        out = conn._data_to_send
        out += _FRAME_HEADER.pack(size << 8, _END_STREAM, stream_id)
        out += data
        conn.outbound_flow_control_window -= size
        stream.outbound_flow_control_window -= size
        return True

    def send_trailers(self, stream_id: int, headers: tuple[tuple[bytes, bytes], ...]) -> None:
        fields = [(n.lower(), v) for n, v in headers if not n.startswith(b":")]
        try:
            self.h2.send_headers(stream_id, fields, end_stream=True)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            pass

    def end(self, stream_id: int) -> None:
        try:
            self.h2.end_stream(stream_id)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            pass

    def reset(self, stream_id: int, code: int = ErrorCodes.CANCEL) -> None:
        try:
            self.h2.reset_stream(stream_id, code)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            pass

    def ack(self, stream_id: int, flow: int) -> None:
        """Give `flow` received bytes of window back (they were passed on, or nobody will read them); h2 gives
        the connection's share back even when the stream is gone."""
        if flow <= 0 or self.dead:
            return
        try:
            self.h2.acknowledge_received_data(flow, stream_id)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            pass

    def goaway(self, code: int = ErrorCodes.NO_ERROR) -> None:
        """GOAWAY; NO_ERROR is graceful: no new streams (any above the last one seen is refused), open ones
        finish (h2's own close_connection would end them all, as hbone/http2 explains)."""
        if code != ErrorCodes.NO_ERROR:
            self._ensure_goaway(code)
            return
        if self._goaway_last is None:
            self._goaway_last = self.h2.highest_inbound_stream_id
            frame = GoAwayFrame(stream_id=0, last_stream_id=self._goaway_last, error_code=0)
            self._extra_out += frame.serialize()

    def open_streams(self) -> int:
        return self.h2.open_outbound_streams if self.h2.config.client_side else self.h2.open_inbound_streams

    @property
    def receiving_headers(self) -> bool:
        """Part of a header block is buffered: a HEADERS/CONTINUATION frame (or a frame header too short to
        say its type) not whole yet, or a HEADERS frame waiting for its CONTINUATION (the request-headers
        timeout's clock runs while this holds)."""
        buffer = self.h2.incoming_buffer
        if buffer._headers_buffer:
            return True
        pending = buffer._data
        return 0 < len(pending) < 4 or (len(pending) >= 4 and pending[3] in _HEADER_FRAMES)


# --- HPACK and received-header checks: what hpack and h2 do, in fewer Python steps ---

_ANSWERED_KEPT = 256  # H2Conn._answered is pruned to the streams h2 holds past this many
_FRAME_HEADER = struct.Struct(">IBI")  # (length << 8 | type), flags, stream id
_HEADERS_TYPE, _END_STREAM, _END_HEADERS = 0x1, 0x1, 0x4


def _hpack_int(value: int, prefix: int, flags: int) -> bytes:
    """An HPACK integer (RFC 7541 §5.1) with a `prefix`-bit prefix, `flags` in the first byte's other bits."""
    top = (1 << prefix) - 1
    if value < top:
        return bytes((flags | value,))
    out = bytearray((flags | top,))
    value -= top
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


_STATIC_TABLE: tuple[tuple[bytes, bytes], ...] = HeaderTable.STATIC_TABLE
_STATIC_LENGTH = len(_STATIC_TABLE)
_STATIC_HEADERS = tuple(HeaderTuple(n, v) for n, v in _STATIC_TABLE)  # as hpack decodes them (immutable: shared)
_STATIC_FIELD: dict[tuple[bytes, bytes], bytes] = {}  # (name, value) of the static table -> its indexed field
_NAME_PLAIN: dict[bytes, bytes] = {}  # a static-table name -> "literal without indexing" with that name's index
_NAME_NEVER: dict[bytes, bytes] = {}  # ... "literal never indexed"
for _i, (_n, _v) in enumerate(_STATIC_TABLE, 1):
    _STATIC_FIELD.setdefault((_n, _v), _hpack_int(_i, 7, 0x80))
    _NAME_PLAIN.setdefault(_n, _hpack_int(_i, 4, 0x00))
    _NAME_NEVER.setdefault(_n, _hpack_int(_i, 4, 0x10))
# As h2's outbound normalization marks them (it is off: the headers sent are built here): fields an attacker who
# sees the compressed size could guess byte by byte, never to be indexed by an intermediary either.
_SENSITIVE = frozenset({b"authorization", b"proxy-authorization"})


class _Encoder(hpack.Encoder):
    """HPACK without the dynamic table: a field of the static table as its index, any other as a literal
    without indexing (RFC 7541 §6.2.2; never indexed for credentials), no Huffman. hpack searches its dynamic
    table field by field (in Python) and inserts every new value; a waypoint's answers and forwarded requests
    vary (content-length, date, ids), so the table bought few bytes for that CPU. A peer's change of
    SETTINGS_HEADER_TABLE_SIZE must be signalled in the next block: hpack's own encoder does that block."""

    def encode(
        self,
        headers: Iterable[HeaderTuple | tuple[bytes | str, bytes | str] | tuple[bytes | str, bytes | str, bool | None]]
        | dict[bytes | str, bytes | str],
        huffman: bool = False,
    ) -> bytes:
        if self.header_table.resized or not isinstance(headers, (list, tuple)):
            return super().encode(headers, huffman=False)
        parts: list[bytes] = []
        for header in headers:
            name, value = header[0], header[1]
            if type(name) is not bytes or type(value) is not bytes:
                return super().encode(headers, huffman=False)
            field = _STATIC_FIELD.get((name, value))
            if field is not None:
                parts.append(field)
                continue
            never = (
                name in _SENSITIVE
                or (name == b"cookie" and len(value) < 20)
                or (isinstance(header, HeaderTuple) and not header.indexable)
                or (len(header) > 2 and bool(header[2]))
            )
            prefix = (_NAME_NEVER if never else _NAME_PLAIN).get(name)
            if prefix is None:
                parts.append(b"\x10" if never else b"\x00")
                parts.append(_hpack_int(len(name), 7, 0))
                parts.append(name)
            else:
                parts.append(prefix)
            size = len(value)
            parts.append(bytes((size,)) if size < 0x7F else _hpack_int(size, 7, 0))
            parts.append(value)
        return b"".join(parts)


_ONE_BYTE_INDEXED = bytes(range(0x81, 0xFF))  # indexed fields whose index (1..126) fits their first byte


class _Decoder(hpack.Decoder):
    """hpack's decoder, with a short way for a block made only of one-byte indexed fields (a client repeating
    a request: every field from the tables), which changes no table: hpack spends a few Python calls per field
    on it (integer decoding, two debug-log calls). Anything else, and any error, is hpack's."""

    def decode(self, data: bytes, raw: bool = False) -> list[HeaderTuple]:
        if not raw or type(data) is not bytes or data.translate(None, _ONE_BYTE_INDEXED):
            return cast("list[HeaderTuple]", super().decode(data, raw))
        dynamic = self.header_table.dynamic_entries
        limit = self.max_header_list_size
        headers: list[HeaderTuple] = []
        size = 0
        for byte in data:
            index = byte - 0x81
            if index < _STATIC_LENGTH:
                header = _STATIC_HEADERS[index]
            elif index - _STATIC_LENGTH < len(dynamic):
                header = tuple.__new__(HeaderTuple, dynamic[index - _STATIC_LENGTH])
            else:  # no such entry: hpack's error
                return cast("list[HeaderTuple]", super().decode(data, raw))
            size += 32 + len(header[0]) + len(header[1])
            if size > limit:  # hpack's OversizedHeaderListError (the block changes no state: decoding it again is safe)
                return cast("list[HeaderTuple]", super().decode(data, raw))
            headers.append(header)
        self._assert_valid_table_size()
        return headers


_REQUEST, _RESPONSE, _TRAILERS = 0, 1, 2  # the kinds of header block check_received tells apart
_NAME_CHARS = bytes(c for c in range(0x21, 0x7F) if not 0x41 <= c <= 0x5A)  # RFC 9113 §8.2.1 (no upper case)
_VALUE_BAD = re.compile(rb"[\0\r\n]|^[ \t]|[ \t]\Z")
_PSEUDO_FIELDS = frozenset({b":method", b":scheme", b":authority", b":path", b":status", b":protocol"})
_REQUEST_ONLY = frozenset({b":scheme", b":path", b":authority", b":method", b":protocol"})


def check_received(headers: Sequence[tuple[bytes, bytes]], kind: int) -> None:
    """Refuse (ProtocolError: the connection's end) a received header block that h2's inbound validation
    (h2.utilities.validate_headers) refuses, and only those: RFC 9113 §8.2.1 name and value characters, no
    empty name, TE only "trailers", no connection-specific field, pseudo-headers known, once each, before the
    regular fields and as the block's kind requires them (§8.3), :authority and Host agreeing, a non-empty
    :path. One pass with C-level byte checks; h2 runs eight chained generators and loops over every byte in
    Python. tests/unit/test_waypoint_http2 holds the two to the same verdicts."""
    pseudo: set[bytes] = set()
    regular = False
    request = kind == _REQUEST
    method: bytes | None = None
    authority: bytes | None = None
    host: bytes | None = None
    for name, value in headers:
        if name.translate(None, _NAME_CHARS) or name.find(b":", 1) != -1:
            raise ProtocolError(f"Illegal character in header name: {name!r}")
        if value and _VALUE_BAD.search(value) is not None:
            raise ProtocolError(f"Illegal character or surrounding whitespace in header value: {value!r}")
        if not name:
            raise ProtocolError("Received header name with zero length.")
        if name[0] == 0x3A:
            if name in pseudo:
                raise ProtocolError(f"Received duplicate pseudo-header field {name!r}")
            pseudo.add(name)
            if regular:
                raise ProtocolError(f"Received pseudo-header field out of sequence: {name!r}")
            if name not in _PSEUDO_FIELDS:
                raise ProtocolError(f"Received custom pseudo-header field {name!r}")
            if name == b":method":
                method = value
            elif request and name == b":authority":
                authority = value
            elif request and name == b":path" and not value:
                raise ProtocolError("An empty :path header is forbidden")
            continue
        regular = True
        if name == b"te" and value.lower() != b"trailers":
            raise ProtocolError(f"Invalid value for TE header: {value!r}")
        if name in CONNECTION_HEADERS:
            raise ProtocolError(f"Connection-specific header field present: {name!r}.")
        if request and name == b"host":
            if host is not None:
                raise ProtocolError("Request header block has multiple Host headers.")
            host = value
    if kind == _TRAILERS:
        if pseudo:
            raise ProtocolError(f"Received pseudo-header in trailer {pseudo}")
        return
    if kind == _RESPONSE:
        if b":status" not in pseudo or pseudo & _REQUEST_ONLY:
            raise ProtocolError(f"Response pseudo-headers {sorted(pseudo)}: need :status and no request's")
        return
    if b":method" not in pseudo:
        raise ProtocolError("Header block missing mandatory b':method' header")
    connect = method == b"CONNECT"
    if connect and b":protocol" not in pseudo:  # ordinary CONNECT (RFC 9113 §8.5)
        if b":scheme" in pseudo or b":path" in pseudo:
            raise ProtocolError("Ordinary CONNECT MUST NOT include :scheme or :path")
    elif b":scheme" not in pseudo or b":path" not in pseudo:
        raise ProtocolError("Header block missing mandatory :scheme or :path header")
    if b":status" in pseudo or (not connect and b":protocol" in pseudo):
        raise ProtocolError(f"Request pseudo-headers {sorted(pseudo)}: a response's or :protocol without CONNECT")
    if authority is None and host is None:
        raise ProtocolError("Request header block does not have an :authority or Host header.")
    if authority is not None and host is not None and authority != host:
        raise ProtocolError(f"Request header block has mismatched :authority and Host: {authority!r} / {host!r}")


def _b(value: bytes | str) -> bytes:
    return value if isinstance(value, bytes) else value.encode("latin-1")


_CONNECT = b"CONNECT"
_PSEUDO_VALUE_BAD = re.compile(rb"[\x00-\x20\x7f]")  # in an HTTP/1.1 upstream's request line or Host
_FIELD_VALUE_CTL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")  # RFC 9110 §5.5: no CTL but HTAB
_TOKEN_CHARS = b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"  # RFC 9110 tchar
_METHOD_CHARS = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_"


def request_head(
    headers: Iterable[tuple[bytes, bytes]],
    normalization: str = "MERGE_SLASHES",
    underscores: str = "ALLOW",
) -> RequestHead | tuple[int, str]:
    """A received HEADERS block as the head the policy decides on, or (status, why) to refuse the stream.

    check_received has already refused the block (the connection) for what RFC 9113 forbids (§8.2.1: CR, LF,
    NUL in any value, upper case in names; §8.3.1: pseudo-headers present once, before regular fields, no
    connection-specific fields); what is left is ours: an origin-form :path, normalized as an HTTP/1.1 target
    is (http1.request_target: the path the policy sees is the one the app gets), no CONNECT (no tunnels inside
    h2c), an upper-case :method, no space or control in pseudo-headers (they become an HTTP/1.1 request line),
    field names that are tokens and values without controls (RFC 9110 §5.1, §5.5: what an HTTP/1.1 upstream
    may be sent; nghttp2, so Envoy, refuses them too, RFC 9113 lets h2 through), a numeric content-length; a
    field name with `_` as `underscores` says (http1.Limits). A client's x-forwarded-client-cert (any spelling,
    http1.SANITIZED_HEADERS) is left out: neither the policy nor ext-authz decides on it, as for HTTP/1.1."""
    method = target = authority = b""
    host: bytes | None = None
    length: int | None = None
    fields: list[tuple[bytes, bytes]] = []
    drop = underscores != "ALLOW"
    for name, value in headers:
        if name.startswith(b":"):
            if _PSEUDO_VALUE_BAD.search(value) is not None:
                return 400, f"{name.decode('latin-1')} holds a space or a control character"
            if name == b":method":
                method = value
            elif name == b":path":
                target = value
            elif name == b":authority":
                authority = value
            continue
        underscore = b"_" in name
        if drop and underscore:
            if underscores == "REJECT_REQUEST":
                return 400, f"header {name.decode('latin-1')!r} has an underscore in its name"
            continue  # DROP_HEADER
        if name.translate(None, _TOKEN_CHARS):
            return 400, f"header name {name.decode('latin-1')!r} is not a token"
        if _FIELD_VALUE_CTL.search(value) is not None:
            return 400, f"a field value of {name.decode('latin-1')} holds a control character"
        # As Envoy's SANITIZE, before any filter (RBAC, ext-authz) sees the request; the `_` spelling too, which a
        # CGI-style app reads as the same field (h2 names are lower case: check_received).
        if (fold_name(name) if underscore else name) in SANITIZED_HEADERS:
            continue
        if name == b"host":
            host = value
        elif name == b"content-length":
            if not value.isdigit():
                return 400, "content-length is not a number"
            if length is not None and int(value) != length:
                return 400, "conflicting content-length fields"
            length = int(value)
        fields.append((name, value))
    if method == _CONNECT:
        return 501, "CONNECT is not served inside HTTP/2"
    if not method or method.strip(_METHOD_CHARS):  # Istio refuses a method not in upper case (400)
        return 400, "the :method must be an upper-case token"
    try:
        target, path = request_target(target, method, normalization)
    except BadTarget as e:
        return 400, str(e)
    return RequestHead(
        method=method,
        target=target,
        path=path,
        host=authority or host or b"",
        headers=tuple(fields),
        version=b"2",
        content_length=length,
        chunked=False,
        keep_alive=True,
        upgrade=None,
        expect_continue=False,
    )


def is_grpc(head: RequestHead) -> bool:
    ct = head.header(b"content-type")
    return ct is not None and ct.startswith(b"application/grpc")


__all__ = [
    "H2C_PREFACE_LINE",
    "HOP_BY_HOP",
    "BadRequest",
    "Closed",
    "Data",
    "Ended",
    "Event",
    "H2Conn",
    "H2Limits",
    "RequestStarted",
    "Reset",
    "ResponseStarted",
    "Trailers",
    "WindowOpened",
    "check_received",
    "is_grpc",
    "request_head",
]
