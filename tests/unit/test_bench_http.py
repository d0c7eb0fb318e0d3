"""The benchmark's HTTP pieces (issue 12's waypoint columns) must not rot: the load generator's HTTP/1.1 app and
client on loopback, the L7 paths' step selection, ratios, targets and table, HAProxy W's config (checked by
haproxy itself when installed). Timings are never asserted."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bench import loadgen, report
from bench.paths.base import PathSetup
from bench.paths.haproxy import make_haproxy_certs
from bench.paths.haproxy_http import haproxy_http_configs
from bench.paths.waypoint import cluster_yaml
from bench.settings import Settings
from bench.steps import rep_steps


@pytest.fixture
async def app() -> AsyncIterator[loadgen.Target]:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(loadgen.HttpServerProtocol, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield loadgen.Target("127.0.0.1", port)
    finally:
        server.close()
        await server.wait_closed()


def test_content_length_of_a_head() -> None:
    assert loadgen.content_length(b"HTTP/1.1 200 OK\r\nContent-Length: 6") == 6
    assert loadgen.content_length(b"HTTP/1.1 403 Forbidden\r\ncontent-length:  19\r\nx: y") == 19
    assert loadgen.content_length(b"GET / HTTP/1.1\r\nHost: a") == 0
    with pytest.raises(ValueError, match="chunked"):
        loadgen.content_length(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked")


async def test_closed_and_open_loop_keep_alive_against_the_app(app: loadgen.Target) -> None:
    request = loadgen.http_request("GET", "/hello", "app")
    closed = await loadgen.http_load(app, rate=0, conns=2, duration=0.3, warmup=0.05, request=request)
    assert closed["errors"] == 0 and closed["requests"] > 0 and closed["status"] == {"200": closed["requests"]}
    assert closed["latency_us"]["count"] == closed["requests"]
    fixed = await loadgen.http_load(app, rate=200, conns=2, duration=0.5, warmup=0.1, request=request)
    assert fixed["errors"] == 0 and fixed["status"] == {"200": fixed["requests"]}
    assert 60 <= fixed["requests"] <= 101  # 200/s for 0.5 s, due on a schedule (not as fast as it goes)


async def test_a_pipelined_pair_is_answered_in_order_and_close_is_honoured(app: loadgen.Target) -> None:
    reader, writer = await asyncio.open_connection(app.host, app.port)
    writer.write(loadgen.http_request("POST", "/a", "x") + b"GET /b HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    data = await asyncio.wait_for(reader.read(), 5)  # read() to EOF: the app closed after the second
    writer.close()
    assert data == loadgen.HTTP_RESPONSE + loadgen.HTTP_CLOSE


async def test_check_reopens_a_connection_the_path_closed() -> None:
    """A path that answers a denied request and closes (as some proxies do) costs the check a new connection."""

    async def deny_and_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        if b" /hello " in head:
            writer.write(loadgen.HTTP_RESPONSE)
            await writer.drain()
            head = await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 19\r\nConnection: close\r\n\r\nRBAC: access denied")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(deny_and_close, "127.0.0.1", 0)
    try:
        target = loadgen.Target("127.0.0.1", server.sockets[0].getsockname()[1])
        out = await loadgen.http_check(target, [("GET", "/hello"), ("GET", "/version"), ("GET", "/x")], "h")
    finally:
        server.close()
        await server.wait_closed()
    assert [c["status"] for c in out["checks"]] == [200, 403, 403]
    assert out["connections"] == 2


def test_http_only_paths_skip_the_tcp_steps_and_tcp_paths_the_http_ones() -> None:
    """An HTTP-only path (no echo target) never runs iperf3 or the echo tests, and a TCP-only path (no HTTP
    target) no HTTP test: each skipped step returns no figure without starting anything."""
    s = Settings.for_args(type("A", (), {"quick": True, "reps": 0, "hold": 0})())
    steps = dict(rep_steps(None, s))  # type: ignore[arg-type]  # a step that ran would need the group
    http_only = PathSetup("waypoint", http_target="socks5://127.0.0.1:1/10.0.0.1:80")
    tcp_only = PathSetup("ztunnel", echo_target="127.0.0.1:1")
    tcp, http, h2c = ["throughput 1", "throughput 4", "latency", "connrate"], ["http saturation", "http latency"], [
        "h2c saturation",
        "h2c latency",
    ]
    assert list(steps) == [*tcp, *http, *h2c]
    for what in [*tcp, *h2c]:  # the path does not say it carries h2c
        assert steps[what](http_only) == {}, what
    for what in [*http, *h2c]:
        assert steps[what](tcp_only) == {}, what


def test_the_waypoint_is_compared_with_haproxy_http_and_judged_by_issue_12() -> None:
    samples = {
        "direct": {"http_p50_us": [50.0], "http_p99_us": [200.0], "http_rps": [40000.0]},
        "haproxy": {"http_p50_us": [None]},
        "haproxy-http": {"http_p50_us": [250.0], "http_p99_us": [700.0], "http_rps": [10000.0]},
        "waypoint": {"http_p50_us": [450.0], "http_p99_us": [1500.0], "http_rps": [6000.0]},
    }
    samples["haproxy-http"]["http_rps_per_core"] = [30000.0]
    samples["waypoint"]["http_rps_per_core"] = [9000.0]
    summary = report.summarize_all(samples)
    rat = report.ratios(summary, list(samples))
    assert rat["waypoint"]["http_rps"] == {"floor": 6000.0 / 40000.0, "peer": 0.6}
    assert rat["haproxy-http"]["http_rps"]["peer"] is None  # the L7 peer is not compared with the TCP peer
    checks = {t["target"]: t for t in report.waypoint_targets(summary)}
    p50 = checks["waypoint: added HTTP latency p50 ≤ 2 × HAProxy L7's (issue 12)"]
    assert (p50["value"], p50["limit"], p50["met"]) == (400.0, 400.0, True)
    p99 = checks["waypoint: added HTTP latency p99 ≤ 2 × HAProxy L7's (issue 12)"]
    assert (p99["value"], p99["limit"], p99["met"]) == (1300.0, 1000.0, False)
    rps = checks["waypoint: HTTP requests/s ≥ 0.5 × HAProxy L7's (issue 12)"]
    assert (rps["limit"], rps["met"]) == (5000.0, True)
    per_core = checks["waypoint: HTTP requests/s per core ≥ 0.5 × HAProxy L7's (issue 12)"]
    assert (per_core["limit"], per_core["met"]) == (15000.0, False)
    result = {
        "meta": {},
        "paths": {p: {"available": True} for p in samples},
        "summary": summary,
        "ratios": rat,
        "targets": list(checks.values()),
    }
    table = report.render_markdown(result)
    header = next(line for line in table.splitlines() if line.startswith("| Figure |"))
    assert header.endswith("| waypoint ÷ haproxy-http |") and "haproxy-http ÷ haproxy" not in header
    assert "| HTTP/1.1 requests/s at saturation (keep-alive, 16 conns) (req/s) | 40,000 | – | 10,000 | 6,000 |" in table


def test_the_l7_decision_target_reads_policy_bench_l7_json() -> None:
    policy = {
        "result": {
            "results": [
                {"mode": "l7", "layout": "spread", "policies": 1000, "median_us": 9.0},
                {"mode": "l7", "layout": "one-namespace", "policies": 1000, "median_us": 21.0},
                {"mode": "l7", "layout": "spread", "policies": 100, "median_us": 30.0},
            ]
        }
    }
    (check,) = report.policy_l7_targets(policy)
    assert (check["value"], check["met"]) == (21.0, False)  # the slowest layout at 1,000 counts
    assert report.policy_l7_targets({"result": {"results": [{"mode": "l4", "policies": 1000}]}}) == []
    assert report.policy_l7_targets(None) == []


def test_the_waypoint_cluster_opts_the_service_in_and_attaches_the_l7_policy(tmp_path: Path) -> None:
    from ztunnel.config.loader import load_files

    f = tmp_path / "cluster.yaml"
    f.write_text(cluster_yaml())
    config = load_files([str(f)])
    assert [w.name for w in config.workloads if w.namespace == "wp"] == ["client", "server", "waypoint-0"]
    text = f.read_text()
    assert "istio.io/use-waypoint: waypoint" in text and 'paths: ["*/hello"]' in text
    # the lab's variant: the same Gateway, Service and policy; the lab places the pods and deploys the waypoint
    f.write_text(cluster_yaml(lab=True))
    lab = load_files([str(f)])
    assert sorted(w.name for w in lab.workloads if w.namespace == "wp") == ["client", "server"]
    lab_text = f.read_text()
    assert "gatewayClassName: istio-waypoint" in lab_text and "kind: Node" not in lab_text
    for doc in ("kind: Service", "kind: AuthorizationPolicy", "kind: Gateway"):
        assert text.split(doc, 1)[1].split("---", 1)[0] == lab_text.split(doc, 1)[1].split("---", 1)[0]


def test_haproxy_w_decides_on_method_and_path_and_its_configs_are_valid(tmp_path: Path) -> None:
    make_haproxy_certs(tmp_path)
    configs = haproxy_http_configs(tmp_path, 1000)
    w = configs["w"]
    assert "mode http" in w and "acl allowed_method method GET" in w and "acl allowed_path path_end /hello" in w
    assert "http-request deny deny_status 403 unless allowed_method allowed_path" in w
    assert "ssl crt" in configs["a"] and "ssl crt" in configs["b"]  # mTLS on both sides of W, like HBONE
    binary = shutil.which("haproxy")
    if binary is None:
        pytest.skip("haproxy is not installed (bench/run installs it)")
    for side, cfg in configs.items():
        path = tmp_path / f"{side}.cfg"
        path.write_text(cfg)
        r = subprocess.run([binary, "-c", "-f", str(path)], capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, f"{side}: {r.stdout}{r.stderr}"


def test_the_hosts_load_average_is_shown() -> None:
    """On a shared 2-core machine the tails of the HTTP latency are mostly other work's: the table says how much."""
    result = {
        "meta": {"date": "d", "quick": True, "reps": 1, "host_load_average": [4.5, 5.25], "host": {"cpus": 2}},
        "paths": {"direct": {"available": True}},
        "summary": {},
    }
    assert "Load average (1 min) at the start / end: 4.5 / 5.25 (2 CPUs;" in report.render_markdown(result)


