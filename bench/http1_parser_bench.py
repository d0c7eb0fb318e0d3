"""HTTP/1.1 parser choice for the waypoint: h11 against httptools (llhttp), measured the waypoint's way.

One "request" here is the whole HTTP/1.1 work a waypoint does for a small GET on a keep-alive connection:
parse the client's request head, serialize it for the upstream, parse the upstream's response (head + a
small body), serialize that response for the client. The two halves are timed apart (request: parse +
serialize; response: parse + serialize). With httptools the serializing is the waypoint's own
`b"".join` of the head (httptools only parses); with h11 it is h11's own `send()`.

It also feeds each parser the request-smuggling and bad-input cases and says which it rejects on its own
(what the waypoint must check itself is whatever is accepted here), and times the same cycle through
`ztunnel.waypoint.http1` (httptools plus the waypoint's own framing and checks). Prints JSON.

    python bench/http1_parser_bench.py [--requests 20000] [--rounds 5] [--output FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import h11  # not a project dependency: `pip install h11` to run this comparison
import httptools

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ztunnel.waypoint import http1

REQUEST = (
    b"GET /api/v1/items?id=42 HTTP/1.1\r\n"
    b"Host: reviews.default.svc.cluster.local:9080\r\n"
    b"User-Agent: curl/8.5.0\r\n"
    b"Accept: */*\r\n"
    b"X-Request-Id: 3f2c9a1e-7b6d-4c1a-9e2f-5d8b7a6c4e3d\r\n"
    b"\r\n"
)
RESPONSE = (
    b"HTTP/1.1 200 OK\r\n"
    b"Content-Type: application/json\r\n"
    b"Content-Length: 17\r\n"
    b"Date: Mon, 23 Nov 2026 02:00:00 GMT\r\n"
    b"\r\n"
    b'{"id":42,"ok":1}\n'
)

# name -> raw request; each is something a smuggling-safe proxy must not pass on as it came.
BAD_REQUESTS: dict[str, bytes] = {
    "cl_and_te": b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "te_and_cl": b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n0\r\n\r\n",
    "duplicate_cl_differ": b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
    "duplicate_cl_same": b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nab",
    "cl_list": b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 2, 2\r\n\r\nab",
    "cl_plus_sign": b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +2\r\n\r\nab",
    "te_not_chunked_last": b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, gzip\r\n\r\n0\r\n\r\n",
    "te_unknown": b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n",
    "te_space_before_colon": b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding : chunked\r\n\r\n0\r\n\r\n",
    "obs_fold": b"GET / HTTP/1.1\r\nHost: a\r\nX-Folded: one\r\n two\r\n\r\n",
    "bare_lf": b"GET / HTTP/1.1\nHost: a\n\n",
    "bare_cr_in_value": b"GET / HTTP/1.1\r\nHost: a\r\nX-A: b\rc\r\n\r\n",
    "nul_in_value": b"GET / HTTP/1.1\r\nHost: a\r\nX-A: b\x00c\r\n\r\n",
    "space_in_name": b"GET / HTTP/1.1\r\nHost: a\r\nX A: b\r\n\r\n",
    "ctl_in_target": b"GET /a\x01b HTTP/1.1\r\nHost: a\r\n\r\n",
    "no_host_http11": b"GET / HTTP/1.1\r\nX-A: b\r\n\r\n",
    "two_hosts": b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
    "bad_chunk_size": b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nab\r\n0\r\n\r\n",
    "chunk_size_overflow": (
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n1000000000000000000000002\r\nab\r\n0\r\n\r\n"
    ),
    "chunk_missing_crlf": b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabXX0\r\n\r\n",
    "http_0_9": b"GET /\r\n\r\n",
    "version_2_0": b"GET / HTTP/2.0\r\nHost: a\r\n\r\n",
    "oversized_head_64k": b"GET / HTTP/1.1\r\nHost: a\r\nX-Big: " + b"a" * 65536 + b"\r\n\r\n",
}


def _h11_round(n: int) -> tuple[float, float]:
    """Seconds per request for (request parse + serialize, response parse + serialize) with h11."""
    server = h11.Connection(h11.SERVER)
    client = h11.Connection(h11.CLIENT)
    t_req = t_resp = 0.0
    clock = time.perf_counter
    for _ in range(n):
        t0 = clock()
        server.receive_data(REQUEST)
        req = server.next_event()
        assert isinstance(req, h11.Request)
        end = server.next_event()
        assert isinstance(end, h11.EndOfMessage)
        out = client.send(h11.Request(method=req.method, target=req.target, headers=req.headers))
        out2 = client.send(h11.EndOfMessage())
        assert out is not None and out2 is not None
        t1 = clock()
        client.receive_data(RESPONSE)
        resp = client.next_event()
        assert isinstance(resp, h11.Response)
        data = client.next_event()
        assert isinstance(data, h11.Data)
        assert isinstance(client.next_event(), h11.EndOfMessage)
        back = server.send(h11.Response(status_code=resp.status_code, headers=resp.headers, reason=resp.reason))
        back2 = server.send(h11.Data(data=data.data))
        back3 = server.send(h11.EndOfMessage())
        assert back is not None and back2 is not None and back3 is not None
        server.start_next_cycle()
        client.start_next_cycle()
        t2 = clock()
        t_req += t1 - t0
        t_resp += t2 - t1
    return t_req / n, t_resp / n


class _Head:
    """What the callbacks collect: the parsers fill it, the waypoint reads it."""

    __slots__ = ("body", "complete", "headers", "url")

    def __init__(self) -> None:
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.body: list[bytes] = []
        self.complete = False

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        self.complete = True


def _serialize(start: bytes, headers: list[tuple[bytes, bytes]]) -> bytes:
    parts = [start]
    for name, value in headers:
        parts += (name, b": ", value, b"\r\n")
    parts.append(b"\r\n")
    return b"".join(parts)


def _httptools_round(n: int) -> tuple[float, float]:
    """Seconds per request for the same work with httptools (llhttp) and the waypoint's own serializing."""
    req_head = _Head()
    resp_head = _Head()
    req_parser = httptools.HttpRequestParser(req_head)
    resp_parser = httptools.HttpResponseParser(resp_head)
    t_req = t_resp = 0.0
    clock = time.perf_counter
    for _ in range(n):
        t0 = clock()
        req_head.url = b""
        req_head.headers = []
        req_head.complete = False
        req_parser.feed_data(REQUEST)
        assert req_head.complete
        method = req_parser.get_method()
        up = _serialize(b"%s %s HTTP/1.1\r\n" % (method, req_head.url), req_head.headers)
        assert up
        t1 = clock()
        resp_head.headers = []
        resp_head.body = []
        resp_head.complete = False
        resp_parser.feed_data(RESPONSE)
        assert resp_head.complete
        status = resp_parser.get_status_code()
        back = _serialize(b"HTTP/1.1 %d OK\r\n" % status, resp_head.headers) + b"".join(resp_head.body)
        assert back
        t2 = clock()
        t_req += t1 - t0
        t_resp += t2 - t1
    return t_req / n, t_resp / n


