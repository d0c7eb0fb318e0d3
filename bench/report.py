"""Turns raw benchmark samples into the summary, ratios, target checks and the Markdown table.

Pure functions over plain dicts, so the table code is tested without running a benchmark
(tests/unit/test_telemetry_bench.py) and cannot rot silently.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

FLOOR = "direct"
PEER = "haproxy"
REFERENCES = ("haproxy-tcp",)  # measured for context (the relay floor in C), compared to the floor only
L7_PEERS = {"waypoint": "haproxy-http"}  # an L7 path is compared with HAProxy doing the same L7 job
SAME_NODE = "-same-node"  # a path measured between two pods of one node; its floor is direct-same-node


def floor_of(path: str) -> str:
    return FLOOR + SAME_NODE if path.endswith(SAME_NODE) else FLOOR


def is_floor(path: str) -> bool:
    return path in (FLOOR, FLOOR + SAME_NODE)


def peer_of(path: str) -> str | None:
    """The path PATH is compared with: HAProxy's L7 path for the waypoint, the mTLS peer for the node proxy
    paths; None for the peers themselves, the references and the same-node paths."""
    if path in L7_PEERS:
        return L7_PEERS[path]
    if path == PEER or path in REFERENCES or path in L7_PEERS.values() or path.endswith(SAME_NODE):
        return None
    return PEER


@dataclass(frozen=True, slots=True)
class Metric:
    key: str
    label: str
    unit: str
    higher_is_better: bool
    digits: int = 2


METRICS: tuple[Metric, ...] = (
    Metric("throughput_1_gbps", "Throughput, 1 stream (iperf3)", "Gbit/s", True),
    Metric("throughput_4_gbps", "Throughput, 4 streams (iperf3)", "Gbit/s", True),
    Metric("latency_p50_us", "RTT p50, 1 KiB at 1,000 req/s over 4 conns", "µs", False, 0),
    Metric("latency_p90_us", "RTT p90, same load", "µs", False, 0),
    Metric("latency_p99_us", "RTT p99, same load", "µs", False, 0),
    Metric("cpu_s_per_1000_req", "Proxy CPU per 1,000 requests (both proxies)", "CPU s", False, 4),
    Metric("cpu_vcpu_at_1000rps", "CPU at 1,000 req/s (busiest proxy)", "vCPU", False, 3),
    Metric("rss_idle_mb", "RSS idle (largest proxy)", "MB", False, 1),
    Metric("rss_per_conn_kib", "RSS per extra open connection (largest proxy)", "KiB", False, 1),
    Metric("conn_per_s", "New connections per second", "conn/s", True, 0),
    Metric("connect_p99_ms", "Connect + first byte, p99", "ms", False, 2),
    Metric("http_rps", "HTTP/1.1 requests/s at saturation (keep-alive, 16 conns)", "req/s", True, 0),
    Metric("http_busiest_proxy_vcpu", "CPU of the busiest proxy at HTTP saturation", "vCPU", False, 2),
    Metric("http_rps_per_core", "HTTP/1.1 requests/s per core of the busiest proxy", "req/s", True, 0),
    Metric("http_p50_us", "HTTP/1.1 latency p50 at 1,000 req/s over 4 keep-alive conns", "µs", False, 0),
    Metric("http_p99_us", "HTTP/1.1 latency p99, same load", "µs", False, 0),
    Metric("http_cpu_s_per_1000_req", "Proxy CPU per 1,000 HTTP requests at 1,000 req/s (all)", "CPU s", False, 4),
    Metric("h2c_rps", "h2c requests/s at saturation (h2load, 4 conns × 16 streams)", "req/s", True, 0),
    Metric("h2c_rps_per_core", "h2c requests/s per core of the busiest proxy", "req/s", True, 0),
    Metric("h2c_p50_us", "h2c latency p50 at 1,000 req/s over 4 conns", "µs", False, 0),
    Metric("h2c_p99_us", "h2c latency p99, same load", "µs", False, 0),
    Metric("h2c_cpu_s_per_1000_req", "Proxy CPU per 1,000 h2c requests at 1,000 req/s (all)", "CPU s", False, 4),
)
METRIC_BY_KEY = {m.key: m for m in METRICS}


def summarize(values: Sequence[float | None]) -> dict[str, float] | None:
    """Median and spread of the repetitions; None when no repetition produced a value."""
    xs = [float(v) for v in values if v is not None]
    if not xs:
        return None
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def summarize_all(samples: Mapping[str, Mapping[str, Sequence[float | None]]]) -> dict[str, dict[str, Any]]:
    """samples[path][metric] = per-repetition values -> summary[path][metric]."""
    return {path: {k: summarize(v) for k, v in per_metric.items()} for path, per_metric in samples.items()}


def _median(summary: Mapping[str, Any], path: str, key: str) -> float | None:
    s = summary.get(path, {}).get(key)
    return None if s is None else float(s["median"])


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def ratios(summary: Mapping[str, Any], paths: Sequence[str]) -> dict[str, dict[str, dict[str, float | None]]]:
    """ratios[path][metric] = {"floor": path/its floor, "peer": path/haproxy} on medians.

    The floor of a same-node path is direct-same-node; the peer (HAProxy) runs node to node only.
    """
    out: dict[str, dict[str, dict[str, float | None]]] = {}
    for path in paths:
        if is_floor(path):
            continue
        out[path] = {}
        for m in METRICS:
            v = _median(summary, path, m.key)
            peer = peer_of(path)
            out[path][m.key] = {
                "floor": ratio(v, _median(summary, floor_of(path), m.key)),
                "peer": None if peer is None else ratio(v, _median(summary, peer, m.key)),
            }
    return out


def _target_check(name: str, value: float | None, limit: float | None, higher_ok: bool, unit: str) -> dict[str, Any]:
    """One target's row (met None: no data), the same for issue 6's and issue 12's targets."""
    met = None if value is None or limit is None else (value >= limit if higher_ok else value <= limit)
    return {"target": name, "value": value, "limit": limit, "met": met, "unit": unit}


def evaluate_targets(summary: Mapping[str, Any], path: str = "ztunnel") -> list[dict[str, Any]]:
    """Issue 6's targets for `path`, each with its value, limit and whether it is met (None: no data)."""

    def med(p: str, key: str) -> float | None:
        return _median(summary, p, key)

    checks: list[dict[str, Any]] = []

    def add(name: str, value: float | None, limit: float | None, higher_ok: bool, unit: str) -> None:
        checks.append(_target_check(name, value, limit, higher_ok, unit))

    for streams in (1, 4):
        key = f"throughput_{streams}_gbps"
        peer = med(PEER, key)
        add(
            f"throughput {streams} stream(s) ≥ 0.6 × HAProxy",
            med(path, key),
            None if peer is None else 0.6 * peer,
            True,
            "Gbit/s",
        )
    for pct in ("p50", "p99"):
        key = f"latency_{pct}_us"
        floor, peer, mine = med(FLOOR, key), med(PEER, key), med(path, key)
        added = None if mine is None or floor is None else mine - floor
        peer_added = None if peer is None or floor is None else max(peer - floor, 0.0)
        add(
            f"added latency {pct} ≤ 2 × HAProxy's",
            added,
            None if peer_added is None else 2 * peer_added,
            False,
            "µs",
        )
    add("CPU at 1,000 req/s ≤ 0.06 vCPU per proxy", med(path, "cpu_vcpu_at_1000rps"), 0.06, False, "vCPU")
    add("RSS idle ≤ 60 MB", med(path, "rss_idle_mb"), 60.0, False, "MB")
    add("RSS per open connection ≤ 16 KiB", med(path, "rss_per_conn_kib"), 16.0, False, "KiB")
    add("new connections ≥ 3,000/s", med(path, "conn_per_s"), 3000.0, True, "conn/s")
    add("connect p99 ≤ 10 ms", med(path, "connect_p99_ms"), 10.0, False, "ms")
    return checks


def waypoint_targets(summary: Mapping[str, Any], path: str = "waypoint") -> list[dict[str, Any]]:
    """Issue 12's targets for the waypoint path against HAProxy's L7 path (`haproxy-http`), floor `direct`."""
    peer = L7_PEERS[path]

    def med(p: str, key: str) -> float | None:
        return _median(summary, p, key)

    checks: list[dict[str, Any]] = []

    def add(name: str, value: float | None, limit: float | None, higher_ok: bool, unit: str) -> None:
        checks.append(_target_check(name, value, limit, higher_ok, unit))

    # h2c's floor is the HTTP/1.1 one: both L7 paths speak HTTP/1.1 to the same app (there is no h2c app)
    for proto, label in (("http", "HTTP"), ("h2c", "h2c")):
        for pct in ("p50", "p99"):
            key = f"{proto}_{pct}_us"
            floor, theirs, mine = med(FLOOR, f"http_{pct}_us"), med(peer, key), med(path, key)
            added = None if mine is None or floor is None else mine - floor
            peer_added = None if theirs is None or floor is None else max(theirs - floor, 0.0)
            limit = None if peer_added is None else 2 * peer_added
            add(f"waypoint: added {label} latency {pct} ≤ 2 × HAProxy L7's (issue 12)", added, limit, False, "µs")
        for key, what in ((f"{proto}_rps", "requests/s"), (f"{proto}_rps_per_core", "requests/s per core")):
            theirs = med(peer, key)
            limit = None if theirs is None else 0.5 * theirs
            add(f"waypoint: {label} {what} ≥ 0.5 × HAProxy L7's (issue 12)", med(path, key), limit, True, "req/s")
    return checks


def policy_l7_targets(policy: Mapping[str, Any] | None) -> list[dict[str, Any]]:
    """Issue 12's decision target from `policy_bench.py --mode l7`: the slowest layout at 1,000 policies."""
    parsed = policy.get("result") if isinstance(policy, Mapping) else None
    results = parsed.get("results") if isinstance(parsed, Mapping) else None
    at_1000 = [
        float(r["median_us"])
        for r in results or []
        if isinstance(r, Mapping) and r.get("mode") == "l7" and r.get("policies") == 1000 and "median_us" in r
    ]
    if not at_1000:
        return []
    value = max(at_1000)
    return [
        {
            "target": "L7 policy decision median with 1,000 policies ≤ 20 µs (issue 12)",
            "value": value,
            "limit": 20.0,
            "met": value <= 20.0,
            "unit": "µs",
        }
    ]


