"""An outbound tunnel that fails in a way the proxy does not expect (a bug) still answers the SOCKS5 client with a
general failure, and leaves its traceback in the log; the expected failures (a refused dial, a certificate error)
stay one line."""

from __future__ import annotations

import asyncio
import io
import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest

from ztunnel.config.loader import build_config, load_documents
from ztunnel.identity.manager import CertificateError
from ztunnel.identity.spiffe import SpiffeId
from ztunnel.net.listen import listening_socket
from ztunnel.net.streams import TcpStream
from ztunnel.policy.engine import PolicyEngine
from ztunnel.proxy.listeners import WorkloadSockets, serve_streams
from ztunnel.proxy.outbound import Outbound
from ztunnel.proxy.report import ConnectionReporter
from ztunnel.proxy.state import ProxyOptions, ProxyState, ServedWorkload
from ztunnel.telemetry.accesslog import AccessLog

CLIENT = "127.0.178.1"
SERVER = "127.0.179.1"
CONFIG = f"""
apiVersion: v1
kind: Namespace
metadata: {{name: oe, labels: {{istio.io/dataplane-mode: ambient}}}}
---
apiVersion: v1
kind: Pod
metadata: {{name: client, namespace: oe, uid: oe-client}}
spec: {{nodeName: a, serviceAccountName: client}}
status: {{podIP: {CLIENT}}}
---
apiVersion: v1
kind: Pod
metadata: {{name: server, namespace: oe, uid: oe-server}}
spec: {{nodeName: b, serviceAccountName: server}}
status: {{podIP: {SERVER}}}
"""
SPIFFE = SpiffeId.parse("spiffe://cluster.local/ns/oe/sa/client")
GREETING_AND_CONNECT = bytes([5, 1, 0, 5, 1, 0, 1, 127, 0, 179, 1, 0x1F, 0x90])  # no auth; CONNECT SERVER:8080


class FailingPool:
    """Stands in for the HBONE pool: every tunnel fails with `error`."""

    def __init__(self, error: BaseException) -> None:
        self.error = error
        self.connect_timeout = 5.0

    async def connect(self, *args: Any, **kwargs: Any) -> Any:
        raise self.error


@pytest.fixture
async def proxy() -> AsyncIterator[tuple[ProxyState, Outbound, int]]:
    config = build_config(load_documents(CONFIG))
    state = ProxyState(ProxyOptions(node="a"), config=config, policy=PolicyEngine.from_config(config))
    client = next(w for w in config.workloads if w.name == "client")
    state.add_served(ServedWorkload(client, WorkloadSockets()))
    report = ConnectionReporter(None, AccessLog("text", io.StringIO()))
    outbound = Outbound(state, FailingPool(RuntimeError("unset")), report)  # type: ignore[arg-type]
    listener = listening_socket(CLIENT, 0)
    tasks: set[asyncio.Task[None]] = set()

    async def handle(stream: TcpStream) -> None:
        await outbound.serve_socks5(client.uid, stream)

    server = await serve_streams(listener, handle, tasks=tasks)
    try:
        yield state, outbound, listener.getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()
        for task in tasks:
            task.cancel()


async def socks_reply(port: int) -> bytes:
    reader, writer = await asyncio.open_connection(CLIENT, port)
    try:
        writer.write(GREETING_AND_CONNECT)
        await writer.drain()
        async with asyncio.timeout(5):
            return await reader.readexactly(2 + 10)  # method reply, then the request's reply (IPv4 form)
    finally:
        writer.close()


async def test_an_unexpected_error_answers_general_failure_and_logs_its_traceback(
    proxy: tuple[ProxyState, Outbound, int], caplog: pytest.LogCaptureFixture
) -> None:
    _, outbound, port = proxy
    outbound.pool = FailingPool(KeyError("a bug"))  # type: ignore[assignment]
    with caplog.at_level(logging.INFO, logger="ztunnel.proxy"):
        reply = await socks_reply(port)
    assert reply[:2] == b"\x05\x00" and reply[2:4] == b"\x05\x01"  # SOCKS5 general failure
    logged = [r for r in caplog.records if r.exc_info is not None]
    assert len(logged) == 1, [r.getMessage() for r in caplog.records]
    assert logged[0].exc_info is not None and isinstance(logged[0].exc_info[1], KeyError)
    assert "unexpected error opening a tunnel" in logged[0].getMessage()
    assert "KeyError: 'a bug'" in caplog.text  # the traceback, with the exception, is in the log


@pytest.mark.parametrize(
    "error", [ConnectionRefusedError("refused"), CertificateError(SPIFFE, "CA unreachable")], ids=repr
)
async def test_expected_errors_answer_general_failure_in_one_line(
    proxy: tuple[ProxyState, Outbound, int], caplog: pytest.LogCaptureFixture, error: Exception
) -> None:
    _, outbound, port = proxy
    outbound.pool = FailingPool(error)  # type: ignore[assignment]
    with caplog.at_level(logging.INFO, logger="ztunnel.proxy"):
        reply = await socks_reply(port)
    assert reply[:2] == b"\x05\x00" and reply[2:4] == b"\x05\x01"
    assert all(r.exc_info is None for r in caplog.records)
    assert "Traceback" not in caplog.text
