"""What every measured path is: a `PathSetup` (where clients connect, which processes are the proxies) built
by a `PathKind` on a topology. A new path is a new module with its `PathKind`, listed in `bench.paths`."""

from __future__ import annotations

import json
import socket
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field

from bench import loadgen
from bench.processes import Proc, ProcessGroup
from bench.settings import HTTP_ALLOWED, HTTP_DENIED, LOADGEN, PY
from bench.topology.lab import LabTopology
from bench.topology.local import LocalTopology

Topology = LocalTopology | LabTopology


@dataclass
class PathSetup:
    """One way from the client to the app: where to connect, and which processes are the proxies."""

    name: str
    available: bool = True
    note: str = ""
    echo_target: str = ""  # loadgen TARGET of the echo app ("" for an HTTP-only path: no TCP figures)
    http_target: str = ""  # loadgen TARGET of the HTTP app through this path ("": no HTTP figures)
    http_host: str = "app"  # the Host header the HTTP requests carry
    h2c: bool = False  # the path carries HTTP/2 with prior knowledge too (the h2c figures)
    h2load_target: str = ""  # HOST:PORT h2load reaches the path at (it cannot speak SOCKS5: local mode's forwarder)
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



@dataclass(frozen=True, slots=True)
class PathContext:
    """What a path is built from: the topology it runs on, the run's processes, haproxy's connection cap."""

    topology: Topology
    group: ProcessGroup
    maxconn: int


@dataclass(frozen=True, slots=True)
class PathKind:
    """One measured path: its name (the table's column) and how it is set up; `build` returns an unavailable
    `PathSetup` with the reason when it cannot run here, and may raise (recorded as a failed setup)."""

    name: str
    build: Callable[[PathContext], PathSetup]


def unavailable(name: str, why: str) -> PathSetup:
    return PathSetup(name, available=False, note=why)


def probe_path(path: PathSetup, timeout: float = 3.0) -> bool:
    """One connection through the path, proven by a 1-byte echo from the app (an HTTP-only path: one
    allowed request answered 200)."""
    if not path.echo_target:
        try:
            return http_check(path, [HTTP_ALLOWED]) == [200]
        except RuntimeError:
            return False
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


def http_check(path: PathSetup, requests: list[str], h2c: bool = False) -> list[int]:
    """The status of each request ("METHOD PATH") sent through the path on one keep-alive connection (H2C:
    one stream each on one HTTP/2 prior-knowledge connection)."""
    argv = [*path.client_prefix, PY, LOADGEN, "http", path.http_target, "--host", path.http_host]
    argv += ["--check", ",".join(requests), *(["--h2c"] if h2c else [])]
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"HTTP check through {path.name} timed out after 30 s") from None
    try:
        return [int(c["status"]) for c in json.loads(r.stdout)["checks"]]
    except (ValueError, KeyError, TypeError):
        raise RuntimeError(f"HTTP check through {path.name} failed: {(r.stderr or r.stdout).strip()[-300:]}") from None


def require_policy(path: PathSetup) -> PathSetup:
    """The path as given if its L7 policy holds (the allowed request 200, each denied one 403, all on one
    keep-alive connection; over h2c too if the path carries it), else an unavailable path saying what came
    back, the path's processes stopped: never measure an open door."""
    want = [HTTP_ALLOWED, *HTTP_DENIED, HTTP_ALLOWED]
    expected = [200, *[403] * len(HTTP_DENIED), 200]
    for h2c in (False, True) if path.h2c else (False,):
        try:
            got = http_check(path, want, h2c=h2c)
        except RuntimeError as e:
            path.stop()
            return unavailable(path.name, str(e))
        if got != expected:
            path.stop()
            pairs = ", ".join(f"{r} -> {s}" for r, s in zip(want, got, strict=False))
            proto = "h2c" if h2c else "HTTP/1.1"
            return unavailable(path.name, f"the L7 policy check failed over {proto}: {pairs} (expected {expected})")
    return path
