"""`ztunnel proxy --workers N`: N proxy processes serving one node, one core each.

Why processes: one asyncio loop is one core; the kernel spreads new connections over sockets bound with
SO_REUSEPORT, so N workers that each bind every pod's 15008/15006/15080 share the load with no hand-off.

The process the user started becomes the *supervisor*: it runs no data plane. It starts each worker as a
child (`python -c <boot> <same argv> --worker-index i --worker-fd F`), holds one end of a socketpair per
worker (the worker reports its operator ports on it; EOF on either side means the other is gone, so a
worker whose supervisor was SIGKILLed stops too), restarts a worker that dies (backoff 0.5 s doubling to
10 s, reset after 30 s of life), forwards SIGTERM/SIGINT (each worker drains on its own) and stops every
child, by pid, before it exits.

Operators see one proxy: the supervisor serves metrics, admin and readiness on the configured addresses;
workers serve theirs on 127.0.0.1 port 0 and the supervisor asks them on each request:

- `/metrics`: the workers' expositions merged (see `merge_expositions`: counters and histograms summed per
  name+labels; gauges summed except a few that every worker holds alike), plus per-worker series
  `ztunnel_worker_up{worker,pid}`, `ztunnel_worker_restarts_total{worker}` and
  `ztunnel_worker_tcp_connections_opened_total{worker}`. A restarted worker's counters start again at 0, so
  a merged counter can drop: Prometheus' rate() treats that as a counter reset.
- `/healthz/ready`: ready when every worker is running and answers ready.
- `/config_dump`: worker 0's dump plus `workers` (index, pid, ports, restarts, ready).
- `POST /quitquitquit`: drain every worker, then exit. `/logging`: set on the supervisor and every worker.

Cost: each worker has its own CertificateManager, so every pod identity gets N certificates (N signatures
from the in-process CA, or N CSRs to a remote CA) and N HBONE pools to each peer node.
In-pod mode is refused (see `ztunnel.proxy.main._workers`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import signal
import socket
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.exposition import generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from ztunnel.net.http import HttpServer, Request, Response, Routes, http_request_async
from ztunnel.proxy.settings import ProxySettings, ProxySettingsError
from ztunnel.telemetry.http_server import LOG_LEVELS

log = logging.getLogger("ztunnel.proxy")

# The child's entry point: the same CLI, so the worker parses exactly the argv the user gave.
WORKER_BOOT = "import sys; from ztunnel.cli import main; sys.exit(main())"
WORKER_HOST = "127.0.0.1"  # where workers serve their own metrics/admin/readiness (port 0)
REPORT_TIMEOUT = 30.0  # a worker that has not reported its ports by then is killed and restarted
WORKER_HTTP_TIMEOUT = 3.0  # per request from the supervisor to a worker
BACKOFF_MIN = 0.5
BACKOFF_MAX = 10.0
HEALTHY_LIFETIME = 30.0  # a worker that lived this long restarts at the minimum backoff again
STOP_GRACE = 5.0  # beyond --drain-timeout, before a worker that does not exit is SIGKILLed
USAGE_ERROR = 2  # a worker exiting with this before it ever reported: bad flags or config; do not retry

# Gauges every worker holds with the same meaning (each serves every pod, loads the same files): summing
# them would multiply by N. Everything else is summed (connections, pool sizes, counters, histograms).
GAUGE_MAX = frozenset({"ztunnel_pods_served", "ztunnel_config_age_seconds"})
GAUGE_MIN = frozenset({"ztunnel_config_last_load_timestamp_seconds", "ztunnel_certificate_expiry_timestamp_seconds"})


# ---- worker side --------------------------------------------------------------------------------------
class SupervisorChannel:
    """A worker's end of the socketpair: report the operator ports once; EOF means the supervisor is gone."""

    def __init__(self, fd: int) -> None:
        self._sock = socket.socket(fileno=fd)
        self._sock.setblocking(False)

    async def report(self, ports: dict[str, int]) -> None:
        loop = asyncio.get_running_loop()
        line = json.dumps({"pid": os.getpid(), "ports": ports}) + "\n"
        await loop.sock_sendall(self._sock, line.encode())

    async def wait_closed(self) -> None:
        """Returns when the supervisor closes its end (or dies)."""
        loop = asyncio.get_running_loop()
        with contextlib.suppress(OSError):
            while await loop.sock_recv(self._sock, 4096):
                pass

    def close(self) -> None:
        self._sock.close()


