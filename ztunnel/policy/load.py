"""Every security object of a config snapshot read into the model; a bad object never stops the others.

Legacy kinds are converted first. An invalid AuthorizationPolicy becomes a `RejectedPolicy` over the scope it
would have had (its workloads deny until it is fixed); an invalid PeerAuthentication acts as STRICT.
AuthorizationPolicies unchanged since the previous snapshot are reused rather than parsed again.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from ztunnel.config.loader import ConfigError
from ztunnel.config.model import ClusterConfig, KubeObject
from ztunnel.policy.authz import CompileMemo, parse_authorization_policy
from ztunnel.policy.legacy import LEGACY_KINDS, convert_objects
from ztunnel.policy.model import (
    AuthorizationPolicy,
    PeerAuthentication,
    PolicyError,
    RejectedPolicy,
    RequestAuthentication,
)
from ztunnel.policy.peerauth import parse_peer_authentication, parse_request_authentication
from ztunnel.policy.validation import best_effort_scope

# (namespace, name) -> (the object, what parsing it gave): what the next snapshot can reuse
ParseResults = dict[tuple[str, str], tuple[KubeObject, AuthorizationPolicy | PolicyError]]


@dataclass
class LoadedPolicies:
    authorization_policies: list[AuthorizationPolicy] = field(default_factory=list)
    peer_authentications: list[PeerAuthentication] = field(default_factory=list)
    request_authentications: list[RequestAuthentication] = field(default_factory=list)
    rejected: list[RejectedPolicy] = field(default_factory=list)
    rejected_peer_authentications: list[PeerAuthentication] = field(default_factory=list)
    errors: list[PolicyError] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    parsed: ParseResults = field(default_factory=dict)


@dataclass
class LegacyConverted:
    objects: list[KubeObject]  # the snapshot's security objects with legacy ones replaced
    origins: dict[int, str]  # id(converted object) -> "Kind ns/name" it came from
    errors: list[PolicyError]
    notes: list[str]


def convert_legacy(config: ClusterConfig) -> LegacyConverted:
    """The snapshot's security objects, legacy kinds converted to current ones (appended at the end)."""
    objects = list(config.policy_objects)
    if not any(o.kind in LEGACY_KINDS for o in objects):
        return LegacyConverted(objects, {}, [], [])
    result = convert_objects(objects, config)
    current = [o for o in objects if o.kind not in LEGACY_KINDS]
    origins: dict[int, str] = {}
    for obj, origin in result.converted:
        origins[id(obj)] = origin
        current.append(obj)
    return LegacyConverted(current, origins, list(result.errors), list(result.notes))


def _same_object(old: KubeObject, new: KubeObject) -> bool:
    """Unchanged object (same text at the same place), so its parse result can be reused."""
    return old is new or (
        old.body == new.body
        and old.source == new.source
        and old.api_version == new.api_version
        and old.annotations == new.annotations
    )


class _Loader:
    def __init__(self, previous: ParseResults, out: LoadedPolicies) -> None:
        self.previous = previous
        self.out = out
        self.memo = CompileMemo()

    def load(self, obj: KubeObject, order: int, origin: str) -> None:
        """Read one object into `out`; raises ConfigError for an invalid one."""
        out = self.out
        if obj.kind == "AuthorizationPolicy":
            p = self.authorization_policy(obj, origin)
            out.authorization_policies.append(p)
            if p.action == "CUSTOM":
                out.warnings.append(
                    f"{obj.ref}: action CUSTOM (provider {p.provider}) is enforced by a waypoint, not by the node proxy"
                )
            if p.target_refs:
                out.warnings.append(f"{obj.ref}: targetRefs attach the policy to a waypoint; not enforced at L4")
        elif obj.kind == "PeerAuthentication":
            out.peer_authentications.append(parse_peer_authentication(obj, order=order, origin=origin))
        elif obj.kind == "RequestAuthentication":
            out.request_authentications.append(parse_request_authentication(obj))

    def authorization_policy(self, obj: KubeObject, origin: str) -> AuthorizationPolicy:
        """Parsed, or reused from the previous snapshot when the object did not change."""
        key = (obj.namespace, obj.name)
        old = self.previous.get(key)
        result: AuthorizationPolicy | PolicyError
        if (
            old is not None
            and _same_object(old[0], obj)
            and (isinstance(old[1], PolicyError) or old[1].origin == origin)
        ):
            result = old[1]
        else:
            try:
                result = parse_authorization_policy(obj, origin=origin, memo=self.memo)
            except PolicyError as e:
                result = e
        self.out.parsed[key] = (obj, result)
        if isinstance(result, PolicyError):
            raise result
        return result

    def reject(self, obj: KubeObject, e: ConfigError) -> None:
        """Record the error; the object's scope fails closed."""
        err = e if isinstance(e, PolicyError) else PolicyError(str(e))
        self.out.errors.append(err)
        if obj.kind == "AuthorizationPolicy":
            action, selector, has_refs, dry = best_effort_scope(obj)
            if not dry and not has_refs and action != "AUDIT":
                self.out.rejected.append(RejectedPolicy(obj.namespace, obj.name, action or "UNKNOWN", selector, err))
        elif obj.kind == "PeerAuthentication":
            _, selector, _, _ = best_effort_scope(obj)
            self.out.rejected_peer_authentications.append(
                PeerAuthentication(obj.namespace, obj.name, selector, "STRICT", {}, order=-1, origin="invalid")
            )


def load_objects(
    objects: Iterable[KubeObject],
    *,
    errors: Iterable[PolicyError] = (),
    warnings: Iterable[str] = (),
    origins: Mapping[int, str] | None = None,
    previous: ParseResults | None = None,
) -> LoadedPolicies:
    """Parse every security object (other kinds are skipped); never raises for bad ones."""
    loader = _Loader(previous or {}, LoadedPolicies(errors=list(errors), warnings=list(warnings)))
    origins = origins or {}
    for order, obj in enumerate(objects):
        try:
            loader.load(obj, order, origins.get(id(obj), ""))
        except ConfigError as e:
            loader.reject(obj, e)
    return loader.out
