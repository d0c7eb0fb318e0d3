"""The config watcher never fails open and never blocks: a bad file is rejected (logged with file and
reason, counted) with the last good snapshot kept and the watcher alive; a snapshot that drops every
workload of the node waits for the file to settle; a reload is read off the event loop."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from pathlib import Path

import pytest
from test_config_model import CLUSTER

from tests.support.clock import FakeClock
from tests.support.eventually import eventually_async
from ztunnel.config import ConfigError
from ztunnel.config import source as source_module
from ztunnel.config.source import FileConfigSource

DENY = (
    "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n"
    "metadata: {name: deny-web, namespace: shop}\n"
    "spec: {action: DENY, selector: {matchLabels: {app: web}}, rules: [{}]}\n"
)
# Node a's pods gone (web-1 and the host-network pod), node b's kept.
WITHOUT_NODE_A = CLUSTER.replace("nodeName: a", "nodeName: c")


@pytest.fixture
def cluster_file(tmp_path: Path) -> Path:
    f = tmp_path / "cluster.yaml"
    f.write_text(CLUSTER)
    return f


def _write(path: Path, data: str | bytes) -> None:
    """Write and make sure the watcher's (mtime, size, inode) fingerprint sees a change."""
    before = path.stat().st_mtime_ns if path.exists() else 0
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    import os

    os.utime(path, ns=(before + 1_000_000, before + 1_000_000))


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        (b"\xff\xfe" + "kind: Pod".encode("utf-16-le"), "is UTF-16 text, not UTF-8"),
        (b"name: caf\xe9\n", "is not UTF-8 text (byte 0xe9"),
        (b"\x7fELF\x02\x01\x01\x00\x00\x00", "a binary file"),
    ],
    ids=["utf16", "latin1", "binary"],
)
async def test_an_undecodable_edit_is_rejected_and_the_next_good_one_applies(
    cluster_file: Path, bad: bytes, reason: str, caplog: pytest.LogCaptureFixture
) -> None:
    source = FileConfigSource([cluster_file])
    published: list[int] = []
    rejections: list[ConfigError] = []
    source.subscribe(lambda cfg: published.append(cfg.generation))
    source.on_rejected(rejections.append)
    first = source.load()

    _write(cluster_file, bad)
    with caplog.at_level(logging.ERROR, logger="ztunnel.config"):
        assert await source.reload_if_changed() is False
    assert source.current is first and source.rejected == 1 and len(rejections) == 1
    assert source.last_error is not None and source.last_error.file == str(cluster_file)
    (record,) = [r for r in caplog.records if r.name == "ztunnel.config"]
    assert "config rejected, keeping the last good config (generation 1)" in record.getMessage()
    assert record.file == str(cluster_file) and reason in record.reason  # type: ignore[attr-defined]
    status = source.status()
    assert status["rejected_total"] == 1 and status["last_rejection"]["file"] == str(cluster_file)

    _write(cluster_file, CLUSTER + DENY)
    assert await source.reload_if_changed() is True
    assert published == [2] and source.last_error is None
    assert source.current is not None
    assert [o.ref for o in source.current.policy_objects] == [
        "AuthorizationPolicy shop/deny-all",
        "AuthorizationPolicy shop/deny-web",
    ]


async def test_the_watcher_stays_alive_after_a_bad_file(cluster_file: Path) -> None:
    source = FileConfigSource([cluster_file], poll_interval=0.01)
    source.load()
    task = asyncio.create_task(source.watch())
    try:
        _write(cluster_file, b"\x00\x01\x02binary")
        await eventually_async(lambda: source.rejected > 0, 10, 0.01, what="the bad file rejected")
        assert not task.done()
        _write(cluster_file, CLUSTER + DENY)
        await eventually_async(
            lambda: source.current is not None and source.current.generation >= 2, 10, what="the DENY applied"
        )
        assert not task.done()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_a_mistyped_security_kind_is_rejected_by_the_watcher(cluster_file: Path) -> None:
    source = FileConfigSource([cluster_file])
    first = source.load()
    _write(cluster_file, CLUSTER + DENY.replace("kind: AuthorizationPolicy", "kind: AuthorizationPolcy"))
    assert await source.reload_if_changed() is False
    assert source.current is first and "did you mean AuthorizationPolicy?" in str(source.last_error)


