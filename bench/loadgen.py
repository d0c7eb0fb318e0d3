"""Load generators and the app server for the benchmark, one role per process.

Roles (`python loadgen.py ROLE ...`):
- `echo-server HOST:PORT`: echoes every byte (uvloop). The app for latency, new connections and
  held connections.
- `latency TARGET`: fixed-rate request/response client (1 KiB, open loop like wrk2, several
  connections); prints JSON with every round-trip sample's percentiles.
- `connrate TARGET`: opens, uses (1 byte each way) and closes connections as fast as N workers can;
  prints JSON with the rate and the connect+first-byte time percentiles.
- `hold TARGET`: opens N connections (each proven end to end by a 1-byte echo), prints `ready N`,
  then holds them until stdin closes.
- `http-server HOST:PORT`: a keep-alive HTTP/1.1 app (uvloop): every request gets `200` and a 6-byte body.
- `http TARGET`: HTTP/1.1 keep-alive client over N connections, one request in flight per connection:
  at saturation (`--rate 0`, closed loop) or at a fixed rate (open loop, wrk2-style: latency counted from
  when a request was due, so a stall is not hidden by the requests it delays); prints JSON with the rate,
  latency percentiles and the status codes. `--check PATH=STATUS,...` instead sends one request per
  entry on one connection and prints the statuses (the path's policy proven before it is measured).
- `forward LISTEN TARGET`: a fixed-destination forwarder that reaches TARGET through a SOCKS5 proxy,
  relaying with splice(2) so the payload never enters Python; for tools that cannot speak SOCKS
  (iperf3). One thread per direction, so only for a handful of connections.

TARGET is `HOST:PORT` or `socks5://PROXYHOST:PORT/HOST:PORT` (the client speaks SOCKS5 itself).
Sans-anything: this file is a script, kept free of project imports so it runs with any Python 3.11.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import struct
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

try:
    import uvloop
except ImportError:  # pragma: no cover - the venv has it
    uvloop = None  # type: ignore[assignment]


@dataclass(frozen=True, slots=True)
class Target:
    host: str
    port: int
    socks: tuple[str, int] | None = None

    @classmethod
    def parse(cls, value: str) -> Target:
        socks = None
        if value.startswith("socks5://"):
            proxy, _, value = value[len("socks5://") :].partition("/")
            ph, _, pp = proxy.rpartition(":")
            socks = (ph, int(pp))
        host, _, port = value.rpartition(":")
        return cls(host, int(port), socks)

    @property
    def connect_addr(self) -> tuple[str, int]:
        return self.socks if self.socks else (self.host, self.port)


def socks5_connect_request(host: str, port: int) -> bytes:
    """Greeting (no auth) + CONNECT to an IPv4/IPv6 address, pipelined in one write."""
    try:
        addr = socket.inet_pton(socket.AF_INET, host)
        atyp = b"\x01"
    except OSError:
        addr = socket.inet_pton(socket.AF_INET6, host)
        atyp = b"\x04"
    return b"\x05\x01\x00" + b"\x05\x01\x00" + atyp + addr + struct.pack("!H", port)


CONNECT_TIMEOUT = 5.0  # a connection not echoing within this counts as an error, never a hang
SOCKS_REPLY_LEN = 2 + 10  # method choice + IPv4 CONNECT reply (what a proxy with an IPv4 bind sends)
P = TypeVar("P", bound=asyncio.Protocol)  # the protocol a client connection is driven by


async def open_stream(target: Target) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection(*target.connect_addr)
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if target.socks:
        writer.write(socks5_connect_request(target.host, target.port))
        method = await reader.readexactly(2)
        head = await reader.readexactly(4)
        if method != b"\x05\x00" or head[1] != 0:
            writer.close()
            raise ConnectionError(f"SOCKS5 refused: {method.hex()} {head.hex()}")
        rest = {1: 4, 4: 16}.get(head[3])
        if rest is None:  # domain name bind address
            rest = (await reader.readexactly(1))[0]
        await reader.readexactly(rest + 2)
    return reader, writer


async def open_proven(target: Target) -> asyncio.StreamWriter:
    """A connection proven end to end by a 1-byte echo from the app within CONNECT_TIMEOUT; closed again if
    the proof fails (the error is raised)."""
    writer = None
    try:
        async with asyncio.timeout(CONNECT_TIMEOUT):
            reader, writer = await open_stream(target)
            writer.write(b"x")
            await reader.readexactly(1)
    except BaseException:
        if writer is not None:
            writer.close()
        raise
    return writer


def percentiles(samples: list[float]) -> dict[str, float]:
    if not samples:
        return {}
    s = sorted(samples)

    def pick(q: float) -> float:
        return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]

    return {"p50": pick(0.50), "p90": pick(0.90), "p99": pick(0.99), "max": s[-1], "count": len(s)}


# ---- roles --------------------------------------------------------------------------------------


class EchoProtocol(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)  # type: ignore[attr-defined]

    def eof_received(self) -> bool:
        return False


async def echo_server(addr: str) -> None:
    host, _, port = addr.rpartition(":")
    loop = asyncio.get_running_loop()
    server = await loop.create_server(EchoProtocol, host, int(port), backlog=4096, reuse_address=True)
    print("listening", flush=True)
    async with server:
        await server.serve_forever()


async def latency(target: Target, *, rate: float, conns: int, size: int, duration: float, warmup: float) -> dict:
    """Open-loop fixed rate: each connection sends on its own schedule; RTT from actual send."""
    payload = b"x" * size
    samples: list[float] = []
    errors = 0
    loop = asyncio.get_running_loop()
    start = loop.time() + 0.05
    end_warm = start + warmup
    end = end_warm + duration
    interval = conns / rate

    async def one(index: int) -> None:
        nonlocal errors
        async with asyncio.timeout(CONNECT_TIMEOUT):
            reader, writer = await open_stream(target)
        pending: deque[float] = deque()  # send times of requests not yet answered (-1: warm-up)
        sending_done = False
        drained = asyncio.Event()

        async def receiver() -> None:
            nonlocal errors
            try:
                while True:
                    await reader.readexactly(size)
                    now = time.perf_counter()
                    sent = pending.popleft()
                    if sent >= 0:
                        samples.append((now - sent) * 1e6)
                    if sending_done and not pending:
                        drained.set()
                        return
            except (ConnectionError, asyncio.IncompleteReadError):
                errors += 1
                drained.set()

        recv_task = asyncio.ensure_future(receiver())
        next_at = start + index * interval / conns
        while True:
            next_at += interval
            if next_at >= end:
                break
            delay = next_at - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            pending.append(time.perf_counter() if loop.time() >= end_warm else -1.0)
            writer.write(payload)
        sending_done = True
        if not pending:
            drained.set()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5):
                await drained.wait()
        recv_task.cancel()
        writer.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(conns)))
    return {
        "tool": "loadgen.latency (open-loop fixed rate, uvloop)",
        "rate": rate,
        "connections": conns,
        "size": size,
        "duration": duration,
        "wall": time.perf_counter() - t0,
        "errors": errors,
        "rtt_us": percentiles(samples),
    }


async def connrate(target: Target, *, workers: int, duration: float) -> dict:
    times: list[float] = []
    errors = 0
    loop = asyncio.get_running_loop()
    end = loop.time() + duration

    async def worker() -> None:
        nonlocal errors
        while loop.time() < end:
            t = time.perf_counter()
            try:
                writer = await open_proven(target)
            except (OSError, asyncio.IncompleteReadError, TimeoutError):
                errors += 1
                await asyncio.sleep(0.001)
                continue
            times.append((time.perf_counter() - t) * 1e3)
            writer.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(workers)))
    wall = time.perf_counter() - t0
    return {
        "tool": "loadgen.connrate (connect, 1-byte echo, close; uvloop)",
        "workers": workers,
        "connections": len(times),
        "errors": errors,
        "per_second": len(times) / wall,
        "connect_ms": percentiles(times),
    }


async def hold(target: Target, *, count: int, parallel: int) -> None:
    held: list[asyncio.StreamWriter] = []
    errors = 0
    sem = asyncio.Semaphore(parallel)

    async def one() -> None:
        nonlocal errors
        async with sem:
            try:
                held.append(await open_proven(target))
            except (OSError, asyncio.IncompleteReadError, TimeoutError):
                errors += 1

    await asyncio.gather(*(one() for _ in range(count)))
    print(json.dumps({"ready": len(held), "errors": errors}), flush=True)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.read)  # until the orchestrator closes stdin
    for w in held:
        w.close()


HTTP_BODY = b"hello\n"
HTTP_RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 6\r\n\r\n" + HTTP_BODY
HTTP_CLOSE = HTTP_RESPONSE.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n", 1)


def content_length(head: bytes) -> int:
    """The Content-Length of a message head (0 without one; chunked bodies are not used by the bench)."""
    lower = head.lower()
    at = lower.find(b"\r\ncontent-length:")
    if at < 0:
        if b"\r\ntransfer-encoding:" in lower:
            raise ValueError("chunked message: the bench's HTTP client and app use Content-Length only")
        return 0
    end = lower.find(b"\r\n", at + 2)
    return int(lower[at + 17 : end if end >= 0 else None])


class HttpServerProtocol(asyncio.Protocol):
    """The app: answers each complete request (head + Content-Length body) with HTTP_RESPONSE, in order."""

    def __init__(self) -> None:
        self.buf = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        while True:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                break
            try:
                total = end + 4 + content_length(buf[:end])
            except ValueError:
                self.transport.close()  # type: ignore[attr-defined]
                return
            if len(buf) < total:
                break
            close = b"\r\nconnection: close" in buf[:end].lower()
            self.transport.write(HTTP_CLOSE if close else HTTP_RESPONSE)  # type: ignore[attr-defined]
            buf = buf[total:]
            if close:
                self.transport.close()  # type: ignore[attr-defined]
                return
        self.buf = buf


async def http_server(addr: str) -> None:
    host, _, port = addr.rpartition(":")
    loop = asyncio.get_running_loop()
    server = await loop.create_server(HttpServerProtocol, host, int(port), backlog=4096, reuse_address=True)
    print("listening", flush=True)
    async with server:
        await server.serve_forever()


class HttpClientProtocol(asyncio.Protocol):
    """One keep-alive connection of the client: `exchange` sends a request and resolves to the response's
    status once its head and Content-Length body are in; a closed connection fails the pending exchange."""

    def __init__(self) -> None:
        self.buf = b""
        self.waiter: asyncio.Future[int] | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buf += data
        self._complete()

    def _complete(self) -> None:
        waiter = self.waiter
        if waiter is None or waiter.done():
            return
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            return
        try:
            total = end + 4 + content_length(self.buf[:end])
            status = int(self.buf[9:12])
        except ValueError as e:
            waiter.set_exception(ConnectionError(f"bad response: {e}"))
            return
        if len(self.buf) < total:
            return
        if b"\r\nconnection: close" in self.buf[:end].lower():
            self.closed = True
        self.buf = self.buf[total:]
        waiter.set_result(status)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError("connection closed before the response"))

    def exchange(self, request: bytes) -> asyncio.Future[int]:
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(request)  # type: ignore[attr-defined]
        return self.waiter


async def connected_socket(target: Target) -> socket.socket:
    """A connected non-blocking socket to TARGET's app, the SOCKS5 handshake (if any) done on it, so the
    connection can go on with a lean protocol instead of a stream."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET6 if ":" in target.connect_addr[0] else socket.AF_INET)
    sock.setblocking(False)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        async with asyncio.timeout(CONNECT_TIMEOUT):
            await loop.sock_connect(sock, target.connect_addr)
            if target.socks:
                await loop.sock_sendall(sock, socks5_connect_request(target.host, target.port))
                reply = b""
                while len(reply) < SOCKS_REPLY_LEN:
                    chunk = await loop.sock_recv(sock, SOCKS_REPLY_LEN - len(reply))
                    if not chunk:
                        raise ConnectionError("SOCKS5 proxy closed")
                    reply += chunk
                if reply[:2] != b"\x05\x00" or reply[3] != 0:
                    raise ConnectionError(f"SOCKS5 refused: {reply.hex()}")
    except BaseException:
        sock.close()
        raise
    return sock


