"""`ztunnel node-agent`: CLI wiring for the node agent (heavy imports happen in the handler)."""

from __future__ import annotations

import argparse
from pathlib import Path

DEFAULT_CNI_SOCKET = "/var/run/ztunnel/cni.sock"
DEFAULT_PROXY_SOCKET = "/var/run/ztunnel/ztunnel.sock"


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    from ztunnel.config.kube.source import add_source_arguments

    p = subparsers.add_parser(
        "node-agent",
        help="enroll this node's pods: CNI events, in-pod redirection, netns hand-off to the proxy",
        description="Serves CNI events on a unix socket, installs in-pod redirection for pods in the mesh "
        "and hands their network namespaces to the node proxy.",
    )
    p.add_argument(
        "action",
        nargs="?",
        choices=["run", "check"],
        default="run",
        help="run (default) the agent, or check what this kernel supports for --redirect and exit",
    )
    p.add_argument("--node", help="this node's name (pods' spec.nodeName); required to run")
    p.add_argument("-f", "--file", dest="files", action="append", help="cluster YAML (repeatable); required to run")
    add_source_arguments(p)
    p.add_argument("--cni-socket", default=DEFAULT_CNI_SOCKET, help="HTTP-over-unix socket the CNI plugin calls")
    p.add_argument("--proxy-socket", default=DEFAULT_PROXY_SOCKET, help="SOCK_SEQPACKET socket the proxy connects to")
    p.add_argument("--state-dir", default=None, help="runtime state (default /run/ztunnel/<node>)")
    p.add_argument(
        "--redirect", choices=["iptables", "ebpf"], default="iptables", help="redirection mode (default iptables)"
    )
    p.add_argument(
        "--bpffs-dir",
        default=None,
        help="eBPF mode: where this node's maps and links are pinned (default /sys/fs/bpf/ztunnel/NODE)",
    )
    p.add_argument(
        "--cgroup",
        default=None,
        help="eBPF mode: the cgroup (v2) directory the node's pods run under (default: the cgroup v2 root)",
    )
    p.add_argument("--iptables", choices=["auto", "nft", "legacy"], default="auto", help="iptables backend")
    p.add_argument("--no-probe-snat", action="store_true", help="do not SNAT node probes to 169.254.7.127")
    p.add_argument("--dns-capture", action="store_true", help="also redirect pods' port 53 to 15053")
    p.add_argument("--trust-domain", default="cluster.local")
    p.set_defaults(func=run_node_agent)


def run_node_agent(args: argparse.Namespace) -> int:
    import asyncio
    import logging

    import pyroute2  # noqa: F401 - imported first: it resets its logger's level on import

    from ztunnel.config.kube.source import open_source
    from ztunnel.config.kube.status import pod_annotator
    from ztunnel.errors import ZtunnelError
    from ztunnel.redirect.agent import NodeAgent
    from ztunnel.redirect.iptables import RedirectError, detect_backend

    logging.getLogger("pyroute2").setLevel(logging.WARNING)  # its debug output is per netlink message
    if args.action == "check":
        return check(args.redirect, args.bpffs_dir)
    if not args.node or not (args.files or args.source == "kubernetes"):
        raise ZtunnelError("node-agent: --node and -f/--file (or --source kubernetes) are required to run the agent")
    # node=: a config that suddenly drops every pod of this node is held until it settles (a half-written
    # file must not un-enroll the node's pods)
    # --source kubernetes: only this node's pods are listed (field selector spec.nodeName)
    source = open_source(args, trust_domain=args.trust_domain, node=args.node, pods_on_node=args.node)
    source.load()  # a bad file at start is a user error (ConfigError -> `error: ...`, exit 2)
    backend = detect_backend(None if args.iptables == "auto" else args.iptables)
    redirector = None
    if args.redirect == "ebpf":
        from ztunnel.redirect import ebpf

        pin_dir = Path(args.bpffs_dir) if args.bpffs_dir else ebpf.default_pin_dir(args.node)
        problem = ebpf.unsupported(ebpf.check_support(pin_dir, programs=False))
        if problem:
            raise ZtunnelError(f"--redirect ebpf: {problem} (see `ztunnel node-agent check --redirect ebpf`)")
        redirector = ebpf.EbpfRedirector(
            pin_dir,
            cgroup=Path(args.cgroup) if args.cgroup else None,
            dns_capture=args.dns_capture,
            probe_snat=not args.no_probe_snat,
            backend=backend,
        )
        try:
            redirector.load()
        except RedirectError as e:  # the machine has every piece: a program the kernel refuses is a bug
            raise ZtunnelError(f"--redirect ebpf: {e}") from e
    agent = NodeAgent(
        node=args.node,
        source=source,
        cni_socket=Path(args.cni_socket),
        proxy_socket=Path(args.proxy_socket),
        state_dir=Path(args.state_dir or f"/run/ztunnel/{args.node}"),
        backend=backend,
        probe_snat=not args.no_probe_snat,
        dns_capture=args.dns_capture,
        redirector=redirector,
    )

    async def main() -> None:
        import signal

        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, task.cancel)
        # --source kubernetes: enrolled pods get ambient.istio.io/redirection: enabled, as Istio's CNI agent does
        annotator = pod_annotator(source, lambda: {(p.namespace, p.name) for p in agent.pods.values() if p.enrolled})
        annotating = asyncio.create_task(annotator.run()) if annotator is not None else None
        try:
            await agent.run()
        except asyncio.CancelledError:
            pass
        finally:
            if annotating is not None:
                annotating.cancel()

    try:
        import uvloop

        uvloop.run(main())
    except ImportError:
        asyncio.run(main())
    return 0


def check(redirect: str, bpffs_dir: str | None = None) -> int:
    """Print what this machine supports for the redirection mode; exit 0 when it can run, 1 when not."""
    if redirect == "iptables":
        from ztunnel.redirect.iptables import RedirectError, detect_backend

        try:
            print(f"ok       iptables: {detect_backend().name}")
        except RedirectError as e:
            print(f"MISSING  iptables: {e}")
            return 1
        return 0
    from ztunnel.redirect import ebpf

    checks = ebpf.check_support(Path(bpffs_dir) if bpffs_dir else ebpf.BPFFS)
    for c in checks:
        print(f"{'ok' if c.ok else 'MISSING':<8} {c.what}: {c.detail}")
    problem = ebpf.unsupported(checks)
    print(problem or "eBPF redirection is supported on this machine")
    return 1 if problem else 0
