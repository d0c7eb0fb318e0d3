"""The node proxy's settings, from its command line (`ztunnel proxy --help`)."""

from __future__ import annotations

import argparse
import datetime as dt
from dataclasses import dataclass

from ztunnel.errors import ZtunnelError
from ztunnel.identity.duration import parse_duration
from ztunnel.net.http import parse_host_port
from ztunnel.ports import ADMIN_PORT, METRICS_PORT, READINESS_PORT


class ProxySettingsError(ZtunnelError):
    """A flag or file the proxy cannot start with; the message names it."""


@dataclass
class ProxySettings:
    node: str
    files: list[str]
    ca_dir: str | None = None
    ca_address: str | None = None
    ca_root: str | None = None
    token_file: str | None = None
    metrics_addr: tuple[str, int] = ("127.0.0.1", METRICS_PORT)
    admin_addr: tuple[str, int] = ("127.0.0.1", ADMIN_PORT)
    readiness_addr: tuple[str, int] = ("127.0.0.1", READINESS_PORT)
    cert_ttl: dt.timedelta = dt.timedelta(hours=24)
    access_log: str = "text"
    drain_timeout: float = 10.0
    connect_timeout: float = 5.0
    trust_domain: str = "cluster.local"
    inpod_socket: str | None = None  # in-pod mode: the node agent's socket (DESIGN §4.7); None = local mode
    byte_flush_interval: float = 5.0
    config_settle: float = 3.0  # how long a config that drops every pod of the node waits for the file to settle
    crl_interval: float = 5.0  # how often the CRL is polled (CA dir or CA server): revocation takes effect within it
    dns: bool = False  # `--dns`: answer pods' DNS on 15053 (DESIGN §4.6); off, nothing listens there
    dns_upstream: tuple[str, int] | None = None  # None: the first nameserver of /etc/resolv.conf
    dns_domain: str = "cluster.local"
    workers: int = 1  # processes sharing the pod listeners (SO_REUSEPORT); local mode only
    # Set in the worker processes of `--workers N` (ztunnel.proxy.workers): their index and their end of the
    # socketpair to the supervisor. Workers serve their operator ports on 127.0.0.1 port 0 and report them.
    worker_index: int | None = None
    worker_fd: int | None = None
    source: str = "file"  # `--source`: the -f files, or "kubernetes" (the API; --kubeconfig or in-cluster)
    kubeconfig: str | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ProxySettings:
        def addr(flag: str, value: str) -> tuple[str, int]:
            try:
                return parse_host_port(value)
            except ValueError as e:
                raise ProxySettingsError(f"{flag}: {e}") from None

        if args.ca and not (args.ca_root and args.token_file):
            raise ProxySettingsError(
                "--ca needs --ca-root (the CA's root certificate) and --token-file (this node's token)"
            )
        return cls(
            node=args.node,
            files=list(args.files or []),
            ca_dir=args.ca_dir,
            ca_address=args.ca,
            ca_root=args.ca_root,
            token_file=args.token_file,
            metrics_addr=addr("--metrics-addr", args.metrics_addr),
            admin_addr=addr("--admin-addr", args.admin_addr),
            readiness_addr=addr("--readiness-addr", args.readiness_addr),
            cert_ttl=parse_duration(args.cert_ttl),
            access_log=args.access_log,
            drain_timeout=parse_duration(args.drain_timeout).total_seconds(),
            connect_timeout=parse_duration(args.connect_timeout).total_seconds(),
            trust_domain=args.trust_domain,
            inpod_socket=getattr(args, "inpod_socket", None),
            byte_flush_interval=parse_duration(getattr(args, "byte_flush_interval", "5s")).total_seconds(),
            config_settle=parse_duration(getattr(args, "config_settle", "3s")).total_seconds(),
            crl_interval=_positive("--crl-interval", parse_duration(getattr(args, "crl_interval", "5s"))),
            dns=bool(getattr(args, "dns", False)),
            dns_upstream=addr("--dns-upstream", args.dns_upstream) if getattr(args, "dns_upstream", None) else None,
            dns_domain=str(getattr(args, "dns_domain", "cluster.local")).strip(".").lower(),
            workers=_workers(getattr(args, "workers", 1), getattr(args, "inpod_socket", None)),
            worker_index=getattr(args, "worker_index", None),
            worker_fd=getattr(args, "worker_fd", None),
            source=getattr(args, "source", "file") or "file",
            kubeconfig=getattr(args, "kubeconfig", None),
        )


def _positive(flag: str, value: dt.timedelta) -> float:
    seconds = value.total_seconds()
    if seconds <= 0:
        raise ProxySettingsError(f"{flag}: must be a positive duration, e.g. 5s")
    return seconds


def _workers(value: int, inpod_socket: str | None) -> int:
    if value < 1:
        raise ProxySettingsError(f"--workers: {value} is not a positive number of processes")
    if value > 1 and inpod_socket:
        # In-pod mode would need the node agent to hand every worker each pod's netns (or the listeners made
        # once and passed to all workers over SCM_RIGHTS), and the acks to wait for all of them.
        raise ProxySettingsError(
            f"--workers {value} with --inpod-socket: several workers are supported in local mode only. In-pod mode "
            "would need the node agent to hand each pod's netns to every worker (or one worker to make the pod "
            "listeners and pass their descriptors to the others); run one worker per node proxy instead"
        )
    return value
