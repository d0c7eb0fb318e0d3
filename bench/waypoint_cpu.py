"""CPU of the waypoint process per request: the figure a per-request optimisation moves, without the full bench.

Starts the local topology's waypoint path (bench.paths.waypoint: two node proxies, the waypoint, the app, access
logs off), then runs `loadgen.py http` through it ROUNDS times and reports, per round, the waypoint's utime+stime
(/proc, its process tree) divided by the requests answered (the two node proxies' alongside). Min and median are
what to compare: the machine is shared, and CPU time of one process is far steadier than wall-clock rates. Root
only (own network namespace):

    unshare -n sh -c 'ip link set lo up; .venv/bin/python bench/waypoint_cpu.py --rounds 5'
    ... bench/waypoint_cpu.py --h2c --rate 2000        # h2c streams at a fixed rate (loadgen's h2c is open loop)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.accounting import cpu_seconds
from bench.paths.waypoint import local_waypoint
from bench.processes import ProcessGroup
from bench.settings import LOADGEN, PY
from bench.steps import run_json


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--duration", type=float, default=4.0, help="seconds of load per round")
    parser.add_argument("--conns", type=int, default=16)
    parser.add_argument("--h2c", action="store_true", help="h2c streams (needs --rate)")
    parser.add_argument("--rate", type=float, default=0, help="requests/s (0: closed loop, as fast as it goes)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="wpcpu-") as tmp:
        group = ProcessGroup(Path(tmp))
        try:
            path = local_waypoint(group)
            if not path.available:
                sys.exit(f"waypoint path not available: {path.note}")
            pid = path.proxies["waypoint"].pid
            base = [PY, LOADGEN, "http", path.http_target, "--host", path.http_host, "--conns", str(args.conns)]
            if args.rate:
                base += ["--rate", str(args.rate)]
            if args.h2c:
                base.append("--h2c")
            argv = [*base, "--duration", str(args.duration), "--warmup", "0.5"]
            run_json([*base, "--duration", "1", "--warmup", "0"], timeout=60)  # warm-up: connections, caches
            per_request = []
            others = {n: p.pid for n, p in path.proxies.items() if n != "waypoint"}
            for _ in range(args.rounds):
                before = cpu_seconds(pid)
                before_others = {n: cpu_seconds(p) for n, p in others.items()}
                out = run_json(argv, timeout=args.duration + 60)
                used = cpu_seconds(pid) - before
                used_others = {n: cpu_seconds(p) - before_others[n] for n, p in others.items()}
                if set(out.get("status", {})) != {"200"} or out.get("errors"):
                    sys.exit(f"not all 200: {out.get('status')} errors {out.get('errors')}")
                # warm-up requests are not counted by loadgen but their CPU is: scale by the measured rate
                requests = float(out["per_second"]) * (args.duration + 0.5)
                per_request.append(used / requests * 1e6)
                nodes = ", ".join(f"node proxy {n} {u / requests * 1e6:.1f}" for n, u in used_others.items())
                rate = float(out["per_second"])
                print(f"round: {rate:.0f} req/s, waypoint {per_request[-1]:.1f} us/request; {nodes}")
            summary = {
                "min_us": round(min(per_request), 1),
                "median_us": round(statistics.median(per_request), 1),
                "rounds": [round(x, 1) for x in per_request],
            }
            print(json.dumps(summary))
        finally:
            group.close()


if __name__ == "__main__":
    main()
