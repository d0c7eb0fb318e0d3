"""What a conversion produces and what it reads: new objects, notes and errors; the config's Services.

One `Conversion` is shared by the RBAC and authentication steps so that their output lands in one
`ConversionResult`, in the order the steps ran.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ztunnel.config.model import ClusterConfig, KubeObject, Service
from ztunnel.policy.model import DRY_RUN_ANNOTATION, PolicyError

CONVERTED_FROM_ANNOTATION = "ztunnel.io/converted-from"
NEW_API = "security.istio.io/v1"


@dataclass
class ConversionResult:
    converted: list[tuple[KubeObject, str]] = field(default_factory=list)  # (new object, "Kind ns/name" it came from)
    notes: list[str] = field(default_factory=list)
    errors: list[PolicyError] = field(default_factory=list)

    @property
    def objects(self) -> list[KubeObject]:
        return [o for o, _ in self.converted]


def get_field(m: Mapping[str, Any], *names: str) -> Any:
    """Legacy CRDs were written in both proto (snake_case) and JSON (camelCase) spelling."""
    for n in names:
        if n in m:
            return m[n]
    return None


def _service_names(s: Service) -> tuple[str, str, str]:
    return (s.hostname, f"{s.name}.{s.namespace}", f"{s.name}.{s.namespace}.svc")


def _pattern_matches(pattern: str, names: tuple[str, ...]) -> bool:
    """ServiceRole `services` entries: FQDN or short name, `*`, `prefix*` or `*suffix`."""
    if pattern == "*":
        return True
    if pattern.startswith("*"):
        return any(n.endswith(pattern[1:]) for n in names)
    if pattern.endswith("*"):
        return any(n.startswith(pattern[:-1]) for n in names)
    return pattern in names


class Conversion:
    """The state of one conversion run: the config it reads and the result it writes."""

    def __init__(self, config: ClusterConfig | None, root_namespace: str) -> None:
        self.config = config
        self.root = root_namespace
        self.result = ConversionResult()

    def error(self, obj: KubeObject, field_path: str, message: str) -> PolicyError:
        return PolicyError(message, source=obj.source, obj=obj.ref, field=field_path)

    def note(self, obj: KubeObject, message: str) -> None:
        text = f"{obj.ref}: {message}"
        if text not in self.result.notes:
            self.result.notes.append(text)

    def emit(
        self,
        origin: KubeObject,
        kind: str,
        name: str,
        namespace: str,
        spec: Mapping[str, Any],
        *,
        dry_run: bool = False,
    ) -> None:
        annotations = {CONVERTED_FROM_ANNOTATION: origin.ref}
        if dry_run:
            annotations[DRY_RUN_ANNOTATION] = "true"
        body = {
            "apiVersion": NEW_API,
            "kind": kind,
            "metadata": {"name": name, "namespace": namespace, "annotations": dict(annotations)},
            "spec": dict(spec),
        }
        obj = KubeObject(
            api_version=NEW_API,
            kind=kind,
            name=name,
            namespace=namespace,
            labels={},
            annotations=annotations,
            body=body,
            source=origin.source,
        )
        self.result.converted.append((obj, origin.ref))

    def services_in(self, namespace: str) -> list[Service]:
        if self.config is None:
            return []
        return [s for s in self.config.services if s.namespace == namespace]

    def find_services(self, obj: KubeObject, pattern: str, namespace: str) -> list[Service]:
        """The Services of `namespace` a ServiceRole `services` entry names; a note when there are none."""
        out = [s for s in self.services_in(namespace) if _pattern_matches(pattern, (s.name, *_service_names(s)))]
        if not out and pattern != "*":
            self.note(obj, f"service {pattern!r} is not defined in namespace {namespace}; nothing is granted for it")
        return out

    def service_by_fqdn(self, name: str) -> Service | None:
        if self.config is None:
            return None
        for s in self.config.services:
            if name in _service_names(s):
                return s
        return None
