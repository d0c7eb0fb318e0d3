"""The CA on a Kubernetes cluster (`ztunnel ca serve --source kubernetes`).

- Who is calling: a TokenReview of the caller's projected service-account token (audience `--token-audience`),
  then its pod, read from the API (uid as the token's bound pod claim, `spec.nodeName`); the pod's node is the
  node the file mode reads from its token file, and the same rule applies (`authz.check_request`). Reviews
  are cached briefly (bounded LRU, `REVIEW_TTL_S` or the token's expiry if sooner) and concurrent ones for one
  token are shared, so a proxy's burst of CSRs costs one review. Any failure to ask the API refuses the CSR
  (UNAVAILABLE): the CA never signs on a guess.
- Its root and intermediate: the operator's mounted `cacerts` Secret (Istio's file names), or one generated
  once and stored in a Secret; a second replica that loses the race to create it reads the winner's.
- The trust bundle: a ConfigMap `istio-ca-root-cert` (key `root-cert.pem`) in every namespace, as Istio's.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import datetime as dt
import hashlib
import json
import logging
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ztunnel.config.kube.client import KubeApiError, KubeClient, KubeEndpoint, quote_name
from ztunnel.identity.authz import CALLER_PEER, Caller, NodeAuthError, Refusal, bearer_token
from ztunnel.identity.ca import (
    CA_CERT,
    CA_KEY,
    CERT_CHAIN,
    CRL,
    RETIRED_CRLS,
    ROOT_CERT,
    ROOT_KEY,
    TRUST_BUNDLE,
    CAError,
    CertificateAuthority,
    init_ca_dir,
)
from ztunnel.identity.revocation import RevocationAnswer
from ztunnel.identity.spiffe import SpiffeId, SpiffeIdError

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

    from ztunnel.identity.server import CAServer
    from ztunnel.net.http import HttpServer

log = logging.getLogger("ztunnel.ca")

DEFAULT_AUDIENCE = "istio-ca"
DEFAULT_CA_SECRET = "istio-ca-secret"
DEFAULT_ROOT_CONFIGMAP = "istio-ca-root-cert"
DEFAULT_CRL_CONFIGMAP = "ztunnel-ca-crl"  # beside the trust bundle: the CRLs the proxies also get over gRPC
ROOT_CONFIGMAP_KEY = "root-cert.pem"
NODE_PROXY_SERVICE_ACCOUNT = "ztunnel"  # in the CA's own namespace, unless --node-proxy-account says otherwise
TOKEN_REVIEWS = "/apis/authentication.k8s.io/v1/tokenreviews"
POD_NAME_CLAIM = "authentication.kubernetes.io/pod-name"
POD_UID_CLAIM = "authentication.kubernetes.io/pod-uid"
NODE_NAME_CLAIM = "authentication.kubernetes.io/node-name"  # Kubernetes >= 1.30 binds the node too
REVIEW_TTL_S = 60.0
REVIEW_CACHE_SIZE = 4096
MAX_CONCURRENT_REVIEWS = 32  # the API server's load from a flood of distinct (forged) tokens stays bounded
API_TIMEOUT_S = 5.0
# Refused reviews each caller (gRPC peer address) may cost the API: a burst, then this many a second. A caller
# past it is refused without a review until it has earned one back; its cached (good) tokens still work.
REFUSED_REVIEW_BURST = 20
REFUSED_REVIEWS_PER_S = 0.5
MAX_TRACKED_PEERS = 4096
CLOCK_SKEW_S = 60.0  # an expired token is refused without a review only this long after its exp
SA_PREFIX = "system:serviceaccount:"
TRUST_DOMAIN_KEY = "trust-domain"
# What the generated CA's Secret holds: Istio's plugged-in names, the root key, the trust domain.
SECRET_FILES = (CA_CERT, CA_KEY, CERT_CHAIN, ROOT_CERT, ROOT_KEY, TRUST_DOMAIN_KEY)
# What is read from a mounted cacerts dir into the CA's working dir (a Secret mount is read-only).
MOUNTED_FILES = (CA_CERT, CA_KEY, CERT_CHAIN, ROOT_CERT, TRUST_BUNDLE, CRL, RETIRED_CRLS)


def _first(extra: Mapping[str, Any], key: str) -> str:
    """A TokenReview `extra` value is a list of strings; the claims this reads have one."""
    value = extra.get(key)
    if isinstance(value, list) and value and isinstance(value[0], str):
        return value[0]
    return value if isinstance(value, str) else ""


def _unverified_claims(token: str) -> dict[str, Any] | None:
    """A JWT's payload, unverified; None when the token is not a JWT."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        claims = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except (ValueError, binascii.Error, RecursionError):
        return None
    return claims if isinstance(claims, dict) else None


