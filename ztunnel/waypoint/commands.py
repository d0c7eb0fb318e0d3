"""`ztunnel waypoint`: run one waypoint (Istio ambient's L7 proxy) by hand, in local mode.

The waypoint is a pod of the config: labelled `gateway.networking.k8s.io/gateway-name: <name>` in the Gateway's
namespace, service account `<name>` (as Istio's controller deploys it). It listens on `<pod ip>:15008` with that
pod's SVID, and re-reads the config files when they change, as the node proxy does.

Telemetry: Istio's HTTP metrics (reporter `waypoint`; and its TCP metrics for relayed TCP, open connections' bytes
flushed every --byte-flush-interval) on --metrics-addr and the admin server on --admin-addr, both
opt-in like --readiness-addr (the node proxy's defaults, 15020 and 15000, would collide on one host); one access
log line per request on stderr (--access-log, default the --log-format). A CRL change applies to new handshakes
and, as at the node proxy, closes the open HBONE connections (client and upstream side) of a revoked peer.

Timeouts (server.Timeouts, Envoy's as reference): --idle-timeout (1h) closes a client connection with no request
in flight, --request-headers-timeout (10s) one whose request head dribbles in, --response-timeout (off, as Istio's
route timeout) answers 504 for an upstream that does not answer. Each takes a duration up to 24h, 0 for off.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import signal
import socket
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ztunnel.config.kube.source import add_source_arguments
from ztunnel.errors import ZtunnelError
from ztunnel.net.listen import listening_socket
from ztunnel.ports import HBONE_PORT

if TYPE_CHECKING:
    from ztunnel.config.model import ClusterConfig, Workload
    from ztunnel.hbone.client import HbonePool
    from ztunnel.hbone.server import HboneServer
    from ztunnel.identity.revocation import RevocationSet
    from ztunnel.net.http import HttpServer
    from ztunnel.waypoint.server import Timeouts, WaypointServer
    from ztunnel.waypoint.telemetry import RequestTelemetry

log = logging.getLogger("ztunnel.waypoint")

GATEWAY_NAME_LABEL = "gateway.networking.k8s.io/gateway-name"
MAX_TIMEOUT = 24 * 3600.0  # seconds: the bound of --idle-timeout, --request-headers-timeout, --response-timeout
MAX_TIMEOUT_TEXT = "24h"


class WaypointCommandError(ZtunnelError):
    pass


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "waypoint",
        help="run a waypoint (L7 proxy: one policy decision per HTTP request)",
        description=(
            f"Run the waypoint --name in --namespace: HBONE on <its pod IP>:{HBONE_PORT}, HTTP/1.1 and h2c requests "
            "inside the tunnels decided one by one (RequestAuthentication, AuthorizationPolicy), allowed ones "
            "forwarded over HBONE to a ready endpoint of the Service the client dialled; TCP (a port declared so, "
            "or first bytes that are not HTTP) gets the L4 check and is relayed."
        ),
    )
    p.add_argument("--name", required=True, help="the waypoint (Gateway) name; also its service account")
    p.add_argument("--namespace", required=True, help="the waypoint's namespace")
    p.add_argument("-f", "--filename", dest="files", action="append", help="YAML file or directory of objects")
    add_source_arguments(p)
    ca = p.add_mutually_exclusive_group(required=True)
    ca.add_argument("--ca-dir", help="sign certificates in-process with this CA directory (local mode)")
    ca.add_argument("--ca", help="HOST:PORT of a CA server (`ztunnel ca serve`)")
    p.add_argument("--ca-root", help="the CA server's root certificate (PEM), with --ca")
    p.add_argument(
        "--token-file",
        help="file holding the token the CA server authenticates, with --ca: the waypoint node's token (the lab's "
        "CA, -f), or with --source kubernetes the waypoint's own projected service-account token",
    )
    p.add_argument("--cert-ttl", default="24h", help="requested SVID validity, e.g. 24h, 30m (default 24h)")
    p.add_argument("--connect-timeout", default="5s", help="timeout for upstream tunnel setup (default 5s)")
    p.add_argument(
        "--readiness-addr",
        default=None,
        help="HOST:PORT for /healthz/ready (200 once listening with a certificate, 503 while draining); default: "
        "none (the node proxy's default 127.0.0.1:15021 would collide on one host)",
    )
    p.add_argument(
        "--metrics-addr",
        default=None,
        help="HOST:PORT for /metrics and /stats/prometheus (Istio's istio_requests_total, ... reporter=waypoint); "
        "default: none (the node proxy's 127.0.0.1:15020 would collide on one host)",
    )
    p.add_argument(
        "--admin-addr",
        default=None,
        help="HOST:PORT for the admin server (/config_dump, POST /quitquitquit, /logging); default: none (the node "
        "proxy's 127.0.0.1:15000 would collide on one host)",
    )
    p.add_argument(
        "--access-log",
        choices=["text", "json", "off"],
        help="per-request access log format (default: the --log-format)",
    )
    p.add_argument(
        "--drain-timeout",
        default="10s",
        help="on SIGTERM/SIGINT: how long open client connections may finish (no new ones) (default 10s)",
    )
    p.add_argument(
        "--idle-timeout",
        default="1h",
        help="close a client connection with no request in flight (h2c: no open stream; GOAWAY first) after this "
        f"long; 0 turns it off, at most {MAX_TIMEOUT_TEXT} (default 1h, as Envoy's HTTP idle_timeout)",
    )
    p.add_argument(
        "--request-headers-timeout",
        default="10s",
        help="a request head must arrive whole within this long of its first byte, or the connection is closed "
        "(HTTP/1.1: 408 first; h2c: GOAWAY first): a client that sends it a byte at a time holds nothing for long; "
        f"0 turns it off, at most {MAX_TIMEOUT_TEXT} (default 10s; Envoy's is off)",
    )
    p.add_argument(
        "--response-timeout",
        default="0",
        help="answer 504 when the upstream's response head has not arrived this long after the request was "
        f"forwarded (the upstream stream is cut); at most {MAX_TIMEOUT_TEXT} (default 0: off, as Istio sets no route "
        "timeout)",
    )
    p.add_argument(
        "--byte-flush-interval",
        default="5s",
        help="how often open TCP connections' bytes are added to istio_tcp_*_bytes_total, with --metrics-addr "
        "(default 5s, as the node proxy)",
    )
    p.add_argument("--trust-domain", default="cluster.local", help="SPIFFE trust domain (default cluster.local)")
    p.add_argument(
        "--mesh-config",
        metavar="FILE",
        help="mesh config YAML (extensionProviders for CUSTOM policies, pathNormalization); replaces the istio "
        "ConfigMap's `mesh`",
    )
    p.add_argument(
        "--headers-with-underscores",
        choices=("ALLOW", "REJECT_REQUEST", "DROP_HEADER"),
        default="ALLOW",
        help="a request header whose name holds `_` (which CGI-style apps read as `-`, past a policy on the `-` "
        "name): passed on (ALLOW, Envoy's and Istio's default), answered 400 (REJECT_REQUEST) or dropped "
        "(DROP_HEADER)",
    )
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    import uvloop

    from ztunnel.net.http import parse_host_port

    for flag in ("readiness_addr", "metrics_addr", "admin_addr"):
        if getattr(args, flag) is not None:
            try:
                setattr(args, flag, parse_host_port(getattr(args, flag)))
            except ValueError as e:
                raise WaypointCommandError(f"--{flag.replace('_', '-')}: {e}") from None
    args.timeouts = timeouts_from_args(args)
    if args.access_log is None:
        args.access_log = getattr(args, "log_format", "text")
    if args.ca and not (args.ca_root and args.token_file):
        raise WaypointCommandError(
            "--ca needs --ca-root (the CA's root certificate) and --token-file (the node's or the waypoint's token)"
        )
    return uvloop.run(run_waypoint(args))


def timeout_seconds(flag: str, text: str) -> float | None:
    """A timeout flag's value in seconds; None for 0 (off). A WaypointCommandError naming the flag otherwise."""
    from ztunnel.identity.duration import DurationError, parse_duration

    value = text.strip()
    if value in ("0", "0s", "0ms", "off"):
        return None
    try:
        seconds = parse_duration(value).total_seconds()
    except DurationError as e:
        raise WaypointCommandError(f"{flag}: {e} (0 turns it off)") from None
    if seconds > MAX_TIMEOUT:
        raise WaypointCommandError(f"{flag}: {text!r} is over {MAX_TIMEOUT_TEXT}; write at most {MAX_TIMEOUT_TEXT}")
    return seconds


