"""The measurements, each one step run against a path: throughput (iperf3), latency with the proxies' CPU
around it, new connections per second, RSS per held connection; and the policy decision benchmark.

Each returns plain figures (keys of `report.METRICS`) or raises; the run records a failure and goes on.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.accounting import cpu_seconds, rss_mb
from bench.paths.base import PathSetup
from bench.processes import ProcessGroup, listening, wait_until
from bench.settings import HERE, HTTP_ALLOWED, IPERF_PORT, LOADGEN, PY, ROOT, Settings

Step = tuple[str, Callable[[PathSetup], dict[str, float | None]]]  # (what, measure one path)


def rep_steps(group: ProcessGroup, s: Settings) -> list[Step]:
    """What one repetition measures on each path, in order (RSS per connection is measured once, at the end)."""
    tcp: list[Step] = [
        ("throughput 1", lambda p: {"throughput_1_gbps": iperf3(group, p, 1, s.throughput_secs)}),
        ("throughput 4", lambda p: {"throughput_4_gbps": iperf3(group, p, 4, s.throughput_secs)}),
        ("latency", lambda p: latency_with_cpu(p, s)),
        ("connrate", lambda p: connrate(p, s)),
    ]
    http: list[Step] = [
        ("http saturation", lambda p: http_saturation(p, s)),
        ("http latency", lambda p: http_latency_with_cpu(p, s)),
    ]
    h2c: list[Step] = [
        ("h2c saturation", lambda p: h2c_saturation(p, s)),
        ("h2c latency", lambda p: http_latency_with_cpu(p, s, h2c=True)),
    ]
    # a path without an echo target carries HTTP only; one without an HTTP target gets no HTTP figures
    return (
        [(what, _only(lambda p: bool(p.echo_target), step)) for what, step in tcp]
        + [(what, _only(lambda p: bool(p.http_target), step)) for what, step in http]
        + [(what, _only(lambda p: bool(p.http_target) and p.h2c, step)) for what, step in h2c]
    )


def _only(applies: Callable[[PathSetup], bool], step: Callable[[PathSetup], dict[str, float | None]]) -> Callable[
    [PathSetup], dict[str, float | None]
]:
    return lambda p: step(p) if applies(p) else {}


def run_json(argv: list[str], timeout: float) -> dict[str, Any]:
    r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    lines = [line for line in r.stdout.splitlines() if line.startswith("{")]
    if r.returncode != 0 and not lines:
        raise RuntimeError(f"{Path(argv[0]).name} failed ({r.returncode}): {(r.stderr or r.stdout).strip()[-300:]}")
    if not lines:
        raise RuntimeError(f"{Path(argv[0]).name} printed no result: {r.stderr.strip()[-300:]}")
    return json.loads(lines[-1])


def iperf3(group: ProcessGroup, path: PathSetup, streams: int, secs: float) -> float:
    """One test against a fresh one-off iperf3 server, so a failed test cannot wedge the next one."""
    bind = ["-B", path.iperf_bind] if path.iperf_bind else []
    server = group.start("iperf3-server", [*path.server_prefix, "iperf3", "-s", "-1", *bind, "-p", str(IPERF_PORT)])
    try:
        wait_until(
            lambda: listening(path.iperf_bind or "0.0.0.0", IPERF_PORT, path.server_prefix),
            10,
            "the iperf3 server",
            server,
        )
        argv = [*path.client_prefix, "iperf3", "-c", path.iperf_host, "-p", str(path.iperf_port)]
        argv += ["-t", str(secs), "-P", str(streams)]
        argv += ["-J", "--connect-timeout", "5000"]
        try:
            r = subprocess.run(argv, capture_output=True, text=True, timeout=secs + 20)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"iperf3 did not finish within {secs + 20:.0f} s") from None
        try:
            data = json.loads(r.stdout)
        except ValueError:
            raise RuntimeError(f"iperf3 printed no JSON: {r.stderr.strip()[-300:]}") from None
        if "error" in data:
            raise RuntimeError(f"iperf3: {data['error']}")
        return float(data["end"]["sum_received"]["bits_per_second"]) / 1e9
    finally:
        server.stop()
        group.procs.remove(server)


def run_load(
    path: PathSetup, role: str, args: list[str], timeout: float
) -> tuple[dict[str, Any], dict[str, float], float]:
    """Run a loadgen role from the client side; its JSON, CPU seconds each proxy used meanwhile, wall time."""
    pids = path.proxy_pids()
    before = {n: cpu_seconds(pid) for n, pid in pids.items()}
    t0 = time.monotonic()
    out = run_json([*path.client_prefix, PY, LOADGEN, role, path.echo_target, *args], timeout=timeout)
    wall = time.monotonic() - t0
    return out, {n: cpu_seconds(pid) - before[n] for n, pid in pids.items()}, wall


def latency_with_cpu(path: PathSetup, s: Settings) -> dict[str, float | None]:
    load = s.latency_secs + s.latency_warmup
    out, used, wall = run_load(
        path,
        "latency",
        [
            *("--rate", str(s.latency_rate), "--conns", str(s.latency_conns)),
            *("--duration", str(s.latency_secs), "--warmup", str(s.latency_warmup)),
        ],
        timeout=load + 60,
    )
    rtt = out["rtt_us"]
    result: dict[str, float | None] = {
        "latency_p50_us": rtt.get("p50"),
        "latency_p90_us": rtt.get("p90"),
        "latency_p99_us": rtt.get("p99"),
        "cpu_s_per_1000_req": None,
        "cpu_vcpu_at_1000rps": None,
    }
    if used:
        requests = s.latency_rate * load
        result["cpu_s_per_1000_req"] = sum(used.values()) / (requests / 1000)
        # the load ran for latency+warmup seconds; process start/exit of the client add a little wall
        result["cpu_vcpu_at_1000rps"] = max(used.values()) / min(wall, load + 0.5)
    return result


def run_http(path: PathSetup, args: list[str], timeout: float) -> tuple[dict[str, Any], dict[str, float], float]:
    """`loadgen.py http` through the path (the allowed request), and the CPU each proxy used meanwhile."""
    pids = path.proxy_pids()
    before = {n: cpu_seconds(pid) for n, pid in pids.items()}
    t0 = time.monotonic()
    argv = [*path.client_prefix, PY, LOADGEN, "http", path.http_target, "--host", path.http_host]
    method, _, target = HTTP_ALLOWED.partition(" ")
    out = run_json([*argv, "--method", method, "--path", target, *args], timeout=timeout)
    wall = time.monotonic() - t0
    check_statuses(path, out)
    return out, {n: cpu_seconds(pid) - before[n] for n, pid in pids.items()}, wall


def check_statuses(path: PathSetup, out: dict[str, Any]) -> None:
    """Only the allowed request's 200 counts: anything else fails the test (the figure would be another's)."""
    codes = {k: v for k, v in out.get("status", {}).items() if k != "200"}
    if codes or out.get("errors"):
        raise RuntimeError(f"HTTP load through {path.name}: {out.get('errors')} errors, statuses {out.get('status')}")


def http_saturation(path: PathSetup, s: Settings) -> dict[str, float | None]:
    """Closed loop over `http_conns` keep-alive connections: requests/s, and per core of the busiest proxy
    (the rate that proxy would reach with a whole core to itself: the machine has two, shared by everything)."""
    warmup = 1.0
    out, used, wall = run_http(
        path,
        ["--conns", str(s.http_conns), "--duration", str(s.http_secs), "--warmup", str(warmup)],
        timeout=s.http_secs + warmup + 60,
    )
    rps = float(out["per_second"])
    busiest = max(used.values(), default=0.0) / min(wall, s.http_secs + warmup + 0.5)
    return {
        "http_rps": rps,
        "http_rps_per_core": rps / busiest if busiest > 0 else None,
        "http_busiest_proxy_vcpu": busiest if used else None,
    }


def http_latency_with_cpu(path: PathSetup, s: Settings, h2c: bool = False) -> dict[str, float | None]:
    """Open loop at `latency_rate` over `latency_conns` keep-alive connections (H2C: h2c connections, a stream
    per request); the proxies' CPU meanwhile."""
    warmup = s.latency_warmup
    out, used, _ = run_http(
        path,
        [
            *("--rate", str(s.latency_rate), "--conns", str(s.latency_conns)),
            *("--duration", str(s.http_secs), "--warmup", str(warmup)),
            *(["--h2c"] if h2c else []),
        ],
        timeout=s.http_secs + warmup + 60,
    )
    lat = out["latency_us"]
    requests = s.latency_rate * (s.http_secs + warmup)
    proto = "h2c" if h2c else "http"
    return {
        f"{proto}_p50_us": lat.get("p50"),
        f"{proto}_p99_us": lat.get("p99"),
        f"{proto}_cpu_s_per_1000_req": sum(used.values()) / (requests / 1000) if used else None,
    }


H2LOAD_CONNS, H2LOAD_STREAMS = 4, 16


def parse_h2load(text: str) -> dict[str, float]:
    """h2load's summary: req/s, and the request and status counts (what must all be 2xx for the figure to count)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("finished in"):
            out["per_second"] = float(line.split(",")[1].split()[0])
        elif line.startswith("requests:"):
            parts = dict((w[1], float(w[0])) for w in (p.split() for p in line[len("requests:") :].split(",")))
            out |= {"requests": parts["total"], "succeeded": parts["succeeded"], "failed": parts["failed"]}
            out["errored"], out["timeout"] = parts.get("errored", 0.0), parts.get("timeout", 0.0)
        elif line.startswith("status codes:"):
            codes = dict((w[1], float(w[0])) for w in (p.split() for p in line[len("status codes:") :].split(",")))
            out["non_2xx"] = sum(v for k, v in codes.items() if k != "2xx")
    if "per_second" not in out or "requests" not in out:
        raise RuntimeError(f"h2load printed no summary: {text.strip()[-300:]}")
    return out


def h2c_saturation(path: PathSetup, s: Settings) -> dict[str, float | None]:
    """h2load (nghttp2-client) at saturation: 4 h2c connections with 16 streams each, GET /hello, 1 s warm-up;
    requests/s and per core of the busiest proxy, like the HTTP/1.1 figure."""
    if shutil.which("h2load") is None:
        raise RuntimeError("h2load is missing (Debian nghttp2-client; bench/run installs it as root)")
    if not path.h2load_target:
        raise RuntimeError(f"{path.name} has no address h2load can reach")
    pids = path.proxy_pids()
    before = {n: cpu_seconds(pid) for n, pid in pids.items()}
    warmup = 1.0
    argv = [*path.client_prefix, "h2load", "-c", str(H2LOAD_CONNS), "-m", str(H2LOAD_STREAMS)]
    # h2load's durations are integers with a unit ("5.0" is a value error)
    argv += ["-D", f"{round(s.http_secs * 1000)}ms", "--warm-up-time", f"{round(warmup * 1000)}ms"]
    argv += ["-H", f":authority: {path.http_host}"]
    argv += [f"http://{path.h2load_target}/{HTTP_ALLOWED.partition(' /')[2]}"]
    t0 = time.monotonic()
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=s.http_secs + warmup + 60)
    except subprocess.TimeoutExpired:
        raise RuntimeError("h2load did not finish") from None
    wall = time.monotonic() - t0
    out = parse_h2load(r.stdout + r.stderr)
    if not out["succeeded"] or out["failed"] or out["errored"] or out["timeout"] or out.get("non_2xx"):
        raise RuntimeError(f"h2load through {path.name}: {r.stdout.strip()[-400:]}")
    used = {n: cpu_seconds(pid) - before[n] for n, pid in pids.items()}
    busiest = max(used.values(), default=0.0) / min(wall, s.http_secs + warmup + 0.5)
    return {"h2c_rps": out["per_second"], "h2c_rps_per_core": out["per_second"] / busiest if busiest > 0 else None}


def connrate(path: PathSetup, s: Settings) -> dict[str, float | None]:
    out, used, wall = run_load(
        path,
        "connrate",
        ["--workers", str(s.connrate_workers), "--duration", str(s.connrate_secs)],
        timeout=s.connrate_secs + 60,
    )
    busiest = max(used.values(), default=None)
    return {
        "conn_per_s": out["per_second"],
        "connect_p99_ms": out["connect_ms"].get("p99"),
        # not in the table: tells whether the rate was limited by the proxy (≈1 vCPU) or elsewhere
        "connrate_busiest_proxy_vcpu": None if busiest is None else busiest / wall,
    }


def held_connections_rss(path: PathSetup, count: int) -> dict[str, Any]:
    """RSS of the proxies before and while `count` proxied connections are open."""
    pids = path.proxy_pids()
    gone = [n for n, pid in pids.items() if not Path(f"/proc/{pid}").exists()]
    if gone:
        raise RuntimeError(f"proxy {', '.join(gone)} is not running")
    idle = {n: rss_mb(pid) for n, pid in pids.items()}
    proc = subprocess.Popen(
        [*path.client_prefix, PY, LOADGEN, "hold", path.echo_target, "--count", str(count), "--parallel", "200"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stdin is not None
        line = proc.stdout.readline()
        ready = json.loads(line) if line.startswith("{") else {"ready": 0, "errors": count}
        time.sleep(0.5)  # let the proxies finish any per-connection allocation after the echo
        loaded = {n: rss_mb(pid) for n, pid in pids.items()}
        proc.stdin.close()
        proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    held = int(ready.get("ready", 0))
    per_conn = {n: (loaded[n] - idle[n]) * 1024 / held if held else None for n in pids}
    values = [v for v in per_conn.values() if v is not None]
    return {
        "held": held,
        "errors": ready.get("errors"),
        "rss_before_mb": idle,
        "rss_loaded_mb": loaded,
        "rss_per_conn_kib_by_proxy": per_conn,
        "rss_per_conn_kib": max(values) if values else None,
    }



def run_policy_bench(quick: bool, extra: tuple[str, ...] = ()) -> dict[str, Any] | None:
    """bench/policy_bench.py (the policy decision time), run as a module of this package, when present;
    EXTRA: its options, e.g. `--mode l7 --sizes 1000` for the waypoint's decision."""
    if not (HERE / "policy_bench.py").exists():
        return None
    argv = [PY, "-m", "bench.policy_bench", *(["--quick"] if quick and not extra else []), *extra]
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=300, cwd=ROOT)
        if r.returncode != 0 and quick:  # it may not know --quick
            r = subprocess.run(argv[:3], capture_output=True, text=True, timeout=300, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"summary": "timed out after 300 s", "ok": False}
    parsed: Any = None
    for line in reversed(r.stdout.splitlines()):
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                parsed = json.loads(line)
                break
    if parsed is None:
        with contextlib.suppress(ValueError):
            parsed = json.loads(r.stdout)
    text = r.stdout.strip()
    return {
        "ok": r.returncode == 0,
        "result": parsed,
        "output": text[-4000:],
        "summary": parsed.get("summary", "see JSON")
        if isinstance(parsed, dict)
        else (text.splitlines()[-1] if text else r.stderr.strip()[-300:]),
    }
