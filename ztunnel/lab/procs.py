"""Long-running lab processes: started in a netns, in their own process group, logged to a file, and
stopped by the pid recorded when they started (checked against the start time, so a recycled pid is safe)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from ztunnel.lab.model import ProcessRecord
from ztunnel.lab.netns import exec_prefix
from ztunnel.lab.state import LabState, updating


def start_time(pid: int) -> int | None:
    """Field 22 of /proc/PID/stat (start time in clock ticks), or None if no such live process."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw.rsplit(")", 1)[1].split()
    if fields[0] == "Z":  # exited, waiting to be reaped
        return None
    return int(fields[19])


def is_running(rec: ProcessRecord) -> bool:
    return start_time(rec.pid) == rec.start_time


def spawn(
    key: str,
    argv: Sequence[str],
    netns: str,
    log: Path,
    *,
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
    preexec: Callable[[], None] | None = None,
) -> ProcessRecord:
    """Start ARGV inside NETNS as the leader of a new session; stdout and stderr go to LOG (appended); PREEXEC
    runs in the child before exec (joining a cgroup)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    full = [*exec_prefix(netns), *argv]
    with open(log, "ab") as out:
        out.write(f"--- {time.strftime('%Y-%m-%dT%H:%M:%S')} starting: {' '.join(argv)}\n".encode())
        out.flush()
        proc = subprocess.Popen(
            full,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=dict(env) if env is not None else None,
            cwd=cwd,
            preexec_fn=preexec,
        )
    st = None
    deadline = time.monotonic() + 2.0
    while st is None and time.monotonic() < deadline:
        st = start_time(proc.pid)
        if st is None and proc.poll() is not None:
            break
    return ProcessRecord(key=key, pid=proc.pid, start_time=st or 0, argv=list(full), netns=netns, log=str(log))


def spawn_recorded(
    lab_dir: Path,
    state: LabState,
    key: str,
    argv: Sequence[str],
    netns: str,
    *,
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
    preexec: Callable[[], None] | None = None,
) -> ProcessRecord:
    """`spawn` with the log in the lab's log dir, recorded in the state file at once (so `down` stops it even
    if the command that started it crashes) and in STATE."""
    log = state.logs / (key.replace("/", "_") + ".log")
    rec = spawn(key, argv, netns, log, env=env, cwd=cwd, preexec=preexec)
    with updating(lab_dir) as st:
        st.processes[key] = rec
    state.processes[key] = rec
    return rec


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def terminate(records: Sequence[ProcessRecord], timeout: float = 5.0) -> None:
    """SIGTERM each record's process group, then SIGKILL what is left after TIMEOUT."""
    live = [r for r in records if is_running(r)]
    for r in live:
        _signal_group(r, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while live and time.monotonic() < deadline:
        for r in live:
            _reap(r.pid)
        live = [r for r in live if is_running(r)]
        if live:
            time.sleep(0.02)
    for r in live:
        _signal_group(r, signal.SIGKILL)
    for r in records:
        _wait_gone(r, 2.0)


def kill(records: Sequence[ProcessRecord]) -> None:
    """SIGKILL, the way a crash looks to everyone else."""
    for r in records:
        if is_running(r):
            _signal_group(r, signal.SIGKILL)
    for r in records:
        _wait_gone(r, 2.0)


def _signal_group(r: ProcessRecord, sig: signal.Signals) -> None:
    try:
        os.killpg(r.pid, sig)  # the process leads its own group (start_new_session)
    except ProcessLookupError:
        pass
    except PermissionError:
        try:
            os.kill(r.pid, sig)
        except ProcessLookupError:
            pass


def _wait_gone(r: ProcessRecord, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        _reap(r.pid)
        if not is_running(r):
            return
        time.sleep(0.01)


def kill_pids(pids: Sequence[int]) -> None:
    """Kill processes found inside the lab's namespaces after a crash (no records left to check against)."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def poll_until(check: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    """Call CHECK until it returns True or TIMEOUT passes; the interval keeps polling from eating a core."""
    deadline = time.monotonic() + timeout
    while True:
        if check():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def log_tail(path: str, lines: int = 15) -> str:
    """The end of a process's log, for an error that says why it exited or never got ready."""
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
