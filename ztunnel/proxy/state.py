"""The node proxy's shared state: options, the config snapshot, its policy engine, the served workloads
and the open connections. Owned and mutated by `NodeProxy`; read by the inbound and outbound handlers."""

from __future__ import annotations

import asyncio
import collections
import errno
import ipaddress
import socket
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TypeVar

from ztunnel.config.model import ClusterConfig, IPAddress, Workload, canonical_ip, normalize_ip
from ztunnel.policy.engine import PolicyEngine
from ztunnel.proxy.listeners import WorkloadSockets
from ztunnel.proxy.tracking import ConnectionTracker

_K = TypeVar("_K")


@dataclass
class ProxyOptions:
    node: str
    connect_timeout: float = 5.0
    drain_timeout: float = 10.0
    pool_idle_timeout: float = 60.0
    # How often open connections' bytes are added to istio_tcp_*_bytes_total, so long-lived connections
    # show traffic before they close.
    byte_flush_interval: float = 5.0


@dataclass(eq=False)
class ServedWorkload:
    workload: Workload
    sockets: WorkloadSockets
    servers: list[asyncio.AbstractServer] = field(default_factory=list)  # HBONE listeners and plain servers
    added_at: float = field(default_factory=time.time)
    # Where its listeners are bound, read once: (canonical ip, port); the ip may be 0.0.0.0 or ::.
    listen_addresses: frozenset[tuple[IPAddress, int]] = field(init=False)

    def __post_init__(self) -> None:
        self.listen_addresses = frozenset(_bound_address(s) for s in self.sockets.all())


def _bound_address(sock: socket.socket) -> tuple[IPAddress, int]:
    name = sock.getsockname()
    return (canonical_ip(name[0], unspecified=True), int(name[1]))


def _unspecified_to_loopback(ip: IPAddress) -> IPAddress:
    """Where a connect() to 0.0.0.0 or :: lands (Linux): the loopback address of that family."""
    if not ip.is_unspecified:
        return ip
    return _LOOPBACK_V4 if ip.version == 4 else _LOOPBACK_V6


_LOOPBACK_V4 = ipaddress.IPv4Address("127.0.0.1")
_LOOPBACK_V6 = ipaddress.IPv6Address("::1")


def is_local_address(ip: IPAddress) -> bool:
    """Whether `ip` is an address of this network namespace: the kernel lets a socket bind only to those."""
    family = socket.AF_INET if ip.version == 4 else socket.AF_INET6
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.bind((str(ip), 0))
    except OSError as e:
        return e.errno != errno.EADDRNOTAVAIL  # another failure: cannot tell, so count it as ours (refuse)
    return True


class OwnListeners:
    """Every address the proxy listens on, as counted sets, so "is ip:port one of ours?" costs O(1).

    - `ports`: every port any listener of ours is bound to (the common case, "not a port of ours", is one
      lookup, however many pods the node serves);
    - `exact`: (ip, port) of specific binds, and of a served pod's wildcard binds on each of its IPs;
    - `wildcard`: ports bound on 0.0.0.0 or :: by anyone: those accept on loopback (the pod's, in its netns);
    - `host_wildcard`: ports bound on 0.0.0.0 or :: in the proxy's own netns (the admin, metrics and
      readiness servers): those accept on every address of this host, which the kernel is asked about.
    """

    def __init__(self) -> None:
        self.ports: collections.Counter[int] = collections.Counter()
        self.exact: collections.Counter[tuple[IPAddress, int]] = collections.Counter()
        self.wildcard: collections.Counter[int] = collections.Counter()
        self.host_wildcard: collections.Counter[int] = collections.Counter()

    def update(self, addresses: Iterable[tuple[IPAddress, int]], pod_ips: Iterable[IPAddress] | None, n: int) -> None:
        """Count `addresses` in (n=1) or out (n=-1). `pod_ips`: the served pod whose netns they are bound in, or
        None for the proxy's own netns."""
        pods = list(pod_ips) if pod_ips is not None else None
        for ip, port in addresses:
            _count(self.ports, port, n)
            if not ip.is_unspecified:
                _count(self.exact, (ip, port), n)
                continue
            _count(self.wildcard, port, n)
            if pods is None:
                _count(self.host_wildcard, port, n)
            for pod_ip in pods or ():
                _count(self.exact, (pod_ip, port), n)

    def __contains__(self, address: tuple[IPAddress, int]) -> bool:
        ip, port = address
        if port not in self.ports:
            return False  # the common case, decided on the port alone (once per new connection)
        ip = _unspecified_to_loopback(ip)
        if (ip, port) in self.exact:
            return True
        if port in self.wildcard and ip.is_loopback:
            return True
        return port in self.host_wildcard and is_local_address(ip)