# ---- merging expositions ------------------------------------------------------------------------------
def merge_expositions(texts: Sequence[str]) -> list[Metric]:
    """Merge Prometheus text expositions of N workers into one set of metric families.

    Samples with identical name and labels are summed, except gauges in GAUGE_MAX (max) and GAUGE_MIN
    (min). Families keep the first worker's help and type; the order is first-seen.
    """
    families: dict[str, Metric] = {}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for text in texts:
        for fam in text_string_to_metric_families(text):
            merged = families.get(fam.name)
            if merged is None:
                merged = families[fam.name] = Metric(fam.name, fam.documentation, fam.type, fam.unit)
                values[fam.name] = {}
            combine = _combiner(fam.name, fam.type)
            acc = values[fam.name]
            for s in fam.samples:
                key = (s.name, tuple(sorted(s.labels.items())))
                acc[key] = s.value if key not in acc else combine(acc[key], s.value)
    for name, merged in families.items():
        merged.samples = [Sample(n, dict(labels), v, None, None) for (n, labels), v in values[name].items()]
    return list(families.values())


def _combiner(name: str, kind: str):  # type: ignore[no-untyped-def]
    if kind == "gauge" and name in GAUGE_MAX:
        return max
    if kind == "gauge" and name in GAUGE_MIN:
        return min
    return lambda a, b: a + b


def _counter_sum(text: str, family: str) -> float:
    total = 0.0
    for fam in text_string_to_metric_families(text):
        if fam.name == family:
            total += sum(s.value for s in fam.samples if s.name == family + "_total" and not math.isnan(s.value))
    return total


class _Families:
    """A collector-shaped view of already merged families, for `generate_latest`."""

    def __init__(self, families: Iterable[Metric]) -> None:
        self._families = list(families)

    def collect(self) -> Iterable[Metric]:
        return self._families


# ---- supervisor side ----------------------------------------------------------------------------------
@dataclass
class WorkerSlot:
    """One worker index; its process changes on restart."""

    index: int
    process: asyncio.subprocess.Process | None = None
    ports: dict[str, int] = field(default_factory=dict)  # metrics/admin/readiness on WORKER_HOST, once reported
    restarts: int = 0
    reported: bool = False  # has any process in this slot ever reported (a later exit 2 is then not a usage error)

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None and self.process.returncode is None else None

    def describe(self) -> dict[str, Any]:
        return {"index": self.index, "pid": self.pid, "ports": dict(self.ports), "restarts": self.restarts}


async def http_get(port: int, path: str, method: str = "GET") -> tuple[int, bytes]:
    """One request to a worker's operator port on WORKER_HOST; (0, b"") when it cannot be asked."""
    try:
        response = await http_request_async(WORKER_HOST, port, method, path, timeout=WORKER_HTTP_TIMEOUT)
    except OSError:  # refused, timed out, or not an HTTP response
        return 0, b""
    return response.status, response.body


