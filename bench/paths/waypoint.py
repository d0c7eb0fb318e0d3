"""`waypoint`: client pod -> source node proxy -> HBONE -> `ztunnel waypoint` (one L7 decision per request:
ALLOW GET `*/hello` on the app's Service, everything else 403) -> HBONE -> destination node proxy -> the
HTTP app. Measured with HTTP/1.1 keep-alive requests and h2c (its columns are the HTTP figures).

Local topology: the path has its own three pods and proxies (client on node wa, app on wb, the waypoint pod on
ww; `bench.settings.WP_*`), because a pod whose Service uses a waypoint refuses clients that dial its pod IP
directly, which is what the `ztunnel` path does. The client enters through the source proxy's SOCKS5 port and
dials the Service VIP, as a pod would. The lab does not deploy waypoints yet, so there it is unavailable.
"""

from __future__ import annotations

import subprocess

from bench.paths.base import PathContext, PathKind, PathSetup, require_policy, unavailable
from bench.processes import ProcessGroup, http_status, listening, port_open, wait_until
from bench.settings import (
    HTTP_PORT,
    LOADGEN,
    PY,
    WP_CLIENT_POD,
    WP_FORWARDER,
    WP_NODE_A,
    WP_NODE_B,
    WP_NODE_W,
    WP_SERVER_POD,
    WP_VIP,
    WP_WAYPOINT_POD,
)
from bench.tools import ztunnel_command, ztunnel_help
from bench.topology.lab import LabTopology, netns_exec

NAME = "waypoint"
NAMESPACE = "wp"
H2C_NOTE = "h2c: prior knowledge from the client, HTTP/1.1 from the waypoint to the app (an unnamed port)"


def cluster_yaml(lab: bool = False) -> str:
    """The waypoint path's cluster: three nodes, the client and app pods, the Gateway and its pod, the app's
    Service opted in with `istio.io/use-waypoint`, and the L7 policy attached to the Service (ambient style).
    LAB: the objects `ztunnel lab apply` adds to the bench's lab (its nodes; it assigns the pod IPs and deploys
    the Gateway's waypoint pod itself)."""
    if lab:
        return "---\n".join(d + "\n" for d in _lab_docs())
    docs = [
        f"""apiVersion: v1
kind: Namespace
metadata:
  name: {NAMESPACE}
  labels: {{istio.io/dataplane-mode: ambient}}""",
        *(
            f"""apiVersion: v1
kind: Node
metadata: {{name: {node}}}
status:
  addresses: [{{type: InternalIP, address: {addr}}}]"""
            for node, addr in (("wa", WP_NODE_A), ("wb", WP_NODE_B), ("ww", WP_NODE_W))
        ),
        f"""apiVersion: v1
kind: Pod
metadata: {{name: client, namespace: {NAMESPACE}, labels: {{app: client}}}}
spec: {{nodeName: wa, serviceAccountName: client}}
status: {{podIP: "{WP_CLIENT_POD}", podIPs: [{{ip: "{WP_CLIENT_POD}"}}]}}""",
        f"""apiVersion: v1
kind: Pod
metadata: {{name: server, namespace: {NAMESPACE}, labels: {{app: server}}}}
spec:
  nodeName: wb
  serviceAccountName: server
  containers: [{{name: app, ports: [{{containerPort: {HTTP_PORT}}}]}}]
status: {{podIP: "{WP_SERVER_POD}", podIPs: [{{ip: "{WP_SERVER_POD}"}}]}}""",
        f"""apiVersion: v1
kind: Pod
metadata:
  name: waypoint-0
  namespace: {NAMESPACE}
  labels: {{gateway.networking.k8s.io/gateway-name: waypoint}}
spec: {{nodeName: ww, serviceAccountName: waypoint}}
status: {{podIP: "{WP_WAYPOINT_POD}", podIPs: [{{ip: "{WP_WAYPOINT_POD}"}}]}}""",
        *_common_docs(),
    ]
    return "---\n".join(d + "\n" for d in docs)


