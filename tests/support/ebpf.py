"""What eBPF redirection has attached, seen from outside the node agent: the bpf links pinned in a lab's bpffs
and the programs the kernel lists on the cgroup they are attached to."""

from __future__ import annotations

import os
from pathlib import Path

from ztunnel.inpod import ebpf

CGROUP_ROOT = Path("/sys/fs/cgroup/unified")
SK_LOOKUP = 36


def links_dir(lab_dir: Path, node: str) -> Path:
    return lab_dir / "bpffs" / node / "links"


def attached_cgroup_programs(lab_dir: Path, node: str) -> list[str]:
    """The node's cgroup programs (by name) whose link's program the kernel lists on the cgroup v2 root."""
    out = []
    for path in sorted(links_dir(lab_dir, node).glob("cgroup-*")):
        info = ebpf.link_info(str(path))
        fd = os.open(CGROUP_ROOT, os.O_RDONLY | os.O_DIRECTORY)
        try:
            if info.prog_id in ebpf.prog_query(fd, info.attach_type):
                out.append(path.name.removeprefix("cgroup-"))
        finally:
            os.close(fd)
    return out


def sk_lookup_attached(lab_dir: Path, node: str, netns_name: str) -> bool:
    """Whether the node's sk_lookup program is attached to the named netns (through its pinned link)."""
    inode = os.stat(f"/var/run/netns/{netns_name}").st_ino
    path = links_dir(lab_dir, node) / f"netns-{inode}"
    if not path.exists():
        return False
    info = ebpf.link_info(str(path))
    return info.type == ebpf.LINK_TYPE_NETNS and info.target == inode and info.attach_type == SK_LOOKUP


def cgroup_root_programs(attach_type: int) -> set[int]:
    fd = os.open(CGROUP_ROOT, os.O_RDONLY | os.O_DIRECTORY)
    try:
        return set(ebpf.prog_query(fd, attach_type))
    finally:
        os.close(fd)
