"""The relay over in-memory streams: both directions, half-close, backpressure, failure handling."""

from __future__ import annotations

import asyncio
import collections

import pytest

from ztunnel.net.streams import StreamClosed
from ztunnel.proxy.relay import RelayCounters, relay


class Pipe:
    """One direction of bytes with a bounded buffer: write waits while `limit` bytes are unread."""

    def __init__(self, limit: int = 64 * 1024) -> None:
        self.chunks: collections.deque[bytes] = collections.deque()
        self.size = 0
        self.limit = limit
        self.eof = False
        self.broken = False
        self.changed = asyncio.Condition()

    async def put(self, data: bytes) -> None:
        async with self.changed:
            await self.changed.wait_for(lambda: self.size < self.limit or self.broken)
            if self.broken or self.eof:
                raise StreamClosed("pipe closed")
            self.chunks.append(bytes(data))
            self.size += len(data)
            self.changed.notify_all()

    async def get(self, n: int) -> bytes:
        async with self.changed:
            await self.changed.wait_for(lambda: self.chunks or self.eof or self.broken)
            if self.broken:
                raise StreamClosed("reset")
            if not self.chunks:
                return b""
            data = self.chunks.popleft()
            if len(data) > n:
                self.chunks.appendleft(data[n:])
                data = data[:n]
            self.size -= len(data)
            self.changed.notify_all()
            return data

    async def close(self, broken: bool = False) -> None:
        async with self.changed:
            self.eof = True
            self.broken = self.broken or broken
            self.changed.notify_all()


class End:
    """A ByteStream end: reads from `inbox`, writes to `outbox`."""

    def __init__(self, inbox: Pipe, outbox: Pipe) -> None:
        self.inbox, self.outbox = inbox, outbox
        self.closed = self.aborted = False

    async def read(self, n: int = 65536) -> bytes:
        return await self.inbox.get(n)

    async def write(self, data: bytes | memoryview) -> None:
        await self.outbox.put(bytes(data))

    async def write_eof(self) -> None:
        await self.outbox.close()

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = True
        for p in (self.inbox, self.outbox):
            p.broken = True
            asyncio.get_running_loop().create_task(p.close(broken=True))


def connection(limit: int = 64 * 1024) -> tuple[End, End]:
    """Two ends of one connection: what one writes the other reads."""
    a_to_b, b_to_a = Pipe(limit), Pipe(limit)
    return End(b_to_a, a_to_b), End(a_to_b, b_to_a)


async def test_both_directions_and_half_close() -> None:
    client, proxy_down = connection()
    proxy_up, app = connection()
    task = asyncio.create_task(relay(proxy_down, proxy_up))
    await client.write(b"request")
    await client.write_eof()
    assert await app.read() == b"request"
    assert await app.read() == b""  # the half-close went through
    await app.write(b"response after the client's EOF")
    await app.write_eof()
    assert await client.read() == b"response after the client's EOF"
    assert await client.read() == b""
    counters = await task
    assert (counters.a_to_b, counters.b_to_a) == (7, 31)
    assert proxy_down.closed and proxy_up.closed and counters.error is None


async def test_a_slow_reader_blocks_the_sender_instead_of_buffering() -> None:
    client, proxy_down = connection(limit=16 * 1024)
    proxy_up, app = connection(limit=16 * 1024)
    counters = RelayCounters()
    task = asyncio.create_task(relay(proxy_down, proxy_up, counters))
    sender = asyncio.create_task(client.write(b"x" * 8192))
    total = 0
    for _ in range(20):  # write far more than all buffers together hold, without reading
        await sender
        total += 8192
        sender = asyncio.create_task(client.write(b"x" * 8192))
        await asyncio.sleep(0)
        if not sender.done():
            await asyncio.sleep(0.01)
            if not sender.done():
                break
    assert not sender.done(), "the sender must block once the pipes are full"
    assert total <= 4 * 16 * 1024 + 8192
    got = 0
    while got < total:
        got += len(await app.read())
    await sender
    await client.write_eof()
    await app.write_eof()
    while await app.read():
        pass
    assert await client.read() == b""
    await task


async def test_an_error_in_one_direction_aborts_both_streams() -> None:
    client, proxy_down = connection()
    proxy_up, app = connection()
    task = asyncio.create_task(relay(proxy_down, proxy_up))
    await client.write(b"data")
    assert await app.read() == b"data"
    app.abort()  # the upstream resets
    counters = await asyncio.wait_for(task, 5)
    assert counters.error
    assert proxy_down.aborted and proxy_up.aborted


async def test_cancelling_the_relay_aborts_both_streams() -> None:
    _client, proxy_down = connection()
    proxy_up, _app = connection()
    task = asyncio.create_task(relay(proxy_down, proxy_up))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert proxy_down.aborted and proxy_up.aborted
