"""The registry of measured paths, in the table's column order: a new path is a new module and a line here."""

from __future__ import annotations

from bench.paths.base import PathContext, PathKind, PathSetup
from bench.paths.direct import DIRECT, DIRECT_SAME_NODE
from bench.paths.haproxy import HAPROXY
from bench.paths.haproxy_http import HAPROXY_HTTP
from bench.paths.haproxy_tcp import HAPROXY_TCP
from bench.paths.waypoint import WAYPOINT
from bench.paths.ztunnel import ZTUNNEL, ZTUNNEL_SAME_NODE
from bench.paths.ztunnel_ebpf import ZTUNNEL_EBPF, ZTUNNEL_EBPF_SAME_NODE

REGISTRY: tuple[PathKind, ...] = (
    DIRECT,
    HAPROXY,
    HAPROXY_TCP,
    ZTUNNEL,
    ZTUNNEL_EBPF,
    WAYPOINT,
    HAPROXY_HTTP,
    DIRECT_SAME_NODE,
    ZTUNNEL_SAME_NODE,
    ZTUNNEL_EBPF_SAME_NODE,
)
ALL_PATHS = tuple(k.name for k in REGISTRY)


def build(name: str, ctx: PathContext) -> PathSetup:
    """Set up the path NAME on CTX's topology (may raise: the caller records a failed setup)."""
    kind = next(k for k in REGISTRY if k.name == name)
    return kind.build(ctx)
