"""What a decision reads and what it returns: the public types of the engine's check_l4 / check_l7."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ztunnel.config.model import Workload
from ztunnel.policy.matchers import IpAddress


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
    """One HTTP request as a waypoint sees it (after JWT validation)."""

    method: str
    path: str
    host: str
    headers: Mapping[str, str] = field(default_factory=dict)
    request_principal: str | None = None  # "<iss>/<sub>" of a validated JWT
    request_claims: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    policy: str | None  # "namespace/name" of the policy that decided, None when no single policy did
    reason: str
    dry_run_policies: tuple[str, ...] = ()  # dry-run policies that matched (they only log)
    dry_run_allowed: bool | None = None  # the decision if dry-run policies were enforced (None: none applied)
    audit_policies: tuple[str, ...] = ()  # AUDIT policies that matched
    custom_policies: tuple[str, ...] = ()  # CUSTOM policies that matched (the waypoint asks their provider)

    @property
    def verdict(self) -> str:
        return "allow" if self.allowed else "deny"


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
    headers: Mapping[str, str] = field(default_factory=dict)  # lower-case names
    request_principal: str | None = None
    claims: Mapping[str, Any] = field(default_factory=dict)
    sni: str | None = None
