"""The small HTTP/1.1 client (blocking and asyncio edges) against the project's own server and a misbehaving one."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator

import pytest

from ztunnel.net.http import HttpResponseError, HttpServer, Request, Response, http_request, http_request_async


def _echo(request: Request) -> Response:
    return Response.text(f"{request.method} {request.path} {dict(request.query)} {request.body!r}")


@pytest.fixture
async def server() -> AsyncIterator[HttpServer]:
    routes = {"/echo": {"GET": _echo, "POST": _echo}, "/big": {"GET": lambda _r: Response(200, b"x" * 300_000)}}
    async with HttpServer("127.0.0.1", 0, routes, name="test") as s:
        yield s


async def test_async_and_blocking_requests_get_the_same_answers(server: HttpServer) -> None:
    a = await http_request_async("127.0.0.1", server.port, "POST", "/echo?level=debug", b"hi")
    b = await asyncio.to_thread(http_request, "127.0.0.1", server.port, "POST", "/echo?level=debug", b"hi")
    assert a == b
    assert (a.status, a.body) == (200, b"POST /echo {'level': 'debug'} b'hi'\n")
    missing = await http_request_async("127.0.0.1", server.port, "GET", "/nope")
    assert missing.status == 404 and b"no such path /nope" in missing.body
    big = await asyncio.to_thread(http_request, "127.0.0.1", server.port, "GET", "/big")
    assert big.status == 200 and len(big.body) == 300_000
    head = await http_request_async("127.0.0.1", server.port, "HEAD", "/big")
    assert head.status == 200 and head.body == b"" and head.header("content-length") == "300000"


async def test_a_response_over_the_limit_is_refused(server: HttpServer) -> None:
    with pytest.raises(HttpResponseError, match="larger than 100000 bytes"):
        await http_request_async("127.0.0.1", server.port, "GET", "/big", max_bytes=100_000)
    with pytest.raises(HttpResponseError, match="larger than 100000 bytes"):
        await asyncio.to_thread(http_request, "127.0.0.1", server.port, "GET", "/big", max_bytes=100_000)


async def test_a_server_that_never_finishes_costs_the_timeout_then_an_oserror() -> None:
    """A head and then a trickle, never the announced body: both edges give up at their deadline."""

    async def trickle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n")
        try:
            for _ in range(100):
                writer.write(b"x")
                await writer.drain()
                await asyncio.sleep(0.05)
        except ConnectionError:
            pass
        finally:
            writer.close()

    srv = await asyncio.start_server(trickle, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    try:
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            await http_request_async("127.0.0.1", port, "GET", "/", timeout=0.5)
        with pytest.raises(TimeoutError):
            await asyncio.to_thread(http_request, "127.0.0.1", port, "GET", "/", timeout=0.5)
        assert time.monotonic() - started < 3.0
    finally:
        srv.close()
        await srv.wait_closed()


async def test_nothing_listening_is_an_oserror() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: connections are refused
        with pytest.raises(OSError):
            await http_request_async("127.0.0.1", port, "GET", "/")
        with pytest.raises(OSError):
            http_request("127.0.0.1", port, "GET", "/")


async def test_a_given_connected_socket_is_used_and_closed(server: HttpServer) -> None:
    """The lab's way: the socket is made elsewhere (inside a netns) and handed over."""
    sock = socket.create_connection(("127.0.0.1", server.port))
    response = await asyncio.to_thread(http_request, "127.0.0.1", server.port, "GET", "/echo", sock=sock)
    assert response.status == 200 and response.body.startswith(b"GET /echo")
    assert sock.fileno() == -1
