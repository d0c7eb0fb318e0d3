"""YAML (or JSON) files of ordinary Kubernetes objects -> `ClusterConfig`.

Errors name the file, the object and the field, and say what to do. Kinds the mesh does not use
(Deployment, DestinationRule, ...) are skipped so users can point at the manifests they already apply,
but an unknown kind in one of Istio's security API groups is an error: a mistyped `AuthorizationPolcy`
skipped without a word would leave traffic allowed.

`read_config` is the whole read (bytes -> UTF-8 text -> YAML -> objects -> snapshot with its indexes) and
raises nothing but `ConfigError`, so a watcher can keep the last good snapshot whatever the file holds.
It does no asyncio: the proxy runs it in a thread so a large file never stops the event loop.
"""

from __future__ import annotations

import codecs
import dataclasses
import difflib
import ipaddress
import json
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import yaml

from ztunnel.config.model import (
    DATAPLANE_MODE_LABEL,
    DEFAULT_PATH_NORMALIZATION,
    DEFAULT_ROOT_NAMESPACE,
    DEFAULT_TRUST_DOMAIN,
    GATEWAY_NAME_LABEL,
    PATH_NORMALIZATIONS,
    POLICY_KINDS,
    SERVICE_NAME_LABEL,
    USE_WAYPOINT_LABEL,
    USE_WAYPOINT_NONE,
    WAYPOINT_GATEWAY_CLASS,
    ClusterConfig,
    ExtAuthzProvider,
    KubeObject,
    Namespace,
    Node,
    Service,
    ServicePort,
    SliceEndpoint,
    Source,
    Waypoint,
    Workload,
    normalize_ip,
)
from ztunnel.errors import ZtunnelError
from ztunnel.ports import HBONE_PORT

log = logging.getLogger("ztunnel.config")

# libyaml's parser is ~6x faster than the pure-Python one on large files; the constructor (safe tags only)
# is the same, so both build the same objects. Tests and the bench may swap this for yaml.SafeLoader.
YAML_LOADER: type[Any] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
# What `-f DIR` reads, as kubectl does (no recursion into subdirectories).
CONFIG_SUFFIXES = (".yaml", ".yml", ".json")
LARGE_FILE_BYTES = 1 << 20  # from this size on, a load logs its start, progress and end
PROGRESS_EVERY_S = 2.0

# Kinds served by Istio's security API groups: any other kind there is a typo that would drop a policy.
SECURITY_GROUP_KINDS: Mapping[str, frozenset[str]] = {
    "security.istio.io": frozenset({"AuthorizationPolicy", "PeerAuthentication", "RequestAuthentication"}),
    "rbac.istio.io": frozenset({"ServiceRole", "ServiceRoleBinding", "ClusterRbacConfig", "RbacConfig"}),
    "authentication.istio.io": frozenset({"Policy", "MeshPolicy"}),
}
_QUOTES = "\"'\u201c\u201d\u2018\u2019"  # straight and typographic quotes copied from web pages


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

    @property
    def file(self) -> str:
        """The file at fault ("" when the error is not about one file)."""
        if isinstance(self.source, Source):
            return self.source.file
        return self.source or ""


@dataclass(frozen=True)
class _Doc:
    body: Mapping[str, Any]
    source: Source


def decode_config(data: bytes, file: str) -> str:
    """Config bytes -> text. Kubernetes manifests are UTF-8 (a leading BOM is allowed); anything else is
    refused with the reason, never guessed: a Latin-1 or binary file read as something else is not the
    config the user meant."""
    for bom, name in (
        (codecs.BOM_UTF32_LE, "UTF-32"),
        (codecs.BOM_UTF32_BE, "UTF-32"),
        (codecs.BOM_UTF16_LE, "UTF-16"),
        (codecs.BOM_UTF16_BE, "UTF-16"),
    ):
        if data.startswith(bom):
            raise ConfigError(f"is {name} text, not UTF-8; save it as UTF-8", source=file)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise ConfigError(
            f"is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}, line {line}); "
            "config files must be UTF-8: save it as UTF-8, or check that -f names the right file",
            source=file,
        ) from None
    if "\x00" in text:
        raise ConfigError(
            f"holds a NUL byte at offset {text.index(chr(0))}: a binary file, not YAML or JSON; "
            "check that -f names the right file",
            source=file,
        )
    return text.removeprefix("\ufeff")


