"""`haproxy-http`: the C peer doing the waypoint's job. Client -> HAProxy A (TCP) -> mTLS 1.3 -> HAProxy W
(HTTP mode: an ACL on method and path, `http-request deny deny_status 403` otherwise, keep-alive on both
sides) -> mTLS 1.3 -> HAProxy B (TCP) -> the HTTP app. Three processes, one thread each, like the waypoint path's
source proxy, waypoint and destination proxy; the same certificates and TLS settings as `haproxy`.
In the lab: A on node1, W and B on node2, between the plain pods (see `L7Placement`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from bench.paths.base import PathContext, PathKind, PathSetup, require_policy
from bench.paths.haproxy import HaproxyPlacement, haproxy_config_head, haproxy_path, make_haproxy_certs
from bench.processes import ProcessGroup, listening, wait_until
from bench.settings import HAPROXY_A, HAPROXY_B, HAPROXY_W, HTTP_PORT, SERVER_POD, TLS_PORT_OFFSET
from bench.topology.lab import LabTopology, netns_exec

NAME = "haproxy-http"
ENTRY = (
    "haproxy A (TCP) -> mTLS -> haproxy W (HTTP mode, ACL GET */hello, else 403) -> mTLS -> haproxy B, "
    "nbthread 1 each"
)


def l7_frontend(bind: str, tls: str, upstream: str) -> str:
    """HAProxy W: the L7 decision as the waypoint's policy says it (Istio's `*/hello` is a suffix match)."""
    return (
        f"frontend l7\n  mode http\n  bind {bind} {tls}\n  option http-keep-alive\n"
        "  acl allowed_method method GET\n  acl allowed_path path_end /hello\n"
        "  http-request deny deny_status 403 unless allowed_method allowed_path\n  default_backend up\n"
        f"backend up\n  mode http\n  option http-keep-alive\n  http-reuse always\n  server w {upstream}\n"
    )


@dataclass(frozen=True, slots=True)
class L7Placement:
    """Where HAProxy A, W and B listen and run, and where the app is. Local: loopback addresses of their own.
    Lab: A in node1's netns, W and B in node2's (the node the lab puts the waypoint pod on: the one with fewer
    pods), the plain pods as client and app."""

    a: tuple[str, int] = (HAPROXY_A, HTTP_PORT)
    w: tuple[str, int] = (HAPROXY_W, HTTP_PORT + TLS_PORT_OFFSET)
    b: tuple[str, int] = (HAPROXY_B, HTTP_PORT + TLS_PORT_OFFSET)
    app: tuple[str, int] = (SERVER_POD, HTTP_PORT)
    a_prefix: tuple[str, ...] = ()
    w_prefix: tuple[str, ...] = ()
    b_prefix: tuple[str, ...] = ()
    client_prefix: tuple[str, ...] = ()


def lab_placement(lab: LabTopology) -> L7Placement:
    client, server = lab.pair("plain")
    n1, n2 = lab.node("node1"), lab.node("node2")
    tls_port = HTTP_PORT + TLS_PORT_OFFSET
    return L7Placement(
        a=(n1["address"], HTTP_PORT),
        w=(n2["address"], tls_port + 1),
        b=(n2["address"], tls_port),
        app=(server["ips"][0], HTTP_PORT),
        a_prefix=tuple(netns_exec(n1["netns"])),
        w_prefix=tuple(netns_exec(n2["netns"])),
        b_prefix=tuple(netns_exec(n2["netns"])),
        client_prefix=tuple(netns_exec(client["netns"])),
    )


def haproxy_http_configs(certs: Path, maxconn: int, at: L7Placement | None = None) -> dict[str, str]:
    """The three processes' configs (a, w, b) with the certificates in CERTS (`make_haproxy_certs`)."""
    at = at or L7Placement()
    tls = f"ca-file {certs}/ca.pem verify required ssl-min-ver TLSv1.3"
    to_server = f"ssl crt {certs}/client.pem {tls} verifyhost server.bench.local"
    head = haproxy_config_head(maxconn)

    def addr(a: tuple[str, int]) -> str:
        return f"{a[0]}:{a[1]}"

    return {
        "a": head + f"frontend a\n  bind {addr(at.a)}\n  default_backend w\n"
        f"backend w\n  server w {addr(at.w)} {to_server}\n",
        "w": head + l7_frontend(addr(at.w), f"ssl crt {certs}/server.pem {tls}", f"{addr(at.b)} {to_server}"),
        "b": head + f"frontend b\n  bind {addr(at.b)} ssl crt {certs}/server.pem {tls}\n"
        f"  default_backend app\nbackend app\n  server app {addr(at.app)}\n",
    }


def setup_haproxy_http(group: ProcessGroup, maxconn: int, at: L7Placement | None = None) -> PathSetup:
    at = at or L7Placement()
    path, binary = haproxy_path(NAME, ENTRY, HaproxyPlacement(client_prefix=at.client_prefix))
    if not path.available:
        return path
    certs = group.workdir / "haproxy-http-certs"
    certs.mkdir(exist_ok=True)
    make_haproxy_certs(certs)
    configs = haproxy_http_configs(certs, maxconn, at)
    places = {"a": (at.a, at.a_prefix), "w": (at.w, at.w_prefix), "b": (at.b, at.b_prefix)}
    for side, cfg in configs.items():
        cfg_path = group.workdir / f"haproxy-http-{side}.cfg"
        cfg_path.write_text(cfg)
        prefix = list(places[side][1])
        path.proxies[side] = group.start(f"haproxy-http-{side}", [*prefix, binary, "-db", "-f", str(cfg_path)])
    for side in ("b", "w", "a"):
        (host, port), prefix = places[side]
        wait_until(
            lambda h=host, p=port, x=list(prefix): listening(h, p, x),  # type: ignore[misc]
            10,
            f"haproxy-http {side}",
            path.proxies[side],
        )
    path.http_target = path.h2load_target = f"{at.a[0]}:{at.a[1]}"
    path.h2c = True  # W finds the h2 preface itself (no ALPN inside A's TLS): h2c in, HTTP/1.1 to the app
    path.note = "HTTP figures only; h2c: prior knowledge from the client, HTTP/1.1 from W to the app"
    return require_policy(path)


def _build(ctx: PathContext) -> PathSetup:
    if isinstance(ctx.topology, LabTopology):
        return setup_haproxy_http(ctx.group, ctx.maxconn, lab_placement(ctx.topology))
    return setup_haproxy_http(ctx.group, ctx.maxconn)


HAPROXY_HTTP = PathKind(NAME, _build)
