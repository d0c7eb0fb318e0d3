"""Network namespace mechanics for the lab: `ip` commands scoped to a named netns, and sockets opened inside one.

Every command here names the namespace it acts in (`ip -n NS ...` or `ip netns exec NS ...`), so nothing the
lab does can land in the machine's root network namespace by accident. `ip` is used rather than netlink
bindings because its behaviour is stable across kernel and library versions and its errors are readable.

This is the lab's only way into namespaces: every other lab module uses it (never `setns` or `ip` itself). Entering
a namespace (`setns`, `NetnsError`) and the HTTP client are the project's shared ones (`ztunnel.net`); what is the
lab's own is the `ip` side, whose failures are `LabCommandError`s.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

from ztunnel.errors import ZtunnelError
from ztunnel.net.http import http_request
from ztunnel.net.netns import NETNS_RUN_DIR, open_netns, socket_in_netns

NETNS_DIR = NETNS_RUN_DIR
NETNS_ETC_DIR = Path("/etc/netns")  # `ip netns exec NS` bind-mounts /etc/netns/NS/* over /etc/*
RESOLV_MARKER = "# written by ztunnel lab"  # only files that start with this are ever removed


class LabCommandError(ZtunnelError):
    """A command the lab ran (`ip`, `sysctl`, `umount`...) failed; the message holds the command and what it printed."""


def run(
    cmd: Sequence[str],
    *,
    input: str | None = None,
    env: Mapping[str, str] | None = None,
    check: bool = True,
    timeout: float = 30.0,
) -> subprocess.CompletedProcess[str]:
    """Run a short command and return its output; raise LabCommandError naming the command if it fails."""
    try:
        proc = subprocess.run(
            list(cmd),
            input=input,
            env=dict(env) if env is not None else None,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except FileNotFoundError as e:
        raise LabCommandError(f"{cmd[0]}: not installed; run scripts/setup.sh as root") from e
    except subprocess.TimeoutExpired as e:
        raise LabCommandError(f"{' '.join(cmd)}: timed out after {timeout:.0f}s") from e
    if check and proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip()
        raise LabCommandError(f"{' '.join(cmd)}: exit {proc.returncode}: {detail}")
    return proc


def ip(netns: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """`ip -n NETNS ARGS`: an iproute2 command that acts only inside NETNS."""
    if not netns:
        raise LabCommandError("refusing to run an ip command without a namespace (the root netns is never changed)")
    return run(["ip", "-n", netns, *args], check=check)


def exec_prefix(netns: str) -> list[str]:
    """The argv prefix that runs a command inside NETNS."""
    return ["ip", "netns", "exec", netns]


def netns_exec(
    netns: str, *args: str, check: bool = True, input: str | None = None, timeout: float = 30.0
) -> subprocess.CompletedProcess[str]:
    return run([*exec_prefix(netns), *args], check=check, input=input, timeout=timeout)


def list_netns() -> list[str]:
    """Names under /var/run/netns (what `ip netns list` prints, without ids)."""
    try:
        return sorted(p.name for p in NETNS_DIR.iterdir())
    except FileNotFoundError:
        return []


def netns_exists(name: str) -> bool:
    return (NETNS_DIR / name).exists()


def add_netns(name: str) -> None:
    """Create NAME with its loopback up; its sysctls start from the kernel defaults, not the root netns'."""
    run(["ip", "netns", "add", name])
    ip(name, "link", "set", "lo", "up")


def delete_netns(name: str) -> None:
    """Delete NAME if it exists; its interfaces (and veth peers elsewhere) go with it."""
    if netns_exists(name):
        run(["ip", "netns", "delete", name], check=False)
        if netns_exists(name):  # a stale mount point left by a crash: unmount and remove the file
            run(["umount", "-l", str(NETNS_DIR / name)], check=False)
            with contextlib.suppress(OSError):
                (NETNS_DIR / name).unlink()


def write_resolv_conf(netns: str, text: str) -> Path:
    """/etc/netns/NETNS/resolv.conf: what processes started with `ip netns exec NETNS` see as /etc/resolv.conf."""
    d = NETNS_ETC_DIR / netns
    d.mkdir(parents=True, exist_ok=True)
    path = d / "resolv.conf"
    tmp = d / ".resolv.conf.tmp"
    tmp.write_text(f"{RESOLV_MARKER}\n{text}")
    tmp.chmod(0o644)
    os.replace(tmp, path)
    return path


