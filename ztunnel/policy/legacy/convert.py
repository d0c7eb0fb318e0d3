"""`convert_objects`: every legacy object of a snapshot converted, errors and notes collected, nothing raised."""

from __future__ import annotations

from collections.abc import Iterable

from ztunnel.config.model import ClusterConfig, KubeObject
from ztunnel.policy.legacy.authn import AUTHN_KINDS, authn_namespace, convert_authn
from ztunnel.policy.legacy.emit import Conversion, ConversionResult
from ztunnel.policy.legacy.rbac import RBAC_KINDS, ROLE_KINDS, convert_rbac_config, convert_roles
from ztunnel.policy.model import PolicyError

LEGACY_KINDS = frozenset({*RBAC_KINDS, *ROLE_KINDS, *AUTHN_KINDS})


def convert_objects(objects: Iterable[KubeObject], config: ClusterConfig | None = None) -> ConversionResult:
    """Convert every legacy object; errors and notes are collected, nothing raises."""
    objects = list(objects)
    conv = Conversion(config, config.root_namespace if config else "istio-system")
    try:
        enabled = convert_rbac_config(conv, objects)
        convert_roles(conv, objects, enabled)
    except PolicyError as e:
        conv.result.errors.append(e)
    for o in objects:
        if o.kind in AUTHN_KINDS:
            _convert_authn(conv, o)
    return conv.result


def _convert_authn(conv: Conversion, obj: KubeObject) -> None:
    try:
        convert_authn(conv, obj)
    except PolicyError as e:
        conv.result.errors.append(e)
        # fail closed: an unreadable peer policy demands mTLS for its scope
        conv.emit(obj, "PeerAuthentication", obj.name, authn_namespace(conv, obj), {"mtls": {"mode": "STRICT"}})
        conv.note(obj, "invalid; treated as STRICT mTLS for its namespace until fixed")
