"""Lifetimes: config edits add/remove pods, policy changes close open connections, drain on SIGTERM and
POST /quitquitquit. Each test runs its own pair of proxies (node-d: client pods, node-e: the server pod)."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.integration.conftest import (
    AppServer,
    ProxyProcess,
    SocksRefused,
    recv_all,
    socks_connect,
    socks_echo,
    start_proxy,
)
from tests.support.eventually import eventually

CLIENT = "127.0.150.1"
CLIENT2 = "127.0.150.2"
SERVER = "127.0.160.1"
PORT = 8080

BASE = (
    "apiVersion: v1\nkind: Namespace\nmetadata: {name: life, labels: {istio.io/dataplane-mode: ambient}}\n"
    "---\napiVersion: v1\nkind: Pod\n"
    "metadata: {name: server, namespace: life, uid: life-server, labels: {app: server}}\n"
    f"spec: {{nodeName: node-e, serviceAccountName: server}}\nstatus: {{podIP: {SERVER}}}\n"
)


def _client_pod(name: str, ip: str) -> str:
    return (
        f"---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: life, uid: life-{name}}}\n"
        f"spec: {{nodeName: node-d, serviceAccountName: {name}}}\nstatus: {{podIP: {ip}}}\n"
    )


DENY_CLIENT = (
    "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n"
    "metadata: {name: no-client, namespace: life}\n"
    "spec: {action: DENY, rules: [{from: [{source: {principals: [cluster.local/ns/life/sa/client]}}]}]}\n"
)


@dataclass
class Pair:
    config: Path
    d: ProxyProcess
    e: ProxyProcess

    def write(self, text: str) -> None:
        tmp = self.config.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.replace(self.config)  # atomic, as editors and kubectl-like tools do


@pytest.fixture
def apps() -> Iterator[AppServer]:
    a = AppServer()
    a.echo(SERVER, PORT)
    yield a
    a.close()


def _pair(tmp_path: Path, ca_dir: Path, *e_args: str) -> Pair:
    config = tmp_path / "cluster.yaml"
    config.write_text(BASE + _client_pod("client", CLIENT))
    d = start_proxy("node-d", config, ca_dir, tmp_path)
    try:
        e = start_proxy("node-e", config, ca_dir, tmp_path, *e_args)
    except BaseException:
        d.stop()
        raise
    return Pair(config, d, e)


@pytest.fixture
def pair(tmp_path: Path, ca_dir: Path, apps: AppServer) -> Iterator[Pair]:
    p = _pair(tmp_path, ca_dir, "--drain-timeout", "2s")
    yield p
    p.d.stop()
    p.e.stop()


def _echo_once(client_ip: str, payload: bytes = b"ping") -> bytes:
    return socks_echo(client_ip, (SERVER, PORT), payload)


def _accepts(addr: tuple[str, int]) -> bool:
    try:
        socket.create_connection(addr, timeout=1).close()
        return True
    except OSError:
        return False


def test_config_edits_add_and_remove_pod_listeners(pair: Pair) -> None:
    assert _echo_once(CLIENT) == b"ping"
    assert not _accepts((CLIENT2, 15080))
    pair.write(BASE + _client_pod("client", CLIENT) + _client_pod("client2", CLIENT2))
    eventually(lambda: _accepts((CLIENT2, 15080)), what="listeners for the new pod")
    assert _echo_once(CLIENT2) == b"ping"  # it has its certificate too
    certs = {c["identity"] for c in pair.d.config_dump()["certificates"]}
    assert "spiffe://cluster.local/ns/life/sa/client2" in certs
    pair.write(BASE + _client_pod("client2", CLIENT2))
    eventually(lambda: not _accepts((CLIENT, 15080)) and not _accepts((CLIENT, 15008)), what="listeners removed")
    assert _echo_once(CLIENT2) == b"ping"


def test_a_bad_config_edit_keeps_the_last_good_config(pair: Pair) -> None:
    pair.write("apiVersion: v1\nkind: Pod\nmetadata: {name: broken}\nstatus: {podIP: not-an-ip}\n")
    eventually(lambda: "config rejected" in pair.d.log(), what="the rejection to be logged")
    assert _echo_once(CLIENT) == b"ping"


def test_policy_change_closes_open_connections_it_now_denies(pair: Pair) -> None:
    with socks_connect(CLIENT, (SERVER, PORT)) as s:
        s.settimeout(10)
        s.sendall(b"before")
        assert s.recv(100) == b"before"
        pair.write(BASE + _client_pod("client", CLIENT) + DENY_CLIENT)
        eventually(lambda: "policy=life/no-client" in pair.e.log(), what="the open connection to be closed")
        try:
            s.sendall(b"after")
            data = recv_all(s)
        except ConnectionError:
            data = b""
        assert data == b""
    with pytest.raises(SocksRefused):
        socks_connect(CLIENT, (SERVER, PORT))


def test_sigterm_drains_open_connections_then_exits(pair: Pair) -> None:
    with socks_connect(CLIENT, (SERVER, PORT)) as s:
        s.settimeout(10)
        s.sendall(b"one")
        assert s.recv(100) == b"one"
        pair.e.proc.terminate()
        eventually(lambda: "draining" in pair.e.log(), what="drain to start")
        # New connections are refused while the open one keeps working.
        with pytest.raises(SocksRefused):
            socks_connect(CLIENT, (SERVER, PORT))
        s.sendall(b"two")
        assert s.recv(100) == b"two"
        s.shutdown(socket.SHUT_WR)
        assert recv_all(s) == b""
    assert pair.e.proc.wait(10) == 0
    assert "drain deadline passed" not in pair.e.log()  # it exited when the last connection finished


def test_quitquitquit_drains_and_forces_close_at_the_deadline(pair: Pair) -> None:
    with socks_connect(CLIENT, (SERVER, PORT)) as s:
        s.settimeout(10)
        s.sendall(b"one")
        assert s.recv(100) == b"one"
        started = time.monotonic()
        assert pair.e.http(pair.e.admin_port, "/quitquitquit", method="POST")[0] == 200
        assert pair.e.proc.wait(10) == 0
        assert time.monotonic() - started >= 1.5  # the 2 s drain deadline held the connection open
        try:
            data = recv_all(s)
        except ConnectionError:
            data = b""
        assert data == b""  # then it was closed
    assert "drain deadline passed" in pair.e.log()


def test_not_ready_until_every_local_pod_is_served_then_ready(tmp_path: Path, ca_dir: Path) -> None:
    config = tmp_path / "cluster.yaml"
    config.write_text(BASE + _client_pod("client", CLIENT))
    blocker = socket.socket()
    blocker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    blocker.bind((CLIENT, 15008))
    blocker.listen()
    d = start_proxy("node-d", config, ca_dir, tmp_path, "--access-log", "json", wait_ready=False)
    try:
        _status, body = eventually(
            lambda: (r := d.http(d.readiness_port, "/healthz/ready"))[0] == 503 and r, what="a not-ready answer"
        )
        assert "life/client" in body
        blocker.close()  # the proxy retries and serves the pod
        eventually(d.ready, what="ready once the pod is served")
        dump = d.config_dump()
        assert [w["name"] for w in dump["served_workloads"]] == ["life/client"]
        assert {c["identity"] for c in dump["certificates"]} == {"spiffe://cluster.local/ns/life/sa/client"}
        with pytest.raises(SocksRefused):
            socks_connect(CLIENT, (SERVER, PORT))  # node-e has no proxy: fails closed
        line = eventually(
            lambda: next((x for x in d.log().splitlines() if '"scope": "access"' in x), None), what="an access log line"
        )
        record = json.loads(line)
        assert record["src.identity"] == "spiffe://cluster.local/ns/life/sa/client"
        assert record["response_flags"] == "UF"
    finally:
        blocker.close()
        d.stop()