def _yaml_error(e: Exception, file: str) -> ConfigError:
    mark = getattr(e, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    problem = getattr(e, "problem", None) or getattr(e, "reason", None) or e
    return ConfigError(f"not valid YAML{where}: {problem}; fix the syntax", source=file)


def _yaml_docs(text: str, file: str, progress: _Progress) -> Iterator[Any]:
    """Each document of a YAML stream, composed then constructed one at a time (memory: one document's
    nodes at once), reporting the position reached to `progress`."""
    loader = YAML_LOADER(text)
    try:
        while loader.check_node():
            node = loader.get_node()
            doc = loader.construct_document(node)
            end = getattr(node, "end_mark", None)
            progress.at(end.index if end is not None else 0)
            yield doc
    except yaml.YAMLError as e:
        raise _yaml_error(e, file) from None
    except (ValueError, TypeError, OverflowError) as e:  # e.g. a timestamp with month 13
        raise ConfigError(f"not valid YAML: {e}; fix the value", source=file) from None
    except RecursionError:
        raise ConfigError("nested too deeply to be a Kubernetes object", source=file) from None
    finally:
        loader.dispose()


def _json_docs(text: str, file: str, progress: _Progress) -> Iterator[Any]:
    """A `.json` file: one JSON value or several in a row, as kubectl reads them."""
    decoder = json.JSONDecoder()
    pos, end = 0, len(text)
    while True:
        while pos < end and text[pos] in " \t\r\n":
            pos += 1
        if pos >= end:
            return
        try:
            doc, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise ConfigError(
                f"not valid JSON at line {e.lineno}, column {e.colno}: {e.msg}; fix the syntax", source=file
            ) from None
        except RecursionError:
            raise ConfigError("nested too deeply to be a Kubernetes object", source=file) from None
        progress.at(pos)
        yield doc


class _Progress:
    """Logs where a large load is, every PROGRESS_EVERY_S, from the thread doing it."""

    def __init__(self, file: str, size: int) -> None:
        self.file = file
        self.size = size
        self.documents = 0
        self.started = time.monotonic()
        self._next = self.started + PROGRESS_EVERY_S

    def at(self, position: int) -> None:
        self.documents += 1
        if self.size >= LARGE_FILE_BYTES:
            now = time.monotonic()
            if now >= self._next:
                self._next = now + PROGRESS_EVERY_S
                log.info(
                    "config: still parsing %s: %d%%, %d documents, %.1fs",
                    self.file,
                    100 * position // max(self.size, 1),
                    self.documents,
                    now - self.started,
                    extra={"file": self.file, "documents": self.documents},
                )


def _iter_docs(text: str, file: str, progress: _Progress | None = None) -> Iterable[_Doc]:
    progress = progress or _Progress(file, len(text))
    parse = _json_docs if file.endswith(".json") else _yaml_docs
    index = 0
    for doc in parse(text, file, progress):
        if doc is None:
            continue
        src = Source(file, index)
        index += 1
        if not isinstance(doc, Mapping):
            raise ConfigError("expected a Kubernetes object (a mapping with kind and metadata)", source=src)
        if doc.get("kind") == "List" or (str(doc.get("kind", "")).endswith("List") and "items" in doc):
            items = doc.get("items") or []
            if not isinstance(items, list):
                raise ConfigError("must be a list of objects", source=src, obj=str(doc.get("kind")), field="items")
            for item in items:
                if isinstance(item, Mapping):
                    yield _Doc(item, src)
            continue
        yield _Doc(doc, src)


def _check_security_kind(api_version: str, kind: str, name: str, source: Source) -> None:
    """An unknown kind in an Istio security group is a typo (`AuthorizationPolcy`, `ServiceRol`, or quotes
    copied from a web page): skipping it would drop a DENY or let an ALLOW-scoped workload go open."""
    group = api_version.strip(_QUOTES).partition("/")[0]
    known = SECURITY_GROUP_KINDS.get(group)
    if known is None or kind in known:
        return
    bare = kind.strip(_QUOTES)
    if bare in known:
        hint = f"it has quote characters around it; write kind: {bare} (and check apiVersion and metadata too)"
    else:
        close = difflib.get_close_matches(kind, sorted(known), n=1, cutoff=0.5)
        hint = f"did you mean {close[0]}?" if close else f"{group} serves {', '.join(sorted(known))}"
    raise ConfigError(
        f"{group} has no kind {kind!r}, so this object would be ignored; {hint}",
        source=source,
        obj=f"{kind} {name}",
        field="kind",
    )


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
    _check_security_kind(str(doc.get("apiVersion", "")), kind, name, source)
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
                port=p["port"],
                target_port=target,
                name=str(p.get("name", "")),
                protocol=str(p.get("protocol", "TCP")),
                app_protocol=str(p.get("appProtocol", "")),
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


def _slice_endpoints(obj: KubeObject) -> list[SliceEndpoint]:
    """An EndpointSlice's addresses (IPv4/IPv6 slices; FQDN ones name no address and are skipped)."""
    if obj.body.get("addressType", "IPv4") not in ("IPv4", "IPv6"):
        return []
    ports: list[tuple[str, int]] = []
    for i, p in enumerate(obj.body.get("ports") or []):
        if not isinstance(p, Mapping):
            raise ConfigError("must be a mapping", source=obj.source, obj=obj.ref, field=f"ports[{i}]")
        number = p.get("port")
        if number is None:  # "not restricted": no port we could dial; the Service's ports find none here
            continue
        if isinstance(number, bool) or not isinstance(number, int) or not 0 < number < 65536:
            where = f"ports[{i}].port"
            raise ConfigError("must be a number from 1 to 65535", source=obj.source, obj=obj.ref, field=where)
        ports.append((str(p.get("name") or ""), number))
    out = []
    for i, e in enumerate(obj.body.get("endpoints") or []):
        if not isinstance(e, Mapping):
            raise ConfigError("must be a mapping", source=obj.source, obj=obj.ref, field=f"endpoints[{i}]")
        ready = (e.get("conditions") or {}).get("ready")
        for j, ip in enumerate(e.get("addresses") or []):
            try:
                text = normalize_ip(str(ip))
            except ValueError as err:
                where = f"endpoints[{i}].addresses[{j}]"
                raise ConfigError(f"{ip!r} is not an IP address", source=obj.source, obj=obj.ref, field=where) from err
            out.append(SliceEndpoint(obj.name, text, ready is not False, str(e.get("nodeName") or ""), tuple(ports)))
    return out


def _node(obj: KubeObject) -> Node:
    addrs = []
    for a in (obj.body.get("status") or {}).get("addresses") or []:
        if isinstance(a, Mapping) and a.get("type", "InternalIP") == "InternalIP" and a.get("address"):
            addrs.append(str(a["address"]))
    return Node(name=obj.name, addresses=tuple(addrs))


def _checked(build: Callable[..., Any], obj: KubeObject, *args: Any) -> Any:
    """`build(obj, ...)`, with a field of an unexpected shape (a string where a mapping belongs, ...) reported
    as a ConfigError naming the object, never as an exception that would stop a config watcher."""
    try:
        return build(obj, *args)
    except ConfigError:
        raise
    except (AttributeError, TypeError, ValueError, KeyError) as e:
        raise ConfigError(
            f"a field has the wrong type ({e}); compare the object with `kubectl explain {obj.kind.lower()}`",
            source=obj.source,
            obj=obj.ref,
        ) from None


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
    workloads = tuple(_checked(_workload, o, namespaces, trust_domain) for o in objs if o.kind == "Pod")
    services = tuple(_checked(_service, o) for o in objs if o.kind == "Service")
    nodes = {o.name: _checked(_node, o) for o in objs if o.kind == "Node"}
    for w in workloads:
        if w.node and w.node not in nodes:
            nodes[w.node] = Node(w.node)
    policies = tuple(o for o in objs if o.kind in POLICY_KINDS)
    slices: dict[str, list[SliceEndpoint]] = {}
    for o in objs:
        if o.kind == "EndpointSlice" and o.labels.get(SERVICE_NAME_LABEL):
            ref = f"{o.namespace}/{o.labels[SERVICE_NAME_LABEL]}"
            slices.setdefault(ref, []).extend(_checked(_slice_endpoints, o))
    warnings.extend(_ip_conflicts(objs, workloads))
    warnings.extend(_service_ip_conflicts(objs, services))
    waypoints, others = _waypoints(objs, trust_domain, warnings)
    mesh_maps = [o for o in objs if o.kind == "ConfigMap" and (o.namespace, o.name) == (root_namespace, MESH_CONFIGMAP)]
    mesh = mesh_config(mesh_maps[0]) if mesh_maps else MeshConfig()
    warnings.extend(_waypoint_warnings(objs, workloads, waypoints, others))
    return ClusterConfig(
        namespaces=namespaces,
        workloads=workloads,
        services=services,
        nodes=nodes,
        policy_objects=policies,
        waypoints=waypoints,
        trust_domain=trust_domain,
        root_namespace=root_namespace,
        generation=generation,
        warnings=tuple(warnings),
        extension_providers=mesh.extension_providers,
        slice_endpoints={ref: tuple(v) for ref, v in slices.items()},
        path_normalization=mesh.path_normalization,
    )


GATEWAY_GROUP = "gateway.networking.k8s.io"
MESH_CONFIGMAP = "istio"  # Istio's mesh config: this ConfigMap of the root namespace, key `mesh` (YAML)
MESH_KEY = "mesh"
_DURATION_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "ns": 1e-9}


