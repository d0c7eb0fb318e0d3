"""For tests of the identity layer (and of anything that needs a CA): a two-node config, SPIFFE ids, token
files, a free port."""

from __future__ import annotations

import os
import secrets
import socket
from collections.abc import Mapping
from pathlib import Path

TRUST_DOMAIN = "cluster.local"


def pod_yaml(name: str, namespace: str, node: str, service_account: str, ip: str, uid: str | None = None) -> str:
    uid_field = "" if uid is None else f", uid: {uid}"
    return (
        "---\napiVersion: v1\nkind: Pod\n"
        f"metadata: {{name: {name}, namespace: {namespace}{uid_field}, labels: {{app: {name}}}}}\n"
        f"spec: {{nodeName: {node}, serviceAccountName: {service_account}}}\n"
        f"status: {{podIP: {ip}}}\n"
    )


def two_node_config_yaml() -> str:
    """Namespace `shop` in the mesh: web on node-a, db on node-b, and service account `shared` on both."""
    return (
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}\n"
        + pod_yaml("web", "shop", "node-a", "web", "10.1.0.1")
        + pod_yaml("db", "shop", "node-b", "db", "10.1.0.2")
        + pod_yaml("shared-a", "shop", "node-a", "shared", "10.1.0.3")
        + pod_yaml("shared-b", "shop", "node-b", "shared", "10.1.0.4")
    )


def spiffe(namespace: str, service_account: str, trust_domain: str = TRUST_DOMAIN) -> str:
    return f"spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}"


def write_token_file(path: str | Path, nodes: Mapping[str, str] | None = None) -> dict[str, str]:
    """Write a 0600 token file; returns node -> token. Default nodes: node-a and node-b, random tokens."""
    tokens = dict(nodes) if nodes else {n: secrets.token_urlsafe(24) for n in ("node-a", "node-b")}
    p = Path(path)
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        for node, token in tokens.items():
            f.write(f"{token}: {node}\n")
    os.chmod(p, 0o600)
    return tokens


def free_port(host: str = "127.0.0.1") -> int:
    """A port free right now, for a subprocess that must be told its port (racy by nature; retry on clash)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])
