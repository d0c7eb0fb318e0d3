"""net.deadline.Deadline keeps asyncio.timeout's contract (it replaces it on the per-connection paths)."""

from __future__ import annotations

import asyncio

import pytest

from ztunnel.net.deadline import Deadline


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


async def test_deadlines_sharing_the_loop_timer_each_fire_for_their_own_block_only() -> None:
    """Deadlines armed in any order fire no earlier than their time, late by at most the resolution (plus the
    loop's latency); one left in time is disarmed and never cancels its task afterwards."""
    loop = asyncio.get_running_loop()
    fired: dict[str, float] = {}

    async def waits(name: str, delay: float) -> None:
        started = loop.time()
        try:
            async with Deadline.after(loop, delay):
                await asyncio.sleep(10)
        except TimeoutError:
            fired[name] = loop.time() - started

    async def leaves_in_time() -> str:
        async with Deadline.after(loop, 0.03):
            await asyncio.sleep(0)
        await asyncio.sleep(0.15)  # well past the deadline it left: not cancelled
        return "done"

    results = await asyncio.gather(
        waits("late", 0.09), waits("early", 0.03), leaves_in_time(), waits("middle", 0.06), waits("now", 0)
    )
    assert results[2] == "done"
    assert sorted(fired, key=fired.__getitem__) == ["now", "early", "middle", "late"]
    for name, delay in (("early", 0.03), ("middle", 0.06), ("late", 0.09)):
        assert delay <= fired[name] < delay + 0.1, (name, fired[name])


async def test_a_deadline_fires_again_after_the_loop_timer_went_idle() -> None:
    loop = asyncio.get_running_loop()
    for _ in range(2):  # the second one arms the shared timer anew after the first emptied it
        with pytest.raises(TimeoutError):
            async with Deadline.after(loop, 0.01):
                await asyncio.sleep(10)
        await asyncio.sleep(0.03)