def precheck(token: str, audience: str, now: float) -> str | None:
    """Why a token cannot pass a TokenReview, read from its own (unverified) claims without asking the API; None
    if it may. A replayed expired token, or one minted for another audience, then costs the API nothing however
    often it is sent. Only what would make the review fail is read, so a verdict here is never wrong."""
    claims = _unverified_claims(token)
    if claims is None:
        return None
    exp = claims.get("exp")
    if isinstance(exp, int | float) and not isinstance(exp, bool) and exp + CLOCK_SKEW_S < now:
        return f"the token expired at {dt.datetime.fromtimestamp(exp, dt.UTC):%Y-%m-%dT%H:%M:%SZ}"
    aud = claims.get("aud")
    auds = [aud] if isinstance(aud, str) else aud
    if isinstance(auds, list) and auds and audience not in auds:
        shown = ", ".join(repr(str(a))[:60] for a in auds[:5])
        return f"the token is for audience {shown}, not {audience!r}"
    return None


def peer_address(peer: str) -> str:
    """A gRPC peer ("ipv4:10.0.0.1:40000", "ipv6:[::1]:40000") without its port: one caller's many connections
    are one caller."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv6" and rest.startswith("["):
        return rest[1:].partition("]")[0]
    if kind == "ipv4":
        return rest.rpartition(":")[0] or rest
    return peer


class RefusalBudget:
    """Per caller, a token bucket of refused reviews (`REFUSED_REVIEW_BURST`, refilled at
    `REFUSED_REVIEWS_PER_S`); the least recently seen callers are forgotten past `max_peers`."""

    def __init__(
        self,
        burst: int = REFUSED_REVIEW_BURST,
        rate: float = REFUSED_REVIEWS_PER_S,
        max_peers: int = MAX_TRACKED_PEERS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.burst, self.rate, self.max_peers, self.clock = burst, rate, max_peers, clock
        self._peers: collections.OrderedDict[str, tuple[float, float]] = collections.OrderedDict()  # tokens, at

    def _level(self, peer: str) -> float:
        tokens, at = self._peers.get(peer, (float(self.burst), self.clock()))
        return min(float(self.burst), tokens + (self.clock() - at) * self.rate)

    def exhausted(self, peer: str) -> bool:
        return bool(peer) and self._level(peer) < 1.0

    def charge(self, peer: str) -> None:
        if not peer:
            return
        self._peers[peer] = (self._level(peer) - 1.0, self.clock())
        self._peers.move_to_end(peer)
        while len(self._peers) > self.max_peers:
            self._peers.popitem(last=False)


def token_expiry(token: str) -> float | None:
    """The `exp` of a JWT, unverified (the API verified it): only used to keep a cached review no longer than
    the token is valid. None when it is not a JWT with a numeric `exp`."""
    claims = _unverified_claims(token)
    exp = claims.get("exp") if claims is not None else None
    return float(exp) if isinstance(exp, int | float) and not isinstance(exp, bool) else None


@dataclass
class ReviewStats:
    reviews: int = 0  # TokenReviews sent
    cache_hits: int = 0
    shared: int = 0  # requests that waited for a review already in flight for the same token
    api_errors: int = 0
    prechecked: int = 0  # refused from the token's own claims, no review asked
    throttled: int = 0  # refused without a review: the caller spent its budget of refused reviews
    stale: int = 0  # cached reviews dropped because the caller's pod is gone or replaced


class KubeAuthenticator:
    """A bearer token -> the calling pod's `Caller`, by TokenReview and a GET of the pod (see the module doc)."""

    def __init__(
        self,
        client: KubeClient,
        *,
        trust_domain: str,
        audience: str = DEFAULT_AUDIENCE,
        node_proxy_accounts: Collection[str] = (),
        ttl: float = REVIEW_TTL_S,
        max_entries: int = REVIEW_CACHE_SIZE,
        timeout: float = API_TIMEOUT_S,
        clock: Callable[[], float] = time.time,
        max_concurrent: int = MAX_CONCURRENT_REVIEWS,
        pod_uid: Callable[[str, str], str | None] | None = None,
    ) -> None:
        """`pod_uid(namespace, name)`: the uid of that pod in the CA's pod cache, None if it has none; a cached
        review whose pod is gone or replaced is dropped (Kubernetes stops accepting a bound token when its pod is
        deleted: the cache must not keep it alive)."""
        self.client = client
        self.pod_uid = pod_uid
        self.refusals = RefusalBudget()
        self._slots = asyncio.Semaphore(max_concurrent)
        self.trust_domain = trust_domain
        self.audience = audience
        self.node_proxy_accounts = frozenset(node_proxy_accounts)
        self.ttl = ttl
        self.max_entries = max_entries
        self.timeout = timeout
        self.clock = clock
        self.stats = ReviewStats()
        # sha256(token) -> (until, caller, (namespace, pod name, pod uid) the token is bound to)
        self._cache: collections.OrderedDict[bytes, tuple[float, Caller, tuple[str, str, str]]] = (
            collections.OrderedDict()
        )
        self._inflight: dict[bytes, asyncio.Future[Caller]] = {}

    async def authenticate(self, authorization: str | None) -> Caller:
        token = bearer_token(authorization)
        key = hashlib.sha256(token.encode()).digest()  # the cache never holds a token itself
        now = self.clock()
        hit = self._cache.get(key)
        if hit is not None:
            if hit[0] > now and not self._stale(hit[2]):
                self._cache.move_to_end(key)
                self.stats.cache_hits += 1
                return hit[1]
            del self._cache[key]
        why = precheck(token, self.audience, now)
        if why is not None:
            self.stats.prechecked += 1
            raise NodeAuthError(Refusal.UNAUTHENTICATED, f"the token cannot be accepted: {why}")
        pending = self._inflight.get(key)
        peer = peer_address(CALLER_PEER.get())
        if pending is None and self.refusals.exhausted(peer):
            self.stats.throttled += 1
            raise NodeAuthError(
                Refusal.UNAUTHENTICATED,
                f"too many refused tokens from {peer}; not reviewed (retry in {1 / self.refusals.rate:g}s at the "
                "earliest, with a valid projected service-account token)",
            )
        if pending is None:
            # A task of its own: a caller that goes away (its RPC cancelled) does not cancel the others' review.
            pending = asyncio.get_running_loop().create_task(self._review_and_cache(token, key))
            self._inflight[key] = pending
            pending.add_done_callback(lambda task: self._done(key, task))
        else:
            self.stats.shared += 1
        return await asyncio.shield(pending)

    def _stale(self, bound: tuple[str, str, str]) -> bool:
        """The pod a cached review was for is no longer in the pod cache, or is another pod of the same name."""
        if self.pod_uid is None:
            return False
        namespace, name, uid = bound
        if self.pod_uid(namespace, name) == uid:
            return False
        self.stats.stale += 1
        return True

    def _done(self, key: bytes, task: asyncio.Task[Caller]) -> None:
        if self._inflight.get(key) is task:
            del self._inflight[key]
        if not task.cancelled():
            task.exception()  # retrieved: no "never retrieved" warning when every caller went away

    async def _review_and_cache(self, token: str, key: bytes) -> Caller:
        async with self._slots:
            try:
                caller, bound = await self._review(token)
            except NodeAuthError as e:
                if e.refusal is not Refusal.UNAVAILABLE:  # the API's failures are not the caller's
                    self.refusals.charge(peer_address(CALLER_PEER.get()))  # the task runs in its caller's context
                raise
        now = self.clock()
        expiry = token_expiry(token)
        until = min(now + self.ttl, expiry if expiry is not None else now + self.ttl)
        if until > now:
            self._cache[key] = (until, caller, bound)
            while len(self._cache) > self.max_entries:
                self._cache.popitem(last=False)
        return caller

    async def _api(self, what: str, method: str, path: str, body: Any = None) -> dict[str, Any]:
        """One API call bounded by `timeout`; every failure becomes an UNAVAILABLE refusal that says what failed."""
        try:
            async with asyncio.timeout(self.timeout):
                return await self.client.request_json(method, path, body)
        except KubeApiError as e:
            if e.status == 404:
                raise
            self.stats.api_errors += 1
            raise NodeAuthError(Refusal.UNAVAILABLE, f"cannot {what}: the Kubernetes API failed ({e}); retry") from e
        except (OSError, TimeoutError) as e:
            self.stats.api_errors += 1
            why = f"no answer within {self.timeout:g}s" if isinstance(e, TimeoutError) else str(e) or repr(e)
            raise NodeAuthError(
                Refusal.UNAVAILABLE, f"cannot {what}: the Kubernetes API is unreachable ({why}); retry"
            ) from e

    async def _review(self, token: str) -> tuple[Caller, tuple[str, str, str]]:
        self.stats.reviews += 1
        review = {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenReview",
            "spec": {"token": token, "audiences": [self.audience]},
        }
        try:
            answer = await self._api("review the caller's token", "POST", TOKEN_REVIEWS, review)
        except KubeApiError as e:
            self.stats.api_errors += 1
            raise NodeAuthError(Refusal.UNAVAILABLE, f"cannot review the caller's token: {e}; retry") from e
        status = answer.get("status") if isinstance(answer.get("status"), dict) else {}
        assert isinstance(status, dict)
        if status.get("authenticated") is not True:
            why = status.get("error") or "the token is invalid or expired"
            raise NodeAuthError(Refusal.UNAUTHENTICATED, f"the Kubernetes API does not accept the token: {why}")
        audiences = status.get("audiences")
        if not isinstance(audiences, list) or self.audience not in audiences:
            raise NodeAuthError(
                Refusal.UNAUTHENTICATED,
                f"the token is not for audience {self.audience!r} (it is for {audiences or 'none the API names'}); "
                f"mount a projected service-account token with `audience: {self.audience}`",
            )
        user = status.get("user") if isinstance(status.get("user"), dict) else {}
        assert isinstance(user, dict)
        username = str(user.get("username") or "")
        ns, _, sa = username.removeprefix(SA_PREFIX).partition(":")
        if not username.startswith(SA_PREFIX) or not ns or not sa or ":" in sa:
            raise NodeAuthError(
                Refusal.PERMISSION_DENIED, f"the token belongs to {username!r}, not to a service account"
            )
        extra = user.get("extra") if isinstance(user.get("extra"), dict) else {}
        assert isinstance(extra, dict)
        pod_name, pod_uid, claimed_node = (_first(extra, k) for k in (POD_NAME_CLAIM, POD_UID_CLAIM, NODE_NAME_CLAIM))
        if not pod_name or not pod_uid:
            raise NodeAuthError(
                Refusal.UNAUTHENTICATED,
                f"the token of {ns}/{sa} is not bound to a pod (a legacy Secret token?); mount a projected "
                f"service-account token (audience {self.audience}) in the pod",
            )
        path = f"/api/v1/namespaces/{quote_name(ns)}/pods/{quote_name(pod_name)}"
        try:
            pod = await self._api(f"read the caller's pod {ns}/{pod_name}", "GET", path)
        except KubeApiError as e:  # 404 only: _api turned the rest into UNAVAILABLE
            raise NodeAuthError(
                Refusal.UNAUTHENTICATED, f"the caller's pod {ns}/{pod_name} no longer exists"
            ) from e
        return self._caller(pod, ns, sa, pod_name, pod_uid, claimed_node), (ns, pod_name, pod_uid)

    def _caller(self, pod: Mapping[str, Any], ns: str, sa: str, name: str, uid: str, claimed_node: str) -> Caller:
        meta = pod.get("metadata") or {}
        spec = pod.get("spec") or {}
        status = pod.get("status") or {}
        where = f"pod {ns}/{name}"
        if meta.get("uid") != uid:
            raise NodeAuthError(
                Refusal.UNAUTHENTICATED,
                f"the token is bound to {where} uid {uid}, but that pod is now uid {meta.get('uid')} (replaced)",
            )
        if (spec.get("serviceAccountName") or "default") != sa:
            raise NodeAuthError(
                Refusal.PERMISSION_DENIED,
                f"{where} runs as service account {spec.get('serviceAccountName')!r}, the token is {sa!r}'s",
            )
        if status.get("phase") in ("Succeeded", "Failed"):
            raise NodeAuthError(Refusal.PERMISSION_DENIED, f"{where} has terminated ({status.get('phase')})")
        node = spec.get("nodeName") or ""
        if not node:
            raise NodeAuthError(Refusal.PERMISSION_DENIED, f"{where} is not scheduled on a node")
        if claimed_node and claimed_node != node:
            raise NodeAuthError(
                Refusal.PERMISSION_DENIED,
                f"the token is bound to node {claimed_node!r}, but {where} runs on {node!r}",
            )
        try:
            identity = SpiffeId.parse(f"spiffe://{self.trust_domain}/ns/{ns}/sa/{sa}")
        except SpiffeIdError as e:
            raise NodeAuthError(Refusal.PERMISSION_DENIED, f"{where}: {e}") from e
        return Caller(node, identity, f"{ns}/{sa}" in self.node_proxy_accounts, f"{where} on {node}")


