"""The node proxy's certificate manager: one SVID per local workload identity, kept fresh.

For each identity it keeps one slot with the current certificate, at most one signing request in
flight (shared by every caller waiting for it) and one worker task that rotates the certificate at
half-life and, after a failure, retries with jittered exponential backoff while the still-valid
certificate stays in use. Keys are made here and live only in memory.

Two backends sign: the in-process CA of local mode (`CertificateManager.in_process`, which still
enforces node authorization when given a node and the config) and a remote CA over gRPC
(`CertificateManager.remote`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import inspect
import logging
import random
import time
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any, Protocol

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from prometheus_client import CollectorRegistry, Counter, Gauge

from ztunnel.config.model import ClusterConfig
from ztunnel.errors import ZtunnelError
from ztunnel.identity.authz import authorize_identity
from ztunnel.identity.ca import DEFAULT_MAX_TTL, DEFAULT_TTL, CertificateAuthority
from ztunnel.identity.certs import WorkloadCertificate, generate_key, key_to_pem, make_csr, split_pem_chain, uri_sans
from ztunnel.identity.revocation import (
    ERROR,
    LOADED,
    NO_REVOCATIONS,
    REJECTED,
    RevocationAnswer,
    RevocationSet,
    RevocationUpdate,
    next_revocation_list,
)
from ztunnel.identity.spiffe import SpiffeId

log = logging.getLogger("ztunnel.identity")

RotationListener = Callable[[SpiffeId, WorkloadCertificate], Awaitable[None] | None]
RevocationListener = Callable[[RevocationUpdate], None]
ConfigView = ClusterConfig | Callable[[], ClusterConfig | None] | Any  # a snapshot, a getter, or a source with .current

REFRESH_FRACTION = 0.5  # rotate at half-life, as Istio does
BACKOFF_INITIAL = 0.5
BACKOFF_MAX = 30.0
CRL_REFRESH_INTERVAL = 5.0  # how often the CRL source is polled: a revocation takes effect within this
EXPIRY_MARGIN = 1.0  # seconds before notAfter when a cert no longer counts as valid for new handshakes


class CertificateError(ZtunnelError):
    """No valid certificate for an identity; the text says why (CA refusal, CA unreachable, ...)."""

    def __init__(self, identity: SpiffeId, message: str) -> None:
        super().__init__(message)
        self.identity = identity


class SigningBackend(Protocol):
    """Where certificates come from: the in-process CA or a remote CA."""

    description: str

    async def sign(self, csr_pem: bytes, identity: SpiffeId, ttl: dt.timedelta) -> list[bytes]: ...

    def roots_pem(self) -> bytes: ...

    async def fetch_crl(self, known: RevocationSet) -> RevocationAnswer | None:
        """The CRL source's current answer (unverified), None when this backend has no CRL source."""
        ...

    async def close(self) -> None: ...


def _config_getter(config: ConfigView | None) -> Callable[[], ClusterConfig | None] | None:
    if config is None:
        return None
    if isinstance(config, ClusterConfig):
        snapshot = config
        return lambda: snapshot
    if hasattr(config, "current"):  # FileConfigSource or anything else that keeps the latest snapshot
        source = config
        return lambda: source.current
    if callable(config):
        return config
    raise TypeError(f"config must be a ClusterConfig, a getter or a config source, not {type(config).__name__}")


class InProcessBackend:
    """Local mode: sign with the CA directory's intermediate key, in this process."""

    def __init__(
        self,
        ca: CertificateAuthority,
        *,
        node: str | None = None,
        config: Callable[[], ClusterConfig | None] | None = None,
    ) -> None:
        self.ca = ca
        self.node = node
        self.config = config
        self.description = f"in-process CA {ca.directory}"

    async def sign(self, csr_pem: bytes, identity: SpiffeId, ttl: dt.timedelta) -> list[bytes]:
        if self.node is not None and self.config is not None:
            authorize_identity(self.config(), self.node, identity)
        return self.ca.sign_csr(csr_pem, ttl=ttl, expected_identity=identity)

    def roots_pem(self) -> bytes:
        return self.ca.roots_pem

    async def fetch_crl(self, known: RevocationSet) -> RevocationAnswer | None:
        """crl.pem and retired-crls.pem of the CA directory, read again only when they changed."""
        return self.ca.published_revocations(known.number)

    async def close(self) -> None:
        return None