def parse_duration(value: Any) -> float:
    """A protobuf/Go duration as written in mesh config (`0.5s`, `600ms`, `1m30s`) -> seconds."""
    if not isinstance(value, str) or not value:
        raise ValueError("must be a duration such as 0.5s or 200ms")
    total, rest = 0.0, value.strip()
    while rest:
        i = 0
        while i < len(rest) and (rest[i].isdigit() or rest[i] == "."):
            i += 1
        j = i
        while j < len(rest) and rest[j].isalpha():
            j += 1
        number, unit = rest[:i], rest[i:j]
        if not number or unit not in _DURATION_UNITS:
            raise ValueError(f"{value!r} is not a duration such as 0.5s or 200ms")
        total += float(number) * _DURATION_UNITS[unit]
        rest = rest[j:]
    return total


@dataclass(frozen=True)
class MeshConfig:
    """What the mesh reads of Istio's MeshConfig (the `mesh` YAML): its ext-authz providers and how request paths
    are normalized (`pathNormalization.normalization`)."""

    extension_providers: Mapping[str, ExtAuthzProvider] = dataclasses.field(default_factory=dict)
    path_normalization: str = DEFAULT_PATH_NORMALIZATION


def mesh_config(obj: KubeObject) -> MeshConfig:
    """The mesh config of the `istio` ConfigMap (key `mesh`); what the mesh does not use (tracing, ...) is ignored."""
    data = obj.body.get("data") or {}
    text = data.get(MESH_KEY) if isinstance(data, Mapping) else None
    if text is None:
        return MeshConfig()
    if not isinstance(text, str):
        raise ConfigError("must be the mesh config as a YAML string", source=obj.source, obj=obj.ref, field="data.mesh")
    return parse_mesh(text, obj.source, obj.ref, "data.mesh.")


