"""The node agent: CNI events in, in-pod rules and netns hand-off to the node proxy out.

Lifetimes: `NodeAgent.run()` reconciles from its state file first (re-applying rules to pods that
still run, dropping pods whose netns is gone), then serves the proxy socket, the CNI socket and the
config watch in one task group. Every change of enrollment goes through `_lock`, so CNI events,
config changes and proxy (re)connects never interleave halfway.

State file (`<state dir>/pods.json`): every pod seen on this node by CNI ADD, keyed by the config
uid, with its netns path and inode, so a restarted agent finds running pods again.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import json
import logging
import os
import socket
import tempfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ztunnel.config.model import ClusterConfig, Workload
from ztunnel.config.source import FileConfigSource
from ztunnel.redirect import iptables, protocol
from ztunnel.redirect.netns import NetnsError, find_netns_by_inode, open_netns

log = logging.getLogger("ztunnel.redirect.agent")

ACK_TIMEOUT = 10.0  # the proxy creates three listeners per pod; seconds, not minutes
HELLO_TIMEOUT = 5.0
MAX_HTTP_BODY = 1 << 20


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


def bind_unix_private(sock: socket.socket, path: Path) -> None:
    """Bind a unix socket at PATH that is mode 0600 from the moment the path exists.

    A socket file gets its mode from the umask at bind(2); chmod after bind leaves a window in which any
    local user may connect (and enroll pods or pose as the proxy). Setting the umask instead would race with
    the agent's worker threads. So: bind inside a fresh 0700 directory next to PATH, chmod there, where no one
    else can reach it, then rename it over PATH in one step (which also replaces a stale socket).
    """
    if len(os.fsencode(path)) > 107:  # the rename would succeed, but no one could connect to the path
        raise OSError(errno.ENAMETOOLONG, f"unix socket path longer than 107 bytes: {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    private = Path(tempfile.mkdtemp(prefix=".", dir=path.parent))  # 0700; short: sun_path holds 107 bytes
    staged = private / "s"
    try:
        sock.bind(str(staged))
        os.chmod(staged, 0o600)
        os.replace(staged, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            staged.unlink()
        private.rmdir()


class AgentError(Exception):
    """An event the agent could not complete; `status`/`code` map to HTTP and the CNI error code.

    CNI codes: 11 "try again later" while the agent cannot act yet (no proxy connected, the proxy did not
    answer, the pod not in the config yet); 100 "enrollment failed" when the proxy refused the pod or the
    rules could not be installed; 3/4 for a bad request. Either way nothing of ours stays in the pod.
    """

    def __init__(self, msg: str, *, status: int = 503, code: int = 11, details: str = "") -> None:
        super().__init__(msg)
        self.status = status
        self.code = code
        self.details = details


class ProxyLink:
    """The connected proxy (at most one). Messages go one at a time and each waits for its ack."""

    def __init__(self) -> None:
        self.channel: protocol.Channel | None = None
        self._ids = itertools.count(1)

    @property
    def connected(self) -> bool:
        """True while a proxy is connected; notices a proxy that went away since the last message."""
        channel = self.channel
        if channel is None:
            return False
        try:
            alive = channel.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) != b""
        except BlockingIOError:
            alive = True  # nothing pending: still connected
        except OSError:
            alive = False
        if not alive:
            self.drop(channel)
        return alive

    def next_id(self) -> int:
        return next(self._ids)

    async def call(self, msg: protocol.Message) -> None:
        """Send and wait for the ack; raises AgentError (and drops the link) on nack, timeout or EOF."""
        channel = self.channel
        if channel is None:
            raise AgentError("the node proxy is not connected to the node agent")
        msg_id = getattr(msg, "id", 0)
        try:
            await channel.send(msg)
            async with asyncio.timeout(ACK_TIMEOUT):
                reply = await channel.recv()
        except (TimeoutError, OSError, protocol.ProtocolError) as e:
            self.drop(channel)
            raise AgentError(f"the node proxy did not answer: {e or type(e).__name__}") from e
        if reply is None:
            self.drop(channel)
            raise AgentError("the node proxy disconnected")
        if not isinstance(reply, protocol.Ack) or reply.id != msg_id:
            self.drop(channel)
            raise AgentError(f"unexpected reply from the node proxy: {reply!r}")
        if not reply.ok:  # the proxy is there and said no: enrollment failed (not "try again later")
            raise AgentError(f"the node proxy refused: {reply.error}", status=500, code=100)

    def drop(self, channel: protocol.Channel) -> None:
        if self.channel is channel:
            self.channel = None
            log.warning("node proxy disconnected")
        channel.close()


class NodeAgent:
    def __init__(
        self,
        *,
        node: str,
        source: FileConfigSource,
        cni_socket: Path,
        proxy_socket: Path,
        state_dir: Path,
        backend: iptables.IptablesBackend,
        probe_snat: bool = True,
        dns_capture: bool = False,
    ) -> None:
        self.node = node
        self.source = source
        self.cni_socket = cni_socket
        self.proxy_socket = proxy_socket
        self.state_dir = state_dir
        self.backend = backend
        self.probe_snat = probe_snat
        self.dns_capture = dns_capture
        self.pods: dict[str, PodRecord] = {}
        self.proxy = ProxyLink()
        self.ready = asyncio.Event()
        self._lock = asyncio.Lock()
        self._proxy_listening = asyncio.Event()
        self._cni_listening = asyncio.Event()

    @property
    def config(self) -> ClusterConfig:
        return self.source.current or ClusterConfig.empty()

    # ---- state file ------------------------------------------------------------------------
    @property
    def state_file(self) -> Path:
        return self.state_dir / "pods.json"

    def _save(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({uid: p.to_json() for uid, p in sorted(self.pods.items())}, indent=1))
        os.replace(tmp, self.state_file)

    def _load(self) -> dict[str, PodRecord]:
        try:
            raw = json.loads(self.state_file.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            log.error("state file %s unreadable (%s); starting from no pods", self.state_file, e)
            return {}
        out = {}
        for uid, d in raw.items() if isinstance(raw, dict) else ():
            try:
                out[uid] = PodRecord.from_json(d)
            except TypeError as e:
                log.error("state file entry %s ignored: %s", uid, e)
        return out

    # ---- rules in a pod --------------------------------------------------------------------
    async def _apply_rules(self, fd: int) -> None:
        await asyncio.to_thread(
            iptables.run_in_netns, fd, iptables.apply_inpod, self.backend, dns_capture=self.dns_capture
        )

    async def _remove_rules(self, fd: int) -> None:
        await asyncio.to_thread(iptables.run_in_netns, fd, iptables.remove_inpod, self.backend)

    async def _update_probe_snat(self) -> None:
        if not self.probe_snat:
            return
        ips = [ip for p in self.pods.values() if p.enrolled for ip in p.ips]
        try:
            await asyncio.to_thread(iptables.apply_probe_snat, self.backend, ips)
        except iptables.RedirectError as e:
            log.error("probe SNAT update failed: %s", e)

    def _workload_info(self, pod: PodRecord, w: Workload | None) -> dict[str, Any]:
        info: dict[str, Any] = {
            "uid": pod.uid,
            "name": pod.name,
            "namespace": pod.namespace,
            "podUid": pod.pod_uid,
            "ips": pod.ips or list(w.ips if w else ()),
            "node": self.node,
            "containerId": pod.container_id,
            "netns": pod.netns,
        }
        if w is not None:
            info.update(serviceAccount=w.service_account, identity=w.identity, trustDomain=w.trust_domain)
        return info

    def _should_enroll(self, pod: PodRecord) -> Workload | None:
        w = self.config.workload(pod.namespace, pod.name)
        return w if w is not None and w.enrolled and not w.host_network else None

    async def _enroll(self, pod: PodRecord, w: Workload) -> None:
        """Rules, then the proxy's ack; on any failure nothing of ours stays in the pod."""
        if not self.proxy.connected:
            raise AgentError(f"pod {pod.ref} is in the mesh but the node proxy is not connected; retry later")
        fd = pod.netns_fd if pod.netns_fd >= 0 else self._open(pod)
        try:
            await self._apply_rules(fd)
            await self.proxy.call(
                protocol.AddWorkload(
                    id=self.proxy.next_id(), uid=pod.uid, workload=self._workload_info(pod, w), netns_fd=fd
                )
            )
        except (AgentError, iptables.RedirectError, NetnsError) as e:
            with contextlib.suppress(iptables.RedirectError, NetnsError):
                await self._remove_rules(fd)
            os.close(fd)
            pod.netns_fd = -1
            pod.enrolled = False
            if isinstance(e, AgentError):
                raise
            raise AgentError(f"enrolling pod {pod.ref} failed: {e}", status=500, code=100) from e
        pod.netns_fd = fd
        pod.enrolled = True
        log.info("pod enrolled", extra={"pod": pod.ref, "uid": pod.uid, "netns": pod.netns})

    async def _unenroll(self, pod: PodRecord) -> None:
        """Tell the proxy (best effort: a reconnecting proxy drops it anyway) and remove every rule."""
        if self.proxy.connected:
            try:
                await self.proxy.call(protocol.DelWorkload(id=self.proxy.next_id(), uid=pod.uid))
            except AgentError as e:
                log.warning("proxy del of %s: %s", pod.ref, e)
        if pod.netns_fd >= 0:
            try:
                await self._remove_rules(pod.netns_fd)
            except (iptables.RedirectError, NetnsError) as e:
                log.error("removing rules of %s: %s", pod.ref, e)
            os.close(pod.netns_fd)
        pod.netns_fd = -1
        if pod.enrolled:
            log.info("pod removed from the mesh", extra={"pod": pod.ref, "uid": pod.uid})
        pod.enrolled = False

    @staticmethod
    def _open(pod: PodRecord) -> int:
        fd = open_netns(pod.netns)
        if pod.netns_inode and os.fstat(fd).st_ino != pod.netns_inode:
            os.close(fd)
            raise NetnsError(f"{pod.netns} is now a different network namespace")
        return fd

    # ---- CNI events ------------------------------------------------------------------------
    async def cni_add(self, body: Mapping[str, Any]) -> dict[str, Any]:
        name, namespace, netns = (str(body.get(k) or "") for k in ("podName", "podNamespace", "netns"))
        if not (name and namespace and netns):
            raise AgentError("ADD needs podName, podNamespace and netns", status=400, code=4)
        await self.source.reload_if_changed()
        w = self.config.workload(namespace, name)
        if w is None:
            raise AgentError(f"pod {namespace}/{name} is not in the config yet; retry later")
        async with self._lock:
            try:
                fd = open_netns(netns)
            except NetnsError as e:
                raise AgentError(str(e), status=400, code=3) from e
            inode = os.fstat(fd).st_ino
            os.close(fd)
            old = self.pods.get(w.uid)
            if old is not None and (old.netns_inode != inode or old.container_id != body.get("containerId")):
                await self._unenroll(old)  # a new sandbox for the same pod
            ips = [str(ip) for ip in body.get("ips") or [] if isinstance(ip, str)]
            pod = PodRecord(
                uid=w.uid,
                name=name,
                namespace=namespace,
                container_id=str(body.get("containerId") or ""),
                netns=netns,
                netns_inode=inode,
                ifname=str(body.get("ifname") or "eth0"),
                pod_uid=str(body.get("podUid") or ""),
                ips=ips,
            )
            if old is not None and old.netns_inode == inode and old.enrolled:
                pod.netns_fd, pod.enrolled = old.netns_fd, True
            self.pods[w.uid] = pod
            try:
                if self._should_enroll(pod) is not None:
                    if pod.enrolled:
                        await self._apply_rules(pod.netns_fd)  # a repeated ADD: make sure, idempotently
                    else:
                        await self._enroll(pod, w)
                elif pod.enrolled:  # the label went away before we saw the config change
                    await self._unenroll(pod)
            finally:
                self._save()
                await self._update_probe_snat()
            return {"enrolled": pod.enrolled, "uid": pod.uid}

    def _find(self, body: Mapping[str, Any]) -> PodRecord | None:
        cid = body.get("containerId")
        for pod in self.pods.values():
            if cid and pod.container_id == cid:
                return pod
        name, namespace = body.get("podName"), body.get("podNamespace")
        for pod in self.pods.values():
            if pod.name == name and pod.namespace == namespace and not cid:
                return pod
        return None

    async def cni_del(self, body: Mapping[str, Any]) -> dict[str, Any]:
        async with self._lock:
            pod = self._find(body)
            if pod is None:
                return {"removed": False}
            await self._unenroll(pod)
            self.pods.pop(pod.uid, None)
            self._save()
            await self._update_probe_snat()
            return {"removed": True}

    async def cni_check(self, body: Mapping[str, Any]) -> dict[str, Any]:
        async with self._lock:
            pod = self._find(body)
            w = self.config.workload(str(body.get("podNamespace")), str(body.get("podName")))
            should = w is not None and w.enrolled and not w.host_network
            if should and (pod is None or not pod.enrolled):
                raise AgentError(
                    f"pod {body.get('podNamespace')}/{body.get('podName')} should be in the mesh and is not"
                )
            if pod is not None and pod.enrolled:
                current = await asyncio.to_thread(iptables.run_in_netns, pod.netns_fd, iptables.ours, self.backend)
                if "ZTUNNEL-OUTPUT" not in current or "fwmark" not in current:
                    raise AgentError(f"pod {pod.ref}: redirection rules are missing", status=500, code=100)
            return {"enrolled": bool(pod and pod.enrolled)}

    async def cni_gc(self, body: Mapping[str, Any]) -> dict[str, Any]:
        valid = {
            str(a.get("containerID"))
            for a in body.get("validAttachments") or []
            if isinstance(a, Mapping) and a.get("containerID")
        }
        removed = []
        async with self._lock:
            for pod in list(self.pods.values()):
                if pod.container_id not in valid:
                    await self._unenroll(pod)
                    self.pods.pop(pod.uid, None)
                    removed.append(pod.ref)
            self._save()
            await self._update_probe_snat()
        return {"removed": removed}

    def status(self) -> dict[str, Any]:
        return {
            "ready": self.ready.is_set(),
            "node": self.node,
            "proxyConnected": self.proxy.connected,
            "pods": {uid: {"pod": p.ref, "enrolled": p.enrolled, "netns": p.netns} for uid, p in self.pods.items()},
            "configGeneration": self.config.generation,
        }

    # ---- config changes --------------------------------------------------------------------
    async def on_config(self, cfg: ClusterConfig) -> None:
        async with self._lock:
            await self._converge()

    async def _converge(self) -> None:
        """Make every known pod's enrollment match the config (labels may have changed)."""
        for pod in list(self.pods.values()):
            w = self._should_enroll(pod)
            if w is not None and not pod.enrolled:
                if not self.proxy.connected:
                    continue  # enrolled when the proxy connects (snapshot)
                try:
                    await self._enroll(pod, w)
                except (AgentError, NetnsError) as e:
                    log.error("enrolling %s after a config change failed: %s", pod.ref, e)
            elif w is None and pod.enrolled:
                await self._unenroll(pod)
        self._save()
        await self._update_probe_snat()

    # ---- startup reconcile -----------------------------------------------------------------
    async def reconcile(self) -> None:
        """After a restart: find the pods again, re-apply rules idempotently, drop the gone ones."""
        async with self._lock:
            for uid, pod in self._load().items():
                try:
                    fd = self._open(pod)
                except (NetnsError, OSError):
                    path = find_netns_by_inode(pod.netns_inode) if pod.netns_inode else None
                    if path is None:
                        log.info("pod %s is gone (no netns); forgetting it", pod.ref)
                        continue
                    pod.netns = path
                    fd = open_netns(path)
                was_enrolled = pod.enrolled
                pod.enrolled = False
                if self._should_enroll(pod) is not None:
                    try:
                        await self._apply_rules(fd)
                        pod.netns_fd, pod.enrolled = fd, True
                    except iptables.RedirectError as e:
                        log.error("re-applying rules in %s failed: %s", pod.ref, e)
                        os.close(fd)
                else:
                    if was_enrolled:
                        with contextlib.suppress(iptables.RedirectError):
                            await self._remove_rules(fd)
                    os.close(fd)
                self.pods[uid] = pod
            self._save()
            await self._update_probe_snat()
        log.info("reconciled", extra={"pods": len(self.pods), "enrolled": sum(p.enrolled for p in self.pods.values())})

    # ---- proxy connections -----------------------------------------------------------------
    async def _on_proxy(self, conn: socket.socket) -> None:
        channel = protocol.Channel(conn)
        try:
            async with asyncio.timeout(HELLO_TIMEOUT):
                hello = await channel.recv()
        except (TimeoutError, protocol.ProtocolError) as e:
            log.warning("proxy connection without hello: %s", e)
            channel.close()
            return
        if not isinstance(hello, protocol.Hello) or hello.version != protocol.PROTOCOL_VERSION:
            log.warning("proxy said %r instead of hello v%d", hello, protocol.PROTOCOL_VERSION)
            channel.close()
            return
        async with self._lock:
            if self.proxy.channel is not None:
                self.proxy.drop(self.proxy.channel)
            self.proxy.channel = channel
            log.info("node proxy connected; sending the snapshot")
            for pod in list(self.pods.values()):
                w = self._should_enroll(pod)
                if w is None:
                    continue
                try:
                    if pod.enrolled:  # rules stay in place either way: fail closed, never around the proxy
                        info = self._workload_info(pod, w)
                        msg = protocol.AddWorkload(
                            id=self.proxy.next_id(), uid=pod.uid, workload=info, netns_fd=pod.netns_fd
                        )
                        await self.proxy.call(msg)
                    else:
                        await self._enroll(pod, w)
                except AgentError as e:
                    log.error("snapshot: pod %s not handed to the proxy: %s", pod.ref, e)
                    if self.proxy.channel is not channel:
                        break  # the proxy went away; it gets the whole snapshot when it is back
            if self.proxy.channel is channel:
                try:
                    await self.proxy.call(protocol.SnapshotSent(id=self.proxy.next_id()))
                except AgentError as e:
                    log.error("snapshot to the proxy failed: %s", e)
            self._save()
            await self._update_probe_snat()

    async def serve_proxy(self) -> None:
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            bind_unix_private(listener, self.proxy_socket)
        except OSError:
            listener.close()
            raise
        listener.listen(8)
        listener.setblocking(False)
        loop = asyncio.get_running_loop()
        self._proxy_listening.set()
        try:
            async with asyncio.TaskGroup() as tg:
                while True:
                    conn, _ = await loop.sock_accept(listener)
                    tg.create_task(self._on_proxy(conn))
        finally:
            listener.close()
            if self.proxy.channel is not None:
                self.proxy.drop(self.proxy.channel)

    # ---- CNI HTTP server -------------------------------------------------------------------
    async def _handle_http(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            status, body = await self._http_request(reader)
        except (asyncio.IncompleteReadError, ValueError, asyncio.LimitOverrunError) as e:
            status, body = 400, {"msg": f"bad request: {e}", "code": 4}
        payload = json.dumps(body).encode()
        reason = {200: "OK", 400: "Bad Request", 404: "Not Found", 500: "Internal Server Error"}.get(status, "Error")
        writer.write(
            f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {len(payload)}\r\n"
            f"Connection: close\r\n\r\n".encode()
            + payload
        )
        with contextlib.suppress(OSError):
            await writer.drain()
        writer.close()

    async def _http_request(self, reader: asyncio.StreamReader) -> tuple[int, dict[str, Any]]:
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        method, path, _ = lines[0].split(" ", 2)
        length = 0
        for line in lines[1:]:
            key, _, value = line.partition(":")
            if key.strip().lower() == "content-length":
                length = int(value.strip())
        if length > MAX_HTTP_BODY:
            return 400, {"msg": "body too large", "code": 4}
        raw = await reader.readexactly(length) if length else b""
        body = json.loads(raw) if raw else {}
        if not isinstance(body, dict):
            return 400, {"msg": "body must be a JSON object", "code": 6}
        routes = {
            ("POST", "/v1/cni/add"): self.cni_add,
            ("POST", "/v1/cni/del"): self.cni_del,
            ("POST", "/v1/cni/check"): self.cni_check,
            ("POST", "/v1/cni/gc"): self.cni_gc,
        }
        if (method, path) == ("GET", "/v1/status"):
            st = self.status()
            return (200 if st["ready"] else 503), st
        handler = routes.get((method, path))
        if handler is None:
            return 404, {"msg": f"no such endpoint {method} {path}"}
        try:
            return 200, await handler(body)
        except AgentError as e:
            log.warning("CNI %s failed: %s", path.rsplit("/", 1)[-1].upper(), e)
            return e.status, {"msg": str(e), "code": e.code, "details": e.details}
        except (iptables.RedirectError, NetnsError, OSError) as e:
            log.error("CNI %s failed: %s", path.rsplit("/", 1)[-1].upper(), e)
            return 500, {"msg": str(e), "code": 100}

    async def serve_cni(self) -> None:
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            bind_unix_private(listener, self.cni_socket)
        except OSError:
            listener.close()
            raise
        server = await asyncio.start_unix_server(self._handle_http, sock=listener)
        self._cni_listening.set()
        async with server:
            await server.serve_forever()

    # ---- lifetime --------------------------------------------------------------------------
    async def run(self) -> None:
        self.source.subscribe(self.on_config)
        await self.reconcile()
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self.serve_proxy())
                tg.create_task(self.serve_cni())
                tg.create_task(self.source.watch())
                await self._proxy_listening.wait()
                await self._cni_listening.wait()
                self.ready.set()
                log.info(
                    "node agent ready",
                    extra={
                        "node": self.node,
                        "cni_socket": str(self.cni_socket),
                        "proxy_socket": str(self.proxy_socket),
                    },
                )
        finally:
            for pod in self.pods.values():  # keep rules (fail closed); just release the fds
                if pod.netns_fd >= 0:
                    os.close(pod.netns_fd)
                    pod.netns_fd = -1