class RemoteBackend:
    """A CA server reached over gRPC with the node's bearer token."""

    def __init__(self, client: Any, roots_pem: bytes) -> None:
        self.client = client
        self._roots = roots_pem
        self.description = f"CA at {client.address}"

    async def sign(self, csr_pem: bytes, identity: SpiffeId, ttl: dt.timedelta) -> list[bytes]:
        chain = await self.client.create_certificate(csr_pem, ttl, impersonated_identity=identity.uri)
        return [c.encode() if isinstance(c, str) else c for c in chain]

    def roots_pem(self) -> bytes:
        return self._roots

    async def fetch_crl(self, known: RevocationSet) -> RevocationAnswer | None:
        """The CA server's RevocationService (Istio's API has no CRL); only the number when ours is current."""
        answer: RevocationAnswer = await self.client.get_revocation_list(known.number)
        return answer

    async def close(self) -> None:
        await self.client.close()


@dataclasses.dataclass(eq=False)
class _Slot:
    """Everything the manager knows about one identity."""

    identity: SpiffeId
    wake: asyncio.Event
    cert: WorkloadCertificate | None = None
    fetched_at: float = 0.0
    refresh_at: float = 0.0
    failures: int = 0
    retry_at: float = 0.0
    last_error: str = ""
    attempt: asyncio.Task[WorkloadCertificate] | None = None
    worker: asyncio.Task[None] | None = None

    def valid_cert(self, now: float) -> WorkloadCertificate | None:
        if self.cert is not None and now < self.cert.not_after.timestamp() - EXPIRY_MARGIN:
            return self.cert
        return None

    def state(self, now: float) -> str:
        valid = self.valid_cert(now) is not None
        if valid:
            if self.attempt is not None:
                return "rotating"
            return "retrying" if self.failures else "valid"
        if self.failures:
            return "expired-retrying" if self.cert is not None else "failed-retrying"
        return "pending"


