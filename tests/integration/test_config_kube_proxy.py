"""A real proxy process with `--source kubernetes --kubeconfig F` against the fake API server: it carries traffic,
enforces a DENY policy added through a watch event within 2 s, and is not ready before every list is done."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.conftest import (
    AppServer,
    ProxyProcess,
    SocksRefused,
    socks_echo,
    socks_refused,
)
from tests.support.eventually import eventually
from tests.support.kubeapi import FakeKubeApi, authz_policy, namespace, pod, start_kube_proxy

CLIENT = "127.0.210.1"
SERVER = "127.0.210.2"
PORT = 8080
NODE = "node-k"
DENY_CLIENT = {"action": "DENY", "rules": [{"from": [{"source": {"principals": ["cluster.local/ns/kube/sa/client"]}}]}]}


@pytest.fixture
def api() -> Iterator[FakeKubeApi]:
    with FakeKubeApi() as server:
        server.put_all(
            [
                namespace("kube", {"istio.io/dataplane-mode": "ambient"}),
                pod("server", "kube", node=NODE, ip=SERVER, heavy=True),
                pod("client", "kube", node=NODE, ip=CLIENT, heavy=True),
            ]
        )
        yield server


@pytest.fixture
def apps() -> Iterator[AppServer]:
    a = AppServer()
    a.echo(SERVER, PORT)
    yield a
    a.close()


def _start(api: FakeKubeApi, ca_dir: Path, workdir: Path) -> ProxyProcess:
    proxy: ProxyProcess = start_kube_proxy(api, NODE, ca_dir, workdir)
    return proxy


def _echo_once() -> bytes:
    return socks_echo(CLIENT, (SERVER, PORT))


def _refused() -> bool:
    return socks_refused(CLIENT, (SERVER, PORT))


def test_a_deny_added_through_the_api_is_enforced_within_2s(
    tmp_path: Path, ca_dir: Path, api: FakeKubeApi, apps: AppServer
) -> None:
    proxy = _start(api, ca_dir, tmp_path)
    try:
        eventually(lambda: proxy.ready() or proxy.proc.poll() is not None, 20, what="the proxy ready")
        assert proxy.proc.poll() is None, proxy.log()
        assert _echo_once() == b"ping"
        source = proxy.config_dump()["config_source"]
        assert source["source"] == "kubernetes" and source["resources"]["pods"]["objects"] == 2

        eventually(lambda: api.watch_count("authorizationpolicies") == 1, what="the policy watch open")
        added = time.monotonic()
        api.put(authz_policy("no-client", "kube", DENY_CLIENT))
        eventually(_refused, 2.0, what="the DENY added through the API to be enforced")
        took = time.monotonic() - added
        assert took <= 2.0

        api.delete("AuthorizationPolicy", "no-client", "kube")  # and taken back
        eventually(lambda: not _refused(), 2.0, what="the DENY deleted through the API to be lifted")
        assert proxy.ready()
    finally:
        assert proxy.stop() == 0, proxy.log()


def test_the_proxy_is_not_ready_before_every_list_is_done(
    tmp_path: Path, ca_dir: Path, api: FakeKubeApi, apps: AppServer
) -> None:
    hold = api.hold_lists["authorizationpolicies"] = threading.Event()
    proxy = _start(api, ca_dir, tmp_path)
    try:
        eventually(
            lambda: any(r.path.endswith("/authorizationpolicies") for r in api.requests), 20, what="the policy list"
        )
        eventually(lambda: any(r.path == "/api/v1/pods" for r in api.requests), 20, what="the pod list")
        assert not proxy.ready() and proxy.proc.poll() is None
        with pytest.raises((SocksRefused, ConnectionError, OSError)):
            _echo_once()  # no listener for the pods yet: nothing is decided on a half-synced cache
        api.put(authz_policy("no-client", "kube", DENY_CLIENT))  # lands before the held list is answered
        hold.set()
        eventually(lambda: proxy.ready() or proxy.proc.poll() is not None, 20, what="the proxy ready")
        assert _refused()  # the first decision already has the policy
    finally:
        hold.set()
        assert proxy.stop() == 0, proxy.log()
