"""The sans-IO HTTP/1.x request parser: good requests in any chunking, bad ones as status codes."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ztunnel.net.http import (
    HttpParseError,
    RequestParser,
    Response,
    parse_host_port,
    render_response,
)


def parse(data: bytes) -> object:
    return RequestParser().feed(data)


def test_simple_get() -> None:
    req = RequestParser().feed(b"GET /logging?level=debug&x= HTTP/1.1\r\nHost: a\r\nAccept: */*\r\n\r\n")
    assert req is not None
    assert req.method == "GET"
    assert req.path == "/logging"
    assert req.query == {"level": "debug", "x": ""}
    assert req.header("HOST") == "a"
    assert req.version == "HTTP/1.1"
    assert req.body == b""


def test_bare_lf_and_http10() -> None:
    req = RequestParser().feed(b"GET /healthz/ready HTTP/1.0\n\n")
    assert req is not None and req.path == "/healthz/ready"


def test_body_with_content_length_across_chunks() -> None:
    p = RequestParser()
    assert p.feed(b"POST /quitquitquit HTTP/1.1\r\nContent-Length: 5\r\n") is None
    assert p.feed(b"\r\nab") is None
    req = p.feed(b"cdeEXTRA")
    assert req is not None and req.body == b"abcde"


@given(st.integers(min_value=1, max_value=40))
@settings(max_examples=40, deadline=None)
def test_any_chunking_gives_the_same_request(chunk: int) -> None:
    data = b"POST /logging?level=info HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc"
    p = RequestParser()
    req = None
    for i in range(0, len(data), chunk):
        req = p.feed(data[i : i + chunk])
    assert req is not None and req.body == b"abc" and req.query == {"level": "info"}


def test_incomplete_head_waits() -> None:
    assert parse(b"GET / HTTP/1.1\r\nHost: a\r\n") is None


@pytest.mark.parametrize(
    ("data", "status"),
    [
        (b"\r\n\r\n", 400),
        (b"GET /\r\n\r\n", 400),
        (b"GET / HTTP/1.1 extra\r\n\r\n", 400),
        (b"G(T / HTTP/1.1\r\n\r\n", 400),
        (b"GET / HTTP/2.0\r\n\r\n", 505),
        (b"GET / HTTX/1.1\r\n\r\n", 400),
        (b"GET http://x/ HTTP/1.1\r\n\r\n", 400),
        (b"GET /\x01 HTTP/1.1\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nno colon\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nbad name: v\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nA: b\r\n folded\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nA: b\x00c\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n", 501),
        (b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n", 413),
        (b"GET / HTTP/1.1\r\n" + b"A: b\r\n" * 100 + b"\r\n", 431),
    ],
)
def test_malformed_requests_get_a_status(data: bytes, status: int) -> None:
    with pytest.raises(HttpParseError) as e:
        parse(data)
    assert e.value.status == status


def test_oversized_head_without_end_is_refused_early() -> None:
    p = RequestParser()
    p.feed(b"GET / HTTP/1.1\r\n")
    with pytest.raises(HttpParseError) as e:
        for _ in range(100):
            p.feed(b"X-Filler: " + b"a" * 1000 + b"\r\n")
    assert e.value.status == 431


@given(st.binary(max_size=300))
@settings(max_examples=300, deadline=None)
def test_garbage_never_raises_anything_but_parse_errors(data: bytes) -> None:
    try:
        parse(data)
    except HttpParseError as e:
        assert 400 <= e.status < 600


def test_render_response() -> None:
    raw = render_response(Response.text("ready"))
    assert raw.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"Content-Length: 6\r\n" in raw and b"Connection: close\r\n" in raw
    assert raw.endswith(b"\r\n\r\nready\n")
    assert render_response(Response.text("x", 503), head_only=True).endswith(b"\r\n\r\n")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("127.0.0.1:15020", ("127.0.0.1", 15020)),
        ("[::1]:15000", ("::1", 15000)),
        (":0", ("127.0.0.1", 0)),
        ("localhost:15021", ("localhost", 15021)),
    ],
)
def test_parse_host_port(value: str, expected: tuple[str, int]) -> None:
    assert parse_host_port(value) == expected


@pytest.mark.parametrize("value", ["15020", "host:", "host:x", "::1:80", "h:70000"])
def test_parse_host_port_rejects(value: str) -> None:
    with pytest.raises(ValueError, match=r"HOST:PORT|brackets"):
        parse_host_port(value)
