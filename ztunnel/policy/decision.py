"""What a decision reads and what it returns: the public types of the engine's check_l4 / check_l7."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from ztunnel.config.model import Workload
from ztunnel.policy.matchers import IpAddress

# What a waypoint answers a denied request with, as Istio's proxies do.
DENIED_STATUS = 403
DENIED_BODY = b"RBAC: access denied"


@dataclass(frozen=True, slots=True)
class ConnectionAttributes:
    """What the destination side knows about an inbound connection."""

    source_principal: str | None  # full spiffe:// URI, or None for plaintext
    source_ip: str
    destination: Workload
    destination_ip: str
    destination_port: int  # the pod's (target) port
    source_namespace: str | None = None  # derived from the principal when not given


@dataclass(frozen=True, slots=True)
class HttpRequestAttributes:
    """One HTTP request as a waypoint sees it, after JWT validation.

    `headers`: names in any case (matched case-insensitively); a header sent more than once is one value
    joined with "," (as Envoy matches it). `path` is the request target as received (query ignored, dot
    segments removed before matching). The JWT fields are the validated token's; audiences and presenter
    default to the `aud` / `azp` claims. `forwarded_for` is the X-Forwarded-For chain left to right (None:
    read from the header); with `trusted_hops` = N > 0 the client (`remote.ip`, `remoteIpBlocks`) is the
    N-th address from the right, else the connection's peer (Istio's numTrustedProxies).
    """

    method: str
    path: str
    host: str  # :authority / Host, port included as sent
    headers: Mapping[str, str] = field(default_factory=dict)
    request_principal: str | None = None  # "<iss>/<sub>" of a validated JWT
    request_claims: Mapping[str, Any] = field(default_factory=dict)
    request_audiences: tuple[str, ...] | None = None  # None: the `aud` claim
    request_presenter: str | None = None  # None: the `azp` claim
    forwarded_for: tuple[str, ...] | None = None  # None: the X-Forwarded-For header
    trusted_hops: int = 0
    sni: str | None = None  # server name of the downstream TLS connection, if any

    @classmethod
    def with_jwt(cls, method: str, path: str, host: str, claims: Mapping[str, Any], **kw: Any) -> HttpRequestAttributes:
        """A request carrying a validated JWT with these claims: principal `iss/sub` derived from them."""
        return cls(method, path, host, request_principal=jwt_principal(claims), request_claims=claims, **kw)


def jwt_principal(claims: Mapping[str, Any]) -> str | None:
    """`<iss>/<sub>`, Istio's request principal; None unless both claims are strings."""
    iss, sub = claims.get("iss"), claims.get("sub")
    if isinstance(iss, str) and isinstance(sub, str) and iss and sub:
        return f"{iss}/{sub}"
    return None


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    policy: str | None  # "namespace/name" of the policy that decided, None when no single policy did
    reason: str
    dry_run_policies: tuple[str, ...] = ()  # dry-run policies that matched (they only log)
    dry_run_allowed: bool | None = None  # the decision if dry-run policies were enforced (None: none applied)
    audit_policies: tuple[str, ...] = ()  # AUDIT policies that matched
    custom_policies: tuple[str, ...] = ()  # CUSTOM policies that matched (the waypoint asks their provider)
    custom_providers: tuple[str, ...] = ()  # their extension providers, in policy order, once each

    @property
    def verdict(self) -> str:
        return "allow" if self.allowed else "deny"

    def after_custom(self, provider_allowed: bool, provider: str | None = None) -> Decision:
        """The decision once the CUSTOM provider answered: CUSTOM runs before DENY and ALLOW, so its deny
        wins; its allow leaves the DENY/ALLOW decision as it was."""
        if provider_allowed or not self.custom_policies:
            return self
        who = provider or ", ".join(self.custom_providers) or "the extension provider"
        key = self.custom_policies[0]
        return replace(self, allowed=False, policy=key, reason=f"denied by CUSTOM policy {key} ({who} denied)")


@dataclass(slots=True)
class MatchAttributes:
    """Everything a rule can look at, normalised once per decision (principals without spiffe://)."""

    principal: str  # "" when plaintext
    namespace: str
    service_account: str  # "ns/sa" or ""
    source_ip: IpAddress | None
    destination_ip: IpAddress | None
    destination_port: int
    # L7 only (None / empty at the node proxy)
    remote_ip: IpAddress | None = None
    method: str | None = None
    path: str | None = None
    host: str | None = None
    raw_headers: Mapping[str, str] | None = None  # as given; `headers` lower-cases the names on first use
    request_principal: str | None = None
    claims: Mapping[str, Any] = field(default_factory=dict)
    audiences: tuple[str, ...] = ()
    presenter: str | None = None
    sni: str | None = None
    _headers: Mapping[str, str] | None = None

    @property
    def headers(self) -> Mapping[str, str]:
        """Header names lower-cased, built only when a rule reads a header."""
        h = self._headers
        if h is None:
            raw = self.raw_headers or {}
            h = self._headers = raw if all(k.islower() for k in raw) else {k.lower(): v for k, v in raw.items()}
        return h
