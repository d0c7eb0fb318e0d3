"""The keepalive decision on a fake clock: when a PING goes out and when a silent peer is declared gone."""

from __future__ import annotations

import pytest

from tests.support.clock import FakeClock
from ztunnel.hbone.budgets import PeerTooCostly, StreamBudget
from ztunnel.hbone.keepalive import Keepalive


def test_a_ping_goes_out_per_tick_until_answered() -> None:
    clock = FakeClock()
    keepalive = Keepalive(interval=10, timeout=20, now=clock.now)
    assert keepalive.enabled and keepalive.period == 10
    ping = keepalive.tick()
    assert ping is not None and len(ping) == 8
    clock.advance(10)
    assert keepalive.tick() is None  # still unanswered: no second PING
    keepalive.acknowledged(b"12345678")  # an ACK of some other PING changes nothing
    assert keepalive.tick() is None
    keepalive.acknowledged(ping)
    again = keepalive.tick()
    assert again is not None and again != ping


def test_an_unanswered_ping_with_no_traffic_expires_after_the_timeout() -> None:
    clock = FakeClock()
    keepalive = Keepalive(interval=10, timeout=20, now=clock.now)
    assert not keepalive.expired()  # no PING out yet: nothing to time out
    clock.advance(10)
    assert keepalive.tick() is not None
    clock.advance(19.9)
    assert not keepalive.expired()
    clock.advance(0.1)
    assert keepalive.expired()


def test_traffic_keeps_a_connection_alive_while_its_ping_is_unanswered() -> None:
    """A peer busy sending bulk data may answer the PING late: what it sends counts as alive."""
    clock = FakeClock()
    keepalive = Keepalive(interval=10, timeout=20, now=clock.now)
    assert keepalive.tick() is not None
    clock.advance(15)
    keepalive.last_received = clock.now()
    clock.advance(15)  # 30 s since the PING, 15 s since the last read
    assert not keepalive.expired()
    clock.advance(5)
    assert keepalive.expired()


def test_keepalive_off_and_a_short_timeout() -> None:
    clock = FakeClock()
    assert not Keepalive(interval=0, timeout=20, now=clock.now).enabled
    assert Keepalive(interval=10, timeout=6, now=clock.now).period == 3  # ticks often enough to see 6 s pass


def test_the_stream_budget_counts_per_second_and_ignores_aborts() -> None:
    clock = FakeClock()
    answered = {5}
    budget = StreamBudget(open_limit=3, reset_limit=2, is_abort=answered.__contains__, now=clock.now)
    for _ in range(3):
        budget.opened()
    with pytest.raises(PeerTooCostly):
        budget.opened()
    clock.advance(1)
    budget.opened()  # a new second
    for _ in range(10):
        budget.reset(5)  # an answered stream's reset is an ordinary abort
    budget.reset(7)
    budget.reset(9)
    with pytest.raises(PeerTooCostly):
        budget.reset(11)
