"""The security objects as the engine holds them once validated: plain frozen dataclasses, no parsing, no
evaluation. An AuthorizationPolicy's rules are lists of `Check`s (one per field), each flagged when it needs
L7 attributes, so that the node proxy's L4 reduction (DESIGN §4.5) is a filter over checks.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from ztunnel.config.loader import ConfigError
from ztunnel.config.model import Source
from ztunnel.policy.matchers import Matcher

API_GROUP = "security.istio.io"
ACTIONS = ("ALLOW", "DENY", "AUDIT", "CUSTOM")
DRY_RUN_ANNOTATION = "istio.io/dry-run"
MTLS_MODES = ("UNSET", "DISABLE", "PERMISSIVE", "STRICT")
L4 = "l4"  # decided at the node proxy: connection attributes only
L7 = "l7"  # decided at a waypoint: HTTP request attributes too


class PolicyError(ConfigError):
    """An invalid security object; rejected as a whole. str() is the one-line message for the user."""


# ---------------------------------------------------------------------------------------------------
# AuthorizationPolicy
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Check:
    """One field of an entry: `matcher(attrs.<attr>)`, negated for not* forms."""

    field: str  # as written, e.g. "notPrincipals" or "when[request.headers[x-user]].values"
    attr: str  # the MatchAttributes field the matcher reads
    matcher: Matcher
    negate: bool
    layer7: bool


Entry = tuple[Check, ...]  # every check must pass


@dataclass(frozen=True, slots=True)
class Rule:
    """All present parts must match; `from`/`to` match if any entry does. None = part absent."""

    sources: tuple[Entry, ...] | None
    operations: tuple[Entry, ...] | None
    conditions: Entry

    @property
    def l7_fields(self) -> tuple[str, ...]:
        """The fields (as written) that need L7 attributes, in order, once each."""
        out: list[str] = []
        for part in (self.sources or (), self.operations or (), (self.conditions,)):
            for e in part:
                out.extend(c.field for c in e if c.layer7 and c.field not in out)
        return tuple(out)


@dataclass(frozen=True, slots=True)
class TargetRef:
    group: str
    kind: str
    name: str
    namespace: str


@dataclass(frozen=True)
class AuthorizationPolicy:
    namespace: str
    name: str
    action: str  # one of ACTIONS
    selector: Mapping[str, str] | None  # None = every workload in scope
    target_refs: tuple[TargetRef, ...]
    rules: tuple[Rule, ...]
    dry_run: bool = False
    provider: str | None = None
    source: Source | None = None
    origin: str = ""  # for converted legacy objects: what it came from

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True, slots=True)
class RejectedPolicy:
    """An AuthorizationPolicy that failed validation: its workloads deny until it is fixed (fail closed)."""

    namespace: str
    name: str
    action: str
    selector: Mapping[str, str] | None
    error: PolicyError

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


SelectedPolicy = AuthorizationPolicy | RejectedPolicy  # what selects a workload: valid or rejected


# ---------------------------------------------------------------------------------------------------
# PeerAuthentication and RequestAuthentication
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PeerAuthentication:
    namespace: str
    name: str
    selector: Mapping[str, str] | None
    mode: str  # one of MTLS_MODES
    port_modes: Mapping[int, str]
    created: str = ""  # metadata.creationTimestamp; the oldest of two conflicting policies wins
    order: int = 0  # position in the input, the tie-breaker after creation time
    source: Source | None = None
    origin: str = ""

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class JwtRule:
    """One `jwtRules` entry as Istio's JWTRule has it; the waypoint (waypoint/jwt.py) acts on every field."""

    issuer: str
    audiences: tuple[str, ...]
    jwks_uri: str | None
    jwks: str | None
    from_headers: tuple[tuple[str, str], ...]  # (name, prefix)
    from_params: tuple[str, ...]
    forward_original_token: bool
    output_payload_to_header: str | None
    from_cookies: tuple[str, ...] = ()
    output_claim_to_headers: tuple[tuple[str, str], ...] = ()  # (header, claim); nested claims as `a.b`
    timeout: float | None = None  # seconds for one `jwksUri` fetch; None = Istio's default (5 s)


@dataclass(frozen=True)
class RequestAuthentication:
    """Parsed and validated only: the waypoint validates JWTs; the node proxy never sees HTTP. Attached by
    `selector` (its namespace's workloads, or the mesh's from the root namespace) or by `target_refs` (a waypoint
    Gateway, a Service, or GatewayClass istio-waypoint from the root namespace), as an AuthorizationPolicy is."""

    namespace: str
    name: str
    selector: Mapping[str, str] | None
    jwt_rules: tuple[JwtRule, ...]
    source: Source | None = None
    target_refs: tuple[TargetRef, ...] = ()

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"
