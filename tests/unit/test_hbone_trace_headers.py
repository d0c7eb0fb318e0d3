"""The optional tracing headers of an HBONE CONNECT (DESIGN §4.2), over the in-memory transport."""

from __future__ import annotations

from tests.support.memory import Handler, connect_pair
from ztunnel.hbone.protocol import Authority, ConnectRequest, trace_headers, validate_connect

TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


async def test_traceparent_and_baggage_arrive_with_the_connect() -> None:
    handler = Handler()
    client, _server, _, _ = connect_pair(handler)
    await client.ready
    stream = await client.open_stream(
        Authority("10.0.0.1", 8080), extra=trace_headers(TRACEPARENT, "user=alice,tenant=7")
    )
    served = await handler.streams.get()
    request = handler.verdicts[0]
    assert isinstance(request, ConnectRequest)
    assert request.traceparent == TRACEPARENT
    assert request.baggage == "user=alice,tenant=7"
    await stream.write_eof()
    assert await served.read() == b""
    await served.write_eof()
    assert await stream.read() == b""


async def test_without_trace_headers_nothing_is_sent() -> None:
    handler = Handler()
    client, _server, _, _ = connect_pair(handler)
    await client.ready
    stream = await client.open_stream(Authority("10.0.0.1", 8080), extra=trace_headers())
    await handler.streams.get()
    request = handler.verdicts[0]
    assert isinstance(request, ConnectRequest)
    assert request.traceparent is None and request.baggage is None
    assert "traceparent" not in request.headers and "baggage" not in request.headers
    stream.abort()


def test_a_malformed_traceparent_is_ignored() -> None:
    base = [(":method", "CONNECT"), (":authority", "10.0.0.1:80")]
    for bad in ("nonsense", "00-xyz-00f067aa0ba902b7-01", f"{TRACEPARENT}\nforged=1", TRACEPARENT + "0"):
        request = validate_connect([*base, ("traceparent", bad)])
        assert isinstance(request, ConnectRequest) and request.traceparent is None
    request = validate_connect([*base, ("traceparent", TRACEPARENT.upper())])
    assert isinstance(request, ConnectRequest) and request.traceparent == TRACEPARENT
