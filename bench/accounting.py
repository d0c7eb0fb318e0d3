"""What the proxies and the host use, read from /proc: CPU seconds and RSS of a process tree, host CPU steal."""

from __future__ import annotations

import os
import resource
import time
from pathlib import Path

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
