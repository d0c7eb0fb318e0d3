"""The pods this node's CNI told the agent about, and the state file that keeps them across restarts.

State file (`<state dir>/pods.json`): every pod seen on this node by CNI ADD, keyed by the config uid,
with its netns path and inode, so a restarted agent finds running pods again.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("ztunnel.redirect.agent")


@dataclass
class PodRecord:
    """A pod this node's CNI told us about. `netns_fd` is open only while the pod is enrolled."""

    uid: str
    name: str
    namespace: str
    container_id: str
    netns: str
    netns_inode: int
    ifname: str = "eth0"
    pod_uid: str = ""
    ips: list[str] = field(default_factory=list)
    enrolled: bool = False
    netns_fd: int = -1

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("netns_fd")
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> PodRecord:
        fields = {k: d[k] for k in cls.__dataclass_fields__ if k in d and k != "netns_fd"}
        return cls(**fields)

    @property
    def ref(self) -> str:
        return f"{self.namespace}/{self.name}"


class PodStateFile:
    """Written atomically (temp file + rename) after every change, so a crash leaves the old or the new."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def save(self, pods: Mapping[str, PodRecord]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({uid: p.to_json() for uid, p in sorted(pods.items())}, indent=1))
        os.replace(tmp, self.path)

    def load(self) -> dict[str, PodRecord]:
        try:
            raw = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            log.error("state file %s unreadable (%s); starting from no pods", self.path, e)
            return {}
        out = {}
        for uid, d in raw.items() if isinstance(raw, dict) else ():
            try:
                out[uid] = PodRecord.from_json(d)
            except TypeError as e:
                log.error("state file entry %s ignored: %s", uid, e)
        return out
