"""The CNI installer at exit (`--watch --uninstall-on-exit`): an uninstall (its DaemonSet gone or being
deleted, asked of the API server) removes the plugin; a rolling update or restart (the DaemonSet still
there) and an API server that gives no clear answer keep it, so pods wait for the agent instead of
starting unmeshed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.support.eventually import eventually
from ztunnel.cni.installer import KubeAPI, daemonset_state, settle_daemonset_state, uninstall_at_exit

CONFLIST = {"cniVersion": "1.0.0", "name": "kindnet", "plugins": [{"type": "ptp"}, {"type": "portmap"}]}
DS_PATH = "/apis/apps/v1/namespaces/istio-system/daemonsets/ztunnel"


@dataclass
class FakeAPI:
    """The API server's answer for the DaemonSet GET, and the requests it saw."""

    status: int = 200
    body: Any = field(default_factory=lambda: {"metadata": {"name": "ztunnel"}})
    seen: list[tuple[str, str | None]] = field(default_factory=list)
    url: str = ""


@pytest.fixture
def api() -> Iterator[FakeAPI]:
    fake = FakeAPI()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            fake.seen.append((self.path, self.headers.get("Authorization")))
            data = json.dumps(fake.body).encode() if fake.body is not None else b""
            self.send_response(fake.status if self.path == DS_PATH else 404)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    fake.url = f"http://127.0.0.1:{server.server_address[1]}"
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        yield fake
    finally:
        server.shutdown()
        server.server_close()
        t.join()


def test_decision_table() -> None:
    assert uninstall_at_exit("always", None) and not uninstall_at_exit("never", "gone")
    assert uninstall_at_exit("auto", "gone") and uninstall_at_exit("auto", "deleting")
    assert not uninstall_at_exit("auto", "present") and not uninstall_at_exit("auto", "unknown")


def test_daemonset_state_from_the_api_server(api: FakeAPI, tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("sekrit\n")
    kube = KubeAPI(api.url, token)
    assert daemonset_state(kube, "istio-system", "ztunnel") == "present"
    assert api.seen == [(DS_PATH, "Bearer sekrit")]
    api.body = {"metadata": {"name": "ztunnel", "deletionTimestamp": "2026-12-04T19:00:00Z"}}
    assert daemonset_state(kube, "istio-system", "ztunnel") == "deleting"
    api.status, api.body = 404, {"kind": "Status", "code": 404}
    assert daemonset_state(kube, "istio-system", "ztunnel") == "gone"
    api.status = 403
    assert daemonset_state(kube, "istio-system", "ztunnel") == "unknown"
    api.status, api.body = 200, None
    assert daemonset_state(kube, "istio-system", "ztunnel") == "unknown"


def test_unknown_is_asked_again_then_given_up(api: FakeAPI) -> None:
    api.status = 503
    assert settle_daemonset_state(KubeAPI(api.url), "istio-system", "ztunnel", attempts=3, pause=0.01) == "unknown"
    assert len(api.seen) == 3
    closed = KubeAPI("http://127.0.0.1:9")  # discard port: nothing listens
    assert daemonset_state(closed, "istio-system", "ztunnel", timeout=1) == "unknown"


def test_in_cluster_config_from_the_environment(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("t")
    (tmp_path / "ca.crt").write_text("c")
    env = {"KUBERNETES_SERVICE_HOST": "fd00::1", "KUBERNETES_SERVICE_PORT": "6443"}
    want = KubeAPI("https://[fd00::1]:6443", tmp_path / "token", tmp_path / "ca.crt")
    assert KubeAPI.in_cluster(env, tmp_path) == want
    assert KubeAPI.in_cluster({}, tmp_path) is None


def _run_installer(tmp_path: Path, api: FakeAPI, mode: str) -> tuple[Path, Path]:
    """Start `ztunnel-cni install --watch`, wait until the plugin is in, SIGTERM it; (conflist, bin dir)."""
    conf_dir, bin_dir = tmp_path / "net.d", tmp_path / "bin"
    conf_dir.mkdir()
    conf = conf_dir / "10-kindnet.conflist"
    conf.write_text(json.dumps(CONFLIST))
    binary = tmp_path / "plugin"
    binary.write_bytes(b"#!/bin/sh\n")
    code = "import sys; from ztunnel.cni.plugin import main; sys.exit(main())"
    args = [sys.executable, "-c", code, "install", "--cni-conf-dir", str(conf_dir), "--cni-bin-dir", str(bin_dir)]
    args += ["--plugin-binary", str(binary), "--watch", "--interval", "0.05", "--uninstall-on-exit", mode]
    args += ["--daemonset", "ztunnel", "--namespace", "istio-system", "--kube-api", api.url]
    env = {k: v for k, v in os.environ.items() if not k.startswith("KUBERNETES_")}
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        eventually(
            lambda: "ztunnel-cni" in conf.read_text() and (bin_dir / "ztunnel-cni").exists(),
            20,
            what="the installer added the plugin",
        )
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    return conf, bin_dir


def test_uninstall_when_the_daemonset_is_gone(api: FakeAPI, tmp_path: Path) -> None:
    api.status = 404
    conf, bin_dir = _run_installer(tmp_path, api, "auto")
    assert json.loads(conf.read_text()) == CONFLIST
    assert not (bin_dir / "ztunnel-cni").exists()
    assert [p for p, _ in api.seen] == [DS_PATH]


def test_rolling_update_keeps_the_plugin(api: FakeAPI, tmp_path: Path) -> None:
    conf, bin_dir = _run_installer(tmp_path, api, "auto")
    assert [p["type"] for p in json.loads(conf.read_text())["plugins"]] == ["ptp", "portmap", "ztunnel-cni"]
    assert (bin_dir / "ztunnel-cni").exists()


def test_no_answer_keeps_the_plugin_and_never_asks_with_never(api: FakeAPI, tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    api.status = 500
    conf, _ = _run_installer(tmp_path / "a", api, "auto")
    assert "ztunnel-cni" in conf.read_text() and len(api.seen) == 3  # asked three times, then kept
    api.seen.clear()
    conf, _ = _run_installer(tmp_path / "b", api, "never")
    assert "ztunnel-cni" in conf.read_text() and api.seen == []


def test_auto_without_a_daemonset_name_is_refused(tmp_path: Path) -> None:
    from ztunnel.cni.installer import main

    env_ns = os.environ.pop("POD_NAMESPACE", None)
    try:
        rc = main(["--cni-conf-dir", str(tmp_path), "--cni-bin-dir", str(tmp_path), "--uninstall-on-exit", "auto"])
    finally:
        if env_ns is not None:
            os.environ["POD_NAMESPACE"] = env_ns
    assert rc == 2
