"""`haproxy-http`: the C peer doing the waypoint's job. Client -> HAProxy A (TCP) -> mTLS 1.3 -> HAProxy W
(HTTP mode: an ACL on method and path, `http-request deny deny_status 403` otherwise, keep-alive on both
sides) -> mTLS 1.3 -> HAProxy B (TCP) -> the HTTP app. Three processes, one thread each, like the waypoint path's
source proxy, waypoint and destination proxy; the same certificates and TLS settings as `haproxy`.
Local topology only (measured side by side with the waypoint, which the lab does not deploy yet).
"""

from __future__ import annotations

from pathlib import Path

from bench.paths.base import PathContext, PathKind, PathSetup, require_policy, unavailable
from bench.paths.haproxy import HaproxyPlacement, haproxy_config_head, haproxy_path, make_haproxy_certs
from bench.processes import ProcessGroup, listening, wait_until
from bench.settings import HAPROXY_A, HAPROXY_B, HAPROXY_W, HTTP_PORT, SERVER_POD, TLS_PORT_OFFSET
from bench.topology.lab import LabTopology

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


def haproxy_http_configs(certs: Path, maxconn: int) -> dict[str, str]:
    """The three processes' configs (a, w, b) with the certificates in CERTS (`make_haproxy_certs`)."""
    tls = f"ca-file {certs}/ca.pem verify required ssl-min-ver TLSv1.3"
    to_server = f"ssl crt {certs}/client.pem {tls} verifyhost server.bench.local"
    tls_port = HTTP_PORT + TLS_PORT_OFFSET
    head = haproxy_config_head(maxconn)
    upstream = f"{HAPROXY_B}:{tls_port} {to_server}"
    return {
        "a": head + f"frontend a\n  bind {HAPROXY_A}:{HTTP_PORT}\n  default_backend w\n"
        f"backend w\n  server w {HAPROXY_W}:{tls_port} {to_server}\n",
        "w": head + l7_frontend(f"{HAPROXY_W}:{tls_port}", f"ssl crt {certs}/server.pem {tls}", upstream),
        "b": head + f"frontend b\n  bind {HAPROXY_B}:{tls_port} ssl crt {certs}/server.pem {tls}\n"
        f"  default_backend app\nbackend app\n  server app {SERVER_POD}:{HTTP_PORT}\n",
    }


def setup_haproxy_http(group: ProcessGroup, maxconn: int) -> PathSetup:
    at = HaproxyPlacement()
    path, binary = haproxy_path(NAME, ENTRY, at)
    if not path.available:
        return path
    certs = group.workdir / "haproxy-http-certs"
    certs.mkdir(exist_ok=True)
    make_haproxy_certs(certs)
    configs = haproxy_http_configs(certs, maxconn)
    tls_port = HTTP_PORT + TLS_PORT_OFFSET
    for side, cfg in configs.items():
        cfg_path = group.workdir / f"haproxy-http-{side}.cfg"
        cfg_path.write_text(cfg)
        path.proxies[side] = group.start(f"haproxy-http-{side}", [binary, "-db", "-f", str(cfg_path)])
    for side, addr, port in (("b", HAPROXY_B, tls_port), ("w", HAPROXY_W, tls_port), ("a", HAPROXY_A, HTTP_PORT)):
        wait_until(lambda a=addr, p=port: listening(a, p), 10, f"haproxy-http {side}", path.proxies[side])  # type: ignore[misc]
    path.http_target = f"{HAPROXY_A}:{HTTP_PORT}"
    path.note = "HTTP/1.1 figures only; h2c not measured (the waypoint has no h2c yet)"
    checked = require_policy(path)
    if not checked.available:
        path.stop()
    return checked


def _build(ctx: PathContext) -> PathSetup:
    if isinstance(ctx.topology, LabTopology):
        return unavailable(NAME, "needs --topology local (measured beside the waypoint, which the lab does not deploy)")
    return setup_haproxy_http(ctx.group, ctx.maxconn)


HAPROXY_HTTP = PathKind(NAME, _build)
