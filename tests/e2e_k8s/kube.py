"""kubectl for the end-to-end suite: the cluster is whatever KUBECONFIG points at (vagrant/ makes a kind
cluster with two workers). Every call has a timeout; waits poll with a deadline."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tests.support.eventually import eventually

ROOT = Path(__file__).resolve().parents[2]
IMAGE = os.environ.get("E2E_IMAGE", "ztunnel-py:dev")  # the image the install runs; the apps run it too
PULL = os.environ.get("E2E_PULL_POLICY", "Never")  # kind: loaded with `kind load`, never pulled
TCPDUMP_IMAGE = os.environ.get("E2E_TCPDUMP_IMAGE", "nicolaka/netshoot:v0.13")
SYSTEM_NS = os.environ.get("E2E_SYSTEM_NAMESPACE", "istio-system")

# An HTTP server for any path: answers "<METHOD> <path> from <pod>", port 8080 (greeter: 3000 via $PORT).
SERVER = r"""
import http.server, os
class H(http.server.BaseHTTPRequestHandler):
    def _any(self):
        body = f"{self.command} {self.path} from {os.environ.get('POD_NAME', '?')}\n".encode()
        self.send_response(200); self.send_header("Content-Length", str(len(body))); self.end_headers()
        self.wfile.write(body)
    do_GET = do_POST = do_PUT = do_DELETE = _any
    def log_message(self, fmt, *a): print(self.client_address[0], fmt % a, flush=True)
http.server.ThreadingHTTPServer(("", int(os.environ.get("PORT", "8080"))), H).serve_forever()
"""
# One request from inside a pod: prints "<status> <body>" or "0 <error>" (the connection failed).
CLIENT = r"""
import sys, urllib.request
req = urllib.request.Request(sys.argv[1], method=sys.argv[2], data=b"x" if sys.argv[2] == "POST" else None)
for k, v in (h.split(":", 1) for h in sys.argv[3:]): req.add_header(k, v)
try:
    with urllib.request.urlopen(req, timeout=5) as r: print(r.status, r.read().decode().strip())