async def open_protocol(target: Target, factory: Callable[[], P]) -> P:
    """A connection to the app (through the SOCKS5 proxy of TARGET if any) driven by FACTORY's protocol."""
    sock = await connected_socket(target)
    try:
        _, proto = await asyncio.get_running_loop().create_connection(factory, sock=sock)
    except BaseException:
        sock.close()
        raise
    return proto


async def open_http(target: Target) -> HttpClientProtocol:
    """A keep-alive HTTP/1.1 connection to the app."""
    return await open_protocol(target, HttpClientProtocol)


def http_request(method: str, path: str, host: str) -> bytes:
    length = "Content-Length: 0\r\n" if method in ("POST", "PUT") else ""
    return f"{method} {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: bench\r\n{length}\r\n".encode()


async def http_load(
    target: Target, *, rate: float, conns: int, duration: float, warmup: float, request: bytes
) -> dict:
    """Closed loop (`rate` 0: each connection sends its next request when the last is answered) or open
    loop at `rate` (each connection's requests are due on a schedule; a request held up by the one before it
    counts from when it was due, so a slow response is not hidden by the requests it delays)."""
    samples: list[float] = []
    statuses: dict[str, int] = {}
    errors = 0
    loop = asyncio.get_running_loop()
    start = loop.time() + 0.05
    end_warm = start + warmup
    end = end_warm + duration
    interval = conns / rate if rate > 0 else 0.0

    async def one(index: int) -> None:
        nonlocal errors
        conn = await open_http(target)
        due = start + index * interval / conns
        while True:
            if interval:
                due += interval
                if due >= end:
                    break
                late = loop.time() - due
                if late < 0:  # on time: from when it goes out (libuv's timers have 1 ms resolution)
                    await asyncio.sleep(-late)
                    t0 = time.perf_counter()
                else:  # held up by the previous response on this connection: from when it was due
                    t0 = time.perf_counter() - late
            else:
                if loop.time() >= end:
                    break
                t0 = time.perf_counter()
            measured = loop.time() >= end_warm
            if conn.closed:
                conn = await open_http(target)
            try:
                status = await asyncio.wait_for(conn.exchange(request), CONNECT_TIMEOUT)
            except (ConnectionError, TimeoutError, OSError):
                errors += 1
                conn.transport.abort()  # type: ignore[attr-defined]
                conn = await open_http(target)
                continue
            if measured and loop.time() < end:
                samples.append((time.perf_counter() - t0) * 1e6)
                statuses[str(status)] = statuses.get(str(status), 0) + 1
        conn.transport.close()  # type: ignore[attr-defined]

    t0 = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(conns)))
    tool = "loadgen.http (HTTP/1.1 keep-alive, uvloop; " + ("open loop)" if rate > 0 else "closed loop)")
    return http_load_result(tool, rate, conns, duration, time.perf_counter() - t0, samples, errors, statuses)