# ---- the CA's keys ---------------------------------------------------------------------------------------


def _private_dir(work_dir: Path | None) -> Path:
    d = Path(tempfile.mkdtemp(prefix="ztunnel-ca-", dir=work_dir))
    os.chmod(d, 0o700)
    return d


def _write_files(d: Path, files: Mapping[str, bytes]) -> None:
    for name, data in files.items():
        fd = os.open(d / name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)


def is_plugged_in(mounted: Path | None) -> bool:
    return mounted is not None and (mounted / CA_CERT).is_file() and (mounted / CA_KEY).is_file()


def secret_files(secret: Mapping[str, Any], where: str) -> dict[str, bytes]:
    data = secret.get("data") or {}
    out: dict[str, bytes] = {}
    for name in SECRET_FILES:
        if name in data:
            try:
                out[name] = base64.b64decode(str(data[name]), validate=True)
            except (ValueError, binascii.Error):
                raise CAError(
                    f"{where}: data[{name!r}] is not base64; delete the Secret to generate a new CA"
                ) from None
    for name in (CA_CERT, CA_KEY, ROOT_CERT):
        if name not in out:
            raise CAError(f"{where}: data[{name!r}] is missing; delete the Secret to generate a new CA")
    return out


async def ensure_ca_secret(
    client: KubeClient, namespace: str, name: str, trust_domain: str, *, attempts: int = 6, timeout: float = 10.0
) -> dict[str, bytes]:
    """The CA stored in Secret `namespace/name`: read it, or generate one and create it; on a conflict (another
    replica created it first) read the winner's, so every replica signs under the same root."""
    where = f"Secret {namespace}/{name}"
    path = f"/api/v1/namespaces/{quote_name(namespace)}/secrets"
    rng = random.Random()
    for attempt in range(1, attempts + 1):
        try:
            async with asyncio.timeout(timeout):
                try:
                    return secret_files(await client.get(f"{path}/{quote_name(name)}"), where)
                except KubeApiError as e:
                    if e.status != 404:
                        raise
                files = await asyncio.to_thread(generate_ca_files, trust_domain)
                body = {
                    "apiVersion": "v1",
                    "kind": "Secret",
                    "type": "istio.io/ca-root",
                    "metadata": {
                        "name": name,
                        "namespace": namespace,
                        "labels": {"app.kubernetes.io/part-of": "ztunnel-py"},
                    },
                    "data": {k: base64.b64encode(v).decode() for k, v in files.items()},
                }
                try:
                    await client.request_json("POST", path, body)
                    log.info("CA generated and stored", extra={"secret": f"{namespace}/{name}"})
                    return files
                except KubeApiError as e:
                    if e.status != 409:
                        raise
                log.info("another CA replica stored its CA first; using it", extra={"secret": f"{namespace}/{name}"})
                return secret_files(await client.get(f"{path}/{quote_name(name)}"), where)
        except (OSError, TimeoutError) as e:
            if attempt == attempts or (isinstance(e, KubeApiError) and e.status in (401, 403)):
                raise CAError(
                    f"{where}: cannot read or create it ({e or 'no answer'}); check that the API server is reachable "
                    "and that the CA's service account may get and create this Secret (RBAC)"
                ) from None
            delay = min(0.5 * 2**attempt, 8.0) * (0.5 + rng.random())
            log.warning("CA Secret %s: %s; retrying in %.1fs", where, e, delay)
            await asyncio.sleep(delay)
    raise AssertionError("unreachable")


