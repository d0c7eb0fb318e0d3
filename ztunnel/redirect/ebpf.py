"""eBPF redirection (`--redirect ebpf`): bpf/redirect.c instead of rules in the pod netns.

Per node (`load`): the programs are compiled and loaded once (bcc, `redirect.bcc`), their maps pinned under
the node's bpffs directory (`--bpffs-dir`, default /sys/fs/bpf/ztunnel/<node>), so a restarted agent and the
proxy share them; the cgroup programs (connect4/6, sendmsg/recvmsg4/6, sockops) are attached through bpf
links pinned there, to the cgroup the node's pods run under (`--cgroup`, default the cgroup v2 root). They
act only on sockets of an enrolled pod's netns (the `pods` map, keyed by netns cookie), the way the iptables
rules act on everything in the pod netns: a process that joins the pod (an exec) is redirected too. A
restarted agent swaps the programs under the pinned links (BPF_LINK_UPDATE): no gap.

Per pod (`apply`, idempotent):

- the `pods` map gets the pod's netns cookie -> its addresses and whether DNS is captured;
- the pod's netns gets the sk_lookup program through a bpf_link pinned at `links/netns-<inode>`;
- in the pod netns, `net.ipv4.tcp_fwmark_accept=1` and the policy routing of iptables mode
  (`fwmark 0x111/0xfff lookup 100`, `local default dev lo table 100`): the proxy connects to the app from
  the client's address with mark 0x111, the app's socket takes that mark from the SYN, and its replies to that
  address are delivered locally to the proxy instead of leaving through eth0. No iptables rule in the pod.

Removal undoes the per-pod part; the node's probe SNAT (nat POSTROUTING in the node netns) is the iptables
mode's. Why these hooks and not tc: bpf/README.md.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import platform
import shutil
import socket
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ztunnel.inpod import ebpf as maps
from ztunnel.net.netns import NetnsError, in_netns, socket_in_netns
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
from ztunnel.redirect import bcc, iptables
from ztunnel.redirect.iptables import RedirectError
from ztunnel.redirect.pods import PodRecord

log = logging.getLogger("ztunnel.redirect.ebpf")

BPFFS = Path("/sys/fs/bpf")
BPF_FS_MAGIC = 0xCAFE4A11
FWMARK_ACCEPT = "net/ipv4/tcp_fwmark_accept"


def default_pin_dir(node: str) -> Path:
    return BPFFS / "ztunnel" / node


def defines(pin_dir: Path) -> dict[str, str | int]:
    """The -D values bpf/redirect.c is compiled with (ports, marks, addresses in network order)."""
    v4 = struct.unpack("=I", socket.inet_pton(socket.AF_INET, PROBE_SNAT_V4))[0]
    v6 = struct.unpack("=4I", socket.inet_pton(socket.AF_INET6, PROBE_SNAT_V6))
    return {
        "PIN_DIR": f'"{pin_dir}"',
        "PROXY_MARK": PROXY_MARK,
        "CONNMARK": CONNMARK,
        "MARK_MASK": MARK_MASK,
        "OUTBOUND_PORT": OUTBOUND_PORT,
        "PLAINTEXT_PORT": PLAINTEXT_INBOUND_PORT,
        "HBONE_PORT": HBONE_PORT,
        "DNS_PORT": DNS_PORT,
        "PROBE_V4": f"{v4}U",
        **{f"PROBE_V6_{i}": f"{w}U" for i, w in enumerate(v6)},
    }


# ---- where the node's pods run -------------------------------------------------------------------------------


def cgroup2_mount() -> Path | None:
    """Where the cgroup v2 hierarchy is mounted (the unified one on hybrid machines), or None."""
    try:
        mounts = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return None
    found = [Path(line.split()[1]) for line in mounts if len(line.split()) > 2 and line.split()[2] == "cgroup2"]
    return found[0] if found else None


def cgroup2_root() -> Path:
    """The cgroup v2 hierarchy's root directory.

    `ip netns exec` (how the lab starts the agent) gives its processes a fresh /sys without the cgroup mounts.
    Then this thread moves to a mount namespace of its own (a slave of the one it was in, so nothing it mounts
    is seen anywhere else) and mounts cgroup2 on /sys/fs/cgroup there: the same, single hierarchy."""
    found = cgroup2_mount()
    if found is not None:
        return found
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    target = Path("/sys/fs/cgroup")
    clone_newns, ms_rec, ms_slave = 0x00020000, 0x4000, 1 << 19
    if libc.unshare(clone_newns) != 0 or libc.mount(b"none", b"/", None, ms_rec | ms_slave, None) != 0:
        raise RedirectError(f"no cgroup2 mount, and no private mount namespace: {os.strerror(ctypes.get_errno())}")
    if not target.is_dir() or libc.mount(b"cgroup2", str(target).encode(), b"cgroup2", 0, None) != 0:
        raise RedirectError(f"eBPF redirection needs cgroup v2: mounting it on {target} failed")
    return target


# ---- kernel support -------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Check:
    what: str
    ok: bool
    detail: str


def _existing(path: Path) -> Path:
    """`path` or its nearest existing ancestor."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_support(pin_dir: Path = BPFFS, *, programs: bool = True) -> list[Check]:
    """What this machine offers eBPF mode: each item `ztunnel node-agent check --redirect ebpf` prints.
    `pin_dir`: where the maps would be pinned (it, or its nearest existing ancestor, must be on bpffs).
    `programs`: also compile and load every program (the verifier's word on helpers and attach types); the
    agent itself skips that here, since loading them is the next thing it does anyway."""
    pin_root = _existing(pin_dir)
    out: list[Check] = []
    try:
        maps.obj_get("/nonexistent-bpf-object")
    except maps.BpfError as e:
        ok = e.errno in (errno.ENOENT, errno.EINVAL)
        out.append(Check("bpf(2) syscall", ok, "available" if ok else os.strerror(e.errno)))
    btf = Path("/sys/kernel/btf/vmlinux")
    out.append(Check("BTF", btf.exists(), str(btf) if btf.exists() else f"{btf} missing (CONFIG_DEBUG_INFO_BTF)"))
    try:
        out.append(Check("cgroup v2", True, str(cgroup2_root())))
    except RedirectError as e:
        out.append(Check("cgroup v2", False, f"{e}: mount -t cgroup2 none /sys/fs/cgroup"))
    fs_ok = _is_bpffs(pin_root)
    out.append(Check("bpffs", fs_ok, str(pin_root) if fs_ok else f"not mounted: mount -t bpf bpf {pin_root}"))
    release = platform.release()
    build = Path("/lib/modules") / release / "build"
    source = Path("/lib/modules") / release / "source"
    headers = (build / "include").is_dir() and (source / "include" / "linux" / "kconfig.h").exists()
    out.append(
        Check(
            "kernel headers",
            headers,
            f"{build.resolve()}" if headers else f"{build} and {source} must point at a linux-headers tree "
            "(apt-get install linux-headers-amd64; scripts/setup.sh links them)",
        )
    )
    try:
        bcc.import_bcc()
        out.append(Check("bcc", True, "importable"))
    except bcc.BccUnavailable as e:
        out.append(Check("bcc", False, str(e)))
        return out
    if not (headers and fs_ok and programs):
        return out
    scratch = pin_root / f"ztunnel-check-{os.getpid()}"
    try:
        scratch.mkdir(parents=True, exist_ok=True)
        loaded = bcc.compile_and_load(defines(scratch))
        names = {**bcc.CGROUP_PROGRAMS, **bcc.NETNS_PROGRAMS}
        for name in names:
            out.append(Check(f"program {name}", name in loaded.prog_fds, "loads (helpers and attach type verified)"))
    except bcc.BccUnavailable as e:
        out.append(Check("programs", False, str(e)))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return out


