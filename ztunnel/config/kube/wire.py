"""The Kubernetes API's list+watch wire format, sans-IO: chunked bodies, watch event lines, and the objects
reduced to the fields the mesh model reads.

A watch is one long HTTP/1.1 response with `Transfer-Encoding: chunked` whose payload is one JSON event per
line (`{"type": "ADDED", "object": {...}}`). Everything here is bounded: a chunk-size line, an event line
(`MAX_EVENT_BYTES`, larger than etcd lets any object be), so a confused or hostile API endpoint costs a bounded
amount of memory, and an event over the bound is refused and reported, not buffered.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

# etcd refuses values over 1.5 MiB by default, so no real object is larger; a watch line carries one object.
MAX_EVENT_BYTES = 2 * 1024 * 1024
MAX_CHUNK_LINE = 1024  # "<hex size>[;extensions]\r\n"
# Plain hex only: int(x, 16) would also take "0x10", "+10", "1_0", which another reader frames differently.
_CHUNK_SIZE = re.compile(rb"[0-9A-Fa-f]{1,16}")
EVENT_TYPES = frozenset({"ADDED", "MODIFIED", "DELETED", "BOOKMARK", "ERROR"})
# Annotations nothing in the mesh reads but that can be as large as the object itself.
DROPPED_ANNOTATIONS = frozenset({"kubectl.kubernetes.io/last-applied-configuration"})


class KubeWireError(ValueError):
    """The API sent bytes that are not what the protocol allows; the message says what."""


class ChunkedDecoder:
    """`Transfer-Encoding: chunked` -> payload bytes, incrementally. `done` once the last chunk is read."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._remaining = -1  # bytes left in the current chunk; -1: expecting a size line; -2: its CRLF
        self.done = False

    def feed(self, data: bytes) -> bytes:
        self._buf += data
        out = bytearray()
        while not self.done:
            if self._remaining == -1:
                end = self._buf.find(b"\n")
                if end < 0:
                    if len(self._buf) > MAX_CHUNK_LINE:
                        raise KubeWireError("chunk size line too long")
                    break
                line = bytes(self._buf[:end]).rstrip(b"\r").partition(b";")[0].strip()
                del self._buf[: end + 1]
                if _CHUNK_SIZE.fullmatch(line) is None:
                    raise KubeWireError(f"bad chunk size {line[:20]!r}")
                size = int(line, 16)
                if size == 0:
                    self.done = True  # trailers, if any, are not read: the connection is closed after this
                    break
                self._remaining = size
            elif self._remaining == -2:
                if len(self._buf) < 2:
                    break
                if self._buf[:2] != b"\r\n":
                    raise KubeWireError("chunk not followed by CRLF")
                del self._buf[:2]
                self._remaining = -1
            else:
                take = min(self._remaining, len(self._buf))
                if take == 0:
                    break
                out += self._buf[:take]
                del self._buf[:take]
                self._remaining -= take
                if self._remaining == 0:
                    self._remaining = -2
        return bytes(out)


@dataclass(frozen=True, slots=True)
class Oversized:
    """An event line longer than the bound: refused, its bytes skipped up to the next newline."""

    size: int  # how many bytes were seen before the line was dropped (at least the bound)


class LineSplitter:
    """Watch payload -> event lines, each at most `max_line` bytes; a longer one becomes one `Oversized`."""

    def __init__(self, max_line: int = MAX_EVENT_BYTES) -> None:
        self.max_line = max_line
        self._buf = bytearray()
        self._skipping = 0  # > 0: inside an oversized line, this many bytes dropped so far

    def feed(self, data: bytes) -> list[bytes | Oversized]:
        out: list[bytes | Oversized] = []
        start = 0
        while True:
            end = data.find(b"\n", start)
            if end < 0:
                break
            if self._skipping:
                out.append(Oversized(self._skipping + end - start))
                self._skipping = 0
            else:
                self._buf += data[start:end]
                if len(self._buf) > self.max_line:
                    out.append(Oversized(len(self._buf)))
                elif self._buf.strip():
                    out.append(bytes(self._buf))
                self._buf.clear()
            start = end + 1
        rest = len(data) - start
        if self._skipping:
            self._skipping += rest
        elif len(self._buf) + rest > self.max_line:
            self._skipping = len(self._buf) + rest
            self._buf.clear()
        else:
            self._buf += data[start:]
        return out


@dataclass(frozen=True, slots=True)
class WatchEvent:
    type: str  # ADDED, MODIFIED, DELETED, BOOKMARK, ERROR
    object: dict[str, Any]

    @property
    def resource_version(self) -> str:
        return str((self.object.get("metadata") or {}).get("resourceVersion") or "")


def decode_event(line: bytes) -> WatchEvent:
    """One watch line -> its event; KubeWireError for anything that is not one."""
    try:
        value = json.loads(line)
    except (ValueError, RecursionError) as e:
        raise KubeWireError(f"not JSON ({e})") from None
    if not isinstance(value, dict):
        raise KubeWireError("not a JSON object")
    kind, obj = value.get("type"), value.get("object")
    if kind not in EVENT_TYPES:
        raise KubeWireError(f"unknown event type {str(kind)[:40]!r}")
    if not isinstance(obj, dict):
        raise KubeWireError(f"{kind} event without an object")
    if kind != "ERROR" and not isinstance(obj.get("metadata"), dict):
        raise KubeWireError(f"{kind} event object without metadata")
    return WatchEvent(kind, obj)


