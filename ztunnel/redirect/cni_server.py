"""The node agent's CNI endpoint: JSON over HTTP/1.1 on a private unix socket, the plugin's way in.

It runs on the same bounded HTTP server as the proxy's control ports, so a confused or hostile local
client gets a 4xx, never an unbounded read.
"""

from __future__ import annotations

import json
import logging
import socket
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

from ztunnel.net.http import HttpServer, Request, Response, Routes
from ztunnel.net.netns import NetnsError
from ztunnel.net.unix import bind_unix_private
from ztunnel.redirect.iptables import RedirectError
from ztunnel.redirect.link import AgentError

log = logging.getLogger("ztunnel.redirect.agent")

MAX_BODY = 1 << 20  # a CNI request carries the runtime's prevResult; generous, bounded
CniHandler = Callable[[Mapping[str, Any]], Awaitable[dict[str, Any]]]


def _json(value: Mapping[str, Any], status: int) -> Response:
    return Response(status, json.dumps(value).encode(), "application/json")


def _cni_route(name: str, handler: CniHandler) -> Callable[[Request], Awaitable[Response]]:
    async def serve(request: Request) -> Response:
        try:
            body = json.loads(request.body) if request.body else {}
        except ValueError as e:
            return _json({"msg": f"bad request: {e}", "code": 4}, 400)
        if not isinstance(body, dict):
            return _json({"msg": "body must be a JSON object", "code": 6}, 400)
        try:
            return _json(await handler(body), 200)
        except AgentError as e:
            log.warning("CNI %s failed: %s", name, e)
            return _json({"msg": str(e), "code": e.code, "details": e.details}, e.status)
        except (RedirectError, NetnsError, OSError) as e:
            log.error("CNI %s failed: %s", name, e)
            return _json({"msg": str(e), "code": 100}, 500)

    return serve


def cni_server(
    path: Path,
    *,
    add: CniHandler,
    delete: CniHandler,
    check: CniHandler,
    gc: CniHandler,
    status: Callable[[], dict[str, Any]],
) -> HttpServer:
    """An HttpServer bound (0600 from the start) at `path`; start it with `start()`."""

    def get_status(_request: Request) -> Response:
        st = status()
        return _json(st, 200 if st.get("ready") else 503)

    routes: Routes = {
        "/v1/cni/add": {"POST": _cni_route("ADD", add)},
        "/v1/cni/del": {"POST": _cni_route("DEL", delete)},
        "/v1/cni/check": {"POST": _cni_route("CHECK", check)},
        "/v1/cni/gc": {"POST": _cni_route("GC", gc)},
        "/v1/status": {"GET": get_status},
    }
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        bind_unix_private(listener, path)
    except OSError:
        listener.close()
        raise
    return HttpServer(str(path), 0, routes, name="cni", sock=listener, max_body=MAX_BODY)
