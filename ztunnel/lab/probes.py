"""Readiness checks the lab runs the way a kubelet would: HTTP and TCP from inside a namespace, unix sockets.

Each returns a plain bool so callers can poll it with a deadline (`procs.poll_until`).
"""

from __future__ import annotations

import socket
from pathlib import Path

from ztunnel.lab import netns
from ztunnel.lab.model import ContainerSpec


def http_ok(ns: str, host: str, port: int, path: str) -> bool:
    """A GET from inside NS answered with 2xx or 3xx (a kubelet httpGet probe)."""
    try:
        status, _ = netns.http_get(ns, host, port, path, timeout=1.0)
    except OSError:
        return False
    return 200 <= status < 400


def unix_connectable(path: Path) -> bool:
    """Something accepts connections on the unix socket PATH."""
    if not path.exists():
        return False
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(0.5)
        s.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        s.close()


def probe_port(port: object, c: ContainerSpec) -> int | None:
    """A probe's port as a number: given as one, as digits, or (a named port) the container's first port."""
    if isinstance(port, int):
        return port
    if isinstance(port, str) and port.isdigit():
        return int(port)
    return c.ports[0] if c.ports else None
