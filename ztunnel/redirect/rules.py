"""In-pod redirection rules (DESIGN §4.6) and the node's probe SNAT, as iptables-restore input.

Rendering is pure: given what `iptables-save` shows now, produce the `iptables-restore --noflush`
input that brings the netns to the wanted state. Declaring our chains in the input flushes them,
so re-applying never duplicates a rule; jumps from the built-in chains are added only when missing
(and extra copies removed), so re-applying yields a byte-identical `iptables-save`.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from ztunnel.ports import (
    CONNMARK,
    DNS_PORT,
    HBONE_PORT,
    MARK_MASK,
    OUTBOUND_PORT,
    PLAINTEXT_INBOUND_PORT,
    PROBE_SNAT_V4,
    PROBE_SNAT_V6,
    PROXY_MARK,
)

CHAIN_PREFIX = "ZTUNNEL-"
PREROUTING_CHAIN = "ZTUNNEL-PREROUTING"
OUTPUT_CHAIN = "ZTUNNEL-OUTPUT"
POSTROUTING_CHAIN = "ZTUNNEL-POSTROUTING"

RULE_PRIORITY = 32764


@dataclass(frozen=True, slots=True)
class Family:
    """The per-IP-version constants of the rules."""

    version: int
    loopback: str
    probe_snat: str
    any: str

    @property
    def host_len(self) -> int:
        return 32 if self.version == 4 else 128


IPV4 = Family(4, "127.0.0.1/32", PROBE_SNAT_V4, "0.0.0.0/0")
IPV6 = Family(6, "::1/128", PROBE_SNAT_V6, "::/0")
FAMILIES = (IPV4, IPV6)


def _hex(v: int) -> str:
    return f"0x{v:x}"


MARK = f"{_hex(PROXY_MARK)}/{_hex(MARK_MASK)}"
CT_MARK = f"{_hex(CONNMARK)}/{_hex(MARK_MASK)}"


def proxy_cgroup_match(path: str) -> str:
    """`-m cgroup` for the node proxy's cgroup v2 PATH (as in /proc/PID/cgroup, from the host's cgroup namespace).

    The proxy's mark alone proves nothing: SO_MARK needs only CAP_NET_RAW since Linux 5.17, a container default.
    A socket's cgroup is its creator's, and the proxy creates its in-pod sockets itself, so mark AND cgroup name
    the proxy's sockets; an app's socket is in the app's cgroup whatever mark it sets.
    """
    if not path.startswith("/") or any(c.isspace() or c in "\"'" for c in path):
        raise ValueError(f"proxy cgroup {path!r}: expected a cgroup v2 path like /kubepods/.../<container>")
    return f'-m cgroup --path "{path}"'


def existing_proxy_cgroup(save_text: str) -> str | None:
    """The proxy cgroup named by the in-pod rules already in an iptables-save (re-applied after an agent restart
    before the proxy has reconnected); None when there is none."""
    for line in save_text.splitlines():
        if line.startswith(f"-A {OUTPUT_CHAIN} ") and f"--mark {MARK}" in line and "--path " in line:
            return line.split("--path ", 1)[1].split()[0].strip('"')
    return None


def inpod_chain_rules(
    fam: Family, *, dns_capture: bool = False, proxy_cgroup: str | None = None
) -> dict[str, dict[str, list[str]]]:
    """table -> chain -> rule specs (without `-A CHAIN`), in order. The heart of DESIGN §4.6.

    Without `proxy_cgroup` no local socket skips redirection (fail closed: the agent knows the cgroup once the
    proxy connects, and re-applies the rules then)."""
    probe = f"{fam.probe_snat}/{fam.host_len}"
    nat_output = [
        f"-d {probe} -p tcp -j ACCEPT",  # replies to node probes, untouched
        f"-p tcp -m mark --mark {CT_MARK} -j ACCEPT",  # return traffic of proxy connections
        f"! -d {fam.loopback} -o lo -j ACCEPT",  # the pod talking to itself
    ]
    if proxy_cgroup is not None:
        nat_output.append(f"-m mark --mark {MARK} {proxy_cgroup_match(proxy_cgroup)} -j ACCEPT")  # the proxy's own
    if dns_capture:
        nat_output.append(f"! -d {fam.loopback} -p udp --dport 53 -j REDIRECT --to-ports {DNS_PORT}")
        nat_output.append(f"! -d {fam.loopback} -p tcp --dport 53 -j REDIRECT --to-ports {DNS_PORT}")
    nat_output.append(f"! -d {fam.loopback} -p tcp -j REDIRECT --to-ports {OUTBOUND_PORT}")
    return {
        "mangle": {
            PREROUTING_CHAIN: [f"-m mark --mark {MARK} -j CONNMARK --set-xmark {CT_MARK}"],
            OUTPUT_CHAIN: [
                f"-m connmark --mark {CT_MARK} -j CONNMARK --restore-mark --nfmask 0xffffffff --ctmask 0xffffffff"
            ],
        },
        "nat": {
            PREROUTING_CHAIN: [
                f"-s {probe} -p tcp -j ACCEPT",  # node probes (SNATed by the node), untouched
                f"! -d {fam.loopback} -p tcp ! --dport {HBONE_PORT} -m mark ! --mark {MARK} "
                f"-j REDIRECT --to-ports {PLAINTEXT_INBOUND_PORT}",
            ],
            OUTPUT_CHAIN: nat_output,
        },
    }


INPOD_JUMPS = {PREROUTING_CHAIN: "PREROUTING", OUTPUT_CHAIN: "OUTPUT"}


def probe_snat_chain_rules(fam: Family, pod_ips: Iterable[str]) -> dict[str, dict[str, list[str]]]:
    """Node netns: SNAT locally-originated (kubelet) traffic to enrolled pods to the probe address.

    HBONE (15008) is left alone: a node proxy dialing a pod on its own node from the node netns must
    keep its address, and probes never target the proxy's port.
    """
    rules = []
    for ip in sorted({str(ipaddress.ip_address(i)) for i in pod_ips if ipaddress.ip_address(i).version == fam.version}):
        rules.append(
            f"-d {ip}/{fam.host_len} -p tcp ! --dport {HBONE_PORT} -m owner --socket-exists "
            f"-j SNAT --to-source {fam.probe_snat}"
        )
    return {"nat": {POSTROUTING_CHAIN: rules}}


PROBE_JUMPS = {POSTROUTING_CHAIN: "POSTROUTING"}


# ---- iptables-save parsing and restore rendering -----------------------------------------------


def parse_save(text: str) -> dict[str, tuple[set[str], list[str]]]:
    """iptables-save output -> table -> (chains declared, `-A` lines)."""
    tables: dict[str, tuple[set[str], list[str]]] = {}
    current: tuple[set[str], list[str]] | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("*"):
            current = tables.setdefault(line[1:], (set(), []))
        elif current is None or not line or line.startswith("#"):
            continue
        elif line.startswith(":"):
            current[0].add(line[1:].split()[0])
        elif line.startswith("-A "):
            current[1].append(line)
    return tables


def _jump_count(save: dict[str, tuple[set[str], list[str]]], table: str, builtin: str, chain: str) -> int:
    lines = save.get(table, (set(), []))[1]
    return sum(1 for line in lines if line == f"-A {builtin} -j {chain}")


def render_apply(wanted: dict[str, dict[str, list[str]]], jumps: dict[str, str], current_save: str = "") -> str:
    """iptables-restore --noflush input that makes our chains exactly `wanted` and jumps present once."""
    save = parse_save(current_save)
    out: list[str] = []
    for table, chains in wanted.items():
        out.append(f"*{table}")
        for chain in chains:
            out.append(f":{chain} - [0:0]")  # declaring flushes it under --noflush
        for chain, rules in chains.items():
            out.extend(f"-A {chain} {rule}" for rule in rules)
        for chain in chains:
            builtin = jumps.get(chain)
            if builtin is None:
                continue
            n = _jump_count(save, table, builtin, chain)
            if n == 0:
                out.append(f"-I {builtin} 1 -j {chain}")
            out.extend(f"-D {builtin} -j {chain}" for _ in range(max(0, n - 1)))
        out.append("COMMIT")
    return "\n".join(out) + "\n"


def render_remove(chains_by_table: Mapping[str, Iterable[str]], jumps: Mapping[str, str], current_save: str) -> str:
    """Input that removes our jumps and chains; empty when nothing of ours is there (idempotent)."""
    save = parse_save(current_save)
    out: list[str] = []
    for table, chains in chains_by_table.items():
        declared = save.get(table, (set(), []))[0]
        body: list[str] = []
        present = [c for c in chains if c in declared]
        for chain in present:
            builtin = jumps.get(chain)
            if builtin is not None:
                body.extend(f"-D {builtin} -j {chain}" for _ in range(_jump_count(save, table, builtin, chain)))
        # Jumps must go before the chains can be deleted; other references to our chains are not expected.
        body.extend(f"-F {chain}" for chain in present)
        body.extend(f"-X {chain}" for chain in present)
        if body:
            out.extend([f"*{table}", *body, "COMMIT"])
    return "\n".join(out) + "\n" if out else ""


INPOD_TABLES = {"mangle": (PREROUTING_CHAIN, OUTPUT_CHAIN), "nat": (PREROUTING_CHAIN, OUTPUT_CHAIN)}
PROBE_TABLES = {"nat": (POSTROUTING_CHAIN,)}


def render_inpod(
    fam: Family, current_save: str = "", *, dns_capture: bool = False, proxy_cgroup: str | None = None
) -> str:
    """`proxy_cgroup` None keeps the one the pod's rules name already (if any)."""
    if proxy_cgroup is None:
        proxy_cgroup = existing_proxy_cgroup(current_save)
    chains = inpod_chain_rules(fam, dns_capture=dns_capture, proxy_cgroup=proxy_cgroup)
    return render_apply(chains, INPOD_JUMPS, current_save)


def render_inpod_remove(current_save: str) -> str:
    return render_remove(INPOD_TABLES, INPOD_JUMPS, current_save)


def render_probe_snat(fam: Family, pod_ips: Iterable[str], current_save: str = "") -> str:
    return render_apply(probe_snat_chain_rules(fam, pod_ips), PROBE_JUMPS, current_save)


def render_probe_snat_remove(current_save: str) -> str:
    return render_remove(PROBE_TABLES, PROBE_JUMPS, current_save)


def ours(save_text: str) -> str:
    """Only the lines of an iptables-save that belong to us (for comparisons in tests and status)."""
    keep: list[str] = []
    table = ""
    for raw in save_text.splitlines():
        line = raw.strip()
        if line.startswith("*"):
            table = line
        elif CHAIN_PREFIX in line and not line.startswith("#"):
            keep.append(f"{table} {line.split(' [')[0] if line.startswith(':') else line}")
    return "\n".join(keep)
