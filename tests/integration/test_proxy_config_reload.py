"""A running proxy and its config file: a file it cannot read is rejected (logged, counted, shown in
/config_dump) with traffic, readiness and the watcher intact; a half-written file does not tear the node's
pods down; a large file is read while traffic keeps flowing; a --node no pod names is reported."""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.conftest import (
    AppServer,
    ProxyProcess,
    socks_connect,
    socks_echo,
    socks_refused,
    start_proxy,
)
from tests.support.eventually import eventually

CLIENT = "127.0.200.1"
SERVER = "127.0.200.2"
PORT = 8080
NODE = "node-r"

BASE = (
    "apiVersion: v1\nkind: Namespace\nmetadata: {name: reload, labels: {istio.io/dataplane-mode: ambient}}\n"
    "---\napiVersion: v1\nkind: Pod\n"
    "metadata: {name: server, namespace: reload, uid: reload-server, labels: {app: server}}\n"
    f"spec: {{nodeName: {NODE}, serviceAccountName: server}}\nstatus: {{podIP: {SERVER}}}\n"
    "---\napiVersion: v1\nkind: Pod\nmetadata: {name: client, namespace: reload, uid: reload-client}\n"
    f"spec: {{nodeName: {NODE}, serviceAccountName: client}}\nstatus: {{podIP: {CLIENT}}}\n"
)
DENY_CLIENT = (
    "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n"
    "metadata: {name: no-client, namespace: reload}\n"
    "spec: {action: DENY, rules: [{from: [{source: {principals: [cluster.local/ns/reload/sa/client]}}]}]}\n"
)


@pytest.fixture
def apps() -> Iterator[AppServer]:
    a = AppServer()
    a.echo(SERVER, PORT)
    yield a
    a.close()


@pytest.fixture
def config(tmp_path: Path) -> Path:
    f = tmp_path / "cluster.yaml"
    f.write_text(BASE)
    return f


def _replace(config: Path, data: bytes | str) -> None:
    """An atomic write (temporary file + rename), so the proxy sees the whole new content at once."""
    tmp = config.with_suffix(".tmp")
    tmp.write_bytes(data if isinstance(data, bytes) else data.encode())
    tmp.replace(config)


def _echo_once(payload: bytes = b"ping") -> bytes:
    return socks_echo(CLIENT, (SERVER, PORT), payload)


def _refused() -> bool:
    return socks_refused(CLIENT, (SERVER, PORT))


def _rejected_count(proxy: ProxyProcess) -> float:
    m = re.search(r'^ztunnel_config_loads_total\{result="error"\} (\S+)$', proxy.metrics(), re.M)
    return float(m.group(1)) if m else 0.0


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"\xff\xfe" + BASE.encode("utf-16-le"), "is UTF-16 text, not UTF-8"),
        (BASE.replace("reload", "r\xe9load").encode("latin-1"), "is not UTF-8 text"),
        (bytes(range(256)) * 4, "not UTF-8"),
    ],
    ids=["utf16", "latin1", "binary"],
)
def test_an_unreadable_config_is_rejected_and_the_next_valid_one_is_enforced(
    tmp_path: Path, ca_dir: Path, apps: AppServer, config: Path, data: bytes, reason: str
) -> None:
    proxy = start_proxy(NODE, config, ca_dir, tmp_path)
    try:
        assert _echo_once() == b"ping"
        _replace(config, data)
        eventually(lambda: "config rejected" in proxy.log(), what="the rejection to be logged")
        line = next(x for x in proxy.log().splitlines() if "config rejected" in x)
        assert "keeping the last good config (generation 1)" in line and str(config) in line and reason in line
        assert proxy.ready() and _echo_once() == b"ping"
        assert _rejected_count(proxy) == 1
        dumped = proxy.config_dump()["config_source"]
        assert dumped["last_rejection"]["file"] == str(config) and reason in dumped["last_rejection"]["reason"]

        _replace(config, BASE + DENY_CLIENT)  # the watcher is alive: this DENY must be enforced
        eventually(_refused, what="the DENY written after the bad file to be enforced")
        assert proxy.config_dump()["config_source"]["last_rejection"] is None
        assert proxy.ready()
    finally:
        proxy.stop()


