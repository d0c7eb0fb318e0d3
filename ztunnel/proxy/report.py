"""Reporting a proxied connection: Istio metrics (both reporters) and one access log line.

Called once when a connection ends or is refused, never per chunk of data.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import Any

from ztunnel.config.model import Service, Workload
from ztunnel.hbone.client import PoolKey, SecureNamingError, TlsHandshakeError
from ztunnel.hbone.protocol import IDENTITY_ERROR, TLS_FAILURE, ConnectRequest
from ztunnel.hbone.server import InboundTunnel
from ztunnel.policy.decision import Decision
from ztunnel.proxy.labels import ConnectionLabelCache
from ztunnel.proxy.tracking import TrackedConnection
from ztunnel.telemetry.accesslog import AccessLog
from ztunnel.telemetry.metrics import UNKNOWN, ConnectionLabels, ProxyMetrics

log = logging.getLogger("ztunnel.proxy")

# Envoy/Istio response flags used in metrics and the access log.
FLAG_NONE = "-"
FLAG_DENY = "DENY"  # authorization (or STRICT peer authentication) refused the connection
FLAG_NO_ROUTE = "NR"  # no route: a service without endpoints, an unknown or non-local destination
FLAG_UPSTREAM_FAILURE = "UF"  # could not connect upstream (app, passthrough, or the HBONE peer)
FLAG_BAD_REQUEST = "BR"  # malformed request (HBONE 400)
FLAG_TLS_FAILURE = TLS_FAILURE  # the TLS handshake with the destination's proxy failed
FLAG_IDENTITY_ERROR = IDENTITY_ERROR  # the destination's proxy is not who the destination should be


def _known(label: str) -> str | None:
    return None if label == UNKNOWN else label


def format_addr(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class ConnectionReporter:
    """Metrics (Istio TCP counters with both reporters) and the access log, once per connection."""

    def __init__(self, metrics: ProxyMetrics | None, access_log: AccessLog) -> None:
        self.metrics = metrics
        self.access_log = access_log
        self.labels = ConnectionLabelCache()  # build a connection's labels through this

    def peer_over_budget(self) -> None:
        """A peer (identity, address) went over its memory budget (hbone `PeerBudget`): a stream of it was reset."""
        if self.metrics is not None:
            self.metrics.connection_refused("peer_memory_budget")

    def over_connection_limit(self, reason: str) -> None:
        """A new HBONE connection was closed after its handshake: its peer (identity, address) already held
        its maximum of connections ("peer_connection_limit"), or the server did ("server_connection_limit")."""
        if self.metrics is not None:
            self.metrics.connection_refused(reason)

    def handshake_rejected(self, reason: str) -> None:
        """The HBONE server refused a client: IDENTITY_ERROR after the handshake (identity or trust domain),
        otherwise the reason its handshake failed (expired, untrusted, timeout...)."""
        if self.metrics is not None:
            if reason == IDENTITY_ERROR:
                self.metrics.tls_failure(reason)
                reason = "identity"
            self.metrics.handshake_failure(reason)

    def refusal(self, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.connection_refused(reason)

    def inbound_refusal(
        self,
        tunnel: InboundTunnel,
        destination: Workload | None,
        service: Service | None,
        flag: str,
        reason: str,
        started: float,
    ) -> None:
        log.info("HBONE request refused", extra={"peer_identity": tunnel.peer_identity.uri, "reason": reason})
        target = tunnel.request.target if isinstance(tunnel.request, ConnectRequest) else None
        self.access_log.log_connection(
            direction="inbound",
            traceparent=tunnel.request.traceparent if isinstance(tunnel.request, ConnectRequest) else None,
            src_addr=format_addr(*tunnel.peer_address),
            dst_addr=str(target) if target else "-",
            src_identity=tunnel.peer_identity.uri,
            dst_identity=destination.identity if destination else None,
            dst_workload=destination.ref if destination else None,
            response_flags=flag,
            duration=time.monotonic() - started,
            error=reason,
        )

    def denied(
        self,
        labels: ConnectionLabels,
        direction: Any,
        client: tuple[str, int],
        dst: Any,
        decision: Decision,
        started: float,
        source_workload: Workload | None,
        traceparent: str | None = None,
    ) -> None:
        dst_addr = dst if isinstance(dst, tuple) else (dst.ip, dst.port)
        self.connection(
            labels,
            direction,
            client,
            dst_addr,
            FLAG_DENY,
            started,
            count_open=True,
            policy=decision.policy,
            error=decision.reason,
            src_identity=labels.source_principal if labels.source_principal != "unknown" else None,
            dst_identity=labels.destination_principal,
            src_workload=source_workload,
            traceparent=traceparent,
        )

    def connection(
        self,
        labels: ConnectionLabels,
        direction: Any,
        client: tuple[str, int],
        dst: tuple[str, int],
        flag: str,
        started: float,
        *,
        received: int = 0,
        sent: int = 0,
        opened: bool = False,
        count_open: bool = False,
        destination: Workload | None = None,
        service: Service | None = None,
        dst_identity: str | None = None,
        src_identity: str | None = None,
        src_workload: Workload | None = None,
        policy: str | None = None,
        error: str | None = None,
        flushed: tuple[int, int] = (0, 0),
        traceparent: str | None = None,
    ) -> None:
        """One connection ended (or was refused): metrics (opened if not yet) + one access log line.

        `flushed` is the (sent, received) the periodic flush already counted; the log line has the totals.
        """
        if self.metrics is not None:
            if count_open and not opened:
                self.metrics.connection_opened(labels)
                opened = True
            if opened:
                self.metrics.connection_closed(labels, sent - flushed[0], received - flushed[1], flag)
        if not self.access_log.enabled:
            return  # skip formatting the addresses and names of a line nobody writes
        self.access_log.log_connection(
            direction=direction,
            src_addr=format_addr(*client),
            dst_addr=format_addr(*dst),
            src_identity=src_identity,
            dst_identity=dst_identity,
            src_workload=src_workload.ref if src_workload else None,
            dst_workload=destination.ref if destination else None,
            dst_service=service.hostname if service else _known(labels.destination_service),
            sent_bytes=sent,
            received_bytes=received,
            duration=time.monotonic() - started,
            response_flags=flag,
            policy=policy,
            error=error,
            traceparent=traceparent,
        )

    def relayed(
        self,
        conn: TrackedConnection,
        client: tuple[str, int],
        dst: tuple[str, int],
        started: float,
        *,
        destination: Workload | None,
        dst_identity: str | None,
        src_identity: str | None,
        src_workload: Workload | None,
        service: Service | None = None,
        traceparent: str | None = None,
    ) -> None:
        """A relayed connection ended: bytes, error and whether a policy change closed it come from `conn`.

        "received" is what the client side sent (a -> b), "sent" what went back to it."""
        closed_by = conn.denied_by
        self.connection(
            conn.labels,
            conn.direction,
            client,
            dst,
            FLAG_DENY if closed_by else FLAG_NONE,
            started,
            received=conn.counters.a_to_b,
            sent=conn.counters.b_to_a,
            opened=True,
            destination=destination,
            service=service,
            dst_identity=dst_identity,
            src_identity=src_identity,
            src_workload=src_workload,
            policy=closed_by,
            error="closed by a policy change" if closed_by else conn.counters.error,
            flushed=(conn.flushed_sent, conn.flushed_received),
            traceparent=traceparent,
        )

    def flush_bytes(self, connections: Iterable[TrackedConnection]) -> None:
        """Add open connections' bytes since the last flush to the byte counters, one call per label set."""
        if self.metrics is None:
            return
        totals: dict[ConnectionLabels, list[int]] = {}
        for conn in connections:
            sent, received = conn.take_unflushed()
            if sent or received:
                total = totals.setdefault(conn.labels, [0, 0])
                total[0] += sent
                total[1] += received
        for labels, (sent, received) in totals.items():
            self.metrics.add_bytes(labels, sent, received)

    def pool_failure(self, reason: str, key: PoolKey, error: Exception) -> None:
        """A pooled HBONE connection could not be made (counted once per handshake, not per waiter)."""
        if self.metrics is None:
            return
        if isinstance(error, (SecureNamingError, TlsHandshakeError)):
            self.metrics.tls_failure(error.reason)
        else:
            self.metrics.connection_refused("hbone_connect")