def policy_targets(policy: Mapping[str, Any] | None) -> list[dict[str, Any]]:
    """Issue 6's policy targets from bench/policy_bench.py's JSON (`results[].policies/median_us`)."""
    parsed = policy.get("result") if isinstance(policy, Mapping) else None
    results = parsed.get("results") if isinstance(parsed, Mapping) else None
    if not isinstance(results, list) or not results:
        return []
    by_size: dict[int, float] = {}
    for r in results:
        with_size = isinstance(r, Mapping) and isinstance(r.get("policies"), int) and "median_us" in r
        if with_size:  # the slowest layout at each size counts
            by_size[r["policies"]] = max(by_size.get(r["policies"], 0.0), float(r["median_us"]))
    if not by_size:
        return []
    largest, smallest = max(by_size), min(by_size)
    checks = [
        {
            "target": f"policy decision median with {largest:,} policies ≤ 20 µs",
            "value": by_size[largest],
            "limit": 20.0,
            "met": by_size[largest] <= 20.0 if largest >= 10_000 else None,
            "unit": "µs",
        }
    ]
    if largest > smallest:
        growth = by_size[largest] / by_size[smallest]
        checks.append(
            {
                "target": f"policy time growth {smallest:,}→{largest:,} policies sublinear (< {largest // smallest}×)",
                "value": growth,
                "limit": float(largest // smallest),
                "met": growth < largest / smallest,
                "unit": "×",
            }
        )
    return checks


def _fmt(value: float | None, digits: int) -> str:
    if value is None:
        return "–"
    return f"{value:,.{digits}f}"


def _cell(s: Mapping[str, float] | None, digits: int) -> str:
    if s is None:
        return "–"
    if s["n"] > 1 and s["min"] != s["max"]:
        return f"{_fmt(s['median'], digits)} ({_fmt(s['min'], digits)}–{_fmt(s['max'], digits)})"
    return _fmt(s["median"], digits)


def render_markdown(result: Mapping[str, Any]) -> str:
    """The results table: one row per figure, a column per path, then ratios to the floor and peer."""
    paths: list[str] = list(result["paths"])
    available = [p for p in paths if result["paths"][p].get("available")]
    summary = result["summary"]
    rat = result.get("ratios") or ratios(summary, available)
    others = [p for p in available if not is_floor(p)]
    peered = [p for p in others if (peer := peer_of(p)) is not None and peer in available]
    meta = result.get("meta", {})

    lines = [
        f"### Benchmark {meta.get('date', '')} ({'quick' if meta.get('quick') else 'full'} run, "
        f"{meta.get('reps', '?')} repetitions; median (min–max))",
        "",
    ]
    if meta.get("host_steal_percent") is not None:
        lines[-1:] = [
            f"CPU steal during the run: {meta['host_steal_percent']} % (time the host gave to other guests;"
            " above a few percent, latency percentiles are mostly the host's)",
            "",
        ]
    if meta.get("host_load_average"):
        start, end = meta["host_load_average"]
        lines[-1:] = [
            f"Load average (1 min) at the start / end: {start} / {end} ({meta.get('host', {}).get('cpus', '?')} CPUs;"
            " well above the bench's own few processes means other work shared the machine)",
            "",
        ]
    header = ["Figure", *available]
    header += [f"{p} ÷ {floor_of(p)}" for p in others]
    header += [f"{p} ÷ {peer_of(p)}" for p in peered]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    for m in METRICS:
        row = [f"{m.label} ({m.unit})"]
        row += [_cell(summary.get(p, {}).get(m.key), m.digits) for p in available]
        row += [_fmt(rat.get(p, {}).get(m.key, {}).get("floor"), 2) for p in others]
        row += [_fmt(rat.get(p, {}).get(m.key, {}).get("peer"), 2) for p in peered]
        lines.append("| " + " | ".join(row) + " |")

    skipped = [p for p in paths if p not in available]
    if skipped:
        lines.append("")
        for p in skipped:
            lines.append(f"- **{p}**: not available — {result['paths'][p].get('note', 'no reason given')}")
    notes = [(p, result["paths"][p].get("note")) for p in available if result["paths"][p].get("note")]
    if notes:
        lines.append("")
        for p, note in notes:
            lines.append(f"- {p}: {note}")

    errors = result.get("meta", {}).get("errors") or []
    if errors:
        lines += ["", "Problems during the run (their cells are missing or based on fewer repetitions):"]
        lines += [f"- {e}" for e in errors[:20]]

    targets = result.get("targets") or []
    if targets:
        lines += ["", "| Target (issue 6 unless named) | value | limit | met |", "|---|---|---|---|"]
        for t in targets:
            met = {True: "yes", False: "**no**", None: "–"}[t["met"]]
            lines.append(
                f"| {t['target']} | {_fmt(t['value'], 3)} {t['unit']} | {_fmt(t['limit'], 3)} {t['unit']} | {met} |"
            )

    policy = result.get("policy")
    if policy:
        lines += ["", f"Policy decision benchmark (bench/policy_bench.py): {policy.get('summary', 'see JSON')}"]
    policy_l7 = result.get("policy_l7")
    if policy_l7:
        lines += ["", f"L7 decision (bench/policy_bench.py --mode l7): {policy_l7.get('summary', 'see JSON')}"]
    return "\n".join(lines) + "\n"
