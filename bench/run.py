"""Side-by-side benchmark of the mesh against the floor (direct TCP) and a C peer (HAProxy mTLS).

Run with `bench/run` (installs the tools, then runs this). Until the netns lab exists, every path
runs on loopback addresses in local mode; as root, the whole run happens inside a network namespace
this script creates (and removes), so it never touches the machine's own network and can tune that
namespace's sysctls (TIME_WAIT reuse for the connection-rate test).

Paths:
- direct: client -> app.
- haproxy: client -> haproxy A (plain TCP) -> TLS 1.3, ECDSA P-256, mutual -> haproxy B -> app.
  One thread per haproxy process, like one node proxy worker.
- haproxy-tcp: client -> one haproxy (plain TCP both sides, no TLS) -> app. Not a peer: what the
  cheapest relay written in C costs on this machine (its CPU is the floor any proxy pays here).
- ztunnel: client pod on node a -> `ztunnel proxy --node a` -> HBONE -> `ztunnel proxy --node b`
  -> app pod on node b. Entry is the proxy's SOCKS5 port (local mode has no redirection): the
  load generators speak SOCKS5 themselves; iperf3 cannot, so it goes through `loadgen.py forward`,
  a fixed-destination forwarder that relays with splice(2).

Each repetition measures every path in turn, so slow drifts of this noisy machine hit all paths.
Timings are never asserted in tests: this is a report, not a gate.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import loadgen  # noqa: E402
import report  # noqa: E402

PY = sys.executable
LOADGEN = str(HERE / "loadgen.py")
NETNS_PREFIX = "ztbench-"

# Addresses (loopback; inside the bench netns nothing else uses them).
NODE_A, NODE_B = "127.77.1.1", "127.77.2.1"
CLIENT_POD, SERVER_POD = "127.77.1.10", "127.77.2.10"
HAPROXY_A, HAPROXY_B = "127.77.1.20", "127.77.2.20"
FORWARDER = "127.77.1.30"
IPERF_PORT, ECHO_PORT = 5201, 7000
TLS_PORT_OFFSET = 10000  # haproxy B's TLS port for app port P is P + offset

BENCH_TOOLS = ("haproxy", "iperf3")
ALL_PATHS = (
    "direct",
    "haproxy",
    "haproxy-tcp",
    "ztunnel",
    "ztunnel-ebpf",
    "waypoint",
    "direct-same-node",
    "ztunnel-same-node",
)
RELAY_PORT_OFFSET = 20000  # haproxy-tcp listens on P + offset for app port P (beside haproxy A's P)


@dataclass(frozen=True, slots=True)
class Settings:
    quick: bool
    reps: int
    throughput_secs: float
    latency_secs: float
    latency_warmup: float
    latency_rate: float
    latency_conns: int
    connrate_secs: float
    connrate_workers: int
    hold_count: int

    @classmethod
    def for_args(cls, args: argparse.Namespace) -> Settings:
        if args.quick:
            s = cls(True, 2, 2.0, 3.0, 0.5, 1000, 4, 2.0, 8, 1000)
        else:
            s = cls(False, 3, 4.0, 6.0, 1.0, 1000, 4, 3.0, 8, 10_000)
        if args.reps:
            s = Settings(**{**asdict(s), "reps": args.reps})
        if args.hold:
            s = Settings(**{**asdict(s), "hold_count": args.hold})
        return s


# ---- processes --------------------------------------------------------------------------------


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[Any]
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, lines: int = 8) -> str:
        try:
            text = self.log.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return " | ".join(text[-lines:])

    def stop(self) -> None:
        if self.popen.poll() is not None:
            return
        self.popen.send_signal(signal.SIGTERM)
        try:
            self.popen.wait(5)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(5)


@dataclass
class ProcessGroup:
    """Owns the temp dir and every process the run starts; `close()` stops them all, by pid."""

    workdir: Path
    procs: list[Proc] = field(default_factory=list)

    def start(self, name: str, argv: list[str], *, env: dict[str, str] | None = None) -> Proc:
        log = self.workdir / f"{name}.log"
        n = 1
        while log.exists():  # a restarted process keeps the log of the one before
            n += 1
            log = self.workdir / f"{name}.{n}.log"
        fh = log.open("wb")
        popen = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
        fh.close()
        proc = Proc(name, popen, log)
        self.procs.append(proc)
        return proc

    def close(self) -> None:
        for proc in reversed(self.procs):
            with contextlib.suppress(Exception):
                proc.stop()


def wait_until(check: Callable[[], bool], timeout: float, what: str, proc: Proc | None = None) -> None:
    """Poll `check` until true; fail early if `proc` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        if proc is not None and not proc.alive():
            raise RuntimeError(f"{proc.name} exited (code {proc.popen.returncode}) before {what}: {proc.log_tail()}")
        time.sleep(0.05)
    tail = f": {proc.log_tail()}" if proc else ""
    raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what}{tail}")


def port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def listening(host: str, port: int, prefix: list[str] | None = None) -> bool:
    """Whether a TCP socket listens on host:port (IPv4), without connecting to it (a connect would
    count as a client for servers such as a one-off iperf3). `prefix` runs the check in a netns."""
    want = f"{socket.htonl(int.from_bytes(socket.inet_aton(host), 'big')):08X}:{port:04X}"
    try:
        if prefix:
            text = subprocess.run([*prefix, "cat", "/proc/net/tcp"], capture_output=True, text=True, timeout=10).stdout
        else:
            text = Path("/proc/self/net/tcp").read_text()
    except (OSError, subprocess.TimeoutExpired):
        return False
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) > 3 and fields[1] == want and fields[3] == "0A":
            return True
    return False


def http_status(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=1) as r:
            return int(r.status)
    except urllib.error.HTTPError as e:
        return int(e.code)
    except OSError:
        return None


# ---- /proc accounting ---------------------------------------------------------------------------

CLK_TCK = os.sysconf("SC_CLK_TCK")


def process_tree(pid: int) -> list[int]:
    """pid and all its descendants (a proxy with worker processes counts as one)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def cpu_seconds(pid: int) -> float:
    total = 0.0
    for p in process_tree(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime
    return total


def cpu_rates(pids: dict[str, int], seconds: float) -> str:
    """vCPU each process uses over `seconds`: tells a busy loop (≈1) from a deadlock (≈0)."""
    before = {n: cpu_seconds(pid) for n, pid in pids.items()}
    time.sleep(seconds)
    return ", ".join(f"{n}={(cpu_seconds(pid) - before[n]) / seconds:.2f}" for n, pid in pids.items())


def rss_mb(pid: int) -> float:
    total_kib = 0
    for p in process_tree(pid):
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total_kib += int(line.split()[1])
        except OSError:
            continue
    return total_kib / 1024


# ---- certificates for the HAProxy peer ----------------------------------------------------------


def make_haproxy_certs(directory: Path) -> None:
    """A root and two ECDSA P-256 leaves (client and server), as PEM files haproxy reads."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = dt.datetime.now(dt.UTC)

    def key() -> ec.EllipticCurvePrivateKey:
        return ec.generate_private_key(ec.SECP256R1())

    def pem_key(k: ec.EllipticCurvePrivateKey) -> bytes:
        return k.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    root_key = key()
    root_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bench root")])
    root = (
        x509.CertificateBuilder()
        .subject_name(root_name)
        .issuer_name(root_name)
        .public_key(root_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .sign(root_key, hashes.SHA256())
    )
    (directory / "ca.pem").write_bytes(root.public_bytes(serialization.Encoding.PEM))
    for name, eku in (("client", ExtendedKeyUsageOID.CLIENT_AUTH), ("server", ExtendedKeyUsageOID.SERVER_AUTH)):
        k = key()
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{name}.bench.local")]))
            .issuer_name(root_name)
            .public_key(k.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(f"{name}.bench.local")]), critical=False)
            .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
            .sign(root_key, hashes.SHA256())
        )
        (directory / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM) + pem_key(k))


