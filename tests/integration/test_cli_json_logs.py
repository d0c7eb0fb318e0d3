"""`--log-format json`: every line a running proxy writes is JSON, its access log and its fatal errors
included (issue 10, item 14). Pods on 127.0.195.0/24, apart from the other tests' addresses."""

from __future__ import annotations

import json
import socket
import subprocess
from pathlib import Path

from tests.integration.conftest import ECHO_PORT, ZTUNNEL, AppServer, _pod, recv_all, socks_connect, start_proxy
from tests.support.eventually import eventually

CLIENT = "127.0.195.1"
SERVER = "127.0.195.2"


def _events(text: str) -> list[dict[str, object]]:
    lines = text.splitlines()
    assert lines, "nothing was written"
    for line in lines:
        try:
            json.loads(line)
        except ValueError:
            raise AssertionError(f"not a JSON line: {line!r}") from None
    return [json.loads(line) for line in lines]


def test_every_line_of_a_proxy_run_is_json(tmp_path: Path, ca_dir: Path) -> None:
    config = tmp_path / "cluster.yaml"
    config.write_text(
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}\n"
        + _pod("json-client", "node-j", "client", CLIENT)
        + _pod("json-server", "node-j", "server", SERVER, ports=(ECHO_PORT,))
    )
    apps = AppServer()
    proxy = None
    try:
        apps.echo(SERVER)
        proxy = start_proxy("node-j", config, ca_dir, tmp_path, "--log-format", "json")
        with socks_connect(CLIENT, (SERVER, ECHO_PORT)) as s:
            s.sendall(b"json please")
            s.shutdown(socket.SHUT_WR)
            assert recv_all(s) == b"json please"
        eventually(lambda: proxy is not None and proxy.log().count("connection complete") >= 2, what="access log")
    finally:
        if proxy is not None:
            proxy.stop()
        apps.close()
    events = _events(proxy.log())  # stdout (access log) and stderr (logs), startup to drain
    access = [e for e in events if e["scope"] == "access"]
    assert {e["direction"] for e in access} == {"inbound", "outbound"}
    assert any(e["scope"] != "access" for e in events)  # the startup and shutdown lines too


def test_fatal_errors_are_json(tmp_path: Path) -> None:
    config = tmp_path / "cluster.yaml"
    config.write_text(_pod("x", "node-j", "x", CLIENT))
    runs = {
        "unreadable CA dir": (
            ["proxy", "--node", "node-j", "-f", str(config), "--ca-dir", str(tmp_path / "no-ca")],
            "no such CA directory",
        ),
        "bad flag value": (["proxy", "--node", "n", "-f", str(config), "--ca-dir", "d", "--workers", "x"], "--workers"),
        "bad duration": (["proxy", "--node", "n", "-f", str(config), "--ca-dir", "d", "--cert-ttl", "1y"], "duration"),
    }
    for what, (argv, words) in runs.items():
        r = subprocess.run(
            [ZTUNNEL, *argv, "--log-format", "json"], capture_output=True, text=True, timeout=30, check=False
        )
        assert r.returncode == 2, what
        events = _events(r.stderr)
        assert any(e["level"] == "error" and words in str(e["msg"]) for e in events), (what, events)
