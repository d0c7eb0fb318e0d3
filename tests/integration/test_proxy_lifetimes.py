"""The proxy's long-running tasks live in one task group: one that fails stops the proxy, loudly."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from ztunnel.config.source import FileConfigSource
from ztunnel.proxy.main import run_proxy
from ztunnel.proxy.settings import ProxySettings


async def test_a_failing_background_task_stops_the_proxy_with_exit_1(
    ca_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Before: the config watcher's task died unnoticed and the proxy ran on, never applying a config again."""
    config = tmp_path / "cluster.yaml"
    config.write_text("apiVersion: v1\nkind: Namespace\nmetadata: {name: quiet}\n")

    async def broken_watch(self: FileConfigSource) -> None:
        raise RuntimeError("the watcher broke")

    monkeypatch.setattr(FileConfigSource, "watch", broken_watch)
    any_port = ("127.0.0.1", 0)
    settings = ProxySettings(
        node="node-z",
        files=[str(config)],
        ca_dir=str(ca_dir),
        metrics_addr=any_port,
        admin_addr=any_port,
        readiness_addr=any_port,
    )
    with caplog.at_level(logging.ERROR, logger="ztunnel.proxy"):
        async with asyncio.timeout(30):
            exit_code = await run_proxy(settings)
    assert exit_code == 1
    failures = [r for r in caplog.records if r.exc_info and "the watcher broke" in str(r.exc_info[1])]
    assert failures and "stopping" in failures[0].getMessage()