def test_a_half_written_config_does_not_tear_down_the_node(
    tmp_path: Path, ca_dir: Path, apps: AppServer, config: Path
) -> None:
    """`cat > file`: the proxy sees the file empty first. It holds that config, so the pods keep their
    listeners and connections, and applies the complete file written within the settle time."""
    proxy = start_proxy(NODE, config, ca_dir, tmp_path, "--config-settle", "60s")
    try:
        with socks_connect(CLIENT, (SERVER, PORT)) as conn:
            conn.settimeout(10)
            conn.sendall(b"before")
            assert conn.recv(100) == b"before"
            with config.open("w") as f:  # truncated in place, not replaced
                f.flush()
                eventually(lambda: "holding it for 60s" in proxy.log(), what="the empty config to be held")
                assert "Write config files atomically" in proxy.log()
                held = proxy.config_dump()
                assert held["config_source"]["held"]["workloads_before"] == 2
                assert len(held["served_workloads"]) == 2
                conn.sendall(b"during")
                assert conn.recv(100) == b"during"
                f.write(BASE + DENY_CLIENT.replace("DENY", "AUDIT"))
            eventually(lambda: "config loaded: generation 2" in proxy.log(), what="the complete file to be applied")
            conn.sendall(b"after")
            assert conn.recv(100) == b"after"
        assert len(proxy.config_dump()["served_workloads"]) == 2 and proxy.ready()
    finally:
        proxy.stop()


def test_a_config_dropping_every_pod_is_applied_once_the_file_stays_unchanged(
    tmp_path: Path, ca_dir: Path, apps: AppServer, config: Path
) -> None:
    proxy = start_proxy(NODE, config, ca_dir, tmp_path, "--config-settle", "1s")
    try:
        _replace(config, "")
        eventually(
            lambda: "applying a config that removes every workload of node node-r" in proxy.log(),
            what="the held config to be applied after the settle time",
        )
        eventually(lambda: proxy.config_dump()["served_workloads"] == [], what="the pods to be removed")
        log = proxy.log()
        assert log.index("holding it for 1s") < log.index("applying a config that removes every workload")
    finally:
        proxy.stop()


def _big_config(path: Path, megabytes: float) -> None:
    bench = Path(__file__).resolve().parents[2] / "bench" / "config_load.py"
    spec = importlib.util.spec_from_file_location("config_load_bench", bench)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.generate(path, megabytes)


def test_a_request_is_answered_while_a_large_config_is_loading(
    tmp_path: Path, ca_dir: Path, apps: AppServer, config: Path
) -> None:
    """The read of a large file runs off the event loop: a request through the proxy, made once the load
    has started, completes before the load is over (order of events, not a timing threshold)."""
    big = tmp_path / "big.yaml"
    _big_config(big, 12)
    proxy = start_proxy(NODE, config, ca_dir, tmp_path)
    try:
        assert _echo_once() == b"ping"
        _replace(config, BASE + "---\n" + big.read_text())
        eventually(lambda: "config: parsing large file" in proxy.log(), what="the large load to start")
        assert _echo_once(b"during the load") == b"during the load"
        assert "config loaded: generation 2" not in proxy.log(), "the request waited for the load"
        eventually(lambda: "config loaded: generation 2" in proxy.log(), timeout=180, what="the large load to end")
        assert _echo_once() == b"ping" and proxy.ready()
    finally:
        proxy.stop()


def test_a_node_with_no_pods_in_the_config_is_reported(tmp_path: Path, ca_dir: Path, config: Path) -> None:
    proxy = start_proxy("node-typo", config, ca_dir, tmp_path)
    try:
        eventually(lambda: "no pod in the config runs on node node-typo" in proxy.log(), what="the warning")
        line = next(x for x in proxy.log().splitlines() if "node-typo" in x)
        assert "Nodes in the config: node-r" in line
    finally:
        proxy.stop()