def _count(counter: collections.Counter[_K], key: _K, n: int) -> None:
    """Add n to key's count; a key no listener uses any more is dropped (the guard tests membership)."""
    counter[key] += n
    if counter[key] <= 0:
        del counter[key]


@dataclass(eq=False)
class ProxyState:
    options: ProxyOptions
    config: ClusterConfig = field(default_factory=ClusterConfig.empty)
    policy: PolicyEngine = field(default_factory=lambda: PolicyEngine.from_config(ClusterConfig.empty()))
    workloads: dict[str, ServedWorkload] = field(default_factory=dict)
    served_by_ip: dict[str, str] = field(default_factory=dict)  # pod IP (canonical text) -> uid served here
    tracker: ConnectionTracker = field(default_factory=ConnectionTracker)
    config_loaded: bool = False
    draining: bool = False
    # Every socket the proxy listens on (served pods' listeners, admin, metrics, readiness): an outbound
    # connection to any of them would loop back into the proxy, or reach its operator ports from a pod.
    listeners: OwnListeners = field(default_factory=OwnListeners)

    @property
    def listener_ports(self) -> collections.Counter[int]:
        return self.listeners.ports

    def add_served(self, served: ServedWorkload) -> None:
        self.workloads[served.workload.uid] = served
        for ip in served.workload.ips:
            self.served_by_ip[normalize_ip(ip)] = served.workload.uid
        self.listeners.update(served.listen_addresses, _pod_ips(served.workload), 1)

    def remove_served(self, uid: str) -> ServedWorkload | None:
        served = self.workloads.pop(uid, None)
        if served is None:
            return None
        for ip in [ip for ip, owner in self.served_by_ip.items() if owner == uid]:
            del self.served_by_ip[ip]
        self.listeners.update(served.listen_addresses, _pod_ips(served.workload), -1)
        return served

    def add_own_listener(self, host: str, port: int) -> None:
        """A socket of the proxy's own netns (admin, metrics, readiness), named as its flag names it.

        `host` may be a name (`localhost`): it is resolved the way the server bound it."""
        self.listeners.update(_resolve_bind(host, port), None, 1)

    def is_proxy_address(self, ip: IPAddress | str, port: int) -> bool:
        """Whether ip:port is one of this proxy's own listeners: connecting there would loop back into it.

        Decided by the sockets the proxy really has, whatever ports the flags chose: a listener bound to
        that address, a served pod's wildcard listener on that pod's IPs or loopback, or a wildcard
        listener of the proxy's own netns on any address of this host. `ip` should be canonical already
        (`canonical_ip`); text is made canonical here, and what has no canonical form counts as ours.
        """
        if port not in self.listeners.ports:
            return False
        if isinstance(ip, str):
            try:
                ip = canonical_ip(ip, unspecified=True)
            except ValueError:
                return True  # fail closed: an address we cannot place may be ours
        return (ip, port) in self.listeners


def _pod_ips(workload: Workload) -> list[IPAddress]:
    out = []
    for ip in workload.ips:
        try:
            out.append(canonical_ip(ip))
        except ValueError:
            continue
    return out


def _resolve_bind(host: str, port: int) -> list[tuple[IPAddress, int]]:
    """The addresses a server listening on host:port is bound to (as asyncio resolves a host name)."""
    try:
        return [(canonical_ip(host, unspecified=True), port)]
    except ValueError:
        pass
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    return [(canonical_ip(str(info[4][0]).split("%", 1)[0], unspecified=True), port) for info in infos]
