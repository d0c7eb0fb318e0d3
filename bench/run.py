"""Side-by-side benchmark of the mesh against the floor (direct TCP) and a C peer (HAProxy mTLS).

Run with `bench/run` (installs the tools, then runs `python -m bench.run`). Paths (`bench.paths`, one module
each): direct, haproxy (mTLS peer), haproxy-tcp (the relay floor in C), ztunnel, and the same-node, eBPF and
waypoint variants. Topologies (`bench.topology`): the two-node netns lab (root, the default when available)
or local mode on loopback addresses, as root inside a network namespace of its own (`bench.isolation`).

Each repetition measures every path in turn, so slow drifts of this noisy machine hit all paths.
Timings are never asserted in tests: this is a report, not a gate.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.dryrun import dry_run
from bench.isolation import bench_netns, can_use_netns
from bench.paths.registry import ALL_PATHS
from bench.processes import log
from bench.record import render, write_results
from bench.session import measure
from bench.settings import HERE, PY, ROOT, Settings
from bench.tools import BENCH_TOOLS
from bench.topology.lab import LabError, LabTopology, lab_available
from bench.topology.local import LocalTopology


def measure_local(args: argparse.Namespace, s: Settings, argv: list[str] | None) -> dict[str, Any] | None:
    """The local topology; as root inside a netns of its own (this module again, run in there)."""
    if not can_use_netns() or args.no_netns:
        return measure(args, s, LocalTopology(None))
    with bench_netns() as ns, tempfile.NamedTemporaryFile(suffix=".json") as tmp:
        log(f"running inside network namespace {ns}")
        child = [PY, "-m", "bench.run", *(argv if argv is not None else sys.argv[1:])]
        child += ["--in-netns", ns, "--result-file", tmp.name]
        env = os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        rc = subprocess.run(["ip", "netns", "exec", ns, *child], check=False, env=env).returncode
        if rc != 0:
            print(f"error: the benchmark inside {ns} failed (exit {rc})", file=sys.stderr)
            return None
        return json.loads(Path(tmp.name).read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Benchmark the node proxy pair against direct TCP and HAProxy.")
    parser.add_argument("--quick", action="store_true", help="short run (about 1–2 minutes)")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and a synthetic table; no load")
    parser.add_argument("--reps", type=int, default=0, help="repetitions (default 3, quick 2)")
    parser.add_argument("--hold", type=int, default=0, help="connections to hold for the RSS figure")
    parser.add_argument("--paths", default=",".join(ALL_PATHS), help="comma-separated subset of paths")
    parser.add_argument("--out", default=str(HERE / "results"), help="directory for <date>.json and .md")
    parser.add_argument(
        "--topology",
        choices=["auto", "lab", "local"],
        default="auto",
        help="lab: a two-node netns lab (`ztunnel lab`, root); local: loopback in local mode; auto: lab if possible",
    )
    parser.add_argument("--redirect", choices=["iptables", "ebpf"], default="iptables", help="lab redirection")
    parser.add_argument("--no-netns", action="store_true", help="local topology on the host's loopback even as root")
    parser.add_argument("--keep", action="store_true", help="keep the work dir (logs, configs)")
    parser.add_argument("--skip-policy", action="store_true", help="do not run bench/policy_bench.py")
    parser.add_argument(
        "--worker-scaling",
        action="store_true",
        help="also measure `Throughput scaling, 1 vs 2 workers` (iperf3 -P 4, proxies at --workers 1 and 2; "
        "local topology only)",
    )
    parser.add_argument("--in-netns", default="", help=argparse.SUPPRESS)
    parser.add_argument("--result-file", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    s = Settings.for_args(args)
    unknown = set(args.paths.split(",")) - set(ALL_PATHS)
    if unknown:
        parser.error(f"unknown path(s) {', '.join(sorted(unknown))}; choose from {', '.join(ALL_PATHS)}")

    if args.dry_run:
        return dry_run(args, s, sys.stdout)

    missing = [t for t in BENCH_TOOLS if shutil.which(t) is None]
    if "iperf3" in missing:
        print("error: iperf3 is missing; run bench/run (it installs haproxy and iperf3 as root)", file=sys.stderr)
        return 2

    if args.in_netns:  # the child half: measure, hand the result to the parent
        result = measure(args, s, LocalTopology(args.in_netns))
        Path(args.result_file).write_text(json.dumps(result, default=str))
        return 0

    topology = args.topology
    if topology == "auto":
        topology = "lab" if lab_available() else "local"
    result: dict[str, Any] | None = None
    fallback = ""
    if topology == "lab":
        if not lab_available():
            print("error: the lab needs root and `ztunnel lab`; use --topology local", file=sys.stderr)
            return 2
        try:
            result = measure(args, s, LabTopology(args.redirect))
        except LabError as e:
            if args.topology != "auto":
                print(f"error: {e}", file=sys.stderr)
                return 2
            fallback = f"the lab could not be built ({e}); this run used the local topology"
            log(fallback)
    if result is None:
        result = measure_local(args, s, argv)
        if result is None:
            return 1

    if fallback:
        result["meta"]["errors"].insert(0, fallback)
    json_path, md_path = write_results(result, Path(args.out))
    print(render(result))
    for e in result["meta"]["errors"]:
        print(f"warning: {e}", file=sys.stderr)
    log(f"wrote {json_path} and {md_path} in {result['meta']['wall_seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
