"""The compiled sans-IO layers answer hostile and normal bytes exactly as their Python source does.

mypyc is not CPython: it has answered a bytes slice with start > end with SystemError, and re-raised a handled
cancellation (tests/unit/test_compiled_slices.py). The waypoint's HTTP/1.1 parser and HBONE's DATA-frame
fast path read bytes from peers, so one corpus (every bytes literal of the HTTP/1.1 unit tests and the bypass
tests, read from those files, plus seeded mutations: truncations, byte flips, CR/LF/NUL placements, huge and
negative sizes, random splits) goes through the compiled build in this process and through the source in a
subprocess with ZTUNNEL_COMPILED=0; events, bytes out and exception type names must be the same.
"""

from __future__ import annotations

import ast
import os
import pickle
import random
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from tests.support.h2pair import connect_pair
from ztunnel import compiled
from ztunnel.hbone import dataframes
from ztunnel.waypoint import http1

ROOT = Path(__file__).resolve().parents[2]
EXT_SUFFIX = str(sysconfig.get_config_var("EXT_SUFFIX"))
SOURCES = (ROOT / "tests/unit/test_waypoint_http1.py", ROOT / "tests/integration/test_waypoint_bypass.py")
SEED = 20261204
MUTATIONS = 300
MAX_STEPS = 400  # events per case: a parser that loops is a finding too

Case = tuple[str, tuple[bytes, ...], tuple[bytes, ...]]  # (kind, client or wire chunks, upstream chunks)


# --- the corpus ---


def _literals() -> list[bytes]:
    """Every bytes literal of the HTTP/1.1 tests (heads, bodies, targets, responses), longer than 3 bytes."""
    found: set[bytes] = set()
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, bytes) and len(node.value) > 3:
                found.add(node.value)
    return sorted(found)


def _request(target: bytes, extra: bytes = b"", method: bytes = b"GET") -> bytes:
    return b"%s %s HTTP/1.1\r\nHost: svc\r\n%s\r\n" % (method, target, extra)


OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
SEEDS_REQUEST = (
    _request(b"/ok"),
    _request(b"/admin"),
    _request(b"/up", b"Content-Length: 5\r\n", b"POST") + b"hello",
    _request(b"/up", b"Transfer-Encoding: chunked\r\n", b"POST") + b"5;e=1\r\nhello\r\n0\r\nX-T: t\r\n\r\n",
    _request(b"/ws", b"Connection: Upgrade\r\nUpgrade: websocket\r\n"),
    _request(b"/c", b"Expect: 100-continue\r\nContent-Length: 3\r\n", b"PUT") + b"abc",
    b"GET /x HTTP/1.0\r\nHost: svc\r\nConnection: keep-alive\r\n\r\n",
    _request(b"/a") + _request(b"/b"),
)
SEEDS_RESPONSE = (
    OK,
    b"HTTP/1.1 204 No Content\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    b"HTTP/1.0 200 OK\r\n\r\nuntil eof",
    b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\nframes",
    b"HTTP/1.1 200\r\nConnection: close\r\nContent-Length: 1\r\n\r\nx",
)
# Bytes a hostile peer places: line ends, NUL, separators, sizes that overflow or go negative.
PLACED = (b"\r", b"\n", b"\r\n", b"\r\n\r\n", b"\x00", b" ", b":", b";", b"\t", b"\x7f", b"\xff", b"HTTP/")
LEADS = (b"\r\n", b"\n", b"\r", b"\r\r\n", b"\n\r\n", b"\n\n", b"\r\n\n", b"\r\n\r\n", b"\n\n\r\n", b"\r\n\r\n\r\n")
SIZES = (b"-1", b"0", b"99999999999999999999", b"ffffffffffffffff", b"1" * 40, b"0x10", b"+5", b"-0", b"1e3")


def _mutate(rng: random.Random, data: bytes) -> bytes:
    op = rng.randrange(7)
    if not data:
        return rng.choice(PLACED)
    at = rng.randrange(len(data) + 1)
    if op == 0:  # truncated
        return data[:at]
    if op == 1:  # a byte flipped
        i = min(at, len(data) - 1)
        return data[:i] + bytes([data[i] ^ (1 << rng.randrange(8))]) + data[i + 1 :]
    if op == 2:  # a separator or line end placed
        return data[:at] + rng.choice(PLACED) + data[at:]
    if op == 3:  # a run removed
        return data[:at] + data[at + rng.randrange(1, 8) :]
    if op == 4:  # a size replaced: Content-Length's value, a chunk size, a status code
        for key in (b"Content-Length: ", b"\r\n\r\n", b"HTTP/1.1 "):
            i = data.find(key)
            if i >= 0:
                j = i + len(key)
                k = j
                while k < len(data) and data[k : k + 1] not in (b"\r", b";", b" "):
                    k += 1
                return data[:j] + rng.choice(SIZES) + data[k:]
        return data + rng.choice(SIZES)
    if op == 5:  # leading empty lines (bare or not)
        return rng.choice((b"\r\n", b"\n", b"\r\r\n", b"\n\r\n", b"\r\n\r\n")) + data
    return data[:at] + data[rng.randrange(len(data)) :]  # a run repeated


