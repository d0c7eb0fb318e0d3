"""`haproxy-tcp`: one HAProxy relaying plain TCP in and out (no TLS) to the app. Not a peer but a reference:
what the cheapest relay written in C costs on this machine (compared with `direct` only). It listens on
port + 20000 beside HAProxy A (in node1's netns in the lab)."""

from __future__ import annotations

from bench.paths.base import PathContext, PathKind, PathSetup
from bench.paths.haproxy import HaproxyPlacement, haproxy_config_head, haproxy_path, placement
from bench.processes import ProcessGroup, listening, wait_until
from bench.settings import ECHO_PORT, IPERF_PORT, RELAY_PORT_OFFSET
from bench.topology.lab import LabTopology

LOCAL_ENTRY = "one haproxy, plain TCP in and out (no TLS), nbthread 1: the floor of a relay in C (not a peer)"
LAB_ENTRY = "plain client pod -> haproxy on node1, plain TCP, no TLS -> plain pod on node2 (not a peer)"


def setup_haproxy_tcp(group: ProcessGroup, maxconn: int, at: HaproxyPlacement, entry: str) -> PathSetup:
    """One haproxy relaying plain TCP to the app: no TLS, one hop. The machine's price of a relay in C."""
    path, binary = haproxy_path("haproxy-tcp", entry, at)
    if not path.available:
        return path
    cfg = haproxy_config_head(maxconn)
    for port in (IPERF_PORT, ECHO_PORT):
        cfg += (
            f"frontend f{port}\n  bind {at.a_addr}:{port + RELAY_PORT_OFFSET}\n  maxconn {maxconn}\n"
            f"  default_backend b{port}\nbackend b{port}\n  server app {at.app_addr}:{port}\n"
        )
    cfg_path = group.workdir / "haproxy-tcp.cfg"
    cfg_path.write_text(cfg)
    path.proxies["relay"] = group.start("haproxy-tcp", [*at.a_prefix, binary, "-db", "-f", str(cfg_path)])
    echo_port = ECHO_PORT + RELAY_PORT_OFFSET
    wait_until(lambda: listening(at.a_addr, echo_port, list(at.a_prefix)), 10, "haproxy-tcp", path.proxies["relay"])
    path.echo_target = f"{at.a_addr}:{echo_port}"
    path.iperf_host, path.iperf_port = at.a_addr, IPERF_PORT + RELAY_PORT_OFFSET
    return path


def _build(ctx: PathContext) -> PathSetup:
    entry = LAB_ENTRY if isinstance(ctx.topology, LabTopology) else LOCAL_ENTRY
    return setup_haproxy_tcp(ctx.group, ctx.maxconn, placement(ctx), entry)


HAPROXY_TCP = PathKind("haproxy-tcp", _build)
