"""JSON Web Key Sets for the waypoint's JWT checks: parsing, a refresh schedule, and a thin fetcher.

The schedule is sans-IO (`RemoteJwks`: what to fetch when, given an injected clock, and what the last good keys
are); `JwksFetcher` is the only I/O (one bounded HTTP(S) GET, a Service name dialled at a ready endpoint
through the config snapshot, `ClusterNames`) and `JwksRefresher` the asyncio loop that drives
both. A failed fetch never drops keys that verified before: a JWKS server that goes away after the first fetch
leaves the waypoint verifying with the cached keys, and the failure shows in the counters.

Defaults follow Istio where it has one: keys are refreshed every 20 minutes (istiod's
`PILOT_JWT_PUB_KEY_REFRESH_INTERVAL`), a fetch times out after the rule's `timeout`, 5 s by default (Istio's
`JWTRule.timeout`); the refresher holds that deadline, per URI. The retry after a
failure is ours: 1 s doubling to 5 minutes, since a waypoint without keys rejects every token of that issuer
(istiod's own backoff reaches 60 minutes, long to stay without keys).
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from jwt import PyJWK
from jwt.exceptions import PyJWTError

from ztunnel.config.model import ClusterConfig
from ztunnel.config.names import resolve as resolve_name
from ztunnel.net.http import MAX_HEAD_BYTES, ResponseParser, exchange_async, render_request

log = logging.getLogger("ztunnel.waypoint.jwks")

REFRESH_INTERVAL = 20 * 60.0
RETRY_INITIAL = 1.0
RETRY_MAX = 5 * 60.0
FETCH_TIMEOUT = 5.0
MAX_JWKS_BYTES = 256 * 1024  # real key sets are a few KiB; a bigger answer is not a key set

# Which keys each accepted algorithm may be verified with: (kty, curves or None for any).
KEY_TYPES: Mapping[str, tuple[str, frozenset[str] | None]] = {
    "RS256": ("RSA", None),
    "RS384": ("RSA", None),
    "RS512": ("RSA", None),
    "PS256": ("RSA", None),
    "ES256": ("EC", frozenset({"P-256"})),
    "ES384": ("EC", frozenset({"P-384"})),
    "EdDSA": ("OKP", frozenset({"Ed25519", "Ed448"})),
}


class JwksError(ValueError):
    """A key set that cannot be used; the message says what is wrong with it."""


@dataclass(frozen=True, slots=True)
class JwksKey:
    kid: str | None
    alg: str | None  # the key's own `alg`, if it names one: then only that algorithm may use it
    kty: str
    crv: str | None
    key: Any  # a `cryptography` public key

    def fits(self, alg: str, kid: str | None) -> bool:
        """May a token with header `alg`/`kid` be verified with this key? A key without a kid fits any kid."""
        kty, curves = KEY_TYPES[alg]
        if self.kty != kty or (curves is not None and self.crv not in curves):
            return False
        if self.alg is not None and self.alg != alg:
            return False
        return kid is None or self.kid is None or kid == self.kid


@dataclass(frozen=True, slots=True)
class KeySet:
    keys: tuple[JwksKey, ...]
    skipped: tuple[str, ...] = ()  # why each unusable key was left out (symmetric, private, encryption-only...)

    def candidates(self, alg: str, kid: str | None) -> list[JwksKey]:
        return [k for k in self.keys if k.fits(alg, kid)]


def parse_jwks(text: str | bytes, *, what: str = "jwks") -> KeySet:
    """A JWKS document -> its usable public signature keys. Raises `JwksError` if none is usable.

    Symmetric (`oct`) keys are never used: a public key set with an HMAC secret in it would let anyone who
    reads it mint tokens. Keys with a private part, `use` other than `sig`, or an unknown type are skipped too.
    """
    try:
        doc = json.loads(text)
    except (ValueError, UnicodeDecodeError) as e:
        raise JwksError(f"{what}: not JSON ({e})") from None
    raw_keys = doc.get("keys") if isinstance(doc, dict) else None
    if not isinstance(raw_keys, list):
        raise JwksError(f"{what}: expected a JSON object with a `keys` list (a JSON Web Key Set)")
    keys: list[JwksKey] = []
    skipped: list[str] = []
    for i, raw in enumerate(raw_keys):
        reason = _unusable(raw)
        if reason is None:
            try:
                keys.append(_load_key(raw))
            except (PyJWTError, ValueError, TypeError) as e:
                reason = f"cannot be loaded ({e})"
        if reason is not None:
            skipped.append(f"keys[{i}]: {reason}")
    if not keys:
        detail = "; ".join(skipped) if skipped else "the key set is empty"
        raise JwksError(f"{what}: no usable signature key ({detail})")
    return KeySet(tuple(keys), tuple(skipped))


def _unusable(raw: Any) -> str | None:
    if not isinstance(raw, dict):
        return "not a JSON object"
    kty = raw.get("kty")
    if kty not in ("RSA", "EC", "OKP"):
        return f"kty {kty!r} is not a public signature key type (RSA, EC, OKP)"
    if "d" in raw:
        return "holds a private key; publish the public part only"
    if raw.get("use", "sig") != "sig":
        return f"use {raw.get('use')!r} is not `sig`"
    alg = raw.get("alg")
    if alg is not None and alg not in KEY_TYPES:
        return f"alg {alg!r} is not accepted (accepted: {', '.join(KEY_TYPES)})"
    return None


def _load_key(raw: Mapping[str, Any]) -> JwksKey:
    kid = raw.get("kid")
    crv = raw.get("crv")
    alg = raw.get("alg")
    # PyJWK picks an algorithm from kty/crv when the key names none; we only want the key object.
    jwk = PyJWK(dict(raw), algorithm=alg if isinstance(alg, str) else _default_alg(raw))
    return JwksKey(
        kid=kid if isinstance(kid, str) else None,
        alg=alg if isinstance(alg, str) else None,
        kty=str(raw["kty"]),
        crv=crv if isinstance(crv, str) else None,
        key=jwk.key,
    )


def _default_alg(raw: Mapping[str, Any]) -> str:
    if raw["kty"] == "RSA":
        return "RS256"
    if raw["kty"] == "OKP":
        return "EdDSA"
    return {"P-256": "ES256", "P-384": "ES384"}.get(str(raw.get("crv")), "ES256")


# ---------------------------------------------------------------------------------------------------
# The refresh schedule (sans-IO)
# ---------------------------------------------------------------------------------------------------
@dataclass
class RemoteJwks:
    """One `jwksUri`: its last good keys and when to fetch it next. Driven by `now` values the caller passes."""

    uri: str
    timeout: float = FETCH_TIMEOUT  # one fetch, seconds (the rules' `timeout`)
    refresh_interval: float = REFRESH_INTERVAL
    retry_initial: float = RETRY_INITIAL
    retry_max: float = RETRY_MAX
    keys: KeySet | None = None
    next_fetch: float = 0.0  # due at once
    consecutive_failures: int = 0
    fetch_ok: int = 0
    fetch_failed: int = 0
    last_error: str = ""
    last_success: float | None = None

    def due(self, now: float) -> bool:
        return now >= self.next_fetch

    def succeeded(self, now: float, body: bytes) -> None:
        """A fetch answered 200 with `body`: a usable key set replaces the keys; an unusable one is a failure."""
        try:
            keys = parse_jwks(body, what=self.uri)
        except JwksError as e:
            self.failed(now, str(e))
            return
        self.keys = keys
        self.fetch_ok += 1
        self.consecutive_failures = 0
        self.last_error = ""
        self.last_success = now
        self.next_fetch = now + self.refresh_interval

    def failed(self, now: float, error: str) -> None:
        """The fetch did not give keys: keep the last good ones, retry with a doubling delay."""
        self.fetch_failed += 1
        self.consecutive_failures += 1
        self.last_error = error
        delay = min(self.retry_initial * 2 ** (self.consecutive_failures - 1), self.retry_max)
        self.next_fetch = now + delay


# ---------------------------------------------------------------------------------------------------
# I/O: one bounded GET, and the loop that keeps the remote key sets fresh
# ---------------------------------------------------------------------------------------------------
class JwksFetchError(OSError):
    """The key set could not be fetched; the message names the URI and what went wrong."""


@dataclass
class ClusterNames:
    """Where a `jwksUri`'s host is when it is a Service name, from the config snapshot of the moment
    (config/names.py; the waypoint pod has no mesh DNS). A short name is relative to the namespace of the
    RequestAuthentication that names the URI; a URI named from several namespaces resolves in the first."""

    config: ClusterConfig | None = None
    namespaces: dict[str, str] = field(default_factory=dict)  # jwksUri -> namespace it was written in
    _turn: int = field(default=0, init=False)

    def update(self, config: ClusterConfig, named: Iterable[tuple[str, str]]) -> None:
        """A new snapshot and the `(namespace, jwksUri)` pairs of its RequestAuthentications."""
        namespaces: dict[str, str] = {}
        for namespace, uri in named:
            namespaces.setdefault(uri, namespace)
        self.config, self.namespaces = config, namespaces

    def where(self, uri: str, host: str, port: int) -> tuple[str, int] | str | None:
        """A ready endpoint for a Service name, why there is none, or None: not a name of the cluster. Each call
        takes the next ready endpoint, so a retry after a failure tries another one."""
        if self.config is None:
            return None
        self._turn += 1
        return resolve_name(self.config, host, port, self.namespaces.get(uri), self._turn)


@dataclass
class JwksFetcher:
    """GET a `jwksUri` over HTTP or HTTPS, within `timeout` seconds (None: the caller bounds it) and `max_bytes`.

    A host that names a Service of the cluster (`names`) is dialled at a ready endpoint, pod IP and target port,
    with the URI's host still in `Host` and, over HTTPS, as the TLS server name checked; other hosts go through
    the system resolver. HTTPS verifies the server against the system trust store, or only against `ca_file`
    when one is given (a private issuer's CA); TLS 1.2 or newer, the host name checked. No redirects are followed.
    """

    timeout: float | None = FETCH_TIMEOUT
    max_bytes: int = MAX_JWKS_BYTES
    ca_file: str | None = None
    names: ClusterNames | None = None
    _tls: ssl.SSLContext | None = field(default=None, init=False, repr=False)

    def tls_context(self) -> ssl.SSLContext:
        if self._tls is None:
            ctx = ssl.create_default_context(cafile=self.ca_file)
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            self._tls = ctx
        return self._tls

    async def fetch(self, uri: str) -> bytes:
        """The body of a 200 answer; raises `JwksFetchError` for anything else."""
        parts = urlsplit(uri)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise JwksFetchError(f"{uri}: not an http(s) URL")
        tls = parts.scheme == "https"
        try:
            port = parts.port or (443 if tls else 80)
        except ValueError:
            raise JwksFetchError(f"{uri}: bad port") from None
        path = parts.path or "/"
        if parts.query:
            path += "?" + parts.query
        try:
            request = render_request("GET", parts.hostname, port, path)
        except ValueError as e:
            raise JwksFetchError(f"{uri}: {e}") from None
        where = self.names.where(uri, parts.hostname, port) if self.names is not None else None
        if isinstance(where, str):
            raise JwksFetchError(f"{uri}: {where}")
        address, dial_port = where or (parts.hostname, port)
        via = f" (Service endpoint {address}:{dial_port})" if where is not None else ""
        parser = ResponseParser(max_head=MAX_HEAD_BYTES, max_bytes=self.max_bytes + MAX_HEAD_BYTES)
        try:
            async with asyncio.timeout(self.timeout):
                response = await exchange_async(
                    address,
                    dial_port,
                    request,
                    parser,
                    tls=self.tls_context() if tls else None,
                    server_hostname=parts.hostname if tls else None,
                )
        except TimeoutError:
            raise JwksFetchError(f"{uri}{via}: no answer within {self.timeout:g}s") from None
        except (OSError, ssl.SSLError) as e:
            raise JwksFetchError(f"{uri}{via}: {e}") from None
        if response.status != 200:
            raise JwksFetchError(f"{uri}{via}: answered {response.status}, expected 200")
        if len(response.body) > self.max_bytes:
            raise JwksFetchError(f"{uri}: key set larger than {self.max_bytes} bytes")
        return response.body


FetchHook = Callable[[str, bool], None]  # (uri, ok): where the waypoint hangs its Prometheus counters


class JwksRefresher:
    """Keeps every `jwksUri` in use fresh: fetches what is due, then sleeps until the next one is due.

    Each fetch runs under its URI's `timeout` (RemoteJwks.timeout): a server that accepts and never answers is a
    failed fetch at that deadline, whatever `fetch` does."""

    def __init__(
        self,
        uris: Iterable[str] | Mapping[str, float],
        *,
        fetch: Callable[[str], Any] | None = None,
        clock: Callable[[], float] = time.monotonic,
        on_fetch: FetchHook | None = None,
        refresh_interval: float = REFRESH_INTERVAL,
    ) -> None:
        self._fetch = fetch or JwksFetcher(timeout=None).fetch  # the deadline is the URI's, held here
        self._clock = clock
        self._on_fetch = on_fetch
        self._refresh_interval = refresh_interval
        self.remotes: dict[str, RemoteJwks] = {}
        self._wake = asyncio.Event()
        self.track(uris if isinstance(uris, Mapping) else dict.fromkeys(uris, FETCH_TIMEOUT))

    def track(self, timeouts: Mapping[str, float]) -> list[str]:
        """Fetch these URIs from now on (`jwt.remote_timeouts` of the rules in force): new ones are due at once
        (and `run` is woken), known ones take the new timeout and keep their keys. The URIs added."""
        added = []
        for uri, timeout in timeouts.items():
            remote = self.remotes.get(uri)
            if remote is None:
                self.remotes[uri] = RemoteJwks(
                    uri, timeout=timeout, refresh_interval=self._refresh_interval, next_fetch=self._clock()
                )
                added.append(uri)
            else:
                remote.timeout = timeout
        if added:
            self.poke()
        return added

    def keys(self, uri: str) -> KeySet | None:
        remote = self.remotes.get(uri)
        return remote.keys if remote is not None else None

    async def refresh_due(self) -> int:
        """Fetch every key set that is due now (one at a time: there are few); the number fetched."""
        count = 0
        for remote in self.remotes.values():
            if not remote.due(self._clock()):
                continue
            count += 1
            try:
                async with asyncio.timeout(remote.timeout):
                    body = await self._fetch(remote.uri)
            except TimeoutError:
                remote.failed(self._clock(), f"{remote.uri}: no answer within {remote.timeout:g}s (timeout)")
            except OSError as e:
                remote.failed(self._clock(), str(e))
            else:
                remote.succeeded(self._clock(), body)
            ok = remote.consecutive_failures == 0
            if not ok:
                kept = "keeping the last good keys" if remote.keys is not None else "no keys yet"
                log.warning("jwks fetch failed (%s): %s", kept, remote.last_error)
            if self._on_fetch is not None:
                self._on_fetch(remote.uri, ok)
        return count

    def next_due(self) -> float | None:
        return min((r.next_fetch for r in self.remotes.values()), default=None)

    async def run(self) -> None:
        """Refresh until cancelled."""
        while True:
            await self.refresh_due()
            due = self.next_due()
            delay = None if due is None else max(due - self._clock(), 0.0)
            self._wake.clear()
            try:
                async with asyncio.timeout(delay):
                    await self._wake.wait()
            except TimeoutError:
                pass

    def poke(self) -> None:
        """Wake `run` to look at the schedule again (after a test moved its clock, or the rules changed)."""
        self._wake.set()
