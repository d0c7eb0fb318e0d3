"""`--dry-run`: the plan, the tools found, the sample cluster configs loaded, and a table rendered from
synthetic figures. Checks the harness without load and without root (tests/unit/test_telemetry_bench.py)."""

from __future__ import annotations

import argparse
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import TextIO

from bench import report
from bench.isolation import can_use_netns
from bench.settings import Settings
from bench.tools import BENCH_TOOLS, ztunnel_help
from bench.topology.lab import LAB_YAML, lab_available
from bench.topology.local import CLUSTER_YAML


def dry_run(args: argparse.Namespace, s: Settings, out: TextIO) -> int:
    """Show the plan and render a report from synthetic figures: checks the harness without load."""
    wanted = args.paths.split(",")
    per_rep = 2 * s.throughput_secs + s.latency_secs + s.latency_warmup + s.connrate_secs + 6
    per_rep += 2 * s.http_secs + 3  # the HTTP steps (only the HTTP paths run them; an upper bound)
    estimate = len(wanted) * s.reps * per_rep + len(wanted) * 15 + 20
    print(f"plan: paths {', '.join(wanted)}; {s.reps} repetitions; settings {asdict(s)}", file=out)
    print(f"plan: about {estimate / 60:.1f} minutes", file=out)
    topology = args.topology if args.topology != "auto" else ("lab" if lab_available() else "local")
    isolation = "netns" if can_use_netns() and not args.no_netns else "host loopback"
    print(f"plan: topology {topology}{'' if topology == 'lab' else ' (' + isolation + ')'}", file=out)
    for tool in (*BENCH_TOOLS, "ip"):
        print(f"tool {tool}: {shutil.which(tool) or 'missing'}", file=out)
    print(f"ztunnel proxy command: {'present' if ztunnel_help('proxy') else 'not available yet'}", file=out)
    # The sample config must load: the ztunnel path depends on it.
    from ztunnel.config.loader import load_files

    with tempfile.TemporaryDirectory() as d:
        for name, text in (("local", CLUSTER_YAML), ("lab", LAB_YAML)):
            cfg = Path(d) / f"{name}.yaml"
            cfg.write_text(text)
            config = load_files([str(cfg)])
            client = config.workload("bench", "client")
            assert client is not None and client.enrolled, f"the {name} cluster lost the mesh client pod"
            print(f"{name} cluster: {len(config.workloads)} pods, mesh client {client.identity}", file=out)
    tcp_fake = {
        "direct": [9.0, 20.0, 60, 90, 200, None, None, None, None, 6000, 3.0],
        "haproxy": [3.0, 4.5, 150, 250, 500, 0.05, 0.04, 8.0, 30.0, 3000, 6.0],
        "haproxy-tcp": [6.0, 9.0, 100, 150, 300, 0.02, 0.02, 8.0, 30.0, 4000, 4.0],
        "ztunnel": [2.0, 3.0, 300, 500, 1200, 0.15, 0.12, 50.0, 12.0, 2000, 9.0],
    }
    # HTTP/1.1: req/s, busiest proxy vCPU, req/s per core, p50, p99, CPU s per 1,000; then h2c: req/s, per core,
    # p50, p99, CPU s per 1,000 (the HTTP paths only; the app speaks HTTP/1.1, so direct has no h2c figures)
    http_fake = {
        "direct": [40000, None, None, 60, 200, None, None, None, None, None, None],
        "waypoint": [1500, 0.9, 1700, 900, 3000, 0.9, 1200, 1400, 1000, 3500, 1.0],
        "haproxy-http": [9000, 0.6, 15000, 250, 600, 0.1, 20000, 30000, 300, 700, 0.12],
    }
    n_tcp = len(report.METRICS) - len(http_fake["direct"])
    fake = {
        p: [*tcp_fake.get(p, [None] * n_tcp), *http_fake.get(p, [None] * len(http_fake["direct"]))]
        for p in [*tcp_fake, *[h for h in http_fake if h not in tcp_fake]]
    }
    samples = {
        p: {
            m.key: [None if v is None else v * f for f in (0.95, 1.0, 1.05)]
            for m, v in zip(report.METRICS, vs, strict=True)
        }
        for p, vs in fake.items()
    }
    summary = report.summarize_all(samples)
    policy_l7 = {"result": {"results": [{"mode": "l7", "policies": 1000, "median_us": 9.0}]}, "summary": "9 us"}
    result = {
        "meta": {"date": "dry run", "quick": s.quick, "reps": 3},
        "paths": {p: {"available": True, "note": ""} for p in fake},
        "summary": summary,
        "ratios": report.ratios(summary, list(fake)),
        "targets": report.evaluate_targets(summary)
        + report.waypoint_targets(summary)
        + report.policy_targets(
            {"result": {"results": [{"policies": 100, "median_us": 9.0}, {"policies": 10000, "median_us": 12.0}]}}
        )
        + report.policy_l7_targets(policy_l7),
        "policy_l7": policy_l7,
    }
    print(report.render_markdown(result), file=out)
    return 0