H2LOAD_OUTPUT = """starting benchmark...
spawning thread #0: 4 total client(s). Timing-based test with 1s of warm-up time and 3s of main duration ...
Warm-up phase is over for thread #0.
Main benchmark duration is over for thread #0. Stopping all clients.
Stopped all clients for thread #0

finished in 3.00s, 12345.67 req/s, 1.05MB/s
requests: 37037 total, 37101 started, 37037 done, 37037 succeeded, 0 failed, 0 errored, 0 timeout
status codes: 37037 2xx, 0 3xx, 0 4xx, 0 5xx
traffic: 3.15MB (3300000) total, 1.20MB (1250000) headers (space savings 80.00%), 222.22KB (227556) data
"""


def test_h2load_summary_is_parsed_and_a_non_2xx_is_seen() -> None:
    from bench.steps import parse_h2load

    out = parse_h2load(H2LOAD_OUTPUT)
    assert out["per_second"] == 12345.67 and out["requests"] == 37037 and out["succeeded"] == 37037
    assert out["failed"] == out["errored"] == out["timeout"] == out["non_2xx"] == 0
    denied = parse_h2load(H2LOAD_OUTPUT.replace("37037 2xx, 0 3xx, 0 4xx", "37000 2xx, 0 3xx, 37 4xx"))
    assert denied["non_2xx"] == 37
    with pytest.raises(RuntimeError, match="no summary"):
        parse_h2load("connect: Connection refused\n")


