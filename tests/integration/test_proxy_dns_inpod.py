"""DNS capture in a pod netns for real (DESIGN §4.6): with the node agent's `dns_capture` rules, an app's
query to any resolver on port 53, UDP or TCP, reaches the proxy's DNS sockets made by `pod_sockets`
inside the pod, and the reply comes back as if from that resolver."""

from __future__ import annotations

import asyncio
import os
import socket
import struct
from collections.abc import Iterator

import pytest

from tests.support.nodeagent import CLIENT_IP, in_thread, veth_pair
from ztunnel.config.model import ClusterConfig, Service, ServicePort
from ztunnel.net import dns
from ztunnel.net.netns import in_netns, open_netns
from ztunnel.ports import DNS_PORT
from ztunnel.proxy.dns import DnsServer, DnsTable
from ztunnel.proxy.inpod import pod_sockets
from ztunnel.redirect import iptables
from ztunnel.redirect.agent import process_cgroup

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create network namespaces"),
]


@pytest.fixture
def pair() -> Iterator[tuple[str, str]]:
    with veth_pair() as namespaces:
        yield namespaces


async def test_captured_udp_and_tcp_queries_are_answered_in_the_pod(pair: tuple[str, str]) -> None:
    _client, pod = pair
    pod_fd = open_netns(pod)
    cgroup = process_cgroup()[0]  # the proxy runs in this process
    in_thread(pod_fd, lambda: iptables.apply_inpod(iptables.detect_backend(), dns_capture=True, proxy_cgroup=cgroup))
    socks = pod_sockets(pod_fd, ipv6=False, dns_port=DNS_PORT)
    svc = Service("testapp-1", "demo", ("10.96.0.10",), (ServicePort(8080, 8080),), {})
    table = DnsTable.from_config(ClusterConfig(namespaces={}, workloads=(), services=(svc,), nodes={}))
    server = DnsServer(lambda: table, None)
    try:
        assert len(socks.dns) == 1
        udp, tcp = socks.dns[0]
        await server.serve(udp, tcp, "demo", key="uid-1")

        def app_asks_udp() -> bytes:
            with in_netns(pod_fd):
                s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            with s:
                s.settimeout(5)
                s.connect((CLIENT_IP, 53))  # connected: only a reply from CLIENT_IP:53 is received
                s.send(dns.encode_query(9, "testapp-1", dns.TYPE_A))
                return s.recv(512)

        def app_asks_tcp() -> bytes:
            with in_netns(pod_fd):
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            with s:
                s.settimeout(5)
                s.connect((CLIENT_IP, 53))
                query = dns.encode_query(10, "testapp-1.demo.svc.cluster.local", dns.TYPE_A)
                s.sendall(struct.pack("!H", len(query)) + query)
                data = b""
                while len(data) < 2 or len(data) < 2 + struct.unpack("!H", data[:2])[0]:
                    chunk = s.recv(512)
                    assert chunk, "closed before the whole reply"
                    data += chunk
                return data[2:]

        reply = dns.decode_reply(await asyncio.to_thread(app_asks_udp))
        assert (reply.id, reply.rcode, reply.addresses) == (9, 0, ("10.96.0.10",))
        reply = dns.decode_reply(await asyncio.to_thread(app_asks_tcp))
        assert (reply.id, reply.rcode, reply.addresses) == (10, 0, ("10.96.0.10",))
    finally:
        server.stop("uid-1")
        await server.close()
        socks.close()
        os.close(pod_fd)
