"""The waypoint process end to end in local mode: the test is the source node proxy (HBONE with the client's
SVID to the waypoint, CONNECT <Service VIP>:80), the waypoint decides each HTTP/1.1 request and forwards the
allowed ones over HBONE to the destination node proxy (a real `ztunnel proxy`), which hands them to a
keep-alive HTTP/1.1 app on the pod IP.

The greeter policy (seed 002: ALLOW GET `*/hello`) is attached to the Service with `targetRefs`, the ambient
form: the destination node proxy does not apply it at L4 (a selector-bound L7 ALLOW would deny every tunnel
there, waypoint's included, until the node proxy learns which workloads use a waypoint).
"""

from __future__ import annotations

import asyncio
import subprocess
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.integration.conftest import ProxyProcess
from tests.support.certs import in_process_certs
from tests.support.eventually import eventually, eventually_async
from tests.support.identity import free_port
from tests.support.waypoint import (
    APP_PORT,
    BIG,
    CLIENT,
    CONFIG,
    DRAINER,
    DRAINER_IP,
    EMPTY_VIP,
    GREETER_IP,
    ORPHAN_VIP,
    SLOW_CHUNKS,
    VIP,
    WAYPOINT,
    WAYPOINT_IP,
    KeepAliveApp,
    Responses,
    client_pool,
    get,
    listening,
    one,
    proxy_and_waypoint,
    start_waypoint,
    stop,
    tunnel,
)
from ztunnel.hbone.client import HbonePool, PoolKey
from ztunnel.hbone.protocol import Authority
from ztunnel.hbone.tls_cache import TlsContexts


@dataclass
class Setup:
    workdir: Path
    ca_dir: Path
    proxy: ProxyProcess
    waypoint: subprocess.Popen[bytes]
    waypoint_log: Path
    app: KeepAliveApp


def _ready(port: int) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz/ready", timeout=2) as r:
            return int(r.status)
    except urllib.error.HTTPError as e:
        return e.code
    except (urllib.error.URLError, OSError):
        return 0


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, ca_dir: Path) -> Iterator[Setup]:
    workdir = tmp_path_factory.mktemp("waypoint")
    config = workdir / "cluster.yaml"
    config.write_text(CONFIG)
    app = KeepAliveApp(GREETER_IP, APP_PORT)
    try:
        with proxy_and_waypoint(config, ca_dir, workdir) as (proxy, waypoint, log_path):
            yield Setup(workdir, ca_dir, proxy, waypoint, log_path, app)
    finally:
        app.close()


@pytest.fixture
async def client(setup: Setup) -> AsyncIterator[HbonePool]:
    async with client_pool(setup.ca_dir) as pool:
        yield pool


async def test_allowed_get_reaches_the_app(client: HbonePool) -> None:
    status, body = await one(client, get("/hello"))
    assert (status, body) == (200, b"hello GET /hello (0 body bytes) #1\n")


async def test_other_path_denied(client: HbonePool) -> None:
    assert await one(client, get("/version")) == (403, b"RBAC: access denied")


async def test_post_denied(client: HbonePool) -> None:
    assert await one(client, get("/hello", "POST", b"x=1")) == (403, b"RBAC: access denied")


async def test_keep_alive_allowed_then_denied_then_allowed_reuses_the_upstream(client: HbonePool) -> None:
    stream = await tunnel(client)
    responses = Responses(stream)
    try:
        got = []
        for request in (get("/hello"), get("/version"), get("/api/hello")):
            await stream.write(request)
            status, headers, body = await responses.next()
            got.append((status, body))
            assert headers.get(b"connection") != b"close"
    finally:
        stream.close()
    # the third request is the app connection's second: one upstream stream carried both allowed requests
    assert got == [
        (200, b"hello GET /hello (0 body bytes) #1\n"),
        (403, b"RBAC: access denied"),
        (200, b"hello GET /api/hello (0 body bytes) #2\n"),
    ]


async def test_denied_request_with_body_keeps_the_connection(client: HbonePool) -> None:
    stream = await tunnel(client)
    responses = Responses(stream)
    try:
        await stream.write(get("/hello", "POST", b"a" * 1000) + get("/hello"))
        first = await responses.next()
        second = await responses.next()
    finally:
        stream.close()
    assert (first[0], first[2]) == (403, b"RBAC: access denied")
    assert (second[0], second[2]) == (200, b"hello GET /hello (0 body bytes) #1\n")


