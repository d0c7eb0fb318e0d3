"""The node agent's unix sockets are 0600 from the moment they exist (DESIGN §4.7-4.8): whoever can connect
to the CNI socket enrolls pods, and whoever can connect to the proxy socket receives pods' network namespaces."""

from __future__ import annotations

import asyncio
import os
import socket
import stat
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from tests.support.nodeagent import AgentTask
from ztunnel.net.unix import bind_unix_private
from ztunnel.redirect.iptables import IptablesBackend

CLUSTER = "apiVersion: v1\nkind: Namespace\nmetadata: {name: mesh}\n"


def mode(path: Path) -> int | None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    assert stat.S_ISSOCK(st.st_mode), path
    return stat.S_IMODE(st.st_mode)


class ModeWatch:
    """Every mode the final socket paths were seen with: at each chmod anyone makes, and by a polling thread."""

    def __init__(self, paths: list[Path], monkeypatch: pytest.MonkeyPatch) -> None:
        self.paths = paths
        self.seen: set[tuple[str, int]] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        real_chmod: Callable[..., Any] = os.chmod

        def chmod(path: Any, mode_: int, *args: Any, **kw: Any) -> None:
            self._look()  # the moment a bind-then-chmod implementation would still have the umask's mode
            real_chmod(path, mode_, *args, **kw)

        monkeypatch.setattr(os, "chmod", chmod)

    def _look(self) -> None:
        for p in self.paths:
            try:
                m = mode(p)
            except AssertionError:
                continue
            if m is not None:
                self.seen.add((p.name, m))

    def _poll(self) -> None:
        while not self._stop.is_set():
            self._look()

    def __enter__(self) -> ModeWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


@pytest.fixture
def open_umask() -> Any:
    """The most permissive umask: a socket bound under it is 0777 unless the agent sets the mode at bind."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


@pytest.fixture
async def agent_task(tmp_path: Path) -> AsyncIterator[AgentTask]:
    task = AgentTask(tmp_path, run_dir=tmp_path / "run")
    try:
        yield task
    finally:
        await task.stop()


async def test_sockets_are_0600_from_the_start_even_under_umask_0(
    tmp_path: Path, open_umask: None, monkeypatch: pytest.MonkeyPatch, agent_task: AgentTask
) -> None:
    run = tmp_path / "run"
    run.mkdir()
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)  # a socket file left by a crashed agent
    stale.bind(str(run / "cni.sock"))
    stale.close()
    os.chmod(run / "cni.sock", 0o644)
    paths = [run / "cni.sock", run / "proxy.sock"]
    with ModeWatch(paths, monkeypatch) as watch:
        agent = await agent_task.start(CLUSTER, IptablesBackend("nft"))  # the backend is never used: no pods
    assert mode(paths[0]) == 0o600 and mode(paths[1]) == 0o600
    assert {m for _, m in watch.seen} <= {0o644, 0o600}  # the stale file's mode, then ours
    assert not {("cni.sock", 0o777), ("proxy.sock", 0o777)} & watch.seen  # never open to all, not for an instant
    assert sorted(p.name for p in run.iterdir()) == ["cni.sock", "proxy.sock"]  # no staging dirs left
    # and they serve: the CNI socket answers HTTP, the proxy socket accepts SOCK_SEQPACKET
    reader, writer = await asyncio.open_unix_connection(str(paths[0]))
    writer.write(b"GET /v1/status HTTP/1.1\r\nHost: agent\r\n\r\n")
    assert (await reader.readline()).startswith(b"HTTP/1.1 200")
    writer.close()
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
        s.connect(str(paths[1]))
    assert agent.ready.is_set()


def test_bind_unix_private_replaces_a_stale_socket_and_cleans_up_on_failure(tmp_path: Path, open_umask: None) -> None:
    path = tmp_path / "a.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as old:
        old.bind(str(path))
    assert mode(path) == 0o777  # the umask's mode, as bind alone gives
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        bind_unix_private(s, path)
        s.listen(1)
        assert mode(path) == 0o600
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
            c.connect(str(path))  # the renamed socket is the one that listens
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s, pytest.raises(OSError, match="longer than 107"):
        bind_unix_private(s, tmp_path / ("x" * 120))  # too long for sun_path: no one could connect to it
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind("")  # autobind: already bound, so the next bind fails after the staging dir exists
        with pytest.raises(OSError):
            bind_unix_private(s, tmp_path / "b.sock")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.sock"]  # staging dirs removed either way
