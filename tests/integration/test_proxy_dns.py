"""The node proxy's DNS server on loopback: UDP and TCP answers from the model, forwarding to a fake
upstream resolver (relayed with the client's id), SERVFAIL when the upstream is silent, FORMERR for junk."""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import cast

import pytest

from tests.integration.conftest import NODE_A_CLIENT, SERVICE_IP, mesh_config, start_proxy
from ztunnel.config.model import ClusterConfig, Service, ServicePort
from ztunnel.net import dns
from ztunnel.ports import DNS_PORT
from ztunnel.proxy.dns import DnsServer, DnsTable

SERVER = ("127.0.0.1", 0)
OWN_NET = "127.0.188."  # node-a's pods for the proxy this module starts
CLIENT = NODE_A_CLIENT.replace("127.0.110.", OWN_NET)


def _table() -> DnsTable:
    svc = Service("testapp-1", "demo", ("10.96.0.10",), (ServicePort(8080, 8080),), {})
    return DnsTable.from_config(ClusterConfig(namespaces={}, workloads=(), services=(svc,), nodes={}))


class FakeUpstream(asyncio.DatagramProtocol):
    """Answers every A query with 192.0.2.1 (or stays silent); records what it saw."""

    def __init__(self, *, silent: bool = False) -> None:
        self.silent = silent
        self.seen: list[dns.Query] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        query = dns.parse_query(data)
        self.seen.append(query)
        if not self.silent:
            reply = dns.build_response(query, dns.RCODE_NOERROR, ("192.0.2.1",), authoritative=False)
            self.transport.sendto(reply, addr)


async def _udp_ask(address: tuple[str, int], data: bytes, timeout: float = 5.0) -> bytes:
    loop = asyncio.get_running_loop()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.setblocking(False)
        await loop.sock_connect(s, address)
        await loop.sock_sendall(s, data)
        async with asyncio.timeout(timeout):
            return await loop.sock_recv(s, 65535)


def _udp_and_tcp_on_one_port() -> tuple[socket.socket, socket.socket]:
    """A UDP and a TCP socket on the same free port (the UDP port the kernel picks may be taken for TCP)."""
    for _ in range(50):
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        udp.bind(SERVER)
        tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            tcp.bind(udp.getsockname())
        except OSError:
            udp.close()
            tcp.close()
            continue
        return udp, tcp
    raise AssertionError("no port free for both UDP and TCP on 127.0.0.1")


async def _serve(server: DnsServer, namespace: str | None) -> tuple[str, int]:
    udp, tcp = _udp_and_tcp_on_one_port()
    tcp.listen(16)
    await server.serve(udp, tcp, namespace)
    address: tuple[str, int] = udp.getsockname()
    return address


@pytest.fixture
async def upstream() -> AsyncIterator[tuple[FakeUpstream, tuple[str, int]]]:
    loop = asyncio.get_running_loop()
    transport, proto = await loop.create_datagram_endpoint(FakeUpstream, local_addr=("127.0.0.1", 0))
    yield proto, transport.get_extra_info("sockname")
    transport.close()


async def test_udp_answers_the_model_and_forwards_the_rest(
    upstream: tuple[FakeUpstream, tuple[str, int]],
) -> None:
    fake, up_addr = upstream
    server = DnsServer(_table, up_addr)
    try:
        address = await _serve(server, "demo")
        ours = dns.decode_reply(await _udp_ask(address, dns.encode_query(11, "testapp-1", dns.TYPE_A)))
        assert (ours.id, ours.rcode, ours.authoritative, ours.addresses) == (11, 0, True, ("10.96.0.10",))
        missing = dns.decode_reply(await _udp_ask(address, dns.encode_query(12, "x.demo.svc.cluster.local", 1)))
        assert (missing.rcode, missing.addresses) == (dns.RCODE_NXDOMAIN, ())
        assert fake.seen == []
        other = dns.decode_reply(await _udp_ask(address, dns.encode_query(13, "example.com", dns.TYPE_A)))
        assert (other.id, other.rcode, other.authoritative, other.addresses) == (13, 0, False, ("192.0.2.1",))
        assert [q.name for q in fake.seen] == ["example.com"]
        junk = dns.decode_reply(await _udp_ask(address, b"\xab\xcd\x01\x00garbage"))
        assert (junk.id, junk.rcode) == (0xABCD, dns.RCODE_FORMERR)
    finally:
        await server.close()


