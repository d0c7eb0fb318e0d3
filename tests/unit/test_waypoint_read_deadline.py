"""The HTTP/1.1 client connection's read deadline: one loop timer for a connection's reads (server._ReadDeadline)."""

from __future__ import annotations

import asyncio

import pytest

from ztunnel.waypoint.server import _ReadDeadline


async def _never() -> bytes:
    await asyncio.Event().wait()
    return b""


async def _soon(data: bytes, delay: float) -> bytes:
    await asyncio.sleep(delay)
    return data


async def test_read_times_out_after_its_delay_even_when_the_timer_was_armed_later() -> None:
    loop = asyncio.get_running_loop()
    reads = _ReadDeadline()
    assert await reads.read(lambda: _soon(b"a", 0.01), 30.0) == b"a"  # arms the timer 30 s out
    started = loop.time()
    with pytest.raises(TimeoutError):
        await reads.read(_never, 0.05)  # an earlier deadline re-arms it
    assert 0.04 <= loop.time() - started < 1.0
    reads.close()


async def test_a_later_deadline_keeps_the_timer_and_is_kept_when_it_fires_early() -> None:
    loop = asyncio.get_running_loop()
    reads = _ReadDeadline()
    assert await reads.read(lambda: _soon(b"a", 0.0), 0.05) == b"a"
    started = loop.time()
    with pytest.raises(TimeoutError):
        await reads.read(_never, 0.15)  # the 0.05 s timer fires first and re-arms for this deadline
    assert 0.14 <= loop.time() - started < 1.0
    reads.close()


async def test_a_cancellation_from_elsewhere_stays_a_cancellation() -> None:
    async def reader() -> bytes:
        return await _ReadDeadline().read(_never, 30.0)

    task = asyncio.create_task(reader())
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert task.cancelled()


async def test_data_in_time_is_returned_and_no_timeout_follows() -> None:
    reads = _ReadDeadline()
    assert await reads.read(lambda: _soon(b"x", 0.01), 0.05) == b"x"
    await asyncio.sleep(0.1)  # the timer fires with no read waiting: nothing is cancelled
    assert await reads.read(lambda: _soon(b"y", 0.0), 0.05) == b"y"
    reads.close()
