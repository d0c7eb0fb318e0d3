"""The waypoint's h2c path, per request: what `ztunnel.waypoint.http2` costs for one small GET proxied h2c → h2c.

One "request" is the waypoint's HTTP/2 work for a small GET on a kept-alive h2c connection, both sides: the
client-facing H2Conn decodes the HEADERS into a RequestHead, the upstream H2Conn encodes it as a new stream, then
decodes the app's response (HEADERS + a 64-byte DATA with END_STREAM), and the client-facing one encodes that
response; the flow-control acknowledgements of the DATA are included. The client and the app are plain h2
connections driven in the same loop; only the waypoint's calls are timed. With `--h1-upstream` the upstream side
is the HTTP/1.1 rendering instead (what an h2c client of an HTTP/1.1 app costs), through waypoint/http1. Each
round also times the same request proxied HTTP/1.1 both ways (waypoint/http1), as the baseline of the same run.

    python bench/h2c_bench.py [--requests 20000] [--rounds 5] [--h1-upstream]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import h2.config
import h2.connection
import h2.events

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ztunnel.waypoint import http1
from ztunnel.waypoint.http2 import Data, Ended, H2Conn, RequestStarted, ResponseStarted
from ztunnel.waypoint.server import _h1_head

REQUEST = [
    (":method", "GET"),
    (":path", "/api/v1/items?id=42"),
    (":scheme", "http"),
    (":authority", "reviews.default.svc.cluster.local:9080"),
    ("user-agent", "curl/8.5.0"),
    ("accept", "*/*"),
    ("x-request-id", "3f2c9a1e-7b6d-4c1a-9e2f-5d8b7a6c4e3d"),
]
BODY = b"x" * 64
RESPONSE = [(":status", "200"), ("content-type", "application/json"), ("content-length", "64")]
H1_RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 64\r\n\r\n" + BODY


def _peer(client_side: bool) -> h2.connection.H2Connection:
    c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=client_side))
    c.initiate_connection()
    return c


def run(n: int, h1_upstream: bool) -> float:
    """Seconds of waypoint work per request, over `n` requests on one connection each side."""
    client, app = _peer(True), _peer(False)
    down, up = H2Conn(client_side=False), H2Conn(client_side=True)
    down.receive(client.data_to_send())
    client.receive_data(down.data_to_send())
    up.receive(app.data_to_send())
    app.receive_data(up.data_to_send())
    up.receive(app.data_to_send())
    spent = 0.0
    clock = time.perf_counter
    for i in range(n):
        sid = 1 + 2 * i
        client.send_headers(sid, REQUEST, end_stream=True)
        wire = client.data_to_send()
        t0 = clock()
        head = next(e.head for e in down.receive(wire) if isinstance(e, RequestStarted))
        status, headers, chunks = 0, [], []
        if h1_upstream:
            h = http1.Http1Connection()
            h.receive_data(_h1_head(head, no_body=True))
            h.next_request_event()
            h.allow()
            h.data_to_upstream()
            h.receive_upstream_data(H1_RESPONSE)
            while True:
                ev = h.next_response_event()
                h.data_to_client()
                if isinstance(ev, http1.ResponseReceived):
                    status, headers = ev.status, [(k.lower(), v) for k, v in ev.headers]
                elif isinstance(ev, http1.ResponseData):
                    chunks.append(ev.data)
                else:
                    break
            spent += clock() - t0
        else:
            usid = up.send_request(head, b"http", (), frozenset(), end_stream=True)
            out = up.data_to_send()
            spent += clock() - t0
            for ev in app.receive_data(out):  # the app: not timed
                if isinstance(ev, h2.events.RequestReceived):
                    app.send_headers(ev.stream_id, RESPONSE)
                    app.send_data(ev.stream_id, BODY, end_stream=True)
            wire = app.data_to_send()
            t1 = clock()
            for ev in up.receive(wire):
                if isinstance(ev, ResponseStarted):
                    status, headers = ev.status, list(ev.headers)
                elif isinstance(ev, Data):
                    chunks.append(ev.data)
                    up.ack(usid, ev.flow)
                elif isinstance(ev, Ended):
                    break
            out = up.data_to_send()
            spent += clock() - t1
            app.receive_data(out)
        t2 = clock()
        down.send_response(sid, status, headers)
        for chunk in chunks:
            down.send_data(sid, chunk)
        down.end(sid)
        wire = down.data_to_send()
        spent += clock() - t2
        for ev in client.receive_data(wire):  # the client: not timed
            if isinstance(ev, h2.events.DataReceived):
                client.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
        wire = client.data_to_send()
        t3 = clock()
        down.receive(wire)
        spent += clock() - t3
    return spent / n


H1_REQUEST = (
    b"GET /api/v1/items?id=42 HTTP/1.1\r\nHost: reviews.default.svc.cluster.local:9080\r\nUser-Agent: curl/8.5.0\r\n"
    b"Accept: */*\r\nX-Request-Id: 3f2c9a1e-7b6d-4c1a-9e2f-5d8b7a6c4e3d\r\n\r\n"
)


def run_http1(n: int) -> float:
    """The same request over HTTP/1.1 both ways through waypoint/http1 (the baseline, measured in the same run)."""
    h = http1.Http1Connection()
    clock = time.perf_counter
    t0 = clock()
    for _ in range(n):
        h.receive_data(H1_REQUEST)
        h.next_request_event()
        h.allow()
        h.data_to_upstream()
        h.receive_upstream_data(H1_RESPONSE)
        while not isinstance(h.next_response_event(), http1.ResponseEnded):
            pass
        h.data_to_client()
        h.next_request_event()  # NEED_DATA: ready for the next request
    return (clock() - t0) / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--h1-upstream", action="store_true")
    args = parser.parse_args()
    samples: list[float] = []
    baseline: list[float] = []
    for _ in range(args.rounds):  # interleaved, so that a busy host weighs on both alike
        samples.append(run(args.requests, args.h1_upstream) * 1e6)
        baseline.append(run_http1(args.requests) * 1e6)
    print(
        json.dumps(
            {
                "path": "h2c -> http/1.1" if args.h1_upstream else "h2c -> h2c",
                "requests": args.requests,
                "us_per_request_median": round(statistics.median(samples), 2),
                "us_per_request_min": round(min(samples), 2),
                "http1_us_per_request_median": round(statistics.median(baseline), 2),
                "ratio_to_http1": round(statistics.median(samples) / statistics.median(baseline), 1),
            }
        )
    )


if __name__ == "__main__":
    main()