def _common_docs() -> list[str]:
    return [
        f"""apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {{name: waypoint, namespace: {NAMESPACE}}}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{{name: mesh, port: 15008, protocol: HBONE}}]""",
        f"""apiVersion: v1
kind: Service
metadata: {{name: app, namespace: {NAMESPACE}, labels: {{istio.io/use-waypoint: waypoint}}}}
spec: {{clusterIP: {WP_VIP}, selector: {{app: server}}, ports: [{{port: 80, targetPort: {HTTP_PORT}}}]}}""",
        f"""apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: app-l7, namespace: {NAMESPACE}}}
spec:
  targetRefs: [{{kind: Service, group: "", name: app}}]
  action: ALLOW
  rules:
  - to:
    - operation:
        methods: ["GET"]
        paths: ["*/hello"]""",
    ]


def _lab_docs() -> list[str]:
    """The app is the server pod's container (the lab reports the pod ready once its port listens)."""
    app = f'command: ["{PY}", "{LOADGEN}", http-server, "0.0.0.0:{HTTP_PORT}"], ports: [{{containerPort: {HTTP_PORT}}}]'
    pods = [
        f"""apiVersion: v1
kind: Pod
metadata: {{name: {name}, namespace: {NAMESPACE}, labels: {{app: {name}}}}}
spec:
  nodeName: {node}
  serviceAccountName: {name}
  containers: [{{name: main, {command}}}]"""
        for name, node, command in (("client", "node1", "command: [sleep, infinity]"), ("server", "node2", app))
    ]
    namespace = f"""apiVersion: v1
kind: Namespace
metadata:
  name: {NAMESPACE}
  labels: {{istio.io/dataplane-mode: ambient}}"""
    return [namespace, *pods, *_common_docs()]


def local_waypoint(group: ProcessGroup) -> PathSetup:
    cmd = ztunnel_command()
    if cmd is None:
        return unavailable(NAME, "the ztunnel console script is not in the venv")
    if ztunnel_help("waypoint") is None:
        return unavailable(NAME, "`ztunnel waypoint` does not exist yet")
    proxy_help = ztunnel_help("proxy") or ""
    cluster = group.workdir / "waypoint-cluster.yaml"
    cluster.write_text(cluster_yaml())
    ca_dir = group.workdir / "waypoint-ca"
    r = subprocess.run(
        [*cmd, "ca", "init", "--dir", str(ca_dir), "--force"], capture_output=True, text=True, timeout=60
    )
    if r.returncode != 0:
        return unavailable(NAME, f"`ztunnel ca init` failed: {r.stderr.strip()[-300:]}")
    path = PathSetup(
        NAME,
        entry=(
            f"SOCKS5 on the client pod ({WP_CLIENT_POD}:15080) to the Service VIP, HBONE to `ztunnel waypoint` "
            "(ALLOW GET */hello, else 403), HBONE to the app's node proxy"
        ),
        http_target=f"socks5://{WP_CLIENT_POD}:15080/{WP_VIP}:80",
        http_host=f"app.{NAMESPACE}.svc.cluster.local",
        h2c=True,
        h2load_target=f"{WP_FORWARDER}:{HTTP_PORT}",
        note=f"HTTP figures only; {H2C_NOTE}; h2load enters through a splice(2) SOCKS5 forwarder (local mode)",
    )
    app = group.start("waypoint-app", [PY, LOADGEN, "http-server", f"{WP_SERVER_POD}:{HTTP_PORT}"])
    path.helpers.append(app)
    wait_until(lambda: port_open(WP_SERVER_POD, HTTP_PORT), 10, "the waypoint path's HTTP app", app)
    socks = f"socks5://{WP_CLIENT_POD}:15080/{WP_VIP}:80"
    fwd = group.start("waypoint-forwarder", [PY, LOADGEN, "forward", f"{WP_FORWARDER}:{HTTP_PORT}", socks])
    path.helpers.append(fwd)
    wait_until(lambda: port_open(WP_FORWARDER, HTTP_PORT), 10, "the waypoint path's SOCKS forwarder", fwd)
    common = ["-f", str(cluster), "--ca-dir", str(ca_dir), "--access-log", "off"]
    for node, addr in (("wa", WP_NODE_A), ("wb", WP_NODE_B)):
        argv = [*cmd, "--log-level", "warning", "proxy", "--node", node, *common]
        argv += ["--metrics-addr", f"{addr}:15020", "--readiness-addr", f"{addr}:15021"]
        if "--admin-addr" in proxy_help:
            argv += ["--admin-addr", f"{addr}:15000"]
        path.proxies[node] = group.start(f"ztunnel-{node}", argv)
    argv = [*cmd, "--log-level", "warning", "waypoint", "--name", "waypoint", "--namespace", NAMESPACE, *common]
    # metrics on, as every waypoint runs (the lab's too): the node proxies above count theirs
    argv += ["--metrics-addr", f"{WP_NODE_W}:15020", "--readiness-addr", f"{WP_NODE_W}:15021"]
    path.proxies["waypoint"] = group.start("ztunnel-waypoint", argv)
    try:
        for node, addr in (("wa", WP_NODE_A), ("wb", WP_NODE_B), ("waypoint", WP_NODE_W)):
            wait_until(
                lambda addr=addr: http_status(f"http://{addr}:15021/healthz/ready") == 200,  # type: ignore[misc]
                60,
                f"{node} ready",
                path.proxies[node],
            )
        wait_until(lambda: listening(WP_WAYPOINT_POD, 15008), 10, "the waypoint's HBONE port", path.proxies["waypoint"])
    except RuntimeError as e:
        path.stop()
        return unavailable(NAME, str(e)[:500])
    return require_policy(path)


