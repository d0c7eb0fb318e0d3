"""The node agent's mark on the pods it enrolled, as Istio's CNI agent does: the annotation
`ambient.istio.io/redirection: enabled`, so `kubectl get pod -o yaml` shows which pods are redirected.

Level-triggered: the annotator compares what the agent has enrolled with the annotations the source's pod
cache holds (the agent lists its own node's pods only), and PATCHes the difference (a JSON merge patch; `null`
removes the annotation of a pod no longer enrolled). A PATCH not yet seen back through the watch is not sent
again before `RESEND_S`; failures are retried with backoff and never stop the agent.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable, Set

from ztunnel.config.kube.client import KubeApiError, KubeClient, quote_name
from ztunnel.config.kube.reflector import BACKOFF_INITIAL_S, BACKOFF_MAX_S, Reflector

log = logging.getLogger("ztunnel.config.kube")

REDIRECTION_ANNOTATION = "ambient.istio.io/redirection"
ENABLED = "enabled"
INTERVAL_S = 0.25
RESEND_S = 10.0
PATCH_TIMEOUT_S = 10.0

PodKey = tuple[str, str]  # (namespace, name)


class PodAnnotator:
    """Keeps `ambient.istio.io/redirection` equal to "enabled" on exactly the pods `enrolled()` returns."""

    def __init__(
        self,
        client: KubeClient,
        pods: Reflector,
        enrolled: Callable[[], Set[PodKey]],
        *,
        interval: float = INTERVAL_S,
        rng: random.Random | None = None,
    ) -> None:
        self.client = client
        self.pods = pods
        self.enrolled = enrolled
        self.interval = interval
        self.rng = rng or random.Random()
        self.patched = 0
        self.failed = 0
        self._sent: dict[PodKey, tuple[bool, float]] = {}  # what was last PATCHed and when (monotonic)

    def _current(self, key: PodKey) -> bool | None:
        """Whether the cached pod carries the annotation; None if the pod is not in the cache."""
        obj = self.pods.store.get(key)
        if obj is None:
            return None
        annotations = (obj.get("metadata") or {}).get("annotations") or {}
        return annotations.get(REDIRECTION_ANNOTATION) == ENABLED

    def due(self, now: float) -> list[tuple[PodKey, bool]]:
        """The PATCHes to send now: (pod, annotate?)."""
        want = self.enrolled()
        out = []
        for key in set(want) | set(self.pods.store):
            has = self._current(key)
            if has is None:
                continue  # not (yet) in the cache: nothing to patch
            should = key in want
            if has == should:
                self._sent.pop(key, None)
                continue
            sent = self._sent.get(key)
            if sent is not None and sent[0] == should and now - sent[1] < RESEND_S:
                continue  # sent, not seen back yet
            out.append((key, should))
        return out

    async def patch(self, key: PodKey, enable: bool) -> None:
        namespace, name = key
        path = f"/api/v1/namespaces/{quote_name(namespace)}/pods/{quote_name(name)}"
        body = {"metadata": {"annotations": {REDIRECTION_ANNOTATION: ENABLED if enable else None}}}
        async with asyncio.timeout(PATCH_TIMEOUT_S):
            await self.client.patch(path, body)

    async def run(self) -> None:
        """Reconcile until cancelled."""
        attempt = 0
        while True:
            await asyncio.sleep(self.interval)
            if not self.pods.synced.is_set():
                continue
            for key, enable in self.due(time.monotonic()):
                try:
                    await self.patch(key, enable)
                except (OSError, TimeoutError, KubeApiError) as e:
                    self.failed += 1
                    attempt += 1
                    delay = self.rng.uniform(0, min(BACKOFF_MAX_S, BACKOFF_INITIAL_S * 2 ** min(attempt, 20)))
                    if isinstance(e, KubeApiError) and e.status == 404:
                        delay = 0.0  # the pod is gone; its DELETED event is on its way
                    log.warning(
                        "kubernetes: cannot %s annotation %s on pod %s/%s: %s; retrying",
                        "set" if enable else "remove",
                        REDIRECTION_ANNOTATION,
                        *key,
                        e,
                        extra={"pod": f"{key[0]}/{key[1]}"},
                    )
                    await asyncio.sleep(delay)
                    break
                attempt = 0
                self.patched += 1
                self._sent[key] = (enable, time.monotonic())


def pod_annotator(source: object, enrolled: Callable[[], Set[PodKey]]) -> PodAnnotator | None:
    """The annotator for a node agent whose config comes from the API (None for the file source)."""
    from ztunnel.config.kube.source import KubeConfigSource

    if not isinstance(source, KubeConfigSource):
        return None
    pods = next(r for r in source.reflectors if r.resource.kind == "Pod")
    return PodAnnotator(source.client, pods, enrolled)
