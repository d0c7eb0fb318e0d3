"""Applying the rendered rules: iptables-restore/ip6tables-restore plus pyroute2 ip rules and routes.

Every function here acts on the *calling thread's* network namespace (child processes inherit it),
so callers wrap them with `netns.in_netns(fd)` in a worker thread, or use `run_in_netns`.

Backend: both iptables-nft and iptables-legacy work inside fresh netns on these machines (checked:
kernel 6.18, iptables 1.8.9, mangle CONNMARK, nat REDIRECT and `-m owner --socket-exists` all load).
We prefer nft (Debian's default, what `iptables-save` shows) and fall back to legacy when the nft
binaries are missing or cannot list the nat table; `ZTUNNEL_IPTABLES` = nft|legacy forces one.
Using one backend consistently matters: rules in both would both apply.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

from ztunnel.errors import ZtunnelError
from ztunnel.net.netns import NetnsError, in_netns, setns
from ztunnel.ports import CONNMARK, MARK_MASK, ROUTE_TABLE
from ztunnel.redirect import rules

log = logging.getLogger("ztunnel.redirect")

T = TypeVar("T")
RTN_LOCAL = 2


class RedirectError(ZtunnelError):
    """Rules could not be installed or removed."""


@dataclass(frozen=True, slots=True)
class IptablesBackend:
    name: str  # "nft" or "legacy"

    def tool(self, version: int, what: str) -> str:
        """what: "save" or "restore" -> e.g. ip6tables-nft-restore."""
        base = "iptables" if version == 4 else "ip6tables"
        return f"{base}-{self.name}-{what}" if self.name != "legacy" else f"{base}-legacy-{what}"


def detect_backend(preferred: str | None = None) -> IptablesBackend:
    """Pick a working iptables backend (see the module docstring)."""
    choice = preferred or os.environ.get("ZTUNNEL_IPTABLES") or ""
    if choice in ("nft", "legacy"):
        return IptablesBackend(choice)
    for name in ("nft", "legacy"):
        backend = IptablesBackend(name)
        if not all(shutil.which(backend.tool(v, w)) for v in (4, 6) for w in ("save", "restore")):
            continue
        probe = subprocess.run([backend.tool(4, "save"), "-t", "nat"], capture_output=True, timeout=10)
        if probe.returncode == 0:
            return backend
    raise RedirectError("no working iptables found: install the iptables package (iptables-nft or iptables-legacy)")


def run_in_netns(netns_fd: int, fn: Callable[..., T], *args: object, **kwargs: object) -> T:
    """Call fn inside netns_fd on this thread (use from a worker thread)."""
    with in_netns(netns_fd):
        return fn(*args, **kwargs)


def _run(cmd: list[str], stdin: str | None = None) -> str:
    try:
        proc = subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise RedirectError(f"{cmd[0]} failed to run: {e}") from e
    if proc.returncode != 0:
        detail = proc.stderr.strip() or proc.stdout.strip()
        raise RedirectError(f"{' '.join(cmd)} exited {proc.returncode}: {detail}\ninput was:\n{stdin or ''}")
    return proc.stdout


def iptables_save(backend: IptablesBackend, version: int) -> str:
    return _run([backend.tool(version, "save")])


def _restore(backend: IptablesBackend, version: int, text: str) -> None:
    if text:
        _run([backend.tool(version, "restore"), "--noflush"], stdin=text)


def _ipv6_available() -> bool:
    return os.path.exists("/proc/sys/net/ipv6")


def _families() -> tuple[rules.Family, ...]:
    return rules.FAMILIES if _ipv6_available() else (rules.IPV4,)


# ---- in-pod ------------------------------------------------------------------------------------

CLONE_NEWCGROUP = 0x02000000


def enter_host_cgroupns() -> None:
    """See cgroup paths as the node does, on this thread (a cgroup namespace is per thread, and inherited by the
    threads and processes it starts): the agent reads the proxy's path, and `-m cgroup --path` resolves it in
    iptables-restore's cgroup namespace. With hostPID, pid 1 is the node's init. A no-op when already there."""
    try:
        if os.stat("/proc/1/ns/cgroup").st_ino == os.stat("/proc/thread-self/ns/cgroup").st_ino:
            return
        fd = os.open("/proc/1/ns/cgroup", os.O_RDONLY)
        try:
            setns(fd, CLONE_NEWCGROUP)
        finally:
            os.close(fd)
        log.debug("thread entered the host's cgroup namespace")
    except (OSError, NetnsError) as e:
        log.warning("staying in this cgroup namespace (the node proxy's cgroup may be out of sight): %s", e)


def apply_inpod(backend: IptablesBackend, *, dns_capture: bool = False, proxy_cgroup: str | None = None) -> None:
    """Install (or re-install, idempotently) the in-pod rules in the current netns; `proxy_cgroup` None keeps
    the proxy cgroup the rules there name, or none if that cgroup is gone (fail closed)."""
    enter_host_cgroupns()  # a worker thread started before the agent entered it would resolve the path elsewhere
    for fam in _families():
        current = iptables_save(backend, fam.version)
        try:
            text = rules.render_inpod(fam, current, dns_capture=dns_capture, proxy_cgroup=proxy_cgroup)
            _restore(backend, fam.version, text)
        except RedirectError:
            if proxy_cgroup is not None or rules.existing_proxy_cgroup(current) is None:
                raise
            wanted = rules.inpod_chain_rules(fam, dns_capture=dns_capture)  # `-m cgroup` refuses a removed path
            _restore(backend, fam.version, rules.render_apply(wanted, rules.INPOD_JUMPS, current))
    ensure_policy_routing()


def remove_inpod(backend: IptablesBackend) -> None:
    """Remove every in-pod rule, ip rule and route we installed; a no-op when none are there."""
    for fam in _families():
        _restore(backend, fam.version, rules.render_inpod_remove(iptables_save(backend, fam.version)))
    remove_policy_routing()


def ours(backend: IptablesBackend) -> str:
    """Our rules in the current netns (both families), for status and comparisons."""
    parts = [f"# v{fam.version}\n{rules.ours(iptables_save(backend, fam.version))}" for fam in _families()]
    return "\n".join(parts) + "\n" + policy_routing_dump()


# ---- node probe SNAT ---------------------------------------------------------------------------


def apply_probe_snat(backend: IptablesBackend, pod_ips: Iterable[str]) -> None:
    """Make the node's probe SNAT chain cover exactly `pod_ips` (the enrolled pods on this node)."""
    ips = list(pod_ips)
    for fam in _families():
        current = iptables_save(backend, fam.version)
        _restore(backend, fam.version, rules.render_probe_snat(fam, ips, current))