def status_code(status: Mapping[str, Any]) -> int:
    """The `code` of a `Status` object (an ERROR event's object, or an error response's body); 0 if none."""
    code = status.get("code")
    return code if isinstance(code, int) and not isinstance(code, bool) else 0


def status_text(status: Mapping[str, Any]) -> str:
    reason, message = status.get("reason"), status.get("message")
    return ": ".join(str(x) for x in (reason, message) if x) or "no reason given"


# ---- keeping only what the model reads ------------------------------------------------------------------


def _metadata(meta: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in ("name", "namespace", "uid", "resourceVersion", "creationTimestamp", "labels"):
        if key in meta:
            out[key] = meta[key]
    annotations = meta.get("annotations")
    if isinstance(annotations, Mapping):
        kept = {k: v for k, v in annotations.items() if k not in DROPPED_ANNOTATIONS}
        if kept:
            out["annotations"] = kept
    return out


def _pick(value: Any, keys: tuple[str, ...]) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        return {}
    return {k: value[k] for k in keys if k in value}


_PORT_KEYS = ("name", "containerPort", "protocol")


def _pod(obj: Mapping[str, Any]) -> dict[str, Any]:
    spec = _pick(obj.get("spec"), ("nodeName", "serviceAccountName", "serviceAccount", "hostNetwork"))
    containers = (obj.get("spec") or {}).get("containers") if isinstance(obj.get("spec"), Mapping) else None
    if isinstance(containers, list):
        # Only named ports matter (a Service's targetPort by name); everything else of a container is dropped.
        spec["containers"] = [
            {"ports": [_pick(p, _PORT_KEYS) for p in c.get("ports") or [] if isinstance(p, Mapping)]}
            if isinstance(c, Mapping)
            else c
            for c in containers
        ]
    status = _pick(obj.get("status"), ("podIP", "podIPs"))
    raw_status = obj.get("status")
    conditions = raw_status.get("conditions") if isinstance(raw_status, Mapping) else None
    if isinstance(conditions, list):
        status["conditions"] = [
            _pick(c, ("type", "status")) for c in conditions if isinstance(c, Mapping) and c.get("type") == "Ready"
        ]
    return {"spec": spec, "status": status}


def _service(obj: Mapping[str, Any]) -> dict[str, Any]:
    return {"spec": _pick(obj.get("spec"), ("clusterIP", "clusterIPs", "ports", "selector", "type"))}


def _node(obj: Mapping[str, Any]) -> dict[str, Any]:
    return {"status": _pick(obj.get("status"), ("addresses",))}


def _endpoint_slice(obj: Mapping[str, Any]) -> dict[str, Any]:
    endpoints = obj.get("endpoints")
    kept = [
        {
            **_pick(e, ("addresses", "nodeName")),
            "conditions": _pick(e.get("conditions"), ("ready",)),
            "targetRef": _pick(e.get("targetRef"), ("kind", "name", "namespace", "uid")),
        }
        for e in (endpoints if isinstance(endpoints, list) else [])
        if isinstance(e, Mapping)
    ]
    return {"addressType": obj.get("addressType"), "endpoints": kept, "ports": obj.get("ports")}


def _gateway(obj: Mapping[str, Any]) -> dict[str, Any]:
    spec = obj.get("spec")
    listeners = spec.get("listeners") if isinstance(spec, Mapping) else None
    out = _pick(spec, ("gatewayClassName",))
    if isinstance(listeners, list):
        out["listeners"] = [_pick(x, ("name", "port", "protocol")) for x in listeners]
    elif listeners is not None:
        out["listeners"] = listeners
    return {"spec": out}


def _config_map(obj: Mapping[str, Any]) -> dict[str, Any]:
    return {"data": _pick(obj.get("data"), ("mesh",))}


def _whole_spec(obj: Mapping[str, Any]) -> dict[str, Any]:
    """Policies: the spec is what they are (status, if any, is not)."""
    return {"spec": obj["spec"]} if "spec" in obj else {}


_BODY: Mapping[str, Callable[[Mapping[str, Any]], dict[str, Any]]] = {
    "Pod": _pod,
    "Service": _service,
    "Node": _node,
    "EndpointSlice": _endpoint_slice,
    "Gateway": _gateway,
    "ConfigMap": _config_map,
    "Namespace": lambda _obj: {},
}


def strip_object(obj: Mapping[str, Any], api_version: str, kind: str) -> dict[str, Any]:
    """An API object -> only the fields the model uses, with apiVersion and kind set (a list's items lack them).

    What is dropped (managedFields, ownerReferences, most of status, container specs, last-applied annotations)
    is most of a Pod's bytes: this is what keeps a large cluster's cache small.
    """
    meta = obj.get("metadata")
    body = _BODY.get(kind, _whole_spec)(obj)
    metadata = _metadata(meta if isinstance(meta, Mapping) else {})
    return {"apiVersion": api_version, "kind": kind, "metadata": metadata, **body}