def generate_ca_files(trust_domain: str) -> dict[str, bytes]:
    """A new root and intermediate (as `ztunnel ca init` makes them), as the Secret's files."""
    d = _private_dir(None)
    try:
        init_ca_dir(d, trust_domain=trust_domain)
        files = {n: (d / n).read_bytes() for n in SECRET_FILES if n != TRUST_DOMAIN_KEY}
    finally:
        shutil.rmtree(d, ignore_errors=True)
    files[TRUST_DOMAIN_KEY] = trust_domain.encode() + b"\n"
    return files


async def load_kube_ca(
    client: KubeClient,
    *,
    mounted: Path | None,
    namespace: str,
    secret: str,
    trust_domain: str,
    work_dir: Path | None = None,
    max_ttl: dt.timedelta | None = None,
) -> CertificateAuthority:
    """The operator's plugged-in CA from `mounted` (Istio's cacerts names) if it holds one, else the Secret's.

    Either is copied to a private working dir the CA owns (a Secret mount is read-only and its files are
    symlinks that change under it); the trust domain is `trust_domain`, and a stored CA of another one is
    refused rather than silently serving two."""
    if is_plugged_in(mounted):
        assert mounted is not None
        files = {n: (mounted / n).read_bytes() for n in MOUNTED_FILES if (mounted / n).is_file()}
        origin = f"{mounted} (plugged-in CA)"
    else:
        files = await ensure_ca_secret(client, namespace, secret, trust_domain)
        origin = f"Secret {namespace}/{secret}"
        stored = files.get(TRUST_DOMAIN_KEY, b"").decode(errors="replace").strip()
        if stored and stored != trust_domain:
            raise CAError(
                f"{origin} holds a CA for trust domain {stored!r}, not --trust-domain {trust_domain!r}; "
                "give the same trust domain, or delete the Secret to generate a new CA"
            )
    files[TRUST_DOMAIN_KEY] = trust_domain.encode() + b"\n"
    d = _private_dir(work_dir)
    _write_files(d, files)
    try:
        ca = CertificateAuthority.load(d) if max_ttl is None else CertificateAuthority.load(d, max_ttl=max_ttl)
    except CAError as e:
        raise CAError(f"{origin}: {e}") from None
    log.info("CA loaded", extra={"from": origin, "trust_domain": trust_domain})
    return ca


