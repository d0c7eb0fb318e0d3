"""List+watch of one resource into a local store, with the semantics a production controller needs.

- The first list (paged, `limit`/`continue`) fills the store; `synced` is set only then, so nothing decides on
  a half-listed cache. A relist replaces the store: objects deleted while no watch was open disappear.
- The watch resumes from the last resourceVersion seen (an event's, or a bookmark's: `allowWatchBookmarks`), so
  a cut stream or a server-side timeout (`timeoutSeconds`, renewed on every new watch) loses nothing.
- `410 Gone` (as the answer or as an ERROR event: the version was compacted away) -> relist and replace.
- Any other failure -> retry after an exponential backoff with full jitter, reset once a watch delivers.
- A resource the cluster does not serve (404: an Istio CRD not installed) counts as listed and empty, and is
  asked for again every `ABSENT_RECHECK_S`; a list of alternatives (security.istio.io v1, then v1beta1) uses
  the first version served.
- Each object is reduced to the fields the model reads (`wire.strip_object`); an event over `MAX_EVENT_BYTES`
  or one that is not JSON is refused and reported, never kept, and the watch goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ztunnel.config.kube.client import KubeApiError, KubeClient, api_path
from ztunnel.config.kube.wire import KubeWireError, Oversized, decode_event, status_code, status_text, strip_object

log = logging.getLogger("ztunnel.config.kube")

LIST_PAGE = 500
WATCH_TIMEOUT_S = (240, 360)  # timeoutSeconds of each watch: random in this range, so watches do not renew together
IDLE_GRACE_S = 30.0  # no byte for timeoutSeconds + this -> the connection is dead, watch again
BACKOFF_INITIAL_S = 0.2
BACKOFF_MAX_S = 30.0
ABSENT_RECHECK_S = 60.0
REQUEST_TIMEOUT_S = 60.0  # one list page
# Objects one resource may hold (a list's pages together, or the store as watch events fill it; each page and
# event is bounded in bytes): far above any cluster's objects of one kind (Kubernetes' scale limits: 150,000
# pods), so an API that never stops paging or adding cannot fill the memory.
MAX_LIST_OBJECTS = 1_000_000
_NAMESPACE = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")  # a DNS label, as the API validates it
_NOT_IN_A_NAME = re.compile(r"[/%\x00-\x20\x7f]")  # what the API refuses in any object's name (a path segment)


@dataclass(frozen=True)
class Resource:
    """One kind the source lists and watches."""

    kind: str
    plural: str
    versions: tuple[str, ...]  # apiVersions to try in order: "v1", "security.istio.io/v1", ...
    namespaced: bool = True
    optional: bool = False  # a CRD that may not be installed: 404 means "none of them"

    def path(self, api_version: str, namespace: str | None = None) -> str:
        prefix = f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"
        ns = f"/namespaces/{namespace}" if namespace and self.namespaced else ""
        return f"{prefix}{ns}/{self.plural}"


@dataclass
class Stats:
    """What a reflector did, for status() and the tests."""

    lists: int = 0
    watches: int = 0
    events: int = 0
    bookmarks: int = 0
    gone: int = 0  # 410s that forced a relist
    errors: int = 0
    refused: int = 0  # events refused: over the size bound, not JSON, not an event
    last_error: str = ""


@dataclass
class Reflector:
    client: KubeClient
    resource: Resource
    on_change: Callable[[], None]
    namespace: str | None = None
    field_selector: str | None = None
    rng: random.Random = field(default_factory=random.Random)
    store: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    resource_version: str = ""
    api_version: str = ""  # the version in use (of resource.versions); "" while none is served
    synced: asyncio.Event = field(default_factory=asyncio.Event)
    stats: Stats = field(default_factory=Stats)
    watch_timeout: tuple[int, int] = WATCH_TIMEOUT_S

    @property
    def name(self) -> str:
        return self.resource.plural + (f" in {self.namespace}" if self.namespace else "")

    def _params(self, **extra: str | int | bool) -> dict[str, str | int | bool]:
        params: dict[str, str | int | bool] = {}
        if self.field_selector:
            params["fieldSelector"] = self.field_selector
        params.update(extra)
        return params

    def _out_of_scope(self, obj: dict[str, Any]) -> str | None:
        """Why an object the API sent is not one this request asked for, or cannot exist; None if it is fine.

        The API only sends what was asked for; anything else is a broken or hostile server (or a man in the middle)
        and is refused: another kind on this watch, an object outside the namespace or the field selector (a
        node agent must never see, hence never enroll, a pod of another node), a name with path characters."""
        kind = obj.get("kind")
        if kind is not None and kind != self.resource.kind:
            return f"a {str(kind)[:40]!r} object on a watch of {self.resource.kind}"
        meta = obj.get("metadata") or {}
        name, ns = meta.get("name"), meta.get("namespace")
        if not isinstance(name, str) or not name:
            return "object without metadata.name"
        if name in (".", "..") or _NOT_IN_A_NAME.search(name) or len(name) > 253:
            return f"metadata.name {name[:80]!r} is not a name the API allows"
        if self.resource.namespaced and (not isinstance(ns, str) or not _NAMESPACE.fullmatch(ns)):
            return f"{name}: metadata.namespace {str(ns)[:80]!r} is not a namespace name"
        if self.namespace and ns != self.namespace:
            return f"{ns}/{name} is outside namespace {self.namespace}, which the request was for"
        for term in filter(None, (self.field_selector or "").split(",")):
            field_path, _, want = term.partition("=")
            value: Any = obj
            for part in field_path.split("."):
                value = value.get(part) if isinstance(value, dict) else None
            if str(value or "") != want:
                return f"{ns}/{name}: {field_path} is {str(value)[:80]!r}, not {want!r} (fieldSelector {term})"
        return None

    def _key(self, obj: dict[str, Any]) -> tuple[str, str]:
        meta = obj.get("metadata") or {}
        return str(meta.get("namespace") or ""), str(meta.get("name") or "")

    async def relist(self) -> None:
        """Every page of a full list, then the store is replaced at once (a half list never shows)."""
        last_absent: KubeApiError | None = None
        for version in self.resource.versions:
            try:
                items, rv = await self._list_pages(version)
            except KubeApiError as e:
                if e.status == 404 and self.resource.optional:
                    last_absent = e
                    continue
                raise
            self.api_version = version
            self.store = {self._key(o): o for o in items}
            self.resource_version = rv
            self.stats.lists += 1
            self.synced.set()
            self.on_change()
            return
        assert last_absent is not None
        if self.store:
            self.store = {}
            self.on_change()
        self.api_version, self.resource_version = "", ""
        self.stats.lists += 1
        self.synced.set()

    async def _list_pages(self, version: str) -> tuple[list[dict[str, Any]], str]:
        items: list[dict[str, Any]] = []
        cont, rv = "", ""
        while True:
            params = self._params(limit=LIST_PAGE)
            if cont:
                params["continue"] = cont
            async with asyncio.timeout(REQUEST_TIMEOUT_S):
                page = await self.client.get(api_path(self.resource.path(version, self.namespace), params))
            meta = page.get("metadata") or {}
            raw = page.get("items")
            if not isinstance(raw, list):
                raise KubeApiError(0, f"list {self.resource.plural}: the answer has no items list")
            for i, item in enumerate(raw):
                if not isinstance(item, dict) or not isinstance(item.get("metadata"), dict):
                    self._refuse(f"items[{i}] is not an object with metadata")
                elif (why := self._out_of_scope(item)) is not None:
                    self._refuse(f"items[{i}]: {why}")
                else:
                    items.append(strip_object(item, version, self.resource.kind))
            rv = str(meta.get("resourceVersion") or "")
            previous, cont = cont, str(meta.get("continue") or "")
            if not cont:
                return items, rv
            if cont == previous or len(items) > MAX_LIST_OBJECTS:
                raise KubeApiError(
                    0,
                    f"list {self.resource.plural}: the API does not stop paging ({len(items)} objects so far, "
                    f"continue token {cont[:40]!r}{' repeated' if cont == previous else ''}); listing again later",
                )

    def _refuse(self, why: str) -> None:
        self.stats.refused += 1
        log.error("kubernetes: %s: event refused: %s", self.name, why, extra={"resource": self.resource.plural})

    def apply(self, line: bytes | Oversized) -> bool:
        """One watch line into the store; False if it was an ERROR event with 410 (the caller relists).
        Raises KubeApiError for another ERROR event."""
        if isinstance(line, Oversized):
            self._refuse(f"larger than the limit ({line.size} bytes seen); the object is not kept")
            return True
        try:
            event = decode_event(line)
        except KubeWireError as e:
            self._refuse(str(e))
            return True
        if event.type == "ERROR":
            code = status_code(event.object)
            if code == 410:
                return False
            raise KubeApiError(code, f"watch {self.name}: {code} {status_text(event.object)}")
        rv = event.resource_version
        if event.type == "BOOKMARK":
            self.stats.bookmarks += 1
        else:
            why = self._out_of_scope(event.object)
            if why is not None:
                self._refuse(f"{event.type} event: {why}")
                return True
            obj = strip_object(event.object, self.api_version, self.resource.kind)
            key = self._key(obj)
            if event.type == "DELETED":
                self.store.pop(key, None)
            elif key not in self.store and len(self.store) >= MAX_LIST_OBJECTS:
                self._refuse(f"{key[0]}/{key[1]}: already {len(self.store)} objects kept, the most a list may hold")
                return True
            else:
                self.store[key] = obj
            self.stats.events += 1
            self.on_change()
        if rv:
            self.resource_version = rv
        return True

    async def watch_once(self) -> bool:
        """One watch request from the current resourceVersion until the server ends it; False on 410."""
        low, high = self.watch_timeout
        timeout = self.rng.randint(low, high)
        params = self._params(
            watch=True, resourceVersion=self.resource_version, allowWatchBookmarks=True, timeoutSeconds=timeout
        )
        self.stats.watches += 1
        try:
            path = api_path(self.resource.path(self.api_version, self.namespace), params)
            stream = self.client.stream_lines(
                path, idle_timeout=timeout + IDLE_GRACE_S, deadline=timeout + 2 * IDLE_GRACE_S
            )
            async with contextlib.aclosing(stream) as lines:
                async for line in lines:
                    if not self.apply(line):
                        return False
        except KubeApiError as e:
            if e.status == 410:
                return False
            raise
        return True

    async def run(self) -> None:
        """List, then watch for ever; retries and relists as the module says. Cancel to stop."""
        attempt = 0
        need_list = not self.synced.is_set()
        while True:
            try:
                if need_list:
                    await self.relist()
                    need_list = False
                if not self.api_version:  # not served: ask again later
                    await asyncio.sleep(ABSENT_RECHECK_S)
                    need_list = True
                    continue
                started = time.monotonic()
                events_before = self.stats.events + self.stats.bookmarks
                if not await self.watch_once():
                    self.stats.gone += 1
                    log.info("kubernetes: %s: resourceVersion too old (410 Gone); listing again", self.name)
                    need_list = True
                    if self.stats.events + self.stats.bookmarks == events_before:  # 410 right after a list: pace
                        attempt += 1
                        await asyncio.sleep(self.backoff(attempt))
                    continue
                if self.stats.events + self.stats.bookmarks > events_before or time.monotonic() - started > 1.0:
                    attempt = 0  # a watch that delivered (or lasted) resets the backoff
                    continue
                # An empty watch that ended at once: pace the next one like an error, or a broken server spins us.
                attempt += 1
                await asyncio.sleep(self.backoff(attempt))
            except (OSError, TimeoutError, KubeApiError) as e:
                if isinstance(e, KubeApiError) and e.status == 404 and self.resource.optional:
                    need_list = True  # the CRD went away: the list finds out and empties the store
                attempt += 1
                delay = self.backoff(attempt)
                self.stats.errors += 1
                self.stats.last_error = str(e)
                log.warning(
                    "kubernetes: %s: %s; retrying in %.1fs",
                    self.name,
                    e,
                    delay,
                    extra={"resource": self.resource.plural, "attempt": attempt},
                )
                await asyncio.sleep(delay)

    def backoff(self, attempt: int) -> float:
        """Exponential with full jitter: many proxies restarted together do not hit the API in step."""
        return self.rng.uniform(0, min(BACKOFF_MAX_S, BACKOFF_INITIAL_S * 2 ** min(attempt, 20)))
