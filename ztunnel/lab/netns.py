"""Network namespace mechanics for the lab: `ip` commands scoped to a named netns, and sockets opened inside one.

Every command here names the namespace it acts in (`ip -n NS ...` or `ip netns exec NS ...`), so nothing the
lab does can land in the machine's root network namespace by accident. `ip` is used rather than netlink
bindings because its behaviour is stable across kernel and library versions and its errors are readable.

This is the lab's only way into namespaces: every other lab module uses it (never `setns` or `ip` itself), so
moving the `setns`, `NetnsError` and HTTP-probe mechanics to a shared lower layer changes imports here only.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import socket
import subprocess
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from ztunnel.errors import ZtunnelError

NETNS_DIR = Path("/var/run/netns")
CLONE_NEWNET = 0x40000000


class NetnsError(ZtunnelError):
    """A namespace or link operation failed; the message holds the command and what it printed."""


def run(
    cmd: Sequence[str],
    *,
    input: str | None = None,
    env: Mapping[str, str] | None = None,
    check: bool = True,
    timeout: float = 30.0,
) -> subprocess.CompletedProcess[str]:
    """Run a short command and return its output; raise NetnsError naming the command if it fails."""
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
        raise NetnsError(f"{cmd[0]}: not installed; run scripts/setup.sh as root") from e
    except subprocess.TimeoutExpired as e:
        raise NetnsError(f"{' '.join(cmd)}: timed out after {timeout:.0f}s") from e
    if check and proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip()
        raise NetnsError(f"{' '.join(cmd)}: exit {proc.returncode}: {detail}")
    return proc


def ip(netns: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """`ip -n NETNS ARGS`: an iproute2 command that acts only inside NETNS."""
    if not netns:
        raise NetnsError("refusing to run an ip command without a namespace (the root netns is never changed)")
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

_libc = ctypes.CDLL(None, use_errno=True)
_setns_lock = threading.Lock()


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


@contextlib.contextmanager
def entered(netns: str) -> Iterator[None]:
    """Run the body with this thread inside NETNS, and always come back.

    Sockets created in the body stay in NETNS after we return, which is how the lab probes ports that are
    bound to a namespace's loopback. Only the calling thread moves; the lock keeps two probes from racing.
    """
    path = NETNS_DIR / netns
    with _setns_lock:
        home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        try:
            target = os.open(path, os.O_RDONLY)
        except OSError as e:
            os.close(home)
            raise NetnsError(f"netns {netns} does not exist") from e
        try:
            _setns(target)
            try:
                yield
            finally:
                _setns(home)
        finally:
            os.close(target)
            os.close(home)


def connect_in(netns: str, host: str, port: int, timeout: float = 1.0) -> socket.socket:
    """A TCP connection made from inside NETNS (raises OSError if it cannot be made)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with entered(netns):
        sock = socket.socket(family, socket.SOCK_STREAM)
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
    """A plain HTTP/1.0 GET from inside NETNS -> (status, body). Raises OSError on connection failure."""
    sock = connect_in(netns, host, port, timeout)
    try:
        authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        sock.sendall(f"GET {path} HTTP/1.0\r\nHost: {authority}\r\nConnection: close\r\n\r\n".encode())
        chunks = []
        while True:
            data = sock.recv(65536)
            if not data:
                break
            chunks.append(data)
    finally:
        sock.close()
    raw = b"".join(chunks)
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line = head.split(b"\r\n", 1)[0].split()
    if len(status_line) < 2 or not status_line[1].isdigit():
        raise OSError(f"not an HTTP response from {host}:{port}{path}")
    return int(status_line[1]), body.decode("utf-8", "replace")
