"""A thin Kubernetes API client: where the API is and how to authenticate (in-cluster service account or a
kubeconfig), and three calls over HTTP/1.1 + TLS: a bounded GET (list), a streamed GET (watch), a PATCH.

Each call is one connection (`Connection: close`), as the project's other HTTP clients do: a list is a
handful of pages at start-up and after a `410 Gone`, and a watch holds its connection for minutes anyway.
The service-account token is read again for each request, so a rotated projected token is picked up.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import json
import logging
import os
import ssl
import tempfile
from collections.abc import AsyncGenerator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

import yaml

from ztunnel.config.kube.wire import ChunkedDecoder, KubeWireError, LineSplitter, Oversized
from ztunnel.errors import ZtunnelError
from ztunnel.net.http import HttpResponseError, parse_response_head

log = logging.getLogger("ztunnel.config.kube")

SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
MAX_HEAD_BYTES = 64 * 1024
MAX_LIST_BYTES = 64 * 1024 * 1024  # one page of a list (pages are asked for with limit=500)
MAX_ERROR_BODY = 64 * 1024
READ_SIZE = 64 * 1024


class KubeConfigError(ZtunnelError):
    """No usable way to reach the API: the message names the file or variable and what to do."""


class KubeApiError(OSError):
    """The API answered with an error status (or not as HTTP); `status` is the HTTP status (0: no answer)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class KubeEndpoint:
    """Where the API server is and how this process proves who it is."""

    host: str
    port: int
    tls: ssl.SSLContext | None  # None: plain HTTP (a kubeconfig with an http:// server, e.g. kubectl proxy)
    server_name: str | None = None
    token: str | None = None
    token_file: Path | None = None
    namespace: str = "default"  # the service account's own namespace (in-cluster)
    base_path: str = ""
    headers: Mapping[str, str] = field(default_factory=dict)

    def bearer(self) -> str | None:
        if self.token_file is not None:
            try:
                return self.token_file.read_text().strip()
            except OSError as e:
                raise KubeApiError(0, f"cannot read the service account token {self.token_file}: {e.strerror}") from e
        return self.token


def in_cluster(sa_dir: Path = SERVICE_ACCOUNT_DIR, env: Mapping[str, str] = os.environ) -> KubeEndpoint:
    """The pod's own service account: KUBERNETES_SERVICE_HOST/PORT, and the token, CA and namespace files."""
    host, port = env.get("KUBERNETES_SERVICE_HOST"), env.get("KUBERNETES_SERVICE_PORT")
    if not host or not port:
        raise KubeConfigError(
            "KUBERNETES_SERVICE_HOST and KUBERNETES_SERVICE_PORT are not set: not running in a pod; "
            "give --kubeconfig FILE to reach a cluster from outside"
        )
    ca, token = sa_dir / "ca.crt", sa_dir / "token"
    for f in (ca, token):
        if not f.is_file():
            raise KubeConfigError(f"{f} is missing: mount the service account token (automountServiceAccountToken)")
    try:
        ctx = ssl.create_default_context(cafile=str(ca))
        namespace = (sa_dir / "namespace").read_text().strip() if (sa_dir / "namespace").is_file() else "default"
    except (OSError, ssl.SSLError) as e:
        raise KubeConfigError(f"{ca}: cannot be used as the API server's CA: {e}") from None
    try:
        port_number = int(port)
    except ValueError:
        raise KubeConfigError(f"KUBERNETES_SERVICE_PORT={port!r} is not a port number") from None
    return KubeEndpoint(
        host.strip("[]"), port_number, ctx, server_name="kubernetes.default.svc", token_file=token, namespace=namespace
    )