def _waypoint_round(n: int) -> tuple[float, float]:
    """The same cycle through the waypoint's own `Http1Connection` (httptools + its framing and checks)."""
    conn = http1.Http1Connection()
    t_req = t_resp = 0.0
    clock = time.perf_counter
    for _ in range(n):
        t0 = clock()
        conn.receive_data(REQUEST)
        ev = conn.next_request_event()
        assert isinstance(ev, http1.RequestReceived)
        conn.allow()
        up = conn.data_to_upstream()
        assert up
        t1 = clock()
        conn.receive_upstream_data(RESPONSE)
        assert isinstance(conn.next_response_event(), http1.ResponseReceived)
        assert isinstance(conn.next_response_event(), http1.ResponseData)
        assert isinstance(conn.next_response_event(), http1.ResponseEnded)
        back = conn.data_to_client()
        assert back
        t2 = clock()
        t_req += t1 - t0
        t_resp += t2 - t1
    return t_req / n, t_resp / n


def _h11_verdict(raw: bytes) -> str:
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=16 * 1024)
    try:
        conn.receive_data(raw)
        conn.receive_data(b"")  # EOF: a half-read body or head counts
        for _ in range(16):
            ev = conn.next_event()
            if ev is h11.NEED_DATA or ev is h11.PAUSED or isinstance(ev, h11.ConnectionClosed):
                return f"accepted ({type(ev).__name__ if not isinstance(ev, type) else ev.__name__})"
            if isinstance(ev, h11.EndOfMessage):
                return "accepted"
    except h11.RemoteProtocolError as exc:
        return f"rejected {exc.error_status_hint}: {exc}"
    return "accepted"


class _Sink:
    def __init__(self) -> None:
        self.headers: list[tuple[bytes, bytes]] = []
        self.complete = False

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_message_complete(self) -> None:
        self.complete = True


def _httptools_verdict(raw: bytes) -> str:
    sink = _Sink()
    parser = httptools.HttpRequestParser(sink)
    try:
        parser.feed_data(raw)
    except httptools.HttpParserUpgrade:
        return "accepted (upgrade)"
    except httptools.HttpParserError as exc:
        return f"rejected: {exc}"
    return "accepted" if sink.complete else "accepted (incomplete)"


def _median(round_fn: Callable[[int], tuple[float, float]], n: int, rounds: int) -> dict[str, float]:
    round_fn(min(n, 2000))  # warm up
    samples = [round_fn(n) for _ in range(rounds)]
    req = statistics.median(s[0] for s in samples)
    resp = statistics.median(s[1] for s in samples)
    return {
        "request_us": round(req * 1e6, 2),
        "response_us": round(resp * 1e6, 2),
        "total_us": round((req + resp) * 1e6, 2),
        "requests_per_s_one_core": round(1 / (req + resp)),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=20000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--output", type=Path)
    args = ap.parse_args(argv)
    result: dict[str, Any] = {
        "python": sys.version.split()[0],
        "versions": {"h11": h11.__version__, "httptools": httptools.__version__},
        "requests_per_round": args.requests,
        "rounds": args.rounds,
        "h11": _median(_h11_round, args.requests, args.rounds),
        "httptools": _median(_httptools_round, args.requests, args.rounds),
        "waypoint_http1": _median(_waypoint_round, args.requests, args.rounds),
        "bad_input": {
            name: {"h11": _h11_verdict(raw), "httptools": _httptools_verdict(raw)} for name, raw in BAD_REQUESTS.items()
        },
    }
    text = json.dumps(result, indent=2)
    if args.output:
        args.output.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