def read_mesh(path: str | Path) -> MeshConfig:
    """`--mesh-config FILE`: the mesh config YAML itself (what the ConfigMap holds under `mesh`)."""
    try:
        text = decode_config(Path(path).read_bytes(), str(path))
    except OSError as e:
        raise ConfigError(f"cannot read the mesh config: {e.strerror or e}", source=str(path)) from None
    return parse_mesh(text, str(path), "mesh config", "")


def parse_mesh(text: str, source: Source | str, obj: str, prefix: str) -> MeshConfig:
    try:
        mesh = yaml.load(text, Loader=YAML_LOADER) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"is not YAML: {e}", source=source, obj=obj, field=prefix.rstrip(".") or "mesh") from None
    if not isinstance(mesh, Mapping):
        raise ConfigError("must be a mapping (MeshConfig)", source=source, obj=obj, field=prefix.rstrip(".") or "mesh")
    entries = mesh.get("extensionProviders") or []
    if not isinstance(entries, list):
        raise ConfigError("must be a list", source=source, obj=obj, field=f"{prefix}extensionProviders")
    out: dict[str, ExtAuthzProvider] = {}
    for i, entry in enumerate(entries):
        where = f"{prefix}extensionProviders[{i}]"
        if not isinstance(entry, Mapping) or not isinstance(entry.get("name"), str) or not entry["name"]:
            raise ConfigError("needs a `name`", source=source, obj=obj, field=where)
        for key, kind in (("envoyExtAuthzGrpc", "grpc"), ("envoyExtAuthzHttp", "http")):
            if key in entry:
                out[entry["name"]] = _provider(entry["name"], kind, entry[key], source, obj, f"{where}.{key}")
    return MeshConfig(out, _path_normalization(mesh.get("pathNormalization"), source, obj, prefix))


