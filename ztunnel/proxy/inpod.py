"""The proxy side of in-pod mode: get pods' netns from the node agent, listen inside them.

The node agent hands over each enrolled pod's network namespace (DESIGN §4.7). For each pod we
create the 15001/15006/15008 listeners *inside* its netns (setns on this thread and straight back;
`SO_MARK` 0x539 so the pod's rules let our traffic through, `SO_REUSEPORT` so a restarted proxy can
bind next to a draining one), and an `InpodConnector` that opens upstream connections from inside
the pod netns, from the client's original address (`IP_TRANSPARENT`), so the app sees the real
client IP. The proxy serves those sockets through `InpodTarget.add_workload`/`remove_workload`.

With eBPF redirection (the agent's add says `redirect: ebpf` and where the node's maps are pinned) there is
no conntrack: the pod's 15006 listeners go into the node's `listeners` sockhash, where the pod netns'
sk_lookup program finds them, 15001 connections find their original destination in the `orig_dst` map,
and the connector marks its sockets 0x111 (the pod's policy routing sends the app's replies to a
transparent source back to us). See ztunnel/inpod/ebpf.py and bpf/README.md.

If the agent goes away we keep serving what we have and reconnect; the agent then replays its
snapshot, and after `snapshot-sent` we drop every pod it did not mention.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import socket
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from ztunnel.config.model import DEFAULT_TRUST_DOMAIN, Workload
from ztunnel.inpod import ebpf, protocol
from ztunnel.inpod.channel import Channel
from ztunnel.inpod.session import ProxySession
from ztunnel.net.listen import IP_TRANSPARENT, listen_on
from ztunnel.net.netns import current_netns_fd, in_netns
from ztunnel.net.streams import TcpStream
from ztunnel.ports import CONNMARK, HBONE_PORT, OUTBOUND_PORT, PLAINTEXT_INBOUND_PORT, PROXY_MARK
from ztunnel.proxy.listeners import WorkloadSockets, dns_sockets

log = logging.getLogger("ztunnel.proxy.inpod")

IPV6_TRANSPARENT = 75  # linux/in6.h
RECONNECT_MIN = 0.05
RECONNECT_MAX = 2.0


class InpodTarget(Protocol):
    """What the node proxy offers in-pod mode (the proxy takes ownership of the sockets)."""

    async def add_workload(self, workload: Workload, sockets: WorkloadSockets) -> None: ...

    async def remove_workload(self, uid: str) -> None: ...


def _mark(sock: socket.socket, mark: int = PROXY_MARK) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)


def pod_listener(netns_fd: int, family: int, port: int) -> socket.socket:
    """A listening socket on 0.0.0.0:port or [::]:port inside the pod's netns."""
    with in_netns(netns_fd):
        sock = socket.socket(family, socket.SOCK_STREAM)
    v6 = family == socket.AF_INET6
    return listen_on(sock, "::" if v6 else "0.0.0.0", port, reuse_port=True, v6only=v6, mark=PROXY_MARK)


@dataclass
class InpodConnector:
    """Upstream connections made from inside the pod netns, marked so the pod's rules skip them."""

    netns_fd: int
    home_fd: int | None = None  # the proxy's own netns, held open by the InpodClient (None: looked up per call)
    # eBPF mode: CONNMARK on connections to the app from a client's address: the pod's policy routing sends
    # the app's replies back to us by it (module docstring); others (passthrough out of the pod) keep 0x539
    deliver_mark: int = PROXY_MARK
    tag: Callable[[socket.socket], None] | None = None  # eBPF mode: how the programs know our sockets

    def make_socket(self, address: tuple[str, int], source: tuple[str, int] | None) -> socket.socket:
        family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        with in_netns(self.netns_fd, self.home_fd):
            sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            _mark(sock, self.deliver_mark if source is not None and source[0] else PROXY_MARK)
            if self.tag is not None:
                self.tag(sock)
            if source is not None and source[0]:
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, IPV6_TRANSPARENT, 1)
                else:
                    sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
                sock.bind((source[0], 0))  # the client's address, any port: the app sees the real peer
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        return sock

    async def connect(self, address: tuple[str, int], *, source: tuple[str, int] | None = None) -> TcpStream:
        sock = self.make_socket(address, source)
        try:
            await asyncio.get_running_loop().sock_connect(sock, address)
        except BaseException:
            sock.close()
            raise
        return await TcpStream.connect(address[0], address[1], sock=sock)


