"""Process orchestration for `ztunnel demo` (kept apart from the CLI so `--help` stays fast)."""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from ztunnel.config import load_files
from ztunnel.config.model import ClusterConfig
from ztunnel.errors import ZtunnelError
from ztunnel.identity.ca import init_ca_dir
from ztunnel.net.http import http_request
from ztunnel.ports import ADMIN_PORT, HBONE_PORT, METRICS_PORT, PLAINTEXT_INBOUND_PORT, READINESS_PORT, SOCKS5_PORT


class DemoError(ZtunnelError):
    pass


@dataclass
class NodePorts:
    admin: int
    metrics: int
    readiness: int

    def named(self) -> tuple[tuple[str, int], ...]:
        return (("admin", self.admin), ("metrics", self.metrics), ("readiness", self.readiness))


def node_ports(nodes: list[str], port_base: int) -> dict[str, NodePorts]:
    """Each node's admin/metrics/readiness ports: base+0/20/21, then +100 per node (15000/15020/15021 first)."""
    metrics, readiness = METRICS_PORT - ADMIN_PORT, READINESS_PORT - ADMIN_PORT
    return {
        n: NodePorts(port_base + 100 * i, port_base + 100 * i + metrics, port_base + 100 * i + readiness)
        for i, n in enumerate(nodes)
    }


_POD_LISTENERS = (("HBONE", HBONE_PORT), ("plaintext inbound", PLAINTEXT_INBOUND_PORT), ("SOCKS5", SOCKS5_PORT))


def _in_use(host: str, port: int) -> bool:
    """Whether (host, port) cannot be bound now, as the proxy will bind it (SO_REUSEADDR: a connection of
    an earlier run in TIME_WAIT does not count)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def _free_port_base(nodes: list[str]) -> int | None:
    for base in range(20000, 30000, 500):
        if not any(_in_use("127.0.0.1", port) for p in node_ports(nodes, base).values() for _, port in p.named()):
            return base
    return None


def check_ports_free(cfg: ClusterConfig, nodes: list[str], port_base: int) -> None:
    """Fail before starting anything if a port the demo needs is taken. Started anyway, the demo would read
    the other process's readiness and metrics, and count a proxy that could not start as a policy denial."""
    ports = node_ports(nodes, port_base)
    taken = [
        f"127.0.0.1:{port} ({what} of {node}'s proxy)"
        for node, p in ports.items()
        for what, port in p.named()
        if _in_use("127.0.0.1", port)
    ]
    if taken:
        other = _free_port_base(nodes)
        hint = f", e.g. --port-base {other}" if other is not None else ""
        raise DemoError(
            f"port {', '.join(taken)} is in use (another mesh or demo?). The demo's proxies use --port-base "
            f"{port_base} (base+0/20/21, then +100 per node); pick free ports with --port-base{hint}"
        )
    pods = [
        f"{ip}:{port} ({what} of pod {w.ref})"
        for w in cfg.workloads
        if w.node in nodes and w.enrolled
        for ip in w.ips
        for what, port in _POD_LISTENERS
        if _in_use(ip, port)
    ]
    if pods:
        raise DemoError(
            f"{', '.join(pods)} is in use: another `ztunnel demo` (or a proxy serving the demo's pods) is running "
            "on this machine. The pod addresses are fixed by the demo's config; stop the other one first"
        )


@dataclass
class Processes:
    """Every process the demo started, stopped in reverse order on exit (only these, by pid)."""

    procs: list[tuple[str, subprocess.Popen[bytes]]] = field(default_factory=list)

    def start(self, name: str, argv: list[str], log: Path, cwd: Path | None = None) -> subprocess.Popen[bytes]:
        with open(log, "wb") as out:
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=cwd, start_new_session=True)
        self.procs.append((name, proc))
        return proc

    def check_alive(self, logs: Path) -> None:
        for name, proc in self.procs:
            if proc.poll() is not None:
                raise DemoError(f"{name} exited with status {proc.returncode}; see {logs}/{name}.log")

    def stop(self) -> None:
        for _, proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 5
        for _, proc in reversed(self.procs):
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _say(msg: str) -> None:
    print(msg, flush=True)


def _ztunnel() -> list[str]:
    exe = Path(sys.executable).with_name("ztunnel")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "ztunnel"]


