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
    """Relay until both directions reach EOF or one fails; closes (or, on error, aborts) both streams."""
    counters = counters if counters is not None else RelayCounters()
    loop = asyncio.get_running_loop()
    forward = loop.create_task(_pump(a, b, counters, True))
    backward = loop.create_task(_pump(b, a, counters, False))
    try:
        done, pending = await asyncio.wait([forward, backward], return_when=asyncio.FIRST_EXCEPTION)
        failed = [t for t in done if not t.cancelled() and t.exception() is not None]
        if failed:
            counters.error = str(failed[0].exception()) or type(failed[0].exception()).__name__
            for t in pending:
                t.cancel()
            a.abort()
            b.abort()
            await asyncio.gather(*pending, return_exceptions=True)
        else:
            a.close()
            b.close()
    except asyncio.CancelledError:
        forward.cancel()
        backward.cancel()
        a.abort()
        b.abort()
        await asyncio.gather(forward, backward, return_exceptions=True)
        raise
    return counters
