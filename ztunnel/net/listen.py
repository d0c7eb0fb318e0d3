"""Listening TCP sockets, made one way for every listener of the proxy and the waypoint: reuse flags, an
optional SO_MARK and IP_TRANSPARENT, a bounded backlog, non-blocking, closed if any step fails."""

from __future__ import annotations

import socket

LISTEN_BACKLOG = 1024
IP_TRANSPARENT = 19  # linux/in.h


def listening_socket(host: str, port: int, *, reuse_port: bool = False, transparent: bool = False) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    return listen_on(sock, host, port, reuse_port=reuse_port, transparent=transparent)


def listen_on(
    sock: socket.socket,
    host: str,
    port: int,
    *,
    reuse_port: bool = False,
    transparent: bool = False,
    v6only: bool = False,
    mark: int | None = None,
) -> socket.socket:
    """Make `sock` (a new TCP socket, made wherever it must live) a non-blocking listener on host:port.

    The one recipe for every listener, local or inside a pod; `sock` is closed if any step fails.
    """
    try:
        if mark is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if transparent:
            sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
        if v6only:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((host, port))
        sock.listen(LISTEN_BACKLOG)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock
