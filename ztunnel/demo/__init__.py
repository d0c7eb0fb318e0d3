"""`ztunnel demo`: the main job — a working two-node mesh on loopback from an embedded config.

It creates a CA, starts one node proxy per node and the backend app as real processes, then sends
requests through the mesh (allowed, denied, and via a Service IP) and shows the metrics they left.
"""

from __future__ import annotations

import argparse
from typing import Any

from ztunnel.ports import ADMIN_PORT


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "demo", help="run a two-node mesh on loopback with an embedded config and show traffic through it"
    )
    p.add_argument("--workdir", help="where to keep the CA, config and logs (default: a new temporary dir)")
    p.add_argument(
        "--once",
        action="store_true",
        help="exit after the demonstration (the default when stdin is not a terminal)",
    )
    p.add_argument("--port-base", type=int, default=ADMIN_PORT, help="admin/metrics/readiness ports start here")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from ztunnel.demo.run import run_demo

    return run_demo(workdir=args.workdir, once=args.once, port_base=args.port_base)