def _path_normalization(value: Any, source: Source | str, obj: str, prefix: str) -> str:
    """`pathNormalization: {normalization: MERGE_SLASHES}`. Unset or DEFAULT: ours (MERGE_SLASHES; Istio's DEFAULT
    is BASE, which lets `//admin` past a DENY on `/admin*`); a value we do not know is refused, never guessed."""
    if value is None:
        return DEFAULT_PATH_NORMALIZATION
    if not isinstance(value, Mapping):
        raise ConfigError(
            "must be a mapping such as {normalization: MERGE_SLASHES}",
            source=source,
            obj=obj,
            field=f"{prefix}pathNormalization",
        )
    mode = value.get("normalization", "DEFAULT")
    if mode is None or mode == "DEFAULT":
        return DEFAULT_PATH_NORMALIZATION
    if mode not in PATH_NORMALIZATIONS:
        raise ConfigError(
            f"{mode!r} is not a normalization; use one of DEFAULT, {', '.join(PATH_NORMALIZATIONS)}",
            source=source,
            obj=obj,
            field=f"{prefix}pathNormalization.normalization",
        )
    return str(mode)


def _provider(name: str, kind: str, spec: Any, source: Source | str, obj: str, where: str) -> ExtAuthzProvider:
    def fail(field: str, message: str) -> ConfigError:
        return ConfigError(message, source=source, obj=obj, field=f"{where}.{field}" if field else where)

    if not isinstance(spec, Mapping):
        raise fail("", "must be a mapping")
    service, port = spec.get("service"), spec.get("port")
    if isinstance(port, str) and port.isascii() and port.isdigit():
        port = int(port)  # protobuf's JSON mapping (how Istio reads MeshConfig) takes a uint32 as a decimal string
    if not isinstance(service, str) or not service:
        raise fail("service", "needs the authorizer's Service host, such as authz.ns.svc.cluster.local")
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise fail("port", "needs the authorizer's port (1-65535)")

    def names(field: str) -> tuple[str, ...]:
        value = spec.get(field) or []
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise fail(field, "must be a list of header names")
        return tuple(v.lower() for v in value)

    timeout = 600.0
    if "timeout" in spec:
        try:
            timeout = parse_duration(spec["timeout"])
        except ValueError as e:
            raise fail("timeout", str(e)) from None
    status = spec.get("statusOnError", "403")
    try:
        status_code = int(status)
    except (TypeError, ValueError):
        status_code = 0
    if not 200 <= status_code <= 599:
        raise fail("statusOnError", "must be an HTTP status code such as 403")
    fail_open = spec.get("failOpen", False)
    if not isinstance(fail_open, bool):
        raise fail("failOpen", "must be true or false")
    prefix = spec.get("pathPrefix", "")
    if not isinstance(prefix, str) or (prefix and not prefix.startswith("/")):
        raise fail("pathPrefix", "must be a path starting with /")
    extra = spec.get("includeAdditionalHeadersInCheck") or {}
    if not isinstance(extra, Mapping) or not all(isinstance(v, str) for v in extra.values()):
        raise fail("includeAdditionalHeadersInCheck", "must map header names to values")
    return ExtAuthzProvider(
        name=name,
        kind=kind,
        service=service,
        port=port,
        timeout=timeout,
        fail_open=fail_open,
        status_on_error=status_code,
        path_prefix=prefix,
        include_request_headers=names("includeRequestHeadersInCheck"),
        include_additional_headers=tuple((str(k).lower(), v) for k, v in extra.items()),
        headers_to_upstream_on_allow=names("headersToUpstreamOnAllow"),
        headers_to_downstream_on_deny=names("headersToDownstreamOnDeny"),
    )