def remove_resolv_conf(netns: str) -> bool:
    """Remove /etc/netns/NETNS if the lab wrote it (its resolv.conf carries the marker and it holds nothing else)."""
    d = NETNS_ETC_DIR / netns
    path = d / "resolv.conf"
    try:
        if not path.read_text().startswith(RESOLV_MARKER):
            return False
    except OSError:
        return False
    path.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        d.rmdir()  # left in place if someone else put files there
    return True


def etc_netns_dirs(prefix: str) -> list[str]:
    """Names under /etc/netns that start with PREFIX (a crashed lab's resolv.conf dirs)."""
    try:
        return sorted(p.name for p in NETNS_ETC_DIR.iterdir() if p.name.startswith(prefix))
    except FileNotFoundError:
        return []


def set_sysctl(netns: str, key: str, value: str) -> None:
    """Set a sysctl inside NETNS only (net.* sysctls are per namespace)."""
    netns_exec(netns, "sysctl", "-q", "-w", f"{key}={value}")


def netns_inode(name: str) -> int | None:
    try:
        return os.stat(NETNS_DIR / name).st_ino
    except OSError:
        return None


def pids_in_netns(names: Sequence[str]) -> list[int]:
    """Processes whose network namespace is one of NAMES (used to clean up after a crashed run)."""
    inodes = {i for i in (netns_inode(n) for n in names) if i is not None}
    if not inodes:
        return []
    out = []
    me = os.getpid()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            if os.stat(entry / "ns" / "net").st_ino in inodes:
                out.append(int(entry.name))
        except OSError:
            continue
    return out


# ---- sockets opened inside a namespace --------------------------------------------------------------------


def connect_in(netns: str, host: str, port: int, timeout: float = 1.0) -> socket.socket:
    """A TCP connection made from inside NETNS (raises OSError if it cannot be made, NetnsError if NETNS is gone).

    The socket is created inside NETNS and stays there, which is how the lab reaches ports bound to a namespace's
    loopback; only the calling thread enters it, and only for the `socket()` call.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    fd = open_netns(str(NETNS_DIR / netns))
    try:
        sock = socket_in_netns(fd, family)
    finally:
        os.close(fd)
    try:
        sock.settimeout(timeout)
        sock.connect((host, port))
    except OSError:
        sock.close()
        raise
    return sock


def tcp_open(netns: str, host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        connect_in(netns, host, port, timeout).close()
    except OSError:
        return False
    return True


def http_get(netns: str, host: str, port: int, path: str, timeout: float = 2.0) -> tuple[int, str]:
    """A GET from inside NETNS -> (status, body). Raises OSError if it cannot be made or is not answered in HTTP."""
    sock = connect_in(netns, host, port, timeout)
    response = http_request(host, port, "GET", path, timeout=timeout, sock=sock)
    return response.status, response.body.decode("utf-8", "replace")


# ---- eBPF mode: the lab's bpffs ------------------------------------------------------------------------------


def lab_bpffs(lab_dir: Path) -> Path:
    """A bpf filesystem of the lab's own, mounted in the machine's mount namespace under its state dir, where
    its node agents pin their maps and links (a directory per node) and its proxies find them.

    Not /sys/fs/bpf: `ip netns exec` (how the lab starts every component) gives each process a fresh /sys,
    without the machine's bpffs or cgroup mounts; a mount under /run stays visible to all of them. And one
    instance per lab makes removal whole: unmounting it releases every map and link pinned there (the
    programs detach), after a crashed run too."""
    return lab_dir / "bpffs"


def mounted(path: Path) -> bool:
    try:
        lines = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return False
    return any(line.split()[1] == str(path) for line in lines if len(line.split()) > 1)


def mount_bpffs(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    if not mounted(path):
        run(["mount", "-t", "bpf", "bpf", str(path)])


def unmount_bpffs(path: Path) -> None:
    """Unmount the lab's bpffs (every pin in it goes); a no-op when it is not mounted."""
    while mounted(path):
        if run(["umount", "-l", str(path)], check=False).returncode != 0:
            break
    with contextlib.suppress(OSError):
        path.rmdir()
