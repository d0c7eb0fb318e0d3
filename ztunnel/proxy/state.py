"""The node proxy's shared state: options, the config snapshot, its policy engine, the served workloads
and the open connections. Owned and mutated by `NodeProxy`; read by the inbound and outbound handlers."""

from __future__ import annotations

import asyncio
import collections
import ipaddress
import socket
import time
from dataclasses import dataclass, field

from ztunnel.config.model import ClusterConfig, Workload, normalize_ip
from ztunnel.policy.engine import PolicyEngine
from ztunnel.proxy.listeners import WorkloadSockets
from ztunnel.proxy.routing import PROXY_PORTS
from ztunnel.proxy.tracking import ConnectionTracker


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
    servers: list[asyncio.Server] = field(default_factory=list)
    added_at: float = field(default_factory=time.time)
    # Where its listeners are bound, read once: (normalized ip, port); the ip may be 0.0.0.0 or ::.
    listen_addresses: frozenset[tuple[str, int]] = field(init=False)

    def __post_init__(self) -> None:
        self.listen_addresses = frozenset(_bound_address(s) for s in self.sockets.all())


def _bound_address(sock: socket.socket) -> tuple[str, int]:
    name = sock.getsockname()
    return (normalize_ip(name[0]), int(name[1]))


@dataclass(eq=False)
class ProxyState:
    options: ProxyOptions
    config: ClusterConfig = field(default_factory=ClusterConfig.empty)
    policy: PolicyEngine = field(default_factory=lambda: PolicyEngine.from_config(ClusterConfig.empty()))
    workloads: dict[str, ServedWorkload] = field(default_factory=dict)
    served_by_ip: dict[str, str] = field(default_factory=dict)  # pod IP -> uid of a workload served here
    tracker: ConnectionTracker = field(default_factory=ConnectionTracker)
    config_loaded: bool = False
    draining: bool = False
    # Ports any served workload's listeners are bound to, with how many bind each: the loop guard's
    # common case ("not a port of ours") is then one lookup, however many pods the node serves.
    listener_ports: collections.Counter[int] = field(default_factory=collections.Counter)

    def add_served(self, served: ServedWorkload) -> None:
        self.workloads[served.workload.uid] = served
        for ip in served.workload.ips:
            self.served_by_ip[normalize_ip(ip)] = served.workload.uid
        self.listener_ports.update(port for _, port in served.listen_addresses)

    def remove_served(self, uid: str) -> ServedWorkload | None:
        served = self.workloads.pop(uid, None)
        if served is None:
            return None
        for ip in [ip for ip, owner in self.served_by_ip.items() if owner == uid]:
            del self.served_by_ip[ip]
        self.listener_ports.subtract(port for _, port in served.listen_addresses)
        self.listener_ports += collections.Counter()  # drop the ports no listener uses any more
        return served

    def is_proxy_address(self, ip: str, port: int) -> bool:
        """Whether ip:port is one of this proxy's own listeners: connecting there would loop back into it.

        That is a proxy port (15001, 15006, 15008, 15080, 15000, 15020, 15021) on a loopback, unspecified
        or served pod address, or any address a served workload's listener is bound to (a wildcard bind
        matches loopback and that pod's own IPs).
        """
        if port not in PROXY_PORTS and port not in self.listener_ports:
            return False  # the common case, decided without parsing the address (once per new connection)
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return False
        ip = str(addr)
        on_this_host = addr.is_loopback or addr.is_unspecified
        if port in PROXY_PORTS and (on_this_host or ip in self.served_by_ip):
            return True
        for served in self.workloads.values():
            for bound_ip, bound_port in served.listen_addresses:
                if bound_port != port:
                    continue
                if bound_ip == ip:
                    return True
                if ipaddress.ip_address(bound_ip).is_unspecified and (on_this_host or ip in served.workload.ips):
                    return True
        return False
