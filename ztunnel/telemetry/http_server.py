"""The proxy's three control servers on the shared HTTP/1.1 server: metrics (15020), admin (15000) and
readiness (15021)."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import Metric

from ztunnel.net.http import HttpServer, Request, Response, Routes

log = logging.getLogger("ztunnel.telemetry")


# ---- the three servers the proxy runs -------------------------------------------------------------


class _WithoutCreated:
    """A view of a registry without prometheus-client's `*_created` samples.

    Istio's proxies do not export them, they double the size of every scrape, and turning them off
    globally (`disable_created_metrics()`) would be process-wide state; filtering here is local.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry

    def collect(self) -> Iterator[Metric]:
        for metric in self._registry.collect():
            if any(s.name.endswith("_created") for s in metric.samples):
                copy = Metric(metric.name, metric.documentation, metric.type, metric.unit)
                copy.samples = [s for s in metric.samples if not s.name.endswith("_created")]
                yield copy
            else:
                yield metric


class MetricsServer(HttpServer):
    """Prometheus scrape endpoint: `/metrics` and `/stats/prometheus` (Istio's path)."""

    def __init__(self, host: str, port: int, registry: CollectorRegistry) -> None:
        self.registry = registry
        self._view = _WithoutCreated(registry)
        routes: Routes = {
            "/metrics": {"GET": self._metrics},
            "/stats/prometheus": {"GET": self._metrics},
        }
        super().__init__(host, port, routes, name="metrics")

    def _metrics(self, request: Request) -> Response:
        encoder, content_type = choose_encoder(request.header("accept") or "")
        return Response(200, encoder(self._view), content_type)


LOG_LEVELS = {
    "trace": "debug",
    "debug": "debug",
    "info": "info",
    "warn": "warning",
    "warning": "warning",
    "error": "error",
    "critical": "critical",
    "off": "critical",
}


def _set_root_log_level(level: str) -> None:
    logging.getLogger().setLevel(level.upper())


class AdminServer(HttpServer):
    """Localhost-only admin: `/config_dump`, `POST /quitquitquit` (graceful drain), `/logging`."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        config_dump: Callable[[], Mapping[str, Any]],
        on_quit: Callable[[], Awaitable[None] | None],
        set_log_level: Callable[[str], None] | None = None,
    ) -> None:
        self._config_dump = config_dump
        self._on_quit = on_quit
        self._set_log_level = set_log_level or _set_root_log_level
        routes: Routes = {
            "/": {"GET": self._index},
            "/config_dump": {"GET": self._dump},
            "/quitquitquit": {"POST": self._quit},
            "/logging": {"GET": self._logging, "POST": self._logging},
        }
        super().__init__(host, port, routes, name="admin")

    def _index(self, _request: Request) -> Response:
        return Response.text(
            "GET  /config_dump        workloads, services, policies, certificates (JSON)\n"
            "POST /quitquitquit       drain connections and exit\n"
            "GET  /logging            current log level\n"
            "POST /logging?level=L    set the log level (trace, debug, info, warning, error, off)\n"
        )

    def _dump(self, _request: Request) -> Response:
        return Response.json(self._config_dump())

    def _quit(self, _request: Request) -> Response:
        return Response(200, b"OK\n", after=self._on_quit)

    def _logging(self, request: Request) -> Response:
        requested = request.query.get("level")
        if requested is None:
            current = logging.getLevelName(logging.getLogger().getEffectiveLevel()).lower()
            return Response.text(f"level={current}")
        level = LOG_LEVELS.get(requested.lower())
        if level is None:
            return Response.text(f"unknown level {requested!r}; use one of {', '.join(LOG_LEVELS)}", 400)
        self._set_log_level(level)
        log.info("log level changed", extra={"level": level})
        return Response.text(f"level={level}")


class ReadinessServer(HttpServer):
    """`/healthz/ready`: 200 `ready` or 503 with the reason, for kubelet probes."""

    def __init__(self, host: str, port: int, is_ready: Callable[[], bool | tuple[bool, str]]) -> None:
        self._is_ready = is_ready
        super().__init__(host, port, {"/healthz/ready": {"GET": self._ready}}, name="readiness")

    def _ready(self, _request: Request) -> Response:
        try:
            state = self._is_ready()
        except Exception as e:  # a broken check reports not-ready, never a crash
            log.exception("readiness check failed")
            return Response.text(f"not ready: readiness check failed: {e}", 503)
        ready, reason = state if isinstance(state, tuple) else (state, "")
        if ready:
            return Response.text("ready")
        return Response.text(f"not ready: {reason}" if reason else "not ready", 503)
