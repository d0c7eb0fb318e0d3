"""The certificate manager against a real CA server over gRPC/TLS: 6 s certificates, rotation, CA outages."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from prometheus_client import CollectorRegistry

from tests.support.eventually import eventually_async
from tests.support.identity import spiffe, two_node_config_yaml, write_token_file
from tests.support.svids import issue
from ztunnel.config.loader import build_config, load_documents
from ztunnel.identity.authz import NodeTokens, load_node_tokens
from ztunnel.identity.ca import CertificateAuthority, init_ca_dir
from ztunnel.identity.h2client import REVOCATION_PATH, CAClient, CAClientError, GrpcStatus
from ztunnel.identity.manager import CertificateError, CertificateManager
from ztunnel.identity.revocation import ERROR, LOADED, REJECTED, RevocationAnswer, RevocationUpdate
from ztunnel.identity.server import CAServer
from ztunnel.identity.spiffe import SpiffeId

WEB = SpiffeId.parse(spiffe("shop", "web"))
SHARED = SpiffeId.parse(spiffe("shop", "shared"))
DB = SpiffeId.parse(spiffe("shop", "db"))
TTL = 6.0


@dataclass
class CA:
    ca: CertificateAuthority
    tokens: dict[str, str]
    node_tokens: NodeTokens
    server: CAServer

    async def restart(self) -> None:
        """A new server process on the same port, as after a CA pod restart."""
        port = self.server.port
        config = self.server.config
        self.server = CAServer(self.ca, self.node_tokens, config, listen=f"127.0.0.1:{port}")
        await self.server.start()


@pytest.fixture
async def ca_server(tmp_path: Path) -> AsyncIterator[CA]:
    init_ca_dir(tmp_path / "ca")
    ca = CertificateAuthority.load(tmp_path / "ca")
    tokens = write_token_file(tmp_path / "tokens.yaml")
    node_tokens = NodeTokens(load_node_tokens(tmp_path / "tokens.yaml"))
    config = build_config(load_documents(two_node_config_yaml(), "two-nodes.yaml"))
    server = CAServer(ca, node_tokens, lambda: config, listen="127.0.0.1:0")
    await server.start()
    holder = CA(ca, tokens, node_tokens, server)
    try:
        yield holder
    finally:
        await holder.server.stop(0)


def remote(ca: CA, **options: object) -> CertificateManager:
    return CertificateManager.remote(
        f"127.0.0.1:{ca.server.port}",
        ca.ca.roots_pem,
        ca.tokens["node-a"],
        ttl=TTL,
        **options,  # type: ignore[arg-type]
    )


async def test_remote_manager_rotates_a_6s_cert_before_expiry(ca_server: CA) -> None:
    registry = CollectorRegistry()
    mgr = remote(ca_server, registry=registry)
    rotated = asyncio.Event()
    mgr.subscribe(lambda identity, cert: rotated.set() if identity == WEB else None)
    await mgr.start()
    try:
        first = await mgr.get(WEB)
        assert first.identity == WEB and first.chain_pem[-1] == (ca_server.ca.directory / "root-cert.pem").read_bytes()
        assert first.not_after.timestamp() - time.time() <= TTL + 1
        rotated.clear()
        # until the rotation, every caller gets the first cert
        while not rotated.is_set():
            assert (await mgr.get(WEB)).serial == first.serial
            assert time.time() < first.not_after.timestamp(), "no rotation before expiry"
            await asyncio.sleep(0.05)
        second = await mgr.get(WEB)
        assert second.serial != first.serial
        rotated_at = time.time()
        # at half-life, not at the end
        assert rotated_at < first.not_after.timestamp() - 1.5
        assert (
            registry.get_sample_value("ztunnel_certificate_expiry_timestamp_seconds", {"identity": WEB.uri})
            == second.not_after.timestamp()
        )
        assert mgr.dump()[0]["serial"] == f"{second.serial:x}"
    finally:
        await mgr.close()


async def test_ca_outage_keeps_the_valid_cert_backs_off_and_recovers(
    ca_server: CA, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="ztunnel.identity")
    mgr = remote(ca_server, backoff_initial=0.2, backoff_max=1.0)
    await mgr.start()
    try:
        first = await mgr.get(WEB)
        await ca_server.server.stop(0)
        # The half-life rotation fails and is retried with backoff; the valid cert stays in use. Backing off is
        # checked on the manager's own schedule (dump()'s failures and retry_at, and the time each failure was
        # logged), not on wall-clock windows, so load can delay the test but not fail it.
        retry_at: dict[int, float] = {}
        deadline = time.monotonic() + TTL
        while len(retry_at) < 3:
            entry = mgr.dump()[0]
            seen_at = time.time()  # after the dump: every failure it shows happened before this
            n = entry["failures"]
            if n and n not in retry_at:
                assert entry["state"] in ("retrying", "rotating") and entry["serial"] == f"{first.serial:x}", entry
                assert "UNAVAILABLE" in entry["last_error"]
                if n - 1 in retry_at:  # a manager that ignored retry_at would show failure n before it passed
                    assert seen_at >= retry_at[n - 1], f"failure {n} came before failure {n - 1}'s retry_at"
                retry_at[n] = dt.datetime.fromisoformat(entry["retry_at"]).timestamp()
                assert (await mgr.get(WEB)).serial == first.serial
                assert mgr.ready_for([WEB])
            assert time.monotonic() < deadline, f"only failures {sorted(retry_at)} seen"
            await asyncio.sleep(0.01)
        failed_at = {
            r.failures: r.created for r in caplog.records if r.name == "ztunnel.identity" and hasattr(r, "failures")
        }
        not_after = first.not_after.timestamp()
        for n, at in retry_at.items():
            wait = at - failed_at[n]  # what the manager chose after failure n
            # equal jitter: between half and all of min(backoff_max, 0.2 * 2^(n-1)), which is kept short enough
            # to retry before expiry (at most half the remaining validity, never under backoff_initial)
            ceiling = min(1.0, 0.2 * 2 ** (n - 1), max(0.2, (not_after - failed_at[n]) / 2))
            assert ceiling / 2 - 0.001 <= wait <= ceiling + 0.001, (n, wait, ceiling)
        await ca_server.restart()
        await eventually_async(lambda: mgr.dump()[0]["failures"] == 0, 8, what='mgr.dump()[0]["failures"] == 0')
        assert (await mgr.get(WEB)).serial != first.serial
        assert mgr.dump()[0]["state"] == "valid"
    finally:
        await mgr.close()


async def test_remote_manager_reports_refusals_and_prefetches(ca_server: CA) -> None:
    mgr = remote(ca_server, backoff_initial=5.0)
    await mgr.start()
    try:
        mgr.prefetch([WEB, SHARED])
        await eventually_async(lambda: mgr.ready_for([WEB, SHARED]), 5, what="mgr.ready_for([WEB, SHARED])")
        with pytest.raises(CertificateError, match=r"PERMISSION_DENIED.*node-b"):
            await mgr.get(DB)
        assert not mgr.ready_for([WEB, DB])
        states = {d["identity"]: d["state"] for d in mgr.dump()}
        assert states == {WEB.uri: "valid", SHARED.uri: "valid", DB.uri: "failed-retrying"}
    finally:
        await mgr.close()
    bad = CertificateManager.remote(f"127.0.0.1:{ca_server.server.port}", ca_server.ca.roots_pem, "wrong-token")
    try:
        with pytest.raises(CertificateError, match="UNAUTHENTICATED"):
            await bad.get(WEB)
    finally:
        await bad.close()


async def test_remote_manager_polls_the_crl_and_keeps_it_through_an_outage(ca_server: CA) -> None:
    mgr = remote(ca_server, crl_refresh_interval=0.1)
    updates: list[RevocationUpdate] = []
    mgr.subscribe_revocation(updates.append)
    await mgr.start()
    try:
        cert = await mgr.get(WEB)
        assert not mgr.revocation_list and not cert.revocations
        ca_server.ca.revoke([42])
        await eventually_async(lambda: bool(mgr.revocation_list), 5, what="a CRL in force")
        held = mgr.revocation_list
        assert held is not None and held.serials == {42} and held.number == 1
        assert (await mgr.get(WEB)).revocations is held  # new TLS contexts are built with it
        assert [u.result for u in updates] == [LOADED]
        await ca_server.server.stop(0)
        await eventually_async(lambda: updates[-1].result == ERROR, 5, what="updates[-1].result == ERROR")
        assert mgr.revocation_list is held and "UNAVAILABLE" in updates[-1].reason
        await ca_server.restart()
        ca_server.ca.revoke([43])
        await eventually_async(
            lambda: 43 in mgr.revocation_list.serials, 5,
            what="serial 43 in the CRL in force",
        )
        assert mgr.revocation_list.number == 2
    finally:
        await mgr.close()


async def test_revocation_service_wire(ca_server: CA) -> None:
    address = f"127.0.0.1:{ca_server.server.port}"
    client = CAClient(address, ca_server.ca.roots_pem, ca_server.tokens["node-a"])
    assert await client.get_revocation_list(0) == RevocationAnswer(b"", 0, tuple(ca_server.ca.chain_pem))
    ca_server.ca.revoke([42])
    full = await client.get_revocation_list(0)
    assert full.number == 1 and x509.load_der_x509_crl(full.crl).get_revoked_certificate_by_serial_number(42)
    assert (await client.get_revocation_list(1)).crl == b""  # the caller holds the current one: number only
    with pytest.raises(CAClientError) as refused:
        await CAClient(address, ca_server.ca.roots_pem, "wrong-token").get_revocation_list(0)
    assert refused.value.code == GrpcStatus.UNAUTHENTICATED
    with pytest.raises(CAClientError) as garbage:
        await client._unary(REVOCATION_PATH, b"\xff\xff\xff")
    assert garbage.value.code == GrpcStatus.INVALID_ARGUMENT
    assert (await client.get_revocation_list(0)).number == 1  # and the server keeps serving


async def test_a_replaced_intermediates_revocations_stay_in_force_over_the_wire(
    ca_server: CA, tmp_path: Path
) -> None:
    """`ca init --force` keeping the root, then a CA server restart: the proxy keeps refusing the old
    intermediate's revoked leaf (review finding 3: it got no CRL and cleared its own), and takes the new
    intermediate's CRL beside it."""
    old_leaf = issue(ca_server.ca.directory, [WEB.uri]).leaf
    ca_server.ca.revoke([old_leaf.serial_number])
    mgr = remote(ca_server, crl_refresh_interval=0.1)
    updates: list[RevocationUpdate] = []
    mgr.subscribe_revocation(updates.append)
    await mgr.start()
    try:
        await eventually_async(lambda: mgr.revocation_list.revokes(old_leaf), 5, what="the old leaf revoked")
        await ca_server.server.stop(0)
        d = ca_server.ca.directory
        for name in ("root-cert.pem", "root-key.pem"):
            (tmp_path / f"kept-{name}").write_bytes((d / name).read_bytes())
        kept_root, kept_key = tmp_path / "kept-root-cert.pem", tmp_path / "kept-root-key.pem"
        init_ca_dir(d, root_cert_file=kept_root, root_key_file=kept_key, force=True)
        ca_server.ca = CertificateAuthority.load(d)
        await ca_server.restart()
        new_leaf = issue(d, [WEB.uri]).leaf
        ca_server.ca.revoke([new_leaf.serial_number])
        await eventually_async(lambda: mgr.revocation_list.revokes(new_leaf), 5, what="the new leaf revoked")
        assert mgr.revocation_list.revokes(old_leaf), "the old intermediate's revoked leaf is accepted again"
        assert len(mgr.revocation_list.lists) == 2 and mgr.revocation_list.number == 3
        assert all(u.result != REJECTED for u in updates), [u.reason for u in updates]
    finally:
        await mgr.close()