def _split(rng: random.Random, data: bytes) -> tuple[bytes, ...]:
    """`data` as the pieces a peer's writes could deliver (whole, or cut at up to 3 random points)."""
    if len(data) < 2 or rng.random() < 0.4:
        return (data,) if data else ()
    cuts = sorted({rng.randrange(1, len(data)) for _ in range(rng.randrange(1, 4))})
    return tuple(data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True))


def http1_corpus() -> list[Case]:
    rng = random.Random(SEED)
    literals = _literals()
    responses = [b for b in literals if b.startswith(b"HTTP/")] + list(SEEDS_RESPONSE)
    requests = [b for b in literals if not b.startswith(b"HTTP/")]
    cases: list[Case] = []
    for raw in requests:
        cases.append(("req", (raw,), (OK,)))
        if b" HTTP/1." not in raw:  # a bare target, header block or body: as a request's target or fields
            cases.append(("req", (_request(raw),), (OK,)))
            cases.append(("req", (_request(b"/x", raw if raw.endswith(b"\r\n") else raw + b"\r\n"),), (OK,)))
    for raw in responses:
        cases.append(("req", (_request(b"/ok"),), (raw,)))
        cases.append(("req", (_request(b"/ok", method=b"HEAD"),), (raw,)))
    # Empty lines before a head, bare or not, whole or ending mid-line: where a parser's positions go wrong
    # (compiled, `\r\r\n` before a request and an empty head before a status line raised SystemError).
    for lead in LEADS:
        for request in SEEDS_REQUEST:
            cases.append(("req", (lead + request,), (OK,)))
        for response in SEEDS_RESPONSE:
            cases.append(("req", (_request(b"/ok"),), (lead + response,)))
            cases.append(("req", (_request(b"/ok"),), (lead + response[:12],)))
    for n in range(MUTATIONS):
        # the first half from the seeds above only: the same cases however the tests' literals change
        request = rng.choice(SEEDS_REQUEST if n < MUTATIONS // 2 else SEEDS_REQUEST + tuple(requests))
        response = rng.choice(SEEDS_RESPONSE if n < MUTATIONS // 2 else tuple(responses))
        if rng.random() < 0.5:
            request = _mutate(rng, request)
        else:
            response = _mutate(rng, response)
        if rng.random() < 0.3:
            request = _mutate(rng, request)
        cases.append(("req", _split(rng, request), _split(rng, response)))
    return cases


def hbone_corpus() -> list[Case]:
    """Frames for the server side of two open CONNECT streams (1 and 3), plain DATA and not."""
    rng = random.Random(SEED + 1)
    cases: list[Case] = []
    for _ in range(MUTATIONS):
        wire = b""
        for _ in range(rng.randrange(1, 6)):
            payload = bytes(rng.randrange(256) for _ in range(rng.choice((0, 1, 7, 100, 1000))))
            length = len(payload)
            if rng.random() < 0.2:  # the header lies about the length
                length = rng.choice((0, 1, length + 1, max(0, length - 1), 16384, 16385, 0xFFFFFF))
            kind = rng.choice((0, 0, 0, 0, 1, 3, 8, 0xFF))  # DATA mostly; HEADERS, RST_STREAM, WINDOW_UPDATE
            flags = rng.choice((0, 0, 0, 1, 8, 0xFF))
            sid = rng.choice((1, 1, 3, 3, 0, 5, 0x80000001, 0x7FFFFFFF))
            wire += (length << 8 | kind).to_bytes(4, "big") + bytes([flags]) + sid.to_bytes(4, "big") + payload
        if rng.random() < 0.3:
            wire = wire[: rng.randrange(len(wire) + 1)]
        cases.append(("hbone", _split(rng, wire), (b"reset3",) if rng.random() < 0.2 else ()))
    return cases


# --- driving the layers (the same code in both processes) ---


def _event(ev: object) -> str:
    return repr(ev) if not isinstance(ev, bytes) else f"bytes {ev!r}"


def _drive_http1(client: tuple[bytes, ...], upstream: tuple[bytes, ...]) -> list[str]:
    conn = http1.Http1Connection()
    pending, answer = [*client, b""], [*upstream, b""]
    out: list[str] = []
    responding = False

    def flush() -> None:
        to_client, to_upstream = conn.data_to_client(), conn.data_to_upstream()
        if to_client:
            out.append(f"client {to_client!r}")
        if to_upstream:
            out.append(f"upstream {to_upstream!r}")

    for _ in range(MAX_STEPS):
        if responding:
            ev: object = conn.next_response_event()
            out.append(_event(ev))
            flush()
            if ev is http1.NEED_DATA and answer:
                conn.receive_upstream_data(answer.pop(0))
                continue
            if isinstance(ev, http1.ResponseData | http1.ResponseReceived):
                continue
            responding = False
            if isinstance(ev, http1.TunnelOpened) or ev is http1.NEED_DATA:
                return out
            continue
        ev = conn.next_request_event()
        out.append(_event(ev))
        flush()
        if isinstance(ev, http1.RequestReceived):
            if b"admin" in ev.head.path.lower():
                conn.deny()
            else:
                conn.allow()
                responding = True
            flush()
        elif ev is http1.NEED_DATA:
            if not pending:
                return out
            conn.receive_data(pending.pop(0))
        elif ev is http1.CLOSED:
            return out
        elif ev is http1.PAUSED:
            if not answer:
                return out
            responding = True
    out.append("too many steps")
    return out


class _Sink:
    def __init__(self, sid: int, got: list[str], reset_code: int | None) -> None:
        self.sid = sid
        self.got = got
        self.reset_code = reset_code

    def on_data(self, data: bytes, flow: int) -> None:
        self.got.append(f"sink {self.sid} {data!r} {flow}")


def _drive_hbone(wire: tuple[bytes, ...], options: tuple[bytes, ...]) -> list[str]:
    _, conn = connect_pair()
    out: list[str] = []
    sinks = {1: _Sink(1, out, None), 3: _Sink(3, out, 8 if b"reset3" in options else None)}
    for chunk in wire:
        rest = dataframes.receive(conn, chunk, sinks)
        out.append(f"rest {len(rest)} {'same' if rest is chunk else 'cut'}")
        if rest:
            for ev in conn.receive_data(bytes(rest)):
                out.append(f"h2 {type(ev).__name__} {getattr(ev, 'data', b'')!r}")
    window = conn._inbound_flow_control_window_manager.current_window_size
    out.append(f"windows {window} {[conn.streams[s]._inbound_window_manager.current_window_size for s in (1, 3)]}")
    out.append(f"to send {conn.data_to_send()!r}")
    return out


def outcomes(cases: list[Case]) -> tuple[list[str], list[list[str]]]:
    """The modules' files (to show which build ran) and, per case, what came out or the exception's type name."""
    results: list[list[str]] = []
    for kind, first, second in cases:
        out: list[str] = []
        try:
            out = _drive_http1(first, second) if kind == "req" else _drive_hbone(first, second)
        except Exception as e:  # the finding: which one, not its text (messages of compiled code differ)
            out.append(f"raised {type(e).__name__}")
        results.append(out)
    return [str(http1.__file__), str(dataframes.__file__)], results


def _pure(cases: list[Case]) -> tuple[list[str], list[list[str]]]:
    code = (
        "import pickle, sys; sys.path.insert(0, sys.argv[1]); import test_compiled_differential as t; "
        "sys.stdout.buffer.write(pickle.dumps(t.outcomes(pickle.loads(sys.stdin.buffer.read()))))"
    )
    env = {**os.environ, compiled.ENV_SWITCH: "0", "PYTHONPATH": str(ROOT)}
    run = subprocess.run(
        [sys.executable, "-c", code, str(Path(__file__).parent)],
        input=pickle.dumps(cases),
        env=env,
        cwd=ROOT,
        capture_output=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr.decode(errors="replace")[-3000:]
    files, results = pickle.loads(run.stdout)
    return files, results


def _compiled_here() -> None:
    """Skip unless this process runs a compiled build that still matches the source the subprocess will read."""
    files = [str(http1.__file__), str(dataframes.__file__)]
    if not all(f.endswith(EXT_SUFFIX) for f in files):
        pytest.skip(f"no compiled build in this process ({compiled.status()}): run scripts/build-compiled.sh")
    now = compiled.find_build(compiled.BUILD_ROOT, compiled.SOURCE_ROOT)
    loaded = compiled.install().decision().build
    if now.build is None or loaded is None or now.build.path != loaded.path:
        pytest.skip(f"the source changed since this process loaded its compiled build ({now.reason})")


def _compare(cases: list[Case]) -> None:
    _compiled_here()
    files, native = outcomes(cases)
    pure_files, pure = _pure(cases)
    _compiled_here()  # still the same source: a difference is mypyc's, not an edit's
    assert all(f.endswith(EXT_SUFFIX) for f in files), files
    assert all(f.endswith(".py") for f in pure_files), pure_files
    differ = [i for i, (a, b) in enumerate(zip(native, pure, strict=True)) if a != b]
    report = [
        f"case {i} {cases[i][0]} in={cases[i][1]!r} up={cases[i][2]!r}\n    compiled: {native[i]}\n    source:   "
        f"{pure[i]}"
        for i in differ[:8]
    ]
    assert not differ, f"{len(differ)} of {len(cases)} cases differ compiled vs source:\n" + "\n".join(report)


def test_the_corpus_is_what_it_says() -> None:
    cases = http1_corpus()
    assert len(_literals()) > 50  # the tests' literals were found
    assert len(cases) > MUTATIONS + 100
    assert http1_corpus() == cases  # seeded: both processes build the same corpus (it is also sent as is)
    assert any(any(b"\r\r\n" in p for p in c[1]) for c in cases)
    assert len(hbone_corpus()) == MUTATIONS


def test_http1_compiled_and_source_agree() -> None:
    _compare(http1_corpus())


def test_hbone_receive_compiled_and_source_agree() -> None:
    _compare(hbone_corpus())