def remove_probe_snat(backend: IptablesBackend) -> None:
    for fam in _families():
        _restore(backend, fam.version, rules.render_probe_snat_remove(iptables_save(backend, fam.version)))


# ---- policy routing (pyroute2) -----------------------------------------------------------------


def _lo_index(ipr: object) -> int:
    idx = ipr.link_lookup(ifname="lo")  # type: ignore[attr-defined]
    if not idx:
        raise RedirectError("the netns has no loopback interface")
    return int(idx[0])


def _our_rules(ipr: Any, family: int) -> list[Any]:
    """Our `ip rule`s (pyroute2 rule messages; pyroute2 has no type hints)."""
    found = []
    for r in ipr.get_rules(family=family):
        in_table = ROUTE_TABLE in (r.get("table"), r.get_attr("FRA_TABLE"))
        if in_table and r.get_attr("FRA_FWMARK") == CONNMARK and r.get_attr("FRA_FWMASK") == MARK_MASK:
            found.append(r)
    return found


def ensure_policy_routing() -> None:
    """`ip rule fwmark 0x111/0xfff lookup 100` and `local default dev lo table 100`, v4 and v6."""
    from pyroute2 import IPRoute  # imported here: only the agent needs it

    with IPRoute() as ipr:
        lo = _lo_index(ipr)
        ipr.link("set", index=lo, state="up")  # pods always have lo up; the local route needs it
        for family, dst in ((socket.AF_INET, "0.0.0.0/0"), (socket.AF_INET6, "::/0")):
            if family == socket.AF_INET6 and not _ipv6_available():
                continue
            existing = _our_rules(ipr, family)
            if not existing:
                ipr.rule(
                    "add",
                    family=family,
                    fwmark=CONNMARK,
                    fwmask=MARK_MASK,
                    table=ROUTE_TABLE,
                    priority=rules.RULE_PRIORITY,
                )
            for extra in existing[1:]:
                ipr.rule("del", **_rule_key(extra, family))
            ipr.route("replace", dst=dst, family=family, type="local", scope=254, oif=lo, table=ROUTE_TABLE)


def _rule_key(r: object, family: int) -> dict[str, object]:
    return {
        "family": family,
        "fwmark": CONNMARK,
        "fwmask": MARK_MASK,
        "table": ROUTE_TABLE,
        "priority": r.get_attr("FRA_PRIORITY"),  # type: ignore[attr-defined]
    }


def remove_policy_routing() -> None:
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    with IPRoute() as ipr:
        for family in (socket.AF_INET, socket.AF_INET6):
            if family == socket.AF_INET6 and not _ipv6_available():
                continue
            for r in _our_rules(ipr, family):
                ipr.rule("del", **_rule_key(r, family))
            dst = "0.0.0.0/0" if family == socket.AF_INET else "::/0"
            try:
                for route in ipr.get_routes(family=family, table=ROUTE_TABLE):
                    if route.get("type") == RTN_LOCAL and route.get("dst_len") == 0:
                        oif = route.get_attr("RTA_OIF")
                        ipr.route(
                            "del", dst=dst, family=family, type="local", scope=254, oif=oif, table=ROUTE_TABLE
                        )
            except NetlinkError as e:
                log.debug("removing table %d routes: %s", ROUTE_TABLE, e)


def policy_routing_dump() -> str:
    """`ip rule`/`ip route show table 100` equivalent, only our entries."""
    from pyroute2 import IPRoute

    lines = []
    with IPRoute() as ipr:
        for family, name in ((socket.AF_INET, "v4"), (socket.AF_INET6, "v6")):
            if family == socket.AF_INET6 and not _ipv6_available():
                continue
            for r in _our_rules(ipr, family):
                lines.append(f"rule {name} pref {r.get_attr('FRA_PRIORITY')} fwmark 0x111/0xfff lookup 100")
            for route in ipr.get_routes(family=family, table=ROUTE_TABLE):
                lines.append(f"route {name} table 100 type {route.get('type')} dst_len {route.get('dst_len')}")
    return "\n".join(sorted(lines)) + "\n"