# ---- the trust bundle in every namespace -------------------------------------------------------------------


class ConfigMapPublisher:
    """Keeps ConfigMap `name` with `data` (and `binary_data`, base64) in every namespace: created where missing,
    updated where it differs. Remembers what it published, forgets it every `resync` seconds to repair edits;
    publishes nothing while `data` and `binary_data` are both empty."""

    def __init__(
        self,
        client: KubeClient,
        name: str,
        data: Mapping[str, str],
        binary_data: Mapping[str, str] | None = None,
        *,
        resync: float = 300.0,
        retry: float = 5.0,
        timeout: float = API_TIMEOUT_S,
    ) -> None:
        self.client = client
        self.data = dict(data)
        self.binary_data = dict(binary_data or {})
        self.name = name
        self.resync = resync
        self.retry = retry
        self.timeout = timeout
        self.published: set[str] = set()
        self.failed: dict[str, str] = {}  # namespace -> the last error
        self.writes = 0
        self.wake = asyncio.Event()

    def set_content(self, data: Mapping[str, str], binary_data: Mapping[str, str] | None = None) -> None:
        """New content for every namespace (published on the next pass)."""
        self.data, self.binary_data = dict(data), dict(binary_data or {})
        self.published.clear()
        self.wake.set()

    async def ensure(self, namespace: str) -> bool:
        """The ConfigMap in `namespace` as it should be; True if it had to be created or changed."""
        base = f"/api/v1/namespaces/{quote_name(namespace)}/configmaps"
        async with asyncio.timeout(self.timeout):
            try:
                current = await self.client.get(f"{base}/{quote_name(self.name)}")
            except KubeApiError as e:
                if e.status != 404:
                    raise
                body = {
                    "apiVersion": "v1",
                    "kind": "ConfigMap",
                    "metadata": {"name": self.name, "namespace": namespace, "labels": {"istio.io/config": "true"}},
                    "data": dict(self.data),
                }
                if self.binary_data:
                    body["binaryData"] = dict(self.binary_data)
                await self.client.request_json("POST", base, body)
                self.writes += 1
                return True
            patch: dict[str, dict[str, str | None]] = {}
            for field_name, wanted in (("data", self.data), ("binaryData", self.binary_data)):
                have = current.get(field_name) or {}
                change: dict[str, str | None] = {k: v for k, v in wanted.items() if have.get(k) != v}
                change.update({k: None for k in have if k not in wanted})  # the CA owns the ConfigMap's keys
                if change:
                    patch[field_name] = change
            if not patch:
                return False
            await self.client.patch(f"{base}/{quote_name(self.name)}", patch)
            self.writes += 1
            return True

    async def publish(self, namespaces: Iterable[str]) -> None:
        """One pass: every namespace not yet published; the failed ones are kept for the next pass."""
        wanted = set(namespaces) if self.data or self.binary_data else set()
        self.published &= wanted
        for ns in sorted(wanted - self.published):
            try:
                changed = await self.ensure(ns)
            except (OSError, TimeoutError) as e:
                if self.failed.get(ns) != str(e):
                    log.warning(
                        "cannot publish ConfigMap %s in namespace %s: %s; retrying", self.name, ns, e or "timeout"
                    )
                self.failed[ns] = str(e)
                continue
            self.failed.pop(ns, None)
            self.published.add(ns)
            if changed:
                log.info("trust bundle published", extra={"namespace": ns, "configmap": self.name})

    async def run(self, namespaces: Callable[[], Iterable[str]]) -> None:
        """Publish at start, whenever `wake` is set (the namespaces changed), after failures, and every resync."""
        last_resync = time.monotonic()
        while True:
            if time.monotonic() - last_resync >= self.resync:
                self.published.clear()
                last_resync = time.monotonic()
            await self.publish(namespaces())
            self.wake.clear()
            try:
                async with asyncio.timeout(self.retry if self.failed else self.resync):
                    await self.wake.wait()
            except TimeoutError:
                pass


