"""The node proxy's DNS server on loopback: UDP and TCP answers from the model, forwarding to a fake
upstream resolver (relayed with the client's id), SERVFAIL when the upstream is silent, FORMERR for junk;
forwarding over TCP (a TCP query, a truncated UDP answer) with dnslib as an independent client."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import cast

import pytest
from dnslib import EDNS0, DNSRecord

from tests.integration.conftest import NODE_A_CLIENT, SERVICE_IP, mesh_config, start_proxy
from tests.support.eventually import eventually_async
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


# ---- forwarding over TCP: a TCP query, a truncated UDP answer -------------------------------------------
BIG = "big.example.org"
BIG_ADDRESSES = tuple(f"198.51.100.{i}" for i in range(1, 101))  # ~1.6 KB of answers: over 512, under 4096


class TwoTransportUpstream:
    """A fake resolver on one port, UDP and TCP. `big.example.org` has 100 addresses: its UDP answer is cut at
    512 bytes (TC), as a resolver with a small UDP limit does; its TCP answer is whole. Over TCP it may also
    stay silent (`tcp="silent"`) or answer under another id (`tcp="wrong-id"`). `seen`: (transport, name)."""

    def __init__(self, tcp: str = "answer") -> None:
        self.tcp_mode = tcp
        self.seen: list[tuple[str, str]] = []

    async def start(self) -> tuple[str, int]:
        udp, tcp = _udp_and_tcp_on_one_port()
        tcp.listen(16)
        upstream = self

        class Udp(asyncio.DatagramProtocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                self.transport = cast(asyncio.DatagramTransport, transport)

            def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
                self.transport.sendto(upstream.reply(data, "udp"), addr)

        loop = asyncio.get_running_loop()
        self.udp, _ = await loop.create_datagram_endpoint(Udp, sock=udp)
        self.server = await asyncio.start_server(self._tcp, sock=tcp)
        address: tuple[str, int] = udp.getsockname()
        return address

    def reply(self, data: bytes, transport: str) -> bytes:
        query = dns.parse_query(data)
        self.seen.append((transport, query.name))
        addresses = BIG_ADDRESSES if query.name == BIG else ("192.0.2.1",)
        limit = dns.UDP_ANSWER_LIMIT if transport == "udp" else dns.MAX_MESSAGE
        return dns.build_response(query, dns.RCODE_NOERROR, addresses, authoritative=False, limit=limit)

    async def _tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            (length,) = struct.unpack("!H", await reader.readexactly(2))
            data = await reader.readexactly(length)
            if self.tcp_mode == "silent":
                self.seen.append(("tcp", dns.parse_query(data).name))
                await reader.read()  # until the proxy gives up
                return
            reply = self.reply(data, "tcp")
            if self.tcp_mode == "wrong-id":
                reply = struct.pack("!H", (struct.unpack("!H", reply[:2])[0] + 1) & 0xFFFF) + reply[2:]
            writer.write(struct.pack("!H", len(reply)) + reply)
            await writer.drain()
        except (asyncio.IncompleteReadError, OSError):
            pass
        finally:
            writer.close()

    async def close(self) -> None:
        self.udp.close()
        self.server.close()
        await self.server.wait_closed()


@contextlib.asynccontextmanager
async def forwarding(tcp: str = "answer", **kw: float) -> AsyncIterator[tuple[TwoTransportUpstream, tuple[str, int]]]:
    """A DnsServer (namespace demo) forwarding to a `TwoTransportUpstream`: (the upstream, the server's address)."""
    upstream = TwoTransportUpstream(tcp)
    server = DnsServer(_table, await upstream.start(), **kw)  # type: ignore[arg-type]
    try:
        yield upstream, await _serve(server, "demo")
    finally:
        await server.close()
        await upstream.close()


async def _dnslib(address: tuple[str, int], name: str, *, tcp: bool, edns: int | None = None) -> DNSRecord:
    """Ask with dnslib (an independent implementation), blocking in a thread: the server runs in this loop."""
    question = DNSRecord.question(name, "A")
    if edns is not None:
        question.add_ar(EDNS0(udp_len=edns))
    raw = await asyncio.to_thread(question.send, address[0], address[1], tcp, 5)
    reply = DNSRecord.parse(raw)
    assert reply.header.id == question.header.id
    return reply


def _addresses(reply: DNSRecord) -> list[str]:
    return [str(rr.rdata) for rr in reply.rr]


async def test_a_tcp_query_is_forwarded_over_tcp_and_gets_the_whole_answer() -> None:
    """Before, it went to the upstream over UDP and the TCP asker got the truncated answer, with no way out."""
    async with forwarding() as (upstream, address):
        reply = await _dnslib(address, BIG, tcp=True)
        assert reply.header.tc == 0 and _addresses(reply) == list(BIG_ADDRESSES)
        assert upstream.seen == [("tcp", BIG)]
        small = await _dnslib(address, "example.net", tcp=True)
        assert _addresses(small) == ["192.0.2.1"] and upstream.seen[-1] == ("tcp", "example.net")
        ours = await _dnslib(address, "testapp-1", tcp=True)  # the model's names are still answered here
        assert _addresses(ours) == ["10.96.0.10"] and len(upstream.seen) == 2


async def test_a_truncated_udp_answer_is_asked_again_over_tcp() -> None:
    async with forwarding() as (upstream, address):
        # The asker takes 4096 bytes over UDP (EDNS): the whole answer from the TCP exchange fits.
        reply = await _dnslib(address, BIG, tcp=False, edns=4096)
        assert reply.header.tc == 0 and _addresses(reply) == list(BIG_ADDRESSES)
        assert upstream.seen == [("udp", BIG), ("tcp", BIG)]
        # Without EDNS it takes 512: it gets the truncated answer, TC set, and asks over TCP itself.
        upstream.seen.clear()
        cut = await _dnslib(address, BIG, tcp=False)
        assert cut.header.tc == 1 and 0 < len(cut.rr) < len(BIG_ADDRESSES)
        assert upstream.seen == [("udp", BIG), ("tcp", BIG)]
        whole = await _dnslib(address, BIG, tcp=True)
        assert whole.header.tc == 0 and len(whole.rr) == len(BIG_ADDRESSES)
        # An answer that fits is not asked again.
        upstream.seen.clear()
        assert _addresses(await _dnslib(address, "example.net", tcp=False)) == ["192.0.2.1"]
        assert upstream.seen == [("udp", "example.net")]


async def test_tcp_forwarding_is_bounded_in_time_and_number() -> None:
    loop = asyncio.get_running_loop()
    async with forwarding("silent", timeout=0.5, max_tcp_upstream=1) as (upstream, address):
        started = loop.time()
        first = asyncio.create_task(_dnslib(address, BIG, tcp=True))
        await eventually_async(lambda: ("tcp", BIG) in upstream.seen, 5, 0.01, what="the TCP exchange under way")
        second = await _dnslib(address, "example.net", tcp=True)  # the one TCP exchange is taken: at once
        assert second.header.rcode == dns.RCODE_SERVFAIL and loop.time() - started < 0.45
        assert ("tcp", "example.net") not in upstream.seen
        first_reply = await first
        assert first_reply.header.rcode == dns.RCODE_SERVFAIL and 0.45 <= loop.time() - started < 4
        # A truncated UDP answer whose TCP retry fails still reaches the asker, truncated.
        cut = await _dnslib(address, BIG, tcp=False)
        assert cut.header.rcode == 0 and cut.header.tc == 1 and len(cut.rr) > 0
    async with forwarding("wrong-id") as (upstream, address):
        reply = await _dnslib(address, BIG, tcp=True)  # a reply under another id is not taken
        assert reply.header.rcode == dns.RCODE_SERVFAIL and upstream.seen == [("tcp", BIG)]

