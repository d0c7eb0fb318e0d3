"""The processes a run starts (each logged to the work dir, stopped by pid) and waiting for them to be ready."""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


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