def http_load_result(
    tool: str,
    rate: float,
    conns: int,
    duration: float,
    wall: float,
    samples: list[float],
    errors: int,
    statuses: dict[str, int],
) -> dict:
    """The JSON both HTTP load paths (HTTP/1.1 and h2c) report, so the report reads them alike."""
    return {
        "tool": tool,
        "rate": rate,
        "connections": conns,
        "duration": duration,
        "wall": wall,
        "requests": len(samples),
        "per_second": len(samples) / duration,
        "errors": errors,
        "status": statuses,
        "latency_us": percentiles(samples),
    }


async def http_check(target: Target, checks: list[tuple[str, str]], host: str) -> dict:
    """One request per (METHOD PATH) on one keep-alive connection (a new one only if the path closed it:
    `connections` says how many it took)."""
    conn = await open_http(target)
    out = []
    connections = 1
    for method, path in checks:
        if conn.closed:
            conn = await open_http(target)
            connections += 1
        status = await asyncio.wait_for(conn.exchange(http_request(method, path, host)), CONNECT_TIMEOUT)
        out.append({"method": method, "path": path, "status": status})
    conn.transport.close()  # type: ignore[attr-defined]
    return {"checks": out, "connections": connections}


class H2ClientProtocol(asyncio.Protocol):
    """One h2c (HTTP/2 with prior knowledge) connection of the client: `exchange` opens a stream with a GET and
    resolves to its `:status` once the stream ends; many streams may be in flight, as many as the server's
    SETTINGS_MAX_CONCURRENT_STREAMS allows, the others wait in order for a stream to end (the `h2` package, which
    the venv has; imported here only, so the HTTP/1.1 roles work without it)."""

    def __init__(self) -> None:
        import h2.config
        import h2.connection
        import h2.exceptions

        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
        self._refused = h2.exceptions.ProtocolError
        self.waiters: dict[int, asyncio.Future[int]] = {}  # by stream: the streams open (sent, not ended)
        self.queued: deque[tuple[list[tuple[str, str]], asyncio.Future[int]]] = deque()  # waiting for room
        self.status: dict[int, int] = {}
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.conn.initiate_connection()
        self.transport.write(self.conn.data_to_send())  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        import h2.events

        try:
            events = self.conn.receive_data(data)
        except Exception as e:  # a protocol error ends every stream of the connection
            self.connection_lost(e)
            self.transport.close()  # type: ignore[attr-defined]
            return
        for ev in events:
            if isinstance(ev, h2.events.ResponseReceived):
                self.status[ev.stream_id] = int(dict(ev.headers)[b":status"])
            elif isinstance(ev, h2.events.DataReceived):
                self.conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            elif isinstance(ev, (h2.events.StreamEnded, h2.events.StreamReset)):
                waiter = self.waiters.pop(ev.stream_id, None)
                status = self.status.pop(ev.stream_id, 0)
                if waiter is not None and not waiter.done():
                    if isinstance(ev, h2.events.StreamReset) or not status:
                        waiter.set_exception(ConnectionError(f"stream {ev.stream_id} reset"))
                    else:
                        waiter.set_result(status)
            elif isinstance(ev, h2.events.ConnectionTerminated):
                self.closed = True
        self._send_queued()  # streams ended (or the limit rose): room for queued requests
        out = self.conn.data_to_send()
        if out:
            self.transport.write(out)  # type: ignore[attr-defined]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        waiters = [*self.waiters.values(), *(waiter for _, waiter in self.queued)]
        self.waiters.clear()
        self.queued.clear()
        for waiter in waiters:
            if not waiter.done():
                waiter.set_exception(ConnectionError("connection closed before the response"))

    def exchange(self, method: str, path: str, host: str) -> asyncio.Future[int]:
        """The request's stream, now or once the server's stream limit leaves room (a timed-out waiter is
        cancelled: it is then never sent)."""
        headers = [(":method", method), (":scheme", "http"), (":authority", host), (":path", path)]
        waiter: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        if self.closed:
            waiter.set_exception(ConnectionError("connection closed"))
            return waiter
        self.queued.append((headers, waiter))
        if self._send_queued():
            self.transport.write(self.conn.data_to_send())  # type: ignore[attr-defined]
        return waiter

    def _send_queued(self) -> bool:
        """Open streams for queued requests while the server's SETTINGS_MAX_CONCURRENT_STREAMS allows (sending
        past it is h2's TooManyStreamsError); True if any went out. A request h2 refuses fails as an error."""
        conn, queued, sent = self.conn, self.queued, False
        while queued and not self.closed and len(self.waiters) < conn.remote_settings.max_concurrent_streams:
            headers, waiter = queued.popleft()
            if waiter.done():  # timed out while queued
                continue
            try:
                sid = conn.get_next_available_stream_id()
                conn.send_headers(sid, headers, end_stream=True)
            except self._refused as e:  # h2's ProtocolError: a closed connection, exhausted stream ids
                waiter.set_exception(ConnectionError(f"h2 refused the request: {e!r}"))
                continue
            self.waiters[sid] = waiter
            sent = True
        return sent


