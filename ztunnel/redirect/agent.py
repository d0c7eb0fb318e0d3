"""The node agent: CNI events in, in-pod rules and netns hand-off to the node proxy out.

Lifetimes: `NodeAgent.run()` reconciles from its state file first (re-applying rules to pods that
still run, dropping pods whose netns is gone), then serves the proxy socket, the CNI socket and the
config watch in one task group. Every change of enrollment goes through `_lock`, so CNI events,
config changes and proxy (re)connects never interleave halfway.

What to do is decided by `planner` (pure); this module carries it out: redirection in the pod (a
`redirector.Redirector`: iptables rules, or eBPF programs), the proxy link (`link`), the state file (`pods`),
the CNI endpoint (`cni_server`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ztunnel.config.model import ClusterConfig, Workload
from ztunnel.config.source import ConfigSource
from ztunnel.inpod.channel import Channel
from ztunnel.inpod.protocol import ProtocolError
from ztunnel.inpod.session import AgentSession
from ztunnel.net.netns import NetnsError, find_netns_by_inode, open_netns
from ztunnel.net.unix import bind_unix_private
from ztunnel.redirect import iptables, planner
from ztunnel.redirect.cni_server import cni_server
from ztunnel.redirect.iptables import RedirectError
from ztunnel.redirect.link import AgentError, ProxyLink
from ztunnel.redirect.pods import PodRecord, PodStateFile
from ztunnel.redirect.redirector import IptablesRedirector, Redirector

log = logging.getLogger("ztunnel.redirect.agent")


def peer_cgroup(conn: socket.socket) -> tuple[str, str]:
    """(cgroup v2 path, "") of the process at the other end of CONN (the kernel's word: SO_PEERCRED), or
    ("", why not). iptables mode trusts the proxy's mark only on sockets of that cgroup (DESIGN §4.6)."""
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid = struct.unpack("3i", creds)[0]
    if pid <= 0:
        return "", "the node proxy's pid is not visible here: run the agent in the host's pid namespace (hostPID)"
    return process_cgroup(str(pid))


def process_cgroup(pid: str = "self") -> tuple[str, str]:
    """(cgroup v2 path of process PID as this process's cgroup namespace shows it, "") or ("", why not)."""
    try:
        text = Path(f"/proc/{pid}/cgroup").read_text()
    except OSError as e:
        return "", f"reading the node proxy's /proc/{pid}/cgroup: {e}"
    for line in text.splitlines():
        if line.startswith("0::"):
            path = line[3:].strip()
            if path.startswith("/.."):
                return "", f"the node proxy's cgroup {path} is outside the agent's cgroup namespace"
            return path, ""
    return "", f"/proc/{pid}/cgroup has no cgroup v2 entry: iptables mode needs cgroup v2 to know the proxy's sockets"


HELLO_TIMEOUT = 5.0


class NodeAgent:
    def __init__(
        self,
        *,
        node: str,
        source: ConfigSource,
        cni_socket: Path,
        proxy_socket: Path,
        state_dir: Path,
        backend: iptables.IptablesBackend,
        probe_snat: bool = True,
        dns_capture: bool = False,
        redirector: Redirector | None = None,
    ) -> None:
        self.node = node
        self.source = source
        self.cni_socket = cni_socket
        self.proxy_socket = proxy_socket
        self.state_dir = state_dir
        self.backend = backend
        self.probe_snat = probe_snat
        self.dns_capture = dns_capture
        self.redirector: Redirector = redirector or IptablesRedirector(
            backend, dns_capture=dns_capture, probe_snat=probe_snat
        )
        self.pods: dict[str, PodRecord] = {}
        self.proxy = ProxyLink()
        self.ready = asyncio.Event()
        self._state = PodStateFile(state_dir / "pods.json")
        self._lock = asyncio.Lock()
        self._proxy_listening = asyncio.Event()
        self._cni_listening = asyncio.Event()

    @property
    def config(self) -> ClusterConfig:
        return self.source.current or ClusterConfig.empty()

    @property
    def state_file(self) -> Path:
        return self._state.path

    def _save(self) -> None:
        self._state.save(self.pods)

    # ---- rules in a pod --------------------------------------------------------------------
    async def _apply_rules(self, pod: PodRecord, fd: int) -> None:
        await asyncio.to_thread(self.redirector.apply, pod, fd)

    async def _remove_rules(self, pod: PodRecord, fd: int) -> None:
        await asyncio.to_thread(self.redirector.remove, pod, fd)

    async def _update_probe_snat(self) -> None:
        if not self.probe_snat:
            return
        ips = [ip for p in self.pods.values() if p.enrolled for ip in p.ips]
        try:
            await asyncio.to_thread(self.redirector.node_pods, ips)
        except RedirectError as e:
            log.error("probe SNAT update failed: %s", e)

    async def _persist(self) -> None:
        self._save()
        await self._update_probe_snat()

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
            **self.redirector.proxy_info(),
        }
        if w is not None:
            info.update(serviceAccount=w.service_account, identity=w.identity, trustDomain=w.trust_domain)
        return info

    # ---- carrying out the planner's actions --------------------------------------------------
    async def _execute(self, action: planner.Action) -> None:
        pod = self.pods[action.uid]
        if isinstance(action, planner.Enroll):
            await self._enroll(pod, action.workload)
        elif isinstance(action, planner.HandOver):
            session = self.proxy.session
            await self.proxy.call(session.add(pod.uid, self._workload_info(pod, action.workload), pod.netns_fd))
        elif isinstance(action, planner.ReapplyRules):
            await self._apply_rules(pod, pod.netns_fd)
        elif isinstance(action, planner.Unenroll):
            await self._unenroll(pod)
        elif isinstance(action, planner.Forget):
            await self._unenroll(pod)
            self.pods.pop(pod.uid, None)

    async def _enroll(self, pod: PodRecord, w: Workload) -> None:
        """Rules, then the proxy's ack; on any failure nothing of ours stays in the pod."""
        if not self.proxy.connected:
            raise AgentError(f"pod {pod.ref} is in the mesh but the node proxy is not connected; retry later")
        fd = pod.netns_fd if pod.netns_fd >= 0 else self._open(pod)
        try:
            await self._apply_rules(pod, fd)
            await self.proxy.call(self.proxy.session.add(pod.uid, self._workload_info(pod, w), fd))
        except (AgentError, RedirectError, NetnsError) as e:
            with contextlib.suppress(RedirectError, NetnsError):
                await self._remove_rules(pod, fd)
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
                await self.proxy.call(self.proxy.session.delete(pod.uid))
            except AgentError as e:
                log.warning("proxy del of %s: %s", pod.ref, e)
        if pod.netns_fd >= 0:
            try:
                await self._remove_rules(pod, pod.netns_fd)
            except (RedirectError, NetnsError) as e:
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
            pod = PodRecord(
                uid=w.uid,
                name=name,
                namespace=namespace,
                container_id=str(body.get("containerId") or ""),
                netns=netns,
                netns_inode=inode,
                ifname=str(body.get("ifname") or "eth0"),
                pod_uid=str(body.get("podUid") or ""),
                ips=[str(ip) for ip in body.get("ips") or [] if isinstance(ip, str)],
            )
            old = self.pods.get(w.uid)
            if old is not None and planner.is_new_sandbox(old, pod):
                await self._unenroll(old)
            elif old is not None and old.enrolled:
                pod.netns_fd, pod.enrolled = old.netns_fd, True  # the same sandbox: keep its fd
            self.pods[w.uid] = pod
            try:
                action = planner.plan_add(self.config, pod)
                if action is not None:
                    await self._execute(action)
            finally:
                await self._persist()
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
            await self._execute(planner.Forget(pod.uid))
            await self._persist()
            return {"removed": True}

    async def cni_check(self, body: Mapping[str, Any]) -> dict[str, Any]:
        async with self._lock:
            pod = self._find(body)
            problem = planner.check_enrollment(
                self.config, str(body.get("podNamespace")), str(body.get("podName")), pod
            )
            if problem:
                raise AgentError(problem)
            if pod is not None and pod.enrolled:
                missing = await asyncio.to_thread(self.redirector.missing, pod, pod.netns_fd)
                if missing:
                    raise AgentError(f"pod {pod.ref}: {missing}", status=500, code=100)
            return {"enrolled": bool(pod and pod.enrolled)}

    async def cni_gc(self, body: Mapping[str, Any]) -> dict[str, Any]:
        valid = {
            str(a.get("containerID"))
            for a in body.get("validAttachments") or []
            if isinstance(a, Mapping) and a.get("containerID")
        }
        async with self._lock:
            actions = planner.plan_gc(self.pods.values(), valid)
            removed = [self.pods[a.uid].ref for a in actions]
            for action in actions:
                await self._execute(action)
            await self._persist()
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
        connected = self.proxy.connected
        for action in planner.plan_converge(self.config, list(self.pods.values()), proxy_connected=connected):
            try:
                await self._execute(action)
            except (AgentError, NetnsError) as e:
                log.error("enrolling %s after a config change failed: %s", self.pods[action.uid].ref, e)
        await self._persist()

    # ---- startup reconcile -----------------------------------------------------------------
    async def reconcile(self) -> None:
        """After a restart: find the pods again, re-apply rules idempotently, drop the gone ones."""
        async with self._lock:
            for uid, pod in self._state.load().items():
                try:
                    fd = self._open(pod)
                except (NetnsError, OSError):
                    path = find_netns_by_inode(pod.netns_inode) if pod.netns_inode else None
                    if path is None:
                        log.info("pod %s is gone (no netns); forgetting it", pod.ref)
                        continue
                    pod.netns = path
                    fd = open_netns(path)
                action = planner.plan_restart(self.config, pod)
                pod.enrolled = False
                if isinstance(action, planner.ReapplyRules):
                    try:
                        await self._apply_rules(pod, fd)
                        pod.netns_fd, pod.enrolled = fd, True
                    except RedirectError as e:
                        log.error("re-applying rules in %s failed: %s", pod.ref, e)
                        os.close(fd)
                else:
                    if isinstance(action, planner.Unenroll):
                        with contextlib.suppress(RedirectError):
                            await self._remove_rules(pod, fd)
                    os.close(fd)
                self.pods[uid] = pod
            live = [p.netns_fd for p in self.pods.values() if p.enrolled]
            try:
                await asyncio.to_thread(self.redirector.prune, live)
            except (RedirectError, OSError) as e:
                log.error("pruning redirection state of gone pods: %s", e)
            await self._persist()
        log.info("reconciled", extra={"pods": len(self.pods), "enrolled": sum(p.enrolled for p in self.pods.values())})

    # ---- proxy connections -----------------------------------------------------------------
    async def _on_proxy(self, conn: socket.socket) -> None:
        channel = Channel(conn)
        try:
            async with asyncio.timeout(HELLO_TIMEOUT):
                hello = await channel.recv()
        except (TimeoutError, OSError, ProtocolError) as e:
            problem = f"no hello: {e or type(e).__name__}"
        else:
            problem = AgentSession.check_hello(hello)
        cgroup = ""
        if not problem and isinstance(self.redirector, IptablesRedirector):
            cgroup, problem = peer_cgroup(conn)
        if problem:
            log.warning("proxy connection refused: %s", problem)
            channel.close()
            return
        async with self._lock:
            if self.proxy.channel is not None:
                self.proxy.drop(self.proxy.channel)
            self.proxy.channel = channel
            log.info("node proxy connected; sending the snapshot", extra={"cgroup": cgroup})
            rewrite = self._use_proxy_cgroup(cgroup)
            for action in planner.plan_snapshot(self.config, list(self.pods.values())):
                try:
                    if rewrite and isinstance(action, planner.HandOver):  # the rules name the proxy's cgroup
                        await self._reapply_for_proxy(self.pods[action.uid])
                    await self._execute(action)
                except AgentError as e:
                    log.error("snapshot: pod %s not handed to the proxy: %s", self.pods[action.uid].ref, e)
                    if self.proxy.channel is not channel:
                        break  # the proxy went away; it gets the whole snapshot when it is back
            if self.proxy.channel is channel:
                try:
                    await self.proxy.call(self.proxy.session.snapshot_sent())
                except AgentError as e:
                    log.error("snapshot to the proxy failed: %s", e)
            await self._persist()

    def _use_proxy_cgroup(self, cgroup: str) -> bool:
        """Iptables mode: the proxy's sockets are known by mark and this cgroup; True if it changed."""
        if not isinstance(self.redirector, IptablesRedirector):
            return False
        own = process_cgroup()[0]
        if cgroup == "/" or own == cgroup or own.startswith(cgroup.rstrip("/") + "/"):
            log.warning(
                "the node proxy's cgroup %s is not its own (the agent is in it too; a cgroup v1 node?): any process"
                " there that sets the proxy's mark skips redirection; give the proxy a cgroup of its own",
                cgroup,
            )
        changed = self.redirector.proxy_cgroup != cgroup
        self.redirector.proxy_cgroup = cgroup
        return changed

    async def _reapply_for_proxy(self, pod: PodRecord) -> None:
        try:
            await self._apply_rules(pod, pod.netns_fd)
        except RedirectError as e:
            raise AgentError(f"re-applying the rules of pod {pod.ref} for the new proxy: {e}", status=500) from e

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

    async def serve_cni(self) -> None:
        server = cni_server(
            self.cni_socket,
            add=self.cni_add,
            delete=self.cni_del,
            check=self.cni_check,
            gc=self.cni_gc,
            status=self.status,
        )
        async with server:
            self._cni_listening.set()
            await asyncio.Event().wait()  # until cancelled; closing the server aborts in-flight requests

    # ---- lifetime --------------------------------------------------------------------------
    async def run(self) -> None:
        if isinstance(self.redirector, IptablesRedirector):
            iptables.enter_host_cgroupns()
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
            self.redirector.close()  # eBPF: our fds only; the pinned links keep the programs attached
