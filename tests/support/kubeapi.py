"""A fake Kubernetes API server for tests: real HTTP/1.1 over TLS on loopback, the API conventions the config
source relies on, and knobs to break them on purpose.

What it implements (from the Kubernetes API concepts docs): list with a collection `resourceVersion` and paging
(`limit`/`continue`); watch from a `resourceVersion` as a chunked stream of JSON lines (ADDED, MODIFIED, DELETED,
BOOKMARK with `allowWatchBookmarks`, ERROR `410 Gone` for a version older than the compaction point), ended
after `timeoutSeconds`; field selectors `spec.nodeName` and `metadata.name` (`=`, joined by `,`); namespaced
paths; 404 for a group/version it does not serve; a bearer token check (401); JSON merge-patch of an object.
It runs in a thread with its own event loop, so sync tests, async tests and tests of other processes can all
use it; the mutators (`put`, `delete`, `compact`, `bookmark`, `cut_watches`, `send_raw`) are thread-safe.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import dataclasses
import datetime as dt
import ipaddress
import json
import socket
import ssl
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.support.labapps import waypoint_gateway
from ztunnel.config.kube.client import KubeClient, from_kubeconfig
from ztunnel.config.kube.source import KubeConfigSource
from ztunnel.config.model import ClusterConfig
from ztunnel.config.source import FileConfigSource

# plural -> (kind, namespaced)
KINDS: dict[str, tuple[str, bool]] = {
    "namespaces": ("Namespace", False),
    "pods": ("Pod", True),
    "services": ("Service", True),
    "endpointslices": ("EndpointSlice", True),
    "nodes": ("Node", False),
    "configmaps": ("ConfigMap", True),
    "gateways": ("Gateway", True),
    "authorizationpolicies": ("AuthorizationPolicy", True),
    "peerauthentications": ("PeerAuthentication", True),
    "requestauthentications": ("RequestAuthentication", True),
    "secrets": ("Secret", True),
}
# group/version -> plurals it serves (security.istio.io serves both versions of the same objects, as a CRD does)
SERVED: dict[str, set[str]] = {
    "v1": {"namespaces", "pods", "services", "nodes", "configmaps", "secrets"},
    "discovery.k8s.io/v1": {"endpointslices"},
    "gateway.networking.k8s.io/v1": {"gateways"},
    "security.istio.io/v1": {"authorizationpolicies", "peerauthentications", "requestauthentications"},
    "security.istio.io/v1beta1": {"authorizationpolicies", "peerauthentications", "requestauthentications"},
}
PLURAL_OF = {kind: plural for plural, (kind, _) in KINDS.items()}


@dataclass(eq=False)
class _Watch:
    plural: str
    namespace: str | None
    selector: list[tuple[str, str]]
    bookmarks: bool
    queue: asyncio.Queue[bytes | None] = field(default_factory=asyncio.Queue)


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, str]


def _tls_material(host: str) -> tuple[bytes, bytes, bytes]:
    """(CA cert PEM, server cert PEM, server key PEM): a throwaway CA and a server cert for `host`."""
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fake-kube-ca")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kube-apiserver")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(host)), x509.DNSName("kubernetes")]),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    return (
        ca.public_bytes(pem),
        cert.public_bytes(pem),
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
    )


def _status(code: int, reason: str, message: str) -> dict[str, Any]:
    status = {"kind": "Status", "apiVersion": "v1", "status": "Failure"}
    return {**status, "code": code, "reason": reason, "message": message}


def _merge(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return patch
    out = dict(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = _merge(out.get(k), v)
    return out


class FakeKubeApi:
    """See the module docstring. Use as a context manager (starts and stops the server thread)."""

    def __init__(
        self, *, token: str = "test-token", host: str = "127.0.0.1", tls: bool = True, sock: socket.socket | None = None
    ) -> None:
        """`sock`: a listening socket to serve on (made in another network namespace, say) instead of host:0."""
        self.token = token
        self.host = sock.getsockname()[0] if sock is not None else host
        self._sock = sock
        self.port = 0
        self.ca_pem, cert, key = _tls_material(host)
        self._tls_files = (cert, key)
        self.tls = tls
        self.rv = 1000
        self.compacted = 0  # watches from a resourceVersion below this get 410
        self.objects: dict[str, dict[tuple[str, str], dict[str, Any]]] = {p: {} for p in KINDS}
        self.history: list[tuple[int, str, str, dict[str, Any]]] = []  # (rv, plural, type, object)
        self.requests: list[Request] = []
        self.patches: list[tuple[str, str, str, Any]] = []  # (plural, namespace, name, patch) as received
        self.hold_lists: dict[str, threading.Event] = {}  # plural -> a list of it waits until the event is set
        self.page_size_cap = 0  # > 0: pages are at most this long even if the client asks for more
        self._watches: set[_Watch] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._stopping = False
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fake-kube-api", daemon=True)
        self._server: asyncio.Server | None = None
        self._lock = threading.Lock()
        self._continues: dict[str, tuple[list[dict[str, Any]], int]] = {}
        # TokenReview (the CA): token -> what the API knows of it (see `add_token`); reviews answer from it
        self.review_tokens: dict[str, dict[str, Any]] = {}
        self.reviews_omit_audiences = False  # an authenticator that is not audience-aware
        self.hold_creates: dict[str, threading.Event] = {}  # plural -> a create of it waits until the event is set
        self.fail: dict[str, int] = {}  # plural -> answer every request for it with this status (0: drop it)
        # plural -> writes the whole answer itself (a hostile or broken server: bad framing, a drip, no answer);
        # it gets the writer and the request's query, and should end by `until_stopped()` at the latest
        self.raw: dict[str, Callable[[asyncio.StreamWriter, dict[str, str]], Awaitable[None]]] = {}
        self._stopped: asyncio.Event | None = None

    # ---- lifetime ---------------------------------------------------------------------------------------

    def __enter__(self) -> FakeKubeApi:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    async def _start(self) -> None:
        self._stopped = asyncio.Event()
        ctx = None
        if self.tls:
            import tempfile

            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            with tempfile.TemporaryDirectory() as d:
                cf, kf = Path(d) / "c.pem", Path(d) / "k.pem"
                cf.write_bytes(self._tls_files[0])
                kf.write_bytes(self._tls_files[1])
                ctx.load_cert_chain(cf, kf)
        if self._sock is not None:
            self._server = await asyncio.start_server(self._serve, sock=self._sock, ssl=ctx)
        else:
            self._server = await asyncio.start_server(self._serve, self.host, 0, ssl=ctx)
        self.port = self._server.sockets[0].getsockname()[1]

    async def until_stopped(self) -> None:
        """For a `raw` handler that never answers: returns when the server stops."""
        assert self._stopped is not None
        await self._stopped.wait()

    async def _stop(self) -> None:
        assert self._server is not None
        if self._stopped is not None:
            self._stopped.set()
        self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        for hold in [*self.hold_lists.values(), *self.hold_creates.values()]:
            hold.set()
        self._stopping = True
        for _ in range(100):  # a handler that read its request just before may register a watch after this
            if not self._tasks:
                break
            for w in list(self._watches):
                w.queue.put_nowait(None)
            await asyncio.wait(list(self._tasks), timeout=0.05)
        for task in list(self._tasks):  # none should be left; if one is, end it here, not in a closed loop
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=5)

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}:{self.port}"

    def kubeconfig(self, path: Path, *, token: str | None = None) -> Path:
        """A kubeconfig for this server (CA inline, bearer token), as `kubectl config view --raw` writes them."""
        doc = {
            "apiVersion": "v1",
            "kind": "Config",
            "current-context": "fake",
            "clusters": [
                {
                    "name": "fake",
                    "cluster": {
                        "server": self.url,
                        "certificate-authority-data": base64.b64encode(self.ca_pem).decode(),
                    },
                }
            ],
            "users": [{"name": "fake", "user": {"token": token if token is not None else self.token}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake"}}],
        }
        path.write_text(json.dumps(doc))
        return path

    def _call(self, fn: Callable[[], Any]) -> Any:
        async def run() -> Any:
            return fn()

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(10)

    # ---- mutators (any thread) ----------------------------------------------------------------------------

    def put(self, obj: dict[str, Any]) -> int:
        """Create or replace an object (kind from the object); returns its new resourceVersion."""
        return int(self._call(lambda: self._put(copy.deepcopy(obj))))

    def put_all(self, objs: list[dict[str, Any]]) -> None:
        self._call(lambda: [self._put(copy.deepcopy(o)) for o in objs])

    def delete(self, kind: str, name: str, namespace: str = "") -> None:
        self._call(lambda: self._delete(PLURAL_OF[kind], namespace, name))

    def compact(self, before: int | None = None) -> None:
        """Forget history older than `before` (default: the current version): a watch from a version below it
        gets `410 Gone`, as after etcd compaction."""

        def run() -> None:
            self.compacted = before if before is not None else self.rv
            self.history = [h for h in self.history if h[0] >= self.compacted]

        self._call(run)

    def bookmark(self) -> int:
        """A BOOKMARK at the current resourceVersion to every watch that asked for bookmarks."""

        def run() -> int:
            for w in self._watches:
                if w.bookmarks:
                    kind = KINDS[w.plural][0]
                    line = {"type": "BOOKMARK", "object": {"kind": kind, "metadata": {"resourceVersion": str(self.rv)}}}
                    w.queue.put_nowait(json.dumps(line).encode() + b"\n")
            return self.rv

        return int(self._call(run))

    def cut_watches(self) -> int:
        """Drop every open watch connection without ending its stream (a network cut); returns how many."""

        def run() -> int:
            n = len(self._watches)
            for w in list(self._watches):
                w.queue.put_nowait(None)
            return n

        return int(self._call(run))

    def send_raw(self, plural: str, data: bytes) -> None:
        """Bytes straight into every open watch of `plural` (garbage, an oversized line...)."""

        def run() -> None:
            for w in self._watches:
                if w.plural == plural:
                    w.queue.put_nowait(data)

        self._call(run)

    def watch_count(self, plural: str | None = None) -> int:
        return int(self._call(lambda: sum(1 for w in self._watches if plural is None or w.plural == plural)))

    def get(self, kind: str, name: str, namespace: str = "") -> dict[str, Any] | None:
        def run() -> dict[str, Any] | None:
            return copy.deepcopy(self.objects[PLURAL_OF[kind]].get((namespace, name)))

        obj: dict[str, Any] | None = self._call(run)
        return obj

    def watch_requests(self, plural: str) -> list[Request]:
        with self._lock:
            return [r for r in self.requests if r.path.endswith("/" + plural) and r.query.get("watch") == "true"]

    def add_token(
        self,
        token: str,
        namespace: str,
        service_account: str,
        *,
        pod_name: str = "",
        pod_uid: str = "",
        node: str = "",
        audiences: tuple[str, ...] = ("istio-ca",),
    ) -> None:
        """A service-account token as the API would review it: bound to a pod (and a node, as 1.30+), for
        `audiences`. Without `pod_name` it is a legacy (Secret) token."""
        extra: dict[str, list[str]] = {}
        if pod_name:
            extra["authentication.kubernetes.io/pod-name"] = [pod_name]
            extra["authentication.kubernetes.io/pod-uid"] = [pod_uid or f"uid-pods-{namespace}-{pod_name}"]
        if node:
            extra["authentication.kubernetes.io/node-name"] = [node]
        user = {
            "username": f"system:serviceaccount:{namespace}:{service_account}",
            "uid": f"uid-sa-{namespace}-{service_account}",
            "groups": ["system:serviceaccounts", f"system:serviceaccounts:{namespace}", "system:authenticated"],
            "extra": extra,
        }
        with self._lock:
            self.review_tokens[token] = {"user": user, "audiences": list(audiences)}

    def count(self, method: str, path_suffix: str) -> int:
        """Requests seen with `method` whose path ends with `path_suffix` (e.g. POST .../tokenreviews)."""
        with self._lock:
            return sum(1 for r in self.requests if r.method == method and r.path.endswith(path_suffix))

    # ---- store ------------------------------------------------------------------------------------------

    def _put(self, obj: dict[str, Any]) -> int:
        plural = PLURAL_OF[obj["kind"]]
        meta = obj.setdefault("metadata", {})
        if not KINDS[plural][1]:
            meta.pop("namespace", None)
        elif not meta.get("namespace"):
            meta["namespace"] = "default"
        key = (meta.get("namespace", ""), meta["name"])
        meta.setdefault("uid", f"uid-{plural}-{key[0]}-{key[1]}")
        meta.setdefault("creationTimestamp", "2026-12-04T00:00:00Z")
        self.rv += 1
        meta["resourceVersion"] = str(self.rv)
        kind = "MODIFIED" if key in self.objects[plural] else "ADDED"
        self.objects[plural][key] = obj
        self._event(plural, kind, obj)
        return self.rv

    def _delete(self, plural: str, namespace: str, name: str) -> None:
        obj = self.objects[plural].pop((namespace, name), None)
        if obj is None:
            return
        self.rv += 1
        obj = copy.deepcopy(obj)
        obj["metadata"]["resourceVersion"] = str(self.rv)
        self._event(plural, "DELETED", obj)

    def _event(self, plural: str, kind: str, obj: dict[str, Any]) -> None:
        self.history.append((self.rv, plural, kind, obj))
        for w in self._watches:
            if w.plural == plural and self._matches(obj, w.namespace, w.selector):
                w.queue.put_nowait(json.dumps({"type": kind, "object": obj}).encode() + b"\n")

    @staticmethod
    def _matches(obj: dict[str, Any], namespace: str | None, selector: list[tuple[str, str]]) -> bool:
        meta = obj.get("metadata") or {}
        if namespace and meta.get("namespace") != namespace:
            return False
        for fieldpath, want in selector:
            value: Any = obj
            for part in fieldpath.split("."):
                value = value.get(part) if isinstance(value, dict) else None
            if str(value or "") != want:
                return False
        return True

    # ---- HTTP -------------------------------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            method, target, _ = lines[0].split(" ", 2)
            headers = {}
            for line in lines[1:]:
                if ":" in line:
                    k, v = line.split(":", 1)
                    headers[k.strip().lower()] = v.strip()
            body = await reader.readexactly(int(headers.get("content-length", "0") or 0))
            url = urlsplit(target)
            query = dict(parse_qsl(url.query))
            with self._lock:
                self.requests.append(Request(method, unquote(url.path), query))
            if headers.get("authorization") != f"Bearer {self.token}":
                await self._send(writer, 401, _status(401, "Unauthorized", "Unauthorized"))
                return
            content_type = headers.get("content-type", "")
            await self._route(method, unquote(url.path), query, body, writer, content_type)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ssl.SSLError):
            pass
        finally:
            self._writers.discard(writer)
            self._tasks.discard(task)
            writer.close()
            with contextlib.suppress(Exception):  # flushed and closed before the handler ends (and the loop may stop)
                await asyncio.wait_for(writer.wait_closed(), 2)

    async def _send(self, writer: asyncio.StreamWriter, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        writer.write(
            f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {len(data)}\r\n"
            "Connection: close\r\n\r\n".encode()
            + data
        )
        await writer.drain()

    def _parse_path(self, path: str) -> tuple[str, str, str | None, str | None] | None:
        """-> (group/version, plural, namespace, name) or None."""
        parts = [p for p in path.split("/") if p]
        if parts[:1] == ["api"] and len(parts) >= 2:
            gv, rest = parts[1], parts[2:]
        elif parts[:1] == ["apis"] and len(parts) >= 3:
            gv, rest = f"{parts[1]}/{parts[2]}", parts[3:]
        else:
            return None
        namespace = None
        if len(rest) >= 3 and rest[0] == "namespaces":
            namespace, rest = rest[1], rest[2:]
        if not rest or len(rest) > 2:
            return None
        return gv, rest[0], namespace, rest[1] if len(rest) == 2 else None

    async def _route(
        self,
        method: str,
        path: str,
        query: dict[str, str],
        body: bytes,
        writer: asyncio.StreamWriter,
        content_type: str = "",
    ) -> None:
        if path == "/apis/authentication.k8s.io/v1/tokenreviews" and method == "POST":
            hold = self.hold_creates.get("tokenreviews")
            if hold is not None:
                await asyncio.to_thread(hold.wait)
            if "tokenreviews" in self.fail:
                await self._fail(writer, self.fail["tokenreviews"])
            else:
                await self._token_review(writer, json.loads(body))
            return
        parsed = self._parse_path(path)
        if parsed is None or parsed[1] not in SERVED.get(parsed[0], set()):
            await self._send(writer, 404, _status(404, "NotFound", f"the server could not find {path}"))
            return
        gv, plural, namespace, name = parsed
        if plural in self.fail:
            await self._fail(writer, self.fail[plural])
            return
        if plural in self.raw:
            await self.raw[plural](writer, query)
            return
        if method == "POST" and not name:
            await self._create(writer, plural, namespace or "", json.loads(body))
            return
        if method == "GET" and name:
            found = self.objects[plural].get((namespace or "", name))
            if found is None:
                await self._send(writer, 404, _status(404, "NotFound", f'{plural} "{name}" not found'))
            else:
                await self._send(writer, 200, found)
            return
        if method == "PATCH" and name:
            if content_type != "application/merge-patch+json":
                await self._send(writer, 415, _status(415, "UnsupportedMediaType", f"{content_type!r}"))
                return
            obj = self.objects[plural].get((namespace or "", name))
            if obj is None:
                await self._send(writer, 404, _status(404, "NotFound", f'{plural} "{name}" not found'))
                return
            merged = _merge(obj, json.loads(body))
            self.patches.append((plural, namespace or "", name, json.loads(body)))
            self._put(merged)
            await self._send(writer, 200, merged)
            return
        if method != "GET" or name:
            await self._send(writer, 405, _status(405, "MethodNotAllowed", method))
            return
        selector: list[tuple[str, str]] = []
        for term in filter(None, query.get("fieldSelector", "").split(",")):
            k, _, v = term.partition("=")
            selector.append((k.strip(), v.lstrip("=").strip()))
        if query.get("watch") in ("true", "1"):
            await self._watch(writer, gv, plural, namespace, selector, query)
        else:
            await self._list(writer, gv, plural, namespace, selector, query)

    async def _fail(self, writer: asyncio.StreamWriter, status: int) -> None:
        if not status:
            writer.transport.abort()
        else:
            await self._send(writer, status, _status(status, "ServiceUnavailable", "injected failure"))

    async def _create(self, writer: asyncio.StreamWriter, plural: str, namespace: str, obj: dict[str, Any]) -> None:
        hold = self.hold_creates.get(plural)
        if hold is not None:
            await asyncio.to_thread(hold.wait)
        meta = obj.get("metadata") or {}
        if KINDS[plural][1] and meta.get("namespace", namespace) != namespace:
            await self._send(writer, 400, _status(400, "BadRequest", "the namespace of the object does not match"))
            return
        if KINDS[plural][1]:
            meta["namespace"] = namespace
            if namespace not in {n for _, n in self.objects["namespaces"]}:
                await self._send(writer, 404, _status(404, "NotFound", f'namespaces "{namespace}" not found'))
                return
        obj["kind"] = KINDS[plural][0]
        if (meta.get("namespace", ""), meta.get("name")) in self.objects[plural]:
            reason = f'{plural} "{meta.get("name")}" already exists'
            await self._send(writer, 409, _status(409, "AlreadyExists", reason))
            return
        self._put(obj)
        await self._send(writer, 201, obj)

    async def _token_review(self, writer: asyncio.StreamWriter, review: dict[str, Any]) -> None:
        spec = review.get("spec") or {}
        known = self.review_tokens.get(str(spec.get("token") or ""))
        wanted = list(spec.get("audiences") or [])
        status: dict[str, Any]
        if known is None:
            status = {"authenticated": False, "error": "invalid bearer token, token lookup failed"}
        else:
            both = [a for a in wanted if a in known["audiences"]] if wanted else list(known["audiences"])
            if not both:
                status = {"authenticated": False, "error": "invalid bearer token, token audiences is invalid"}
            else:
                status = {"authenticated": True, "user": known["user"]}
                if not self.reviews_omit_audiences:
                    status["audiences"] = both
        answer = {"kind": "TokenReview", "apiVersion": "authentication.k8s.io/v1", "spec": spec, "status": status}
        await self._send(writer, 201, answer)

    async def _list(
        self,
        writer: asyncio.StreamWriter,
        gv: str,
        plural: str,
        namespace: str | None,
        selector: list[tuple[str, str]],
        query: dict[str, str],
    ) -> None:
        hold = self.hold_lists.get(plural)
        if hold is not None:
            await asyncio.to_thread(hold.wait)
        token = query.get("continue")
        if token:
            items, rv = self._continues.pop(token, ([], self.rv))
        else:
            items = [  # a list's items carry no apiVersion and kind
                {k: v for k, v in copy.deepcopy(o).items() if k not in ("apiVersion", "kind")}
                for o in self.objects[plural].values()
                if self._matches(o, namespace, selector)
            ]
            rv = self.rv
        limit = int(query.get("limit") or 0)
        if self.page_size_cap:
            limit = min(limit or self.page_size_cap, self.page_size_cap)
        meta: dict[str, Any] = {"resourceVersion": str(rv)}
        if limit and len(items) > limit:
            rest_token = f"c{rv}-{id(items)}-{len(items)}"
            self._continues[rest_token] = (items[limit:], rv)
            items = items[:limit]
            meta["continue"] = rest_token
        kind = KINDS[plural][0]
        await self._send(writer, 200, {"kind": f"{kind}List", "apiVersion": gv, "metadata": meta, "items": items})

    async def _watch(
        self,
        writer: asyncio.StreamWriter,
        gv: str,
        plural: str,
        namespace: str | None,
        selector: list[tuple[str, str]],
        query: dict[str, str],
    ) -> None:
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n"
            b"Connection: close\r\n\r\n"
        )

        def chunk(data: bytes) -> None:
            writer.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")

        since = int(query.get("resourceVersion") or 0)
        if since and since < self.compacted:
            gone = _status(410, "Expired", f"too old resource version: {since} ({self.compacted})")
            chunk(json.dumps({"type": "ERROR", "object": gone}).encode() + b"\n")
            writer.write(b"0\r\n\r\n")
            await writer.drain()
            return
        if self._stopping:
            writer.transport.abort()
            return
        w = _Watch(plural, namespace, selector, query.get("allowWatchBookmarks") == "true")
        for rv, p, kind, obj in self.history:
            if rv > since and p == plural and self._matches(obj, namespace, selector):
                w.queue.put_nowait(json.dumps({"type": kind, "object": obj}).encode() + b"\n")
        self._watches.add(w)
        timeout = float(query.get("timeoutSeconds") or 1800)
        try:
            async with asyncio.timeout(timeout):
                while True:
                    data = await w.queue.get()
                    if data is None:  # cut: drop the connection without the last chunk
                        writer.transport.abort()
                        return
                    chunk(data)
                    await writer.drain()
        except TimeoutError:
            writer.write(b"0\r\n\r\n")
            await writer.drain()
        finally:
            self._watches.discard(w)


def start_kube_proxy(api: FakeKubeApi, node: str, ca_dir: Path, workdir: Path, *extra: str) -> Any:
    """A `ztunnel proxy --source kubernetes --kubeconfig F` process (tests.integration.conftest.ProxyProcess) for
    `node`, not waited for."""
    import subprocess

    from tests.integration.conftest import ZTUNNEL, ProxyProcess
    from tests.support.identity import free_port

    metrics, admin, ready = free_port(), free_port(), free_port()
    log_path = workdir / f"proxy-kube-{node}-{admin}.log"
    argv = [
        ZTUNNEL, "--log-level", "info", "proxy", "--node", node, "--source", "kubernetes",
        "--kubeconfig", str(api.kubeconfig(workdir / f"kubeconfig-{admin}")), "--ca-dir", str(ca_dir),
        "--metrics-addr", f"127.0.0.1:{metrics}", "--admin-addr", f"127.0.0.1:{admin}",
        "--readiness-addr", f"127.0.0.1:{ready}", *extra,
    ]  # fmt: skip
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=workdir)
    return ProxyProcess(node, proc, metrics, admin, ready, log_path)


def pod(
    name: str,
    namespace: str = "shop",
    *,
    node: str = "node-a",
    ip: str = "",
    sa: str = "",
    labels: dict[str, str] | None = None,
    heavy: bool = False,
) -> dict[str, Any]:
    """A Pod as the API returns it; `heavy` adds what a real one carries that the mesh never reads."""
    obj: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "labels": {"app": name, **(labels or {})}},
        "spec": {"nodeName": node, "serviceAccountName": sa or name, "containers": [{"name": "app", "image": "app:1"}]},
        "status": {"podIP": ip, "podIPs": [{"ip": ip}], "conditions": [{"type": "Ready", "status": "True"}]},
    }
    if heavy:
        obj["metadata"]["managedFields"] = [
            {"manager": "kubelet", "operation": "Update", "fieldsV1": {f"f:{i}": {"f:x": {}} for i in range(40)}}
        ]
        obj["metadata"]["ownerReferences"] = [
            {"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": f"{name}-rs", "uid": "x" * 36, "controller": True}
        ]
        obj["spec"]["containers"][0].update(
            env=[{"name": f"VAR_{i}", "value": "v" * 20} for i in range(20)],
            resources={"requests": {"cpu": "100m", "memory": "128Mi"}},
            volumeMounts=[{"name": "kube-api-access", "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount"}],
        )
        token = {"serviceAccountToken": {"path": "token", "expirationSeconds": 3607}}
        obj["spec"]["volumes"] = [{"name": "kube-api-access", "projected": {"sources": [token]}}]
        obj["status"]["containerStatuses"] = [
            {"name": "app", "ready": True, "restartCount": 0, "image": "app:1", "imageID": "sha256:" + "a" * 64}
        ]
    return obj


def namespace(name: str, labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels or {}}}


def service(name: str, namespace: str, ip: str, selector: dict[str, str], port: int = 80, target: int = 8080) -> dict:  # type: ignore[type-arg]
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"clusterIP": ip, "selector": selector, "ports": [{"port": port, "targetPort": target}]},
    }


def configmap(name: str, namespace: str, data: dict[str, str]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name, "namespace": namespace}, "data": data}


def authz_policy(name: str, namespace: str, spec: dict[str, Any], version: str = "v1") -> dict[str, Any]:
    return {
        "apiVersion": f"security.istio.io/{version}",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    }


def iter_documents(objs: list[dict[str, Any]]) -> Iterator[str]:
    """The same objects as YAML documents (JSON is YAML), for the file source."""
    for o in objs:
        yield json.dumps(o)


# ---- what the Kubernetes config source's tests share ----------------------------------------------------------

DENY_BAD = {"action": "DENY", "rules": [{"from": [{"source": {"principals": ["cluster.local/ns/shop/sa/bad"]}}]}]}


def sample_cluster() -> list[dict[str, Any]]:
    server = pod("server", node="node-b", ip="10.1.0.2", heavy=True)
    server["spec"]["containers"][0]["ports"] = [{"name": "http", "containerPort": 8080}]
    return [
        namespace("shop", {"istio.io/dataplane-mode": "ambient"}),
        namespace("istio-system"),
        pod("client", node="node-a", ip="10.1.0.1", heavy=True),
        server,
        pod("other", node="node-a", ip="10.1.0.3", labels={"istio.io/dataplane-mode": "none"}),
        service("server", "shop", "10.96.0.10", {"app": "server"}),
        {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": "node-a"},
            "status": {"addresses": [{"type": "InternalIP", "address": "192.168.0.1"}], "capacity": {"cpu": "4"}},
        },
        waypoint_gateway("waypoint", "shop"),
        configmap(
            "istio",
            "istio-system",
            {
                "mesh": "extensionProviders:\n- name: authz\n"
                "  envoyExtAuthzHttp: {service: a.shop.svc.cluster.local, port: 80}\n"
            },
        ),
        configmap("unrelated", "istio-system", {"big": "x" * 1000}),
        authz_policy("deny-bad", "shop", DENY_BAD),
        {
            "apiVersion": "security.istio.io/v1beta1",
            "kind": "PeerAuthentication",
            "metadata": {"name": "strict", "namespace": "shop"},
            "spec": {"mtls": {"mode": "STRICT"}},
        },
    ]


def model_summary(cfg: ClusterConfig) -> dict[str, Any]:
    """What the consumers read of a snapshot; containers compared through what they are used for."""
    return {
        "workloads": sorted(
            ((dataclasses.replace(w, containers=()), w.target_port("http")) for w in cfg.workloads),
            key=lambda x: x[0].ref,
        ),
        "services": sorted(cfg.services, key=lambda s: s.ref),
        "namespaces": cfg.namespaces,
        "nodes": cfg.nodes,
        "waypoints": cfg.waypoints,
        "providers": cfg.extension_providers,
        "policies": sorted(
            (o.kind, o.namespace, o.name, json.dumps(o.spec, sort_keys=True), dict(o.annotations))
            for o in cfg.policy_objects
        ),
    }


def file_model(api: FakeKubeApi, tmp_path: Path) -> ClusterConfig:
    """The file source's model of exactly what the API holds now."""
    objs = [o for plural in api.objects.values() for o in plural.values()]
    f = tmp_path / "same.yaml"
    f.write_text("\n---\n".join(json.dumps(o) for o in objs))
    return FileConfigSource([f]).load()