def _wait_ready(port: int, procs: Processes, logs: Path, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        procs.check_alive(logs)
        try:
            status = http_request("127.0.0.1", port, "GET", "/healthz/ready", timeout=1).status
            if status == 200:
                return
            last = f"HTTP {status}"
        except OSError as e:
            last = str(e)
        time.sleep(0.1)
    url = f"http://127.0.0.1:{port}/healthz/ready"
    raise DemoError(f"{url} did not become ready within {timeout:.0f}s ({last}); see the logs in {logs}")


def _curl(socks: str, url: str) -> tuple[int, str]:
    if shutil.which("curl") is None:
        raise DemoError("curl is not installed; run `bash scripts/setup.sh` as root or apt-get install curl")
    r = subprocess.run(
        ["curl", "-sS", "--max-time", "5", "--socks5", socks, url], capture_output=True, text=True, check=False
    )
    return r.returncode, (r.stdout or r.stderr).strip()


def _metric_lines(port: int, name: str) -> list[str]:
    response = http_request("127.0.0.1", port, "GET", "/metrics", timeout=2)
    if response.status != 200:
        raise DemoError(f"http://127.0.0.1:{port}/metrics answered HTTP {response.status}")
    text = response.body.decode()
    return [line for line in text.splitlines() if line.startswith(name + "{") and not line.endswith((" 0.0", " 0"))]


def run_demo(*, workdir: str | None, once: bool, port_base: int) -> int:
    once = once or not sys.stdin.isatty()
    work = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="ztunnel-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    cluster = work / "cluster.yaml"
    cluster.write_text(resources.files("ztunnel.demo").joinpath("cluster.yaml").read_text())
    cfg = load_files([cluster])
    nodes = sorted(cfg.nodes)
    ports = node_ports(nodes, port_base)
    try:
        check_ports_free(cfg, nodes, port_base)
    except DemoError:
        if not workdir:
            shutil.rmtree(work, ignore_errors=True)
        raise

    _say(f"[1/5] creating a CA in {work / 'ca'}")
    init_ca_dir(work / "ca", force=True)
    procs = Processes()
    try:
        _say("[2/5] starting the apps of the pods (local mode: pod IPs are on loopback)")
        www = work / "www"
        www.mkdir(exist_ok=True)
        (www / "index.html").write_text("hello from backend, through the mesh\n")
        for w in cfg.workloads:
            for c in w.containers:
                argv = [str(a) for a in [*(c.get("command") or []), *(c.get("args") or [])]]
                if argv and argv[0] in ("python3", "python"):
                    argv[0] = sys.executable
                if argv:
                    procs.start(f"app-{w.name}", argv, logs / f"app-{w.name}.log", cwd=www)
        _say(f"[3/5] starting one node proxy per node: {', '.join(nodes)}")
        for n in nodes:
            p = ports[n]
            argv = [
                *_ztunnel(),
                "proxy",
                "--node",
                n,
                "-f",
                str(cluster),
                "--ca-dir",
                str(work / "ca"),
                "--admin-addr",
                f"127.0.0.1:{p.admin}",
                "--metrics-addr",
                f"127.0.0.1:{p.metrics}",
                "--readiness-addr",
                f"127.0.0.1:{p.readiness}",
            ]
            procs.start(f"proxy-{n}", argv, logs / f"proxy-{n}.log")
        for n in nodes:
            _wait_ready(ports[n].readiness, procs, logs)
        _say("      proxies ready (certificates issued for every local pod)")

        _say("[4/5] sending traffic through the mesh")
        frontend = f"127.0.10.1:{SOCKS5_PORT}"
        checks = [
            ("frontend -> backend pod (HBONE, mTLS, allowed)", frontend, "http://127.0.20.1:8080/", True),
            ("frontend -> backend Service 10.96.0.20:80", frontend, "http://10.96.0.20:80/", True),
            (
                "stranger -> backend pod (denied by AuthorizationPolicy)",
                f"127.0.10.2:{SOCKS5_PORT}",
                "http://127.0.20.1:8080/",
                False,
            ),
        ]
        failures = 0
        for title, socks, url, expect_ok in checks:
            procs.check_alive(logs)  # a refusal must come from a running proxy, not from a dead one's port
            rc, out = _curl(socks, url)
            ok = (rc == 0) == expect_ok
            failures += not ok
            verdict = "ok" if ok else "UNEXPECTED"
            _say(
                f"  $ curl --socks5 {socks} {url}\n    [{verdict}] {title}: " + (out if rc == 0 else f"refused ({out})")
            )

        procs.check_alive(logs)
        _say("[5/5] what the destination proxy (node-b) counted")
        for line in _metric_lines(ports[nodes[-1]].metrics, "istio_tcp_connections_opened_total"):
            _say("  " + line)
        if failures:
            raise DemoError(f"{failures} request(s) did not behave as expected; see the logs in {logs}")
        if once:
            _say(f"done. Logs, CA and config are in {work}" if workdir else "done.")
            return 0
        _say(
            "\nThe mesh is up. Try:\n"
            f"  curl --socks5 127.0.10.1:{SOCKS5_PORT} http://127.0.20.1:8080/\n"
            f"  curl http://127.0.0.1:{ports[nodes[0]].admin}/config_dump\n"
            f"  curl http://127.0.0.1:{ports[nodes[-1]].metrics}/metrics\n"
            f"Edit {cluster} to change policies live. Ctrl-C stops everything."
        )
        with contextlib.suppress(KeyboardInterrupt):
            while True:
                procs.check_alive(logs)
                time.sleep(1)
        return 0
    finally:
        procs.stop()
        if not workdir and once:
            shutil.rmtree(work, ignore_errors=True)
