"""The node proxy's DNS for enrolled pods (DESIGN §4.6, port 15053): the model's names, the rest forwarded.

`DnsTable` is a pure function of a `ClusterConfig` (rebuilt on each config change, looked up per
query); `DnsServer` does the I/O: UDP and TCP listeners per pod and the forwarding of other names to
the node's resolver, bounded in flight, SERVFAIL on timeout.

Forwarding keeps the transport's promise: a query that came over TCP goes to the upstream over TCP (its
asker takes up to 64 KiB and cannot retry anywhere else); one that came over UDP goes over UDP, and when
that answer is truncated (TC) it is asked again over TCP, the full answer going back if it fits the asker's
UDP size (512, or its EDNS(0) size), the truncated one otherwise (the asker then retries over TCP itself).
Each upstream exchange is bounded in time (`timeout`), size (one message, 64 KiB at most) and number (TCP
exchanges at once: `max_tcp_upstream`; over it a TCP asker gets SERVFAIL, a UDP one the truncated answer).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import random
import socket
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

from ztunnel.config.model import ClusterConfig
from ztunnel.net import dns

log = logging.getLogger("ztunnel.dns")

DEFAULT_DOMAIN = "cluster.local"
ANSWER_TTL = 30  # seconds: short, the model changes under the names
FORWARD_TIMEOUT = 2.0
MAX_IN_FLIGHT = 256  # forwarded queries at once, per server; over it the reply is SERVFAIL
MAX_TCP_CONNECTIONS = 64
MAX_TCP_UPSTREAM = 32  # TCP exchanges with the upstream resolver at once, per server


@dataclass(frozen=True)
class Resolution:
    """What to do with a query: answer (rcode + addresses) or forward it upstream."""

    forward: bool
    rcode: int = dns.RCODE_NOERROR
    addresses: tuple[str, ...] = ()


FORWARD = Resolution(forward=True)


@dataclass(frozen=True)
class DnsTable:
    domain: str
    names: Mapping[str, tuple[str, ...]]  # full name (lower case, no trailing dot) -> addresses
    nodes: frozenset[str] = field(default_factory=frozenset)  # every name with something below it

    @classmethod
    def from_config(cls, config: ClusterConfig, domain: str = DEFAULT_DOMAIN) -> DnsTable:
        """`<svc>.<ns>.svc.<domain>` -> ClusterIPs, `<ip-dashed>.<ns>.pod.<domain>` -> the pod's IP."""
        names: dict[str, list[str]] = {}
        for svc in config.services:
            if svc.cluster_ips:
                names.setdefault(f"{svc.name}.{svc.namespace}.svc.{domain}".lower(), []).extend(svc.cluster_ips)
        for wl in config.workloads:
            for ip in wl.ips:
                dashed = ip.replace(".", "-").replace(":", "-")
                names.setdefault(f"{dashed}.{wl.namespace}.pod.{domain}".lower(), []).append(ip)
        nodes: set[str] = set()
        for name in names:
            labels = name.split(".")
            nodes.update(".".join(labels[i:]) for i in range(1, len(labels)))
        return cls(domain, {k: tuple(dict.fromkeys(v)) for k, v in names.items()}, frozenset(nodes))

    def _in_zone(self, name: str) -> bool:
        return name == self.domain or name.endswith("." + self.domain)

    def _answer(self, name: str, qtype: int) -> Resolution:
        addresses = self.names.get(name)
        if addresses is None:
            if name in self.nodes or name == self.domain:
                return Resolution(False)  # an empty non-terminal: NOERROR, no data
            return Resolution(False, dns.RCODE_NXDOMAIN)
        want = 4 if qtype == dns.TYPE_A else 6
        return Resolution(False, addresses=tuple(a for a in addresses if ipaddress.ip_address(a).version == want))

    def resolve(self, name: str, qtype: int, qclass: int, namespace: str | None) -> Resolution:
        """Names of the model are answered (A/AAAA), other names and types go to the upstream resolver.

        `namespace` is the asking pod's: a short name (`svc`, `svc.ns`, `svc.ns.svc`) is tried
        through its search path the way the pod's resolver would, answered under the name it asked.
        """
        if qclass != dns.CLASS_IN:
            return FORWARD
        is_addr = qtype in (dns.TYPE_A, dns.TYPE_AAAA)
        if self._in_zone(name):
            if not is_addr and name in self.names:
                return FORWARD  # SRV, TXT... of our names: the cluster's own DNS may know them
            return self._answer(name, qtype) if is_addr else Resolution(False, dns.RCODE_NXDOMAIN)
        if is_addr and namespace is not None and name:
            for suffix in (f"{namespace}.svc.{self.domain}", f"svc.{self.domain}", self.domain):
                if f"{name}.{suffix}" in self.names:
                    return self._answer(f"{name}.{suffix}", qtype)
        return FORWARD