def _waypoints(
    objs: Sequence[KubeObject], trust_domain: str, warnings: list[str]
) -> tuple[dict[str, Waypoint], dict[str, str]]:
    """Gateways of class istio-waypoint -> waypoints by `namespace/name`; other Gateways (an ingress, another
    group's `Gateway` such as Istio's networking one) are not waypoints and are returned with their class so a
    `use-waypoint` label naming one can say why it is not honoured."""
    waypoints: dict[str, Waypoint] = {}
    others: dict[str, str] = {}
    for o in objs:
        if o.kind != "Gateway":
            continue
        group = o.api_version.partition("/")[0]
        cls = o.spec.get("gatewayClassName")
        if group != GATEWAY_GROUP or cls != WAYPOINT_GATEWAY_CLASS:
            others[f"{o.namespace}/{o.name}"] = f"apiVersion {o.api_version}, gatewayClassName {cls!r}"
            continue
        listeners = o.spec.get("listeners")
        if not isinstance(listeners, list) or not any(
            isinstance(x, Mapping) and x.get("port") == HBONE_PORT and x.get("protocol") == "HBONE" for x in listeners
        ):
            warnings.append(
                f"{o.source}: {o.ref}: field spec.listeners: a waypoint listens on port {HBONE_PORT}, protocol HBONE; "
                "add that listener (the waypoint is used as if it were there)"
            )
        waypoints[f"{o.namespace}/{o.name}"] = Waypoint(o.name, o.namespace, trust_domain)
    return waypoints, others


def _waypoint_warnings(
    objs: Sequence[KubeObject],
    workloads: Sequence[Workload],
    waypoints: Mapping[str, Waypoint],
    others: Mapping[str, str],
) -> list[str]:
    """A `use-waypoint` label naming no waypoint Gateway, and a waypoint pod with another identity: said once,
    naming the object, since either means traffic does not go through the L7 proxy the user expects."""
    out = []
    for o in objs:
        if o.kind not in ("Namespace", "Service"):
            continue
        name = o.labels.get(USE_WAYPOINT_LABEL)
        if not name or name == USE_WAYPOINT_NONE:
            continue
        ns = o.name if o.kind == "Namespace" else o.namespace
        if f"{ns}/{name}" in waypoints:
            continue
        other = others.get(f"{ns}/{name}")
        why = (
            f"Gateway {ns}/{name} is not a waypoint ({other}; a waypoint is {GATEWAY_GROUP}/v1 with "
            f"gatewayClassName {WAYPOINT_GATEWAY_CLASS})"
            if other
            else f"no Gateway {ns}/{name} of class {WAYPOINT_GATEWAY_CLASS} is defined"
        )
        out.append(
            f"{o.source}: {o.ref}: label {USE_WAYPOINT_LABEL}={name}: {why}; its traffic does not use a waypoint "
            "(the node proxy enforces the L4 part of policies, L7 rules reduced so they never widen access)"
        )
    sources = {(o.namespace, o.name): o.source for o in objs if o.kind == "Pod"}
    for w in workloads:
        name = w.labels.get(GATEWAY_NAME_LABEL)
        waypoint = waypoints.get(f"{w.namespace}/{name}") if name else None
        if waypoint is not None and not waypoint.runs(w):
            out.append(
                f"{sources.get((w.namespace, w.name))}: Pod {w.ref}: runs waypoint {waypoint.ref} with identity "
                f"{w.identity}, not {waypoint.identity}; set spec.serviceAccountName: {waypoint.name} "
                "(traffic is not sent to this pod)"
            )
    return out


def _ip_conflicts(objs: Sequence[KubeObject], workloads: Sequence[Workload]) -> list[str]:
    """Two pods with one IP would let one stand in for the other; say which, so the user can fix it."""
    by_ip: dict[str, list[Workload]] = {}
    for w in workloads:
        if not w.host_network:
            for ip in w.ips:
                by_ip.setdefault(ip, []).append(w)
    return _claimed_twice(objs, "Pod", "status.podIP", "to and from", by_ip, lambda w: w.uid)


def _service_ip_conflicts(objs: Sequence[KubeObject], services: Sequence[Service]) -> list[str]:
    """Two Services with one cluster IP: neither gets the traffic (the model resolves the IP to no Service)."""
    by_ip: dict[str, list[Service]] = {}
    for s in services:
        for ip in s.cluster_ips:
            by_ip.setdefault(normalize_ip(ip), []).append(s)
    return _claimed_twice(objs, "Service", "spec.clusterIP", "to", by_ip, lambda s: s.ref)


