"""Conformance checks any byte stream of the project must pass (TCP, HBONE client and server ends, and a
relay between them): half-close both ways, a reset that is not a clean EOF, backpressure that bounds memory."""

from __future__ import annotations

import asyncio

import pytest

from ztunnel.net.streams import ByteStream, StreamClosed

STALL_CHECKS = 8  # consecutive checks without growth before the writer counts as stalled
STALL_CHECK_INTERVAL = 0.05
BLOCK = 1 << 20


async def check_half_close(a: ByteStream, b: ByteStream) -> None:
    """a half-closes; b sees EOF and can still answer; then b half-closes too."""
    await a.write(b"request")
    await a.write_eof()
    got = b""
    while chunk := await b.read():
        got += chunk
    assert got == b"request"
    await b.write(b"answer after EOF")
    await b.write_eof()
    got = b""
    while chunk := await a.read():
        got += chunk
    assert got == b"answer after EOF"


async def check_reset(a: ByteStream, b: ByteStream) -> None:
    """An abort on one side is an error on the other, not a clean EOF."""
    await a.write(b"x")
    assert await b.read() == b"x"
    a.abort()
    with pytest.raises((StreamClosed, ConnectionError)):
        for _ in range(100):
            if not await b.read():
                raise AssertionError("a reset was reported as a clean EOF")


class Filler:
    """Writes 1 MiB blocks to a stream until stopped, counting what the stream took."""

    def __init__(self, stream: ByteStream) -> None:
        self.written = 0
        self.task = asyncio.create_task(self._write_forever(stream))

    async def _write_forever(self, stream: ByteStream) -> None:
        block = b"z" * BLOCK
        while True:
            await stream.write(block)
            self.written += len(block)

    async def until_stalled(self, limit: int | None = None) -> int:
        """Wait (with a deadline) until the amount written stops growing over several consecutive checks,
        asserting on the way that it stays within `limit`: no timing guess about when a slow machine has
        filled the buffers."""
        deadline = asyncio.get_running_loop().time() + 20
        last, steady = -1, 0
        while steady < STALL_CHECKS:
            assert limit is None or self.written <= limit, f"{self.written} bytes written, over the bound {limit}"
            assert asyncio.get_running_loop().time() < deadline, f"the writer never stalled ({self.written} bytes)"
            await asyncio.sleep(STALL_CHECK_INTERVAL)
            steady = steady + 1 if self.written == last else 0
            last = self.written
        return self.written

    async def stop(self) -> None:
        self.task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await self.task


async def check_backpressure(a: ByteStream, b: ByteStream, limit: int) -> None:
    """With nobody reading b, writes to a stall instead of buffering without bound."""
    filler = Filler(a)
    try:
        written = await filler.until_stalled(limit)
        assert 0 < written <= limit, written
    finally:
        await filler.stop()
