"""Other spellings of an address through SOCKS5 (local mode, real proxy processes): one destination has
one canonical form at the edge, so `::ffff:<pod ip>` is that pod (HBONE, policy applied) and no spelling
of the proxy's own sockets (admin, metrics and readiness wherever the flags put them, other pods' SOCKS5
listeners) gets through.

The shared mesh's proxies are started with their operator ports moved by flag (`start_proxy` picks free
ports), so these tests also check that the guard follows the sockets, not the default port numbers.
A refused CONNECT is never followed by a request: nothing here can stop the shared proxies.
"""

from __future__ import annotations

import socket
import struct

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.conftest import (
    ECHO_PORT,
    NODE_A_CLIENT,
    NODE_A_DENIED_CLIENT,
    NODE_A_METRICS_CLIENT,
    NODE_B_SERVER,
    LocalMesh,
    SocksRefused,
    recv_all,
    socks_connect,
)
from tests.support.eventually import eventually

NOT_ALLOWED = 2
HOST_UNREACHABLE = 4


def socks_connect_name(proxy_ip: str, name: str, port: int, timeout: float = 10.0) -> int:
    """A SOCKS5 CONNECT with ATYP 3 (a domain name); the reply code (0: connected, then closed here)."""
    with socket.create_connection((proxy_ip, 15080), timeout=timeout) as s:
        raw = name.encode()
        s.sendall(b"\x05\x01\x00" + b"\x05\x01\x00\x03" + bytes([len(raw)]) + raw + struct.pack("!H", port))
        head = b""
        while len(head) < 4 and (chunk := s.recv(4 - len(head))):
            head += chunk
        assert head[:3] == b"\x05\x00\x05", head  # the method reply, then the CONNECT reply: its code
        return head[3] if len(head) == 4 else -1


def _socks_code(proxy_ip: str, dst: tuple[str, int]) -> int:
    try:
        with socks_connect(proxy_ip, dst):
            return 0
    except SocksRefused as e:
        return e.code


def _refused(text: str, reason: str) -> float:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "ztunnel_connections_refused_total" and sample.labels.get("reason") == reason:
                return sample.value
    return 0.0


def _inbound_opened(text: str, principal: str) -> float:
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if (
                sample.name == "istio_tcp_connections_opened_total"
                and sample.labels.get("reporter") == "destination"
                and sample.labels.get("source_principal") == principal
                and sample.labels.get("connection_security_policy") == "mutual_tls"
            ):
                total += sample.value
    return total


def test_v4_mapped_pod_address_goes_through_hbone_with_policy(local_mesh: LocalMesh) -> None:
    mapped = f"::ffff:{NODE_B_SERVER}"
    # The DENY policy for sa/denied applies: not a plaintext passthrough to the app.
    assert _socks_code(NODE_A_DENIED_CLIENT, (mapped, ECHO_PORT)) == NOT_ALLOWED
    # An allowed client arrives at node-b through the tunnel (counted there as mutual TLS).
    principal = "spiffe://cluster.local/ns/shop/sa/client"  # (sa/metrics has exact counts in other tests)
    before = _inbound_opened(local_mesh.b.metrics(), principal)
    with socks_connect(NODE_A_CLIENT, (mapped, ECHO_PORT)) as s:
        s.sendall(b"mapped")
        s.shutdown(socket.SHUT_WR)
        assert recv_all(s) == b"mapped"
    eventually(
        lambda: _inbound_opened(local_mesh.b.metrics(), principal) == before + 1, what="node-b to count the tunnel"
    )


def test_the_proxys_operator_ports_moved_by_flag_are_refused_in_every_spelling(local_mesh: LocalMesh) -> None:
    a = local_mesh.a
    assert 15000 not in (a.admin_port, a.metrics_port, a.readiness_port)  # moved by flag
    loops_before = _refused(a.metrics(), "loop")
    spellings = ["127.0.0.1", "::ffff:127.0.0.1", "::ffff:7f00:1", "::127.0.0.1"]
    cases = [(ip, port) for port in (a.admin_port, a.metrics_port, a.readiness_port) for ip in spellings]
    for dst in cases:
        assert _socks_code(NODE_A_CLIENT, dst) == NOT_ALLOWED, dst
    assert _refused(a.metrics(), "loop") == loops_before + len(cases)
    assert a.proc.poll() is None and a.ready()


def test_another_pods_socks5_listener_is_refused(local_mesh: LocalMesh) -> None:
    # Served by the same proxy: its own listener, in either spelling.
    for ip in (NODE_A_METRICS_CLIENT, f"::ffff:{NODE_A_METRICS_CLIENT}"):
        assert _socks_code(NODE_A_CLIENT, (ip, 15080)) == NOT_ALLOWED, ip
    # A pod of another node: through the tunnel, whose far end refuses a proxy port (never a plaintext hop).
    assert _socks_code(NODE_A_CLIENT, (f"::ffff:{NODE_B_SERVER}", 15080)) == HOST_UNREACHABLE


@pytest.mark.parametrize(
    ("name", "code"),
    [
        ("127.0.0.1", NOT_ALLOWED),  # a literal sent as a name is the address: the guard applies
        ("::ffff:127.0.0.1", NOT_ALLOWED),
        ("::ffff:7f00:1", NOT_ALLOWED),
        ("0.0.0.0", NOT_ALLOWED),  # connects to this host
        ("::", NOT_ALLOWED),
        ("::ffff:0.0.0.0", NOT_ALLOWED),
        ("fe80::1%lo", NOT_ALLOWED),  # a zone id names an interface, not a host
        # inet_aton's other forms are names to the proxy, and it resolves names only to Service ClusterIPs.
        ("127.1", HOST_UNREACHABLE),
        ("0x7f000001", HOST_UNREACHABLE),
        ("2130706433", HOST_UNREACHABLE),
        ("0177.0.0.1", HOST_UNREACHABLE),
        ("localhost", HOST_UNREACHABLE),
    ],
)
def test_no_spelling_of_this_host_reaches_the_admin_port(local_mesh: LocalMesh, name: str, code: int) -> None:
    assert socks_connect_name(NODE_A_CLIENT, name, local_mesh.a.admin_port) == code
    assert local_mesh.a.proc.poll() is None


def test_the_unspecified_address_is_refused_whatever_the_port(local_mesh: LocalMesh) -> None:
    before = _refused(local_mesh.a.metrics(), "bad_address")
    for dst in (("0.0.0.0", ECHO_PORT), ("::", ECHO_PORT), ("::ffff:0.0.0.0", local_mesh.a.admin_port)):
        assert _socks_code(NODE_A_CLIENT, dst) == NOT_ALLOWED, dst
    assert _refused(local_mesh.a.metrics(), "bad_address") == before + 3