class TrustBundlePublisher(ConfigMapPublisher):
    """`istio-ca-root-cert` (key `root-cert.pem`: the CA's roots) in every namespace, as Istio publishes it."""

    def __init__(self, client: KubeClient, roots_pem: bytes, *, name: str = DEFAULT_ROOT_CONFIGMAP, **kwargs: Any):
        super().__init__(client, name, {ROOT_CONFIGMAP_KEY: roots_pem.decode()}, **kwargs)


def revocation_content(answer: RevocationAnswer) -> tuple[dict[str, str], dict[str, str]]:
    """The CRL ConfigMap's data and binaryData: the CRL (DER) and its number, its signer chain, and each retired
    intermediate's last CRL with its chain; empty when nothing is revoked."""
    if not answer.number and not answer.retired:
        return {}, {}
    data = {"number": str(answer.number), "issuer-chain.pem": b"".join(answer.issuer_chain).decode()}
    binary = {"crl.der": base64.b64encode(answer.crl).decode()} if answer.crl else {}
    for i, retired in enumerate(answer.retired):
        binary[f"retired-{i}.der"] = base64.b64encode(retired.crl).decode()
        data[f"retired-{i}-chain.pem"] = b"".join(retired.issuer_chain).decode()
    return data, binary


def sync_mounted_revocations(mounted: Path, work: Path) -> bool:
    """Copy the operator's crl.pem and retired-crls.pem from the cacerts mount into the CA's working dir when they
    changed there (the Secret was updated); True if anything changed. Written atomically, as the CA re-reads."""
    changed = False
    for name in (CRL, RETIRED_CRLS):
        src, dst = mounted / name, work / name
        try:
            new: bytes | None = src.read_bytes()
        except FileNotFoundError:
            new = None
        old = dst.read_bytes() if dst.exists() else None
        if new == old:
            continue
        if new is None:
            dst.unlink()
        else:
            tmp = work / (name + ".tmp")
            _write_files(work, {tmp.name: new})
            os.replace(tmp, dst)
        changed = True
    return changed


