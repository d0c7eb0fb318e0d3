"""Reading a security object's YAML safely: shapes, known fields and the parts every security kind shares
(apiVersion, selector, dry-run annotation). Every error names file, object and field (`PolicyError`).
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from typing import Any

from ztunnel.config.model import KubeObject
from ztunnel.policy.model import ACTIONS, API_GROUP, DRY_RUN_ANNOTATION, PolicyError, TargetRef

_LABEL_KEY = re.compile(
    r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$"
)
_TYPE_NAMES: dict[type, str] = {dict: "a mapping", list: "a list", str: "a string", int: "a number", bool: "a boolean"}


def type_name(v: Any) -> str:
    """What a YAML value is, in the words an error message uses."""
    if v is None:
        return "null"
    return _TYPE_NAMES.get(type(v), type(v).__name__)


class ObjectReader:
    """Where we are in an object, so every error names file, object and field."""

    def __init__(self, obj: KubeObject) -> None:
        self.obj = obj

    def error(self, field_path: str, message: str) -> PolicyError:
        return PolicyError(message, source=self.obj.source, obj=self.obj.ref, field=field_path)

    def mapping(self, value: Any, path: str) -> Mapping[str, Any]:
        if type(value) is dict:  # the common case, without an ABC check
            return value
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            raise self.error(path, f"must be a mapping, not {type_name(value)}")
        return value

    def str_list(self, value: Any, path: str) -> list[str]:
        if value is None:
            return []
        if not isinstance(value, list):
            raise self.error(path, f"must be a list of strings, not {type_name(value)}")
        for i, v in enumerate(value):
            if not isinstance(v, str):
                raise self.error(f"{path}[{i}]", f"must be a string, not {type_name(v)}")
        return value

    def port_list(self, value: Any, path: str) -> list[str]:
        """Istio writes ports as strings; accept YAML integers too but nothing else."""
        if value is None:
            return []
        if not isinstance(value, list):
            raise self.error(path, f"must be a list of port numbers, not {type_name(value)}")
        out = []
        for i, v in enumerate(value):
            if isinstance(v, bool) or not isinstance(v, int | str):
                raise self.error(f"{path}[{i}]", f"must be a port number, not {type_name(v)}")
            out.append(str(v))
        return out

    def list_of(self, value: Any, path: str) -> list[Any]:
        """A list of anything (the items are checked by the caller); None reads as empty."""
        if value is None:
            return []
        if not isinstance(value, list):
            raise self.error(path, f"must be a list, not {type_name(value)}")
        return value

    def known_fields(self, m: Mapping[str, Any], allowed: Collection[str], path: str) -> None:
        for k in m:
            if k not in allowed:
                raise self.error(
                    f"{path}.{k}" if path else str(k), f"unknown field; expected one of {', '.join(allowed)}"
                )

    def check_api_version(self) -> None:
        """security.istio.io v1 or v1beta1, the versions Istio serves."""
        api = self.obj.api_version
        if not api.startswith(f"{API_GROUP}/") or api.split("/", 1)[1] not in ("v1", "v1beta1"):
            raise self.error("apiVersion", f"{api!r} is not served; use security.istio.io/v1 or v1beta1")


def parse_selector(
    reader: ObjectReader, spec: Mapping[str, Any], path: str = "spec.selector"
) -> Mapping[str, str] | None:
    raw = spec.get("selector")
    if raw is None:
        return None
    sel = reader.mapping(raw, path)
    reader.known_fields(sel, ["matchLabels"], path)
    labels = reader.mapping(sel.get("matchLabels"), f"{path}.matchLabels")
    out: dict[str, str] = {}
    for k, v in labels.items():
        if not isinstance(k, str) or not _LABEL_KEY.match(k):
            raise reader.error(f"{path}.matchLabels", f"{k!r} is not a valid label key")
        if not isinstance(v, str | int | float) or isinstance(v, bool):
            raise reader.error(f"{path}.matchLabels.{k}", f"must be a string, not {type_name(v)}")
        out[k] = str(v)
    return out or None


def parse_target_refs(
    reader: ObjectReader, spec: Mapping[str, Any], namespace: str, selector: Mapping[str, str] | None
) -> tuple[TargetRef, ...]:
    """`spec.targetRef` and `spec.targetRefs` (Istio: a policy attaches by selector or by targetRefs, not both);
    a reference without a namespace is to the policy's own."""
    raws: list[tuple[str, Any]] = []
    if spec.get("targetRef") is not None:
        raws.append(("spec.targetRef", spec["targetRef"]))
    refs = reader.list_of(spec.get("targetRefs"), "spec.targetRefs")
    raws.extend((f"spec.targetRefs[{i}]", x) for i, x in enumerate(refs))
    out = []
    for path, raw in raws:
        m = reader.mapping(raw, path)
        reader.known_fields(m, ["group", "kind", "name", "namespace"], path)
        for f in ("kind", "name"):
            if not isinstance(m.get(f), str) or not m[f]:
                raise reader.error(f"{path}.{f}", "is required")
        out.append(TargetRef(str(m.get("group", "")), m["kind"], m["name"], str(m.get("namespace") or namespace)))
    if selector is not None and out:
        raise reader.error("spec.selector", "cannot be used together with targetRef/targetRefs; keep one")
    return tuple(out)


def dry_run_of(reader: ObjectReader) -> bool:
    raw = reader.obj.annotations.get(DRY_RUN_ANNOTATION)
    if raw is None:
        return False
    if raw.lower() not in ("true", "false"):
        raise reader.error(f"metadata.annotations[{DRY_RUN_ANNOTATION}]", f'must be "true" or "false", not {raw!r}')
    return raw.lower() == "true"


def best_effort_scope(obj: KubeObject) -> tuple[str, Mapping[str, str] | None, bool, bool]:
    """For a rejected policy: (action or "", selector or None, has targetRefs, dry-run) read as far as possible.

    Used to fail closed: the workloads a rejected policy would have selected deny until it is fixed. A
    selector that cannot be read widens the scope to the whole namespace, never narrows it.
    """
    spec = obj.body.get("spec")
    spec = spec if isinstance(spec, Mapping) else {}
    action = spec.get("action", "ALLOW")
    action = action if isinstance(action, str) and action in ACTIONS else ""
    selector: Mapping[str, str] | None = None
    try:
        selector = parse_selector(ObjectReader(obj), spec)
    except PolicyError:
        selector = None
    has_refs = bool(spec.get("targetRef") or spec.get("targetRefs"))
    dry = str(obj.annotations.get(DRY_RUN_ANNOTATION, "")).lower() == "true"
    return action, selector, has_refs, dry
