"""Config load time and peak memory against the size of the config file (issue 10 item 11).

Generates a file of ordinary Kubernetes objects (`kubectl get -o yaml` shaped pods with containers,
services, namespaces, AuthorizationPolicies) of about N MB, then loads it in a fresh child process per
measurement, so each peak RSS is that load's alone: file -> bytes -> UTF-8 -> YAML -> objects -> the
`ClusterConfig` snapshot with its lookup indexes, as the proxy does on a reload. Prints JSON: the total and
its parts (parse: bytes to objects; build: objects to the snapshot; indexes: its lookup tables).

    python bench/config_load.py [--sizes 5,50] [--yaml libyaml,pure] [--engine] [--output FILE]

`--yaml pure` forces PyYAML's pure-Python SafeLoader (what the loader used before libyaml);
`--engine` also builds the policy engine from the snapshot (what the proxy does next).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from functools import cached_property
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PODS_PER_NAMESPACE = 50
NODES = 20

_POD = """\
---
apiVersion: v1
kind: Pod
metadata:
  name: {app}-{i}-7d9c8b6f5-x{i}
  namespace: {ns}
  uid: 0c5b7f3e-{i:04x}-4d1a-9c7e-{i:012x}
  labels:
    app: {app}
    version: v1
    pod-template-hash: 7d9c8b6f5
    istio.io/dataplane-mode: ambient
  annotations:
    kubectl.kubernetes.io/default-container: {app}
spec:
  nodeName: node-{node}
  serviceAccountName: {app}
  containers:
  - name: {app}
    image: registry.example.com/shop/{app}:1.4.{i}
    ports:
    - containerPort: 8080
      name: http
      protocol: TCP
    env:
    - name: LOG_LEVEL
      value: info
    - name: UPSTREAM
      value: http://{app}-backend.{ns}.svc.cluster.local:8080
    resources:
      requests: {{cpu: 100m, memory: 128Mi}}
      limits: {{cpu: "1", memory: 512Mi}}
    readinessProbe:
      httpGet: {{path: /healthz, port: 8080}}
      periodSeconds: 5
status:
  phase: Running
  podIP: 10.{a}.{b}.{c}
  podIPs:
  - ip: 10.{a}.{b}.{c}
  conditions:
  - type: Ready
    status: "True"
"""

_SERVICE = """\
---
apiVersion: v1
kind: Service
metadata:
  name: {app}
  namespace: {ns}
spec:
  clusterIP: 10.96.{b}.{c}
  selector: {{app: {app}}}
  ports:
  - {{name: http, port: 80, targetPort: 8080, protocol: TCP}}
"""

_POLICY = """\
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: allow-{app}
  namespace: {ns}
spec:
  selector:
    matchLabels: {{app: {app}}}
  action: ALLOW
  rules:
  - from:
    - source:
        principals: [cluster.local/ns/{ns}/sa/frontend, cluster.local/ns/ingress/sa/gateway]
    to:
    - operation:
        ports: ["8080"]
"""


def generate(path: Path, megabytes: float) -> dict[str, int]:
    """Write a config of about `megabytes` MB; returns the object counts."""
    target = int(megabytes * 1024 * 1024)
    counts = {"pods": 0, "services": 0, "policies": 0, "namespaces": 0}
    size = 0
    i = 0
    with path.open("w", encoding="utf-8") as f:
        while size < target:
            ns_index, k = divmod(i, PODS_PER_NAMESPACE)
            ns = f"team-{ns_index}"
            parts = []
            if k == 0:
                parts.append(f"---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: {ns}}}\n")
                counts["namespaces"] += 1
            app = f"app-{k // 5}"
            a, b, c = (i >> 16) & 255, (i >> 8) & 255, i & 255
            parts.append(_POD.format(app=app, i=i, ns=ns, node=i % NODES, a=a, b=b, c=c))
            counts["pods"] += 1
            if k % 5 == 0:
                parts.append(_SERVICE.format(app=app, ns=ns, b=(i >> 8) & 255, c=i & 255))
                parts.append(_POLICY.format(app=app, ns=ns))
                counts["services"] += 1
                counts["policies"] += 1
            text = "".join(parts)
            f.write(text)
            size += len(text)
            i += 1
    return counts


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def child(file: str, yaml_mode: str, engine: bool) -> dict[str, Any]:
    """One measurement in this (fresh) process."""
    import yaml

    from ztunnel.config import loader

    if yaml_mode == "pure" and hasattr(loader, "YAML_LOADER"):
        loader.YAML_LOADER = yaml.SafeLoader  # type: ignore[attr-defined]
    if engine:
        from ztunnel.policy.engine import PolicyEngine
    before = _maxrss_mb()
    start = time.perf_counter()
    objects = loader.read_objects([file])  # bytes -> text -> YAML -> objects
    parsed = time.perf_counter()
    cfg = loader.build_config(objects)
    built = time.perf_counter()
    for name, attr in vars(type(cfg)).items():  # the lookup indexes (built lazily, on first use, before)
        if isinstance(attr, cached_property):
            getattr(cfg, name)
    indexed = time.perf_counter()
    out: dict[str, Any] = {
        "load_s": round(indexed - start, 2),
        "parse_s": round(parsed - start, 2),
        "build_s": round(built - parsed, 2),
        "indexes_s": round(indexed - built, 2),
        "workloads": len(cfg.workloads),
        "rss_before_mb": round(before, 1),
        "peak_rss_mb": round(_maxrss_mb(), 1),
    }
    if engine:
        start = time.perf_counter()
        PolicyEngine.from_config(cfg)
        out["engine_s"] = round(time.perf_counter() - start, 2)
        out["peak_rss_with_engine_mb"] = round(_maxrss_mb(), 1)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="5,50", help="config sizes in MB, comma separated (default 5,50)")
    p.add_argument("--yaml", default="libyaml,pure", help="parsers to measure: libyaml, pure (default both)")
    p.add_argument("--engine", action="store_true", help="also build the policy engine from the snapshot")
    p.add_argument("--output", help="also write the JSON here")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.yaml, args.engine)))
        return 0

    results = []
    with tempfile.TemporaryDirectory(prefix="ztunnel-config-bench-") as tmp:
        for size in (float(s) for s in args.sizes.split(",") if s):
            path = Path(tmp) / f"cluster-{size:g}mb.yaml"
            counts = generate(path, size)
            for mode in (m for m in args.yaml.split(",") if m):
                argv_child = [sys.executable, __file__, "--child", str(path), "--yaml", mode]
                if args.engine:
                    argv_child.append("--engine")
                run = subprocess.run(argv_child, capture_output=True, text=True, check=False, cwd=ROOT)
                if run.returncode != 0:
                    print(run.stderr, file=sys.stderr)
                    return 1
                results.append(
                    {
                        "size_mb": round(os.path.getsize(path) / 1024 / 1024, 1),
                        "yaml": mode,
                        **counts,
                        **json.loads(run.stdout.strip().splitlines()[-1]),
                    }
                )
    import yaml

    out = {
        "benchmark": "config_load",
        "libyaml_available": bool(getattr(yaml, "__with_libyaml__", False)),
        "python": sys.version.split()[0],
        "results": results,
    }
    text = json.dumps(out, indent=2)
    print(text)
    if args.output:
        Path(args.output).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