async def follow_revocations(
    ca: CertificateAuthority, publisher: ConfigMapPublisher, mounted: Path | None, interval: float = 5.0
) -> None:
    """Keep the CRL ConfigMap current: the mounted CRL files followed (when plugged in), the content re-derived
    whenever the CRL number or the retired set changes. A broken CRL is logged and the last content kept."""
    last: tuple[dict[str, str], dict[str, str]] | None = None
    while True:
        try:
            if mounted is not None:
                await asyncio.to_thread(sync_mounted_revocations, mounted, ca.directory)
            content = revocation_content(await asyncio.to_thread(ca.published_revocations, 0))
        except (OSError, CAError) as e:
            log.error("cannot publish the CRL, keeping the last one: %s", e)
        else:
            if content != last:
                last = content
                publisher.set_content(*content)
        await asyncio.sleep(interval)



# ---- `ca serve --source kubernetes` ----------------------------------------------------------------------


class _CAMetrics:
    """The CA's counters for Prometheus, read at scrape time from the server and the authenticator."""

    def __init__(self, server: CAServer, auth: KubeAuthenticator, publisher: TrustBundlePublisher) -> None:
        self.server, self.auth, self.publisher = server, auth, publisher

    def collect(self) -> Iterable[Metric]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        certs = CounterMetricFamily("ztunnel_ca_certificates", "CSRs answered by the CA", labels=["result"])
        certs.add_metric(["issued"], self.server.issued)
        certs.add_metric(["refused"], self.server.refused)
        yield certs
        reviews = CounterMetricFamily(
            "ztunnel_ca_token_reviews", "Caller authentications by TokenReview", labels=["result"]
        )
        stats = self.auth.stats
        for result, value in (
            ("reviewed", stats.reviews),
            ("cache_hit", stats.cache_hits),
            ("shared", stats.shared),
            ("api_error", stats.api_errors),
            ("prechecked", stats.prechecked),
            ("stale_cache", stats.stale),
            ("throttled", stats.throttled),
        ):
            reviews.add_metric([result], value)
        yield reviews
        pending = GaugeMetricFamily(
            "ztunnel_ca_trust_bundle_pending_namespaces", "Namespaces whose trust bundle ConfigMap could not be written"
        )
        pending.add_metric([], len(self.publisher.failed))
        yield pending


