"""Bad input gets a clear refusal and the proxy keeps serving everyone else."""

from __future__ import annotations

import asyncio
import socket
import ssl
from pathlib import Path

import pytest

from tests.integration.conftest import (
    ECHO_PORT,
    NODE_A_CLIENT,
    NODE_B_SERVER,
    LocalMesh,
    free_port,
    raw_hbone_status,
    recv_all,
    socks_connect,
    start_proxy,
)
from tests.support.eventually import eventually
from tests.support.svids import FORGERIES, forged_svid, signed_svid
from ztunnel.hbone.client import HbonePool, PoolKey
from ztunnel.hbone.protocol import Authority, HboneError
from ztunnel.hbone.tls_cache import TlsContexts
from ztunnel.identity.ca import init_ca_dir
from ztunnel.identity.manager import CertificateManager
from ztunnel.identity.spiffe import SpiffeId
from ztunnel.identity.tls import client_context

CLIENT_ID = SpiffeId.parse("spiffe://cluster.local/ns/shop/sa/client")
SERVER_ID = SpiffeId.parse("spiffe://cluster.local/ns/shop/sa/server")
HBONE = (NODE_B_SERVER, 15008)


def _still_serving() -> None:
    with socks_connect(NODE_A_CLIENT, (NODE_B_SERVER, ECHO_PORT)) as s:
        s.sendall(b"still here")
        s.shutdown(socket.SHUT_WR)
        assert recv_all(s) == b"still here"


async def _client_ssl(ca_dir: Path, identity: SpiffeId = CLIENT_ID) -> ssl.SSLContext:
    return client_context(signed_svid(ca_dir, identity))


async def _raw_h2(ctx: ssl.SSLContext, headers: list[tuple[str, str]]) -> int | None:
    return await raw_hbone_status(ctx, HBONE, headers)


async def _status_or_refused(ctx: ssl.SSLContext, headers: list[tuple[str, str]]) -> int | None:
    """The response status, or None when the handshake fails or the server closes without an answer."""
    try:
        return await _raw_h2(ctx, headers)
    except (ConnectionError, ssl.SSLError, asyncio.IncompleteReadError):
        return None


