"""The node proxy: serves a set of local workloads (pods), outbound and inbound.

Which workloads are served is pluggable. Local mode (`LocalWorkloads`) derives the set from the config
(enrolled pods whose spec.nodeName is this node) and binds `<podIP>:port` on loopback. In-pod mode (the
node agent hands over each pod's netns) calls `add_workload(workload, sockets)` / `remove_workload(uid)`
with sockets it bound inside the pod's network namespace.

`NodeProxy` owns the state (state.py), the certificates and TLS contexts, the HBONE pool and server, and
the lifetimes (config changes, drain, close). Per connection work lives in outbound.py (SOCKS5 /
transparent -> HBONE, passthrough or refusal) and inbound.py (HBONE and plaintext -> authorization -> app);
report.py turns a finished connection into metrics and an access log line.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable, Collection, Mapping
from typing import Any, Protocol

from cryptography import x509

from ztunnel.config.model import ClusterConfig, Workload
from ztunnel.errors import ZtunnelError
from ztunnel.hbone.client import HbonePool
from ztunnel.hbone.connection import HboneConnection
from ztunnel.hbone.server import TLS_HANDSHAKE_TIMEOUT, HboneServer
from ztunnel.hbone.tls_cache import TlsContexts
from ztunnel.identity.certs import CertificateProvider
from ztunnel.identity.revocation import RevocationSet
from ztunnel.identity.spiffe import SpiffeId
from ztunnel.policy.decision import ConnectionAttributes
from ztunnel.policy.engine import PolicyEngine
from ztunnel.proxy.dns import DnsServer, DnsTable
from ztunnel.proxy.inbound import Inbound, waypoint_verdict
from ztunnel.proxy.listeners import ListenerFactory, WorkloadSockets, serve_streams
from ztunnel.proxy.outbound import Outbound
from ztunnel.proxy.report import ConnectionReporter
from ztunnel.proxy.state import ProxyOptions, ProxyState, ServedWorkload
from ztunnel.proxy.tracking import ConnectionTracker, TrackedConnection
from ztunnel.telemetry.accesslog import AccessLog
from ztunnel.telemetry.metrics import ProxyMetrics

log = logging.getLogger("ztunnel.proxy")

__all__ = ["LocalWorkloads", "NodeProxy", "ProxyOptions", "ServedWorkload", "readiness"]


class NodeProxy:
    """Outbound + inbound data plane for the workloads it serves. Lifetime: use, then `drain`/`close`."""

    def __init__(
        self,
        options: ProxyOptions,
        certs: CertificateProvider,
        *,
        metrics: ProxyMetrics | None = None,
        access_log: AccessLog | None = None,
    ) -> None:
        self.state = ProxyState(options)
        self.certs = certs
        self.metrics = metrics
        self.report = ConnectionReporter(metrics, access_log or AccessLog("off"))
        self.contexts = TlsContexts(certs)
        self.pool = HbonePool(
            self.contexts,
            connect_timeout=options.connect_timeout,
            idle_timeout=options.pool_idle_timeout,
            on_failure=self.report.pool_failure,
        )
        self.inbound = Inbound(self.state, self.report)
        self.outbound = Outbound(self.state, self.pool, self.report)
        self.hbone_server = HboneServer(
            self.contexts,
            self.inbound.serve_tunnel,
            on_rejected=self.report.handshake_rejected,
            on_budget_reset=self.report.peer_over_budget,
            on_connection_limit=self.report.over_connection_limit,
        )
        self.tasks: set[asyncio.Task[None]] = set()
        self.closed = asyncio.Event()
        self.dns: DnsServer | None = None  # `--dns` (enable_dns): pods' DNS on 15053, served with their listeners
        self._dns_table: DnsTable | None = None
        self._byte_flusher: asyncio.Task[None] | None = None

    # The state others read (main, in-pod mode, readiness, tests).
    @property
    def options(self) -> ProxyOptions:
        return self.state.options

    @property
    def config(self) -> ClusterConfig:
        return self.state.config

    @property
    def config_loaded(self) -> bool:
        return self.state.config_loaded

    @property
    def policy(self) -> PolicyEngine:
        return self.state.policy

    @property
    def workloads(self) -> dict[str, ServedWorkload]:
        return self.state.workloads

    @property
    def tracker(self) -> ConnectionTracker:
        return self.state.tracker

    @property
    def draining(self) -> bool:
        return self.state.draining

    def __repr__(self) -> str:
        return (
            f"<NodeProxy node={self.options.node} workloads={len(self.workloads)} open={len(self.tracker)}"
            f" pool={self.pool.size}>"
        )

    # ---- config --------------------------------------------------------------------------------
    def enable_dns(self, upstream: tuple[str, int] | None, domain: str) -> None:
        """Answer pods' DNS (DESIGN §4.6) from the model under `domain`, the rest forwarded to `upstream`."""
        self._dns_table = DnsTable.from_config(self.state.config, domain)
        self.dns = DnsServer(self._current_dns_table, upstream)

    def _current_dns_table(self) -> DnsTable:
        assert self._dns_table is not None  # set with self.dns
        return self._dns_table

    def apply_config(self, config: ClusterConfig) -> None:
        """Use a new snapshot: new policy engine, refreshed workload objects, re-checked inbound connections."""
        self.state.config = config
        if self._dns_table is not None:
            self._dns_table = DnsTable.from_config(config, self._dns_table.domain)
        self.state.config_loaded = True
        # Reuse the previous engine's parsed policies: a rebuild with 10,000 unchanged policies takes ms, not seconds.
        self.state.policy = PolicyEngine.from_config(config, previous=self.state.policy)
        for err in self.policy.errors:
            log.error("policy rejected: %s", err)
        for served in self.workloads.values():
            fresh = config.workload_by_uid(served.workload.uid)
            if fresh is not None:
                served.workload = fresh
        closed = self.tracker.close_denied(self._recheck)
        if closed:
            log.info("policy change closed connections", extra={"closed": closed})
        if self.metrics is not None:
            self.metrics.config_loaded()

    def _recheck(self, conn: TrackedConnection) -> str | None:
        attrs = conn.attributes
        if attrs is None:
            return None
        served = self.workloads.get(conn.workload_uid)
        destination = served.workload if served else attrs.destination
        fresh = ConnectionAttributes(
            source_principal=attrs.source_principal,
            source_ip=attrs.source_ip,
            destination=destination,
            destination_ip=attrs.destination_ip,
            destination_port=attrs.destination_port,
        )
        if attrs.source_principal is None:  # plaintext: a switch to STRICT closes it too
            mode = self.policy.peer_authentication_mode(destination, attrs.destination_port)
            if mode == "STRICT":
                return "peer authentication STRICT"
        decision = waypoint_verdict(self.state.config, destination, attrs.source_principal)
        if decision is None:
            decision = self.policy.check_l4(fresh)
        if decision.allowed:
            return None
        return decision.policy or decision.reason

    # ---- served workloads ----------------------------------------------------------------------
    async def add_workload(self, workload: Workload, sockets: WorkloadSockets) -> None:
        """Serve `workload` on the given listening sockets (the proxy owns them from now on).

        Fetches the workload's certificate first, so a pod is never served without its SVID, then registers
        the pod before serving any listener: in-pod listeners accept (kernel backlog) from the moment they are
        made, and a connection picked up while the other listeners start must find the pod, not be reset for
        want of its record (the lab saw resets for 15-35 ms per enrolment). Adding a uid that is already
        served replaces its sockets.
        """
        if workload.uid in self.workloads:
            await self.remove_workload(workload.uid)
        identity = SpiffeId.parse(workload.identity)
        served = ServedWorkload(workload=workload, sockets=sockets)
        try:
            await self.contexts.server(identity)
            await self.contexts.client(identity)
            self.state.add_served(served)
            for sock in sockets.hbone:
                served.servers.append(await self.hbone_server.listen(sock, identity))
            plain_servers = (
                (sockets.plaintext, self.inbound.serve_plaintext),
                (sockets.socks5, self.outbound.serve_socks5),
                (sockets.outbound, self.outbound.serve_transparent),
            )
            for socks, serve in plain_servers:
                for sock in socks:
                    handler = functools.partial(serve, workload.uid)
                    served.servers.append(await serve_streams(sock, handler, tasks=self.tasks))
            if self.dns is not None:
                for udp, tcp in sockets.dns:
                    await self.dns.serve(udp, tcp, workload.namespace, key=workload.uid)
        except BaseException:
            if self.workloads.get(workload.uid) is served:
                self.state.remove_served(workload.uid)
                self.tracker.abort_all(workload.uid)
            for server in served.servers:
                server.close()
            if self.dns is not None:
                self.dns.stop(workload.uid)
            sockets.close()
            raise
        self._start_byte_flusher()
        log.info("serving workload", extra={"workload": workload.ref, "identity": workload.identity})
        if self.metrics is not None:
            self.metrics.set_pods_served(len(self.workloads))
            cert = self.contexts.certificate(identity)
            if cert is not None:
                self.metrics.set_certificate_expiry(identity.uri, cert.not_after.timestamp())

    def _start_byte_flusher(self) -> None:
        """One timer for all connections (not one per connection); it lives until `close`."""
        if self.metrics is None or self._byte_flusher is not None or self.options.byte_flush_interval <= 0:
            return

        async def flush_periodically() -> None:
            while True:
                await asyncio.sleep(self.options.byte_flush_interval)
                self.report.flush_bytes(self.tracker.connections())

        self._byte_flusher = asyncio.get_running_loop().create_task(flush_periodically())
        self.tasks.add(self._byte_flusher)
        self._byte_flusher.add_done_callback(self.tasks.discard)

    async def remove_workload(self, uid: str) -> None:
        """Stop serving a pod: close its listeners and abort its open connections."""
        served = self.state.remove_served(uid)
        if served is None:
            return
        for server in served.servers:
            server.close()
        if self.dns is not None:
            self.dns.stop(uid)
        served.sockets.close()
        self.tracker.abort_all(uid)
        identity = SpiffeId.parse(served.workload.identity)
        if not any(w.workload.identity == served.workload.identity for w in self.workloads.values()):
            self.contexts.forget(identity)
            forget = getattr(self.certs, "forget", None)
            if callable(forget):
                forget(identity)
            if self.metrics is not None:
                self.metrics.remove_certificate(identity.uri)
        log.info("stopped serving workload", extra={"workload": served.workload.ref})
        if self.metrics is not None:
            self.metrics.set_pods_served(len(self.workloads))

    def served_workload(self, uid: str) -> Workload | None:
        served = self.workloads.get(uid)
        return served.workload if served else None

    # ---- outbound ------------------------------------------------------------------------------

    # ---- HBONE inbound -------------------------------------------------------------------------

    # ---- plaintext inbound ---------------------------------------------------------------------

    # ---- reporting -----------------------------------------------------------------------------

    # ---- revocation ----------------------------------------------------------------------------
    def revocation_changed(self, crl: RevocationSet) -> None:
        """New CRLs are in force (the certificate manager verified it): enforce it, in a task of ours."""
        task = asyncio.get_running_loop().create_task(self._enforce_revocation(crl))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _enforce_revocation(self, crl: RevocationSet) -> None:
        """Rebuild TLS contexts (new handshakes verify against the new CRL), then close revoked peers' connections.

        Swept again once the longest handshake could have finished: a handshake that began on an old context
        before the rebuild is verified with the old CRL, and lands in the connection sets only afterwards.
        """
        for identity in self.contexts.identities():
            try:
                await self.contexts.refresh(identity)
            except ZtunnelError as e:  # no valid certificate now: its next context is built with the CRL
                log.warning("cannot rebuild TLS contexts after a CRL change: %s", e, extra={"identity": identity.uri})
        if not crl:
            return
        self.close_revoked(crl)
        await asyncio.sleep(max(TLS_HANDSHAKE_TIMEOUT, self.options.connect_timeout) + 1.0)
        self.close_revoked(crl)

    def close_revoked(self, crl: RevocationSet) -> int:
        """Abort open HBONE connections (inbound and pooled outbound) whose peer leaf a CRL of its own issuer
        lists (`RevocationSet.revokes`: matched by the issuer's key, not its name)."""
        parsed: dict[bytes, x509.Certificate] = {}  # connections from one peer share its certificate
        total = 0
        for side, conns in (("inbound", list(self.hbone_server.connections)), ("outbound", self.pool.connections())):
            closed = 0
            for conn in conns:
                leaf = _peer_leaf(conn, parsed)
                if leaf is not None and crl.revokes(leaf):
                    log.info(
                        "closing the HBONE connection of a revoked peer",
                        extra={"peer": str(conn.peer_identity), "serial": f"{leaf.serial_number:x}", "side": side},
                    )
                    conn.abort()
                    closed += 1
            if closed and self.metrics is not None:
                self.metrics.revoked_connections_closed(side, closed)
            total += closed
        return total

    # ---- lifetime ------------------------------------------------------------------------------
    async def drain(self, timeout: float | None = None) -> None:
        """Stop accepting, GOAWAY every HBONE connection, let open connections finish within the deadline,
        then close whatever is left."""
        timeout = self.options.drain_timeout if timeout is None else timeout
        if self.draining:
            await self.closed.wait()
            return
        self.state.draining = True
        log.info("draining", extra={"open_connections": len(self.tracker), "deadline_s": timeout})
        for served in self.workloads.values():
            for server in served.servers:
                server.close()
        self.hbone_server.drain()
        self.pool.drain()
        finished = await self.tracker.wait_empty(timeout)
        if not finished:
            log.warning("drain deadline passed, closing connections", extra={"open_connections": len(self.tracker)})
        await self.close()

    async def close(self) -> None:
        self.state.draining = True
        for uid in list(self.workloads):
            await self.remove_workload(uid)
        self.tracker.abort_all()
        self.hbone_server.abort()
        self.pool.close()
        if self.dns is not None:
            await self.dns.close()
        tasks = [t for t in (*self.tasks, *self.hbone_server.tasks) if not t.done()]
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        self.closed.set()

    # ---- introspection -------------------------------------------------------------------------
    def config_dump(self) -> dict[str, Any]:
        cfg = self.config
        dump_certs = getattr(self.certs, "dump", None)
        return {
            "node": self.options.node,
            "generation": cfg.generation,
            "served_workloads": [
                {
                    "uid": s.workload.uid,
                    "name": s.workload.ref,
                    "identity": s.workload.identity,
                    "ips": list(s.workload.ips),
                }
                for s in self.workloads.values()
            ],
            "workloads": [
                {
                    "name": w.ref,
                    "node": w.node,
                    "ips": list(w.ips),
                    "identity": w.identity,
                    "enrolled": w.enrolled,
                    "ready": w.ready,
                }
                for w in cfg.workloads
            ],
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
            "policy_errors": [str(e) for e in self.policy.errors],
            "certificates": dump_certs() if callable(dump_certs) else [],
            "pool": [repr(c) for c in self.pool.connections()],
            "open_connections": len(self.tracker),
        }


