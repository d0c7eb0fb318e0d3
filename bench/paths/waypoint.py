"""`waypoint`: listed as not available until `ztunnel waypoint` exists and is wired into the benchmark."""

from __future__ import annotations

from bench.paths.base import PathContext, PathKind, PathSetup, unavailable
from bench.tools import ztunnel_help


def _build(_ctx: PathContext) -> PathSetup:
    exists = ztunnel_help("waypoint") is not None
    why = "the waypoint is not wired into the benchmark yet" if exists else "`ztunnel waypoint` does not exist yet"
    return unavailable("waypoint", why)


WAYPOINT = PathKind("waypoint", _build)