# ---- paths --------------------------------------------------------------------------------------


@dataclass
class PathSetup:
    """One way from the client to the app: where to connect, and which processes are the proxies."""

    name: str
    available: bool = True
    note: str = ""
    echo_target: str = ""  # loadgen TARGET
    iperf_host: str = ""
    iperf_port: int = 0
    proxies: dict[str, Proc] = field(default_factory=dict)  # proxy processes this run started
    external_pids: dict[str, int] = field(default_factory=dict)  # proxies someone else runs (the lab)
    entry: str = ""
    helpers: list[Proc] = field(default_factory=list)  # e.g. the SOCKS forwarder; stopped with the path
    client_prefix: list[str] = field(default_factory=list)  # e.g. `ip netns exec <client pod netns>`
    server_prefix: list[str] = field(default_factory=list)
    iperf_bind: str = ""  # address the per-test iperf3 server binds ("" = any, inside the server pod)
    restart_hook: Callable[[], None] | None = None  # restarts proxies this run does not own
    external_pid_source: Callable[[], dict[str, int]] | None = None  # current pids after such a restart

    def proxy_pids(self) -> dict[str, int]:
        external = self.external_pid_source() if self.external_pid_source else self.external_pids
        return {n: p.pid for n, p in self.proxies.items()} | external

    def stop(self) -> None:
        for proc in [*self.proxies.values(), *self.helpers]:
            proc.stop()


def setup_direct() -> PathSetup:
    return PathSetup(
        "direct",
        echo_target=f"{SERVER_POD}:{ECHO_PORT}",
        iperf_host=SERVER_POD,
        iperf_port=IPERF_PORT,
        entry="plain TCP to the app",
        iperf_bind=SERVER_POD,
    )


@dataclass(frozen=True, slots=True)
class HaproxyPlacement:
    """Where the two HAProxy processes listen and run, and where the app is."""

    a_addr: str = HAPROXY_A
    b_addr: str = HAPROXY_B
    app_addr: str = SERVER_POD
    a_prefix: tuple[str, ...] = ()  # e.g. `ip netns exec <node1 netns>`
    b_prefix: tuple[str, ...] = ()
    client_prefix: tuple[str, ...] = ()
    server_prefix: tuple[str, ...] = ()
    iperf_bind: str = SERVER_POD


def _haproxy_path(name: str, entry: str, at: HaproxyPlacement) -> tuple[PathSetup, str]:
    """The path record and the haproxy binary ("" and an unavailable path when it is not installed)."""
    binary = shutil.which("haproxy")
    if binary is None:
        return PathSetup(name, available=False, note="haproxy is not installed (bench/run installs it as root)"), ""
    path = PathSetup(
        name,
        entry=entry,
        client_prefix=list(at.client_prefix),
        server_prefix=list(at.server_prefix),
        iperf_bind=at.iperf_bind,
    )
    return path, binary


def _haproxy_config_head(maxconn: int) -> str:
    """One thread per process, like one node proxy worker; plain TCP mode."""
    return (
        f"global\n  maxconn {maxconn}\n  nbthread 1\n"
        "defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 5m\n  timeout server 5m\n"
    )


def setup_haproxy(group: ProcessGroup, maxconn: int, at: HaproxyPlacement | None = None) -> PathSetup:
    at = at or HaproxyPlacement()
    path, binary = _haproxy_path("haproxy", "haproxy A (TCP) -> mTLS 1.3 ECDSA P-256 -> haproxy B, nbthread 1 each", at)
    if not path.available:
        return path
    certs = group.workdir / "haproxy-certs"
    certs.mkdir(exist_ok=True)
    make_haproxy_certs(certs)
    a_cfg = b_cfg = _haproxy_config_head(maxconn)
    tls = f"ca-file {certs}/ca.pem verify required ssl-min-ver TLSv1.3"
    for port in (IPERF_PORT, ECHO_PORT):
        tls_port = port + TLS_PORT_OFFSET
        a_cfg += (
            f"frontend f{port}\n  bind {at.a_addr}:{port}\n  maxconn {maxconn}\n  default_backend b{port}\n"
            f"backend b{port}\n  server b {at.b_addr}:{tls_port} ssl crt {certs}/client.pem {tls} "
            "verifyhost server.bench.local\n"
        )
        b_cfg += (
            f"frontend f{port}\n  bind {at.b_addr}:{tls_port} ssl crt {certs}/server.pem {tls}\n"
            f"  maxconn {maxconn}\n  default_backend app{port}\n"
            f"backend app{port}\n  server app {at.app_addr}:{port}\n"
        )
    for side, cfg, prefix in (("a", a_cfg, at.a_prefix), ("b", b_cfg, at.b_prefix)):
        cfg_path = group.workdir / f"haproxy-{side}.cfg"
        cfg_path.write_text(cfg)
        path.proxies[side] = group.start(f"haproxy-{side}", [*prefix, binary, "-db", "-f", str(cfg_path)])
    b_port = ECHO_PORT + TLS_PORT_OFFSET
    wait_until(lambda: listening(at.b_addr, b_port, list(at.b_prefix)), 10, "haproxy B", path.proxies["b"])
    wait_until(lambda: listening(at.a_addr, ECHO_PORT, list(at.a_prefix)), 10, "haproxy A", path.proxies["a"])
    path.echo_target = f"{at.a_addr}:{ECHO_PORT}"
    path.iperf_host, path.iperf_port = at.a_addr, IPERF_PORT
    return path


def setup_haproxy_tcp(group: ProcessGroup, maxconn: int, at: HaproxyPlacement | None = None) -> PathSetup:
    """One haproxy relaying plain TCP to the app: no TLS, one hop. The machine's price of a relay in C."""
    at = at or HaproxyPlacement()
    entry = "one haproxy, plain TCP in and out (no TLS), nbthread 1: the floor of a relay in C (not a peer)"
    path, binary = _haproxy_path("haproxy-tcp", entry, at)
    if not path.available:
        return path
    cfg = _haproxy_config_head(maxconn)
    for port in (IPERF_PORT, ECHO_PORT):
        cfg += (
            f"frontend f{port}\n  bind {at.a_addr}:{port + RELAY_PORT_OFFSET}\n  maxconn {maxconn}\n"
            f"  default_backend b{port}\nbackend b{port}\n  server app {at.app_addr}:{port}\n"
        )
    cfg_path = group.workdir / "haproxy-tcp.cfg"
    cfg_path.write_text(cfg)
    path.proxies["relay"] = group.start("haproxy-tcp", [*at.a_prefix, binary, "-db", "-f", str(cfg_path)])
    echo_port = ECHO_PORT + RELAY_PORT_OFFSET
    wait_until(lambda: listening(at.a_addr, echo_port, list(at.a_prefix)), 10, "haproxy-tcp", path.proxies["relay"])
    path.echo_target = f"{at.a_addr}:{echo_port}"
    path.iperf_host, path.iperf_port = at.a_addr, IPERF_PORT + RELAY_PORT_OFFSET
    return path


