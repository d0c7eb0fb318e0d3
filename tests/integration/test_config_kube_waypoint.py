"""The greeter topology from the fake API server: a waypoint and the greeter's node proxy both run with
`--source kubernetes --kubeconfig F`; an L7 DENY added through the API answers 403 within 2 s, and its
deletion lets the request through again."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import yaml

from tests.integration.conftest import ZTUNNEL
from tests.support.eventually import eventually, eventually_async
from tests.support.kubeapi import FakeKubeApi, authz_policy, start_kube_proxy
from tests.support.waypoint import (
    APP_PORT,
    CONFIG,
    GREETER_IP,
    WAYPOINT_IP,
    KeepAliveApp,
    client_pool,
    get,
    one,
    stop,
    wait_listening,
)
from ztunnel.hbone.client import HbonePool

DENY_HELLO = {
    "targetRefs": [{"kind": "Service", "group": "", "name": "greeter"}],
    "action": "DENY",
    "rules": [{"to": [{"operation": {"paths": ["/hello"]}}]}],
}


@pytest.fixture
def api() -> Iterator[FakeKubeApi]:
    with FakeKubeApi() as server:
        server.put_all([doc for doc in yaml.safe_load_all(CONFIG) if doc])
        yield server


@pytest.fixture
async def mesh(api: FakeKubeApi, ca_dir: Path, tmp_path: Path) -> AsyncIterator[HbonePool]:
    import subprocess

    app = KeepAliveApp(GREETER_IP, APP_PORT)
    proxy = start_kube_proxy(api, "node-b", ca_dir, tmp_path)
    log_path = tmp_path / "waypoint.log"
    argv = [
        ZTUNNEL, "--log-level", "info", "waypoint", "--name", "waypoint", "--namespace", "greet",
        "--source", "kubernetes", "--kubeconfig", str(api.kubeconfig(tmp_path / "kubeconfig")),
        "--ca-dir", str(ca_dir),
    ]  # fmt: skip
    with open(log_path, "wb") as out:
        waypoint = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path)
    try:
        eventually(lambda: proxy.ready() or proxy.proc.poll() is not None, 20, what="the node-b proxy ready")
        wait_listening(waypoint, log_path, WAYPOINT_IP)
        async with client_pool(ca_dir) as pool:
            yield pool
    finally:
        stop(waypoint)
        proxy.stop()
        app.close()


async def test_an_l7_deny_added_through_the_api_reaches_the_waypoint_within_2s(
    api: FakeKubeApi, mesh: HbonePool
) -> None:
    assert (await one(mesh, get("/hello")))[0] == 200
    await eventually_async(lambda: api.watch_count("authorizationpolicies") == 2, what="both policy watches open")
    added = time.monotonic()
    api.put(authz_policy("no-hello", "greet", DENY_HELLO))

    async def answer() -> tuple[int, bytes]:
        try:
            return await one(mesh, get("/hello"))
        except (OSError, EOFError) as e:
            return 0, str(e).encode()

    async def denied() -> bool:
        return await answer() == (403, b"RBAC: access denied")

    await eventually_async(denied, 2.0, what="the DENY added through the API at the waypoint")
    assert time.monotonic() - added <= 2.0
    api.delete("AuthorizationPolicy", "no-hello", "greet")

    async def allowed() -> bool:
        return (await answer())[0] == 200

    await eventually_async(allowed, 2.0, what="the DENY deleted through the API lifted")