def _is_bpffs(path: Path) -> bool:
    import ctypes

    class StatFs(ctypes.Structure):
        _fields_ = [("f_type", ctypes.c_long), ("rest", ctypes.c_byte * 112)]

    buf = StatFs()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.statfs(str(path).encode(), ctypes.byref(buf)) != 0:
        return False
    return bool((buf.f_type & 0xFFFFFFFF) == BPF_FS_MAGIC)


def unsupported(checks: Sequence[Check]) -> str:
    """'' when eBPF mode can run; else one message naming every missing piece."""
    bad = [f"{c.what}: {c.detail}" for c in checks if not c.ok]
    return "" if not bad else "eBPF redirection is not supported here: " + "; ".join(bad)


# ---- the redirector -------------------------------------------------------------------------------------------


class EbpfRedirector:
    name = "ebpf"

    def __init__(
        self,
        pin_dir: Path,
        *,
        cgroup: Path | None = None,
        dns_capture: bool = False,
        probe_snat: bool = True,
        backend: iptables.IptablesBackend | None = None,
    ) -> None:
        self.pin_dir = pin_dir
        self.cgroup = cgroup  # None: the cgroup v2 root
        self.dns_capture = dns_capture
        self.probe_snat = probe_snat
        self.backend = backend  # the node's probe SNAT only
        self.loaded: bcc.Loaded | None = None
        self.pods_fd = -1

    @property
    def links_dir(self) -> Path:
        return self.pin_dir / "links"

    def load(self) -> None:
        """Compile, load, reuse (or create and pin) the maps, attach (or swap) the cgroup programs."""
        if not _is_bpffs(_existing(self.pin_dir)):
            raise RedirectError(f"{_existing(self.pin_dir)} is not on a bpf filesystem: mount -t bpf bpf {BPFFS}")
        self.links_dir.mkdir(parents=True, exist_ok=True)
        try:
            self.loaded = bcc.compile_and_load(defines(self.pin_dir))
        except bcc.BccUnavailable as e:
            raise RedirectError(str(e)) from e
        try:
            self.pods_fd = maps.obj_get(str(self.pin_dir / maps.PODS_MAP))
            cgroup = self.cgroup or cgroup2_root()
            fd = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                for name, (_, attach_type) in bcc.CGROUP_PROGRAMS.items():
                    self._attach_link(self.links_dir / f"cgroup-{name}", self._prog(name), fd, attach_type)
            finally:
                os.close(fd)
        except (maps.BpfError, OSError) as e:
            raise RedirectError(f"attaching the eBPF programs ({self.pin_dir}): {e}") from e
        log.info("eBPF programs attached", extra={"pin_dir": str(self.pin_dir), "cgroup": str(cgroup)})

    def close(self) -> None:
        """Release our fds; the pinned links keep the programs attached (fail closed across restarts)."""
        if self.pods_fd >= 0:
            os.close(self.pods_fd)
            self.pods_fd = -1
        if self.loaded is not None:
            with contextlib.suppress(Exception):
                self.loaded.module.cleanup()
            self.loaded = None

    def _prog(self, name: str) -> int:
        if self.loaded is None:
            raise RedirectError("eBPF programs are not loaded")
        return self.loaded.prog_fds[name]

    @staticmethod
    def _attach_link(path: Path, prog: int, target_fd: int, attach_type: int) -> None:
        """A bpf link from `prog` to `target_fd`, pinned at `path`; an existing one gets `prog` swapped in."""
        if path.exists():
            link = maps.obj_get(str(path))
            try:
                maps.link_update(link, prog)
            finally:
                os.close(link)
            return
        link = maps.link_create(prog, target_fd, attach_type)
        try:
            maps.obj_pin(link, str(path))
        finally:
            os.close(link)

    def link_path(self, netns_fd: int) -> Path:
        return self.links_dir / f"netns-{os.fstat(netns_fd).st_ino}"

    @staticmethod
    def _cookie(netns_fd: int) -> int:
        with socket_in_netns(netns_fd) as sock:
            return maps.netns_cookie(sock)

    # ---- per pod ---------------------------------------------------------------------------------------------

    def apply(self, pod: PodRecord, netns_fd: int) -> None:
        try:
            cookie = self._cookie(netns_fd)
            maps.map_update(self.pods_fd, maps.cookie_key(cookie), maps.pod_cfg_value(pod.ips, dns=self.dns_capture))
            self._attach_link(self.link_path(netns_fd), self._prog("sk_lookup"), netns_fd, bcc.ATTACH_SK_LOOKUP)
            with in_netns(netns_fd):
                _set_sysctl(FWMARK_ACCEPT, "1")
                iptables.ensure_policy_routing()
        except (maps.BpfError, OSError, NetnsError) as e:
            raise RedirectError(f"eBPF redirection of pod {pod.ref}: {e}") from e

    def remove(self, pod: PodRecord, netns_fd: int | None) -> None:
        if netns_fd is None:
            return
        with contextlib.suppress(OSError):
            self.link_path(netns_fd).unlink()  # the last reference: sk_lookup detaches from the netns
        try:
            maps.map_delete(self.pods_fd, maps.cookie_key(self._cookie(netns_fd)))
            with in_netns(netns_fd):
                _set_sysctl(FWMARK_ACCEPT, "0")
                iptables.remove_policy_routing()
        except (maps.BpfError, OSError, NetnsError) as e:
            raise RedirectError(f"removing eBPF redirection of pod {pod.ref}: {e}") from e

    def missing(self, pod: PodRecord, netns_fd: int) -> str:
        """'' when the pod's redirection is complete; else what is missing (CNI CHECK)."""
        out = [f"{p.name} not pinned" for p in self.cgroup_links() if not p.exists()]
        if not self.link_path(netns_fd).exists():
            out.append(f"sk_lookup link {self.link_path(netns_fd)} not pinned")
        try:
            if maps.map_lookup(self.pods_fd, maps.cookie_key(self._cookie(netns_fd)), 24) is None:
                out.append("the pod's netns is not in the pods map")
        except (maps.BpfError, OSError, NetnsError) as e:
            out.append(f"pods map: {e}")
        return "; ".join(out)

    def cgroup_links(self) -> list[Path]:
        return [self.links_dir / f"cgroup-{name}" for name in bcc.CGROUP_PROGRAMS]

    def node_pods(self, ips: Sequence[str]) -> None:
        if self.probe_snat and self.backend is not None:
            iptables.apply_probe_snat(self.backend, ips)

    def proxy_info(self) -> dict[str, Any]:
        return {"redirect": "ebpf", "bpfPinDir": str(self.pin_dir)}

    def prune(self, live_netns_fds: Sequence[int]) -> None:
        """After a restart: forget the pods-map entries and sk_lookup links of netns no longer enrolled."""
        if self.loaded is None:
            return
        keep_links = {self.link_path(fd).name for fd in live_netns_fds}
        for p in self.links_dir.glob("netns-*"):
            if p.name not in keep_links:
                p.unlink(missing_ok=True)
        keep = {maps.cookie_key(self._cookie(fd)) for fd in live_netns_fds}
        for key in bcc.table_keys(self.loaded, maps.PODS_MAP):
            if key not in keep:
                maps.map_delete(self.pods_fd, key)


def _set_sysctl(name: str, value: str) -> None:
    """Write /proc/sys/<name> as seen from the calling thread's netns (net.* sysctls are per namespace)."""
    Path("/proc/sys", name).write_text(value)