CLUSTER_YAML = f"""\
apiVersion: v1
kind: Namespace
metadata:
  name: bench
  labels:
    istio.io/dataplane-mode: ambient
---
apiVersion: v1
kind: Node
metadata:
  name: a
status:
  addresses:
  - type: InternalIP
    address: {NODE_A}
---
apiVersion: v1
kind: Node
metadata:
  name: b
status:
  addresses:
  - type: InternalIP
    address: {NODE_B}
---
apiVersion: v1
kind: Pod
metadata:
  name: client
  namespace: bench
  labels:
    app: client
spec:
  nodeName: a
  serviceAccountName: client
status:
  podIP: {CLIENT_POD}
  podIPs:
  - ip: {CLIENT_POD}
---
apiVersion: v1
kind: Pod
metadata:
  name: server
  namespace: bench
  labels:
    app: server
spec:
  nodeName: b
  serviceAccountName: server
status:
  podIP: {SERVER_POD}
  podIPs:
  - ip: {SERVER_POD}
"""


def ztunnel_command() -> list[str] | None:
    exe = Path(PY).parent / "ztunnel"
    return [str(exe)] if exe.exists() else None


def proxy_cli_help(cmd: list[str]) -> str | None:
    """`ztunnel proxy --help`, or None while the proxy command does not exist yet."""
    try:
        r = subprocess.run([*cmd, "proxy", "--help"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return r.stdout if r.returncode == 0 else None


def setup_ztunnel(group: ProcessGroup, workers: int = 1) -> PathSetup:
    """The proxy pair in local mode; `workers` > 1 runs both proxies with `--workers N` (the scaling figure)."""
    cmd = ztunnel_command()
    if cmd is None:
        return PathSetup("ztunnel", available=False, note="the ztunnel console script is not in the venv")
    help_text = proxy_cli_help(cmd)
    if help_text is None:
        return PathSetup("ztunnel", available=False, note="`ztunnel proxy` is not available yet (the CLI lacks it)")
    missing = [f for f in ("--node", "--ca-dir", "--metrics-addr", "--readiness-addr") if f not in help_text]
    if workers > 1 and "--workers" not in help_text:
        missing.append("--workers")
    if missing:
        return PathSetup("ztunnel", available=False, note=f"`ztunnel proxy` lacks {', '.join(missing)}")
    cluster = group.workdir / "cluster.yaml"
    cluster.write_text(CLUSTER_YAML)
    ca_dir = group.workdir / "ca"
    r = subprocess.run(
        [*cmd, "ca", "init", "--dir", str(ca_dir), "--force"], capture_output=True, text=True, timeout=60
    )
    if r.returncode != 0:
        return PathSetup("ztunnel", available=False, note=f"`ztunnel ca init` failed: {r.stderr.strip()[-300:]}")
    path = PathSetup(
        "ztunnel",
        entry=f"SOCKS5 on the client pod ({CLIENT_POD}:15080), HBONE between the proxies",
        iperf_bind=SERVER_POD,
    )
    for node, addr in (("a", NODE_A), ("b", NODE_B)):
        argv = [*cmd, "--log-level", "warning", "proxy", "--node", node, "-f", str(cluster), "--ca-dir", str(ca_dir)]
        argv += ["--metrics-addr", f"{addr}:15020", "--readiness-addr", f"{addr}:15021"]
        if "--admin-addr" in help_text:
            argv += ["--admin-addr", f"{addr}:15000"]
        if "--access-log" in help_text:
            argv += ["--access-log", "off"]
        if workers > 1:
            argv += ["--workers", str(workers)]
        path.proxies[node] = group.start(f"ztunnel-{node}" + (f"-w{workers}" if workers > 1 else ""), argv)
    for node, addr in (("a", NODE_A), ("b", NODE_B)):
        try:
            wait_until(
                lambda addr=addr: http_status(f"http://{addr}:15021/healthz/ready") == 200,  # type: ignore[misc]
                60,
                f"proxy {node} ready",
                path.proxies[node],
            )
        except RuntimeError as e:
            return PathSetup("ztunnel", available=False, note=str(e)[:500])
    socks = f"socks5://{CLIENT_POD}:15080/"
    path.echo_target = f"{socks}{SERVER_POD}:{ECHO_PORT}"
    fwd = group.start(
        "forwarder", [PY, LOADGEN, "forward", f"{FORWARDER}:{IPERF_PORT}", f"{socks}{SERVER_POD}:{IPERF_PORT}"]
    )
    path.helpers.append(fwd)  # stopped with the path, so a rebuilt path can bind the same address
    wait_until(lambda: port_open(FORWARDER, IPERF_PORT), 10, "the SOCKS forwarder", fwd)
    path.iperf_host, path.iperf_port = FORWARDER, IPERF_PORT
    path.note = "entry via SOCKS5 (local mode); iperf3 reaches it through a splice(2) forwarder"
    if not probe_echo(path.echo_target):
        return PathSetup("ztunnel", available=False, note="a test connection through the proxy pair failed")
    return path


SCALING_WORKERS = (1, 2)
SCALING_STREAMS = 4


def worker_scaling(group: ProcessGroup, s: Settings) -> dict[str, Any]:
    """Throughput scaling, 1 vs 2 workers: `iperf3 -P 4` through the pair, both proxies at `--workers N`.

    Local topology only: the lab's proxies run in-pod mode, which `--workers` > 1 refuses. Each worker count
    gets a fresh pair (the main ztunnel path must be stopped first: same addresses); reps alternate so a drift
    of the machine hits both."""
    samples: dict[str, list[float | None]] = {str(n): [] for n in SCALING_WORKERS}
    cpu: dict[str, list[float | None]] = {str(n): [] for n in SCALING_WORKERS}  # vCPU of both proxies' trees
    notes: list[str] = []
    for rep in range(1, s.reps + 1):
        for n in SCALING_WORKERS:
            log(f"worker scaling rep {rep}/{s.reps}: --workers {n}")
            path = setup_ztunnel(group, workers=n)
            try:
                if not path.available:
                    notes.append(f"--workers {n}: {path.note}"[:400])
                    continue
                try:
                    pids = path.proxy_pids()
                    before, t0 = sum(cpu_seconds(pid) for pid in pids.values()), time.monotonic()
                    samples[str(n)].append(iperf3(group, path, SCALING_STREAMS, s.throughput_secs))
                    used = sum(cpu_seconds(pid) for pid in pids.values()) - before
                    cpu[str(n)].append(used / (time.monotonic() - t0))
                except Exception as e:
                    notes.append(f"rep {rep} --workers {n}: {e}"[:400])
            finally:
                path.stop()
    summary = {n: report.summarize(v) for n, v in samples.items()}
    base, top = (summary[str(n)] for n in (SCALING_WORKERS[0], SCALING_WORKERS[-1]))
    return {
        "figure": "Throughput scaling, 1 vs 2 workers",
        "streams": SCALING_STREAMS,
        "samples_gbps": samples,
        "summary_gbps": summary,
        "proxy_vcpu": {n: report.summarize(v) for n, v in cpu.items()},
        "speedup": report.ratio(top["median"] if top else None, base["median"] if base else None),
        "notes": notes,
    }


def render_worker_scaling(result: dict[str, Any]) -> str:
    scaling = result.get("worker_scaling")
    if not scaling:
        return ""
    lines = [
        "",
        f"### {scaling.get('figure', 'Throughput scaling, 1 vs 2 workers')}",
        "",
    ]
    if scaling.get("unavailable"):
        return "\n".join([*lines, f"not measured: {scaling['unavailable']}", ""])
    lines += [
        f"`iperf3 -P {scaling['streams']}` through the ztunnel pair (local topology, SOCKS5 entry), both proxies "
        f"at `--workers N`; median (min–max); this machine has {os.cpu_count()} CPUs for both proxies and the load",
        "",
        "| workers | throughput (Gbit/s) | CPU of both proxies during the test (vCPU) |",
        "| --- | --- | --- |",
    ]

    def cell(summ: dict[str, float] | None) -> str:
        return f"{summ['median']:.2f} ({summ['min']:.2f}–{summ['max']:.2f})" if summ else "n/a"

    for n, summ in scaling["summary_gbps"].items():
        lines.append(f"| {n} | {cell(summ)} | {cell(scaling.get('proxy_vcpu', {}).get(n))} |")
    speedup = scaling.get("speedup")
    lines += ["", f"speedup 2 vs 1 workers: {speedup:.2f}×" if speedup is not None else "speedup: n/a"]
    lines += [f"- {note}" for note in scaling.get("notes", [])]
    return "\n".join([*lines, ""])


def probe_path(path: PathSetup, timeout: float = 3.0) -> bool:
    """One connection through the path, proven by a 1-byte echo from the app."""
    if not path.client_prefix:
        return probe_echo(path.echo_target, timeout)
    argv = [*path.client_prefix, PY, LOADGEN, "connrate", path.echo_target, "--workers", "1", "--duration", "0.3"]
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=30)
        return json.loads(r.stdout)["connections"] > 0
    except (ValueError, KeyError, subprocess.TimeoutExpired):
        return False


def probe_echo(target: str, timeout: float = 3.0) -> bool:
    """One connection to `target` from this netns, proven by a 1-byte echo from the app."""
    t = loadgen.Target.parse(target)
    try:
        with socket.create_connection(t.connect_addr, timeout=timeout) as sock:
            sock.settimeout(timeout)
            if t.socks:
                sock.sendall(loadgen.socks5_connect_request(t.host, t.port))
                reply = b""
                while len(reply) < loadgen.SOCKS_REPLY_LEN:
                    chunk = sock.recv(loadgen.SOCKS_REPLY_LEN - len(reply))
                    if not chunk:
                        return False
                    reply += chunk
                if reply[1] != 0 or reply[3] != 0:
                    return False
            sock.sendall(b"x")
            return sock.recv(1) == b"x"
    except OSError:
        return False


# ---- measurements -------------------------------------------------------------------------------


def run_json(argv: list[str], timeout: float) -> dict[str, Any]:
    r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    lines = [line for line in r.stdout.splitlines() if line.startswith("{")]
    if r.returncode != 0 and not lines:
        raise RuntimeError(f"{Path(argv[0]).name} failed ({r.returncode}): {(r.stderr or r.stdout).strip()[-300:]}")
    if not lines:
        raise RuntimeError(f"{Path(argv[0]).name} printed no result: {r.stderr.strip()[-300:]}")
    return json.loads(lines[-1])


def iperf3(group: ProcessGroup, path: PathSetup, streams: int, secs: float) -> float:
    """One test against a fresh one-off iperf3 server, so a failed test cannot wedge the next one."""
    bind = ["-B", path.iperf_bind] if path.iperf_bind else []
    server = group.start("iperf3-server", [*path.server_prefix, "iperf3", "-s", "-1", *bind, "-p", str(IPERF_PORT)])
    try:
        wait_until(
            lambda: listening(path.iperf_bind or "0.0.0.0", IPERF_PORT, path.server_prefix),
            10,
            "the iperf3 server",
            server,
        )
        argv = [*path.client_prefix, "iperf3", "-c", path.iperf_host, "-p", str(path.iperf_port)]
        argv += ["-t", str(secs), "-P", str(streams)]
        argv += ["-J", "--connect-timeout", "5000"]
        try:
            r = subprocess.run(argv, capture_output=True, text=True, timeout=secs + 20)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"iperf3 did not finish within {secs + 20:.0f} s") from None
        try:
            data = json.loads(r.stdout)
        except ValueError:
            raise RuntimeError(f"iperf3 printed no JSON: {r.stderr.strip()[-300:]}") from None
        if "error" in data:
            raise RuntimeError(f"iperf3: {data['error']}")
        return float(data["end"]["sum_received"]["bits_per_second"]) / 1e9
    finally:
        server.stop()
        group.procs.remove(server)


