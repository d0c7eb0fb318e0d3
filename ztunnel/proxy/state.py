"""The node proxy's shared state: options, the config snapshot, its policy engine, the served workloads
and the open connections. Owned and mutated by `NodeProxy`; read by the inbound and outbound handlers."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from ztunnel.config.model import ClusterConfig, Workload
from ztunnel.policy.engine import PolicyEngine
from ztunnel.proxy.listeners import WorkloadSockets
from ztunnel.proxy.tracking import ConnectionTracker


@dataclass
class ProxyOptions:
    node: str
    connect_timeout: float = 5.0
    drain_timeout: float = 10.0
    pool_idle_timeout: float = 60.0


@dataclass(eq=False)
class ServedWorkload:
    workload: Workload
    sockets: WorkloadSockets
    servers: list[asyncio.Server] = field(default_factory=list)
    added_at: float = field(default_factory=time.time)


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