def pod_sockets(
    netns_fd: int,
    *,
    ipv6: bool = True,
    ports: tuple[int, int, int] = (OUTBOUND_PORT, PLAINTEXT_INBOUND_PORT, HBONE_PORT),
    home_fd: int | None = None,
    dns_port: int | None = None,
) -> WorkloadSockets:
    """All listeners of one pod (v4, and v6 when the pod has IPv6), plus its connector; with `dns_port`,
    the DNS server's UDP and TCP sockets on it (the pod's nat OUTPUT sends port 53 there, DESIGN §4.6)."""
    outbound_port, plaintext_port, hbone_port = ports
    out = WorkloadSockets(connector=InpodConnector(netns_fd, home_fd))
    families = [socket.AF_INET, socket.AF_INET6] if ipv6 else [socket.AF_INET]
    try:
        for family in families:
            try:
                out.outbound.append(pod_listener(netns_fd, family, outbound_port))
            except OSError as e:
                if family == socket.AF_INET6:  # IPv6 disabled in the pod: v4 only
                    log.debug("no IPv6 listeners in pod netns: %s", e)
                    break
                raise
            out.plaintext.append(pod_listener(netns_fd, family, plaintext_port))
            out.hbone.append(pod_listener(netns_fd, family, hbone_port))
            if dns_port is not None:
                v6 = family == socket.AF_INET6

                def make(fam: int, kind: int) -> socket.socket:
                    with in_netns(netns_fd, home_fd):
                        return socket.socket(fam, kind)

                # Loopback, where nat OUTPUT's REDIRECT delivers: a wildcard UDP socket would answer from the
                # pod's address, which conntrack does not map back to the resolver the app asked.
                host = "::1" if v6 else "127.0.0.1"
                out.dns.append(dns_sockets(host, dns_port, make=make, reuse_port=True, v6only=v6, mark=PROXY_MARK))
    except BaseException:
        out.close()
        raise
    return out


def workload_from_info(uid: str, info: Mapping[str, Any], known: Workload | None = None) -> Workload:
    """The agent's workload info -> the config model's Workload.

    The proxy's own config entry wins (labels, service account, trust domain); the pod IPs from CNI
    fill in when the config does not list them yet.
    """
    ips = tuple(str(ip) for ip in info.get("ips") or () if isinstance(ip, str))
    if known is not None:
        return known if known.ips or not ips else dataclasses.replace(known, ips=ips)
    return Workload(
        uid=uid,
        name=str(info.get("name") or ""),
        namespace=str(info.get("namespace") or ""),
        node=str(info.get("node") or ""),
        service_account=str(info.get("serviceAccount") or "default"),
        ips=ips,
        labels={},
        enrolled=True,
        trust_domain=str(info.get("trustDomain") or DEFAULT_TRUST_DOMAIN),
    )


@dataclass
class _Pod:
    workload: Workload
    netns_fd: int


