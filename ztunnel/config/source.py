"""Config sources: watch YAML files and publish a new `ClusterConfig` on each good change.

A bad edit is reported and the last good snapshot stays in force (DESIGN §7).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

from ztunnel.config.loader import ConfigError, load_files
from ztunnel.config.model import DEFAULT_ROOT_NAMESPACE, DEFAULT_TRUST_DOMAIN, ClusterConfig

log = logging.getLogger("ztunnel.config")

Listener = Callable[[ClusterConfig], Awaitable[None] | None]


class FileConfigSource:
    """Loads files given with -f and polls them for changes (mtime, size, inode)."""

    def __init__(
        self,
        paths: Sequence[str | Path],
        *,
        trust_domain: str = DEFAULT_TRUST_DOMAIN,
        root_namespace: str = DEFAULT_ROOT_NAMESPACE,
        poll_interval: float = 0.25,
    ) -> None:
        self.paths = [Path(p) for p in paths]
        self.trust_domain = trust_domain
        self.root_namespace = root_namespace
        self.poll_interval = poll_interval
        self.current: ClusterConfig | None = None
        self.last_error: ConfigError | None = None
        self.loaded_at: float = 0.0
        self._fingerprint: tuple[tuple[str, int, int, int], ...] = ()
        self._listeners: list[Listener] = []

    def subscribe(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def _stat(self) -> tuple[tuple[str, int, int, int], ...]:
        out = []
        for p in self.paths:
            files = sorted(p.iterdir()) if p.is_dir() else [p]
            for f in files:
                try:
                    st = os.stat(f)
                    out.append((str(f), st.st_mtime_ns, st.st_size, st.st_ino))
                except OSError:
                    out.append((str(f), -1, -1, -1))
        return tuple(out)

    def load(self) -> ClusterConfig:
        """Load now; raises ConfigError if the files are bad and nothing good was loaded yet."""
        self._fingerprint = self._stat()
        generation = self.current.generation + 1 if self.current else 1
        cfg = load_files(
            self.paths, trust_domain=self.trust_domain, root_namespace=self.root_namespace, generation=generation
        )
        self.current = cfg
        self.last_error = None
        for warning in cfg.warnings:
            log.warning("config: %s", warning)
        self.loaded_at = time.time()
        return cfg

    async def _publish(self, cfg: ClusterConfig) -> None:
        for listener in self._listeners:
            result = listener(cfg)
            if result is not None:
                await result

    async def reload_if_changed(self) -> bool:
        fp = self._stat()
        if fp == self._fingerprint:
            return False
        try:
            cfg = self.load()
        except ConfigError as e:
            self._fingerprint = fp
            if str(e) != str(self.last_error):
                log.error("config rejected, keeping the last good config: %s", e)
            self.last_error = e
            return False
        log.info("config loaded: generation %d", cfg.generation)
        await self._publish(cfg)
        return True

    async def watch(self) -> None:
        """Poll until cancelled."""
        while True:
            await asyncio.sleep(self.poll_interval)
            await self.reload_if_changed()
