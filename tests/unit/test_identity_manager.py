"""The certificate manager with a scripted backend: sharing, prefetch, forget, backoff, listeners, metrics."""

from __future__ import annotations

import asyncio
import datetime as dt
import random
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from tests.support.eventually import eventually_async
from tests.support.identity import spiffe, two_node_config_yaml
from ztunnel.config.loader import build_config, load_documents
from ztunnel.identity.ca import CertificateAuthority, init_ca_dir
from ztunnel.identity.manager import CertificateError, CertificateManager, InProcessBackend
from ztunnel.identity.revocation import RevocationSet
from ztunnel.identity.spiffe import SpiffeId

WEB = SpiffeId.parse(spiffe("shop", "web"))
DB = SpiffeId.parse(spiffe("shop", "db"))


class ScriptedBackend(InProcessBackend):
    """The in-process CA, plus a gate to hold requests, a switch to fail them, and a count."""

    def __init__(self, ca: CertificateAuthority) -> None:
        super().__init__(ca)
        self.calls = 0
        self.gate = asyncio.Event()
        self.gate.set()
        self.fail: str | None = None
        self.closed = False

    async def sign(self, csr_pem: bytes, identity: SpiffeId, ttl: dt.timedelta) -> list[bytes]:
        self.calls += 1
        await self.gate.wait()
        if self.fail:
            raise ConnectionError(self.fail)
        return await super().sign(csr_pem, identity, ttl)

    async def close(self) -> None:
        self.closed = True


@pytest.fixture
def ca(tmp_path: Path) -> CertificateAuthority:
    init_ca_dir(tmp_path / "ca")
    return CertificateAuthority.load(tmp_path / "ca")


async def test_concurrent_callers_share_one_request(ca: CertificateAuthority) -> None:
    backend = ScriptedBackend(ca)
    backend.gate.clear()
    mgr = CertificateManager(backend, registry=CollectorRegistry())
    await mgr.start()
    try:
        waiters = [asyncio.create_task(mgr.get(WEB)) for _ in range(10)]
        await eventually_async(lambda: backend.calls == 1, 5, 0.02, what="backend.calls == 1")
        await asyncio.sleep(0.05)
        assert backend.calls == 1
        backend.gate.set()
        certs = await asyncio.gather(*waiters)
        assert len({c.serial for c in certs}) == 1
        assert backend.calls == 1
        assert (await mgr.get(WEB)).serial == certs[0].serial  # cached
        assert certs[0].identity == WEB and certs[0].roots_pem == ca.roots_pem
        assert certs[0].key_pem.startswith(b"-----BEGIN PRIVATE KEY-----")
    finally:
        await mgr.close()
    assert backend.closed


async def test_prefetch_readiness_dump_and_expiry_metric(ca: CertificateAuthority) -> None:
    registry = CollectorRegistry()
    mgr = CertificateManager(ScriptedBackend(ca), registry=registry)
    await mgr.start()
    try:
        assert not mgr.ready_for([WEB, DB])
        assert mgr.ready_for([])
        mgr.prefetch([WEB, DB])
        await eventually_async(lambda: mgr.ready_for([WEB, DB]), 5, 0.02, what="mgr.ready_for([WEB, DB])")
        cert = await mgr.get(WEB)
        value = registry.get_sample_value("ztunnel_certificate_expiry_timestamp_seconds", {"identity": WEB.uri})
        assert value == cert.not_after.timestamp()
        dump = {d["identity"]: d for d in mgr.dump()}
        assert set(dump) == {WEB.uri, DB.uri}
        assert dump[WEB.uri]["serial"] == f"{cert.serial:x}"
        assert dump[WEB.uri]["not_after"] == cert.not_after.isoformat()
        assert dump[WEB.uri]["not_before"] == cert.not_before.isoformat()
        assert dump[WEB.uri]["state"] == "valid"
        mgr.forget(DB)
        assert [d["identity"] for d in mgr.dump()] == [WEB.uri]
        assert registry.get_sample_value("ztunnel_certificate_expiry_timestamp_seconds", {"identity": DB.uri}) is None
        assert not mgr.ready_for([DB])
        assert registry.get_sample_value("ztunnel_certificate_requests_total", {"result": "ok"}) == 2
    finally:
        await mgr.close()


