"""The benchmark harness must not rot: its table code and its dry run are checked here (no load)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from bench import report

ROOT = Path(__file__).resolve().parents[2]


def test_summary_ratios_targets_and_table() -> None:
    samples = {
        "direct": {"throughput_1_gbps": [10.0, 12.0, 11.0], "latency_p50_us": [100.0, 110.0, 90.0]},
        "haproxy": {"throughput_1_gbps": [4.0, 5.0, 6.0], "latency_p50_us": [200.0, 220.0, 210.0]},
        "ztunnel": {"throughput_1_gbps": [3.0, None, 3.0], "latency_p50_us": [300.0, 310.0, 290.0]},
    }
    summary = report.summarize_all(samples)
    assert summary["direct"]["throughput_1_gbps"] == {"median": 11.0, "min": 10.0, "max": 12.0, "n": 3}
    assert summary["ztunnel"]["throughput_1_gbps"]["n"] == 2

    rat = report.ratios(summary, ["direct", "haproxy", "ztunnel"])
    assert rat["ztunnel"]["throughput_1_gbps"]["floor"] == 3.0 / 11.0
    assert rat["ztunnel"]["throughput_1_gbps"]["peer"] == 3.0 / 5.0
    assert rat["haproxy"]["throughput_1_gbps"]["peer"] is None
    assert "direct" not in rat

    targets = {t["target"]: t for t in report.evaluate_targets(summary)}
    tp = targets["throughput 1 stream(s) ≥ 0.6 × HAProxy"]
    assert tp["met"] is True and tp["limit"] == 0.6 * 5.0
    lat = targets["added latency p50 ≤ 2 × HAProxy's"]
    assert lat["value"] == 200.0 and lat["limit"] == 2 * 110.0 and lat["met"] is True
    assert targets["RSS idle ≤ 60 MB"]["met"] is None  # no data: neither met nor failed

    result = {
        "meta": {"date": "d", "quick": True, "reps": 3, "errors": ["rep 1 ztunnel throughput 4: timed out"]},
        "paths": {
            "direct": {"available": True},
            "haproxy": {"available": True},
            "ztunnel": {"available": True, "note": "SOCKS5 entry"},
            "waypoint": {"available": False, "note": "not built yet"},
        },
        "summary": summary,
        "ratios": rat,
        "targets": list(targets.values()),
    }
    table = report.render_markdown(result)
    assert "| Figure | direct | haproxy | ztunnel | haproxy ÷ direct | ztunnel ÷ direct | ztunnel ÷ haproxy |" in table
    assert "| Throughput, 1 stream (iperf3) (Gbit/s) | 11.00 (10.00–12.00) | 5.00 (4.00–6.00) | 3.00 |" in table
    assert "**waypoint**: not available — not built yet" in table
    assert "rep 1 ztunnel throughput 4: timed out" in table
    assert "| throughput 1 stream(s) ≥ 0.6 × HAProxy | 3.000 Gbit/s | 3.000 Gbit/s | yes |" in table


def test_dry_run_prints_the_plan_and_a_table() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "bench.run", "--quick", "--dry-run"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert r.returncode == 0, r.stderr
    assert "plan: paths direct, haproxy, haproxy-tcp, ztunnel" in r.stdout
    header = next(line for line in r.stdout.splitlines() if line.startswith("| Figure |"))
    assert header.startswith("| Figure | direct | haproxy | haproxy-tcp | ztunnel |")
    # the plain relay is context (the floor of a relay in C), compared with direct only, never the peer
    assert "haproxy-tcp ÷ direct" in header and "haproxy-tcp ÷ haproxy" not in header
    assert "ztunnel ÷ haproxy" in header


def test_policy_targets_from_policy_bench_json() -> None:
    policy = {
        "result": {
            "results": [
                {"layout": "spread", "policies": 100, "median_us": 8.0},
                {"layout": "spread", "policies": 10000, "median_us": 11.0},
                {"layout": "one-namespace", "policies": 10000, "median_us": 25.0},
            ]
        }
    }
    median, growth = report.policy_targets(policy)
    assert (median["value"], median["met"]) == (25.0, False)  # the slowest layout counts
    assert growth["value"] == 25.0 / 8.0 and growth["met"] is True
    assert report.policy_targets(None) == []
    assert report.policy_targets({"result": "not json"}) == []


def test_loadgen_targets_and_socks_request() -> None:
    from bench import loadgen

    t = loadgen.Target.parse("socks5://127.77.1.10:15080/10.244.2.2:7000")
    assert (t.host, t.port, t.socks, t.connect_addr) == ("10.244.2.2", 7000, ("127.77.1.10", 15080), t.socks)
    plain = loadgen.Target.parse("10.0.0.1:5201")
    assert plain.socks is None and plain.connect_addr == ("10.0.0.1", 5201)
    # greeting (no auth) then CONNECT IPv4 10.244.2.2:7000
    assert loadgen.socks5_connect_request("10.244.2.2", 7000) == bytes.fromhex(
        "050100" + "05010001" + "0af40202" + "1b58"
    )
    p = loadgen.percentiles([float(x) for x in range(1, 101)])
    assert (p["p50"], p["p90"], p["p99"], p["max"], p["count"]) == (51.0, 90.0, 99.0, 100.0, 100)


def test_same_node_paths_compare_with_the_same_node_floor() -> None:
    samples = {
        "direct": {"conn_per_s": [3000.0]},
        "haproxy": {"conn_per_s": [500.0]},
        "direct-same-node": {"conn_per_s": [4000.0]},
        "ztunnel-same-node": {"conn_per_s": [1000.0]},
    }
    summary = report.summarize_all(samples)
    rat = report.ratios(summary, list(samples))
    assert rat["ztunnel-same-node"]["conn_per_s"] == {"floor": 0.25, "peer": None}
    assert "direct-same-node" not in rat
    result = {"meta": {}, "paths": {p: {"available": True} for p in samples}, "summary": summary, "ratios": rat}
    assert "ztunnel-same-node ÷ direct-same-node" in report.render_markdown(result)


def test_host_steal_is_measured_and_shown() -> None:
    from bench import accounting

    before = [100, 0, 50, 800, 0, 0, 0, 50, 0, 0]
    after = [200, 0, 100, 1550, 0, 0, 0, 150, 0, 0]  # 1,000 ticks passed, 100 of them stolen
    assert accounting.steal_percent(before, after) == 10.0
    assert accounting.steal_percent([], after) is None
    assert len(accounting.host_cpu_ticks()) >= 8
    result = {
        "meta": {"date": "d", "quick": True, "reps": 1, "host_steal_percent": 10.0},
        "paths": {"direct": {"available": True}},
        "summary": {},
    }
    assert "CPU steal during the run: 10.0 %" in report.render_markdown(result)
