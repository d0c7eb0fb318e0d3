"""`ztunnel-ebpf`: the mesh pair of `ztunnel`, in a second lab that redirects with eBPF instead of iptables
(lab topology only; not available until `ztunnel.redirect.ebpf` and bcc exist)."""

from __future__ import annotations

import importlib.util

from bench.paths import ztunnel
from bench.paths.base import PathContext, PathKind, PathSetup, unavailable
from bench.topology.lab import LabTopology

NAME = "ztunnel-ebpf"


def ebpf_redirect_missing() -> str | None:
    """Why the lab cannot use eBPF redirection here, or None if it can try."""
    if importlib.util.find_spec("bcc") is None:
        return "bcc (python3-bpfcc) is not importable, so eBPF redirection cannot load"
    if importlib.util.find_spec("ztunnel.redirect.ebpf") is None:
        return "eBPF redirection (ztunnel.redirect.ebpf) is not built yet"
    return None


def _build(ctx: PathContext) -> PathSetup:
    lab = ctx.topology
    if not isinstance(lab, LabTopology):
        return unavailable(NAME, "needs the lab topology (in-pod redirection)")
    missing = ebpf_redirect_missing() if lab.redirect != "ebpf" else "the main lab already uses eBPF"
    if missing:
        return unavailable(NAME, missing)
    try:
        ebpf_lab = lab.sibling("ebpf", ctx.group)
    except Exception as e:
        return unavailable(NAME, f"the eBPF lab failed: {e}"[:500])
    path = ztunnel.in_lab(ebpf_lab)
    path.name = NAME
    return path


ZTUNNEL_EBPF = PathKind(NAME, _build)
