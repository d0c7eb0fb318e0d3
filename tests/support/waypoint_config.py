"""The greeter cluster the waypoint's unit tests decide on: namespace `greet`, three greeter pods (one not ready)
behind Service `greeter` (VIP:80 -> the pods' named port `http`, 8080) and the seed's ALLOW GET `*/hello`."""

from __future__ import annotations

from ztunnel.config.loader import build_config, load_documents
from ztunnel.config.model import ClusterConfig

VIP = "10.96.0.65"
CLIENT = "spiffe://cluster.local/ns/greet/sa/client"


def greeter_pod(name: str, ip: str, *, ready: bool = True, app: str = "greeter-service") -> str:
    """A pod of namespace `greet` on node-b, as a YAML document (leading `---`), with container port `http`."""
    conditions = "" if ready else ", conditions: [{type: Ready, status: 'False'}]"
    return (
        "---\napiVersion: v1\nkind: Pod\n"
        f"metadata: {{name: {name}, namespace: greet, uid: uid-{name}, labels: {{app: {app}}}}}\n"
        f"spec: {{nodeName: node-b, serviceAccountName: {name}, containers: [{{name: app, ports: "
        "[{name: http, containerPort: 8080}]}]}\n"
        f'status: {{podIP: "{ip}"{conditions}}}\n'
    )


BASE = (
    "apiVersion: v1\nkind: Namespace\nmetadata: {name: greet, labels: {istio.io/dataplane-mode: ambient}}\n"
    + greeter_pod("greeter-a", "127.0.165.1")
    + greeter_pod("greeter-b", "127.0.165.2")
    + greeter_pod("greeter-c", "127.0.165.3", ready=False)
    + "---\napiVersion: v1\nkind: Service\nmetadata: {name: greeter, namespace: greet}\n"
    f"spec: {{clusterIP: {VIP}, selector: {{app: greeter-service}}, ports: [{{port: 80, targetPort: http}}]}}\n"
    "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n"
    "metadata: {name: greeter-service, namespace: greet}\n"
    "spec:\n  selector: {matchLabels: {app: greeter-service}}\n  action: ALLOW\n"
    "  rules: [{to: [{operation: {methods: [GET], paths: ['*/hello']}}]}]\n"
)


def mesh_config(normalization: str) -> str:
    """The istio ConfigMap (a YAML document opened by `---`, to append to others) whose mesh config sets
    `pathNormalization` to `normalization` (NONE, BASE, MERGE_SLASHES, DECODE_AND_MERGE_SLASHES)."""
    return (
        "\n---\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: istio, namespace: istio-system}\n"
        f"data:\n  mesh: |\n    pathNormalization:\n      normalization: {normalization}\n"
    )


def config(text: str) -> ClusterConfig:
    """The snapshot of these YAML documents (BASE plus whatever a test adds)."""
    return build_config(load_documents(text, "c.yaml"))


# the greeter walk-through's (seed 002) policies, verbatim but for the namespace: `.format(ns=...)`
GREETER_DENY_ALL = """\
apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata:
  name: deny-all
  namespace: {ns}
spec:
  {{}}
"""
GREETER_GET_HELLO = """\
apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata:
 name: greeter-service
 namespace: {ns}
spec:
 selector:
  matchLabels:
    app: greeter-service
 rules:
  - to:
    - operation:
        methods: ["GET"]
        paths: ["*/hello"]
"""
