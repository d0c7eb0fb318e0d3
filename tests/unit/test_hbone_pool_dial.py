"""How the pool reports a dial that fails before any HTTP/2: the error names the endpoint and the cause."""

from __future__ import annotations

import asyncio
import errno
import ssl
from typing import Any

import pytest

from ztunnel.hbone.client import CONNECT_FAILURE, HbonePool, PoolKey
from ztunnel.hbone.protocol import Authority, HboneError
from ztunnel.identity.spiffe import SpiffeId

KEY = PoolKey(
    source=SpiffeId.parse("spiffe://cluster.local/ns/a/sa/client"),
    destination=SpiffeId.parse("spiffe://cluster.local/ns/b/sa/server"),
    address=("10.9.9.9", 15008),
)


class _Contexts:
    """A TlsContexts stand-in: the dial fails before the context is used."""

    async def client(self, source: SpiffeId) -> ssl.SSLContext:
        return ssl.create_default_context()


async def _dial_failing_with(monkeypatch: pytest.MonkeyPatch, error: OSError) -> tuple[HbonePool, HboneError]:
    loop = asyncio.get_running_loop()

    async def create_connection(*args: Any, **kwargs: Any) -> Any:
        raise error

    monkeypatch.setattr(loop, "create_connection", create_connection)
    pool = HbonePool(_Contexts(), connect_timeout=2)  # type: ignore[arg-type]
    with pytest.raises(HboneError) as caught:
        await pool.connect(KEY, Authority("10.9.9.9", 80), expected_identities=[str(KEY.destination)])
    return pool, caught.value


async def test_a_tcp_connect_that_times_out_is_reported_as_a_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    """ETIMEDOUT is a TimeoutError, which is an OSError: its handler must come first to be reached."""
    pool, error = await _dial_failing_with(monkeypatch, TimeoutError(errno.ETIMEDOUT, "Connect call failed"))
    assert str(error) == "timed out connecting to the HBONE endpoint 10.9.9.9:15008"
    assert pool.stats.connect_failures == 1
    assert pool.stats.by_reason == {CONNECT_FAILURE: 1}


async def test_a_refused_connect_names_the_endpoint_and_the_cause(monkeypatch: pytest.MonkeyPatch) -> None:
    refused = ConnectionRefusedError(errno.ECONNREFUSED, "Connect call failed")
    pool, error = await _dial_failing_with(monkeypatch, refused)
    assert str(error).startswith("cannot connect to the HBONE endpoint 10.9.9.9:15008: ")
    assert "Connect call failed" in str(error)
    assert pool.stats.by_reason == {CONNECT_FAILURE: 1}
