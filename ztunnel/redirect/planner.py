"""The node agent's enrollment decisions, as pure functions of (config, pods, event) -> actions.

The agent executes the actions (iptables in the pod netns, the proxy link, the state file); everything it
decides is here, so the rules of DESIGN §4.4/§4.7 — who is enrolled, what a config change, a new proxy, a
restart or a CNI GC does — are tested without root, netns or sockets.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass

from ztunnel.config.model import ClusterConfig, Workload
from ztunnel.redirect.pods import PodRecord


@dataclass(frozen=True, slots=True)
class Enroll:
    """Install the rules in the pod and hand its netns to the proxy."""

    uid: str
    workload: Workload


@dataclass(frozen=True, slots=True)
class HandOver:
    """The pod is enrolled (rules in place): give its netns to a (re)connected proxy again."""

    uid: str
    workload: Workload


@dataclass(frozen=True, slots=True)
class ReapplyRules:
    """The pod stays enrolled: install its rules again, idempotently (a repeated ADD, an agent restart)."""

    uid: str


@dataclass(frozen=True, slots=True)
class Unenroll:
    """Tell the proxy and remove every rule; the pod stays known (a label may come back)."""

    uid: str


@dataclass(frozen=True, slots=True)
class Forget:
    """Unenroll and drop the record: the pod's sandbox is gone."""

    uid: str


Action = Enroll | HandOver | ReapplyRules | Unenroll | Forget


def enrollable(config: ClusterConfig, pod: PodRecord) -> Workload | None:
    """The pod's workload if it belongs in the mesh: enrolled by label (DESIGN §4.4), never host-network."""
    w = config.workload(pod.namespace, pod.name)
    return w if w is not None and w.enrolled and not w.host_network else None


def is_new_sandbox(old: PodRecord, new: PodRecord) -> bool:
    """A second ADD for the same pod with another netns or container: the old listeners are dead."""
    return old.netns_inode != new.netns_inode or old.container_id != new.container_id


def plan_pod(config: ClusterConfig, pod: PodRecord) -> Action | None:
    """What one known pod needs so that its enrollment matches the config."""
    w = enrollable(config, pod)
    if w is not None and not pod.enrolled:
        return Enroll(pod.uid, w)
    if w is None and pod.enrolled:
        return Unenroll(pod.uid)
    return None


def plan_add(config: ClusterConfig, pod: PodRecord) -> Action | None:
    """CNI ADD: like any known pod, except that an enrolled one gets its rules again (ADD is repeatable)."""
    if pod.enrolled and enrollable(config, pod) is not None:
        return ReapplyRules(pod.uid)
    return plan_pod(config, pod)


def plan_converge(config: ClusterConfig, pods: Iterable[PodRecord], *, proxy_connected: bool) -> list[Action]:
    """A config change: labels may have come or gone. With no proxy, enrolling waits for its snapshot."""
    out = []
    for pod in pods:
        action = plan_pod(config, pod)
        if action is None or (isinstance(action, Enroll) and not proxy_connected):
            continue
        out.append(action)
    return out


def plan_snapshot(config: ClusterConfig, pods: Iterable[PodRecord]) -> list[Action]:
    """A proxy connected: every pod that belongs in the mesh, the enrolled ones handed over again.

    Rules of enrolled pods stay in place throughout (fail closed: never around the proxy)."""
    out: list[Action] = []
    for pod in pods:
        w = enrollable(config, pod)
        if w is not None:
            out.append(HandOver(pod.uid, w) if pod.enrolled else Enroll(pod.uid, w))
    return out


def plan_restart(config: ClusterConfig, pod: PodRecord) -> Action | None:
    """After an agent restart, for a pod whose netns still exists (its record says what was enrolled)."""
    if enrollable(config, pod) is not None:
        return ReapplyRules(pod.uid)
    return Unenroll(pod.uid) if pod.enrolled else None


def plan_gc(pods: Iterable[PodRecord], valid_containers: Collection[str]) -> list[Action]:
    """CNI GC: every pod whose container the runtime no longer has."""
    return [Forget(pod.uid) for pod in pods if pod.container_id not in valid_containers]


def check_enrollment(config: ClusterConfig, namespace: str, name: str, pod: PodRecord | None) -> str:
    """CNI CHECK: "" if the pod's enrollment is what the config says; else what is wrong."""
    w = config.workload(namespace, name)
    should = w is not None and w.enrolled and not w.host_network
    if should and (pod is None or not pod.enrolled):
        return f"pod {namespace}/{name} should be in the mesh and is not"
    return ""