def run_load(
    path: PathSetup, role: str, args: list[str], timeout: float
) -> tuple[dict[str, Any], dict[str, float], float]:
    """Run a loadgen role from the client side; its JSON, CPU seconds each proxy used meanwhile, wall time."""
    pids = path.proxy_pids()
    before = {n: cpu_seconds(pid) for n, pid in pids.items()}
    t0 = time.monotonic()
    out = run_json([*path.client_prefix, PY, LOADGEN, role, path.echo_target, *args], timeout=timeout)
    wall = time.monotonic() - t0
    return out, {n: cpu_seconds(pid) - before[n] for n, pid in pids.items()}, wall


def latency_with_cpu(path: PathSetup, s: Settings) -> dict[str, float | None]:
    load = s.latency_secs + s.latency_warmup
    out, used, wall = run_load(
        path,
        "latency",
        [
            *("--rate", str(s.latency_rate), "--conns", str(s.latency_conns)),
            *("--duration", str(s.latency_secs), "--warmup", str(s.latency_warmup)),
        ],
        timeout=load + 60,
    )
    rtt = out["rtt_us"]
    result: dict[str, float | None] = {
        "latency_p50_us": rtt.get("p50"),
        "latency_p90_us": rtt.get("p90"),
        "latency_p99_us": rtt.get("p99"),
        "cpu_s_per_1000_req": None,
        "cpu_vcpu_at_1000rps": None,
    }
    if used:
        requests = s.latency_rate * load
        result["cpu_s_per_1000_req"] = sum(used.values()) / (requests / 1000)
        # the load ran for latency+warmup seconds; process start/exit of the client add a little wall
        result["cpu_vcpu_at_1000rps"] = max(used.values()) / min(wall, load + 0.5)
    return result


def connrate(path: PathSetup, s: Settings) -> dict[str, float | None]:
    out, used, wall = run_load(
        path,
        "connrate",
        ["--workers", str(s.connrate_workers), "--duration", str(s.connrate_secs)],
        timeout=s.connrate_secs + 60,
    )
    busiest = max(used.values(), default=None)
    return {
        "conn_per_s": out["per_second"],
        "connect_p99_ms": out["connect_ms"].get("p99"),
        # not in the table: tells whether the rate was limited by the proxy (≈1 vCPU) or elsewhere
        "connrate_busiest_proxy_vcpu": None if busiest is None else busiest / wall,
    }