async def test_first_failure_is_reported_then_retried_with_backoff(ca: CertificateAuthority) -> None:
    backend = ScriptedBackend(ca)
    backend.fail = "CA unreachable"
    mgr = CertificateManager(backend, backoff_initial=0.2, backoff_max=0.4, registry=CollectorRegistry())
    try:
        with pytest.raises(CertificateError, match="CA unreachable"):
            await mgr.get(WEB)
        # while backing off, callers fail fast with the reason instead of piling requests on the CA
        with pytest.raises(CertificateError, match="retrying in"):
            await mgr.get(WEB)
        assert mgr.dump()[0]["state"] == "failed-retrying"
        await eventually_async(lambda: backend.calls >= 3, 5, 0.02, what="backend.calls >= 3")
        backend.fail = None
        await eventually_async(lambda: mgr.ready_for([WEB]), 5, 0.02, what="mgr.ready_for([WEB])")
        assert mgr.dump()[0]["failures"] == 0 and mgr.dump()[0]["last_error"] is None
    finally:
        await mgr.close()


def test_backoff_grows_with_jitter_and_stays_before_expiry(ca: CertificateAuthority) -> None:
    mgr = CertificateManager(ScriptedBackend(ca), backoff_initial=0.5, backoff_max=30, rng=random.Random(1))
    delays = [mgr._backoff(n, None) for n in range(1, 10)]
    for n, d in enumerate(delays, start=1):
        ceiling = min(30, 0.5 * 2 ** (n - 1))
        assert ceiling / 2 <= d <= ceiling
    assert delays[-1] > delays[0] * 10
    assert len({round(mgr._backoff(4, None), 6) for _ in range(20)}) > 1  # jittered
    assert mgr._backoff(20, remaining=4.0) <= 2.0  # retry while the valid cert still has time


async def test_old_cert_stays_in_use_until_the_new_one_arrives(ca: CertificateAuthority) -> None:
    backend = ScriptedBackend(ca)
    # refresh very early in the cert's life so the test is quick; the rule is the same as at half-life
    mgr = CertificateManager(backend, ttl=30, refresh_fraction=0.02, registry=CollectorRegistry())
    rotations: list[int] = []
    mgr.subscribe(lambda identity, cert: rotations.append(cert.serial))
    try:
        first = await mgr.get(WEB)
        backend.gate.clear()
        await eventually_async(
            lambda: backend.calls == 2, 5, 0.02, what="backend.calls == 2"
        )  # the rotation request is in flight and held
        assert mgr.dump()[0]["state"] == "rotating"
        assert (await mgr.get(WEB)).serial == first.serial
        backend.gate.set()
        await eventually_async(lambda: len(rotations) == 2, 5, 0.02, what="len(rotations) == 2")
        second = await mgr.get(WEB)
        assert second.serial != first.serial and rotations == [first.serial, second.serial]
    finally:
        await mgr.close()


async def test_failed_rotation_keeps_the_valid_cert(ca: CertificateAuthority) -> None:
    backend = ScriptedBackend(ca)
    mgr = CertificateManager(
        backend, ttl=30, refresh_fraction=0.02, backoff_initial=0.1, backoff_max=0.2, registry=CollectorRegistry()
    )
    try:
        first = await mgr.get(WEB)
        backend.fail = "connection refused"
        await eventually_async(lambda: mgr.dump()[0]["failures"] >= 2, 5, 0.02, what='mgr.dump()[0]["failures"] >= 2')
        assert mgr.dump()[0]["state"] == "retrying"
        assert "connection refused" in mgr.dump()[0]["last_error"]
        assert (await mgr.get(WEB)).serial == first.serial
        assert mgr.ready_for([WEB])
        backend.fail = None
        await eventually_async(lambda: mgr.dump()[0]["failures"] == 0, 5, 0.02, what='mgr.dump()[0]["failures"] == 0')
        assert (await mgr.get(WEB)).serial != first.serial
    finally:
        await mgr.close()