except urllib.error.HTTPError as e: print(e.code, e.read().decode().strip())
except Exception as e: print(0, type(e).__name__, e)
"""


class KubeError(AssertionError):
    pass


def skip_reason() -> str | None:
    """None when a cluster is reachable through KUBECONFIG, else why the suite is skipped."""
    if not os.environ.get("KUBECONFIG"):
        return "tests/e2e_k8s needs a Kubernetes cluster: set KUBECONFIG (vagrant/ brings up a kind cluster)"
    if shutil.which("kubectl") is None:
        return "tests/e2e_k8s needs kubectl on PATH"
    p = subprocess.run(["kubectl", "version", "--request-timeout=5s", "-o", "json"], capture_output=True, text=True)
    if p.returncode != 0:
        return f"the cluster of KUBECONFIG={os.environ['KUBECONFIG']} does not answer: {p.stderr.strip()[:200]}"
    return None


@dataclass
class Kube:
    def run(self, *args: str, input: str | None = None, check: bool = True, timeout: float = 120) -> str:
        p = subprocess.run(["kubectl", *args], input=input, capture_output=True, text=True, timeout=timeout)
        if check and p.returncode != 0:
            raise KubeError(f"kubectl {' '.join(args)}: {p.stderr.strip()}")
        return p.stdout

    def apply(self, objs: str | list[dict[str, Any]]) -> None:
        text = objs if isinstance(objs, str) else yaml.safe_dump_all(objs, sort_keys=False)
        self.run("apply", "-f", "-", input=text)

    def delete(self, objs: str | list[dict[str, Any]]) -> None:
        text = objs if isinstance(objs, str) else yaml.safe_dump_all(objs, sort_keys=False)
        self.run("delete", "--ignore-not-found", "--wait=false", "-f", "-", input=text)

    def get(self, *args: str) -> Any:
        return json.loads(self.run("get", *args, "-o", "json"))

    def nodes(self) -> list[str]:
        """Schedulable workers first (kind: the control plane is tainted)."""
        items = self.get("nodes")["items"]
        workers = [n["metadata"]["name"] for n in items if not n["spec"].get("taints")]
        return workers or [n["metadata"]["name"] for n in items]

    def wait_ready(self, ns: str, selector: str, timeout: float = 180) -> None:
        wait = ["wait", "-n", ns, "--for=condition=Ready", "pod", "-l", selector, f"--timeout={int(timeout)}s"]
        self.run(*wait, timeout=timeout + 10)

    def pod(self, ns: str, selector: str) -> dict[str, Any]:
        items = self.get("pods", "-n", ns, "-l", selector)["items"]
        running = [
            p for p in items if p["status"].get("phase") == "Running" and not p["metadata"].get("deletionTimestamp")
        ]
        if len(running) != 1:
            raise KubeError(f"expected one running pod {ns}/{selector}, got {[p['metadata']['name'] for p in items]}")
        return running[0]

    def node_pod(self, node: str) -> dict[str, Any]:
        """The ztunnel DaemonSet pod of `node`."""
        on_node = f"spec.nodeName={node}"
        items = self.get("pods", "-n", SYSTEM_NS, "-l", "app=ztunnel", "--field-selector", on_node)["items"]
        if len(items) != 1:
            raise KubeError(f"no single ztunnel pod on {node}: {[p['metadata']['name'] for p in items]}")
        return items[0]

    def http(self, ns: str, pod: str, url: str, method: str = "GET", *headers: str) -> tuple[int, str]:
        out = self.run("exec", "-n", ns, pod, "--", "python3", "-c", CLIENT, url, method, *headers, timeout=30)
        status, _, body = out.strip().partition(" ")
        return int(status), body

    def metrics(self, node: str) -> str:
        """The node proxy's /stats/prometheus (its metrics listen on the node IP: hostNetwork)."""
        pod = self.node_pod(node)
        code = "import urllib.request as u, sys; sys.stdout.write(u.urlopen(sys.argv[1], timeout=5).read().decode())"
        url = f"http://{pod['status']['podIP']}:15020/stats/prometheus"
        name = pod["metadata"]["name"]
        return self.run("exec", "-n", SYSTEM_NS, name, "-c", "proxy", "--", "python3", "-c", code, url)

    def kill_component(self, node: str, component: str) -> int:
        """SIGTERM the `node-agent` or `proxy` process of `node`'s ztunnel pod (its container restarts);
        returns the container's restart count before. An exact argv match: the pod shares the host's PID
        namespace, so nothing else may be hit."""
        pod = self.node_pod(node)
        container = "node-agent" if component == "node-agent" else "proxy"
        before = next(s["restartCount"] for s in pod["status"]["containerStatuses"] if s["name"] == container)
        code = (
            "import os, signal, sys\n"
            "for p in filter(str.isdigit, os.listdir('/proc')):\n"
            "    try: argv = open(f'/proc/{p}/cmdline', 'rb').read().split(b'\\0')\n"
            "    except OSError: continue\n"
            "    if any(a.endswith(b'/ztunnel') for a in argv[:2]) and sys.argv[1].encode() in argv:\n"
            "        os.kill(int(p), signal.SIGTERM); print(p)\n"
        )
        name = pod["metadata"]["name"]
        out = self.run("exec", "-n", SYSTEM_NS, name, "-c", container, "--", "python3", "-c", code, component)
        if not out.strip():
            raise KubeError(f"no {component} process found in {pod['metadata']['name']}")
        return int(before)

    def restarted(self, node: str, container: str, before: int, timeout: float = 120) -> None:
        def check() -> bool:
            pod = self.node_pod(node)
            st = next(s for s in pod["status"]["containerStatuses"] if s["name"] == container)
            return bool(st["restartCount"] > before and st.get("ready"))

        eventually(check, timeout, interval=1, what=f"{container} on {node} restarted and ready")


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


def app_pod(name: str, ns: str, node: str, *, sa: str, labels: dict[str, str], port: int = 8080,
            server: bool = True) -> list[dict[str, Any]]:
    """A ServiceAccount and a pod of the test image pinned to `node`: the HTTP server, or an idle client."""
    command = ["python3", "-c", SERVER] if server else ["sleep", "infinity"]
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": sa, "namespace": ns}},
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name, "namespace": ns, "labels": labels},
            "spec": {
                "serviceAccountName": sa,
                "nodeName": node,
                "terminationGracePeriodSeconds": 2,
                "containers": [
                    {
                        "name": "app",
                        "image": IMAGE,
                        "imagePullPolicy": PULL,
                        "command": command,
                        "env": [
                            {"name": "PORT", "value": str(port)},
                            {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                        ],
                        "ports": [{"containerPort": port}] if server else [],
                        "readinessProbe": {"tcpSocket": {"port": port}, "periodSeconds": 2} if server else None,
                    }
                ],
            },
        },
    ]


def namespace(name: str, labels: dict[str, str]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}}


def waypoint_objects(ns: str, name: str = "waypoint") -> list[dict[str, Any]]:
    """The chart's waypoint template for `ns` (rendered by deploy/tools/helmlite, no Helm needed)."""
    sys.path.insert(0, str(ROOT / "deploy" / "tools"))
    import helmlite

    tag = IMAGE.rsplit(":", 1)[1] if ":" in IMAGE else "latest"
    repo = IMAGE.rsplit(":", 1)[0]
    values = {
        "waypoints": [{"name": name, "namespace": ns, "replicas": 1}],
        "image": {"repository": repo, "tag": tag, "pullPolicy": PULL},
    }
    rendered = helmlite.render_chart(ROOT / "deploy" / "helm" / "ztunnel-py", namespace=SYSTEM_NS, values=values)
    return helmlite.objects({k: v for k, v in rendered.items() if k.endswith("/waypoints.yaml")})