def held_connections_rss(path: PathSetup, count: int) -> dict[str, Any]:
    """RSS of the proxies before and while `count` proxied connections are open."""
    pids = path.proxy_pids()
    gone = [n for n, pid in pids.items() if not Path(f"/proc/{pid}").exists()]
    if gone:
        raise RuntimeError(f"proxy {', '.join(gone)} is not running")
    idle = {n: rss_mb(pid) for n, pid in pids.items()}
    proc = subprocess.Popen(
        [*path.client_prefix, PY, LOADGEN, "hold", path.echo_target, "--count", str(count), "--parallel", "200"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stdin is not None
        line = proc.stdout.readline()
        ready = json.loads(line) if line.startswith("{") else {"ready": 0, "errors": count}
        time.sleep(0.5)  # let the proxies finish any per-connection allocation after the echo
        loaded = {n: rss_mb(pid) for n, pid in pids.items()}
        proc.stdin.close()
        proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    held = int(ready.get("ready", 0))
    per_conn = {n: (loaded[n] - idle[n]) * 1024 / held if held else None for n in pids}
    values = [v for v in per_conn.values() if v is not None]
    return {
        "held": held,
        "errors": ready.get("errors"),
        "rss_before_mb": idle,
        "rss_loaded_mb": loaded,
        "rss_per_conn_kib_by_proxy": per_conn,
        "rss_per_conn_kib": max(values) if values else None,
    }


def run_policy_bench(quick: bool) -> dict[str, Any] | None:
    script = HERE / "policy_bench.py"
    if not script.exists():
        return None
    argv = [PY, str(script), *(["--quick"] if quick else [])]
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=300, cwd=ROOT)
        if r.returncode != 0 and quick:  # it may not know --quick
            r = subprocess.run(argv[:2], capture_output=True, text=True, timeout=300, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"summary": "timed out after 300 s", "ok": False}
    parsed: Any = None
    for line in reversed(r.stdout.splitlines()):
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                parsed = json.loads(line)
                break
    if parsed is None:
        with contextlib.suppress(ValueError):
            parsed = json.loads(r.stdout)
    text = r.stdout.strip()
    return {
        "ok": r.returncode == 0,
        "result": parsed,
        "output": text[-4000:],
        "summary": parsed.get("summary", "see JSON")
        if isinstance(parsed, dict)
        else (text.splitlines()[-1] if text else r.stderr.strip()[-300:]),
    }


# ---- the run ------------------------------------------------------------------------------------


def tool_versions() -> dict[str, str]:
    out = {}
    for tool, argv in (("haproxy", ["haproxy", "-v"]), ("iperf3", ["iperf3", "--version"])):
        try:
            r = subprocess.run(argv, capture_output=True, text=True, timeout=10)
            out[tool] = (r.stdout or r.stderr).splitlines()[0].strip()
        except (OSError, IndexError, subprocess.TimeoutExpired):
            out[tool] = "missing"
    return out


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


Builders = dict[str, Callable[[], PathSetup]]


LAB_YAML = """\
# The benchmark's two-node lab: a mesh pair (namespace bench) and a plain pair (namespace plain) with
# the clients on node1 and the servers on node2. Apps are started by bench/run.py inside the pods.
apiVersion: v1
kind: Namespace
metadata:
  name: bench
  labels:
    istio.io/dataplane-mode: ambient
---
apiVersion: v1
kind: Namespace
metadata:
  name: plain
---
apiVersion: v1
kind: Node
metadata:
  name: node1
---
apiVersion: v1
kind: Node
metadata:
  name: node2
"""
for _ns in ("bench", "plain"):
    for _role, _node in (("client", "node1"), ("server", "node2"), ("server-local", "node1")):
        LAB_YAML += f"""---
apiVersion: v1
kind: Pod
metadata:
  name: {_role}
  namespace: {_ns}
  labels:
    app: {_role}
spec:
  nodeName: {_node}
  serviceAccountName: {_role}
  containers:
  - name: main
    command: [sleep, infinity]
"""
LAB_PREFIX = "zb"


def lab_available() -> bool:
    cmd = ztunnel_command()
    if cmd is None or os.geteuid() != 0:
        return False
    try:
        r = subprocess.run([*cmd, "lab", "up", "--help"], capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return r.returncode == 0


def netns_exec(ns: str) -> list[str]:
    return ["ip", "netns", "exec", ns]


class LabError(RuntimeError):
    """The lab could not be built; with --topology auto the run falls back to local mode."""


class LabTopology:
    """Two nodes of the netns lab (`ztunnel lab up`): pods on node1 talk to pods on node2 over the
    fabric; mesh pods go through in-pod iptables redirection and the two node proxies."""

    def __init__(self, redirect: str = "iptables", name: str = "") -> None:
        cmd = ztunnel_command()
        assert cmd is not None
        self.cmd = cmd
        self.name = name or f"{LAB_PREFIX}{os.getpid()}"
        self.ebpf_lab: LabTopology | None = None
        self.proxy_pids: dict[str, int] = {}
        self.redirect = redirect
        self.mode = f"netns lab `{self.name}` (two nodes, {redirect} redirection)"
        self.status: dict[str, Any] = {}
        self.up = False

    def _lab(self, *argv: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*self.cmd, "lab", *argv, "--name", self.name], capture_output=True, text=True, timeout=timeout
        )

    def remove_stale(self) -> None:
        """Labs of earlier bench runs whose process is gone (they crashed): take them down."""
        base = Path("/run/ztunnel-lab")
        for d in base.glob(f"{LAB_PREFIX}*") if base.exists() else []:
            pid = d.name[len(LAB_PREFIX) :].rstrip("e")
            if pid.isdigit() and not Path(f"/proc/{pid}").exists():
                subprocess.run([*self.cmd, "lab", "down", "--name", d.name], capture_output=True, timeout=120)

    def refresh(self) -> None:
        r = self._lab("status", "-o", "json", timeout=60)
        self.status = json.loads(r.stdout)

    def pod(self, namespace: str, name: str) -> dict[str, Any]:
        for p in self.status["pods"]:
            if p["namespace"] == namespace and p["name"] == name:
                return p
        raise RuntimeError(f"the lab has no pod {namespace}/{name}")

    def node(self, name: str) -> dict[str, Any]:
        for n in self.status["nodes"]:
            if n["name"] == name:
                return n
        raise RuntimeError(f"the lab has no node {name}")

    def start(self, group: ProcessGroup, maxconn: int) -> Builders:
        self.remove_stale()
        cluster = group.workdir / "lab-cluster.yaml"
        cluster.write_text(LAB_YAML)
        log(f"building the lab {self.name} (ztunnel lab up)")
        self.up = True
        r = self._lab("up", "-f", str(cluster), "--mesh", "auto", "--redirect", self.redirect, "--timeout", "120")
        if r.returncode != 0:
            raise LabError(f"`ztunnel lab up` failed: {(r.stderr or r.stdout).strip()[-500:]}")
        try:
            self.refresh()
        except (ValueError, subprocess.TimeoutExpired) as e:
            raise LabError(f"`ztunnel lab status` failed: {e}") from e
        for ns in ("bench", "plain"):
            client = self.pod(ns, "client")
            for key, value in (("net.ipv4.tcp_tw_reuse", "1"), ("net.ipv4.ip_local_port_range", "20000 65000")):
                subprocess.run([*netns_exec(client["netns"]), "sysctl", "-q", "-w", f"{key}={value}"], timeout=10)
            for pod in ("server", "server-local"):
                prefix = netns_exec(self.pod(ns, pod)["netns"])
                argv = [*prefix, PY, LOADGEN, "echo-server", f"0.0.0.0:{ECHO_PORT}"]
                echo = group.start(f"echo-{self.name}-{ns}-{pod}", argv)
                wait_until(lambda p=prefix: listening("0.0.0.0", ECHO_PORT, p), 10, f"the echo server in {ns}", echo)
        return {
            "direct": self.direct,
            "haproxy": lambda: self.haproxy(group, maxconn),
            "haproxy-tcp": lambda: self.haproxy_tcp(group, maxconn),
            "ztunnel": self.ztunnel,
            "ztunnel-ebpf": lambda: self.ebpf(group, maxconn),
            "waypoint": unavailable_waypoint,
            "direct-same-node": lambda: self.direct(same_node=True),
            "ztunnel-same-node": lambda: self.ztunnel(same_node=True),
        }

    def ebpf(self, group: ProcessGroup, maxconn: int) -> PathSetup:
        """The mesh pair in a second lab that redirects with eBPF instead of iptables."""
        missing = ebpf_redirect_missing() if self.redirect != "ebpf" else "the main lab already uses eBPF"
        if missing:
            return PathSetup("ztunnel-ebpf", available=False, note=missing)
        if self.ebpf_lab is None:
            self.ebpf_lab = LabTopology("ebpf", name=f"{self.name}e")
            try:
                self.ebpf_lab.start(group, maxconn)
            except Exception as e:
                return PathSetup("ztunnel-ebpf", available=False, note=f"the eBPF lab failed: {e}"[:500])
        path = self.ebpf_lab.ztunnel()
        path.name = "ztunnel-ebpf"
        return path

    def _pair(self, ns: str, same_node: bool = False) -> tuple[dict[str, Any], dict[str, Any]]:
        return self.pod(ns, "client"), self.pod(ns, "server-local" if same_node else "server")

    def direct(self, same_node: bool = False) -> PathSetup:
        client, server = self._pair("plain", same_node)
        ip = server["ips"][0]
        return PathSetup(
            "direct-same-node" if same_node else "direct",
            echo_target=f"{ip}:{ECHO_PORT}",
            iperf_host=ip,
            iperf_port=IPERF_PORT,
            entry="plain pods on node1" if same_node else "plain pods, node1 -> node2 over the lab fabric",
            client_prefix=netns_exec(client["netns"]),
            server_prefix=netns_exec(server["netns"]),
            iperf_bind=ip,
        )

    def haproxy(self, group: ProcessGroup, maxconn: int) -> PathSetup:
        path = setup_haproxy(group, maxconn, self._haproxy_placement())
        path.entry = "plain client pod -> haproxy on node1 -> mTLS 1.3 ECDSA P-256 -> haproxy on node2 -> plain pod"
        return path

    def haproxy_tcp(self, group: ProcessGroup, maxconn: int) -> PathSetup:
        path = setup_haproxy_tcp(group, maxconn, self._haproxy_placement())
        path.entry = "plain client pod -> haproxy on node1, plain TCP, no TLS -> plain pod on node2 (not a peer)"
        return path

    def _haproxy_placement(self) -> HaproxyPlacement:
        client, server = self._pair("plain")
        n1, n2 = self.node("node1"), self.node("node2")
        return HaproxyPlacement(
            a_addr=n1["address"],
            b_addr=n2["address"],
            app_addr=server["ips"][0],
            a_prefix=tuple(netns_exec(n1["netns"])),
            b_prefix=tuple(netns_exec(n2["netns"])),
            client_prefix=tuple(netns_exec(client["netns"])),
            server_prefix=tuple(netns_exec(server["netns"])),
            iperf_bind=server["ips"][0],
        )

    def ztunnel(self, same_node: bool = False) -> PathSetup:
        name = "ztunnel-same-node" if same_node else "ztunnel"
        self.refresh()
        client, server = self._pair("bench", same_node)
        if not (client["enrolled"] and server["enrolled"]):
            return PathSetup(name, available=False, note="the lab did not enroll the bench pods (mesh off?)")
        nodes = ("node1",) if same_node else ("node1", "node2")
        for node in nodes:
            proxy = self.node(node).get("proxy")
            if not proxy or not proxy.get("running"):
                return PathSetup(name, available=False, note=f"the lab runs no proxy on {node}")
            self.proxy_pids[node] = int(proxy["pid"])
        ip = server["ips"][0]
        entry = (
            f"mesh pods on node1, in-pod {self.redirect} redirection, node1's proxy on both ends"
            if same_node
            else f"mesh pods, in-pod {self.redirect} redirection, HBONE between the node1 and node2 proxies"
        )
        path = PathSetup(
            name,
            echo_target=f"{ip}:{ECHO_PORT}",
            iperf_host=ip,
            iperf_port=IPERF_PORT,
            external_pid_source=lambda: {n: self.proxy_pids[n] for n in nodes},
            entry=entry,
            client_prefix=netns_exec(client["netns"]),
            server_prefix=netns_exec(server["netns"]),
            iperf_bind=ip,
            restart_hook=self.restart_proxies,
        )
        if not probe_path(path):
            return PathSetup(name, available=False, note="a test connection through the proxy pair failed")
        return path

    def restart_proxies(self) -> None:
        """Restart both node proxies (a stalled pair); every mesh path then reads the new pids."""
        for node in ("node1", "node2"):
            self._lab("restart", "proxy", "--node", node, timeout=120)
        self.refresh()
        for node in ("node1", "node2"):
            proxy = self.node(node).get("proxy") or {}
            if "pid" in proxy:
                self.proxy_pids[node] = int(proxy["pid"])

    def close(self) -> None:
        if self.ebpf_lab is not None:
            self.ebpf_lab.close()
        if self.up:
            r = self._lab("down", timeout=180)
            if r.returncode != 0:
                log(f"warning: `ztunnel lab down --name {self.name}` failed: {r.stderr.strip()[-300:]}")


class LocalTopology:
    """Every path on loopback addresses in the current netns (the bench's own, as root)."""

    def __init__(self, netns: str | None) -> None:
        self.mode = f"local mode on loopback{' inside netns ' + netns if netns else ' (host namespace)'}"

    def start(self, group: ProcessGroup, maxconn: int) -> Builders:
        log(f"starting the app (echo server on {SERVER_POD}; iperf3 servers per test) in {group.workdir}")
        echo = group.start("echo-server", [PY, LOADGEN, "echo-server", f"{SERVER_POD}:{ECHO_PORT}"])
        wait_until(lambda: port_open(SERVER_POD, ECHO_PORT), 10, "the echo server", echo)
        return {
            "direct": setup_direct,
            "haproxy": lambda: setup_haproxy(group, maxconn),
            "haproxy-tcp": lambda: setup_haproxy_tcp(group, maxconn),
            "ztunnel": lambda: setup_ztunnel(group),
            "ztunnel-ebpf": lambda: PathSetup("ztunnel-ebpf", False, "needs the lab topology (in-pod redirection)"),
            "waypoint": lambda: unavailable_waypoint(),
            "direct-same-node": lambda: PathSetup("direct-same-node", False, "needs the lab topology (nodes)"),
            "ztunnel-same-node": lambda: PathSetup("ztunnel-same-node", False, "needs the lab topology (nodes)"),
        }

    def close(self) -> None:
        pass


def unavailable_waypoint() -> PathSetup:
    cmd = ztunnel_command()
    exists = False
    if cmd is not None:
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            exists = subprocess.run([*cmd, "waypoint", "--help"], capture_output=True, timeout=30).returncode == 0
    why = "the waypoint is not wired into the benchmark yet" if exists else "`ztunnel waypoint` does not exist yet"
    return PathSetup("waypoint", available=False, note=why)


def ebpf_redirect_missing() -> str | None:
    """Why the lab cannot use eBPF redirection here, or None if it can try."""
    import importlib.util

    if importlib.util.find_spec("bcc") is None:
        return "bcc (python3-bpfcc) is not importable, so eBPF redirection cannot load"
    if importlib.util.find_spec("ztunnel.redirect.ebpf") is None:
        return "eBPF redirection (ztunnel.redirect.ebpf) is not built yet"
    return None


def measure(args: argparse.Namespace, s: Settings, topology: LocalTopology | LabTopology) -> dict[str, Any]:
    raise_fd_limit()
    workdir = Path(tempfile.mkdtemp(prefix="ztbench-"))
    group = ProcessGroup(workdir)
    started = time.monotonic()
    cpu_at_start = host_cpu_ticks()
    paths: list[PathSetup] = []
    samples: dict[str, dict[str, list[float | None]]] = {}
    holds: dict[str, Any] = {}
    errors: list[str] = []
    idle_rss: dict[str, dict[str, float]] = {}
    policy = None
    scaling: dict[str, Any] | None = None
    try:
        # haproxy needs two descriptors per proxied connection and refuses to start past the limit
        fd_limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        maxconn = min(s.hold_count + 500, (fd_limit - 300) // 2)
        builders = topology.start(group, maxconn)
        for name in args.paths.split(","):
            log(f"setting up path {name}")
            try:
                path = builders[name]()
            except Exception as e:
                path = PathSetup(name, available=False, note=f"setup failed: {e}"[:500])
            if not path.available:
                log(f"  {name}: not available — {path.note}")
            paths.append(path)
            samples[name] = {m.key: [] for m in report.METRICS} | {"connrate_busiest_proxy_vcpu": []}
        live = [p for p in paths if p.available]
        time.sleep(1.0)  # let the proxies settle before the idle RSS reading
        idle_rss = {p.name: {n: rss_mb(pid) for n, pid in p.proxy_pids().items()} for p in live}

        for rep in range(1, s.reps + 1):
            for index, first in enumerate(live):
                log(f"rep {rep}/{s.reps} {first.name}")
                row = samples[first.name]
                row["rss_idle_mb"].append(max(idle_rss[first.name].values(), default=None))
                steps: list[tuple[str, Callable[[PathSetup], dict[str, float | None]]]] = [
                    ("throughput 1", lambda p: {"throughput_1_gbps": iperf3(group, p, 1, s.throughput_secs)}),
                    ("throughput 4", lambda p: {"throughput_4_gbps": iperf3(group, p, 4, s.throughput_secs)}),
                    ("latency", lambda p: latency_with_cpu(p, s)),
                    ("connrate", lambda p: connrate(p, s)),
                ]
                for what, step in steps:
                    path = live[index]
                    try:
                        for k, v in step(path).items():
                            row[k].append(v)
                        continue
                    except Exception as e:
                        errors.append(f"rep {rep} {path.name} {what}: {e}"[:400])
                        log(f"  {what} failed: {e}")
                    if path.proxy_pids() and not probe_path(path):
                        busy = cpu_rates(path.proxy_pids(), 1.0)
                        note = (
                            f"rep {rep} {path.name}: the path stopped passing traffic after {what} "
                            f"(proxy CPU while stalled: {busy}); restarted it"
                        )
                        errors.append(note)
                        log(f"  {note}")
                        path.stop()
                        if path.restart_hook is not None:
                            path.restart_hook()
                        rebuilt = builders[path.name]()
                        if rebuilt.available:
                            live[index] = rebuilt
                        else:
                            errors.append(f"{path.name}: restart failed: {rebuilt.note}"[:400])
                time.sleep(0.3)
        for path in live:
            if not path.proxy_pids():
                continue
            # haproxy, and a proxy serving both ends (same node), hold two descriptors per connection
            two_fds = path.name.startswith("haproxy") or path.name.endswith(report.SAME_NODE)
            count = min(s.hold_count, maxconn - 100) if two_fds else s.hold_count
            log(f"{path.name}: holding {count} connections")
            try:
                holds[path.name] = held_connections_rss(path, count)
                samples[path.name]["rss_per_conn_kib"].append(holds[path.name]["rss_per_conn_kib"])
            except Exception as e:
                errors.append(f"{path.name} hold: {e}"[:400])
        for path in live:
            for name, pid in path.proxy_pids().items():
                if not Path(f"/proc/{pid}").exists():
                    errors.append(f"{path.name} proxy {name} (pid {pid}) died during the run")
        if args.worker_scaling:
            if isinstance(topology, LocalTopology):
                for path in live:
                    if path.name == "ztunnel":
                        path.stop()  # the scaling pairs use the same addresses
                scaling = worker_scaling(group, s)
            else:
                why = "needs --topology local (the lab's proxies run in-pod mode, where --workers > 1 is refused)"
                scaling = {"unavailable": why}
        if not args.skip_policy:
            log("policy benchmark (bench/policy_bench.py)")
            policy = run_policy_bench(s.quick)
    finally:
        group.close()
        topology.close()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)

    summary = report.summarize_all(samples)
    available = [p.name for p in paths if p.available]
    now = dt.datetime.now(dt.UTC)
    return {
        "meta": {
            "date": now.strftime("%Y-%m-%d %H:%M UTC"),
            "quick": s.quick,
            "reps": s.reps,
            "settings": asdict(s),
            "mode": topology.mode,
            "host": {
                "kernel": platform.release(),
                "cpus": os.cpu_count(),
                "python": platform.python_version(),
                "machine": platform.machine(),
            },
            "tools": {**tool_versions(), "latency": "bench/loadgen.py latency (open-loop fixed rate, uvloop)"},
            "wall_seconds": round(time.monotonic() - started, 1),
            "host_steal_percent": steal_percent(cpu_at_start, host_cpu_ticks()),
            "errors": errors,
        },
        "paths": {
            p.name: {
                "available": p.available,
                "note": p.note,
                "entry": p.entry,
                "idle_rss_mb": idle_rss.get(p.name) if p.available else None,
            }
            for p in paths
        },
        "samples": samples,
        "summary": summary,
        "ratios": report.ratios(summary, available),
        "targets": (report.evaluate_targets(summary) if "ztunnel" in available else []) + report.policy_targets(policy),
        "holds": holds,
        "policy": policy,
        "worker_scaling": scaling,
    }


def host_cpu_ticks() -> list[int]:
    """The machine's CPU time counters (/proc/stat's `cpu` line): user, nice, system, idle, … steal."""
    try:
        with open("/proc/stat") as f:
            return [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return []


def steal_percent(before: list[int], after: list[int]) -> float | None:
    """Share of the run's CPU time the hypervisor gave to someone else: a noisy host shows here first."""
    if len(before) < 8 or len(after) < 8:
        return None
    total = sum(after[:8]) - sum(before[:8])
    return round(100.0 * (after[7] - before[7]) / total, 1) if total > 0 else None


def raise_fd_limit() -> None:
    """10,000 held connections need more than 20,000 descriptors in a proxy; root may raise the cap."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 65536
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, want), max(hard, want)))
    except (ValueError, OSError):  # no CAP_SYS_RESOURCE (e.g. a container): the hard limit is the cap
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def write_results(result: dict[str, Any], out_dir: Path) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d-%H%M%S")
    suffix = "-quick" if result["meta"]["quick"] else ""
    json_path = out_dir / f"{stamp}{suffix}.json"
    md_path = out_dir / f"{stamp}{suffix}.md"
    json_path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    table = report.render_markdown(result) + render_worker_scaling(result)
    md_path.write_text(table)
    (out_dir / ("latest-quick.md" if suffix else "latest.md")).write_text(table)
    return json_path, md_path


# ---- netns isolation (root) ---------------------------------------------------------------------


def _ip(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *argv], capture_output=True, text=True, check=check, timeout=30)


def remove_netns(name: str) -> None:
    """Stop what still runs in our namespace (only our processes live there), then delete it."""
    r = _ip("netns", "pids", name, check=False)
    for pid in r.stdout.split():
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)
    _ip("netns", "del", name, check=False)


def remove_stale_netns() -> None:
    """A crashed earlier run leaves `ztbench-<pid>` behind; its pid is gone, so it is ours to remove."""
    r = _ip("netns", "list", check=False)
    for line in r.stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        m = re.fullmatch(rf"{NETNS_PREFIX}(\d+)", name)
        if m and not Path(f"/proc/{m.group(1)}").exists():
            remove_netns(name)


@contextlib.contextmanager
def bench_netns() -> Iterator[str]:
    remove_stale_netns()
    name = f"{NETNS_PREFIX}{os.getpid()}"
    _ip("netns", "add", name)
    try:
        _ip("-n", name, "link", "set", "lo", "up")
        for key, value in (
            ("net.ipv4.tcp_tw_reuse", "1"),
            ("net.ipv4.ip_local_port_range", "20000 65000"),
            ("net.core.somaxconn", "8192"),
        ):
            subprocess.run(
                ["ip", "netns", "exec", name, "sysctl", "-q", "-w", f"{key}={value}"], check=False, timeout=10
            )
        yield name
    finally:
        remove_netns(name)


def can_use_netns() -> bool:
    return os.geteuid() == 0 and shutil.which("ip") is not None


# ---- dry run ----------------------------------------------------------------------------------


def dry_run(args: argparse.Namespace, s: Settings, out: TextIO) -> int:
    """Show the plan and render a report from synthetic figures: checks the harness without load."""
    wanted = args.paths.split(",")
    per_rep = 2 * s.throughput_secs + s.latency_secs + s.latency_warmup + s.connrate_secs + 6
    estimate = len(wanted) * s.reps * per_rep + len(wanted) * 15 + 20
    print(f"plan: paths {', '.join(wanted)}; {s.reps} repetitions; settings {asdict(s)}", file=out)
    print(f"plan: about {estimate / 60:.1f} minutes", file=out)
    topology = args.topology if args.topology != "auto" else ("lab" if lab_available() else "local")
    isolation = "netns" if can_use_netns() and not args.no_netns else "host loopback"
    print(f"plan: topology {topology}{'' if topology == 'lab' else ' (' + isolation + ')'}", file=out)
    for tool in (*BENCH_TOOLS, "ip"):
        print(f"tool {tool}: {shutil.which(tool) or 'missing'}", file=out)
    cmd = ztunnel_command()
    print(f"ztunnel proxy command: {'present' if cmd and proxy_cli_help(cmd) else 'not available yet'}", file=out)
    # The sample config must load: the ztunnel path depends on it.
    from ztunnel.config.loader import load_files

    with tempfile.TemporaryDirectory() as d:
        for name, text in (("local", CLUSTER_YAML), ("lab", LAB_YAML)):
            cfg = Path(d) / f"{name}.yaml"
            cfg.write_text(text)
            config = load_files([str(cfg)])
            client = config.workload("bench", "client")
            assert client is not None and client.enrolled, f"the {name} cluster lost the mesh client pod"
            print(f"{name} cluster: {len(config.workloads)} pods, mesh client {client.identity}", file=out)
    fake = {
        "direct": [9.0, 20.0, 60, 90, 200, None, None, None, None, 6000, 3.0],
        "haproxy": [3.0, 4.5, 150, 250, 500, 0.05, 0.04, 8.0, 30.0, 3000, 6.0],
        "haproxy-tcp": [6.0, 9.0, 100, 150, 300, 0.02, 0.02, 8.0, 30.0, 4000, 4.0],
        "ztunnel": [2.0, 3.0, 300, 500, 1200, 0.15, 0.12, 50.0, 12.0, 2000, 9.0],
    }
    samples = {
        p: {
            m.key: [None if v is None else v * f for f in (0.95, 1.0, 1.05)]
            for m, v in zip(report.METRICS, vs, strict=True)
        }
        for p, vs in fake.items()
    }
    summary = report.summarize_all(samples)
    result = {
        "meta": {"date": "dry run", "quick": s.quick, "reps": 3},
        "paths": {p: {"available": True, "note": ""} for p in fake} | {"waypoint": {"available": False, "note": "x"}},
        "summary": summary,
        "ratios": report.ratios(summary, list(fake)),
        "targets": report.evaluate_targets(summary)
        + report.policy_targets(
            {"result": {"results": [{"policies": 100, "median_us": 9.0}, {"policies": 10000, "median_us": 12.0}]}}
        ),
    }
    print(report.render_markdown(result), file=out)
    return 0


def measure_local(args: argparse.Namespace, s: Settings, argv: list[str] | None) -> dict[str, Any] | None:
    """The local topology; as root inside a netns of its own (this script again, run in there)."""
    if not can_use_netns() or args.no_netns:
        return measure(args, s, LocalTopology(None))
    with bench_netns() as ns, tempfile.NamedTemporaryFile(suffix=".json") as tmp:
        log(f"running inside network namespace {ns}")
        child = [PY, str(Path(__file__).resolve()), *(argv if argv is not None else sys.argv[1:])]
        child += ["--in-netns", ns, "--result-file", tmp.name]
        rc = subprocess.run(["ip", "netns", "exec", ns, *child], check=False).returncode
        if rc != 0:
            print(f"error: the benchmark inside {ns} failed (exit {rc})", file=sys.stderr)
            return None
        return json.loads(Path(tmp.name).read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Benchmark the node proxy pair against direct TCP and HAProxy.")
    parser.add_argument("--quick", action="store_true", help="short run (about 1–2 minutes)")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and a synthetic table; no load")
    parser.add_argument("--reps", type=int, default=0, help="repetitions (default 3, quick 2)")
    parser.add_argument("--hold", type=int, default=0, help="connections to hold for the RSS figure")
    parser.add_argument("--paths", default=",".join(ALL_PATHS), help="comma-separated subset of paths")
    parser.add_argument("--out", default=str(HERE / "results"), help="directory for <date>.json and .md")
    parser.add_argument(
        "--topology",
        choices=["auto", "lab", "local"],
        default="auto",
        help="lab: a two-node netns lab (`ztunnel lab`, root); local: loopback in local mode; auto: lab if possible",
    )
    parser.add_argument("--redirect", choices=["iptables", "ebpf"], default="iptables", help="lab redirection")
    parser.add_argument("--no-netns", action="store_true", help="local topology on the host's loopback even as root")
    parser.add_argument("--keep", action="store_true", help="keep the work dir (logs, configs)")
    parser.add_argument("--skip-policy", action="store_true", help="do not run bench/policy_bench.py")
    parser.add_argument(
        "--worker-scaling",
        action="store_true",
        help="also measure `Throughput scaling, 1 vs 2 workers` (iperf3 -P 4, proxies at --workers 1 and 2; "
        "local topology only)",
    )
    parser.add_argument("--in-netns", default="", help=argparse.SUPPRESS)
    parser.add_argument("--result-file", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    s = Settings.for_args(args)
    unknown = set(args.paths.split(",")) - set(ALL_PATHS)
    if unknown:
        parser.error(f"unknown path(s) {', '.join(sorted(unknown))}; choose from {', '.join(ALL_PATHS)}")

    if args.dry_run:
        return dry_run(args, s, sys.stdout)

    missing = [t for t in BENCH_TOOLS if shutil.which(t) is None]
    if "iperf3" in missing:
        print("error: iperf3 is missing; run bench/run (it installs haproxy and iperf3 as root)", file=sys.stderr)
        return 2

    if args.in_netns:  # the child half: measure, hand the result to the parent
        result = measure(args, s, LocalTopology(args.in_netns))
        Path(args.result_file).write_text(json.dumps(result, default=str))
        return 0

    topology = args.topology
    if topology == "auto":
        topology = "lab" if lab_available() else "local"
    result: dict[str, Any] | None = None
    fallback = ""
    if topology == "lab":
        if not lab_available():
            print("error: the lab needs root and `ztunnel lab`; use --topology local", file=sys.stderr)
            return 2
        try:
            result = measure(args, s, LabTopology(args.redirect))
        except LabError as e:
            if args.topology != "auto":
                print(f"error: {e}", file=sys.stderr)
                return 2
            fallback = f"the lab could not be built ({e}); this run used the local topology"
            log(fallback)
    if result is None:
        result = measure_local(args, s, argv)
        if result is None:
            return 1

    if fallback:
        result["meta"]["errors"].insert(0, fallback)
    json_path, md_path = write_results(result, Path(args.out))
    print(report.render_markdown(result) + render_worker_scaling(result))
    for e in result["meta"]["errors"]:
        print(f"warning: {e}", file=sys.stderr)
    log(f"wrote {json_path} and {md_path} in {result['meta']['wall_seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