def _claimed_twice(
    objs: Sequence[KubeObject],
    kind: str,
    field: str,
    traffic: str,
    by_ip: Mapping[str, Sequence[Workload | Service]],
    key: Callable[[Any], str],
) -> list[str]:
    """A warning per IP that two objects of `kind` (told apart by `key`) claim, naming both with their sources."""
    sources = {(o.namespace, o.name): o.source for o in objs if o.kind == kind}
    out = []
    for ip, claimants in by_ip.items():
        if len({key(c) for c in claimants}) > 1:
            names = ", ".join(f"{kind} {c.ref} ({sources.get((c.namespace, c.name))})" for c in claimants)
            out.append(f"{field} {ip} is claimed by {names}; traffic {traffic} {ip} is refused until one is changed")
    return out


def load_documents(text: str, file: str = "<string>") -> list[KubeObject]:
    return [to_kube_object(d.body, d.source) for d in _iter_docs(text, file)]


def config_files(paths: Sequence[str | Path]) -> list[Path]:
    """The files `-f` names: a file as given, a directory's .yaml/.yml/.json files (not its subdirectories)."""
    out: list[Path] = []
    for p in paths:
        path = Path(p)
        if path.is_dir():
            try:
                out.extend(sorted(x for x in path.iterdir() if x.suffix in CONFIG_SUFFIXES and x.is_file()))
            except OSError as e:
                raise ConfigError(f"cannot list: {e.strerror}; check the path given with -f", source=str(path)) from e
        else:
            out.append(path)
    return out


def read_file(path: Path) -> list[KubeObject]:
    """One file -> its objects; every failure (unreadable, not UTF-8, not YAML, bad object) is a ConfigError."""
    file = str(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read: {e.strerror}; check the path given with -f", source=file) from e
    large = len(data) >= LARGE_FILE_BYTES
    started = time.monotonic()
    if large:
        log.info(
            "config: parsing large file %s (%.1f MB)",
            file,
            len(data) / 1e6,
            extra={"file": file, "bytes": len(data)},
        )
    text = decode_config(data, file)
    del data
    progress = _Progress(file, len(text))
    objects = [to_kube_object(d.body, d.source) for d in _iter_docs(text, file, progress)]
    if large:
        log.info(
            "config: parsed %s: %d objects in %.1fs",
            file,
            len(objects),
            time.monotonic() - started,
            extra={"file": file, "objects": len(objects)},
        )
    return objects


def read_objects(paths: Sequence[str | Path]) -> list[KubeObject]:
    objects: list[KubeObject] = []
    for f in config_files(paths):
        objects.extend(read_file(f))
    return objects


def _build_indexes(cfg: ClusterConfig) -> None:
    """Compute the snapshot's lazy lookup indexes now, in the loading thread, so the first connection after
    a reload does not build them on the event loop (seconds for 50,000 pods)."""
    for name, attr in vars(type(cfg)).items():
        if isinstance(attr, cached_property):
            getattr(cfg, name)


def read_config(
    paths: Sequence[str | Path],
    *,
    trust_domain: str = DEFAULT_TRUST_DOMAIN,
    root_namespace: str = DEFAULT_ROOT_NAMESPACE,
    generation: int = 0,
) -> ClusterConfig:
    """The whole read, files -> snapshot with its indexes built. Raises only ConfigError (file and reason):
    a watcher that catches it can always keep the last good config. Blocking: run it in a thread."""
    try:
        cfg = build_config(
            read_objects(paths), trust_domain=trust_domain, root_namespace=root_namespace, generation=generation
        )
        _build_indexes(cfg)
    except ConfigError:
        raise
    except RecursionError:
        raise ConfigError("nested too deeply to be a Kubernetes object", source=_names(paths)) from None
    except (ValueError, TypeError, AttributeError, KeyError, UnicodeError) as e:
        # A shape no check above foresaw: a bug of ours, not the user's; it still must not stop a watcher.
        raise ConfigError(
            f"cannot be loaded ({type(e).__name__}: {e}); please report this", source=_names(paths)
        ) from e
    return cfg


def _names(paths: Sequence[str | Path]) -> str:
    return ", ".join(str(p) for p in paths)


load_files = read_config  # the name the CLI commands and tests have used
