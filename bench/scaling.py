"""Throughput scaling, 1 vs 2 workers (`--worker-scaling`, local topology only): a fresh proxy pair at each
worker count, `iperf3 -P 4` through it, and the CPU of both proxies' process trees; and its table."""

from __future__ import annotations

import os
import time
from typing import Any

from bench import report
from bench.accounting import cpu_seconds
from bench.paths.ztunnel import local_pair
from bench.processes import ProcessGroup, log
from bench.settings import Settings
from bench.steps import iperf3

SCALING_WORKERS = (1, 2)
SCALING_STREAMS = 4


def worker_scaling(group: ProcessGroup, s: Settings) -> dict[str, Any]:
    """Throughput scaling, 1 vs 2 workers: `iperf3 -P 4` through the pair, both proxies at `--workers N`.

    Local topology only: the lab's proxies run in-pod mode, which `--workers` > 1 refuses. Each worker count
    gets a fresh pair (the main ztunnel path must be stopped first: same addresses); reps alternate so a drift
    of the machine hits both."""
    samples: dict[str, list[float | None]] = {str(n): [] for n in SCALING_WORKERS}
    cpu: dict[str, list[float | None]] = {str(n): [] for n in SCALING_WORKERS}  # vCPU of both proxies' trees
    notes: list[str] = []
    for rep in range(1, s.reps + 1):
        for n in SCALING_WORKERS:
            log(f"worker scaling rep {rep}/{s.reps}: --workers {n}")
            path = local_pair(group, workers=n)
            try:
                if not path.available:
                    notes.append(f"--workers {n}: {path.note}"[:400])
                    continue
                try:
                    pids = path.proxy_pids()
                    before, t0 = sum(cpu_seconds(pid) for pid in pids.values()), time.monotonic()
                    samples[str(n)].append(iperf3(group, path, SCALING_STREAMS, s.throughput_secs))
                    used = sum(cpu_seconds(pid) for pid in pids.values()) - before
                    cpu[str(n)].append(used / (time.monotonic() - t0))
                except Exception as e:
                    notes.append(f"rep {rep} --workers {n}: {e}"[:400])
            finally:
                path.stop()
    summary = {n: report.summarize(v) for n, v in samples.items()}
    base, top = (summary[str(n)] for n in (SCALING_WORKERS[0], SCALING_WORKERS[-1]))
    return {
        "figure": "Throughput scaling, 1 vs 2 workers",
        "streams": SCALING_STREAMS,
        "samples_gbps": samples,
        "summary_gbps": summary,
        "proxy_vcpu": {n: report.summarize(v) for n, v in cpu.items()},
        "speedup": report.ratio(top["median"] if top else None, base["median"] if base else None),
        "notes": notes,
    }


def render_worker_scaling(result: dict[str, Any]) -> str:
    scaling = result.get("worker_scaling")
    if not scaling:
        return ""
    lines = [
        "",
        f"### {scaling.get('figure', 'Throughput scaling, 1 vs 2 workers')}",
        "",
    ]
    if scaling.get("unavailable"):
        return "\n".join([*lines, f"not measured: {scaling['unavailable']}", ""])
    lines += [
        f"`iperf3 -P {scaling['streams']}` through the ztunnel pair (local topology, SOCKS5 entry), both proxies "
        f"at `--workers N`; median (min–max); this machine has {os.cpu_count()} CPUs for both proxies and the load",
        "",
        "| workers | throughput (Gbit/s) | CPU of both proxies during the test (vCPU) |",
        "| --- | --- | --- |",
    ]

    def cell(summ: dict[str, float] | None) -> str:
        return f"{summ['median']:.2f} ({summ['min']:.2f}–{summ['max']:.2f})" if summ else "n/a"

    for n, summ in scaling["summary_gbps"].items():
        lines.append(f"| {n} | {cell(summ)} | {cell(scaling.get('proxy_vcpu', {}).get(n))} |")
    speedup = scaling.get("speedup")
    lines += ["", f"speedup 2 vs 1 workers: {speedup:.2f}×" if speedup is not None else "speedup: n/a"]
    lines += [f"- {note}" for note in scaling.get("notes", [])]
    return "\n".join([*lines, ""])
