"""The lab's state directory: what exists (nodes, pods, processes) so later commands can find and remove it.

Every command that changes the lab takes the directory's lock only while it reads, changes and writes the
state file, so a slow `apply` (a CNI ADD being retried) does not block `restart` or `status`.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ztunnel.config.loader import read_objects
from ztunnel.config.model import KubeObject
from ztunnel.lab.model import LabError, NodeRecord, PodRecord, ProcessRecord, render_live

DEFAULT_ROOT = Path("/run/ztunnel-lab")
STATE_FILE = "state.json"
LIVE_CONFIG = "cluster.yaml"


def default_dir(name: str) -> Path:
    return DEFAULT_ROOT / name


@dataclass
class LabState:
    name: str
    dir: str
    redirect: str = "iptables"
    mesh: str = "auto"
    components: dict[str, bool] = field(default_factory=dict)  # which parts of the mesh this lab runs
    ca_address: str = ""
    nodes: dict[str, NodeRecord] = field(default_factory=dict)
    pods: dict[str, PodRecord] = field(default_factory=dict)  # by NAMESPACE/NAME
    processes: dict[str, ProcessRecord] = field(default_factory=dict)  # by key
    ready: bool = False

    @property
    def path(self) -> Path:
        return Path(self.dir)

    @property
    def live_config(self) -> Path:
        return self.path / LIVE_CONFIG

    @property
    def logs(self) -> Path:
        return self.path / "logs"

    def node_dir(self, node: str) -> Path:
        return self.path / "nodes" / node

    def pod_dir(self, namespace: str, name: str) -> Path:
        return self.path / "pods" / f"{namespace}_{name}"

    def agent_sockets(self, node: str) -> tuple[Path, Path]:
        """The node agent's sockets: (CNI plugin -> agent, agent -> in-pod proxy)."""
        d = self.node_dir(node)
        return d / "cni.sock", d / "inpod.sock"

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "dir": self.dir,
            "redirect": self.redirect,
            "mesh": self.mesh,
            "components": self.components,
            "ca_address": self.ca_address,
            "ready": self.ready,
            "nodes": {k: asdict(v) for k, v in self.nodes.items()},
            "pods": {k: asdict(v) for k, v in self.pods.items()},
            "processes": {k: asdict(v) for k, v in self.processes.items()},
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LabState:
        return cls(
            name=data["name"],
            dir=data["dir"],
            redirect=data.get("redirect", "iptables"),
            mesh=data.get("mesh", "auto"),
            components=dict(data.get("components", {})),
            ca_address=data.get("ca_address", ""),
            ready=bool(data.get("ready", False)),
            nodes={k: NodeRecord(**v) for k, v in data.get("nodes", {}).items()},
            pods={k: PodRecord.from_json(v) for k, v in data.get("pods", {}).items()},
            processes={k: ProcessRecord(**v) for k, v in data.get("processes", {}).items()},
        )


def write_atomic(path: Path, text: str, mode: int = 0o644) -> None:
    """Write a file so readers see the old or the new content, never a half (temp file + rename)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def live_objects(state: LabState) -> list[KubeObject]:
    """The objects of the live config (the file the CA, agents and proxies watch)."""
    if not state.live_config.exists():
        return []
    return read_objects([state.live_config])


def write_live(state: LabState, objects: Sequence[KubeObject] | None = None) -> None:
    """Rewrite the live config atomically (the CA, agents and proxies watch it). Call with the lock held."""
    if objects is None:
        objects = live_objects(state)
    write_atomic(state.live_config, render_live(objects, state.nodes, state.pods))


def load(dir: Path) -> LabState:
    try:
        data = json.loads((dir / STATE_FILE).read_text())
    except FileNotFoundError:
        raise LabError(f"no lab at {dir}: start one with `ztunnel lab up -f CLUSTER.yaml`") from None
    except ValueError as e:
        raise LabError(f"{dir / STATE_FILE} is damaged ({e}); remove the lab with `ztunnel lab down`") from e
    return LabState.from_json(data)


def save(state: LabState) -> None:
    write_atomic(state.path / STATE_FILE, json.dumps(state.to_json(), indent=1) + "\n")


@contextlib.contextmanager
def locked(dir: Path) -> Iterator[None]:
    if not dir.is_dir():  # never create a lab dir as a side effect of reading one
        raise LabError(f"no lab at {dir}: start one with `ztunnel lab up -f CLUSTER.yaml`")
    with open(dir / "lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@contextlib.contextmanager
def updating(dir: Path) -> Iterator[LabState]:
    """Lock, load, let the body change the state, save."""
    with locked(dir):
        state = load(dir)
        yield state
        save(state)