def timeouts_from_args(args: argparse.Namespace) -> Timeouts:
    from ztunnel.waypoint.server import Timeouts

    return Timeouts(
        idle=timeout_seconds("--idle-timeout", getattr(args, "idle_timeout", "1h")),
        request_headers=timeout_seconds("--request-headers-timeout", getattr(args, "request_headers_timeout", "10s")),
        response=timeout_seconds("--response-timeout", getattr(args, "response_timeout", "0")),
    )


def find_waypoint_pod(config: ClusterConfig, name: str, namespace: str) -> Workload:
    """The waypoint's pod in the config, or a WaypointCommandError saying what is missing."""
    found = [
        w
        for w in config.workloads
        if w.namespace == namespace and w.labels.get(GATEWAY_NAME_LABEL) == name and w.service_account == name
    ]
    if not found:
        raise WaypointCommandError(
            f"no pod for waypoint {namespace}/{name} in the config: expected a Pod in namespace {namespace!r} "
            f"labelled {GATEWAY_NAME_LABEL}: {name} with serviceAccountName {name!r} and a podIP; add one to the "
            "-f files (or check --name/--namespace)"
        )
    with_ip = [w for w in found if w.ips]
    if not with_ip:
        raise WaypointCommandError(f"the pod {found[0].ref} of waypoint {namespace}/{name} has no podIP (status.podIP)")
    return with_ip[0]


