"""RSS of a proxy whose config comes from the Kubernetes API (the fake server of tests/support/kubeapi.py),
with 5,000 pods (as a cluster returns them: managedFields, env, volumes, status), 1,000 Services and 1,000
AuthorizationPolicies in its cache; the same objects through `-f FILE` for comparison (the file source keeps
whole objects). Prints JSON.

    unshare -n sh -c 'ip link set lo up; .venv/bin/python bench/kube_source_rss.py --output F'
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.support.identity import free_port  # noqa: E402
from tests.support.kubeapi import FakeKubeApi, authz_policy, namespace, pod, service  # noqa: E402

ZTUNNEL = str(Path(sys.executable).with_name("ztunnel"))


def objects(pods: int, services: int, policies: int) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = [namespace(f"ns-{i}", {"istio.io/dataplane-mode": "ambient"}) for i in range(50)]
    for i in range(pods):
        ip = f"10.{i // 65536}.{i // 256 % 256}.{i % 256}"
        out.append(pod(f"app-{i}", f"ns-{i % 50}", node=f"node-{i % 20}", ip=ip, heavy=True))
    for i in range(services):
        out.append(service(f"svc-{i}", f"ns-{i % 50}", f"10.96.{i // 256}.{i % 256}", {"app": f"app-{i}"}))
    for i in range(policies):
        spec = {
            "selector": {"matchLabels": {"app": f"app-{i}"}},
            "action": "ALLOW",
            "rules": [{"from": [{"source": {"principals": [f"cluster.local/ns/ns-{i % 50}/sa/app-{i + 1}"]}}]}],
        }
        out.append(authz_policy(f"pol-{i}", f"ns-{i % 50}", spec))
    return out


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz/ready", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def run_proxy(work: Path, ca: Path, source_args: list[str], settle: float) -> dict[str, float]:
    ports = [free_port() for _ in range(3)]
    argv = [
        ZTUNNEL, "--log-level", "warning", "proxy", "--node", "node-bench", *source_args, "--ca-dir", str(ca),
        "--metrics-addr", f"127.0.0.1:{ports[0]}", "--admin-addr", f"127.0.0.1:{ports[1]}",
        "--readiness-addr", f"127.0.0.1:{ports[2]}",
    ]  # fmt: skip
    started = time.monotonic()
    with open(work / "proxy.log", "ab") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
    try:
        while not ready(ports[2]):
            if proc.poll() is not None or time.monotonic() - started > 300:
                raise SystemExit(f"proxy did not become ready; see {work / 'proxy.log'}")
            time.sleep(0.2)
        took = time.monotonic() - started
        at_ready = rss_mib(proc.pid)
        time.sleep(settle)
        return {"ready_s": round(took, 1), "rss_mib_ready": round(at_ready, 1), "rss_mib": round(rss_mib(proc.pid), 1)}
    finally:
        proc.terminate()
        proc.wait(30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pods", type=int, default=5000)
    ap.add_argument("--services", type=int, default=1000)
    ap.add_argument("--policies", type=int, default=1000)
    ap.add_argument("--settle", type=float, default=5.0, help="seconds after ready before the RSS is read again")
    ap.add_argument("--output")
    args = ap.parse_args()
    objs = objects(args.pods, args.services, args.policies)
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        ca = work / "ca"
        subprocess.run([ZTUNNEL, "ca", "init", "--dir", str(ca)], check=True, capture_output=True)
        empty = work / "empty.yaml"
        empty.write_text(json.dumps(namespace("bench")))
        results: dict[str, Any] = {"empty_file": run_proxy(work, ca, ["-f", str(empty)], args.settle)}
        with FakeKubeApi() as api:
            api.put_all(objs)
            kubeconfig = api.kubeconfig(work / "kubeconfig")
            kube_args = ["--source", "kubernetes", "--kubeconfig", str(kubeconfig)]
            results["kubernetes"] = run_proxy(work, ca, kube_args, args.settle)
            same = work / "cluster.yaml"
            same.write_text("\n---\n".join(json.dumps(o) for pl in api.objects.values() for o in pl.values()))
            results["file_same_objects"] = run_proxy(work, ca, ["-f", str(same)], args.settle)
            results["file_bytes"] = same.stat().st_size
    out = {
        "bench": "kube_source_rss",
        "objects": {"pods": args.pods, "services": args.services, "policies": args.policies, "namespaces": 50},
        "results": results,
    }
    text = json.dumps(out, indent=2)
    print(text)
    if args.output:
        Path(args.output).write_text(text + "\n")


if __name__ == "__main__":
    main()