class CertificateManager:
    """Implements `CertificateProvider`: `await get(identity)` returns a valid SVID or raises CertificateError.

    Lifetime: `await start()` (background CRL refresh), then use, then `await close()`, which cancels
    and awaits every task it started. `get`/`prefetch` may be called before `start` inside a running loop.
    """

    def __init__(
        self,
        backend: SigningBackend,
        *,
        ttl: dt.timedelta | float = DEFAULT_TTL,
        registry: CollectorRegistry | None = None,
        refresh_fraction: float = REFRESH_FRACTION,
        backoff_initial: float = BACKOFF_INITIAL,
        backoff_max: float = BACKOFF_MAX,
        crl_refresh_interval: float = CRL_REFRESH_INTERVAL,
        rng: random.Random | None = None,
    ) -> None:
        self.backend = backend
        self.ttl = ttl if isinstance(ttl, dt.timedelta) else dt.timedelta(seconds=ttl)
        self.refresh_fraction = refresh_fraction
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.crl_refresh_interval = crl_refresh_interval
        self.registry = registry if registry is not None else CollectorRegistry()
        self._rng = rng or random.Random()
        self._slots: dict[SpiffeId, _Slot] = {}
        self._listeners: list[RotationListener] = []
        self._revocation_listeners: list[RevocationListener] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self._crl: RevocationSet = NO_REVOCATIONS
        self._crl_failing = False  # the CRL source failed last time (log once per outage, not every poll)
        self._started = False
        self._closed = False
        self.expiry = Gauge(
            "ztunnel_certificate_expiry_timestamp_seconds",
            "notAfter of the current certificate of each local workload identity (unix time)",
            ["identity"],
            registry=self.registry,
        )
        self.requests = Counter(
            "ztunnel_certificate_requests",
            "certificate signing requests sent by this node, by result",
            ["result"],
            registry=self.registry,
        )

    # ---- constructors ---------------------------------------------------------------------------
    @classmethod
    def in_process(
        cls,
        ca_dir: str | Path,
        *,
        node: str | None = None,
        config: ConfigView | None = None,
        ttl: dt.timedelta | float = DEFAULT_TTL,
        registry: CollectorRegistry | None = None,
        max_ttl: dt.timedelta = DEFAULT_MAX_TTL,
        **options: Any,
    ) -> CertificateManager:
        """Local mode: sign with the CA in `ca_dir`. With `node` and `config`, only pods on `node` get certs.

        `config` is a ClusterConfig, a zero-argument getter, or a source with `.current` (FileConfigSource).
        Raises CAError (one line, names the file) if the CA directory is missing or broken.
        """
        ca = CertificateAuthority.load(ca_dir, max_ttl=max_ttl)
        backend = InProcessBackend(ca, node=node, config=_config_getter(config))
        return cls(backend, ttl=ttl, registry=registry, **options)

    @classmethod
    def remote(
        cls,
        address: str,
        root_pem: bytes | str,
        token: str | Path,
        *,
        ttl: dt.timedelta | float = DEFAULT_TTL,
        registry: CollectorRegistry | None = None,
        server_name: str | None = None,
        **options: Any,
    ) -> CertificateManager:
        """A CA server at `address` (HOST:PORT), verified with `root_pem`, authenticated with the node `token`
        (or the token file, read again for each call: projected tokens rotate)."""
        from ztunnel.identity.h2client import CAClient  # no grpcio in the proxy: ~15 MB less RSS

        roots = root_pem.encode() if isinstance(root_pem, str) else root_pem
        client = CAClient(address, roots, token, server_name=server_name)
        return cls(RemoteBackend(client, roots), ttl=ttl, registry=registry, **options)

    # ---- lifetime -------------------------------------------------------------------------------
    async def start(self) -> None:
        if self._closed:
            raise RuntimeError("CertificateManager is closed")
        if self._started:
            return
        self._started = True
        self._spawn(self._crl_loop(), "crl-refresh")

    async def close(self) -> None:
        """Cancel every task this manager started and wait for them; close the CA channel."""
        self._closed = True
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()
        self._slots.clear()
        await self.backend.close()

    def _spawn(self, coro: Awaitable[Any], name: str) -> asyncio.Task[Any]:
        task: asyncio.Task[Any] = asyncio.get_running_loop().create_task(coro, name=name)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled():
            exc = task.exception()  # retrieved so an unawaited failed attempt does not warn at GC
            if exc is not None and not isinstance(exc, CertificateError):
                log.error("certificate manager task %s failed", task.get_name(), exc_info=exc)

    # ---- the CertificateProvider API ----------------------------------------------------------
    async def get(self, identity: SpiffeId) -> WorkloadCertificate:
        """A valid certificate for `identity`, fetching one if needed (one request shared by all callers)."""
        if self._closed:
            raise CertificateError(identity, "the certificate manager is closed")
        slot = self._slot(identity)
        now = time.time()
        cert = slot.valid_cert(now)
        if cert is not None:
            return cert
        attempt = slot.attempt
        if attempt is None:
            if slot.failures and now < slot.retry_at:
                raise CertificateError(
                    identity,
                    f"no valid certificate for {identity}: {slot.last_error} (retrying in {slot.retry_at - now:.1f}s)",
                )
            attempt = self._start_attempt(slot)
        try:
            return await asyncio.shield(attempt)
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if attempt.cancelled() and current is not None and not current.cancelling():
                raise CertificateError(identity, f"the request for {identity} was abandoned (forgotten)") from None
            raise

    def prefetch(self, identities: Iterable[SpiffeId]) -> None:
        """Start fetching certificates now for identities of pods on this node (call inside the loop)."""
        if self._closed:
            return
        for identity in identities:
            self._slot(identity)

    def forget(self, identity: SpiffeId) -> None:
        """Stop keeping a certificate for `identity` (its last pod left the node)."""
        slot = self._slots.pop(identity, None)
        if slot is None:
            return
        for task in (slot.worker, slot.attempt):
            if task is not None:
                task.cancel()
        with contextlib.suppress(KeyError):
            self.expiry.remove(identity.uri)

    def subscribe(self, listener: RotationListener) -> None:
        """Call `listener(identity, cert)` whenever an identity gets a new certificate or a new CRL."""
        self._listeners.append(listener)

    def subscribe_revocation(self, listener: RevocationListener) -> None:
        """Call `listener(update)` after each CRL poll that changed something, was refused or failed.

        Called after the held certificates carry the new CRL (so TLS contexts rebuilt from them enforce it).
        """
        self._revocation_listeners.append(listener)

    @property
    def revocation_list(self) -> RevocationSet:
        """The CRLs in force (verified), one per signer; empty while nothing is revoked."""
        return self._crl

    def ready_for(self, identities: Iterable[SpiffeId]) -> bool:
        """True when every identity has a valid certificate now (readiness)."""
        now = time.time()
        for identity in identities:
            slot = self._slots.get(identity)
            if slot is None or slot.valid_cert(now) is None:
                return False
        return True

    def dump(self) -> list[dict[str, Any]]:
        """What /config_dump shows: per identity, the serial, validity and state."""
        now = time.time()
        out = []
        for identity, slot in sorted(self._slots.items()):
            cert = slot.cert
            out.append(
                {
                    "identity": identity.uri,
                    "serial": f"{cert.serial:x}" if cert else None,
                    "not_before": cert.not_before.isoformat() if cert else None,
                    "not_after": cert.not_after.isoformat() if cert else None,
                    "state": slot.state(now),
                    "refresh_at": _iso(slot.refresh_at) if cert else None,
                    "failures": slot.failures,
                    "retry_at": _iso(slot.retry_at) if slot.failures else None,
                    "last_error": slot.last_error or None,
                }
            )
        return out

    # ---- inside -------------------------------------------------------------------------------
    def _slot(self, identity: SpiffeId) -> _Slot:
        slot = self._slots.get(identity)
        if slot is None:
            slot = _Slot(identity=identity, wake=asyncio.Event())
            self._slots[identity] = slot
            slot.worker = self._spawn(self._keep_fresh(slot), f"cert-worker {identity}")
        return slot

    def _start_attempt(self, slot: _Slot) -> asyncio.Task[WorkloadCertificate]:
        assert slot.attempt is None
        task: asyncio.Task[WorkloadCertificate] = self._spawn(self._fetch(slot), f"cert-fetch {slot.identity}")
        slot.attempt = task
        return task

    def _due(self, slot: _Slot) -> float:
        if slot.attempt is not None:
            return 0.0
        if slot.failures:
            return slot.retry_at
        if slot.cert is not None:
            return slot.refresh_at
        return 0.0

    async def _keep_fresh(self, slot: _Slot) -> None:
        """Per identity: wait until the refresh (or retry) time, then fetch; forever, until forgotten."""
        while True:
            slot.wake.clear()
            delay = self._due(slot) - time.time()
            if delay > 0:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await slot.wake.wait()
                continue
            attempt = slot.attempt or self._start_attempt(slot)
            with contextlib.suppress(CertificateError):
                await asyncio.shield(attempt)

    def _backoff(self, failures: int, remaining: float | None) -> float:
        """Jittered exponential backoff ("equal jitter"), kept short enough to retry before expiry."""
        ceiling = min(self.backoff_max, self.backoff_initial * 2 ** min(failures - 1, 30))
        if remaining is not None and remaining > 0:
            ceiling = min(ceiling, max(self.backoff_initial, remaining / 2))
        return float(ceiling / 2 + self._rng.uniform(0, ceiling / 2))

    async def _fetch(self, slot: _Slot) -> WorkloadCertificate:
        identity = slot.identity
        try:
            key = generate_key()
            csr = make_csr(key, identity)
            chain = await self.backend.sign(csr, identity, self.ttl)
            cert = self._build(identity, key, chain)
        except asyncio.CancelledError:
            slot.attempt = None
            raise
        except Exception as e:  # every failure is recorded and retried; cancellation is not caught above
            slot.attempt = None
            now = time.time()
            valid = slot.valid_cert(now)
            slot.failures += 1
            delay = self._backoff(slot.failures, valid.not_after.timestamp() - now if valid else None)
            slot.retry_at = now + delay
            slot.last_error = _one_line(e)
            self.requests.labels(result="error").inc()
            log.warning(
                "certificate request failed, retrying in %.1fs: %s",
                delay,
                slot.last_error,
                extra={"identity": identity.uri, "failures": slot.failures, "keeping_valid_cert": valid is not None},
            )
            slot.wake.set()
            raise CertificateError(identity, f"no certificate for {identity}: {slot.last_error}") from e
        slot.attempt = None
        now = time.time()
        rotated = slot.cert is not None
        slot.cert = cert
        slot.fetched_at = now
        slot.refresh_at = now + max(0.0, cert.not_after.timestamp() - now) * self.refresh_fraction
        slot.failures = 0
        slot.retry_at = 0.0
        slot.last_error = ""
        self.requests.labels(result="ok").inc()
        if identity in self._slots and self._slots[identity] is slot:
            self.expiry.labels(identity=identity.uri).set(cert.not_after.timestamp())
        log.info(
            "certificate %s",
            "rotated" if rotated else "issued",
            extra={"identity": identity.uri, "serial": f"{cert.serial:x}", "not_after": cert.not_after.isoformat()},
        )
        slot.wake.set()
        self._notify(identity, cert)
        return cert

    def _build(self, identity: SpiffeId, key: ec.EllipticCurvePrivateKey, chain: list[bytes]) -> WorkloadCertificate:
        """Check the CA's answer: a leaf for our key and identity, then the chain."""
        pems = [p for c in chain for p in split_pem_chain(c)]
        if not pems:
            raise ValueError(f"{self.backend.description} answered with no PEM certificate")
        leaf = x509.load_pem_x509_certificate(pems[0])
        pub = leaf.public_key()
        if not isinstance(pub, ec.EllipticCurvePublicKey) or pub.public_numbers() != key.public_key().public_numbers():
            raise ValueError(f"{self.backend.description} returned a leaf for a different key")
        if uri_sans(leaf) != [identity.uri]:
            raise ValueError(f"{self.backend.description} returned a leaf for {uri_sans(leaf)}, not {identity}")
        return WorkloadCertificate(
            identity=identity,
            key_pem=key_to_pem(key),
            chain_pem=tuple(pems),
            roots_pem=self.backend.roots_pem(),
            revocations=self._crl,
        )

    def _notify(self, identity: SpiffeId, cert: WorkloadCertificate) -> None:
        for listener in list(self._listeners):
            try:
                result = listener(identity, cert)
            except Exception:
                log.exception("certificate listener failed", extra={"identity": identity.uri})
                continue
            if inspect.isawaitable(result):
                self._spawn(_guarded(result, identity), f"cert-listener {identity}")

    async def refresh_crl(self) -> RevocationUpdate | None:
        """Poll the CRL source once; on a verified change give every held certificate the new CRL.

        The last good CRL stays in force when the source fails or answers with something refused.
        Returns what happened (None: no CRL source, or nothing changed).
        """
        try:
            answer = await self.backend.fetch_crl(self._crl)
        except Exception as e:  # the CA is unreachable or its CRL is broken: keep what we have
            update = RevocationUpdate(ERROR, self._crl, _one_line(e))
            if not self._crl_failing:
                log.warning("cannot fetch the CRL, keeping the one in force: %s", update.reason)
            self._crl_failing = True
            self._tell_revocation(update)
            return update
        if self._crl_failing:
            log.info("CRL source reachable again")
            self._crl_failing = False
        if answer is None:
            return None
        update = next_revocation_list(self._crl, answer, self.backend.roots_pem())
        if update.reason:
            log.warning("CRL refused, keeping the one in force: %s", update.reason)
        if update.result == REJECTED:
            self._tell_revocation(update)
            return update
        if update.result != LOADED:
            self._crl = update.current  # the source's number may have moved on (nothing to enforce)
            return None
        self._crl = update.current
        log.info(
            "CRL loaded",
            extra={
                "crl_number": update.current.number,
                "signers": len(update.current.lists),
                "revoked": len(update.current.serials),
            },
        )
        for identity, slot in list(self._slots.items()):
            if slot.cert is not None:
                slot.cert = dataclasses.replace(slot.cert, revocations=update.current)
                self._notify(identity, slot.cert)
                if update.current.revokes(slot.cert.leaf):
                    # Our own certificate is revoked: peers refuse it from now on, so get a new one at once
                    # (the revoked one stays in use until it arrives: it is no worse than none).
                    log.warning(
                        "the certificate in use is revoked; requesting a new one",
                        extra={"identity": identity.uri, "serial": f"{slot.cert.serial:x}"},
                    )
                    slot.refresh_at = 0.0
                    slot.wake.set()
        self._tell_revocation(update)
        return update

    def _tell_revocation(self, update: RevocationUpdate) -> None:
        for listener in list(self._revocation_listeners):
            try:
                listener(update)
            except Exception:
                log.exception("revocation listener failed")

    async def _crl_loop(self) -> None:
        while True:
            await self.refresh_crl()
            await asyncio.sleep(self.crl_refresh_interval)


async def _guarded(awaitable: Awaitable[None], identity: SpiffeId) -> None:
    try:
        await awaitable
    except Exception:
        log.exception("certificate listener failed", extra={"identity": identity.uri})


def _iso(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat()


def _one_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__
