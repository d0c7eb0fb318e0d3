"""What the node agent needs of a redirection mode, and the iptables mode behind it.

The agent enrolls a pod by `apply` (idempotent: a repeated ADD or an agent restart calls it again), removes it
by `remove`, asks `missing` for CNI CHECK, tells the node about the enrolled pods' addresses with `node_pods`
(probe SNAT), and hands `proxy_info` to the proxy with each pod. Every method runs in a worker thread and
raises RedirectError; `eBPF` mode is `ebpf.EbpfRedirector`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from ztunnel.redirect import iptables
from ztunnel.redirect.pods import PodRecord


class Redirector(Protocol):
    name: str

    def apply(self, pod: PodRecord, netns_fd: int) -> None: ...

    def remove(self, pod: PodRecord, netns_fd: int | None) -> None: ...

    def missing(self, pod: PodRecord, netns_fd: int) -> str: ...

    def node_pods(self, ips: Sequence[str]) -> None: ...

    def proxy_info(self) -> dict[str, Any]: ...

    def prune(self, live_netns_fds: Sequence[int]) -> None: ...

    def close(self) -> None: ...


class IptablesRedirector:
    """DESIGN §4.6: rules in the pod netns (nat REDIRECT, mangle connmark, policy routing)."""

    name = "iptables"

    def __init__(self, backend: iptables.IptablesBackend, *, dns_capture: bool = False, probe_snat: bool = True):
        self.backend = backend
        self.dns_capture = dns_capture
        self.probe_snat = probe_snat
        self.proxy_cgroup: str | None = None  # the connected proxy's, set by the agent (None: keep the pod's)

    def apply(self, pod: PodRecord, netns_fd: int) -> None:
        iptables.run_in_netns(
            netns_fd, iptables.apply_inpod, self.backend, dns_capture=self.dns_capture, proxy_cgroup=self.proxy_cgroup
        )

    def remove(self, pod: PodRecord, netns_fd: int | None) -> None:
        if netns_fd is not None:
            iptables.run_in_netns(netns_fd, iptables.remove_inpod, self.backend)

    def missing(self, pod: PodRecord, netns_fd: int) -> str:
        current = iptables.run_in_netns(netns_fd, iptables.ours, self.backend)
        return "" if "ZTUNNEL-OUTPUT" in current and "fwmark" in current else "redirection rules are missing"

    def node_pods(self, ips: Sequence[str]) -> None:
        if self.probe_snat:
            iptables.apply_probe_snat(self.backend, ips)

    def proxy_info(self) -> dict[str, Any]:
        return {}

    def prune(self, live_netns_fds: Sequence[int]) -> None:
        return None  # rules live in the pods' netns: a gone pod takes its rules with it

    def close(self) -> None:
        return None