def _identity_errors(mesh: LocalMesh) -> float:
    for line in mesh.b.metrics().splitlines():
        if line.startswith('ztunnel_tls_failures_total{reason="IDENTITY_ERROR"}'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def test_socks5_garbage_is_refused(local_mesh: LocalMesh) -> None:
    for garbage in (
        b"GET / HTTP/1.1\r\n\r\n",
        b"\x05\x01\x02",
        b"\x05\x01\x00\x05\x02\x00\x01" + bytes(6),
        b"\x05" * 700,
    ):
        reader, writer = await asyncio.open_connection(NODE_A_CLIENT, 15080)
        writer.write(garbage)
        async with asyncio.timeout(10):
            answer = await reader.read()  # the proxy answers (or not) and closes
        writer.close()
        if garbage == b"\x05\x01\x02":  # offers only username/password
            assert answer == b"\x05\xff"
        if garbage.startswith(b"\x05\x01\x00\x05\x02"):  # BIND
            assert answer[:2] == b"\x05\x00" and answer[2:4] == b"\x05\x07"
    await asyncio.to_thread(_still_serving)


async def test_non_connect_request_gets_400(local_mesh: LocalMesh) -> None:
    ctx = await _client_ssl(local_mesh.ca_dir)
    status = await _raw_h2(
        ctx, [(":method", "GET"), (":scheme", "https"), (":path", "/"), (":authority", f"{NODE_B_SERVER}:{ECHO_PORT}")]
    )
    assert status == 400
    await asyncio.to_thread(_still_serving)


@pytest.mark.parametrize("authority", ["server.shop:8080", f"{NODE_B_SERVER}", f"{NODE_B_SERVER}:99999", "[::1:80"])
async def test_malformed_authority_gets_400(local_mesh: LocalMesh, authority: str) -> None:
    ctx = await _client_ssl(local_mesh.ca_dir)
    assert await _raw_h2(ctx, [(":method", "CONNECT"), (":authority", authority)]) == 400


async def test_non_ascii_port_gets_400_and_the_connection_stays_usable(local_mesh: LocalMesh) -> None:
    # `8080²` passes str.isdigit() but not int(): the parse must refuse it, not raise out of the handler.
    ctx = await _client_ssl(local_mesh.ca_dir)
    assert await _raw_h2(ctx, [(":method", "CONNECT"), (":authority", f"{NODE_B_SERVER}:8080\u00b2")]) == 400
    assert "Traceback" not in local_mesh.b.log()
    await asyncio.to_thread(_still_serving)


async def test_a_long_authority_is_refused_and_logged_clipped(local_mesh: LocalMesh) -> None:
    marker = "7" * 8000  # a peer-controlled string, well under any header size limit
    ctx = await _client_ssl(local_mesh.ca_dir)
    assert await _raw_h2(ctx, [(":method", "CONNECT"), (":authority", f"{marker}:80")]) == 400

    def logged() -> list[str]:
        return [line for line in local_mesh.b.log().splitlines() if "7" * 64 in line]

    lines = eventually(logged, what="the refusal in node-b's log")
    assert all(line.count("7" * 64) <= 4 and len(line) < 2000 for line in lines), max(map(len, lines))
    assert any("8003 chars" in line for line in lines)


async def test_connect_to_an_address_that_is_not_a_local_pod_gets_400(
    local_mesh: LocalMesh, certs: CertificateManager
) -> None:
    pool = HbonePool(TlsContexts(certs))
    key = PoolKey(CLIENT_ID, SERVER_ID, HBONE)
    try:
        for target in (
            Authority(NODE_A_CLIENT, 80),
            Authority("127.0.0.1", 22),
            Authority(NODE_B_SERVER, 15008),
            Authority(NODE_B_SERVER, 15020),  # every proxy port, not only the data plane's
        ):
            with pytest.raises(HboneError) as e:
                await pool.connect(key, target, expected_identities=[SERVER_ID.uri])
            assert e.value.status == 400, target
        # The app port with nothing listening: 503.
        with pytest.raises(HboneError) as e:
            await pool.connect(key, Authority(NODE_B_SERVER, 9), expected_identities=[SERVER_ID.uri])
        assert e.value.status == 503
        # And a good one on the same pooled connection still works.
        stream = await pool.connect(key, Authority(NODE_B_SERVER, ECHO_PORT), expected_identities=[SERVER_ID.uri])
        await stream.write(b"ok")
        await stream.write_eof()
        assert await stream.read() == b"ok"
        assert len(pool.connections()) == 1
    finally:
        pool.close()


async def test_malformed_frames_close_only_that_connection(local_mesh: LocalMesh) -> None:
    ctx = await _client_ssl(local_mesh.ca_dir)
    bad_frames = [
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\xff" * 64,  # preface then a frame with an absurd length
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x04\x00\x00\x00\x00\x00\x00abcd",  # DATA on stream 0
        b"not http/2 at all\r\n\r\n",
    ]
    for payload in bad_frames:
        reader, writer = await asyncio.open_connection(*HBONE, ssl=ctx, server_hostname="")
        writer.write(payload)
        async with asyncio.timeout(10):
            try:
                while await reader.read(65536):
                    pass  # server SETTINGS, then GOAWAY, then EOF
            except (ConnectionError, ssl.SSLError):
                pass
        writer.close()
    await asyncio.to_thread(_still_serving)


async def test_client_certificate_from_another_ca_is_refused(local_mesh: LocalMesh, tmp_path: Path) -> None:
    other = init_ca_dir(tmp_path / "other")
    ctx = await _client_ssl(other)
    # The client's own verification of the server fails too, so trust the real CA to isolate the server check.
    ctx.load_verify_locations(cafile=str(local_mesh.ca_dir / "root-cert.pem"))
    status = await _status_or_refused(ctx, [(":method", "CONNECT"), (":authority", f"{NODE_B_SERVER}:{ECHO_PORT}")])
    assert status is None, f"the server answered {status} to a client it must not trust"
    await asyncio.to_thread(_still_serving)


async def test_client_certificate_from_another_trust_domain_under_the_same_root_is_refused(
    local_mesh: LocalMesh, tmp_path: Path
) -> None:
    # A second intermediate for "other.org" under the mesh's own root: the chain verifies, only the trust
    # domain differs, so this is the server's trust-domain check and nothing else.
    other = init_ca_dir(
        tmp_path / "other-td",
        trust_domain="other.org",
        root_cert_file=local_mesh.ca_dir / "root-cert.pem",
        root_key_file=local_mesh.ca_dir / "root-key.pem",
    )
    request = [(":method", "CONNECT"), (":authority", f"{NODE_B_SERVER}:{ECHO_PORT}")]
    foreign = await _client_ssl(other, SpiffeId.parse("spiffe://other.org/ns/shop/sa/client"))
    before = await asyncio.to_thread(_identity_errors, local_mesh)
    assert await _status_or_refused(foreign, request) is None
    assert await asyncio.to_thread(_identity_errors, local_mesh) == before + 1  # counted by the server's proxy
    # Control: the same request with this trust domain's SVID is answered.
    assert await _status_or_refused(await _client_ssl(local_mesh.ca_dir), request) == 200
    await asyncio.to_thread(_still_serving)


@pytest.mark.parametrize("forgery", sorted(FORGERIES))
async def test_a_client_leaf_that_is_not_an_svid_is_refused(local_mesh: LocalMesh, forgery: str) -> None:
    # Chains to the mesh's CA (OpenSSL accepts it) and its first URI SAN is a valid client identity, but
    # an X.509-SVID has exactly one URI SAN and no CA powers: the server refuses it and counts it.
    ctx = client_context(forged_svid(local_mesh.ca_dir, CLIENT_ID.uri, forgery))
    request = [(":method", "CONNECT"), (":authority", f"{NODE_B_SERVER}:{ECHO_PORT}")]
    before = await asyncio.to_thread(_identity_errors, local_mesh)
    assert await _status_or_refused(ctx, request) is None
    assert await asyncio.to_thread(_identity_errors, local_mesh) == before + 1
    assert "not an SVID" in local_mesh.b.log() or "an SVID has exactly one" in local_mesh.b.log()
    # Control: the CA's own SVID for the same identity is answered.
    assert await _status_or_refused(await _client_ssl(local_mesh.ca_dir), request) == 200


async def test_a_tunnel_to_a_moved_operator_port_on_a_wildcard_address_is_refused(
    ca_dir: Path, tmp_path: Path
) -> None:
    """An admin server moved by flag to 0.0.0.0 also listens on the pod's IP: a CONNECT to it gets 400, so no
    peer reaches /quitquitquit through the tunnel (before: only Istio's default ports were refused)."""
    pod_ip, admin = "127.0.171.1", free_port()
    config = tmp_path / "cluster.yaml"
    config.write_text(
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}\n"
        "---\napiVersion: v1\nkind: Pod\nmetadata: {name: lone, namespace: shop, uid: lone}\n"
        f"spec: {{nodeName: node-q, serviceAccountName: server}}\nstatus: {{podIP: {pod_ip}}}\n"
    )
    proxy = start_proxy("node-q", config, ca_dir, tmp_path, "--admin-addr", f"0.0.0.0:{admin}")
    try:
        ctx = await _client_ssl(ca_dir)
        headers = [(":method", "CONNECT"), (":authority", f"{pod_ip}:{admin}")]
        assert await raw_hbone_status(ctx, (pod_ip, 15008), headers) == 400
        assert proxy.proc.poll() is None  # not quit through its own admin port
    finally:
        proxy.stop()
