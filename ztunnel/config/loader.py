"""YAML files of ordinary Kubernetes objects -> `ClusterConfig`.

Errors name the file, the object and the field, and say what to do. Kinds the mesh does not use
(Deployment, DestinationRule, ...) are skipped so users can point at the manifests they already apply.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ztunnel.config.model import (
    DATAPLANE_MODE_LABEL,
    DEFAULT_ROOT_NAMESPACE,
    DEFAULT_TRUST_DOMAIN,
    POLICY_KINDS,
    ClusterConfig,
    KubeObject,
    Namespace,
    Node,
    Service,
    ServicePort,
    Source,
    Workload,
)
from ztunnel.errors import ZtunnelError


class ConfigError(ZtunnelError):
    """A config file or object the mesh cannot use. The message names file, object and field."""

    def __init__(self, message: str, *, source: Source | str | None = None, obj: str = "", field: str = ""):
        self.source = source
        self.obj = obj
        self.field = field
        self.reason = message
        parts = [str(source)] if source else []
        if obj:
            parts.append(obj)
        if field:
            parts.append(f"field {field}")
        super().__init__(": ".join([*parts, message]) if parts else message)


@dataclass(frozen=True)
class _Doc:
    body: Mapping[str, Any]
    source: Source


def _iter_docs(text: str, file: str) -> Iterable[_Doc]:
    try:
        docs = list(yaml.safe_load_all(text))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"not valid YAML{where}: {getattr(e, 'problem', e)}; fix the syntax", source=file) from e
    index = 0
    for doc in docs:
        if doc is None:
            continue
        src = Source(file, index)
        index += 1
        if not isinstance(doc, Mapping):
            raise ConfigError("expected a Kubernetes object (a mapping with kind and metadata)", source=src)
        if doc.get("kind") == "List" or (str(doc.get("kind", "")).endswith("List") and "items" in doc):
            for item in doc.get("items") or []:
                if isinstance(item, Mapping):
                    yield _Doc(item, src)
            continue
        yield _Doc(doc, src)


def _as_str_map(value: Any, src: Source, obj: str, field: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError("must be a mapping of strings", source=src, obj=obj, field=field)
    return {str(k): "" if v is None else str(v) for k, v in value.items()}


def to_kube_object(doc: Mapping[str, Any], source: Source) -> KubeObject:
    kind = doc.get("kind")
    if not isinstance(kind, str) or not kind:
        raise ConfigError("missing kind; every object needs apiVersion and kind", source=source)
    meta = doc.get("metadata") or {}
    if not isinstance(meta, Mapping):
        raise ConfigError("must be a mapping", source=source, obj=kind, field="metadata")
    name = meta.get("name")
    if not isinstance(name, str) or not name:
        raise ConfigError("missing metadata.name", source=source, obj=kind, field="metadata.name")
    namespace = meta.get("namespace")
    if kind in ("Namespace", "Node", "ClusterRbacConfig", "MeshPolicy"):
        namespace = ""
    elif namespace is None:
        namespace = "default"
    ref = f"{kind} {namespace}/{name}" if namespace else f"{kind} {name}"
    return KubeObject(
        api_version=str(doc.get("apiVersion", "")),
        kind=kind,
        name=name,
        namespace=str(namespace),
        labels=_as_str_map(meta.get("labels"), source, ref, "metadata.labels"),
        annotations=_as_str_map(meta.get("annotations"), source, ref, "metadata.annotations"),
        body=doc,
        source=source,
    )


def _pod_ips(obj: KubeObject) -> tuple[str, ...]:
    status = obj.body.get("status") or {}
    ips: list[str] = []
    for entry in status.get("podIPs") or []:
        ip = entry.get("ip") if isinstance(entry, Mapping) else entry
        if ip:
            ips.append(str(ip))
    if status.get("podIP") and str(status["podIP"]) not in ips:
        ips.insert(0, str(status["podIP"]))
    out = []
    for i, ip in enumerate(ips):
        try:
            out.append(str(ipaddress.ip_address(ip)))
        except ValueError as e:
            raise ConfigError(
                f"{ip!r} is not an IP address", source=obj.source, obj=obj.ref, field=f"status.podIPs[{i}]"
            ) from e
    return tuple(out)


def is_enrolled(pod_labels: Mapping[str, str], ns_labels: Mapping[str, str], host_network: bool) -> bool:
    """DESIGN §4.4: pod label ambient, or namespace label ambient and the pod does not opt out."""
    if host_network:
        return False
    pod_mode = pod_labels.get(DATAPLANE_MODE_LABEL)
    if pod_mode == "ambient":
        return True
    if pod_mode == "none":
        return False
    return ns_labels.get(DATAPLANE_MODE_LABEL) == "ambient"


def _pod_ready(obj: KubeObject) -> bool:
    status = obj.body.get("status") or {}
    for cond in status.get("conditions") or []:
        if isinstance(cond, Mapping) and cond.get("type") == "Ready":
            return str(cond.get("status")) == "True"
    return True


def _workload(obj: KubeObject, namespaces: Mapping[str, Namespace], trust_domain: str) -> Workload:
    spec = obj.spec
    sa = spec.get("serviceAccountName") or spec.get("serviceAccount") or "default"
    host_network = bool(spec.get("hostNetwork", False))
    ns = namespaces.get(obj.namespace)
    containers = spec.get("containers") or []
    if not isinstance(containers, Sequence):
        raise ConfigError("must be a list", source=obj.source, obj=obj.ref, field="spec.containers")
    meta = obj.body.get("metadata") or {}
    return Workload(
        uid=str(meta.get("uid") or f"{obj.namespace}/{obj.name}"),
        name=obj.name,
        namespace=obj.namespace,
        node=str(spec.get("nodeName") or ""),
        service_account=str(sa),
        ips=_pod_ips(obj),
        labels=obj.labels,
        host_network=host_network,
        enrolled=is_enrolled(obj.labels, ns.labels if ns else {}, host_network),
        trust_domain=trust_domain,
        ready=_pod_ready(obj),
        containers=tuple(c for c in containers if isinstance(c, Mapping)),
    )


def _service(obj: KubeObject) -> Service:
    spec = obj.spec
    ips: list[str] = []
    for ip in [spec.get("clusterIP"), *(spec.get("clusterIPs") or [])]:
        if not ip or ip == "None" or ip in ips:
            continue
        try:
            ips.append(str(ipaddress.ip_address(str(ip))))
        except ValueError as e:
            raise ConfigError(
                f"{ip!r} is not an IP address", source=obj.source, obj=obj.ref, field="spec.clusterIP"
            ) from e
    ports = []
    for i, p in enumerate(spec.get("ports") or []):
        field = f"spec.ports[{i}]"
        if not isinstance(p, Mapping) or not isinstance(p.get("port"), int) or not 0 < p["port"] < 65536:
            raise ConfigError("needs port: a number from 1 to 65535", source=obj.source, obj=obj.ref, field=field)
        target = p.get("targetPort", p["port"])
        if isinstance(target, str) and target.isdigit():
            target = int(target)
        ports.append(
            ServicePort(
                port=p["port"], target_port=target, name=str(p.get("name", "")), protocol=str(p.get("protocol", "TCP"))
            )
        )
    sans = obj.annotations.get("networking.istio.io/subject-alt-names", "")
    return Service(
        name=obj.name,
        namespace=obj.namespace,
        cluster_ips=tuple(ips),
        ports=tuple(ports),
        selector=_as_str_map(spec.get("selector"), obj.source, obj.ref, "spec.selector"),
        labels=obj.labels,
        subject_alt_names=tuple(s.strip() for s in sans.split(",") if s.strip()),
    )


def _node(obj: KubeObject) -> Node:
    addrs = []
    for a in (obj.body.get("status") or {}).get("addresses") or []:
        if isinstance(a, Mapping) and a.get("type", "InternalIP") == "InternalIP" and a.get("address"):
            addrs.append(str(a["address"]))
    return Node(name=obj.name, addresses=tuple(addrs))


def build_config(
    objects: Iterable[KubeObject],
    *,
    trust_domain: str = DEFAULT_TRUST_DOMAIN,
    root_namespace: str = DEFAULT_ROOT_NAMESPACE,
    generation: int = 0,
) -> ClusterConfig:
    """Turn objects into one snapshot. Later objects with the same kind/namespace/name win."""
    latest: dict[tuple[str, str, str], KubeObject] = {}
    warnings: list[str] = []
    for o in objects:
        key = (o.kind, o.namespace, o.name)
        if key in latest:
            warnings.append(f"{o.source}: {o.ref}: also defined in {latest[key].source}; the later one is used")
        latest[key] = o
    objs = list(latest.values())
    namespaces = {o.name: Namespace(o.name, o.labels) for o in objs if o.kind == "Namespace"}
    for o in objs:  # namespaces referenced but not declared exist with no labels, as in a cluster
        if o.namespace and o.namespace not in namespaces:
            namespaces[o.namespace] = Namespace(o.namespace, {})
    workloads = tuple(_workload(o, namespaces, trust_domain) for o in objs if o.kind == "Pod")
    services = tuple(_service(o) for o in objs if o.kind == "Service")
    nodes = {o.name: _node(o) for o in objs if o.kind == "Node"}
    for w in workloads:
        if w.node and w.node not in nodes:
            nodes[w.node] = Node(w.node)
    policies = tuple(o for o in objs if o.kind in POLICY_KINDS)
    warnings.extend(_ip_conflicts(objs, workloads))
    return ClusterConfig(
        namespaces=namespaces,
        workloads=workloads,
        services=services,
        nodes=nodes,
        policy_objects=policies,
        trust_domain=trust_domain,
        root_namespace=root_namespace,
        generation=generation,
        warnings=tuple(warnings),
    )


def _ip_conflicts(objs: Sequence[KubeObject], workloads: Sequence[Workload]) -> list[str]:
    """Two pods with one IP would let one stand in for the other; say which, so the user can fix it."""
    by_ip: dict[str, list[Workload]] = {}
    for w in workloads:
        if not w.host_network:
            for ip in w.ips:
                by_ip.setdefault(ip, []).append(w)
    sources = {(o.namespace, o.name): o.source for o in objs if o.kind == "Pod"}
    out = []
    for ip, pods in by_ip.items():
        if len({w.uid for w in pods}) > 1:
            names = ", ".join(f"Pod {w.ref} ({sources.get((w.namespace, w.name))})" for w in pods)
            out.append(
                f"status.podIP {ip} is claimed by {names}; traffic to and from {ip} is refused until one is changed"
            )
    return out


def load_documents(text: str, file: str = "<string>") -> list[KubeObject]:
    return [to_kube_object(d.body, d.source) for d in _iter_docs(text, file)]


def read_objects(paths: Sequence[str | Path]) -> list[KubeObject]:
    objects: list[KubeObject] = []
    for p in paths:
        path = Path(p)
        files = sorted(x for x in path.iterdir() if x.suffix in (".yaml", ".yml")) if path.is_dir() else [path]
        for f in files:
            try:
                text = f.read_text()
            except OSError as e:
                raise ConfigError(f"cannot read: {e.strerror}; check the path given with -f", source=str(f)) from e
            objects.extend(load_documents(text, str(f)))
    return objects


def load_files(
    paths: Sequence[str | Path],
    *,
    trust_domain: str = DEFAULT_TRUST_DOMAIN,
    root_namespace: str = DEFAULT_ROOT_NAMESPACE,
    generation: int = 0,
) -> ClusterConfig:
    return build_config(
        read_objects(paths), trust_domain=trust_domain, root_namespace=root_namespace, generation=generation
    )