async def open_h2c(target: Target) -> H2ClientProtocol:
    """An h2c connection (prior knowledge) to the app."""
    return await open_protocol(target, H2ClientProtocol)


async def h2c_load(
    target: Target, *, rate: float, conns: int, duration: float, warmup: float, path: str, host: str
) -> dict:
    """Open loop at `rate` over `conns` h2c connections: each request is a new stream sent when it is due,
    whatever is still in flight (HTTP/2 multiplexes) up to the server's stream limit (then queued: latency counts
    from when it was due, as the HTTP/1.1 open loop counts a request held up by the one before it)."""
    import h2.exceptions

    samples: list[float] = []
    statuses: dict[str, int] = {}
    errors = 0
    loop = asyncio.get_running_loop()
    start = loop.time() + 0.05
    end_warm = start + warmup
    end = end_warm + duration
    interval = conns / rate

    async def one_request(conn: H2ClientProtocol, measured: bool) -> None:
        nonlocal errors
        t0 = time.perf_counter()
        try:
            status = await asyncio.wait_for(conn.exchange("GET", path, host), CONNECT_TIMEOUT)
        except (ConnectionError, TimeoutError, OSError, h2.exceptions.ProtocolError):
            errors += 1
            return
        if measured and loop.time() < end:
            samples.append((time.perf_counter() - t0) * 1e6)
            statuses[str(status)] = statuses.get(str(status), 0) + 1

    async def one(index: int) -> None:
        conn = await open_h2c(target)
        due = start + index * interval / conns
        pending: set[asyncio.Task[None]] = set()
        while True:
            due += interval
            if due >= end:
                break
            delay = due - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            if conn.closed:
                conn = await open_h2c(target)
            task = asyncio.ensure_future(one_request(conn, loop.time() >= end_warm))
            pending.add(task)
            task.add_done_callback(pending.discard)
        if pending:
            await asyncio.wait(pending, timeout=CONNECT_TIMEOUT + 1)
        conn.transport.close()  # type: ignore[attr-defined]

    t0 = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(conns)))
    tool = "loadgen.http --h2c (HTTP/2 prior knowledge, open loop, h2 + uvloop)"
    return http_load_result(tool, rate, conns, duration, time.perf_counter() - t0, samples, errors, statuses)


