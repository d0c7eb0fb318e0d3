"""The node proxies' cgroups. iptables mode trusts the proxy's mark only on sockets of the proxy's cgroup (the agent
reads it from /proc/PID/cgroup of its peer), and in the lab every other process shares the root cgroup, so each
proxy gets one of its own: <cgroup2>/ztunnel-lab-<lab>/<node>-proxy. Named by the lab, not its state file, so
`lab down` finds them after a crash too.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

from ztunnel.redirect.ebpf import cgroup2_mount

PREFIX = "ztunnel-lab-"


def cgroup2_root() -> Path | None:
    """Where cgroup v2 is mounted (/sys/fs/cgroup, or /sys/fs/cgroup/unified on hybrid hosts); None if nowhere:
    the mount eBPF redirection attaches under, found the same way."""
    return cgroup2_mount()


def lab_cgroup(lab: str) -> Path | None:
    root = cgroup2_root()
    return root / f"{PREFIX}{lab}" if root is not None else None


def proxy_cgroup(lab: str, node: str) -> Path | None:
    """The (created) cgroup for NODE's proxy; None without cgroup v2 (the agent then warns of a shared cgroup)."""
    base = lab_cgroup(lab)
    if base is None:
        return None
    path = base / f"{node}-proxy"
    path.mkdir(parents=True, exist_ok=True)
    return path


def joiner(path: Path) -> Callable[[], None]:
    """A Popen preexec_fn that moves the child into PATH before it execs (so its first socket is already there)."""
    procs = str(path / "cgroup.procs")

    def join() -> None:
        with open(procs, "w") as f:
            f.write("0")  # cgroup v2: 0 is the writer itself

    return join


def remove(lab: str) -> int:
    """Remove the lab's cgroups, killing what still runs in them (after a crash); how many were removed."""
    base = lab_cgroup(lab)
    if base is None or not base.is_dir():
        return 0
    removed = 0
    for leaf in sorted((p for p in base.iterdir() if p.is_dir()), reverse=True):
        with contextlib.suppress(OSError):
            for pid in (leaf / "cgroup.procs").read_text().split():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)
        if _rmdir(leaf):
            removed += 1
    return removed + _rmdir(base)


def _rmdir(path: Path) -> bool:
    """rmdir, retried while killed processes finish leaving (a cgroup with members is EBUSY)."""
    deadline = time.monotonic() + 3.0
    while True:
        try:
            path.rmdir()
            return True
        except FileNotFoundError:
            return False
        except OSError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)