@dataclass
class InpodClient:
    """Connects to the node agent and keeps the proxy's set of in-pod workloads in step with it."""

    socket_path: str
    target: InpodTarget
    ports: tuple[int, int, int] = (OUTBOUND_PORT, PLAINTEXT_INBOUND_PORT, HBONE_PORT)
    resolve: Callable[[str], Workload | None] | None = None  # uid -> the proxy's config entry, if any
    pods: dict[str, _Pod] = field(default_factory=dict)
    synced: asyncio.Event = field(default_factory=asyncio.Event)
    connected: bool = False
    failed: dict[str, str] = field(default_factory=dict)  # uid -> why the last add was nacked
    home_fd: int | None = None  # this thread's own netns, opened at the first pod, closed in close()
    dns_port: int | None = None  # `--dns`: serve DNS in each pod on this port (UDP and TCP)
    bpf_maps: dict[str, ebpf.PinnedMaps] = field(default_factory=dict)  # eBPF mode: pin dir -> open maps

    def not_ready(self, served: Collection[str]) -> str:
        """Why readiness must wait for in-pod mode ("" when it need not): the agent's snapshot, and every
        pod it added served (listeners up, certificate fetched: `served` holds the proxy's served uids)."""
        if not self.synced.is_set():
            return "waiting for the node agent's snapshot"
        if self.failed:
            return "; ".join(f"pod {uid} not served: {error}" for uid, error in sorted(self.failed.items()))
        missing = sorted(p.workload.ref for uid, p in self.pods.items() if uid not in served)
        return f"no listeners/certificates yet for {', '.join(missing)}" if missing else ""

    async def run(self) -> None:
        """Connect, serve, reconnect with backoff; until cancelled. Pods are kept across reconnects."""
        delay = RECONNECT_MIN
        try:
            while True:
                try:
                    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
                    sock.setblocking(False)
                    try:
                        await asyncio.get_running_loop().sock_connect(sock, self.socket_path)
                    except BaseException:
                        sock.close()
                        raise
                except OSError as e:
                    log.debug("node agent not reachable at %s: %s", self.socket_path, e)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, RECONNECT_MAX)
                    continue
                delay = RECONNECT_MIN
                await self.serve(Channel(sock))
        finally:
            await self.close()

    async def serve(self, channel: Channel) -> None:
        """One agent connection: hello, then handle messages until EOF."""
        session = ProxySession()
        self.connected = True
        log.info("connected to the node agent", extra={"socket": self.socket_path})
        try:
            await channel.send(session.hello())
            while True:
                try:
                    msg = await channel.recv()
                except protocol.ProtocolError as e:
                    log.error("bad message from the node agent: %s", e)
                    continue
                if msg is None:
                    log.warning("node agent disconnected; keeping %d pods and reconnecting", len(self.pods))
                    return
                ack = await self.handle(msg, session)
                if ack is not None:
                    await channel.send(ack)
        except OSError as e:
            log.warning("node agent connection failed: %s", e)
        finally:
            self.connected = False
            channel.close()

    async def handle(self, msg: protocol.Message, session: ProxySession) -> protocol.Ack | None:
        if isinstance(msg, protocol.AddWorkload):
            session.added(msg)
            return await self._add(msg)
        if isinstance(msg, protocol.KeepWorkload):
            return session.keep(msg, self.pods)
        if isinstance(msg, protocol.DelWorkload):
            session.deleted(msg)
            self.failed.pop(msg.uid, None)
            await self._remove(msg.uid)
            return protocol.Ack(id=msg.id)
        if isinstance(msg, protocol.SnapshotSent):
            for uid in session.snapshot_sent(list(self.pods)):
                log.info("pod not in the agent's snapshot; dropping it", extra={"uid": uid})
                await self._remove(uid)
            for uid in session.snapshot_sent(list(self.failed)):
                del self.failed[uid]
            self.synced.set()
            return protocol.Ack(id=msg.id)
        log.warning("unexpected message from the node agent: %r", msg)
        return None

    async def _add(self, msg: protocol.AddWorkload) -> protocol.Ack:
        held = self.pods.get(msg.uid)
        if held is not None:
            if os.fstat(held.netns_fd).st_ino == os.fstat(msg.netns_fd).st_ino:
                os.close(msg.netns_fd)  # a replayed snapshot: we already serve this very netns
                return protocol.Ack(id=msg.id)
            await self._remove(msg.uid)  # a new sandbox for the same pod: the old listeners are dead
        workload = workload_from_info(msg.uid, msg.workload, self.resolve(msg.uid) if self.resolve else None)
        if self.home_fd is None:
            self.home_fd = current_netns_fd()
        try:
            sockets = pod_sockets(msg.netns_fd, ports=self.ports, home_fd=self.home_fd, dns_port=self.dns_port)
        except OSError as e:
            os.close(msg.netns_fd)
            log.error("cannot listen in pod netns", extra={"uid": msg.uid, "error": str(e)})
            self.failed[msg.uid] = f"cannot listen in the pod netns: {e}"
            return protocol.Ack(id=msg.id, ok=False, error=f"cannot listen in the pod netns: {e}")
        if msg.workload.get("redirect") == "ebpf":
            try:
                self._ebpf(msg.workload, workload, sockets)
            except (OSError, ebpf.BpfError) as e:
                sockets.close()
                os.close(msg.netns_fd)
                log.error("cannot use the node's eBPF maps", extra={"uid": msg.uid, "error": str(e)})
                self.failed[msg.uid] = f"eBPF redirection: {e}"
                return protocol.Ack(id=msg.id, ok=False, error=f"eBPF redirection: {e}")
        try:
            await self.target.add_workload(workload, sockets)
        except Exception as e:
            sockets.close()
            os.close(msg.netns_fd)
            log.error("proxy refused in-pod workload", extra={"uid": msg.uid, "error": str(e)})
            self.failed[msg.uid] = str(e) or type(e).__name__
            return protocol.Ack(id=msg.id, ok=False, error=str(e) or type(e).__name__)
        self.pods[msg.uid] = _Pod(workload, msg.netns_fd)
        self.failed.pop(msg.uid, None)
        log.info("serving pod in its netns", extra={"uid": msg.uid, "pod": workload.ref, "ips": list(workload.ips)})
        return protocol.Ack(id=msg.id)

    def _ebpf(self, info: Mapping[str, Any], workload: Workload, sockets: WorkloadSockets) -> None:
        """eBPF mode: listeners into the node's sockhash, original destinations from its map, mark 0x111."""
        pin_dir = str(info.get("bpfPinDir") or "")
        pinned = self.bpf_maps.get(pin_dir)
        if pinned is None:
            pinned = self.bpf_maps[pin_dir] = ebpf.PinnedMaps(pin_dir).open()
        pinned.add_listeners(workload.ips, sockets.plaintext, PLAINTEXT_INBOUND_PORT)
        sockets.outbound_original_dst = pinned.original_destination
        sockets.preserves_destination = True
        for dns in sockets.dns:
            for sock in dns:
                pinned.tag(sock)
        if isinstance(sockets.connector, InpodConnector):
            sockets.connector.deliver_mark = CONNMARK
            sockets.connector.tag = pinned.tag

    async def _remove(self, uid: str) -> None:
        pod = self.pods.pop(uid, None)
        if pod is None:
            return
        try:
            await self.target.remove_workload(uid)
        finally:
            os.close(pod.netns_fd)
        log.info("stopped serving pod", extra={"uid": uid, "pod": pod.workload.ref})

    async def close(self) -> None:
        for uid in list(self.pods):
            with contextlib.suppress(Exception):
                await self._remove(uid)
        if self.home_fd is not None:
            os.close(self.home_fd)
            self.home_fd = None
        for pinned in self.bpf_maps.values():
            pinned.close()
        self.bpf_maps.clear()
