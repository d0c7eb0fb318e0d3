"""Two node proxies in local mode: SOCKS5 in on node-a, HBONE across, the app on node-b."""

from __future__ import annotations

import hashlib
import re
import socket
import subprocess
import threading
import time

import pytest

from tests.integration.conftest import (
    ECHO6_PORT,
    ECHO_PORT,
    EMPTY_SERVICE_IP,
    HTTP_PORT,
    NODE_A_CLIENT,
    NODE_A_DENIED_CLIENT,
    NODE_A_METRICS_CLIENT,
    NODE_B_SERVER,
    NODE_B_SERVER6,
    NODE_B_STRICT,
    OUTSIDE,
    SERVICE_IP,
    LocalMesh,
    SocksRefused,
    recv_all,
    socks_connect,
    transfer_size,
)
from tests.support.eventually import eventually


def test_curl_through_socks5_reaches_the_app_on_the_other_node(local_mesh: LocalMesh) -> None:
    out = subprocess.run(
        [
            "curl",
            "-sS",
            "--max-time",
            "10",
            "--socks5",
            f"{NODE_A_CLIENT}:15080",
            f"http://{NODE_B_SERVER}:{HTTP_PORT}/",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout == f"hello from {NODE_B_SERVER}\n"


def test_service_cluster_ip_goes_to_an_endpoint_on_the_target_port(local_mesh: LocalMesh) -> None:
    with socks_connect(NODE_A_CLIENT, (SERVICE_IP, 80)) as s:
        s.sendall(b"via service")
        s.shutdown(socket.SHUT_WR)
        assert recv_all(s) == b"via service"


def test_service_without_endpoints_is_refused(local_mesh: LocalMesh) -> None:
    with pytest.raises(SocksRefused) as e:
        socks_connect(NODE_A_CLIENT, (EMPTY_SERVICE_IP, 80))
    assert e.value.code == 4  # host unreachable


def _pipelined_socks(dst: tuple[str, int], payload: bytes = b"") -> socket.socket:
    """Greeting, request and payload in one segment, as pipelining clients (and bench/loadgen.py) send them."""
    s = socket.create_connection((NODE_A_CLIENT, 15080), timeout=10)
    s.sendall(b"\x05\x01\x00" + b"\x05\x01\x00\x01" + socket.inet_aton(dst[0]) + dst[1].to_bytes(2, "big") + payload)
    return s


def _recv_n(s: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n and (chunk := s.recv(n - len(out))):
        out += chunk
    return out


def test_pipelined_socks_client_gets_the_method_reply_then_the_connect_reply(local_mesh: LocalMesh) -> None:
    with _pipelined_socks((NODE_B_SERVER, ECHO_PORT), b"early bytes") as s:
        assert _recv_n(s, 2) == b"\x05\x00"  # the method reply comes first, whenever it is sent
        assert _recv_n(s, 10) == b"\x05\x00\x00\x01" + bytes(6)
        assert _recv_n(s, 11) == b"early bytes"  # bytes sent with the request are relayed


def test_pipelined_socks_client_refused_still_gets_the_method_reply_first(local_mesh: LocalMesh) -> None:
    with _pipelined_socks((EMPTY_SERVICE_IP, 80)) as s:
        assert _recv_n(s, 2) == b"\x05\x00"
        assert _recv_n(s, 10) == b"\x05\x04\x00\x01" + bytes(6)  # host unreachable
        assert recv_all(s) == b""


def test_destination_outside_the_mesh_is_plain_passthrough(local_mesh: LocalMesh) -> None:
    with socks_connect(NODE_A_CLIENT, (OUTSIDE, ECHO_PORT)) as s:
        s.sendall(b"plain")
        s.shutdown(socket.SHUT_WR)
        assert recv_all(s) == b"plain"
    assert "dst.addr=127.0.140.1:8080" in eventually(
        lambda: "127.0.140.1:8080" in local_mesh.a.log() and local_mesh.a.log(), what="access log line"
    )


def test_half_close_reaches_the_app_and_the_reply_still_flows(local_mesh: LocalMesh) -> None:
    with socks_connect(NODE_A_CLIENT, (NODE_B_SERVER, ECHO_PORT)) as s:
        s.sendall(b"first half")
        assert s.recv(100) == b"first half"  # both directions open
        s.shutdown(socket.SHUT_WR)  # the app sees EOF, echoes nothing more, and half-closes back
        s.settimeout(10)
        assert recv_all(s) == b""


def test_half_close_with_data_pending_in_the_other_direction(local_mesh: LocalMesh) -> None:
    payload = bytes(range(256)) * 4096  # 1 MiB
    with socks_connect(NODE_A_CLIENT, (NODE_B_SERVER, ECHO_PORT)) as s:
        s.settimeout(20)
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        assert recv_all(s) == payload


def test_bulk_transfer_both_directions_at_once_arrives_intact(local_mesh: LocalMesh) -> None:
    size = transfer_size()
    block = hashlib.sha256(b"seed").digest() * 8192  # 256 KiB of non-repeating-looking bytes
    sent_hash = hashlib.sha256()
    recv_hash = hashlib.sha256()
    received = 0
    with socks_connect(NODE_A_CLIENT, (NODE_B_SERVER, ECHO_PORT)) as s:
        s.settimeout(60)
        errors: list[BaseException] = []

        def sender() -> None:
            try:
                left = size
                view = memoryview(block)
                while left > 0:
                    chunk = view[: min(left, len(block))]
                    s.sendall(chunk)
                    sent_hash.update(chunk)
                    left -= len(chunk)
                s.shutdown(socket.SHUT_WR)
            except BaseException as e:  # reported by the main thread
                errors.append(e)

        t = threading.Thread(target=sender)
        started = time.monotonic()
        t.start()
        buf = bytearray(1024 * 1024)
        while True:
            n = s.recv_into(buf)
            if not n:
                break
            recv_hash.update(memoryview(buf)[:n])
            received += n
        t.join(60)
        elapsed = time.monotonic() - started
    assert not errors, errors
    assert received == size
    assert recv_hash.hexdigest() == sent_hash.hexdigest()
    print(f"bulk: {size >> 20} MiB each way in {elapsed:.1f}s")


def _metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_metrics_count_connections_and_bytes_with_principals(local_mesh: LocalMesh) -> None:
    n = 5
    principal = "spiffe://cluster.local/ns/shop/sa/metrics"
    sent_total = 0
    for i in range(n):
        payload = b"m" * (1000 + i)
        with socks_connect(NODE_A_METRICS_CLIENT, (NODE_B_SERVER, ECHO_PORT)) as s:
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)
            assert recv_all(s) == payload
        sent_total += len(payload)

    def closed_on_both() -> tuple[str, str] | None:
        a, b = local_mesh.a.metrics(), local_mesh.b.metrics()
        ok = all(
            _metric(t, "istio_tcp_connections_closed_total", reporter=r, source_principal=principal) == n
            for t, r in ((a, "source"), (b, "destination"))
        )
        return (a, b) if ok else None

    a, b = eventually(closed_on_both, what="both proxies to count the closed connections")
    labels = {
        "reporter": "destination",
        "source_principal": principal,
        "destination_principal": "spiffe://cluster.local/ns/shop/sa/server",
        "source_workload": "metrics-client",
        "destination_workload": "server",
        "connection_security_policy": "mutual_tls",
    }
    assert _metric(b, "istio_tcp_connections_opened_total", **labels) == n
    assert _metric(b, "istio_tcp_received_bytes_total", **labels) == sent_total
    assert _metric(b, "istio_tcp_sent_bytes_total", **labels) == sent_total
    src = dict(labels, reporter="source")
    assert _metric(a, "istio_tcp_connections_opened_total", **src) == n
    assert _metric(a, "istio_tcp_received_bytes_total", **src) == sent_total
    assert _metric(a, "istio_tcp_sent_bytes_total", **src) == sent_total


def test_authorization_deny_answers_401_and_is_logged_with_the_policy(local_mesh: LocalMesh) -> None:
    with pytest.raises(SocksRefused) as e:
        socks_connect(NODE_A_DENIED_CLIENT, (NODE_B_SERVER, ECHO_PORT))
    assert e.value.code == 2  # not allowed by ruleset
    log = eventually(lambda: "policy=shop/deny-denied" in local_mesh.b.log() and local_mesh.b.log(), what="deny log")
    assert re.search(r"response_flags=DENY .*policy=shop/deny-denied", log)
    text = local_mesh.b.metrics()
    assert (
        _metric(
            text,
            "istio_tcp_connections_closed_total",
            reporter="destination",
            source_principal="spiffe://cluster.local/ns/shop/sa/denied",
            response_flags="DENY",
        )
        >= 1
    )


def test_plaintext_inbound_is_delivered_unless_strict(local_mesh: LocalMesh) -> None:
    # Local mode has no redirection: 15006 delivers to the pod's single containerPort.
    with socket.create_connection((NODE_B_SERVER, 15006), timeout=10) as s:
        s.sendall(b"plaintext")
        s.shutdown(socket.SHUT_WR)
        assert recv_all(s) == b"plaintext"
    try:  # the proxy aborts at once: the reset may even beat connect() back to us on a busy machine
        with socket.create_connection((NODE_B_STRICT, 15006), timeout=10) as s:
            s.sendall(b"plaintext")
            data = recv_all(s)
    except (ConnectionResetError, BrokenPipeError):
        data = b""
    assert data == b""
    # ... while mesh traffic to the STRICT pod still works.
    with socks_connect(NODE_A_CLIENT, (NODE_B_STRICT, ECHO_PORT)) as s:
        s.sendall(b"mtls")
        s.shutdown(socket.SHUT_WR)
        assert recv_all(s) == b"mtls"


def test_ipv6_destination_goes_through_the_tunnel(local_mesh: LocalMesh) -> None:
    if not local_mesh.ipv6:
        pytest.skip("this machine has no IPv6 loopback (::1)")
    with socks_connect(NODE_A_CLIENT, (NODE_B_SERVER6, ECHO6_PORT)) as s:
        s.sendall(b"over v6")
        s.shutdown(socket.SHUT_WR)
        assert recv_all(s) == b"over v6"
    assert "dst.addr=[::1]:18080" in eventually(
        lambda: "[::1]:18080" in local_mesh.b.log() and local_mesh.b.log(), what="the inbound access log line"
    )