def from_kubeconfig(path: str | Path, context: str | None = None) -> KubeEndpoint:
    """A kubeconfig file's current (or named) context: server, CA, and a token or client certificate."""
    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError, UnicodeError) as e:
        raise KubeConfigError(f"{path}: cannot be read as a kubeconfig: {e}") from None
    if not isinstance(doc, Mapping):
        raise KubeConfigError(f"{path}: not a kubeconfig (expected a mapping with clusters, users, contexts)")

    def named(section: str, name: Any) -> Mapping[str, Any]:
        for entry in doc.get(section) or []:
            if isinstance(entry, Mapping) and entry.get("name") == name:
                inner = entry.get(section[:-1])
                if isinstance(inner, Mapping):
                    return inner
        raise KubeConfigError(f"{path}: field {section}: no entry named {name!r}")

    name = context or doc.get("current-context")
    if not name:
        raise KubeConfigError(f"{path}: field current-context is empty; set it or pick a context")
    ctx = named("contexts", name)
    cluster = named("clusters", ctx.get("cluster"))
    user = named("users", ctx.get("user")) if ctx.get("user") else {}
    base = path.parent

    def material(key: str, where: Mapping[str, Any]) -> bytes | None:
        """`<key>-data` (base64) or `<key>` (a file, relative to the kubeconfig)."""
        if where.get(f"{key}-data"):
            try:
                return base64.b64decode(str(where[f"{key}-data"]), validate=True)
            except ValueError:
                raise KubeConfigError(f"{path}: field {key}-data is not base64") from None
        if where.get(key):
            f = base / str(where[key])
            try:
                return f.read_bytes()
            except OSError as e:
                raise KubeConfigError(f"{path}: field {key}: cannot read {f}: {e.strerror}") from None
        return None

    if cluster.get("insecure-skip-tls-verify"):
        # Anyone on the path could then serve this component its pods and policies and read its token.
        raise KubeConfigError(
            f"{path}: field clusters[].cluster.insecure-skip-tls-verify is set: the API server would not be "
            "authenticated, so it is refused; give certificate-authority(-data) instead"
        )
    server = urlsplit(str(cluster.get("server") or ""))
    if server.scheme not in ("https", "http") or not server.hostname:
        raise KubeConfigError(f"{path}: field clusters[].cluster.server: {cluster.get('server')!r} is not an https URL")
    tls = None
    if server.scheme == "http" and not _is_loopback(server.hostname):
        log.warning(
            "%s: the API server %s is reached over plain HTTP: anyone on the path can read this component's token "
            "and feed it pods and policies; use https (a kubectl proxy on loopback is the only safe http server)",
            path,
            cluster.get("server"),
        )
    if server.scheme == "https":
        tls = ssl.create_default_context()
        ca = material("certificate-authority", cluster)
        try:
            if ca is not None:
                tls = ssl.create_default_context(cadata=ca.decode("ascii"))
            cert, key = material("client-certificate", user), material("client-key", user)
            if cert and key:
                _load_client_cert(tls, cert, key)
        except (ssl.SSLError, ValueError, UnicodeError) as e:
            raise KubeConfigError(
                f"{path}: the cluster's CA or the user's client certificate is unusable: {e}"
            ) from None
    token = user.get("token")
    token_file = user.get("tokenFile")
    return KubeEndpoint(
        server.hostname,
        server.port or (443 if server.scheme == "https" else 80),
        tls,
        server_name=str(cluster.get("tls-server-name") or server.hostname),
        token=str(token) if token else None,
        token_file=base / str(token_file) if token_file else None,
        namespace=str(ctx.get("namespace") or "default"),
        base_path=server.path.rstrip("/"),
    )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _load_client_cert(ctx: ssl.SSLContext, cert: bytes, key: bytes) -> None:
    """ssl loads a client certificate from files only: write them to a private temporary dir, load, delete."""
    with tempfile.TemporaryDirectory() as d:
        cf, kf = Path(d) / "cert.pem", Path(d) / "key.pem"
        for f, data in ((cf, cert), (kf, key)):
            fd = os.open(f, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as out:
                out.write(data)
        ctx.load_cert_chain(str(cf), str(kf))


def api_path(base: str, params: Mapping[str, str | int | bool] | None = None) -> str:
    if not params:
        return base
    return base + "?" + urlencode({k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in params.items()})


class KubeClient:
    """Requests to one API server; every call is bounded in bytes, and the caller bounds the time."""

    def __init__(self, endpoint: KubeEndpoint) -> None:
        self.endpoint = endpoint

    def _request(self, method: str, path: str, body: bytes = b"", content_type: str = "") -> bytes:
        ep = self.endpoint
        authority = f"[{ep.host}]:{ep.port}" if ":" in ep.host else f"{ep.host}:{ep.port}"
        lines = [
            f"{method} {ep.base_path}{path} HTTP/1.1",
            f"Host: {authority}",
            "Accept: application/json",
            "User-Agent: ztunnel-py",
            "Connection: close",
        ]
        token = ep.bearer()
        if token:
            lines.append(f"Authorization: Bearer {token}")
        if body or method not in ("GET", "HEAD"):
            lines.append(f"Content-Length: {len(body)}")
        if content_type:
            lines.append(f"Content-Type: {content_type}")
        lines.extend(f"{k}: {v}" for k, v in ep.headers.items())
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body

    async def _open(
        self, method: str, path: str, body: bytes = b"", content_type: str = ""
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, int, dict[str, str]]:
        ep = self.endpoint
        request = self._request(method, path, body, content_type)
        reader, writer = await asyncio.open_connection(
            ep.host, ep.port, ssl=ep.tls, server_hostname=ep.server_name if ep.tls else None, limit=MAX_HEAD_BYTES
        )
        try:
            writer.write(request)
            await writer.drain()
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.LimitOverrunError:
                raise KubeApiError(0, f"response head larger than {MAX_HEAD_BYTES} bytes") from None
            except asyncio.IncompleteReadError:
                raise KubeApiError(0, "the API server closed the connection before answering") from None
            status, headers = _parse_head(head)
        except BaseException:
            writer.transport.abort()
            raise
        return reader, writer, status, headers

    async def _body(self, reader: asyncio.StreamReader, headers: Mapping[str, str], limit: int) -> bytes:
        if headers.get("transfer-encoding", "").lower() == "chunked":
            decoder, out = ChunkedDecoder(), bytearray()
            while not decoder.done:
                data = await reader.read(READ_SIZE)
                if not data:
                    raise KubeApiError(0, "the API server closed the connection in the middle of a response")
                out += decoder.feed(data)
                if len(out) > limit:
                    raise KubeApiError(0, f"response larger than {limit} bytes")
            return bytes(out)
        length = headers.get("content-length")
        if length is not None:
            if not length.isdigit() or int(length) > limit:
                raise KubeApiError(0, f"response content-length {length[:20]} over the limit of {limit} bytes")
            try:
                return await reader.readexactly(int(length))
            except asyncio.IncompleteReadError:
                raise KubeApiError(0, "the API server closed the connection in the middle of a response") from None
        data = await reader.read(limit + 1)
        if len(data) > limit:
            raise KubeApiError(0, f"response larger than {limit} bytes")
        return data

    async def request_json(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        content_type: str = "application/json",
        limit: int = MAX_LIST_BYTES,
    ) -> dict[str, Any]:
        """One request whose answer is a JSON object; KubeApiError for an error status (with its Status text)."""
        payload = json.dumps(body).encode() if body is not None else b""
        reader, writer, status, headers = await self._open(method, path, payload, content_type if payload else "")
        try:
            data = await self._body(reader, headers, limit if status < 300 else MAX_ERROR_BODY)
        finally:
            writer.transport.abort()  # one request per connection: nothing more to say, no TLS goodbye awaited
        if status >= 300:
            raise KubeApiError(status, f"{method} {path}: {status} {_error_text(data)}")
        try:
            value = json.loads(data)
        except (ValueError, RecursionError) as e:
            raise KubeApiError(0, f"{method} {path}: the answer is not JSON ({e})") from None
        if not isinstance(value, dict):
            raise KubeApiError(0, f"{method} {path}: the answer is not a JSON object")
        return value

    async def get(self, path: str) -> dict[str, Any]:
        return await self.request_json("GET", path)

    async def patch(self, path: str, patch: Any, content_type: str = "application/merge-patch+json") -> dict[str, Any]:
        return await self.request_json("PATCH", path, patch, content_type=content_type, limit=MAX_ERROR_BODY * 16)

    async def stream_lines(
        self, path: str, *, idle_timeout: float, deadline: float | None = None
    ) -> AsyncGenerator[bytes | Oversized, None]:
        """A watch: its event lines as they come (an over-long one as `Oversized`); ends when the server ends the
        response or closes; TimeoutError if the answer does not start or nothing (not even a bookmark) arrives for
        `idle_timeout` seconds, or if it is still going after `deadline` seconds (a server that drips a byte at a
        time past the watch's own timeoutSeconds)."""
        loop = asyncio.get_running_loop()
        end = loop.time() + deadline if deadline is not None else None
        async with asyncio.timeout(idle_timeout):
            reader, writer, status, headers = await self._open("GET", path)
        try:
            if status >= 300:
                data = await self._body(reader, headers, MAX_ERROR_BODY)
                raise KubeApiError(status, f"GET {path}: {status} {_error_text(data)}")
            chunked = headers.get("transfer-encoding", "").lower() == "chunked"
            decoder, lines = ChunkedDecoder(), LineSplitter()
            while not (chunked and decoder.done):
                wait = idle_timeout if end is None else min(idle_timeout, end - loop.time())
                if wait <= 0:
                    raise TimeoutError(f"GET {path}: the answer is still going after {deadline:g}s")
                async with asyncio.timeout(wait):
                    data = await reader.read(READ_SIZE)
                if not data:
                    return
                try:
                    payload = decoder.feed(data) if chunked else data
                except KubeWireError as e:
                    raise KubeApiError(0, f"GET {path}: bad chunked encoding: {e}") from None
                for line in lines.feed(payload):
                    yield line
        finally:
            writer.transport.abort()


def _parse_head(head: bytes) -> tuple[int, dict[str, str]]:
    """The head `readuntil` returned (its blank line included): the status and the headers by name."""
    try:
        status, headers = parse_response_head(head[:-4])
    except HttpResponseError as e:
        raise KubeApiError(0, str(e)) from None
    return status, dict(headers)


def _error_text(data: bytes) -> str:
    """An error answer's Status message (reason: message), or its first bytes."""
    try:
        value = json.loads(data)
        if isinstance(value, dict) and (value.get("message") or value.get("reason")):
            return ": ".join(str(value[k]) for k in ("reason", "message") if value.get(k))
    except (ValueError, RecursionError):
        pass
    return data[:200].decode("utf-8", "replace").strip()


def quote_name(name: str) -> str:
    return quote(name, safe="")
