"""The shared test kit's own contract: a wait that times out says what it waited for and what it saw."""

from __future__ import annotations

import os
import shutil

import pytest

from tests.support.clock import FakeClock
from tests.support.eventually import eventually, eventually_async
from tests.support.nodeagent import pod_namespaces, sh


def test_eventually_returns_the_first_truthy_value() -> None:
    seen = iter([0, None, "", "done"])
    assert eventually(lambda: next(seen), 5, 0, what="the fourth poll") == "done"


def test_eventually_names_what_it_waited_for_and_the_last_assert() -> None:
    def check() -> bool:
        assert 1 + 1 == 3, "arithmetic is off"
        return True

    with pytest.raises(AssertionError, match=r"timed out after 0.05s waiting for the sum: arithmetic is off"):
        eventually(check, 0.05, 0.01, what="the sum")


async def test_eventually_async_awaits_a_coroutine_check_and_reports_the_last_value() -> None:
    async def never() -> int:
        return 0

    with pytest.raises(AssertionError, match=r"waiting for a count \(last value 0\)"):
        await eventually_async(never, 0.05, 0.01, what="a count")


def test_the_fake_clock_moves_only_forward_and_only_when_told() -> None:
    clock = FakeClock(10.0)
    assert clock() == clock.now() == 10.0
    assert clock.advance(2.5) == 12.5
    with pytest.raises(ValueError, match="does not go back"):
        clock.advance(-1)


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ip") is None, reason="needs root and iproute2 (netns)")
def test_pod_namespaces_removes_every_namespace_even_if_the_caller_changes_the_dict() -> None:
    """A fixture that popped a name from the dict it got left that netns behind (before)."""
    with pod_namespaces(["n1", "web"]) as made:
        prefix = made.pop("n1").removesuffix("-n1")
    left = [line.split()[0] for line in sh("ip", "netns", "list").splitlines() if line.strip()]
    assert [name for name in left if name.startswith(prefix)] == []
