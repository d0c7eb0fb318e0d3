"""`ztunnel proxy`: run the node proxy for one node (local mode: pod IPs on loopback)."""

from __future__ import annotations

import argparse

from ztunnel.config.kube.source import add_source_arguments
from ztunnel.errors import ZtunnelError
from ztunnel.ports import (
    ADMIN_PORT,
    DNS_PORT,
    HBONE_PORT,
    METRICS_PORT,
    PLAINTEXT_INBOUND_PORT,
    READINESS_PORT,
    SOCKS5_PORT,
)


class ProxyCommandError(ZtunnelError):
    pass


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "proxy",
        help="run the node proxy (HBONE data plane) for one node",
        description=(
            f"Run the node proxy for --node. Local mode: for each mesh pod of the node, listen on <podIP>:{HBONE_PORT} "
            f"(HBONE), <podIP>:{PLAINTEXT_INBOUND_PORT} (plaintext inbound) and <podIP>:{SOCKS5_PORT} (SOCKS5 "
            "outbound, speaking as that pod)."
        ),
    )
    p.add_argument("--node", required=True, help="the node whose pods this proxy serves (spec.nodeName)")
    p.add_argument("-f", "--filename", dest="files", action="append", help="YAML file or directory of objects")
    add_source_arguments(p)
    ca = p.add_mutually_exclusive_group(required=True)
    ca.add_argument("--ca-dir", help="sign certificates in-process with this CA directory (local mode)")
    ca.add_argument("--ca", help="HOST:PORT of a CA server (`ztunnel ca serve`)")
    p.add_argument("--ca-root", help="the CA server's root certificate (PEM), with --ca")
    p.add_argument("--token-file", help="file holding this node's token for the CA server, with --ca")
    for flag, port, what in (
        ("--metrics-addr", METRICS_PORT, "/metrics"),
        ("--admin-addr", ADMIN_PORT, "the admin API"),
        ("--readiness-addr", READINESS_PORT, "/healthz/ready"),
    ):
        p.add_argument(flag, default=f"127.0.0.1:{port}", help=f"HOST:PORT for {what} (default 127.0.0.1:{port})")
    p.add_argument("--cert-ttl", default="24h", help="requested SVID validity, e.g. 24h, 30m (default 24h)")
    p.add_argument(
        "--access-log", choices=["text", "json", "off"], help="access log format (default: the --log-format)"
    )
    p.add_argument("--drain-timeout", default="10s", help="how long open connections may finish on shutdown")
    p.add_argument("--connect-timeout", default="5s", help="timeout for upstream connects and tunnel setup")
    p.add_argument(
        "--byte-flush-interval",
        default="5s",
        help="how often open connections' bytes are added to the byte metrics (default 5s)",
    )
    p.add_argument(
        "--crl-interval",
        default="5s",
        help="how often the CRL is polled (crl.pem of --ca-dir, or the CA server's revocation list): a revocation "
        "takes effect on new handshakes and open connections within this (default 5s)",
    )
    p.add_argument(
        "--config-settle",
        default="3s",
        help="a config change that removes every pod of --node is applied only once the files stayed unchanged "
        "this long (a half-written file must not tear every pod down; write config files atomically: to a "
        "temporary file, then rename it) (default 3s)",
    )
    p.add_argument("--trust-domain", default="cluster.local", help="SPIFFE trust domain (default cluster.local)")
    p.add_argument(
        "--inpod-socket",
        default=None,
        help="in-pod mode: the node agent's proxy socket (`ztunnel node-agent --proxy-socket`); pods' listeners "
        "are then created inside their netns instead of on loopback",
    )
    p.add_argument(
        "--dns",
        action="store_true",
        help=f"answer pods' DNS on port {DNS_PORT} (UDP and TCP; in-pod mode with the node agent's --dns-capture): "
        "A/AAAA of the model's Services and pods under --dns-domain, short names through the asking pod's "
        "search path, everything else forwarded to --dns-upstream (default off)",
    )
    p.add_argument(
        "--dns-upstream",
        default=None,
        help="HOST:PORT of the resolver other names are forwarded to (default: the first nameserver of "
        "/etc/resolv.conf)",
    )
    p.add_argument("--dns-domain", default="cluster.local", help="the cluster's DNS domain (default cluster.local)")
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        help="worker processes sharing the pod listeners (SO_REUSEPORT), one core each, behind one set of "
        "metrics/admin/readiness ports; local mode only (default 1: a single process)",
    )
    # Set by the supervisor of `--workers N` on its children (ztunnel.proxy.workers); not for users.
    p.add_argument("--worker-index", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker-fd", type=int, default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    import uvloop

    from ztunnel.proxy.main import run_proxy
    from ztunnel.proxy.settings import ProxySettings

    if args.access_log is None:
        args.access_log = getattr(args, "log_format", "text")
    settings = ProxySettings.from_args(args)
    if settings.workers > 1 and settings.worker_fd is None:
        import sys

        from ztunnel.proxy.workers import run_supervisor

        # The workers re-run this command line (plus --worker-index/--worker-fd), so they parse what the user gave.
        return uvloop.run(run_supervisor(settings, sys.argv[1:]))
    return uvloop.run(run_proxy(settings))