def upstream_from_resolv_conf(path: Path = Path("/etc/resolv.conf")) -> tuple[str, int] | None:
    """The first nameserver of the proxy's own resolv.conf (the node's resolver), or None."""
    try:
        text = path.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] == "nameserver":
            return (parts[1], 53)  # a link-local address keeps its %zone, which connect needs
    return None


class DnsServer:
    """Answers queries from the table of the moment; `namespace_of` names the asking pod's namespace."""

    def __init__(
        self,
        table: Callable[[], DnsTable],
        upstream: tuple[str, int] | None,
        *,
        timeout: float = FORWARD_TIMEOUT,
        max_in_flight: int = MAX_IN_FLIGHT,
        max_tcp_upstream: int = MAX_TCP_UPSTREAM,
    ) -> None:
        self._table = table
        self._upstream = upstream
        self._timeout = timeout
        self._slots = asyncio.Semaphore(max_in_flight)
        self._tasks: set[asyncio.Task[None]] = set()
        self._servers: dict[str, list[asyncio.AbstractServer]] = {}  # by key (the pod's uid)
        self._transports: dict[str, list[asyncio.DatagramTransport]] = {}
        self._tcp_slots = asyncio.Semaphore(MAX_TCP_CONNECTIONS)
        self._tcp_upstream = asyncio.Semaphore(max_tcp_upstream)

    async def answer(self, data: bytes, namespace: str | None, *, limit: int, tcp: bool = False) -> bytes | None:
        """The reply to one message (None: nothing to send back); `tcp`: it came over TCP."""
        try:
            query = dns.parse_query(data)
        except dns.DnsFormatError:
            return dns.formerr_for(data)
        verdict = self._table().resolve(query.name, query.qtype, query.qclass, namespace)
        if not verdict.forward:
            return dns.build_response(query, verdict.rcode, verdict.addresses, ttl=ANSWER_TTL, limit=limit)
        return await self._forward(query, data, tcp=tcp)

    async def _forward(self, query: dns.Query, data: bytes, *, tcp: bool) -> bytes:
        """Relay to the upstream resolver, over the asker's transport (see the module's docstring); SERVFAIL
        when it fails."""
        servfail = dns.build_response(query, dns.RCODE_SERVFAIL, authoritative=False)
        if self._upstream is None or self._slots.locked():
            return servfail
        async with self._slots:
            if tcp:
                return await self._over_tcp(query, data) or servfail
            reply = await self._over_udp(query, data)
            if reply is None:
                return servfail
            if dns.is_truncated(reply):
                full = await self._over_tcp(query, data)
                if full is not None and len(full) <= dns.udp_payload_size(data, query):
                    return full
            return reply

    async def _over_udp(self, query: dns.Query, data: bytes) -> bytes | None:
        """One exchange over UDP from a fresh port and id: the reply under the asker's id, or None."""
        assert self._upstream is not None
        loop = asyncio.get_running_loop()
        family = socket.AF_INET6 if ":" in self._upstream[0] else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        sock.setblocking(False)
        upstream_id = random.getrandbits(16)
        try:
            await loop.sock_connect(sock, self._upstream)
            await loop.sock_sendall(sock, struct.pack("!H", upstream_id) + data[2:])
            async with asyncio.timeout(self._timeout):
                while True:
                    reply = await loop.sock_recv(sock, dns.MAX_MESSAGE)
                    if dns.response_id(reply) == upstream_id:
                        return struct.pack("!H", query.id) + reply[2:]
        except (OSError, TimeoutError) as exc:
            log.debug("dns forward of %s to %s over UDP failed: %r", query.name, self._upstream, exc)
            return None
        finally:
            sock.close()

    async def _over_tcp(self, query: dns.Query, data: bytes) -> bytes | None:
        """One exchange over a new TCP connection (RFC 7766 framing), within the timeout and the TCP bound:
        the reply under the asker's id, or None (also when `max_tcp_upstream` exchanges are under way)."""
        assert self._upstream is not None
        if self._tcp_upstream.locked():
            log.debug("dns forward of %s over TCP refused: the TCP exchanges are all in use", query.name)
            return None
        async with self._tcp_upstream:
            upstream_id = random.getrandbits(16)
            message = struct.pack("!H", upstream_id) + data[2:]
            writer: asyncio.StreamWriter | None = None
            try:
                async with asyncio.timeout(self._timeout):
                    reader, writer = await asyncio.open_connection(*self._upstream)
                    writer.write(struct.pack("!H", len(message)) + message)
                    (length,) = struct.unpack("!H", await reader.readexactly(2))
                    reply = await reader.readexactly(length)
                if dns.response_id(reply) != upstream_id:
                    log.debug("dns forward of %s over TCP: a reply to another query", query.name)
                    return None
                return struct.pack("!H", query.id) + reply[2:]
            except (OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
                log.debug("dns forward of %s to %s over TCP failed: %r", query.name, self._upstream, exc)
                return None
            finally:
                if writer is not None:
                    writer.close()
                    with contextlib.suppress(OSError, TimeoutError):
                        async with asyncio.timeout(1):
                            await writer.wait_closed()

    async def serve(
        self, udp: socket.socket, tcp: socket.socket | None, namespace: str | None, *, key: str = ""
    ) -> None:
        """Serve a pod's bound UDP socket (and listening TCP socket) until `stop(key)` or `close`."""
        loop = asyncio.get_running_loop()
        server = self

        class Datagrams(asyncio.DatagramProtocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                self.transport = cast(asyncio.DatagramTransport, transport)  # selector's is not a subclass

            def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
                task = loop.create_task(self._reply(data, addr))
                server._tasks.add(task)
                task.add_done_callback(server._tasks.discard)

            async def _reply(self, data: bytes, addr: tuple[str, int]) -> None:
                reply = await server.answer(data, namespace, limit=dns.UDP_ANSWER_LIMIT)
                if reply is not None and not self.transport.is_closing():
                    self.transport.sendto(reply, addr)

        transport, _ = await loop.create_datagram_endpoint(Datagrams, sock=udp)
        self._transports.setdefault(key, []).append(transport)
        if tcp is not None:
            tcp_server = await asyncio.start_server(lambda r, w: self._tcp(r, w, namespace), sock=tcp)
            self._servers.setdefault(key, []).append(tcp_server)

    def stop(self, key: str) -> None:
        """Stop serving the sockets given under `key` (a pod that is no longer served)."""
        for transport in self._transports.pop(key, []):
            transport.close()
        for server in self._servers.pop(key, []):
            server.close()

    async def _tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, namespace: str | None) -> None:
        """Length-prefixed messages (RFC 7766), one at a time, until the client closes or idles 10 s."""
        if self._tcp_slots.locked():
            writer.close()
            return
        async with self._tcp_slots:
            try:
                while True:
                    async with asyncio.timeout(10):
                        (length,) = struct.unpack("!H", await reader.readexactly(2))
                        data = await reader.readexactly(length)
                    reply = await self.answer(data, namespace, limit=dns.MAX_MESSAGE, tcp=True)
                    if reply is None:
                        break
                    writer.write(struct.pack("!H", len(reply)) + reply)
                    await writer.drain()
            except (OSError, TimeoutError, asyncio.IncompleteReadError):
                pass
            finally:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()

    async def close(self) -> None:
        for key in list({*self._transports, *self._servers}):
            self.stop(key)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
