"""hbone.client.Deadline keeps asyncio.timeout's contract (it replaces it on the per-connection paths)."""

from __future__ import annotations

import asyncio

import pytest

from ztunnel.hbone.client import Deadline


async def test_a_block_past_its_deadline_raises_timeout_error() -> None:
    loop = asyncio.get_running_loop()
    with pytest.raises(TimeoutError):
        async with Deadline.after(loop, 0.01):
            await asyncio.sleep(10)
    assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]


async def test_a_block_within_its_deadline_is_untouched_and_its_timer_is_gone() -> None:
    loop = asyncio.get_running_loop()
    async with Deadline.after(loop, 10):
        await asyncio.sleep(0)
    await asyncio.sleep(0.02)  # nothing fires later
    async with Deadline(loop, loop.time() + 0.02):
        pass
    await asyncio.sleep(0.05)


async def test_a_cancel_from_outside_stays_a_cancel() -> None:
    loop = asyncio.get_running_loop()
    entered = asyncio.Event()

    async def waiter() -> None:
        async with Deadline.after(loop, 10):
            entered.set()
            await asyncio.sleep(10)

    task = asyncio.ensure_future(waiter())
    await entered.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_nested_deadlines_the_outer_one_expiring_raises_from_the_outer_block() -> None:
    loop = asyncio.get_running_loop()
    inner_timed_out = False
    with pytest.raises(TimeoutError):
        async with Deadline.after(loop, 0.01):
            try:
                async with Deadline.after(loop, 10):
                    await asyncio.sleep(10)
            except TimeoutError:
                inner_timed_out = True
    assert not inner_timed_out  # the inner block saw a cancel, not its own timeout


async def test_a_deadline_already_past_fires_at_the_next_await() -> None:
    loop = asyncio.get_running_loop()
    with pytest.raises(TimeoutError):
        async with Deadline(loop, loop.time() - 1):
            await asyncio.sleep(1)
