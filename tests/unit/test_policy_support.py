"""Shared cluster and helpers for the policy tests: a small cluster and a way to decide through the engine
or through `ztunnel authz check` with the same inputs."""

from __future__ import annotations

import io
import json
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ztunnel.cli import main as cli_main
from ztunnel.config.loader import build_config, load_documents
from ztunnel.config.model import ClusterConfig
from ztunnel.policy.decision import ConnectionAttributes, Decision, HttpRequestAttributes, jwt_principal
from ztunnel.policy.engine import PolicyEngine

CLUSTER_YAML = """
apiVersion: v1
kind: Namespace
metadata: {name: foo, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Namespace
metadata: {name: bar, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Pod
metadata: {name: server, namespace: foo, labels: {app: server, version: v1}}
spec: {serviceAccountName: server, nodeName: node-1}
status: {podIP: 10.244.1.10}
---
apiVersion: v1
kind: Pod
metadata: {name: other, namespace: foo, labels: {app: other}}
spec: {serviceAccountName: other, nodeName: node-1}
status: {podIP: 10.244.1.11}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: foo, labels: {app: client}}
spec: {serviceAccountName: client, nodeName: node-1}
status: {podIP: 10.244.1.12}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: bar, labels: {app: client}}
spec: {serviceAccountName: client, nodeName: node-2}
status: {podIP: 10.244.2.10}
---
apiVersion: v1
kind: Pod
metadata: {name: server, namespace: bar, labels: {app: server}}
spec: {serviceAccountName: server, nodeName: node-2}
status: {podIP: 10.244.2.11}
---
apiVersion: v1
kind: Service
metadata: {name: server, namespace: foo}
spec: {clusterIP: 10.96.0.10, selector: {app: server}, ports: [{port: 80, targetPort: 8080, name: http}]}
"""

FOO_CLIENT = "spiffe://cluster.local/ns/foo/sa/client"
BAR_CLIENT = "spiffe://cluster.local/ns/bar/sa/client"
FOO_CLIENT_IP = "10.244.1.12"
BAR_CLIENT_IP = "10.244.2.10"


def policy(name: str, spec: Any, *, namespace: str = "foo", kind: str = "AuthorizationPolicy", **meta: Any) -> str:
    body = {
        "apiVersion": "security.istio.io/v1",
        "kind": kind,
        "metadata": {"name": name, "namespace": namespace, **meta},
        "spec": spec,
    }
    return yaml.safe_dump(body, sort_keys=False)


def docs(*parts: str) -> str:
    return "\n---\n".join(parts)


def config_of(*policy_yaml: str, root_namespace: str = "istio-system") -> ClusterConfig:
    objects = load_documents(CLUSTER_YAML, "cluster.yaml")
    for i, text in enumerate(policy_yaml):
        objects.extend(load_documents(text, f"policy-{i}.yaml"))
    return build_config(objects, root_namespace=root_namespace)


def engine_of(*policy_yaml: str, root_namespace: str = "istio-system") -> tuple[PolicyEngine, ClusterConfig]:
    config = config_of(*policy_yaml, root_namespace=root_namespace)
    return PolicyEngine.from_config(config), config


@dataclass
class Conn:
    """One connection (and optional request) to decide, in the terms of `authz check`."""

    source: str | None = FOO_CLIENT  # spiffe URI or None = plaintext
    source_ip: str = FOO_CLIENT_IP
    dest: str = "foo/server"
    port: int = 8080
    layer: str = "l4"
    method: str = "GET"
    path: str = "/"
    host: str = ""
    headers: dict[str, str] = field(default_factory=dict)
    request_principal: str | None = None  # default: iss/sub of the claims, as `authz check --jwt-claims` derives it
    claims: dict[str, Any] = field(default_factory=dict)  # the validated JWT's (nested, lists, aud, azp)
    forwarded_for: str | None = None  # X-Forwarded-For chain, comma-separated
    trusted_hops: int = 0
    sni: str | None = None

    def request(self) -> HttpRequestAttributes:
        """The HTTP request as a waypoint hands it to the engine."""
        xff = tuple(x.strip() for x in self.forwarded_for.split(",")) if self.forwarded_for else None
        return HttpRequestAttributes(
            self.method,
            self.path,
            self.host,
            self.headers,
            self.request_principal or jwt_principal(self.claims),
            self.claims,
            forwarded_for=xff,
            trusted_hops=self.trusted_hops,
            sni=self.sni,
        )


def decide(engine: PolicyEngine, config: ClusterConfig, c: Conn) -> Decision:
    ns, name = c.dest.split("/")
    w = config.workload(ns, name)
    assert w is not None, c.dest
    attrs = ConnectionAttributes(c.source, c.source_ip, w, w.ips[0], c.port)
    if c.layer == "l7":
        return engine.check_l7(attrs, c.request())
    return engine.check_l4(attrs)


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        rc = cli_main(argv)
    return rc, out.getvalue(), err.getvalue()


def check_via_cli(tmp: Path, policy_yaml: list[str], c: Conn, root_namespace: str = "istio-system") -> tuple[int, dict]:
    files = [tmp / "cluster.yaml"]
    files[0].write_text(CLUSTER_YAML)
    for i, text in enumerate(policy_yaml):
        f = tmp / f"policy-{i}.yaml"
        f.write_text(text)
        files.append(f)
    argv = ["authz", "check"]
    for f in files:
        argv += ["-f", str(f)]
    argv += ["--from", c.source or "plaintext", "--source-ip", c.source_ip, "--to", f"pod/{c.dest}"]
    argv += ["--port", str(c.port), "--layer", c.layer, "-o", "json", "--root-namespace", root_namespace]
    if c.layer == "l7":
        argv += ["--method", c.method, "--path", c.path, "--host", c.host]
        for k, v in c.headers.items():
            argv += ["--header", f"{k}={v}"]
        if c.request_principal:
            argv += ["--request-principal", c.request_principal]
        if c.claims:
            argv += ["--jwt-claims", json.dumps(c.claims)]
        if c.forwarded_for is not None:
            argv += ["--forwarded-for", c.forwarded_for]
        if c.trusted_hops:
            argv += ["--trusted-hops", str(c.trusted_hops)]
        if c.sni is not None:
            argv += ["--sni", c.sni]
    rc, out, err = run_cli(argv)
    assert rc in (0, 1), err
    return rc, json.loads(out)
