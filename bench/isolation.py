"""The local topology's own network namespace (root only): the run happens inside `ztbench-<pid>`, which it
creates and removes (also one left by a crashed run), so it never touches the machine's network and can tune
that namespace's sysctls (TIME_WAIT reuse for the connection-rate test)."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

NETNS_PREFIX = "ztbench-"


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
