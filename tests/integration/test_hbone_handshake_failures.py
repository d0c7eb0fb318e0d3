"""Failed server-side handshakes are visible: the client gets OpenSSL's alert, the server counts the
failure by reason in ztunnel_hbone_handshake_failures_total and logs it, rate-limited.

The clients are `openssl s_client` and curl (implementations we did not write) against the real node-b
proxy, and raw sockets against an in-process HboneServer for the timeout and early-close cases.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import os
import re
import shutil
import socket
import ssl
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.integration.conftest import NODE_B_SERVER, LocalMesh
from tests.support.eventually import eventually_async
from tests.support.svids import issue, signed_svid
from ztunnel.hbone.protocol import STATUS_OK
from ztunnel.hbone.server import FailureLog, HboneServer, InboundTunnel
from ztunnel.hbone.tls_cache import TlsContexts
from ztunnel.identity.ca import init_ca_dir
from ztunnel.identity.certs import WorkloadCertificate
from ztunnel.identity.manager import CertificateManager
from ztunnel.identity.spiffe import SpiffeId
from ztunnel.identity.tls import client_context, peer_identity
from ztunnel.net.listen import listening_socket

CLIENT = "spiffe://cluster.local/ns/shop/sa/client"
SERVER = SpiffeId.parse("spiffe://cluster.local/ns/shop/sa/server")
LONG_AGO = (dt.timedelta(days=-2), dt.timedelta(days=-1))

needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")


def _write_pair(cert: WorkloadCertificate, directory: Path) -> tuple[Path, Path]:
    """cert.pem: the leaf and its intermediate (as a workload sends them); key.pem."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "cert.pem").write_bytes(cert.cert_chain_without_root())
    (directory / "key.pem").write_bytes(cert.key_pem)
    return directory / "cert.pem", directory / "key.pem"


def _s_client(address: tuple[str, int], pair: tuple[Path, Path] | None) -> str:
    """What `openssl s_client` says about the connection (it waits for the server to end it)."""
    argv = ["openssl", "s_client", "-connect", f"{address[0]}:{address[1]}", "-tls1_3", "-alpn", "h2", "-ign_eof"]
    if pair is not None:
        argv += ["-cert", str(pair[0]), "-cert_chain", str(pair[0]), "-key", str(pair[1])]
    done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=20, check=False)
    return (done.stdout + done.stderr).decode(errors="replace")