async def test_listener_errors_do_not_break_rotation(ca: CertificateAuthority) -> None:
    mgr = CertificateManager(ScriptedBackend(ca), registry=CollectorRegistry())
    seen: list[SpiffeId] = []

    def broken(identity: SpiffeId, cert: object) -> None:
        raise RuntimeError("listener bug")

    async def async_listener(identity: SpiffeId, cert: object) -> None:
        seen.append(identity)

    mgr.subscribe(broken)
    mgr.subscribe(async_listener)
    try:
        await mgr.get(WEB)
        await eventually_async(lambda: seen == [WEB], 5, 0.02, what="seen == [WEB]")
    finally:
        await mgr.close()


async def test_forget_during_a_request_releases_waiters(ca: CertificateAuthority) -> None:
    backend = ScriptedBackend(ca)
    backend.gate.clear()
    mgr = CertificateManager(backend, registry=CollectorRegistry())
    try:
        waiter = asyncio.create_task(mgr.get(WEB))
        await eventually_async(lambda: backend.calls == 1, 5, 0.02, what="backend.calls == 1")
        mgr.forget(WEB)
        with pytest.raises(CertificateError, match="abandoned"):
            await waiter
    finally:
        await mgr.close()


async def test_close_cancels_every_task(ca: CertificateAuthority) -> None:
    mgr = CertificateManager(ScriptedBackend(ca), registry=CollectorRegistry())
    await mgr.start()
    mgr.prefetch([WEB, DB])
    await eventually_async(lambda: mgr.ready_for([WEB, DB]), 5, 0.02, what="mgr.ready_for([WEB, DB])")
    before = {t for t in asyncio.all_tasks() if t.get_name().startswith(("cert-", "crl-"))}
    assert before
    await mgr.close()
    assert all(t.done() for t in before)
    with pytest.raises(CertificateError, match="closed"):
        await mgr.get(WEB)


async def test_in_process_ca_enforces_node_authorization(ca: CertificateAuthority) -> None:
    config = build_config(load_documents(two_node_config_yaml(), "two-nodes.yaml"))
    mgr = CertificateManager.in_process(ca.directory, node="node-a", config=config, registry=CollectorRegistry())
    try:
        assert (await mgr.get(WEB)).identity == WEB
        with pytest.raises(CertificateError, match="run only on node-b"):
            await mgr.get(DB)
    finally:
        await mgr.close()
    getter_mgr = CertificateManager.in_process(ca.directory, node="node-b", config=lambda: config)
    try:
        assert (await getter_mgr.get(DB)).identity == DB
    finally:
        await getter_mgr.close()


async def test_crl_changes_reach_held_certs_and_listeners(ca: CertificateAuthority) -> None:
    mgr = CertificateManager.in_process(ca.directory, crl_refresh_interval=0.05, registry=CollectorRegistry())
    updates: list[RevocationSet | None] = []
    mgr.subscribe(lambda identity, cert: updates.append(cert.revocations))
    await mgr.start()
    try:
        cert = await mgr.get(WEB)
        assert not cert.revocations
        ca.revoke([12345])
        await eventually_async(
            lambda: bool(updates and updates[-1] and 12345 in updates[-1].serials), 5, 0.02,
            what="a CRL in the last update",
        )
        assert (await mgr.get(WEB)).revocations is mgr.revocation_list
        assert (await mgr.get(WEB)).serial == cert.serial
    finally:
        await mgr.close()


async def test_a_revoked_certificate_of_ours_is_replaced_at_once(ca: CertificateAuthority) -> None:
    mgr = CertificateManager.in_process(ca.directory, crl_refresh_interval=0.05, registry=CollectorRegistry())
    await mgr.start()
    try:
        cert = await mgr.get(WEB)
        ca.revoke([cert.serial])
        await eventually_async(
            lambda: mgr.dump()[0]["serial"] != f"{cert.serial:x}", 5, 0.02,
            what="a certificate with a new serial",
        )
        fresh = await mgr.get(WEB)
        assert fresh.serial != cert.serial and fresh.revocations is mgr.revocation_list
        assert fresh.revocations is not None and fresh.revocations.serials == {cert.serial}
    finally:
        await mgr.close()
