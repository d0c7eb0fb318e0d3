"""Config sources: watch YAML files and publish a new `ClusterConfig` on each good change.

A bad edit is reported (logged with file and reason, counted, kept in `status()`) and the last good
snapshot stays in force (DESIGN §7); nothing a file holds stops the watcher. Reloads are read in a thread,
so a large file never stops the event loop (and the traffic it serves). With `node` set, a new snapshot
that drops every workload of that node is held for `settle` seconds first: a non-atomic write
(`cat > file`) seen half-way must not tear every pod of the node down.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from ztunnel.config.loader import ConfigError, config_files, read_config
from ztunnel.config.model import DEFAULT_ROOT_NAMESPACE, DEFAULT_TRUST_DOMAIN, ClusterConfig

log = logging.getLogger("ztunnel.config")

Listener = Callable[[ClusterConfig], Awaitable[None] | None]
RejectListener = Callable[[ConfigError], None]
Fingerprint = tuple[tuple[str, int, int, int], ...]

DEFAULT_SETTLE_S = 3.0
# A config that keeps changing while it drops every workload of the node is applied after this many settle
# times at the most: a busy cluster's file rewritten every few seconds must not hold a node's removal forever.
MAX_HOLD_SETTLES = 10


@dataclass(frozen=True)
class _Held:
    """A snapshot that would remove every workload of the node, waiting for the file to settle."""

    fingerprint: Fingerprint
    until: float  # monotonic
    workloads_before: int
    since: float  # monotonic: when the first snapshot dropping the node's workloads was seen


class FileConfigSource:
    """Loads files given with -f and polls them for changes (mtime, size, inode)."""

    def __init__(
        self,
        paths: Sequence[str | Path],
        *,
        trust_domain: str = DEFAULT_TRUST_DOMAIN,
        root_namespace: str = DEFAULT_ROOT_NAMESPACE,
        poll_interval: float = 0.25,
        node: str | None = None,
        settle: float = DEFAULT_SETTLE_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.paths = [Path(p) for p in paths]
        self.trust_domain = trust_domain
        self.root_namespace = root_namespace
        self.poll_interval = poll_interval
        self.node = node  # the node whose workloads a suspicious snapshot would remove; None: no hold
        self.settle = settle
        self.current: ClusterConfig | None = None
        self.last_error: ConfigError | None = None
        self.last_error_at: float = 0.0
        self.rejected = 0  # reloads refused since start
        self.loaded_at: float = 0.0
        self._clock = clock
        self._fingerprint: Fingerprint = ()
        self._held: _Held | None = None
        self._listeners: list[Listener] = []
        self._reject_listeners: list[RejectListener] = []
        self._lock = asyncio.Lock()  # one reload at a time (the watcher and e.g. a CNI ADD may both ask)

    def subscribe(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def on_rejected(self, listener: RejectListener) -> None:
        """Call `listener` with each refused reload (to count it in a metric)."""
        self._reject_listeners.append(listener)

    def _stat(self) -> Fingerprint:
        out = []
        try:
            files = config_files(self.paths)
        except ConfigError:
            files = list(self.paths)
        for f in files:
            try:
                st = os.stat(f)
                out.append((str(f), st.st_mtime_ns, st.st_size, st.st_ino))
            except OSError:
                out.append((str(f), -1, -1, -1))
        return tuple(out)

    def _read(self) -> ClusterConfig:
        generation = self.current.generation + 1 if self.current else 1
        return read_config(
            self.paths, trust_domain=self.trust_domain, root_namespace=self.root_namespace, generation=generation
        )

    def _accept(self, cfg: ClusterConfig) -> None:
        self.current = cfg
        self.last_error = None
        self._held = None
        for warning in cfg.warnings:
            log.warning("config: %s", warning)
        self.loaded_at = time.time()

    def load(self) -> ClusterConfig:
        """Load now, blocking (start-up); raises ConfigError if the files are bad."""
        self._fingerprint = self._stat()
        cfg = self._read()
        self._accept(cfg)
        return cfg

    def status(self) -> dict[str, Any]:
        """For /config_dump: what is in force and what the last reload did."""
        err, held = self.last_error, self._held
        return {
            "files": [str(p) for p in self.paths],
            "generation": self.current.generation if self.current else 0,
            "loaded_at": self.loaded_at,
            "rejected_total": self.rejected,
            "last_rejection": (
                {"file": err.file, "reason": str(err), "at": self.last_error_at} if err is not None else None
            ),
            "held": (
                {"reason": f"removes every workload of node {self.node}", "workloads_before": held.workloads_before}
                if held is not None
                else None
            ),
        }

    async def _publish(self, cfg: ClusterConfig) -> None:
        for listener in self._listeners:
            result = listener(cfg)
            if result is not None:
                await result

    def _reject(self, e: ConfigError) -> None:
        self.rejected += 1
        self.last_error = e
        self.last_error_at = time.time()
        self._held = None
        kept = self.current.generation if self.current else 0
        log.error(
            "config rejected, keeping the last good config (generation %d): %s",
            kept,
            e,
            extra={"file": e.file, "reason": e.reason, "generation": kept},
        )
        for listener in self._reject_listeners:
            listener(e)

    def _node_workloads(self, cfg: ClusterConfig) -> int:
        assert self.node is not None
        return sum(1 for w in cfg.workloads if w.node == self.node)

    def _suspicious(self, cfg: ClusterConfig) -> int:
        """How many workloads of the node the current snapshot has, if `cfg` drops them all (else 0)."""
        if self.node is None or self.current is None or self.settle <= 0:
            return 0
        before = self._node_workloads(self.current)
        return before if before and not self._node_workloads(cfg) else 0

    async def reload_if_changed(self) -> bool:
        """Read the files again if they changed (or a held snapshot's settle time is over); True if a new
        snapshot was published."""
        async with self._lock:
            fp = self._stat()
            held = self._held
            settled = held is not None and self._clock() >= held.until
            if fp == self._fingerprint and not settled:
                return False
            self._fingerprint = fp
            started = time.monotonic()
            try:
                cfg = await asyncio.to_thread(self._read)
            except ConfigError as e:
                self._reject(e)
                return False
            except Exception as e:  # read_config raises only ConfigError; a bug must still not stop the watcher
                log.exception("config reload failed")
                self._reject(ConfigError(f"cannot be loaded ({type(e).__name__}: {e})", source=_names(self.paths)))
                return False
            before = self._suspicious(cfg)
            if before:
                now = self._clock()
                since = held.since if held is not None else now
                latest = since + MAX_HOLD_SETTLES * self.settle  # however often the files change meanwhile
                if held is None or (held.fingerprint != fp and now < latest):
                    self._held = _Held(fp, min(now + self.settle, latest), before, since)
                    log.warning(
                        "config: the new config removes every workload of node %s (%d now); holding it for %gs in "
                        "case the file is still being written. Write config files atomically (to a temporary file, "
                        "then rename it over the old one)",
                        self.node,
                        before,
                        self.settle,
                        extra={"node": self.node, "workloads": before, "settle_s": self.settle},
                    )
                    return False
                log.warning(
                    "config: applying a config that removes every workload of node %s: unchanged for %gs",
                    self.node,
                    self.settle,
                    extra={"node": self.node, "workloads": before},
                )
            elif held is not None:
                log.info("config: the held config was replaced before it was applied", extra={"node": self.node})
            self._accept(cfg)
            log.info(
                "config loaded: generation %d in %.1fs",
                cfg.generation,
                time.monotonic() - started,
                extra={"workloads": len(cfg.workloads)},
            )
            await self._publish(cfg)
            return True

    async def watch(self) -> None:
        """Poll until cancelled."""
        while True:
            await asyncio.sleep(self.poll_interval)
            await self.reload_if_changed()


def _names(paths: Sequence[Path]) -> str:
    return ", ".join(str(p) for p in paths)


class ConfigSource(Protocol):
    """What a component needs of a config source: the file source above, or the Kubernetes API's
    (`ztunnel.config.kube.KubeConfigSource`)."""

    current: ClusterConfig | None
    trust_domain: str

    def load(self) -> ClusterConfig: ...

    def subscribe(self, listener: Listener) -> None: ...

    def on_rejected(self, listener: RejectListener) -> None: ...

    def status(self) -> dict[str, Any]: ...

    async def watch(self) -> None: ...

    async def reload_if_changed(self) -> bool: ...