async def test_tcp_length_prefixed_queries_on_one_connection() -> None:
    server = DnsServer(_table, None)
    try:
        address = await _serve(server, "demo")
        reader, writer = await asyncio.open_connection(*address)
        for msg_id, name in ((1, "testapp-1.demo"), (2, "testapp-1.demo.svc.cluster.local")):
            query = dns.encode_query(msg_id, name, dns.TYPE_A)
            writer.write(struct.pack("!H", len(query)) + query)
            (length,) = struct.unpack("!H", await asyncio.wait_for(reader.readexactly(2), 5))
            reply = dns.decode_reply(await reader.readexactly(length))
            assert (reply.id, reply.addresses) == (msg_id, ("10.96.0.10",))
        writer.close()
        await writer.wait_closed()
    finally:
        await server.close()


async def test_silent_upstream_is_servfail_after_the_timeout_and_no_upstream_at_once() -> None:
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(
        lambda: FakeUpstream(silent=True), local_addr=("127.0.0.1", 0)
    )
    server = DnsServer(_table, transport.get_extra_info("sockname"), timeout=0.3)
    lonely = DnsServer(_table, None)
    try:
        address = await _serve(server, "demo")
        started = loop.time()
        reply = dns.decode_reply(await _udp_ask(address, dns.encode_query(5, "example.com", dns.TYPE_A)))
        assert (reply.id, reply.rcode) == (5, dns.RCODE_SERVFAIL)
        assert 0.25 <= loop.time() - started < 3
        lonely_address = await _serve(lonely, "demo")
        reply = dns.decode_reply(await _udp_ask(lonely_address, dns.encode_query(6, "example.com", 1)))
        assert (reply.id, reply.rcode) == (6, dns.RCODE_SERVFAIL)
    finally:
        await server.close()
        await lonely.close()
        transport.close()


# ---- `ztunnel proxy --dns` as a process, local mode (pod IPs on loopback) -------------------------------
class ThreadUpstream:
    """A blocking fake resolver in a thread: every query answered with 192.0.2.7, names recorded."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.names: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data, addr = self.sock.recvfrom(65535)
            except TimeoutError:
                continue
            query = dns.parse_query(data)
            self.names.append(query.name)
            self.sock.sendto(dns.build_response(query, 0, ("192.0.2.7",), authoritative=False), addr)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


def _ask(ip: str, name: str, qtype: int = dns.TYPE_A, msg_id: int = 77) -> dns.Reply:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(5)
        s.connect((ip, DNS_PORT))  # connected: a port unreachable comes back as ConnectionRefusedError
        s.send(dns.encode_query(msg_id, name, qtype))
        return dns.decode_reply(s.recv(65535))


def test_proxy_with_dns_answers_on_each_pod_ip_and_without_it_nothing_listens(
    tmp_path: Path, ca_dir: Path
) -> None:
    # its own pod addresses: the session's local mesh serves node-a's usual ones in the same run
    config = tmp_path / "mesh.yaml"
    config.write_text(mesh_config().replace("127.0.110.", OWN_NET).replace("127.0.120.", "127.0.189."))
    upstream = ThreadUpstream()
    upstream_addr = f"127.0.0.1:{upstream.sock.getsockname()[1]}"
    proxy = start_proxy("node-a", config, ca_dir, tmp_path, "--dns", "--dns-upstream", upstream_addr)
    try:
        reply = _ask(CLIENT, "server")  # the client pod's namespace (shop) search path
        assert (reply.id, reply.rcode, reply.authoritative, reply.addresses) == (77, 0, True, (SERVICE_IP,))
        assert _ask(CLIENT, "server.shop.svc.cluster.local").addresses == (SERVICE_IP,)
        assert _ask(CLIENT, "server.shop.svc.cluster.local", dns.TYPE_AAAA).addresses == ()
        assert _ask(CLIENT, "nope.shop.svc.cluster.local").rcode == dns.RCODE_NXDOMAIN
        assert _ask(CLIENT, "example.org").addresses == ("192.0.2.7",)
        assert upstream.names == ["example.org"]
    finally:
        proxy.stop()
        upstream.close()
    plain = start_proxy("node-a", config, ca_dir, tmp_path)
    try:
        with pytest.raises(ConnectionRefusedError):  # ICMP port unreachable: nothing on 15053
            _ask(CLIENT, "server")
    finally:
        plain.stop()