@dataclass(frozen=True)
class KubeCASettings:
    mounted: Path | None  # --dir: the operator's cacerts mount (may be empty or absent)
    secret: str = DEFAULT_CA_SECRET
    namespace: str | None = None  # the CA's namespace; default: its service account's
    root_configmap: str = DEFAULT_ROOT_CONFIGMAP
    crl_configmap: str = DEFAULT_CRL_CONFIGMAP
    trust_domain: str = "cluster.local"
    audience: str = DEFAULT_AUDIENCE
    node_proxy_accounts: tuple[str, ...] = ()  # default: <namespace>/ztunnel
    listen: str = "127.0.0.1:15012"
    dns_names: tuple[str, ...] = ()
    default_ttl: dt.timedelta = dt.timedelta(hours=24)
    max_ttl: dt.timedelta = dt.timedelta(days=7)
    readiness_addr: tuple[str, int] | None = None
    metrics_addr: tuple[str, int] | None = None


async def run_kube_ca_server(endpoint: KubeEndpoint, settings: KubeCASettings, stop: asyncio.Event) -> None:
    """The `ca serve --source kubernetes` lifetime: the CA's keys, the pods and namespaces listed (no decision
    before), the server, the trust bundle published; until `stop` is set."""
    from prometheus_client import CollectorRegistry

    from ztunnel.config.kube.source import RESOURCES, KubeConfigSource
    from ztunnel.identity.server import CAServer
    from ztunnel.telemetry.http_server import MetricsServer, ReadinessServer

    client = KubeClient(endpoint)
    namespace = settings.namespace or endpoint.namespace
    ca = await load_kube_ca(
        client,
        mounted=settings.mounted,
        namespace=namespace,
        secret=settings.secret,
        trust_domain=settings.trust_domain,
        max_ttl=settings.max_ttl,
    )
    try:
        # Only what the node rule reads (the CA's RBAC lists nothing else): pods and namespaces.
        source = KubeConfigSource(
            endpoint,
            trust_domain=settings.trust_domain,
            resources=[r for r in RESOURCES if r.kind in ("Pod", "Namespace")],
        )
        source.reflectors = [r for r in source.reflectors if r.resource.kind in ("Pod", "Namespace")]
        await asyncio.to_thread(source.load)  # ConfigError naming what could not be listed, after its timeout
        accounts = settings.node_proxy_accounts or (f"{namespace}/{NODE_PROXY_SERVICE_ACCOUNT}",)

        def pod_uid(ns: str, name: str) -> str | None:
            w = source.current.workload(ns, name) if source.current is not None else None
            return w.uid if w is not None else None

        auth = KubeAuthenticator(
            client,
            trust_domain=settings.trust_domain,
            audience=settings.audience,
            node_proxy_accounts=accounts,
            pod_uid=pod_uid,
        )
        server = CAServer(
            ca,
            auth,
            lambda: source.current,
            listen=settings.listen,
            dns_names=settings.dns_names,
            default_ttl=settings.default_ttl,
        )
        publisher = TrustBundlePublisher(client, ca.roots_pem, name=settings.root_configmap)
        crls = ConfigMapPublisher(client, settings.crl_configmap, {})

        def namespaces_changed(_cfg: object) -> None:
            publisher.wake.set()
            crls.wake.set()

        source.subscribe(namespaces_changed)

        def namespaces() -> Iterable[str]:
            return list(source.current.namespaces) if source.current is not None else []

        def ready() -> tuple[bool, str]:
            if not server.port:
                return False, "not listening yet"
            return (True, "") if source.ready else (False, "pods and namespaces not listed yet")

        controls: list[HttpServer] = []
        if settings.readiness_addr is not None:
            controls.append(ReadinessServer(*settings.readiness_addr, ready))
        if settings.metrics_addr is not None:
            registry = CollectorRegistry()
            registry.register(_CAMetrics(server, auth, publisher))
            controls.append(MetricsServer(*settings.metrics_addr, registry))
        await server.start()
        log.info(
            "CA serving for Kubernetes",
            extra={"audience": settings.audience, "node_proxies": ",".join(accounts), "namespace": namespace},
        )
        try:
            for control in controls:
                await control.start()
            async with asyncio.TaskGroup() as tg:
                tasks = [
                    tg.create_task(source.watch()),
                    tg.create_task(publisher.run(namespaces)),
                    tg.create_task(crls.run(namespaces)),
                    tg.create_task(
                        follow_revocations(ca, crls, settings.mounted if is_plugged_in(settings.mounted) else None)
                    ),
                ]
                await stop.wait()
                for t in tasks:
                    t.cancel()
        finally:
            for control in controls:
                await control.close()
            await server.stop()
    finally:
        shutil.rmtree(ca.directory, ignore_errors=True)  # the private copy of the keys
