"""`ztunnel lab ...`: build and operate a multi-node cluster of network namespaces from Kubernetes YAML."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from ztunnel.ports import HBONE_PORT, METRICS_PORT

HELP = f"""\
examples:
  ztunnel lab up -f examples/lab-cluster.yaml
  ztunnel lab status
  ztunnel lab exec demo/client -- curl -s http://10.244.2.2:8080/
  ztunnel lab exec node/node2 -- tcpdump -ni eth0 tcp port {HBONE_PORT}
  ztunnel lab apply -f policy.yaml
  ztunnel lab up -f examples/lab-greeter-waypoint.yaml   # a Gateway of class istio-waypoint: the lab deploys it
  ztunnel lab kill proxy --node node1; ztunnel lab restart proxy --node node1
  ztunnel lab down
"""


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--name", default=None, help="lab name (default: lab); prefixes its netns names")
    p.add_argument("--state-dir", default=None, help="state directory (default: /run/ztunnel-lab/NAME)")


def register(subparsers: Any) -> None:
    lab = subparsers.add_parser(
        "lab",
        help="a multi-node cluster of network namespaces, built from Kubernetes YAML",
        description=__doc__,
        epilog=HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = lab.add_subparsers(dest="lab_command", metavar="SUBCOMMAND")
    # The table of subcommands the lab is registered in is the CLI its processes run: the lab reads which
    # components and flags exist from it, without importing the CLI root.
    lab.set_defaults(func=lambda _a: lab.print_help() or 2, cli_commands=subparsers.choices)

    up = sub.add_parser("up", help="create the lab and wait until it is ready")
    _add_common(up)
    up.add_argument("-f", "--filename", action="append", required=True, help="YAML of Kubernetes objects")
    up.add_argument("--redirect", choices=["iptables", "ebpf"], default="iptables", help="in-pod redirection")
    up.add_argument(
        "--mesh",
        choices=["on", "auto", "off"],
        default="on",
        help="on (default): CA, node agents, proxies and ztunnel-cni, and an error naming any that cannot run; "
        "auto: run only the components that can, without mTLS for the rest (opt-in); off: plain pod networking",
    )
    up.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for everything to be ready")
    up.add_argument(
        "--prometheus",
        action="store_true",
        help="also run a Prometheus (Debian's `prometheus`) in the fabric, scraping every node proxy and waypoint",
    )
    up.add_argument(
        "--scrape-interval", type=float, default=1.0, metavar="SECONDS", help="with --prometheus (default 1)"
    )
    up.set_defaults(func=_up)

    down = sub.add_parser("down", help="remove every netns, process and file of the lab (also after a crash)")
    _add_common(down)
    down.set_defaults(func=_down)

    status = sub.add_parser("status", help="nodes, pods, IPs, enrollment, processes and metrics endpoints")
    _add_common(status)
    status.add_argument("-o", "--output", choices=["text", "json"], default="text")
    status.set_defaults(func=_status)

    ex = sub.add_parser("exec", help="run a command in a pod's netns (NAMESPACE/POD) or a node's (node/NAME)")
    _add_common(ex)
    ex.add_argument("target", help="NAMESPACE/POD, node/NAME or fabric")
    ex.add_argument("cmd", nargs=argparse.REMAINDER, help="-- COMMAND [ARGS...]")
    ex.set_defaults(func=_exec)

    for verb, helptext in (
        ("apply", "create or change objects (pods get CNI ADD)"),
        ("delete", "remove objects (pods get CNI DEL)"),
    ):
        p = sub.add_parser(verb, help=helptext)
        _add_common(p)
        p.add_argument("-f", "--filename", action="append", required=True)
        if verb == "apply":
            p.add_argument("--timeout", type=float, default=60.0, help="seconds to keep retrying a pod's CNI ADD")
        p.set_defaults(func=_apply if verb == "apply" else _delete)

    for verb in ("restart", "kill"):
        p = sub.add_parser(verb, help=f"{verb} a component (proxy, node-agent, ca) for fault tests")
        _add_common(p)
        p.add_argument("component", choices=["proxy", "node-agent", "ca"])
        p.add_argument("--node", default=None)
        p.set_defaults(func=_restart if verb == "restart" else _kill)


def _lab(args: argparse.Namespace, creating: bool = False) -> Any:
    from ztunnel.lab.cluster import Lab, resolve_dir

    name, path = resolve_dir(args.name, args.state_dir, creating=creating)
    cli = getattr(args, "cli_commands", None)
    return Lab(name, path, progress=lambda m: print(m, file=sys.stderr, flush=True), cli=cli)


def _up(args: argparse.Namespace) -> int:
    lab = _lab(args, creating=True)
    scrape = args.scrape_interval if args.prometheus else None
    lab.up(args.filename, redirect=args.redirect, mesh=args.mesh, timeout=args.timeout, scrape=scrape)
    st = lab.status()
    _print_status(st)
    _print_hints(st, args)
    return 0


def _print_hints(st: dict[str, Any], args: argparse.Namespace) -> None:
    """Commands to try next, with this lab's own names and addresses."""
    name = f" --name {st['name']}" if args.name or args.state_dir else ""
    servers = [p for p in st["pods"] if p["ports"] and p["ips"] and not p.get("waypoint")]
    clients = [p for p in st["pods"] if not p["ports"] and p["ips"] and not p["host_network"]]
    print("TRY")
    if servers and clients:
        s, c = servers[0], clients[0]
        port = s["ports"][0]
        print(f"  ztunnel lab exec{name} {c['namespace']}/{c['name']} -- curl -s http://{s['ips'][0]}:{port}/")
        node = next(n for n in st["nodes"] if n["name"] == s["node"])
        print(f"  ztunnel lab exec{name} node/{node['name']} -- tcpdump -ni eth0 tcp port {HBONE_PORT} or port {port}")
    if any(n["proxy"] for n in st["nodes"]):
        node_name = servers[0]["node"] if servers else st["nodes"][0]["name"]
        print(f"  ztunnel lab exec{name} node/{node_name} -- curl -s http://127.0.0.1:{METRICS_PORT}/metrics")
    if st.get("prometheus"):
        query = "sum(rate(istio_tcp_sent_bytes_total{reporter=\"destination\"}[1m])) by (destination_workload)"
        print(f"  ztunnel lab exec{name} fabric -- curl -s {st['prometheus']['url']}/api/v1/query --data-urlencode '"
              f"query={query}'")  # fmt: skip
    print(f"  ztunnel lab down{name}")