def _listening_socket(host: str, port: int) -> socket.socket:
    try:
        return listening_socket(host, port)
    except OSError as e:
        raise WaypointCommandError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


async def run_waypoint(args: argparse.Namespace) -> int:
    from ztunnel.config.kube.client import KubeConfigError
    from ztunnel.config.kube.source import open_source
    from ztunnel.config.loader import ConfigError, read_mesh
    from ztunnel.hbone.client import HbonePool
    from ztunnel.hbone.server import TLS_HANDSHAKE_TIMEOUT, HboneServer
    from ztunnel.hbone.tls_cache import TlsContexts
    from ztunnel.identity.duration import parse_duration
    from ztunnel.identity.manager import CertificateManager
    from ztunnel.identity.revocation import LOADED, RevocationUpdate
    from ztunnel.identity.spiffe import SpiffeId
    from ztunnel.policy.engine import PolicyEngine
    from ztunnel.waypoint.jwks import ClusterNames, JwksFetcher, JwksRefresher
    from ztunnel.waypoint.jwt import JwtRule, KeyStore, remote_timeouts
    from ztunnel.waypoint.server import RequestDecider, WaypointServer, WaypointState

    loop = asyncio.get_running_loop()
    try:
        source = open_source(args, trust_domain=args.trust_domain)
        config = source.load()
    except KubeConfigError as e:
        raise WaypointCommandError(str(e)) from None
    except ConfigError as e:
        raise WaypointCommandError(f"cannot load the config: {e}") from None
    try:
        mesh = read_mesh(args.mesh_config) if args.mesh_config else None
    except ConfigError as e:
        raise WaypointCommandError(f"cannot load the mesh config: {e}") from None
    pod = find_waypoint_pod(config, args.name, args.namespace)
    identity = SpiffeId.parse(pod.identity)
    ttl = parse_duration(args.cert_ttl)
    drain_timeout = parse_duration(args.drain_timeout).total_seconds()
    byte_flush = _flag_duration("--byte-flush-interval", getattr(args, "byte_flush_interval", "5s"))
    if args.ca_dir:
        certs = CertificateManager.in_process(args.ca_dir, node=pod.node, config=source, ttl=ttl)
    else:
        try:
            root = Path(args.ca_root).read_bytes()
            Path(args.token_file).read_text()  # unreadable at start is a user error; re-read per call (rotation)
        except OSError as e:
            raise WaypointCommandError(f"cannot read the CA root or token file: {e}") from None
        certs = CertificateManager.remote(args.ca, root, Path(args.token_file), ttl=ttl)
    telemetry = _telemetry(args)
    metrics = telemetry.metrics
    jwks_names = ClusterNames()  # a jwksUri by Service name: the waypoint pod has no mesh DNS
    refresher = JwksRefresher(
        (),
        fetch=JwksFetcher(timeout=None, names=jwks_names).fetch,
        on_fetch=metrics.jwks_fetch if metrics is not None else None,
    )
    keys = KeyStore(refresher.keys)

    def snapshot(cfg: ClusterConfig, previous: PolicyEngine | None) -> WaypointState:
        if mesh is not None:
            cfg = dataclasses.replace(
                cfg, extension_providers=mesh.extension_providers, path_normalization=mesh.path_normalization
            )
        engine = PolicyEngine.from_config(cfg, previous, waypoint=f"{args.namespace}/{args.name}")  # Gateway targetRefs
        rules = [JwtRule.from_policy(r) for ra in engine.request_authentications for r in ra.jwt_rules]
        named = [(ra.namespace, r.jwks_uri) for ra in engine.request_authentications for r in ra.jwt_rules]
        jwks_names.update(cfg, ((ns, uri) for ns, uri in named if uri))  # before track: new URIs are fetched at once
        refresher.track(remote_timeouts(rules))  # new jwksUris due at once, each with its rules' `timeout`
        return WaypointState(cfg, RequestDecider(engine, keys))

    await certs.start()
    contexts = TlsContexts(certs)
    pool = HbonePool(contexts, connect_timeout=parse_duration(args.connect_timeout).total_seconds())
    timeouts = getattr(args, "timeouts", None) or timeouts_from_args(args)
    waypoint = WaypointServer(identity, pool, snapshot(config, None), telemetry=telemetry, timeouts=timeouts)
    waypoint.headers_with_underscores = getattr(args, "headers_with_underscores", "ALLOW")
    server = HboneServer(contexts, waypoint.serve_tunnel)

    async def on_config(cfg: ClusterConfig) -> None:
        waypoint.state = snapshot(cfg, waypoint.state.decider.engine)

    refreshes: set[asyncio.Task[None]] = set()

    def refresh() -> None:
        """A new certificate or CRL: rebuild the listener's and the pool's contexts (new handshakes use it)."""
        task = loop.create_task(contexts.refresh(identity))
        refreshes.add(task)
        task.add_done_callback(refreshes.discard)

    def on_rotation(rotated: object, cert: object) -> None:
        if rotated == identity:
            refresh()

    async def enforce(crl: RevocationSet) -> None:
        """New contexts first (new handshakes verify against the CRL), then the open connections of revoked peers;
        swept again once a handshake begun on an old context has finished."""
        await contexts.refresh(identity)
        if not crl:
            return
        close_revoked(crl, server, pool)
        await asyncio.sleep(max(TLS_HANDSHAKE_TIMEOUT, pool.connect_timeout) + 1.0)
        close_revoked(crl, server, pool)

    def on_revocation(update: RevocationUpdate) -> None:
        if update.result == LOADED:
            task = loop.create_task(enforce(update.current))
            refreshes.add(task)
            task.add_done_callback(refreshes.discard)

    certs.subscribe(on_rotation)
    certs.subscribe_revocation(on_revocation)
    source.subscribe(on_config)
    stop = asyncio.Event()
    listener = None
    draining = False

    def ready() -> tuple[bool, str]:
        if draining:
            return False, "draining"
        return listener is not None, "not listening yet"

    readiness = None
    if args.readiness_addr is not None:
        from ztunnel.telemetry.http_server import ReadinessServer

        host, port = args.readiness_addr
        readiness = ReadinessServer(host, port, ready)
    servers = _control_servers(args, waypoint, stop)
    started = []
    try:
        if readiness is not None:
            try:
                await readiness.start()
            except OSError as e:
                raise WaypointCommandError(f"cannot listen for readiness on {args.readiness_addr}: {e}") from None
        for control in servers:
            try:
                await control.start()
            except OSError as e:
                raise WaypointCommandError(
                    f"cannot listen for the {control.name} server on {control.host}: {e}"
                ) from None
            started.append(control)
        listener = await server.listen(_listening_socket(pod.ips[0], HBONE_PORT), identity)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        async with asyncio.TaskGroup() as group:
            background = [
                group.create_task(source.watch(), name="config watch"),
                group.create_task(refresher.run(), name="jwks refresh"),
            ]
            if metrics is not None:  # one timer for every open TCP relay, as the node proxy's
                background.append(group.create_task(_flush_tcp_bytes(waypoint, byte_flush), name="tcp byte flush"))
            log.info(
                "waypoint running",
                extra={
                    "waypoint": f"{args.namespace}/{args.name}",
                    "identity": identity.uri,
                    "hbone": f"{pod.ips[0]}:{HBONE_PORT}",
                },
            )
            await stop.wait()
            log.info("shutting down: draining connections", extra={"deadline_s": drain_timeout})
            draining = True
            server.drain()
            waypoint.drain()  # h2c clients inside the tunnels: GOAWAY too
            pool.drain()
            if server.tasks:
                await asyncio.wait(set(server.tasks), timeout=drain_timeout)
            for task in background:
                task.cancel()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        if listener is not None:
            listener.close()
        server.abort()
        pool.close()
        if readiness is not None:
            await readiness.close()
        for control in started:
            await control.close()
        await certs.close()
        await waypoint.authorizers.close()
    return 0


