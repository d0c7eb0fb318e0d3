"""Copy bytes both ways between two ByteStreams, with half-close and backpressure.

Each direction ends with `write_eof` on the other side, so an app's `shutdown(SHUT_WR)` reaches the peer
as EOF while the opposite direction keeps flowing. A write waits for the receiver (flow control), so a
slow reader slows the sender instead of growing a buffer. Byte counts are kept per connection and read
once at the end: no per-chunk metrics or logging.

When both streams speak the push interface (TCP and HBONE streams do), the relay is a pair of callbacks
(`_Splice`): a chunk goes from the transport callback that received it straight into the other stream's
write, and the relaying task only waits for the end. Otherwise two read/write loops (`_pump`) do it.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import cast

from ztunnel.net.streams import READ_CHUNK, ByteStream, PushStream


@dataclass(slots=True)
class RelayCounters:
    """Bytes moved so far; `a_to_b` is what the first stream sent."""

    a_to_b: int = 0
    b_to_a: int = 0
    error: str | None = None


async def _pump(src: ByteStream, dst: ByteStream, counters: RelayCounters, forward: bool) -> None:
    read = src.read
    write = dst.write
    total = 0
    try:
        while True:
            data = await read(READ_CHUNK)
            if not data:
                break
            await write(data)
            total += len(data)
            if forward:
                counters.a_to_b = total
            else:
                counters.b_to_a = total
        await dst.write_eof()
    finally:
        if forward:
            counters.a_to_b = total
        else:
            counters.b_to_a = total


class _Direction:
    """One direction of a spliced relay: the push target of `src`, writing into `dst`."""

    __slots__ = ("_counters", "_forward", "_splice", "dst", "ended", "eof_sent", "src", "total")

    def __init__(self, splice: _Splice, src: PushStream, dst: PushStream, forward: bool) -> None:
        self._splice = splice
        self._counters = splice.counters
        self._forward = forward
        self.src = src
        self.dst = dst
        self.total = 0
        self.ended = False  # the source reached EOF
        self.eof_sent = False  # ... and the EOF reached the sink, after every byte queued before it

    def data(self, chunk: bytes) -> None:
        if self.ended or self._splice.finished:
            return
        try:
            room = self.dst.push(chunk)
        except Exception as e:  # the other side is gone (StreamClosed) or broke: end the whole relay
            self._splice.fail(e)
            return
        self.total += len(chunk)  # counted once the sink took it (written, or queued behind flow control)
        if self._forward:
            self._counters.a_to_b = self.total
        else:
            self._counters.b_to_a = self.total
        if not room:
            try:
                self.src.pause_pushing()
                self.dst.notify_drained(self)
            except Exception as e:
                self._splice.fail(e)

    def drained(self) -> None:
        if self._splice.finished:
            return
        try:
            # Resume even a source at EOF: it has nothing left to push, but an HBONE source holds the flow
            # credit of the chunk that filled the sink until it resumes (held until the relay ended, it
            # shrank the shared connection window for as long as the other direction stayed open).
            self.src.resume_pushing()
            if self.ended and not self._splice.finished:  # the EOF that waited for queued data has gone out
                self.eof_sent = True
                self._splice.direction_ended()
        except Exception as e:  # never into the transport or HTTP/2 callback that called us
            self._splice.fail(e)

    def eof(self) -> None:
        if self.ended or self._splice.finished:
            return
        self.ended = True
        try:
            if self.dst.push_eof():
                self.eof_sent = True
                self._splice.direction_ended()
            else:
                self.dst.notify_drained(self)
        except Exception as e:
            self._splice.fail(e)

    def error(self, exc: BaseException) -> None:
        self._splice.fail(exc)


class _Splice:
    """Both directions of a relay as callbacks; `done` resolves when both ended or one failed."""

    __slots__ = ("a", "b", "backward", "counters", "done", "finished", "forward")

    def __init__(self, a: PushStream, b: PushStream, counters: RelayCounters) -> None:
        self.a = a
        self.b = b
        self.counters = counters
        self.finished = False
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.forward = _Direction(self, a, b, True)
        self.backward = _Direction(self, b, a, False)

    def start(self) -> None:
        self.a.start_pushing(self.forward)
        if not self.finished:
            self.b.start_pushing(self.backward)

    def direction_ended(self) -> None:
        if self.forward.eof_sent and self.backward.eof_sent and not self.finished:
            self._finish(abort=False)

    def fail(self, exc: BaseException) -> None:
        if self.finished:
            return
        if self.counters.error is None:
            self.counters.error = str(exc) or type(exc).__name__
        self._finish(abort=True)

    def _finish(self, *, abort: bool) -> None:
        self.finished = True
        try:
            self.a.stop_pushing()
            self.b.stop_pushing()
            if abort:
                self.a.abort()
                self.b.abort()
            else:
                self.a.close()
                self.b.close()
        except Exception as e:  # called from transport and HTTP/2 callbacks: record, never raise into them
            self.counters.error = self.counters.error or f"closing the relay failed: {e!r}"
        finally:
            if not self.done.done():
                self.done.set_result(None)


async def _splice(a: PushStream, b: PushStream, counters: RelayCounters) -> RelayCounters:
    splice = _Splice(a, b, counters)
    splice.start()
    try:
        await splice.done
    except asyncio.CancelledError:
        if not splice.finished:
            splice._finish(abort=True)
        raise
    return counters


async def relay(a: ByteStream, b: ByteStream, counters: RelayCounters | None = None) -> RelayCounters:
    """Relay until both directions reach EOF or one fails; closes (or, on error, aborts) both streams.

    Push streams are spliced with callbacks (no task at all). Otherwise one extra task per connection:
    b -> a runs in the caller's task. A failure of a -> b aborts both streams at once (from its
    done-callback), which ends a b -> a blocked in read or write.
    """
    counters = counters if counters is not None else RelayCounters()
    if hasattr(a, "start_pushing") and hasattr(b, "start_pushing"):
        return await _splice(cast(PushStream, a), cast(PushStream, b), counters)
    aborted = False

    def abort_both() -> None:
        nonlocal aborted
        if not aborted:
            aborted = True
            a.abort()
            b.abort()

    def on_forward_done(task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            if counters.error is None:
                exc = task.exception()
                counters.error = str(exc) or type(exc).__name__
            abort_both()

    forward = asyncio.get_running_loop().create_task(_pump(a, b, counters, True))
    forward.add_done_callback(on_forward_done)
    try:
        await _pump(b, a, counters, False)
    except asyncio.CancelledError:
        forward.cancel()
        abort_both()
        await asyncio.gather(forward, return_exceptions=True)
        raise
    except Exception as e:
        if counters.error is None:
            counters.error = str(e) or type(e).__name__
        forward.cancel()
        abort_both()
        await asyncio.gather(forward, return_exceptions=True)
        return counters
    try:
        await forward
    except asyncio.CancelledError:
        forward.cancel()
        abort_both()
        await asyncio.gather(forward, return_exceptions=True)
        raise
    except Exception:
        return counters  # on_forward_done recorded the error and aborted both
    if not aborted:
        a.close()
        b.close()
    return counters
