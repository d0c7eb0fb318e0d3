"""One benchmark run: set up the paths on a topology, measure each in turn per repetition (so slow drifts of a
noisy machine hit every path), restart a path that stops passing traffic, and assemble the result.

Timings are never asserted in tests: this is a report, not a gate.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import resource
import shutil
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench import report
from bench.accounting import cpu_rates, host_cpu_ticks, raise_fd_limit, rss_mb, steal_percent
from bench.paths.base import PathContext, PathSetup, Topology, probe_path
from bench.paths.registry import build as build_path
from bench.processes import ProcessGroup, log
from bench.scaling import worker_scaling
from bench.settings import Settings
from bench.steps import held_connections_rss, rep_steps, run_policy_bench
from bench.tools import tool_versions
from bench.topology.local import LocalTopology


def measure(args: argparse.Namespace, s: Settings, topology: Topology) -> dict[str, Any]:
    """One run on TOPOLOGY: every path set up, every step per repetition, then held connections, the
    optional figures, and the result (samples, summary, ratios, target checks, meta)."""
    raise_fd_limit()
    workdir = Path(tempfile.mkdtemp(prefix="ztbench-"))
    group = ProcessGroup(workdir)
    started = time.monotonic()
    cpu_at_start = host_cpu_ticks()
    load_at_start = os.getloadavg()[0]
    paths: list[PathSetup] = []
    samples: dict[str, dict[str, list[float | None]]] = {}
    holds: dict[str, Any] = {}
    errors: list[str] = []
    idle_rss: dict[str, dict[str, float]] = {}
    policy = None
    policy_l7 = None
    scaling: dict[str, Any] | None = None
    try:
        # haproxy needs two descriptors per proxied connection and refuses to start past the limit
        fd_limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        maxconn = min(s.hold_count + 500, (fd_limit - 300) // 2)
        topology.start(group)
        ctx = PathContext(topology, group, maxconn)
        for name in args.paths.split(","):
            log(f"setting up path {name}")
            try:
                path = build_path(name, ctx)
            except Exception as e:
                path = PathSetup(name, available=False, note=f"setup failed: {e}"[:500])
            if not path.available:
                log(f"  {name}: not available — {path.note}")
            paths.append(path)
            samples[name] = {m.key: [] for m in report.METRICS} | {"connrate_busiest_proxy_vcpu": []}
        live = [p for p in paths if p.available]
        time.sleep(1.0)  # let the proxies settle before the idle RSS reading
        idle_rss = {p.name: {n: rss_mb(pid) for n, pid in p.proxy_pids().items()} for p in live}
        steps = rep_steps(group, s)

        for rep in range(1, s.reps + 1):
            for index, first in enumerate(live):
                log(f"rep {rep}/{s.reps} {first.name}")
                row = samples[first.name]
                row["rss_idle_mb"].append(max(idle_rss[first.name].values(), default=None))
                for what, step in steps:
                    path = live[index]
                    try:
                        for k, v in step(path).items():
                            row[k].append(v)
                        continue
                    except Exception as e:
                        errors.append(f"rep {rep} {path.name} {what}: {e}"[:400])
                        log(f"  {what} failed: {e}")
                    if path.proxy_pids() and not probe_path(path):
                        busy = cpu_rates(path.proxy_pids(), 1.0)
                        note = (
                            f"rep {rep} {path.name}: the path stopped passing traffic after {what} "
                            f"(proxy CPU while stalled: {busy}); restarted it"
                        )
                        errors.append(note)
                        log(f"  {note}")
                        path.stop()
                        if path.restart_hook is not None:
                            path.restart_hook()
                        rebuilt = build_path(path.name, ctx)
                        if rebuilt.available:
                            live[index] = rebuilt
                        else:
                            errors.append(f"{path.name}: restart failed: {rebuilt.note}"[:400])
                time.sleep(0.3)
        for path in live:
            if not path.proxy_pids() or not path.echo_target:  # an HTTP-only path holds no echo connections
                continue
            # haproxy, and a proxy serving both ends (same node), hold two descriptors per connection
            two_fds = path.name.startswith("haproxy") or path.name.endswith(report.SAME_NODE)
            count = min(s.hold_count, maxconn - 100) if two_fds else s.hold_count
            log(f"{path.name}: holding {count} connections")
            try:
                holds[path.name] = held_connections_rss(path, count)
                samples[path.name]["rss_per_conn_kib"].append(holds[path.name]["rss_per_conn_kib"])
            except Exception as e:
                errors.append(f"{path.name} hold: {e}"[:400])
        for path in live:
            for name, pid in path.proxy_pids().items():
                if not Path(f"/proc/{pid}").exists():
                    errors.append(f"{path.name} proxy {name} (pid {pid}) died during the run")
        if args.worker_scaling:
            if isinstance(topology, LocalTopology):
                for path in live:
                    if path.name == "ztunnel":
                        path.stop()  # the scaling pairs use the same addresses
                scaling = worker_scaling(group, s)
            else:
                why = "needs --topology local (the lab's proxies run in-pod mode, where --workers > 1 is refused)"
                scaling = {"unavailable": why}
        if not args.skip_policy:
            log("policy benchmark (bench/policy_bench.py)")
            policy = run_policy_bench(s.quick)
            if "waypoint" in args.paths.split(","):
                log("L7 policy benchmark (bench/policy_bench.py --mode l7, 1,000 policies)")
                policy_l7 = run_policy_bench(s.quick, ("--mode", "l7", "--sizes", "1000"))
    finally:
        group.close()
        topology.close()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)

    summary = report.summarize_all(samples)
    available = [p.name for p in paths if p.available]
    now = dt.datetime.now(dt.UTC)
    return {
        "meta": {
            "date": now.strftime("%Y-%m-%d %H:%M UTC"),
            "quick": s.quick,
            "reps": s.reps,
            "settings": asdict(s),
            "mode": topology.mode,
            "host": {
                "kernel": platform.release(),
                "cpus": os.cpu_count(),
                "python": platform.python_version(),
                "machine": platform.machine(),
            },
            "tools": {**tool_versions(), "latency": "bench/loadgen.py latency (open-loop fixed rate, uvloop)"},
            "wall_seconds": round(time.monotonic() - started, 1),
            "host_steal_percent": steal_percent(cpu_at_start, host_cpu_ticks()),
            # runnable tasks (1-minute average) at the start and the end: on 2 cores, anything well above the
            # bench's own 3-5 processes means other work shared the machine (latency tails are then its)
            "host_load_average": [round(load_at_start, 2), round(os.getloadavg()[0], 2)],
            "errors": errors,
        },
        "paths": {
            p.name: {
                "available": p.available,
                "note": p.note,
                "entry": p.entry,
                "idle_rss_mb": idle_rss.get(p.name) if p.available else None,
            }
            for p in paths
        },
        "samples": samples,
        "summary": summary,
        "ratios": report.ratios(summary, available),
        "targets": (report.evaluate_targets(summary) if "ztunnel" in available else [])
        + (report.waypoint_targets(summary) if "waypoint" in available else [])
        + report.policy_targets(policy)
        + report.policy_l7_targets(policy_l7),
        "holds": holds,
        "policy": policy,
        "policy_l7": policy_l7,
        "worker_scaling": scaling,
    }