def _flag_duration(flag: str, text: str) -> float:
    from ztunnel.identity.duration import DurationError, parse_duration

    try:
        return parse_duration(text).total_seconds()
    except DurationError as e:
        raise WaypointCommandError(f"{flag}: {e}") from None


async def _flush_tcp_bytes(waypoint: WaypointServer, interval: float) -> None:
    while True:
        await asyncio.sleep(interval)
        waypoint.flush_tcp_bytes()


def close_revoked(crl: RevocationSet, server: HboneServer, pool: HbonePool) -> int:
    """Abort the open HBONE connections (clients' and upstream) whose peer leaf a CRL of its issuer lists; the
    waypoint's counterpart of the node proxy's sweep (proxy and waypoint may not import each other)."""
    from cryptography import x509

    parsed: dict[bytes, x509.Certificate] = {}  # connections from one peer share its certificate
    closed = 0
    for side, conns in (("inbound", list(server.connections)), ("outbound", pool.connections())):
        for conn in conns:
            transport = conn.transport
            if transport is None or transport.is_closing():
                continue
            ssl_object = transport.get_extra_info("ssl_object")
            der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
            if not der:
                continue
            leaf = parsed.get(der)
            if leaf is None:
                leaf = parsed[der] = x509.load_der_x509_certificate(der)
            if crl.revokes(leaf):
                log.info(
                    "closing the HBONE connection of a revoked peer",
                    extra={"peer": str(conn.peer_identity), "serial": f"{leaf.serial_number:x}", "side": side},
                )
                conn.abort()
                closed += 1
    return closed


