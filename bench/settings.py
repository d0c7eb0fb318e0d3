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

    @classmethod
    def for_args(cls, args: argparse.Namespace) -> Settings:
        if args.quick:
            s = cls(True, 2, 2.0, 3.0, 0.5, 1000, 4, 2.0, 8, 1000)
        else:
            s = cls(False, 3, 4.0, 6.0, 1.0, 1000, 4, 3.0, 8, 10_000)
        if args.reps:
            s = Settings(**{**asdict(s), "reps": args.reps})
        if args.hold:
            s = Settings(**{**asdict(s), "hold_count": args.hold})
        return s
