"""What a run measures and for how long (`Settings`), and the local topology's addresses and ports."""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PY = sys.executable
LOADGEN = str(HERE / "loadgen.py")  # run as a script (also inside pods), never imported by path

# Addresses (loopback; inside the bench netns nothing else uses them).
NODE_A, NODE_B = "127.77.1.1", "127.77.2.1"
CLIENT_POD, SERVER_POD = "127.77.1.10", "127.77.2.10"
HAPROXY_A, HAPROXY_B = "127.77.1.20", "127.77.2.20"
FORWARDER = "127.77.1.30"
IPERF_PORT, ECHO_PORT = 5201, 7000
TLS_PORT_OFFSET = 10000  # haproxy B's TLS port for app port P is P + offset
RELAY_PORT_OFFSET = 20000  # haproxy-tcp listens on P + offset for app port P (beside haproxy A's P)
HTTP_PORT = 8080  # the HTTP app (`loadgen.py http-server`) beside the echo server
# The waypoint path's own pods and node proxies (the `ztunnel` path's pods may not use a waypoint: their pod IP
# would then refuse a client that skips it): client on node wa, app on node wb, the waypoint pod on node ww.
WP_NODE_A, WP_NODE_B, WP_NODE_W = "127.77.3.1", "127.77.4.1", "127.77.5.1"
WP_CLIENT_POD, WP_SERVER_POD, WP_WAYPOINT_POD = "127.77.3.10", "127.77.4.10", "127.77.5.10"
WP_FORWARDER = "127.77.3.30"  # h2load's way into the waypoint path in local mode (it cannot speak SOCKS5)
WP_VIP = "10.96.77.80"  # the app's Service (port 80 -> HTTP_PORT), `istio.io/use-waypoint: waypoint`
HAPROXY_W = "127.77.5.20"  # haproxy-http's L7 proxy (the waypoint's counterpart)
HTTP_ALLOWED = "GET /hello"  # what the L7 policy of both HTTP paths allows (ALLOW GET */hello) ...
HTTP_DENIED = ("GET /version", "POST /hello")  # ... and what it answers with 403


@dataclass(frozen=True, slots=True)
class Settings:
    quick: bool
    reps: int
    throughput_secs: float
    latency_secs: float
    latency_warmup: float
    latency_rate: float
    latency_conns: int
    connrate_secs: float
    connrate_workers: int
    hold_count: int
    http_secs: float = 5.0  # HTTP/1.1 saturation (closed loop) and fixed-rate latency, each
    http_conns: int = 16  # keep-alive connections at saturation

    @classmethod
    def for_args(cls, args: argparse.Namespace) -> Settings:
        if args.quick:
            s = cls(True, 2, 2.0, 3.0, 0.5, 1000, 4, 2.0, 8, 1000, 3.0)
        else:
            s = cls(False, 3, 4.0, 6.0, 1.0, 1000, 4, 3.0, 8, 10_000)
        if args.reps:
            s = Settings(**{**asdict(s), "reps": args.reps})
        if args.hold:
            s = Settings(**{**asdict(s), "hold_count": args.hold})
        return s