def _telemetry(args: argparse.Namespace) -> RequestTelemetry:
    """Per-request metrics (when --metrics-addr is given: nobody could read them otherwise) and access log."""
    from prometheus_client import CollectorRegistry

    from ztunnel.telemetry.accesslog import AccessLog
    from ztunnel.telemetry.http_metrics import WaypointMetrics
    from ztunnel.waypoint.telemetry import RequestTelemetry

    metrics = WaypointMetrics(CollectorRegistry()) if args.metrics_addr is not None else None
    return RequestTelemetry(metrics, AccessLog(args.access_log))


def _control_servers(args: argparse.Namespace, waypoint: WaypointServer, stop: asyncio.Event) -> list[HttpServer]:
    """The opt-in metrics and admin servers, as the node proxy's (telemetry.http_server)."""
    from ztunnel.telemetry.http_server import AdminServer, MetricsServer

    servers: list[HttpServer] = []
    telemetry = waypoint.telemetry
    if args.metrics_addr is not None and telemetry is not None and telemetry.metrics is not None:
        host, port = args.metrics_addr
        servers.append(MetricsServer(host, port, telemetry.metrics.registry))
    if args.admin_addr is not None:
        dump = lambda: _config_dump(args, waypoint)  # noqa: E731
        host, port = args.admin_addr
        servers.append(AdminServer(host, port, config_dump=dump, on_quit=stop.set))
    return servers


def _config_dump(args: argparse.Namespace, waypoint: WaypointServer) -> dict[str, Any]:
    cfg = waypoint.state.config
    return {
        "waypoint": f"{args.namespace}/{args.name}",
        "identity": waypoint.identity.uri,
        "generation": cfg.generation,
        "services": [
            {
                "name": s.ref,
                "cluster_ips": list(s.cluster_ips),
                "ports": [{"port": p.port, "target_port": p.target_port} for p in s.ports],
                "endpoints": [w.ref for w in cfg.endpoints(s)],
            }
            for s in cfg.services
        ],
        "policies": [o.ref for o in cfg.policy_objects],
        "policy_errors": [str(e) for e in waypoint.state.decider.engine.errors],
        "requests": dict(waypoint.requests),
    }