class Supervisor:
    """Starts, watches and stops the worker processes, and answers the operator ports for all of them."""

    def __init__(self, settings: ProxySettings, argv: Sequence[str]) -> None:
        self.settings = settings
        self.argv = list(argv)
        self.slots = [WorkerSlot(i) for i in range(settings.workers)]
        self.stop = asyncio.Event()
        self.exit_code = 0

    def worker_command(self, index: int, fd: int) -> list[str]:
        return [sys.executable, "-c", WORKER_BOOT, *self.argv, "--worker-index", str(index), "--worker-fd", str(fd)]

    # -- lifecycle --
    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        s = self.settings
        servers = [
            HttpServer(
                *s.metrics_addr,
                {"/metrics": {"GET": self._metrics}, "/stats/prometheus": {"GET": self._metrics}},
                name="metrics",
            ),
            HttpServer(*s.admin_addr, self._admin_routes(), name="admin"),
            HttpServer(*s.readiness_addr, {"/healthz/ready": {"GET": self._ready}}, name="readiness"),
        ]
        started: list[HttpServer] = []
        keepers: list[asyncio.Task[None]] = []
        try:
            for server in servers:
                try:
                    await server.start()
                except OSError as e:
                    raise ProxySettingsError(
                        f"cannot listen for the {server.name} server on {server.host}: {e}"
                    ) from None
                started.append(server)
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.stop.set)
            keepers = [loop.create_task(self._keep(slot)) for slot in self.slots]
            log.info(
                "proxy supervisor running",
                extra={"node": s.node, "workers": s.workers, **{srv.name: srv.address for srv in started}},
            )
            await self.stop.wait()
            log.info("stopping workers", extra={"pids": [slot.pid for slot in self.slots if slot.pid]})
            await self._stop_all()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
            self.stop.set()
            await self._stop_all()
            for t in keepers:
                t.cancel()
            await asyncio.gather(*keepers, return_exceptions=True)
            for server in reversed(started):
                await server.close()
        return self.exit_code

    async def _stop_all(self) -> None:
        procs = [slot.process for slot in self.slots if slot.process is not None and slot.process.returncode is None]
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        if not procs:
            return
        _, stuck = await asyncio.wait(
            [asyncio.ensure_future(p.wait()) for p in procs], timeout=self.settings.drain_timeout + STOP_GRACE
        )
        for proc in procs:
            if proc.returncode is None:
                log.warning("worker did not stop in time; killing it", extra={"pid": proc.pid})
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        for t in stuck:
            await t

    async def _keep(self, slot: WorkerSlot) -> None:
        """Run the worker for `slot` until stopping; restart it with backoff when it dies."""
        backoff = BACKOFF_MIN
        while not self.stop.is_set():
            started_at = time.monotonic()
            code = await self._run_once(slot)
            if self.stop.is_set():
                return
            if code == USAGE_ERROR and not slot.reported:
                log.error("worker %d failed to start (exit %d); stopping", slot.index, code)
                self.exit_code = code
                self.stop.set()
                return
            if time.monotonic() - started_at >= HEALTHY_LIFETIME:
                backoff = BACKOFF_MIN
            log.warning(
                "worker exited; restarting it",
                extra={"worker": slot.index, "status": code, "restart_in_s": backoff},
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), backoff)
            backoff = min(backoff * 2, BACKOFF_MAX)
            slot.restarts += 1

    async def _run_once(self, slot: WorkerSlot) -> int:
        ours, theirs = socket.socketpair()
        try:
            slot.process = await asyncio.create_subprocess_exec(
                *self.worker_command(slot.index, theirs.fileno()), pass_fds=(theirs.fileno(),)
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        proc = slot.process
        log.info("worker started", extra={"worker": slot.index, "pid": proc.pid})
        reader, writer = await asyncio.open_connection(sock=ours)
        try:
            waiter = asyncio.ensure_future(proc.wait())
            reporter = asyncio.ensure_future(reader.readline())
            done, _ = await asyncio.wait(
                {waiter, reporter}, timeout=REPORT_TIMEOUT, return_when=asyncio.FIRST_COMPLETED
            )
            if reporter in done and reporter.result():
                try:
                    report = json.loads(reporter.result())
                    slot.ports = {str(k): int(v) for k, v in report["ports"].items()}
                    slot.reported = True
                except (ValueError, KeyError, TypeError, AttributeError):
                    log.error("worker sent a bad report; restarting it", extra={"worker": slot.index})
                    proc.kill()
            elif not done:
                log.error("worker did not report its ports in time; restarting it", extra={"worker": slot.index})
                proc.kill()
            else:
                reporter.cancel()
            return await waiter
        finally:
            slot.ports = {}
            writer.close()

    # -- operator endpoints --
    def _live(self) -> list[WorkerSlot]:
        return [slot for slot in self.slots if slot.pid is not None and slot.ports]

    async def _metrics(self, _request: Request) -> Response:
        live = self._live()
        answers = await asyncio.gather(*(http_get(slot.ports["metrics"], "/metrics") for slot in live))
        texts: list[str] = []
        per_worker: list[tuple[WorkerSlot, float]] = []
        for slot, (status, body) in zip(live, answers, strict=True):
            if status == 200:
                text = body.decode()
                texts.append(text)
                per_worker.append((slot, _counter_sum(text, "istio_tcp_connections_opened")))
        families = merge_expositions(texts)
        up = Metric("ztunnel_worker_up", "Worker processes answering the supervisor (1 per worker)", "gauge")
        restarts = Metric("ztunnel_worker_restarts", "Times the supervisor restarted each worker", "counter")
        opened = Metric(
            "ztunnel_worker_tcp_connections_opened",
            "Sum of each worker's istio_tcp_connections_opened_total (since the worker's start)",
            "counter",
        )
        answered = {slot.index for slot, _ in per_worker}
        for slot in self.slots:
            labels = {"worker": str(slot.index)}
            up.add_sample("ztunnel_worker_up", {**labels, "pid": str(slot.pid or "")}, float(slot.index in answered))
            restarts.add_sample("ztunnel_worker_restarts_total", labels, float(slot.restarts))
        for slot, count in per_worker:
            opened.add_sample("ztunnel_worker_tcp_connections_opened_total", {"worker": str(slot.index)}, count)
        body = generate_latest(_Families([*families, up, restarts, opened]))
        return Response(200, body, "text/plain; version=0.0.4; charset=utf-8")

    async def _ready(self, _request: Request) -> Response:
        reasons: list[str] = []
        for slot in self.slots:
            if slot.pid is None or not slot.ports:
                reasons.append(f"worker {slot.index}: not running")
                continue
            status, body = await http_get(slot.ports["readiness"], "/healthz/ready")
            if status != 200:
                reasons.append(f"worker {slot.index}: {body.decode(errors='replace').strip() or 'no answer'}")
        if reasons:
            return Response.text("not ready: " + "; ".join(reasons), 503)
        return Response.text("ready")

    def _admin_routes(self) -> Routes:
        return {
            "/": {"GET": self._index},
            "/config_dump": {"GET": self._dump},
            "/quitquitquit": {"POST": self._quit},
            "/logging": {"GET": self._logging, "POST": self._logging},
        }

    def _index(self, _request: Request) -> Response:
        return Response.text(
            "GET  /config_dump        worker 0's config dump, plus the workers (index, pid, ports, restarts)\n"
            "POST /quitquitquit       drain every worker and exit\n"
            "GET  /logging            current log level\n"
            "POST /logging?level=L    set the log level in the supervisor and every worker\n"
        )

    async def _dump(self, _request: Request) -> Response:
        dump: dict[str, Any] = {}
        first = self.slots[0]
        if first.ports:
            status, body = await http_get(first.ports["admin"], "/config_dump")
            if status == 200:
                with contextlib.suppress(ValueError):
                    dump = json.loads(body)
        workers = []
        for slot in self.slots:
            ready = bool(slot.ports) and (await http_get(slot.ports["readiness"], "/healthz/ready"))[0] == 200
            workers.append({**slot.describe(), "ready": ready})
        return Response.json({**dump, "supervisor_pid": os.getpid(), "workers": workers})

    def _quit(self, _request: Request) -> Response:
        return Response(200, b"OK\n", after=self.stop.set)

    async def _logging(self, request: Request) -> Response:
        requested = request.query.get("level")
        if requested is None or request.method != "POST":
            current = logging.getLevelName(logging.getLogger().getEffectiveLevel()).lower()
            return Response.text(f"level={current}")
        level = LOG_LEVELS.get(requested.lower())
        if level is None:
            return Response.text(f"unknown level {requested!r}; use one of {', '.join(LOG_LEVELS)}", 400)
        logging.getLogger().setLevel(level.upper())
        await asyncio.gather(
            *(http_get(slot.ports["admin"], f"/logging?level={level}", "POST") for slot in self._live())
        )
        return Response.text(f"level={level}")


async def run_supervisor(settings: ProxySettings, argv: Sequence[str]) -> int:
    """The `ztunnel proxy --workers N` process (N > 1): checks the config once, then supervises."""
    from ztunnel.config.loader import ConfigError
    from ztunnel.config.source import FileConfigSource

    if settings.source == "file":  # with --source kubernetes each worker lists the API and fails alone
        try:
            FileConfigSource(settings.files, trust_domain=settings.trust_domain).load()
        except ConfigError as e:
            raise ProxySettingsError(f"cannot load the config: {e}") from None
    return await Supervisor(settings, argv).run()
