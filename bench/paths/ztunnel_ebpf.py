"""`ztunnel-ebpf` and `ztunnel-ebpf-same-node`: the mesh paths of `ztunnel`, in a second lab that redirects with
eBPF instead of iptables (lab topology only; not available where bcc cannot load the programs)."""

from __future__ import annotations

import importlib.util

from bench.paths import ztunnel
from bench.paths.base import PathContext, PathKind, PathSetup, unavailable
from bench.topology.lab import LabTopology

NAME = "ztunnel-ebpf"
SAME_NODE_NAME = "ztunnel-ebpf-same-node"


def ebpf_redirect_missing() -> str | None:
    """Why the lab cannot use eBPF redirection here, or None if it can try."""
    if importlib.util.find_spec("bcc") is None:
        return "bcc (python3-bpfcc) is not importable, so eBPF redirection cannot load"
    if importlib.util.find_spec("ztunnel.redirect.ebpf") is None:
        return "eBPF redirection (ztunnel.redirect.ebpf) is not built yet"
    return None


def _build(ctx: PathContext, same_node: bool = False) -> PathSetup:
    name = SAME_NODE_NAME if same_node else NAME
    lab = ctx.topology
    if not isinstance(lab, LabTopology):
        return unavailable(name, "needs the lab topology (in-pod redirection)")
    missing = ebpf_redirect_missing() if lab.redirect != "ebpf" else "the main lab already uses eBPF"
    if missing:
        return unavailable(name, missing)
    try:
        ebpf_lab = lab.sibling("ebpf", ctx.group)
    except Exception as e:
        return unavailable(name, f"the eBPF lab failed: {e}"[:500])
    path = ztunnel.in_lab(ebpf_lab, same_node=same_node)
    path.name = name
    return path


ZTUNNEL_EBPF = PathKind(NAME, _build)
ZTUNNEL_EBPF_SAME_NODE = PathKind(SAME_NODE_NAME, lambda ctx: _build(ctx, same_node=True))
