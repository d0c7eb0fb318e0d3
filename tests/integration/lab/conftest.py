"""One netns lab for the whole module: two nodes, an enrolled client and server, an out-of-mesh pod and server.

The lab is built with the real CLI (`ztunnel lab up`) and removed with `ztunnel lab down` at the end of the
session, whatever happens. Its name carries the pytest pid so concurrent test runs never share namespaces;
labs left by a dead earlier run are removed first.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[3]
ZTUNNEL = [sys.executable, "-m", "ztunnel"]

# A server that answers every GET with the peer address it sees, so tests can check source IP preservation.
ECHO_SERVER = textwrap.dedent(
    """
    import http.server
    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = ("peer=%s\\n" % self.client_address[0]).encode()
            self.send_response(200)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        def log_message(self, fmt, *args):
            print("request from %s: %s" % (self.client_address[0], fmt % args), flush=True)
    http.server.ThreadingHTTPServer(("0.0.0.0", 8080), H).serve_forever()
    """
).strip()


def _pod(
    name: str, node: str, *, ambient: bool, sa: str, server: bool, labels: dict[str, str] | None = None
) -> dict[str, Any]:
    lab = {"app": name, **(labels or {})}
    if ambient:
        lab["istio.io/dataplane-mode"] = "ambient"
    container: dict[str, Any] = {"name": "main", "command": ["sleep", "infinity"]}
    if server:
        container = {
            "name": "main",
            "command": ["python3", "-c", ECHO_SERVER],
            "ports": [{"containerPort": 8080}],
            "readinessProbe": {"tcpSocket": {"port": 8080}},
        }
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": "lab", "labels": lab},
        "spec": {"nodeName": node, "serviceAccountName": sa, "containers": [container]},
    }


def cluster_objects() -> list[dict[str, Any]]:
    return [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "lab"}},
        {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n1"}},
        {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n2"}},
        _pod("client", "n1", ambient=True, sa="client", server=False),
        _pod("server", "n2", ambient=True, sa="server", server=True),
        _pod("outsider", "n1", ambient=False, sa="outsider", server=False),
        _pod("plain", "n2", ambient=False, sa="plain", server=True),
    ]


def netns_usable() -> str | None:
    """None if the lab can run here, else why not (the skip reason)."""
    if os.geteuid() != 0:
        return "needs root to create network namespaces"
    if shutil.which("ip") is None:
        return "iproute2 (`ip`) is not installed"
    if not Path("/usr/lib/cni/bridge").exists():
        return "CNI reference plugins missing (apt-get install containernetworking-plugins)"
    probe = f"ztlprobe{os.getpid()}"
    r = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if r.returncode != 0:
        return f"`ip netns add` does not work here: {r.stderr.strip()}"
    subprocess.run(["ip", "netns", "delete", probe], capture_output=True)
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    reason = None
    for item in items:
        if Path(str(item.fspath)).is_relative_to(here):
            item.add_marker(pytest.mark.netns)
            if reason is None:
                reason = netns_usable() or ""
            if reason:
                item.add_marker(pytest.mark.skip(reason=reason))


def ztunnel(*args: str, check: bool = True, timeout: float = 180.0, **kw: Any) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([*ZTUNNEL, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"ztunnel {' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


# this package's lab names: PREFIX + the pid of the pytest that made it
TEST_LAB_PREFIXES = ("it", "lc", "cr", "eb", "jw", "xa", "ie", "pm")


def remove_stale_labs() -> None:
    """Test labs whose pytest is gone were left by a crashed run: take them down (never a live run's lab)."""
    names = set()
    netns_dir = Path("/var/run/netns")
    state_root = Path("/run/ztunnel-lab")
    candidates = [e.name for e in netns_dir.iterdir()] if netns_dir.exists() else []
    candidates += [f"ztl-{e.name}-" for e in state_root.iterdir()] if state_root.exists() else []
    for candidate in candidates:
        m = re.match(rf"ztl-((?:{'|'.join(TEST_LAB_PREFIXES)})(\d+))-", candidate)
        if m and not Path(f"/proc/{m.group(2)}").exists():
            names.add(m.group(1))
    for name in names:
        ztunnel("lab", "down", "--name", name, check=False)


def root_netns_snapshot() -> dict[str, str]:
    """What the lab must never change in the machine's root namespace."""

    def out(*cmd: str) -> str:
        return subprocess.run(list(cmd), capture_output=True, text=True).stdout

    links = "\n".join(sorted(re.sub(r"\s+link/.*", "", line) for line in out("ip", "-o", "link").splitlines()))
    return {
        "links": links,
        "addrs": out("ip", "-o", "addr"),
        "routes": out("ip", "route", "show", "table", "all"),
        "rules": out("ip", "rule"),
        "iptables": "\n".join(x for x in out("iptables-save").splitlines() if not x.startswith("#")),
        "ip_forward": Path("/proc/sys/net/ipv4/ip_forward").read_text(),
    }


@dataclass(frozen=True)
class HttpReply:
    status: int
    headers: dict[str, str]  # names lowercased; a repeated header keeps its last value
    body: str


@dataclass
class LabHandle:
    """The running test lab, with helpers that run commands in its namespaces."""

    name: str
    dir: Path
    work: Path
    up_output: str

    def status(self) -> dict[str, Any]:
        status: dict[str, Any] = json.loads(ztunnel("lab", "status", "--name", self.name, "-o", "json").stdout)
        return status

    def pod(self, ref: str) -> dict[str, Any]:
        for p in self.status()["pods"]:
            if f"{p['namespace']}/{p['name']}" == ref:
                pod: dict[str, Any] = p
                return pod
        raise KeyError(ref)

    def pod_ip(self, ref: str) -> str:
        """From the lab's state file (what `status` reports too), without starting a CLI process."""
        ip: str = json.loads((self.dir / "state.json").read_text())["pods"][ref]["ips"][0]
        return ip

    def netns(self, target: str) -> str:
        st = json.loads((self.dir / "state.json").read_text())
        netns: str = st["nodes"][target[5:]]["netns"] if target.startswith("node/") else st["pods"][target]["netns"]
        return netns

    def run(
        self, target: str, *cmd: str, timeout: float = 20.0, check: bool = False
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            ["ip", "netns", "exec", self.netns(target), *cmd], capture_output=True, text=True, timeout=timeout
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"{target}: {' '.join(cmd)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
        return proc

    def curl(self, target: str, url: str, max_time: float = 3.0) -> tuple[int, str]:
        """(curl exit code, body). Exit 0 means an HTTP response arrived."""
        p = self.run(target, "curl", "-sS", "-m", str(max_time), url, timeout=max_time + 10)
        return p.returncode, p.stdout

    def apply(self, yaml_text: str, *args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
        f = self.work / f"apply-{time.monotonic_ns()}.yaml"
        f.write_text(yaml_text)
        try:
            return ztunnel("lab", "apply", "--name", self.name, "-f", str(f), *args, **kw)
        finally:
            f.unlink()

    def delete(self, yaml_text: str) -> subprocess.CompletedProcess[str]:
        f = self.work / f"delete-{time.monotonic_ns()}.yaml"
        f.write_text(yaml_text)
        try:
            return ztunnel("lab", "delete", "--name", self.name, "-f", str(f))
        finally:
            f.unlink()

    def components(self) -> dict[str, bool]:
        components: dict[str, bool] = json.loads((self.dir / "state.json").read_text())["components"]
        return components

    def require(self, *names: str) -> None:
        """Every component exists in this checkout: one the lab runs without is a failure, never a skip."""
        comps = self.components()
        missing = [n for n in names if not comps.get(n)]
        if missing:
            pytest.fail(f"the lab runs without {', '.join(missing)}; it was built with --mesh on, so that is a bug")

    def http(self, target: str, url: str, *headers: str, max_time: float = 5.0) -> HttpReply:
        """One request with real curl from TARGET's netns (`headers` as curl's -H takes them); a failed exchange
        (no HTTP response) fails the test with curl's message."""
        argv = ["curl", "-sS", "-i", "-m", str(max_time), *[a for h in headers for a in ("-H", h)], url]
        p = self.run(target, *argv, timeout=max_time + 10)
        if p.returncode != 0:
            raise AssertionError(f"{target}: curl {url} exited {p.returncode}: {p.stderr.strip()}")
        head, _, body = p.stdout.partition("\n\n")  # text mode: CRLF read as LF (in the body too)
        status_line, *lines = head.split("\n")
        fields = [line.partition(":") for line in lines]
        return HttpReply(int(status_line.split()[1]), {k.strip().lower(): v.strip() for k, _, v in fields}, body)

    def pod_log(self, ref: str, container: str = "main") -> list[dict[str, Any]]:
        """The JSON lines a pod's container printed (tests/support/labapps programs log one per request)."""
        st = json.loads((self.dir / "state.json").read_text())
        text = Path(st["processes"][f"pod/{ref}/{container}"]["log"]).read_text()
        return [json.loads(line) for line in text.splitlines() if line.startswith("{")]

    def metrics(self, node: str) -> str:
        p = self.run(f"node/{node}", "curl", "-sS", "-m", "3", "http://127.0.0.1:15020/metrics", check=True)
        return p.stdout


@contextmanager
def running_lab(
    name: str,
    objects: Sequence[dict[str, Any]],
    work: Path,
    timeout: int = 120,
    redirect: str = "iptables",
    up_args: Sequence[str] = (),
) -> Iterator[LabHandle]:
    """`ztunnel lab up` of OBJECTS (with --mesh on: a missing or broken component fails `up`), and `lab down` at
    the end whatever happens, checking that nothing is left and the root netns is as it was.

    With redirect="ebpf", a machine that cannot do eBPF redirection skips the test with the agent's reason."""
    import yaml

    remove_stale_labs()
    before = root_netns_snapshot()
    cluster = work / "cluster.yaml"
    cluster.write_text(yaml.safe_dump_all(objects, sort_keys=False))
    try:
        # --mesh on (also the default, said here so a changed default cannot make these tests pass without
        # the mesh): a missing or broken component fails `up`, and so every test that uses the lab
        up = ztunnel("lab", "up", "--name", name, "-f", str(cluster), "--mesh", "on", "--timeout", str(timeout),
                     "--redirect", redirect, *up_args, check=redirect != "ebpf")  # fmt: skip
        if up.returncode != 0:
            reason = re.search(r"eBPF redirection is not supported here: [^\n]*", up.stderr)
            if reason:
                pytest.skip(reason.group(0))
            raise AssertionError(f"ztunnel lab up --redirect ebpf exited {up.returncode}\n{up.stdout}\n{up.stderr}")
        yield LabHandle(name=name, dir=Path("/run/ztunnel-lab") / name, work=work, up_output=up.stdout + up.stderr)
    finally:
        down = ztunnel("lab", "down", "--name", name, check=False)
    # the lab, every component included, left nothing behind and never touched the root netns
    assert down.returncode == 0, down.stderr
    assert not [p for p in Path("/var/run/netns").iterdir() if p.name.startswith(f"ztl-{name}-")]
    assert not list(Path("/etc/netns").glob(f"ztl-{name}-*"))  # the pods' resolv.conf dirs too
    assert f"/run/ztunnel-lab/{name}/" not in Path("/proc/self/mounts").read_text()  # eBPF mode's bpffs
    assert root_netns_snapshot() == before


@pytest.fixture(scope="session")
def lab_name() -> str:
    return f"it{os.getpid()}"


@pytest.fixture(scope="session")
def lab(tmp_path_factory: pytest.TempPathFactory, lab_name: str) -> Iterator[LabHandle]:
    with running_lab(lab_name, cluster_objects(), tmp_path_factory.mktemp("lab")) as handle:
        yield handle


@pytest.fixture(scope="session")
def iptables_lab(lab: LabHandle) -> LabHandle:
    """The session's lab (iptables redirection), for modules that run their tests in both modes."""
    return lab


@pytest.fixture(scope="session")
def ebpf_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabHandle]:
    """The same cluster with `--redirect ebpf` (skipped, with the agent's reason, where eBPF cannot run)."""
    objects = cluster_objects()
    with running_lab(f"ie{os.getpid()}", objects, tmp_path_factory.mktemp("ebpf-lab"), redirect="ebpf") as handle:
        yield handle
