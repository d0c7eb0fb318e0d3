"""The mesh config and header-name options at the `ztunnel waypoint` process:

- the istio ConfigMap's `pathNormalization` sets how request paths are normalized for the policy and for the
  app, and `ztunnel authz check --layer l7` on the same files answers as the waypoint does; a change of it is
  picked up on reload (BASE lets `//admin/hello` past a DENY on `/admin/*`, as Istio's default does; our default,
  MERGE_SLASHES, does not);
- `--headers-with-underscores`: a client's `X_Admin` (which a CGI-style app reads as `x-admin`, past a DENY on the
  x-admin header) reaches the app by default (ALLOW, as Envoy and Istio), is answered 400 with REJECT_REQUEST and
  is removed with DROP_HEADER, over HTTP/1.1 and h2c.
"""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import h2.config
import h2.connection
import h2.events
import pytest

from tests.integration.conftest import start_proxy
from tests.support.eventually import eventually_async
from tests.support.waypoint import (
    APP_PORT,
    CONFIG,
    KeepAliveApp,
    client_pool,
    get,
    greeter_cluster,
    one,
    running_waypoint,
    tunnel,
)
from tests.support.waypoint_config import mesh_config
from ztunnel.hbone.client import HbonePool

DENY = """\
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-admin, namespace: greet}
spec:
  targetRefs: [{kind: Service, group: "", name: greeter}]
  action: DENY
  rules:
  - to: [{operation: {paths: ["/admin/*"]}}]
  - when: [{key: "request.headers[x-admin]", values: ["*"]}]
"""


@dataclass
class Setup:
    ca_dir: Path
    workdir: Path
    config: Path
    app: KeepAliveApp


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, ca_dir: Path) -> Iterator[Setup]:
    workdir = tmp_path_factory.mktemp("waypoint-mesh-config")
    with greeter_cluster(workdir, CONFIG + DENY) as (config, app):
        proxy = start_proxy("node-b", config, ca_dir, workdir)
        try:
            yield Setup(ca_dir, workdir, config, app)
        finally:
            proxy.stop()


@pytest.fixture
def waypoint_args() -> list[str]:
    return []


@pytest.fixture
def waypoint(setup: Setup, waypoint_args: list[str]) -> Iterator[subprocess.Popen[bytes]]:
    setup.config.write_text(CONFIG + DENY)
    with running_waypoint(setup.config, setup.ca_dir, setup.workdir, *waypoint_args) as (proc, _):
        yield proc


def authz_check(setup: Setup, path: str, *extra: str) -> int:
    from ztunnel.cli import main

    argv = ["authz", "check", "-f", str(setup.config), "--from", "spiffe://cluster.local/ns/greet/sa/client"]
    argv += ["--to", "pod/greet/greeter", "--port", str(APP_PORT), "--layer", "l7", "--path", path, *extra]
    return main(argv)


async def test_the_mesh_configmaps_path_normalization_decides_what_passes(
    setup: Setup, waypoint: subprocess.Popen[bytes]
) -> None:
    async with client_pool(setup.ca_dir) as pool:
        # Ours (no mesh config): MERGE_SLASHES, //admin/hello is /admin/hello to the policy and the app: denied.
        assert (await one(pool, get("//admin/hello")))[0] == 403
        assert authz_check(setup, "//admin/hello") == 1
        # BASE, Istio's default, from the ConfigMap (picked up on reload): the slashes stay, the DENY misses.
        setup.config.write_text(CONFIG + DENY + mesh_config("BASE"))

        async def passes() -> bool:
            return (await one(pool, get("//admin/hello")))[0] == 200

        await eventually_async(passes, 20, what="BASE from the reloaded mesh config")
        assert any(h.startswith(b"GET //admin/hello ") for h in setup.app.heads)  # the app got it as decided
        assert authz_check(setup, "//admin/hello") == 0  # authz check agrees
        assert (await one(pool, get("/admin/hello")))[0] == 403


async def test_underscore_headers_pass_by_default(setup: Setup, waypoint: subprocess.Popen[bytes]) -> None:
    async with client_pool(setup.ca_dir) as pool:
        assert (await one(pool, with_header(get("/hello"), b"X-Admin: 1")))[0] == 403
        status, body = await one(pool, with_header(get("/u1/hello"), b"X_Admin: 1"))
        assert status == 200, body
        head = next(h for h in setup.app.heads if h.startswith(b"GET /u1/hello "))
        assert b"\r\nX_Admin: 1\r\n" in head  # as Istio: the app sees it (and may read it as x-admin)
        assert await h2c_status(pool, "/u2/hello", ("x_admin", "1")) == 200


@pytest.mark.parametrize("waypoint_args", [["--headers-with-underscores", "REJECT_REQUEST"]])
async def test_underscore_headers_rejected(setup: Setup, waypoint: subprocess.Popen[bytes]) -> None:
    async with client_pool(setup.ca_dir) as pool:
        status, body = await one(pool, with_header(get("/u3/hello"), b"X_Admin: 1"))
        assert status == 400 and b"X_Admin" in body
        assert not any(h.startswith(b"GET /u3/hello ") for h in setup.app.heads)
        assert await h2c_status(pool, "/u4/hello", ("x_admin", "1")) == 400
        assert not any(h.startswith(b"GET /u4/hello ") for h in setup.app.heads)
        assert (await one(pool, get("/u5/hello")))[0] == 200  # a request without one goes on


@pytest.mark.parametrize("waypoint_args", [["--headers-with-underscores", "DROP_HEADER"]])
async def test_underscore_headers_dropped(setup: Setup, waypoint: subprocess.Popen[bytes]) -> None:
    async with client_pool(setup.ca_dir) as pool:
        status, _ = await one(pool, with_header(get("/u6/hello"), b"X_Admin: 1\r\nX-Team: blue"))
        assert status == 200
        head = next(h for h in setup.app.heads if h.startswith(b"GET /u6/hello "))
        assert b"x_admin" not in head.lower() and b"\r\nX-Team: blue\r\n" in head
        assert await h2c_status(pool, "/u7/hello", ("x_admin", "1")) == 200
        head = next(h for h in setup.app.heads if h.startswith(b"GET /u7/hello "))
        assert b"x_admin" not in head.lower()


def with_header(request: bytes, field: bytes) -> bytes:
    head, sep, rest = request.partition(b"\r\n")
    return head + sep + field + b"\r\n" + rest


async def h2c_status(pool: HbonePool, path: str, *fields: tuple[str, str]) -> int:
    """One h2c GET through the waypoint (prior knowledge, in its own tunnel): the response's :status."""
    stream = await tunnel(pool)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    headers = [(":method", "GET"), (":scheme", "http"), (":path", path), (":authority", "greeter"), *fields]
    conn.send_headers(1, headers, end_stream=True)
    try:
        await stream.write(conn.data_to_send())
        async with asyncio.timeout(10):
            while True:
                data = await stream.read()
                if not data:
                    raise EOFError("tunnel closed before the response")
                for ev in conn.receive_data(data):
                    if isinstance(ev, h2.events.ResponseReceived):
                        return int(dict(ev.headers)[b":status"])
                if out := conn.data_to_send():
                    await stream.write(out)
    finally:
        stream.close()