# ---- a config that drops every workload of the node waits for the file to settle (item 10) -------------
@pytest.mark.parametrize("partial", ["", "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n", WITHOUT_NODE_A])
async def test_a_config_dropping_every_workload_of_the_node_is_held_until_the_write_completes(
    cluster_file: Path, partial: str, caplog: pytest.LogCaptureFixture
) -> None:
    clock = FakeClock()
    source = FileConfigSource([cluster_file], node="a", settle=3.0, clock=clock)
    published: list[int] = []
    source.subscribe(lambda cfg: published.append(sum(1 for w in cfg.workloads if w.node == "a")))
    first = source.load()

    _write(cluster_file, partial)  # `cat > file` seen half-way
    with caplog.at_level(logging.WARNING, logger="ztunnel.config"):
        assert await source.reload_if_changed() is False
    assert source.current is first and published == []
    assert "removes every workload of node a (2 now); holding it for 3s" in caplog.text
    assert "Write config files atomically" in caplog.text
    assert source.status()["held"] == {"reason": "removes every workload of node a", "workloads_before": 2}
    clock.advance(1)
    assert await source.reload_if_changed() is False  # unchanged, not settled yet

    _write(cluster_file, CLUSTER + DENY)  # the write completes within the settle time
    assert await source.reload_if_changed() is True
    assert published == [2] and source.status()["held"] is None
    clock.advance(10)
    assert await source.reload_if_changed() is False  # nothing more to apply


async def test_a_held_config_is_applied_once_the_file_stays_unchanged(
    cluster_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    clock = FakeClock()
    source = FileConfigSource([cluster_file], node="a", settle=3.0, clock=clock)
    published: list[int] = []
    source.subscribe(lambda cfg: published.append(sum(1 for w in cfg.workloads if w.node == "a")))
    source.load()
    _write(cluster_file, WITHOUT_NODE_A)
    assert await source.reload_if_changed() is False
    clock.advance(2.9)
    assert await source.reload_if_changed() is False and published == []
    clock.advance(0.2)
    with caplog.at_level(logging.WARNING, logger="ztunnel.config"):
        assert await source.reload_if_changed() is True  # re-read: unchanged and still without node a
    assert published == [0]
    assert "applying a config that removes every workload of node a: unchanged for 3s" in caplog.text


async def test_without_a_node_or_with_settle_zero_nothing_is_held(cluster_file: Path) -> None:
    for source in (FileConfigSource([cluster_file]), FileConfigSource([cluster_file], node="a", settle=0)):
        source.load()
        _write(cluster_file, WITHOUT_NODE_A)
        assert await source.reload_if_changed() is True
        _write(cluster_file, CLUSTER)


# ---- a reload is read off the event loop (item 11) -------------------------------------------------------
async def test_the_event_loop_serves_while_a_reload_is_being_read(
    cluster_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A slow read (a stand-in for a 50 MB file) must not stop the loop: an echo round trip on the loop
    completes while the read is still in progress."""
    reading, release = threading.Event(), threading.Event()
    real = source_module.read_config

    def slow_read(*args, **kwargs):  # type: ignore[no-untyped-def]
        reading.set()
        release.wait(10)
        return real(*args, **kwargs)

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(await reader.readline())
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    source = FileConfigSource([cluster_file])
    source.load()  # start-up read (blocking is fine there)
    monkeypatch.setattr(source_module, "read_config", slow_read)
    _write(cluster_file, CLUSTER + DENY)
    reload = asyncio.create_task(source.reload_if_changed())
    try:
        async with asyncio.timeout(10):
            await eventually_async(reading.is_set, 10, 0.01, what="the reload reading the file")
            started = time.monotonic()
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"ping\n")
            assert await reader.readline() == b"ping\n"
            writer.close()
        assert not reload.done(), "the reload finished before the request: it was not read off the loop"
        assert time.monotonic() - started < 10
    finally:
        release.set()
        assert await reload is True
        server.close()
        await server.wait_closed()


async def test_a_config_that_keeps_changing_cannot_hold_the_node_removal_forever(cluster_file: Path) -> None:
    """A busy cluster's file rewritten every 2 s (other objects changing) while node a's pods are gone: the
    removal is applied after at most ten settle times, not held as long as the writes go on."""
    clock = FakeClock()
    source = FileConfigSource([cluster_file], node="a", settle=3.0, clock=clock)
    published: list[int] = []
    source.subscribe(lambda cfg: published.append(sum(1 for w in cfg.workloads if w.node == "a")))
    source.load()
    start, applied_at = clock.now(), None
    for i in range(40):  # 80 s of writes, each complete and each without node a's pods
        _write(cluster_file, WITHOUT_NODE_A + DENY.replace("deny-web", f"deny-web-{i}"))
        if await source.reload_if_changed():
            applied_at = clock.now() - start
            break
        clock.advance(2)
    assert published == [0] and applied_at is not None and applied_at <= 30