class _H2App(asyncio.Protocol):
    """A tiny h2c app for the client's test: 200 `hello` for every path but /version (403)."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        import h2.config
        import h2.connection

        self.transport = transport
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding="utf-8"))
        self.conn.initiate_connection()
        transport.write(self.conn.data_to_send())  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        import h2.events

        for ev in self.conn.receive_data(data):
            if isinstance(ev, h2.events.RequestReceived):
                status = "403" if dict(ev.headers)[":path"] == "/version" else "200"
                self.conn.send_headers(ev.stream_id, [(":status", status), ("content-length", "5")])
                self.conn.send_data(ev.stream_id, b"hello", end_stream=True)
        self.transport.write(self.conn.data_to_send())  # type: ignore[attr-defined]


async def test_the_h2c_client_checks_and_loads_one_stream_per_request() -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(_H2App, "127.0.0.1", 0)
    try:
        target = loadgen.Target("127.0.0.1", server.sockets[0].getsockname()[1])
        out = await loadgen.h2c_check(target, [("GET", "/hello"), ("GET", "/version"), ("GET", "/hello")], "h")
        assert [c["status"] for c in out["checks"]] == [200, 403, 200]
        load = await loadgen.h2c_load(target, rate=200, conns=2, duration=0.5, warmup=0.1, path="/hello", host="h")
        assert load["errors"] == 0 and load["status"] == {"200": load["requests"]} and load["requests"] >= 60
    finally:
        server.close()
        await server.wait_closed()


async def test_h2c_saturation_runs_h2load_against_the_path() -> None:
    """The step's own h2load command line works (h2load refuses fractional seconds: `-D 5.0` is a value error,
    which the first lab run met: no summary, no h2c figure)."""
    import dataclasses

    from bench.steps import h2c_saturation

    if shutil.which("h2load") is None:
        pytest.skip("h2load is not installed (bench/run installs nghttp2-client)")
    loop = asyncio.get_running_loop()
    server = await loop.create_server(_H2App, "127.0.0.1", 0)
    try:
        path = PathSetup("haproxy-http", h2c=True, h2load_target=f"127.0.0.1:{server.sockets[0].getsockname()[1]}")
        s = Settings.for_args(type("A", (), {"quick": True, "reps": 0, "hold": 0})())
        out = await asyncio.to_thread(h2c_saturation, path, dataclasses.replace(s, http_secs=0.5))
    finally:
        server.close()
        await server.wait_closed()
    assert out["h2c_rps"] is not None and out["h2c_rps"] > 0
    assert out["h2c_rps_per_core"] is None  # no proxy processes: no CPU to divide by
