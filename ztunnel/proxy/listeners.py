"""Where a served workload's listening sockets and upstream connections come from.

The proxy never binds or connects on its own: a `ListenerFactory` hands it ready, listening sockets
for a workload (local mode: `<podIP>:port` on loopback; in-pod mode: sockets bound inside the pod's
netns by the in-pod code), and a `Connector` opens the upstream connections for that workload (local
mode: plain connects; in-pod mode: from inside the pod netns, with the client's source address).
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import socket
import struct
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from ztunnel.config.model import Workload
from ztunnel.errors import ZtunnelError
from ztunnel.net.listen import listen_on, listening_socket
from ztunnel.net.streams import TcpStream
from ztunnel.ports import DNS_PORT, HBONE_PORT, OUTBOUND_PORT, PLAINTEXT_INBOUND_PORT, SOCKS5_PORT

log = logging.getLogger("ztunnel.proxy")

SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h
IP6T_SO_ORIGINAL_DST = 80  # linux/netfilter_ipv6/ip6_tables.h


class Connector(Protocol):
    async def connect(self, address: tuple[str, int], *, source: tuple[str, int] | None = None) -> TcpStream: ...


class DirectConnector:
    """Connect from the proxy's own network namespace; the source address is the kernel's choice."""

    async def connect(self, address: tuple[str, int], *, source: tuple[str, int] | None = None) -> TcpStream:
        return await TcpStream.connect(address[0], address[1])


@dataclass
class WorkloadSockets:
    """Listening sockets for one workload, by role, plus how to reach upstreams on its behalf.

    Any list may be empty. Sockets must be bound and listening; the proxy takes ownership and closes them
    when the workload is removed.
    """

    hbone: list[socket.socket] = field(default_factory=list)  # HBONE inbound (15008)
    plaintext: list[socket.socket] = field(default_factory=list)  # plaintext inbound (15006, original dst)
    outbound: list[socket.socket] = field(default_factory=list)  # transparent outbound (15001, original dst)
    socks5: list[socket.socket] = field(default_factory=list)  # SOCKS5 outbound (15080, local mode)
    dns: list[tuple[socket.socket, socket.socket]] = field(default_factory=list)  # (UDP, TCP) on 15053, --dns
    connector: Connector = field(default_factory=DirectConnector)
    # Port the app is assumed to listen on when a plaintext connection has no original destination
    # (local mode, where nothing redirects): the pod's only declared containerPort, if any.
    fallback_port: int | None = None
    # eBPF redirection: where an outbound (15001) connection was going (from the node's pinned map; there is
    # no conntrack entry for SO_ORIGINAL_DST), and inbound connections steered by sk_lookup, whose local
    # address is their original destination (so local == original does not mean "not redirected").
    outbound_original_dst: Callable[[socket.socket], tuple[str, int] | None] | None = None
    preserves_destination: bool = False

    def outbound_destination(self, sock: socket.socket | None) -> tuple[str, int] | None:
        """Where a connection accepted on the outbound (15001) listener was going, when conntrack cannot say
        (eBPF redirection: the node's map)."""
        if sock is None or self.outbound_original_dst is None:
            return None
        return self.outbound_original_dst(sock)

    def inbound_destination(self, sock: socket.socket | None) -> tuple[str, int] | None:
        """Where a connection accepted on the plaintext (15006) listener was going, when conntrack cannot say:
        with sk_lookup steering, the socket's own local address (unless it is one of the proxy's ports)."""
        if sock is None or not self.preserves_destination:
            return None
        try:
            local = sock.getsockname()
        except OSError:
            return None
        return None if local[1] in PROXY_PORTS else (str(local[0]), int(local[1]))

    def all(self) -> list[socket.socket]:
        return [*self.hbone, *self.plaintext, *self.outbound, *self.socks5, *(s for pair in self.dns for s in pair)]

    def close(self) -> None:
        for s in self.all():
            s.close()


class ListenerFactory(Protocol):
    def sockets_for(self, workload: Workload) -> WorkloadSockets: ...


def dns_sockets(
    host: str,
    port: int,
    *,
    make: Callable[[int, int], socket.socket] = socket.socket,
    reuse_port: bool = False,
    v6only: bool = False,
    mark: int | None = None,
) -> tuple[socket.socket, socket.socket]:
    """A bound UDP socket and a TCP listener on host:port for the DNS server (`make(family, type)` makes
    them where they must live, e.g. in a pod's netns); both are closed if either step fails."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    udp = make(family, socket.SOCK_DGRAM)
    try:
        if mark is not None:
            udp.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
        if v6only:
            udp.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        if reuse_port:
            udp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        udp.bind((host, port))
        udp.setblocking(False)
        tcp = listen_on(make(family, socket.SOCK_STREAM), host, port, reuse_port=reuse_port, v6only=v6only, mark=mark)
    except BaseException:
        udp.close()
        raise
    return udp, tcp


def single_container_port(workload: Workload) -> int | None:
    ports = [
        int(p["containerPort"])
        for c in workload.containers
        for p in (c.get("ports") or ())
        if isinstance(p, dict) and isinstance(p.get("containerPort"), int)
    ]
    return ports[0] if len(ports) == 1 else None


class PodAddressRefused(ZtunnelError):
    """A pod IP local mode will not listen on (its SOCKS5 port has no authentication)."""


def local_mode_address_problem(ip: str) -> str | None:
    """Why local mode must not listen on `ip`, or None for a specific loopback address.

    Local mode's SOCKS5 port (15080) speaks with the pod's SVID to anyone who can reach it, so it may
    only listen where nothing outside this host can: 127.0.0.0/8 or ::1, never 0.0.0.0 or a real interface.
    """
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return "is not an IP address"
    if addr.is_unspecified:
        return "is the unspecified address (listening there would accept connections on every interface)"
    if not addr.is_loopback:
        return "is not a loopback address (listening there would accept connections from other hosts)"
    return None


class LocalListenerFactory:
    """Local mode: listen on each pod IP (loopback addresses only) at 15008, 15006 and 15080.

    `config_files` only name where pods come from in the error for a pod IP that is refused.
    """

    def __init__(
        self,
        *,
        hbone_port: int = HBONE_PORT,
        plaintext_port: int = PLAINTEXT_INBOUND_PORT,
        socks5_port: int = SOCKS5_PORT,
        connector_factory: Callable[[Workload], Connector] | None = None,
        config_files: Sequence[str] = (),
        reuse_port: bool = False,
        dns_port: int | None = None,  # `--dns`: the DNS server's UDP and TCP port on each pod IP
    ) -> None:
        self.dns_port = dns_port
        self.hbone_port = hbone_port
        # Worker processes (`ztunnel proxy --workers N`) each bind the same pod addresses; the kernel spreads
        # new connections over them.
        self.reuse_port = reuse_port
        self.plaintext_port = plaintext_port
        self.socks5_port = socks5_port
        self.connector_factory = connector_factory
        self.config_files = tuple(config_files)

    def check_addresses(self, workload: Workload) -> None:
        """Raise PodAddressRefused, naming the file, the pod and the field, for a pod IP that is not loopback."""
        for i, ip in enumerate(workload.ips):
            problem = local_mode_address_problem(ip)
            if problem is None:
                continue
            where = f" in {', '.join(self.config_files)}" if self.config_files else ""
            field_name = "status.podIP" if i == 0 else f"status.podIPs[{i}]"
            raise PodAddressRefused(
                f"Pod {workload.ref}{where}: {field_name} {ip} {problem}; local mode serves pods only on a "
                "specific loopback address because its SOCKS5 port (15080) has no authentication: set "
                f"{field_name} to an address in 127.0.0.0/8 (e.g. 127.0.10.1) or ::1, or run the proxy in "
                "in-pod mode (--inpod-socket)"
            )

    def sockets_for(self, workload: Workload) -> WorkloadSockets:
        self.check_addresses(workload)  # before binding anything
        out = WorkloadSockets(fallback_port=single_container_port(workload))
        if self.connector_factory is not None:
            out.connector = self.connector_factory(workload)
        try:
            for ip in workload.ips:
                reuse = self.reuse_port
                out.hbone.append(listening_socket(ip, self.hbone_port, reuse_port=reuse))
                out.plaintext.append(listening_socket(ip, self.plaintext_port, reuse_port=reuse))
                out.socks5.append(listening_socket(ip, self.socks5_port, reuse_port=reuse))
                if self.dns_port is not None:
                    out.dns.append(dns_sockets(ip, self.dns_port, reuse_port=reuse))
        except BaseException:
            out.close()
            raise
        return out


PROXY_PORTS = frozenset({OUTBOUND_PORT, PLAINTEXT_INBOUND_PORT, HBONE_PORT, DNS_PORT, SOCKS5_PORT})


def original_destination(sock: socket.socket | None) -> tuple[str, int] | None:
    """The address a redirected connection was sent to (iptables REDIRECT/TPROXY: conntrack), or None."""
    return None if sock is None else _conntrack_original_dst(sock)


def _conntrack_original_dst(sock: socket.socket) -> tuple[str, int] | None:
    try:
        if sock.family == socket.AF_INET6:
            raw = sock.getsockopt(socket.IPPROTO_IPV6, IP6T_SO_ORIGINAL_DST, 28)
            port = struct.unpack_from("!H", raw, 2)[0]
            ip = socket.inet_ntop(socket.AF_INET6, raw[8:24])
            return (ip, port)
        raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
        port = struct.unpack_from("!H", raw, 2)[0]
        ip = socket.inet_ntoa(raw[4:8])
        return (ip, port)
    except OSError as e:
        if e.errno in (errno.ENOENT, errno.ENOPROTOOPT, errno.EOPNOTSUPP):
            return None
        return None


async def serve_streams(
    sock: socket.socket, handler: Callable[[TcpStream], Awaitable[None]], *, tasks: set[asyncio.Task[None]]
) -> asyncio.Server:
    """Accept TCP connections on `sock`; run `handler(stream)` as a task per connection."""
    from ztunnel.net.streams import TcpStreamProtocol

    loop = asyncio.get_running_loop()

    async def guarded(stream: TcpStream) -> None:
        try:
            await handler(stream)
        except Exception:  # a bug in one connection's handling must not leak the socket or the task
            log.exception("connection handler failed")
            stream.abort()

    class _Accepting(TcpStreamProtocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(transport)
            stream = TcpStream(self.transport, self)  # type: ignore[arg-type]
            task = loop.create_task(guarded(stream))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    return await loop.create_server(_Accepting, sock=sock)


def close_sockets(socks: Iterable[socket.socket]) -> None:
    for s in socks:
        s.close()
