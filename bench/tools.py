"""The programs a run uses: the load tools (installed by `bench/run` with apt, as root) and the project's CLI."""

from __future__ import annotations

import subprocess
from pathlib import Path

from bench.settings import PY

BENCH_TOOLS = ("haproxy", "iperf3")  # bench/run's BENCH_APT installs these (and sockperf, wrk, h2load)


def tool_versions() -> dict[str, str]:
    out = {}
    tools = (("haproxy", ["haproxy", "-v"]), ("iperf3", ["iperf3", "--version"]), ("h2load", ["h2load", "--version"]))
    for tool, argv in tools:
        try:
            r = subprocess.run(argv, capture_output=True, text=True, timeout=10)
            out[tool] = (r.stdout or r.stderr).splitlines()[0].strip()
        except (OSError, IndexError, subprocess.TimeoutExpired):
            out[tool] = "missing"
    return out


def ztunnel_command() -> list[str] | None:
    """The venv's `ztunnel` console script (the checkout under test), or None if it is not installed."""
    exe = Path(PY).parent / "ztunnel"
    return [str(exe)] if exe.exists() else None


def ztunnel_help(*subcommand: str) -> str | None:
    """`ztunnel SUBCOMMAND --help`, or None while that subcommand (or the CLI) does not exist yet."""
    cmd = ztunnel_command()
    if cmd is None:
        return None
    try:
        r = subprocess.run([*cmd, *subcommand, "--help"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return r.stdout if r.returncode == 0 else None
