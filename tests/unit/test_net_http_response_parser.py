"""The sans-IO side of the small HTTP/1.1 client: the request it writes, and responses in any chunking, bounded."""

from __future__ import annotations

import pytest

from ztunnel.net.http import (
    ClientResponse,
    HttpResponseError,
    Response,
    ResponseParser,
    render_request,
    render_response,
)


def feed_all(parser: ResponseParser, data: bytes, chunk: int) -> ClientResponse:
    for i in range(0, len(data), chunk):
        response = parser.feed(data[i : i + chunk])
        if response is not None:
            return response
    return parser.eof()


def test_request_asks_for_close_and_names_the_authority() -> None:
    assert render_request("GET", "127.0.0.1", 15021, "/healthz/ready") == (
        b"GET /healthz/ready HTTP/1.1\r\nHost: 127.0.0.1:15021\r\nConnection: close\r\n\r\n"
    )
    assert render_request("POST", "::1", 15000, "/logging?level=debug") == (
        b"POST /logging?level=debug HTTP/1.1\r\nHost: [::1]:15000\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
    )
    assert render_request("PUT", "h", 1, "/x", b"abc").endswith(b"Content-Length: 3\r\n\r\nabc")


@pytest.mark.parametrize("path", ["relative", "/a b", "/a\r\nX-Injected: 1", "/é"])
def test_request_target_must_be_an_encoded_absolute_path(path: str) -> None:
    with pytest.raises(ValueError, match="request target"):
        render_request("GET", "h", 1, path)


@pytest.mark.parametrize("chunk", [1, 7, 4096])
def test_our_servers_response_in_any_chunking(chunk: int) -> None:
    raw = render_response(Response.json({"served_workloads": []}, 200))
    response = feed_all(ResponseParser(), raw, chunk)
    assert response.status == 200
    assert response.header("Content-Type") == "application/json"
    assert response.body == b'{\n  "served_workloads": []\n}\n'


def test_content_length_ends_the_response_before_eof() -> None:
    parser = ResponseParser()
    assert parser.feed(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 9\r\n\r\nnot ") is None
    response = parser.feed(b"ready")
    assert response == ClientResponse(503, (("content-length", "9"),), b"not ready")


def test_without_content_length_the_body_runs_to_eof() -> None:
    parser = ResponseParser()
    assert parser.feed(b"HTTP/1.0 200 OK\n\nline 1\n") is None
    assert parser.feed(b"line 2\n") is None
    assert parser.eof().body == b"line 1\nline 2\n"


def test_head_answer_has_no_body() -> None:
    response = ResponseParser(head_only=True).feed(b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n")
    assert response is not None and response.status == 200 and response.body == b""


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"SSH-2.0-OpenSSH_9.6\r\n\r\n", "not an HTTP/1.x status line"),
        (b"HTTP/2 200\r\n\r\n", "not an HTTP/1.x status line"),
        (b"HTTP/1.1 20 OK\r\n\r\n", "not an HTTP/1.x status line"),
        (b"HTTP/1.1 200 OK\r\nno colon\r\n\r\n", "malformed response header"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", "malformed content-length"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", "malformed content-length"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", "transfer-encoding"),
    ],
)
def test_what_is_not_a_response_is_an_error(data: bytes, message: str) -> None:
    with pytest.raises(HttpResponseError, match=message):
        ResponseParser().feed(data)


def test_short_or_missing_answers_are_errors_at_eof() -> None:
    with pytest.raises(HttpResponseError, match="no response"):
        ResponseParser().eof()
    parser = ResponseParser()
    parser.feed(b"HTTP/1.1 200 OK\r\n")
    with pytest.raises(HttpResponseError, match="before a complete response head"):
        parser.eof()
    parser = ResponseParser()
    parser.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
    with pytest.raises(HttpResponseError, match="after 3 of 10 body bytes"):
        parser.eof()


def test_reading_is_bounded() -> None:
    """A server that sends without end (or announces a huge body) costs at most max_bytes, then an error."""
    parser = ResponseParser(max_bytes=1000)
    parser.feed(b"HTTP/1.1 200 OK\r\n\r\n")
    with pytest.raises(HttpResponseError, match="larger than 1000 bytes"):
        for _ in range(100):
            parser.feed(b"x" * 100)
    with pytest.raises(HttpResponseError, match="content-length 5000"):
        ResponseParser(max_bytes=1000).feed(b"HTTP/1.1 200 OK\r\nContent-Length: 5000\r\n\r\n")
    with pytest.raises(HttpResponseError, match="head larger than"):
        ResponseParser(max_head=64).feed(b"HTTP/1.1 200 OK\r\n" + b"X-Filler: y\r\n" * 10)


def test_errors_are_oserrors() -> None:
    """Callers that only need "could it be asked" (the supervisor, the lab's probes) catch OSError alone."""
    assert issubclass(HttpResponseError, OSError)