async def h2c_check(target: Target, checks: list[tuple[str, str]], host: str) -> dict:
    """One stream per (METHOD PATH), in turn, on one h2c connection."""
    conn = await open_h2c(target)
    out = []
    for method, path in checks:
        status = await asyncio.wait_for(conn.exchange(method, path, host), CONNECT_TIMEOUT)
        out.append({"method": method, "path": path, "status": status})
    conn.transport.close()  # type: ignore[attr-defined]
    return {"checks": out, "connections": 1, "protocol": "h2c"}


def forward(listen: str, target: Target) -> None:
    """Fixed-destination forwarder through SOCKS5, relaying with splice(2) (no payload in Python)."""
    host, _, port = listen.rpartition(":")
    lsock = socket.create_server((host, int(port)), backlog=128, reuse_port=False)
    print("listening", flush=True)

    def pump(src: socket.socket, dst: socket.socket) -> None:
        r, w = os.pipe()
        try:
            while True:
                n = os.splice(src.fileno(), w, 1 << 20)
                if n == 0:
                    break
                while n:
                    n -= os.splice(r, dst.fileno(), n)
        except OSError:
            pass
        finally:
            os.close(r)
            os.close(w)
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)

    def serve(client: socket.socket) -> None:
        try:
            up = socket.create_connection(target.connect_addr)
            for s in (client, up):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if target.socks:
                up.sendall(socks5_connect_request(target.host, target.port))
                reply = b""
                while len(reply) < SOCKS_REPLY_LEN:
                    chunk = up.recv(SOCKS_REPLY_LEN - len(reply))
                    if not chunk:
                        raise ConnectionError("SOCKS5 proxy closed")
                    reply += chunk
                if reply[:2] != b"\x05\x00" or reply[3] != 0:
                    raise ConnectionError(f"SOCKS5 refused: {reply.hex()}")
        except OSError:
            client.close()
            return
        t = threading.Thread(target=pump, args=(up, client), daemon=True)
        t.start()
        pump(client, up)
        t.join()
        client.close()
        up.close()

    while True:
        client, _ = lsock.accept()
        threading.Thread(target=serve, args=(client,), daemon=True).start()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="role", required=True)
    p = sub.add_parser("echo-server")
    p.add_argument("listen")
    p = sub.add_parser("latency")
    p.add_argument("target", type=Target.parse)
    p.add_argument("--rate", type=float, default=1000)
    p.add_argument("--conns", type=int, default=4)
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--duration", type=float, default=10)
    p.add_argument("--warmup", type=float, default=1)
    p = sub.add_parser("connrate")
    p.add_argument("target", type=Target.parse)
    p.add_argument("--workers", type=int, default=16)
    p.add_argument("--duration", type=float, default=5)
    p = sub.add_parser("hold")
    p.add_argument("target", type=Target.parse)
    p.add_argument("--count", type=int, default=1000)
    p.add_argument("--parallel", type=int, default=100)
    p = sub.add_parser("http-server")
    p.add_argument("listen")
    p = sub.add_parser("http")
    p.add_argument("target", type=Target.parse)
    p.add_argument("--rate", type=float, default=0, help="requests/s (0: as fast as the connections go)")
    p.add_argument("--conns", type=int, default=16)
    p.add_argument("--duration", type=float, default=5)
    p.add_argument("--warmup", type=float, default=1)
    p.add_argument("--method", default="GET")
    p.add_argument("--path", default="/hello")
    p.add_argument("--host", default="app")
    p.add_argument("--check", default="", help="METHOD PATH,...: one request each, print the statuses")
    p.add_argument("--h2c", action="store_true", help="HTTP/2 with prior knowledge (open loop only: --rate > 0)")
    p = sub.add_parser("forward")
    p.add_argument("listen")
    p.add_argument("target", type=Target.parse)
    args = parser.parse_args()

    if args.role == "forward":
        forward(args.listen, args.target)
        return
    if uvloop is not None:
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    if args.role == "echo-server":
        asyncio.run(echo_server(args.listen))
    elif args.role == "latency":
        out = asyncio.run(
            latency(
                args.target,
                rate=args.rate,
                conns=args.conns,
                size=args.size,
                duration=args.duration,
                warmup=args.warmup,
            )
        )
        print(json.dumps(out), flush=True)
    elif args.role == "http-server":
        asyncio.run(http_server(args.listen))
    elif args.role == "http" and args.h2c and args.check:
        checks = [tuple(c.strip().split(" ", 1)) for c in args.check.split(",")]
        print(json.dumps(asyncio.run(h2c_check(args.target, checks, args.host))), flush=True)  # type: ignore[arg-type]
    elif args.role == "http" and args.h2c:
        if args.rate <= 0:
            parser.error("--h2c measures at a fixed --rate (saturation: h2load)")
        out = asyncio.run(
            h2c_load(
                args.target,
                rate=args.rate,
                conns=args.conns,
                duration=args.duration,
                warmup=args.warmup,
                path=args.path,
                host=args.host,
            )
        )
        print(json.dumps(out), flush=True)
    elif args.role == "http" and args.check:
        checks = [tuple(c.strip().split(" ", 1)) for c in args.check.split(",")]
        print(json.dumps(asyncio.run(http_check(args.target, checks, args.host))), flush=True)  # type: ignore[arg-type]
    elif args.role == "http":
        request = http_request(args.method, args.path, args.host)
        out = asyncio.run(
            http_load(
                args.target,
                rate=args.rate,
                conns=args.conns,
                duration=args.duration,
                warmup=args.warmup,
                request=request,
            )
        )
        print(json.dumps(out), flush=True)
    elif args.role == "connrate":
        print(json.dumps(asyncio.run(connrate(args.target, workers=args.workers, duration=args.duration))), flush=True)
    elif args.role == "hold":
        asyncio.run(hold(args.target, count=args.count, parallel=args.parallel))


if __name__ == "__main__":
    main()