def _peer_leaf(conn: HboneConnection, parsed: dict[bytes, x509.Certificate]) -> x509.Certificate | None:
    """The verified peer certificate of an open connection, read on demand (not on every handshake)."""
    transport = conn.transport
    if transport is None or transport.is_closing():
        return None
    ssl_object = transport.get_extra_info("ssl_object")
    der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
    if not der:
        return None
    leaf = parsed.get(der)
    if leaf is None:
        leaf = parsed[der] = x509.load_der_x509_certificate(der)
    return leaf


class LocalWorkloads:
    """Local mode: serve the enrolled pods of `node` from the config, binding `<podIP>:port` on loopback.

    `reconcile(config)` adds pods that appeared and removes pods that went away (or moved or left the
    mesh); a pod whose listeners or certificate cannot be set up now is retried on the next call.
    """

    def __init__(self, proxy: NodeProxy, factory: ListenerFactory) -> None:
        self.proxy = proxy
        self.factory = factory
        self.errors: dict[str, str] = {}
        self._lock = asyncio.Lock()

    def desired(self, config: ClusterConfig) -> Mapping[str, Workload]:
        return {w.uid: w for w in config.mesh_workloads_on_node(self.proxy.options.node)}

    async def reconcile(self, config: ClusterConfig) -> None:
        async with self._lock:
            desired = self.desired(config)
            for uid, served in list(self.proxy.workloads.items()):
                want = desired.get(uid)
                if want is None or want.ips != served.workload.ips or want.identity != served.workload.identity:
                    await self.proxy.remove_workload(uid)
            for uid, workload in desired.items():
                if uid in self.proxy.workloads:
                    continue
                try:
                    sockets = self.factory.sockets_for(workload)
                    await self.proxy.add_workload(workload, sockets)
                except Exception as e:  # one bad pod must not stop the others
                    if self.errors.get(uid) != str(e):
                        log.error("cannot serve workload %s: %s", workload.ref, e)
                    self.errors[uid] = str(e)
                else:
                    self.errors.pop(uid, None)
            for uid in list(self.errors):
                if uid not in desired:
                    del self.errors[uid]

    def pending(self, config: ClusterConfig) -> list[str]:
        return [w.ref for uid, w in self.desired(config).items() if uid not in self.proxy.workloads]

    def refused(self, config: ClusterConfig) -> list[str]:
        """Errors of pods that are not served because their config is refused (not a passing condition)."""
        out = []
        for uid, w in sorted(self.desired(config).items(), key=lambda kv: kv[1].ref):
            if uid in self.proxy.workloads:
                continue
            try:
                check = getattr(self.factory, "check_addresses", None)
                if callable(check):
                    check(w)
            except ZtunnelError as e:
                out.append(str(e))
        return out


class InpodReadiness(Protocol):
    """What in-pod mode tells readiness (ztunnel.proxy.inpod.InpodClient)."""

    def not_ready(self, served: Collection[str]) -> str: ...


def readiness(
    proxy: NodeProxy, local: LocalWorkloads | None, inpod: InpodReadiness | None = None
) -> Callable[[], tuple[bool, str]]:
    def check() -> tuple[bool, str]:
        if not proxy.config_loaded:
            return False, "config not loaded"
        if proxy.draining:
            return False, "draining"
        if local is not None:
            refused = local.refused(proxy.config)
            if refused:
                return False, "; ".join(refused)
            pending = local.pending(proxy.config)
            if pending:
                return False, f"no listeners/certificates yet for {', '.join(sorted(pending))}"
        if inpod is not None:
            why = inpod.not_ready(proxy.workloads.keys())
            if why:
                return False, why
        ready_for = getattr(proxy.certs, "ready_for", None)
        if callable(ready_for):
            ids = {SpiffeId.parse(s.workload.identity) for s in proxy.workloads.values()}
            if not ready_for(ids):
                return False, "certificates not ready"
        return True, ""

    return check
