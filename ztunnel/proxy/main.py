"""The proxy process: config source, certificates, the data plane, the admin servers, signals and drain.

Everything started here is stopped here, in reverse order, also when startup fails half-way.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import signal
import sys
from pathlib import Path

from prometheus_client import CollectorRegistry

from ztunnel.config.kube.client import KubeConfigError
from ztunnel.config.kube.source import make_source
from ztunnel.config.loader import ConfigError
from ztunnel.config.model import ClusterConfig
from ztunnel.config.source import ConfigSource
from ztunnel.identity.revocation import LOADED, RevocationUpdate
from ztunnel.net.http import HttpServer
from ztunnel.ports import DNS_PORT
from ztunnel.proxy.dns import upstream_from_resolv_conf
from ztunnel.proxy.listeners import LocalListenerFactory
from ztunnel.proxy.node import LocalWorkloads, NodeProxy, ProxyOptions, readiness
from ztunnel.proxy.settings import ProxySettings, ProxySettingsError
from ztunnel.telemetry.accesslog import AccessLog
from ztunnel.telemetry.http_server import AdminServer, MetricsServer, ReadinessServer
from ztunnel.telemetry.metrics import ProxyMetrics

log = logging.getLogger("ztunnel.proxy")

HOUSEKEEPING_INTERVAL = 1.0
SLOW_APPLY_S = 0.1  # an apply (on the event loop) slower than this is logged with its duration


def _certificate_manager(settings: ProxySettings, source: ConfigSource):  # type: ignore[no-untyped-def]
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
        Path(settings.token_file).read_text()  # unreadable at start is a user error; re-read per call (rotation)
    except OSError as e:
        raise ProxySettingsError(f"cannot read the CA root or token file: {e}") from None
    return CertificateManager.remote(
        settings.ca_address,
        root,
        Path(settings.token_file),
        ttl=settings.cert_ttl,
        crl_refresh_interval=settings.crl_interval,
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
    try:
        source = make_source(
            settings.source,
            settings.files,
            settings.kubeconfig,
            trust_domain=settings.trust_domain,
            node=settings.node,
            settle=settings.config_settle,
        )
        config = source.load()
    except KubeConfigError as e:
        raise ProxySettingsError(str(e)) from None
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
    dns_port = None
    if settings.dns:  # DESIGN §4.6: off by default, nothing listens on 15053 then
        dns_port = DNS_PORT
        proxy.enable_dns(settings.dns_upstream or upstream_from_resolv_conf(), settings.dns_domain)
    local = (
        LocalWorkloads(
            proxy,
            LocalListenerFactory(
                config_files=settings.files, reuse_port=settings.workers > 1, dns_port=dns_port
            ),
        )
        if not settings.inpod_socket
        else None
    )
    stop = asyncio.Event()

    async def on_config(cfg: ClusterConfig) -> None:
        # The snapshot was read and indexed in a thread (FileConfigSource); what runs here, on the loop, is the
        # policy engine update and the listeners' reconcile. Say when that took long enough to delay traffic.
        started = loop.time()
        proxy.apply_config(cfg)
        if local is not None:
            await local.reconcile(cfg)
        took = loop.time() - started
        if took >= SLOW_APPLY_S:
            log.info("config applied: generation %d in %.2fs", cfg.generation, took, extra={"took_s": round(took, 3)})

    def on_rotation(identity: object, cert: object) -> None:
        from ztunnel.identity.spiffe import SpiffeId

        if isinstance(identity, SpiffeId):
            task = loop.create_task(proxy.contexts.refresh(identity))
            task.add_done_callback(_log_refresh_failure)
            not_after = getattr(cert, "not_after", None)
            if not_after is not None:
                metrics.set_certificate_expiry(identity.uri, not_after.timestamp())

    def on_revocation(update: RevocationUpdate) -> None:
        """A CRL poll did something: count it; a new CRL in force is enforced by the proxy (contexts, connections)."""
        metrics.crl_update(update.result, update.current.number)
        if update.result == LOADED:
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

        inpod = InpodClient(
            settings.inpod_socket, proxy, resolve=lambda uid: proxy.config.workload_by_uid(uid), dns_port=dns_port
        )
    servers = [
        MetricsServer(*metrics_addr, registry),
        AdminServer(
            *admin_addr,
            config_dump=lambda: {**proxy.config_dump(), "config_source": source.status()},
            on_quit=stop.set,
        ),
        ReadinessServer(*readiness_addr, readiness(proxy, local, inpod)),
    ]
    started: list[HttpServer] = []
    exit_code = 0
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
        # The long-running tasks live in one group: if one fails, the group cancels the rest and the proxy
        # stops with exit 1 and the traceback in its log, instead of running on without, say, config updates.
        try:
            async with asyncio.TaskGroup() as group:
                background = [
                    group.create_task(source.watch(), name="config watch"),
                    group.create_task(_housekeeping(proxy, local, metrics), name="housekeeping"),
                ]
                if inpod is not None:
                    background.append(group.create_task(inpod.run(), name="node agent link"))
                if channel is not None:
                    await channel.report({s.name: s.port for s in servers})

                    async def supervisor_gone() -> None:
                        await channel.wait_closed()
                        log.warning("the supervisor is gone; stopping this worker")
                        stop.set()

                    background.append(group.create_task(supervisor_gone(), name="supervisor link"))
                log.info(
                    "proxy running",
                    extra={
                        "node": settings.node,
                        "workloads": len(proxy.workloads),
                        **({"worker": settings.worker_index} if settings.worker_index is not None else {}),
                        **{s.name: s.address for s in servers},
                    },
                )
                await stop.wait()
                log.info("shutting down: draining connections", extra={"deadline_s": settings.drain_timeout})
                await proxy.drain()
                for task in background:
                    task.cancel()
        except* Exception as failed:
            for error in failed.exceptions:
                log.error("a task of the proxy failed; stopping", exc_info=error)
            exit_code = 1
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        await proxy.close()
        for server in reversed(started):
            await server.close()
        await certs.close()
        if channel is not None:
            channel.close()
    return exit_code


def _log_refresh_failure(task: asyncio.Task[None]) -> None:
    """A TLS context refresh after rotation failed: the listener keeps its previous certificate until the
    next rotation; say so, with the traceback, rather than dropping the error."""
    if not task.cancelled() and task.exception() is not None:
        log.error("refreshing TLS contexts after a certificate rotation failed", exc_info=task.exception())


async def _housekeeping(proxy: NodeProxy, local: LocalWorkloads | None, metrics: ProxyMetrics) -> None:
    """Retry pods that could not be served yet and refresh the gauges; nothing per connection."""
    while True:
        await asyncio.sleep(HOUSEKEEPING_INTERVAL)
        if local is not None and local.pending(proxy.config):
            await local.reconcile(proxy.config)
        metrics.set_pool_connections(proxy.pool.size)