def kube_source(api: FakeKubeApi, tmp_path: Path, **kw: Any) -> KubeConfigSource:
    kw.setdefault("sync_timeout", 10.0)
    return KubeConfigSource(from_kubeconfig(api.kubeconfig(tmp_path / "kubeconfig")), **kw)


@contextlib.asynccontextmanager
async def watching(source: KubeConfigSource) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(source.watch())
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def reflector_of(source: KubeConfigSource, plural: str) -> Any:
    return next(r for r in source.reflectors if r.resource.plural == plural)


# ---- what the CA's TokenReview tests share ---------------------------------------------------------------------


def kube_client(api: FakeKubeApi, tmp_path: Path) -> KubeClient:
    """A KubeClient on `api`, through a kubeconfig written in `tmp_path` (as a deployment's would be)."""
    return KubeClient(from_kubeconfig(api.kubeconfig(tmp_path / "kubeconfig")))


def kube_authenticator(api: FakeKubeApi, tmp_path: Path, **kwargs: Any) -> Any:
    """A KubeAuthenticator on `api` (the CA's node proxies: istio-system/ztunnel)."""
    from ztunnel.identity.kube import KubeAuthenticator

    return KubeAuthenticator(
        kube_client(api, tmp_path), trust_domain="cluster.local", node_proxy_accounts={"istio-system/ztunnel"}, **kwargs
    )


async def refused(auth: Any, token: str) -> Any:
    """The NodeAuthError `auth` refuses `token` with (AssertionError if it accepts it)."""
    from ztunnel.identity.authz import NodeAuthError

    try:
        caller = await auth.authenticate(f"Bearer {token}")
    except NodeAuthError as e:
        return e
    raise AssertionError(f"token {token[:20]!r} was accepted: {caller}")


def review_count(api: FakeKubeApi) -> int:
    return api.count("POST", "/tokenreviews")


def ca_server(auth: Any, ca: Any) -> Any:
    """A CAServer authenticating with `auth`, over the two-node test config (web on node-a, db on node-b)."""
    from tests.support.identity import two_node_config_yaml
    from ztunnel.config.loader import build_config, load_documents
    from ztunnel.identity.server import CAServer

    config = build_config(load_documents(two_node_config_yaml(), "two-nodes.yaml"))
    return CAServer(ca, auth, lambda: config, listen="127.0.0.1:0")