def _down(args: argparse.Namespace) -> int:
    _lab(args).down()
    return 0


def _status(args: argparse.Namespace) -> int:
    st = _lab(args).status()
    if args.output == "json":
        print(json.dumps(st, indent=2))
    else:
        _print_status(st)
    return 0


def _print_status(st: dict[str, Any]) -> None:
    def pstate(p: dict[str, Any] | None) -> str:
        if not p:
            return "-"
        return f"pid {p['pid']} {'running' if p['running'] else 'NOT RUNNING'}"

    print(f"lab {st['name']} ({'ready' if st['ready'] else 'not ready'}), state {st['dir']}")
    print(f"live config: {st['live_config']}")
    comps = ", ".join(f"{k}={'on' if v else 'off'}" for k, v in st["components"].items())
    print(f"components: {comps}; redirect: {st['redirect']}")
    if st["ca"]:
        print(f"ca: {st['ca'].get('address', '-')} {pstate(st['ca'] if 'pid' in st['ca'] else None)}")
    prom = st.get("prometheus")
    if prom:
        print(f"prometheus: {prom['url']} (netns {prom['netns']}) {pstate(prom if prom['pid'] else None)}, "
              f"{prom['targets']} targets")  # fmt: skip
    print("NODES")
    for n in st["nodes"]:
        print(f"  {n['name']:<12} {n['address']:<14} pods {n['pod_cidr']:<16} netns {n['netns']}")
        print(f"    node-agent: {pstate(n['node_agent'])}   proxy: {pstate(n['proxy'])}")
        if n["proxy"]:
            print(f"    metrics: {n['proxy']['metrics']}")
    print("PODS")
    for p in st["pods"]:
        mesh = "enrolled" if p["enrolled"] else ("ambient, NOT ENROLLED" if p["ambient"] else "not in mesh")
        if p.get("waypoint"):
            mesh = f"waypoint of Gateway {p['waypoint']} (HBONE itself, not captured)"
        print(f"  {p['namespace'] + '/' + p['name']:<28} {','.join(p['ips']) or '-':<14} {p['node']:<10} {mesh}")
        for c, proc in p["containers"].items():
            print(f"    {c}: {pstate(proc)}")


def _exec(args: argparse.Namespace) -> int:
    from ztunnel.errors import ZtunnelError
    from ztunnel.lab.netns import exec_prefix

    cmd = list(args.cmd)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if not cmd:
        raise ZtunnelError("say what to run: ztunnel lab exec TARGET -- COMMAND [ARGS...]")
    ns = _lab(args).target_netns(args.target)
    sys.stdout.flush()
    argv = [*exec_prefix(ns), *cmd]
    os.execvp(argv[0], argv)
    return 127  # not reached


def _apply(args: argparse.Namespace) -> int:
    for line in _lab(args).apply(args.filename, timeout=args.timeout):
        print(line)
    return 0


def _delete(args: argparse.Namespace) -> int:
    for line in _lab(args).delete(args.filename):
        print(line)
    return 0


def _restart(args: argparse.Namespace) -> int:
    rec = _lab(args).restart(args.component, args.node)
    print(f"{rec.key} restarted (pid {rec.pid})")
    return 0


def _kill(args: argparse.Namespace) -> int:
    rec = _lab(args).kill(args.component, args.node)
    print(f"{rec.key} killed (pid {rec.pid})")
    return 0