def lab_waypoint(lab: LabTopology, group: ProcessGroup) -> PathSetup:
    """The path in the bench's lab: `lab apply` adds namespace wp (client on node1, app on node2, the Gateway,
    whose waypoint pod the lab deploys and places, the Service and the policy); the client pod dials the VIP
    and in-pod redirection takes it to node1's proxy. The proxies are the lab's (its access logs included)."""
    if ztunnel_help("waypoint") is None:
        return unavailable(NAME, "`ztunnel waypoint` does not exist yet")
    objects = group.workdir / "waypoint-lab.yaml"
    objects.write_text(cluster_yaml(lab=True))
    r = lab.apply(objects)
    if r.returncode != 0:
        return unavailable(NAME, f"`ztunnel lab apply` of the waypoint objects failed: {(r.stderr or r.stdout)[-400:]}")
    lab.refresh()
    client, server = lab.pod(NAMESPACE, "client"), lab.pod(NAMESPACE, "server")
    waypoint = lab.pod(NAMESPACE, "waypoint-0")
    proc = next(iter((waypoint.get("containers") or {}).values()), None)
    if not client["enrolled"] or not proc or not proc.get("running"):
        return unavailable(NAME, f"the lab did not enroll the client or run the waypoint pod: {waypoint}"[:500])
    for node in ("node1", "node2"):
        proxy = lab.node(node).get("proxy")
        if not proxy or not proxy.get("running"):
            return unavailable(NAME, f"the lab runs no proxy on {node}")
        lab.proxy_pids[node] = int(proxy["pid"])
    server_prefix = netns_exec(server["netns"])
    wait_until(lambda: listening("0.0.0.0", HTTP_PORT, server_prefix), 10, "the waypoint path's HTTP app")
    waypoint_pid = int(proc["pid"])
    path = PathSetup(
        NAME,
        entry=(
            f"mesh pod on node1 -> the Service VIP, in-pod {lab.redirect} redirection -> node1's proxy -> HBONE -> "
            f"the lab's waypoint pod (on {waypoint['node']}; ALLOW GET */hello, else 403) -> HBONE -> node2's "
            "proxy -> app pod"
        ),
        http_target=f"{WP_VIP}:80",
        http_host=f"app.{NAMESPACE}.svc.cluster.local",
        h2c=True,
        h2load_target=f"{WP_VIP}:80",
        client_prefix=netns_exec(client["netns"]),
        server_prefix=server_prefix,
        external_pid_source=lambda: {"node1": lab.proxy_pids["node1"], "waypoint": waypoint_pid}
        | {"node2": lab.proxy_pids["node2"]},
        note=f"HTTP figures only; {H2C_NOTE}; the lab's waypoint and proxies log every request/connection",
    )
    return require_policy(path)


def _build(ctx: PathContext) -> PathSetup:
    if isinstance(ctx.topology, LabTopology):
        return lab_waypoint(ctx.topology, ctx.group)
    return local_waypoint(ctx.group)


WAYPOINT = PathKind(NAME, _build)