def _failures(mesh: LocalMesh, reason: str) -> float:
    for line in mesh.b.metrics().splitlines():
        if line.startswith(f'ztunnel_hbone_handshake_failures_total{{reason="{reason}"}}'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


@needs_openssl
@pytest.mark.parametrize(
    ("case", "reason", "alert"),
    [
        ("expired", "expired", "alert certificate expired"),
        ("self-signed", "self_signed", "alert unknown ca"),
        ("another CA", "untrusted", "alert unknown ca"),
        ("no certificate", "no_certificate", "alert certificate required"),
    ],
)
async def test_a_refused_client_gets_the_alert_and_the_server_counts_and_logs_it(
    local_mesh: LocalMesh, tmp_path: Path, case: str, reason: str, alert: str
) -> None:
    pair: tuple[Path, Path] | None = None
    if case == "expired":
        pair = _write_pair(issue(local_mesh.ca_dir, [CLIENT], valid=LONG_AGO), tmp_path)
    elif case == "self-signed":
        pair = _write_pair(issue(local_mesh.ca_dir, [CLIENT], self_signed=True), tmp_path)
    elif case == "another CA":
        pair = _write_pair(issue(init_ca_dir(tmp_path / "other-ca"), [CLIENT]), tmp_path)
    before = await asyncio.to_thread(_failures, local_mesh, reason)
    said = await asyncio.to_thread(_s_client, (NODE_B_SERVER, 15008), pair)
    assert alert in said, said  # OpenSSL's alert, not a bare EOF
    assert await asyncio.to_thread(_failures, local_mesh, reason) == before + 1
    assert re.search(rf"HBONE handshake failed .*reason={reason}", local_mesh.b.log())


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")
async def test_curl_with_an_expired_client_certificate_sees_the_alert(local_mesh: LocalMesh, tmp_path: Path) -> None:
    cert, key = _write_pair(issue(local_mesh.ca_dir, [CLIENT], valid=LONG_AGO), tmp_path)
    argv = ["curl", "-sS", "-k", "--http2", "--cert", str(cert), "--key", str(key), "--max-time", "10"]
    argv.append(f"https://{NODE_B_SERVER}:15008/")  # the request never gets as far as being read
    done = await asyncio.to_thread(subprocess.run, argv, capture_output=True, timeout=20, check=False)
    assert done.returncode != 0
    assert "certificate expired" in done.stderr.decode(errors="replace"), done.stderr


# ---- in-process server: timeouts, early closes, rate-limited log -------------------------------------
ADDRESS = ("127.0.171.1", 15008)


@pytest.fixture
async def server(certs: CertificateManager) -> AsyncIterator[HboneServer]:
    async def echo(tunnel: InboundTunnel) -> None:
        tunnel.stream.respond(STATUS_OK)

    contexts = TlsContexts(certs)
    reasons: list[str] = []
    hbone = HboneServer(contexts, echo, on_rejected=reasons.append, handshake_timeout=0.3)
    listener = await hbone.listen(listening_socket(*ADDRESS), SERVER)
    try:
        yield hbone
    finally:
        listener.close()
        hbone.abort()
        await listener.wait_closed()


async def _eof(reader: asyncio.StreamReader) -> bytes:
    async with asyncio.timeout(5):
        return await reader.read()


async def test_a_silent_client_is_counted_as_a_handshake_timeout(server: HboneServer) -> None:
    reader, writer = await asyncio.open_connection(*ADDRESS)
    try:
        assert await _eof(reader) == b""  # the server ends it after its handshake timeout
    finally:
        writer.close()
    await eventually_async(lambda: server.handshake_failures.get("timeout") == 1, 5, what="timeout")


async def test_a_client_that_leaves_mid_handshake_is_counted_as_closed(server: HboneServer) -> None:
    with socket.create_connection(ADDRESS) as s:
        s.sendall(b"\x16\x03\x01\x00")  # the start of a ClientHello record, then gone
    await eventually_async(lambda: server.handshake_failures.get("closed") == 1, 5, what="closed")
    assert "timeout" not in server.handshake_failures


async def test_plaintext_on_the_hbone_port_is_a_protocol_failure(server: HboneServer) -> None:
    reader, writer = await asyncio.open_connection(*ADDRESS)
    writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    try:
        await _eof(reader)
    except ConnectionError:
        pass
    finally:
        writer.close()
    await eventually_async(lambda: server.handshake_failures.get("protocol") == 1, 5, what="protocol")


def test_the_failure_log_is_rate_limited_per_reason() -> None:
    flog = FailureLog(interval=10.0, lines=3)
    decisions = [flog.allow("expired", now=100.0 + i * 0.1) for i in range(10)]
    assert decisions == [0, 0, 0] + [None] * 7  # three lines, seven left out
    assert flog.allow("timeout", now=101.0) == 0  # another reason has its own budget
    assert flog.allow("expired", now=110.5) == 7  # next interval: one line says how many were left out
    assert flog.allow("expired", now=110.6) == 0


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_failed_handshakes_leave_no_socket_behind(server: HboneServer) -> None:
    no_cert = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    no_cert.check_hostname, no_cert.verify_mode = False, ssl.CERT_NONE
    before = _open_fds()
    for _ in range(10):
        reader, writer = await asyncio.open_connection(*ADDRESS, ssl=no_cert)
        with contextlib.suppress(ssl.SSLError, ConnectionError):
            await _eof(reader)  # TLS 1.3: the server's refusal arrives after the client's handshake
        writer.close()
        with socket.create_connection(ADDRESS):
            pass
    await eventually_async(
        lambda: server.handshake_failures.get("no_certificate") == 10 and server.handshake_failures.get("closed") == 10,
        5,
        what="20 failures",
    )
    await eventually_async(lambda: _open_fds() <= before, 5, what="the sockets closed")


async def test_connections_that_never_start_their_handshake_cannot_pile_up(
    certs: CertificateManager, ca_dir: Path
) -> None:
    """Any TCP client can open connections to the HBONE port and send nothing: each holds a socket and ~70 KiB
    until the handshake timeout, so a flood of them must not grow without bound (past the limit the oldest
    go) nor keep a verified client from completing its handshake."""
    contexts = TlsContexts(certs)
    reasons: list[str] = []
    hbone = HboneServer(contexts, _answer_ok, on_rejected=reasons.append, handshake_timeout=30.0)
    hbone.max_pending_handshakes = 8
    listener = await hbone.listen(listening_socket(*FLOOD_ADDRESS), SERVER)
    silent: list[socket.socket] = []
    try:
        for _ in range(20):
            silent.append(socket.create_connection(FLOOD_ADDRESS))
        await eventually_async(lambda: reasons.count("overload") == 12, 5, what="12 handshakes dropped")
        for s in silent[:12]:  # the oldest were ended by the server, long before its handshake timeout
            s.settimeout(5)
            with contextlib.suppress(ConnectionResetError):
                assert s.recv(1) == b""
        client = signed_svid(ca_dir, CLIENT)
        ctx = client_context(client)
        _reader, writer = await asyncio.wait_for(asyncio.open_connection(*FLOOD_ADDRESS, ssl=ctx), 5)
        assert peer_identity(writer.get_extra_info("ssl_object")) == SERVER  # the newest handshake went through
        writer.close()
        assert reasons.count("overload") == 13  # one more silent one made room for it
    finally:
        for s in silent:
            s.close()
        listener.close()
        hbone.abort()


async def _answer_ok(tunnel: InboundTunnel) -> None:
    tunnel.stream.respond(STATUS_OK)


FLOOD_ADDRESS = ("127.0.171.2", 15008)