async def test_tunnel_to_a_non_service_address_is_refused(client: HbonePool) -> None:
    from ztunnel.hbone.protocol import HboneError

    key = PoolKey(CLIENT, WAYPOINT, (WAYPOINT_IP, 15008))
    with pytest.raises(HboneError) as e:
        await client.connect(key, Authority(GREETER_IP, APP_PORT), expected_identities=[WAYPOINT.uri])
    assert "400" in str(e.value)


def test_waypoint_refuses_to_start_without_its_pod(setup: Setup) -> None:
    proc, log_path = start_waypoint(
        setup.workdir / "cluster.yaml", setup.ca_dir, setup.workdir, "--name", "nope", "--namespace", "greet"
    )
    try:
        assert proc.wait(20) != 0
    finally:
        stop(proc)
    text = log_path.read_text()
    assert "no pod for waypoint greet/nope" in text and "gateway.networking.k8s.io/gateway-name: nope" in text


async def test_large_bodies_stream_both_ways(client: HbonePool) -> None:
    stream = await tunnel(client)
    responses = Responses(stream)
    try:
        await stream.write(b"POST /upload HTTP/1.1\r\nHost: greeter\r\nContent-Length: %d\r\n\r\n" % BIG)
        chunk = b"u" * 65536
        for _ in range(BIG // len(chunk)):
            await stream.write(chunk)
        status, _, body = await responses.next()
        assert (status, body) == (200, b"hello POST /upload (%d body bytes) #1\n" % BIG)
        await stream.write(get("/big"))
        status, _, body = await responses.next()
        assert (status, len(body), body.count(b"x")) == (200, BIG, BIG)
    finally:
        stream.close()


def test_denials_are_logged_with_the_request(setup: Setup) -> None:
    def logged() -> bool:
        text = setup.waypoint_log.read_text()
        return "request denied" in text and "/version" in text

    asyncio.run(_deny_once(setup))
    eventually(logged, 10, what="the denial in the waypoint's log")


async def _deny_once(setup: Setup) -> None:
    async with in_process_certs(setup.ca_dir) as certs:
        pool = HbonePool(TlsContexts(certs))
        try:
            assert await one(pool, get("/version")) == (403, b"RBAC: access denied")
        finally:
            pool.close()


def test_config_reload_changes_the_decision(setup: Setup) -> None:
    path = setup.workdir / "cluster.yaml"
    changed = CONFIG.replace('paths: ["*/hello", "/big", "/slow"]', 'paths: ["*/hello", "/big", "/slow", "/version"]')
    assert changed != CONFIG

    def write(text: str) -> None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.replace(path)

    def version_status() -> int:
        return asyncio.run(_status_of(setup, "/version"))

    try:
        write(changed)
        eventually(lambda: version_status() == 200, 15, what="/version allowed after the reload")
    finally:
        write(CONFIG)
    eventually(lambda: version_status() == 403, 15, what="/version denied again")


async def test_a_repeated_request_on_one_connection_is_decided_again_after_a_reload(
    setup: Setup, client: HbonePool
) -> None:
    # The connection keeps the verdict of a request it sees again; a new snapshot must not get the old one.
    path = setup.workdir / "cluster.yaml"
    changed = CONFIG.replace('paths: ["*/hello", "/big", "/slow"]', 'paths: ["*/hello", "/big", "/slow", "/version"]')

    def write(text: str) -> None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.replace(path)

    stream = await tunnel(client)
    responses = Responses(stream)

    async def version_status() -> int:
        await stream.write(get("/version"))
        status, _, _ = await responses.next()
        return status

    async def becomes(status: int, what: str) -> None:
        async def answered() -> bool:
            return await version_status() == status

        await eventually_async(answered, what=what)

    try:
        assert await version_status() == 403
        assert await version_status() == 403
        write(changed)
        await becomes(200, "/version allowed on the connection after the reload")
    finally:
        write(CONFIG)
        await becomes(403, "/version denied on the connection after the reload back")
        stream.close()


async def _status_of(setup: Setup, path: str) -> int:
    async with in_process_certs(setup.ca_dir) as certs:
        pool = HbonePool(TlsContexts(certs))
        try:
            return (await one(pool, get(path)))[0]
        finally:
            pool.close()


async def test_expect_100_continue_only_after_an_allow(client: HbonePool) -> None:
    stream = await tunnel(client)
    responses = Responses(stream)
    expect = b"POST /upload HTTP/1.1\r\nHost: greeter\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n"
    try:
        await stream.write(expect)
        status, _, _ = await responses.next()
        assert status == 100
        await stream.write(b"abcde")
        status, _, body = await responses.next()
        assert (status, body) == (200, b"hello POST /upload (5 body bytes) #1\n")
        await stream.write(expect.replace(b"/upload", b"/version"))
        status, headers, body = await responses.next()  # no 100: the body is never asked for
        assert (status, body) == (403, b"RBAC: access denied")
        assert headers[b"connection"] == b"close"
    finally:
        stream.close()


async def test_allowed_upgrade_relays_raw_bytes(client: HbonePool) -> None:
    stream = await tunnel(client)
    responses = Responses(stream)
    try:
        await stream.write(
            b"GET /ws/hello HTTP/1.1\r\nHost: greeter\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
        )
        status, headers, _ = await responses.next()
        assert (status, headers[b"upgrade"]) == (101, b"websocket")
        raw = b"\x81\x05raw-1 not http\r\n\r\n"  # a parser would choke on it: only a relay passes it
        await stream.write(raw)
        async with asyncio.timeout(10):
            while len(responses.buf) < len(raw):
                await responses._more()
        assert responses.buf == raw
        await stream.write_eof()
        async with asyncio.timeout(10):
            assert await stream.read() == b""  # the app's EOF came back through both proxies
    finally:
        stream.close()


async def test_denied_upgrade_is_answered_and_closed(client: HbonePool) -> None:
    stream = await tunnel(client)
    try:
        await stream.write(
            b"GET /ws/other HTTP/1.1\r\nHost: greeter\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
        )
        status, headers, body = await Responses(stream).next()
        assert (status, body, headers[b"connection"]) == (403, b"RBAC: access denied", b"close")
        async with asyncio.timeout(10):
            assert await stream.read() == b""
    finally:
        stream.close()


def test_sigterm_lets_an_open_response_finish(setup: Setup) -> None:
    ready_port = free_port()
    proc, log_path = start_waypoint(
        setup.workdir / "cluster.yaml",
        setup.ca_dir,
        setup.workdir,
        *("--name", "drainer", "--namespace", "greet", "--readiness-addr", f"127.0.0.1:{ready_port}"),
    )
    try:
        eventually(lambda: proc.poll() is not None or _ready(ready_port) == 200, 20, what="drainer ready")
        assert proc.poll() is None, log_path.read_text()
        assert listening(DRAINER_IP, 15008)

        async def slow_response_across_sigterm() -> tuple[int, bytes]:
            async with in_process_certs(setup.ca_dir) as certs:
                pool = HbonePool(TlsContexts(certs))
                try:
                    key = PoolKey(CLIENT, DRAINER, (DRAINER_IP, 15008))
                    stream = await pool.connect(key, Authority(VIP, 80), expected_identities=[DRAINER.uri])
                    responses = Responses(stream)
                    await stream.write(get("/slow"))
                    async with asyncio.timeout(10):
                        await responses._more()  # the response has started
                    proc.terminate()
                    status, _, body = await responses.next()
                    stream.close()
                    return status, body
                finally:
                    pool.close()

        status, body = asyncio.run(slow_response_across_sigterm())
        assert (status, body) == (200, b"s" * 1024 * SLOW_CHUNKS)
        assert proc.wait(15) == 0
        assert "shutting down: draining connections" in log_path.read_text()
    finally:
        stop(proc)


async def test_upstream_failures_are_answered_503(client: HbonePool) -> None:
    assert await one(client, get("/hello"), ORPHAN_VIP) == (503, b"upstream connect error")
    assert await one(client, get("/hello"), EMPTY_VIP) == (503, b"no healthy upstream")
