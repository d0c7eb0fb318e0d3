"""Copy bytes both ways between two ByteStreams, with half-close and backpressure.

Each direction ends with `write_eof` on the other side, so an app's `shutdown(SHUT_WR)` reaches the peer
as EOF while the opposite direction keeps flowing. A write waits for the receiver (flow control), so a
slow reader slows the sender instead of growing a buffer. Byte counts are kept per connection and read
once at the end: no per-chunk metrics or logging.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from ztunnel.hbone.streams import READ_CHUNK, ByteStream


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


async def relay(a: ByteStream, b: ByteStream, counters: RelayCounters | None = None) -> RelayCounters:
    """Relay until both directions reach EOF or one fails; closes (or, on error, aborts) both streams.

    One extra task per connection: b -> a runs in the caller's task. A failure of a -> b aborts both
    streams at once (from its done-callback), which ends a b -> a blocked in read or write.
    """
    counters = counters if counters is not None else RelayCounters()
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
