"""Programs that lab pods run (`[sys.executable, path, args...]`): standalone scripts on the stdlib and the venv's
packages, each logging one JSON line per request to stdout (the pod's log, which the lab tests read)."""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
TESTAPP = HERE / "testapp.py"
JWKS_SERVER = HERE / "jwks_server.py"
EXTAUTHZ_SERVER = HERE / "extauthz_server.py"
PROTO = HERE.parents[1] / "fixtures" / "envoy_ext_authz.proto"  # Envoy's ext-authz field numbers, for the gRPC side


def pod(
    name: str,
    namespace: str,
    node: str,
    argv: Sequence[str | Path] | None = None,
    *,
    ports: Sequence[int] = (),
    labels: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """A lab Pod (service account and `app` label = its name) running ARGV with the test's Python (the venv's:
    the programs need its packages), ready once its first port accepts; no ARGV: an idle client pod."""
    container: dict[str, Any] = {"name": "main", "command": ["sleep", "infinity"]}
    if argv is not None:
        container = {
            "name": "main",
            "command": [sys.executable, *map(str, argv)],
            "ports": [{"containerPort": p} for p in ports],
        }
        if ports:
            container["readinessProbe"] = {"tcpSocket": {"port": ports[0]}}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "labels": {"app": name, **(labels or {})}},
        "spec": {"nodeName": node, "serviceAccountName": name, "containers": [container]},
    }


def service(
    name: str, namespace: str, cluster_ip: str, ports: Mapping[str, int], labels: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """A ClusterIP Service selecting `app: NAME`, PORTS by name (Istio reads the protocol from `http`/`grpc`
    names), each to the same target port."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": namespace, "labels": dict(labels or {})},
        "spec": {
            "clusterIP": cluster_ip,
            "selector": {"app": name},
            "ports": [{"name": n, "port": p, "targetPort": p} for n, p in ports.items()],
        },
    }


def waypoint_gateway(name: str, namespace: str, listener: str = "mesh") -> dict[str, Any]:
    """An Istio waypoint as a user declares one (`istioctl waypoint generate`); the lab deploys its pod."""
    return {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "Gateway",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "gatewayClassName": "istio-waypoint",
            "listeners": [{"name": listener, "port": 15008, "protocol": "HBONE"}],
        },
    }
