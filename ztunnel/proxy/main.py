"""The proxy process: config source, certificates, the data plane, the admin servers, signals and drain.

Everything started here is stopped here, in reverse order, also when startup fails half-way.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import logging
import resource
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import CollectorRegistry

from ztunnel.config.loader import ConfigError
from ztunnel.config.model import ClusterConfig
from ztunnel.config.source import FileConfigSource
from ztunnel.errors import ZtunnelError
from ztunnel.identity.duration import parse_duration
from ztunnel.identity.revocation import CLEARED, LOADED, RevocationUpdate
from ztunnel.net.http import parse_host_port
from ztunnel.proxy.listeners import LocalListenerFactory
from ztunnel.proxy.node import LocalWorkloads, NodeProxy, ProxyOptions, readiness
from ztunnel.telemetry.accesslog import AccessLog
from ztunnel.telemetry.http_server import AdminServer, MetricsServer, ReadinessServer
from ztunnel.telemetry.metrics import ProxyMetrics

log = logging.getLogger("ztunnel.proxy")

HOUSEKEEPING_INTERVAL = 1.0


class ProxySettingsError(ZtunnelError):
    pass


@dataclass
class ProxySettings:
    node: str
    files: list[str]
    ca_dir: str | None = None
    ca_address: str | None = None
    ca_root: str | None = None
    token_file: str | None = None
    metrics_addr: tuple[str, int] = ("127.0.0.1", 15020)
    admin_addr: tuple[str, int] = ("127.0.0.1", 15000)
    readiness_addr: tuple[str, int] = ("127.0.0.1", 15021)
    cert_ttl: dt.timedelta = dt.timedelta(hours=24)
    access_log: str = "text"
    drain_timeout: float = 10.0
    connect_timeout: float = 5.0
    trust_domain: str = "cluster.local"
    inpod_socket: str | None = None  # in-pod mode: the node agent's socket (DESIGN §4.7); None = local mode
    byte_flush_interval: float = 5.0
    config_settle: float = 3.0  # how long a config that drops every pod of the node waits for the file to settle
    crl_interval: float = 5.0  # how often the CRL is polled (CA dir or CA server): revocation takes effect within it
    workers: int = 1  # processes sharing the pod listeners (SO_REUSEPORT); local mode only
    # Set in the worker processes of `--workers N` (ztunnel.proxy.workers): their index and their end of the
    # socketpair to the supervisor. Workers serve their operator ports on 127.0.0.1 port 0 and report them.
    worker_index: int | None = None
    worker_fd: int | None = None

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
            files=list(args.files),
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
            workers=_workers(getattr(args, "workers", 1), getattr(args, "inpod_socket", None)),
            worker_index=getattr(args, "worker_index", None),
            worker_fd=getattr(args, "worker_fd", None),
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


def _certificate_manager(settings: ProxySettings, source: FileConfigSource):  # type: ignore[no-untyped-def]
    from ztunnel.identity.manager import CertificateManager

    if settings.ca_dir:
        return CertificateManager.in_process(
            settings.ca_dir,
            node=settings.node,
            config=source,
            ttl=settings.cert_ttl,
            crl_refresh_interval=settings.crl_interval,
        )
    assert settings.ca_address and settings.ca_root and settings.token_file
    try:
        root = Path(settings.ca_root).read_bytes()
        token = Path(settings.token_file).read_text().strip()
    except OSError as e:
        raise ProxySettingsError(f"cannot read the CA root or token file: {e}") from None
    return CertificateManager.remote(
        settings.ca_address, root, token, ttl=settings.cert_ttl, crl_refresh_interval=settings.crl_interval
    )


def _warn_unknown_node(config: ClusterConfig, node: str) -> None:
    """A --node no pod names is most likely a typo: the proxy would serve nothing, and say nothing."""
    if any(w.node == node for w in config.workloads):
        return
    known = sorted(config.nodes)
    listed = ", ".join(known[:20]) + (f" and {len(known) - 20} more" if len(known) > 20 else "")
    log.warning(
        "no pod in the config runs on node %s (spec.nodeName); this proxy serves nothing until one does. "
        "Nodes in the config: %s",
        node,
        listed or "none",
        extra={"node": node},
    )


def _raise_open_files_limit() -> None:
    """Each proxied connection holds one or two descriptors: use the hard limit, as Envoy and ztunnel do."""
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY or hard > soft:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY else 1 << 20, hard))
    except (ValueError, OSError) as e:
        log.warning("cannot raise the open files limit: %s", e)


async def run_proxy(settings: ProxySettings) -> int:
    loop = asyncio.get_running_loop()
    _raise_open_files_limit()
    source = FileConfigSource(
        settings.files, trust_domain=settings.trust_domain, node=settings.node, settle=settings.config_settle
    )
    try:
        config = source.load()
    except ConfigError as e:
        raise ProxySettingsError(f"cannot load the config: {e}") from None
    registry = CollectorRegistry()
    metrics = ProxyMetrics(registry)
    source.on_rejected(lambda _e: metrics.config_load_failed())
    _warn_unknown_node(config, settings.node)
    certs = _certificate_manager(settings, source)
    await certs.start()
    proxy = NodeProxy(
        ProxyOptions(
            node=settings.node,
            connect_timeout=settings.connect_timeout,
            drain_timeout=settings.drain_timeout,
            byte_flush_interval=settings.byte_flush_interval,
        ),
        certs,
        metrics=metrics,
        access_log=AccessLog(settings.access_log, sys.stdout),  # type: ignore[arg-type]
    )
    # In-pod mode: the node agent hands over pods' netns (ztunnel.proxy.inpod); local mode: loopback IPs.
    local = (
        LocalWorkloads(proxy, LocalListenerFactory(config_files=settings.files, reuse_port=settings.workers > 1))
        if not settings.inpod_socket
        else None
    )
    stop = asyncio.Event()

    async def on_config(cfg: ClusterConfig) -> None:
        proxy.apply_config(cfg)
        if local is not None:
            await local.reconcile(cfg)

    def on_rotation(identity: object, cert: object) -> None:
        from ztunnel.identity.spiffe import SpiffeId

        if isinstance(identity, SpiffeId):
            task = loop.create_task(proxy.contexts.refresh(identity))
            task.add_done_callback(lambda t: t.cancelled() or t.exception())
            not_after = getattr(cert, "not_after", None)
            if not_after is not None:
                metrics.set_certificate_expiry(identity.uri, not_after.timestamp())

    def on_revocation(update: RevocationUpdate) -> None:
        """A CRL poll did something: count it; a new CRL in force is enforced by the proxy (contexts, connections)."""
        metrics.crl_update(update.result, update.current.number if update.current is not None else 0)
        if update.result in (LOADED, CLEARED):
            proxy.revocation_changed(update.current)

    certs.subscribe(on_rotation)
    certs.subscribe_revocation(on_revocation)
    source.subscribe(on_config)
    channel = None
    metrics_addr, admin_addr, readiness_addr = settings.metrics_addr, settings.admin_addr, settings.readiness_addr
    if settings.worker_fd is not None:  # a worker of `--workers N`: the supervisor answers the configured ports
        from ztunnel.proxy.workers import WORKER_HOST, SupervisorChannel

        channel = SupervisorChannel(settings.worker_fd)
        metrics_addr = admin_addr = readiness_addr = (WORKER_HOST, 0)
    inpod = None
    if settings.inpod_socket:
        from ztunnel.proxy.inpod import InpodClient

        inpod = InpodClient(settings.inpod_socket, proxy, resolve=lambda uid: proxy.config.workload_by_uid(uid))
    servers = [
        MetricsServer(*metrics_addr, registry),
        AdminServer(
            *admin_addr,
            config_dump=lambda: {**proxy.config_dump(), "config_source": source.status()},
            on_quit=stop.set,
        ),
        ReadinessServer(*readiness_addr, readiness(proxy, local, inpod)),
    ]
    started: list[object] = []
    tasks: list[asyncio.Task[None]] = []
    try:
        for server in servers:
            try:
                await server.start()
            except OSError as e:
                raise ProxySettingsError(f"cannot listen for the {server.name} server on {server.host}: {e}") from None
            started.append(server)
            proxy.state.add_own_listener(server.host, server.port)  # wherever the flags put it: pods cannot dial it
        if channel is not None:  # a worker: the supervisor serves the configured operator ports
            for host, port in (settings.metrics_addr, settings.admin_addr, settings.readiness_addr):
                proxy.state.add_own_listener(host, port)
        await on_config(config)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        tasks.append(loop.create_task(source.watch()))
        tasks.append(loop.create_task(_housekeeping(proxy, local, metrics)))
        if inpod is not None:
            tasks.append(loop.create_task(inpod.run()))
        if channel is not None:
            await channel.report({s.name: s.port for s in servers})

            async def supervisor_gone() -> None:
                await channel.wait_closed()
                log.warning("the supervisor is gone; stopping this worker")
                stop.set()

            tasks.append(loop.create_task(supervisor_gone()))
        log.info(
            "proxy running",
            extra={
                "node": settings.node,
                "workloads": len(proxy.workloads),
                **({"worker": settings.worker_index} if settings.worker_index is not None else {}),
                **{s.name: s.address for s in servers},  # type: ignore[attr-defined]
            },
        )
        await stop.wait()
        log.info("shutting down: draining connections", extra={"deadline_s": settings.drain_timeout})
        await proxy.drain()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await proxy.close()
        for server in reversed(started):
            await server.close()  # type: ignore[attr-defined]
        await certs.close()
        if channel is not None:
            channel.close()
    return 0


async def _housekeeping(proxy: NodeProxy, local: LocalWorkloads | None, metrics: ProxyMetrics) -> None:
    """Retry pods that could not be served yet and refresh the gauges; nothing per connection."""
    while True:
        await asyncio.sleep(HOUSEKEEPING_INTERVAL)
        if local is not None and local.pending(proxy.config):
            await local.reconcile(proxy.config)
        metrics.set_pool_connections(proxy.pool.size)
