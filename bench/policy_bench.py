"""Policy decision time against the number of policies in the cluster (DESIGN §6: 10,000 policies of 10 rules;
issue 12: a waypoint's decision with 1,000 L7 policies <= 20 us).

Two layouts: `spread` (10 policies per namespace, like many teams each owning a namespace) and
`one-namespace` (all policies in one namespace, each selecting its own app label). Each decision is a
`check_l4` (`--mode l4`, default) or a `check_l7` of an HTTP request (`--mode l7`: rules on methods, paths,
hosts, headers, JWT principals/claims/audiences, remoteIpBlocks via X-Forwarded-For) on a warm engine, for a
mix of connections/requests that end allowed and denied. Prints JSON.

    python bench/policy_bench.py [--mode l4|l7] [--sizes 100,1000,10000] [--decisions 3000] [--output FILE]
    python bench/policy_bench.py --mode l7 --sizes 1000      # the issue 12 figure
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ztunnel.config.loader import build_config
from ztunnel.config.model import KubeObject, Source
from ztunnel.policy.decision import ConnectionAttributes, HttpRequestAttributes
from ztunnel.policy.engine import PolicyEngine

RULES_PER_POLICY = 10
APPS_PER_NAMESPACE = 9


def _obj(body: dict[str, Any], i: int) -> KubeObject:
    meta = body["metadata"]
    return KubeObject(
        api_version=body["apiVersion"],
        kind=body["kind"],
        name=meta["name"],
        namespace=meta.get("namespace", ""),
        labels=meta.get("labels", {}),
        annotations=meta.get("annotations", {}),
        body=body,
        source=Source("bench", i),
    )


def _rule(rng: random.Random, ns: str, j: int) -> dict[str, Any]:
    return {
        "from": [
            {
                "source": {
                    "principals": [f"cluster.local/ns/{ns}/sa/client-{j}", f"cluster.local/ns/client-ns-{j}/sa/*"],
                    "notIpBlocks": [f"192.168.{j}.0/24"],
                }
            },
            {"source": {"namespaces": [f"team-{rng.randrange(1000)}"]}},
        ],
        "to": [{"operation": {"ports": [str(8000 + j), "9090"]}}],
        "when": [{"key": "source.ip", "notValues": ["10.99.0.0/16"]}],
    }


def _l7_rule(rng: random.Random, ns: str, j: int) -> dict[str, Any]:
    """An ALLOW rule as a waypoint's users write them: who (mesh identity or JWT), what (method, path, host), when."""
    rule: dict[str, Any] = {
        "from": [
            {"source": {"principals": [f"cluster.local/ns/{ns}/sa/client-{j}"], "notRemoteIpBlocks": ["192.0.2.0/24"]}},
            {"source": {"requestPrincipals": [f"https://idp-{j}.example/*"]}},
        ],
        "to": [
            {
                "operation": {
                    "methods": ["GET", "HEAD"] if j % 2 else ["POST", "PUT"],
                    "paths": [f"/api/v{j}/*", f"*/items-{j}", f"/exact-{j}"],
                    "hosts": [f"svc-{j}.{ns}.svc.cluster.local", f"svc-{j}.{ns}.svc.cluster.local:*"],
                    "notPaths": ["/admin/*"],
                }
            }
        ],
        "when": [
            {"key": "request.headers[x-tenant]", "values": [f"tenant-{j}", "shared-*"]},
            {"key": "request.auth.claims[realm][roles]", "notValues": [f"banned-{rng.randrange(100)}"]},
        ],
    }
    if j % 3 == 0:
        rule["when"].append({"key": "request.auth.audiences", "values": [f"api-{j}", "*.example"]})
    return rule


def build(
    n_policies: int, layout: str, seed: int = 1, mode: str = "l4"
) -> tuple[Any, PolicyEngine, list[ConnectionAttributes]]:
    rng = random.Random(seed)
    docs: list[dict[str, Any]] = []
    per_ns = 10 if layout == "spread" else n_policies
    namespaces = [f"ns-{i}" for i in range(max(1, n_policies // per_ns))]
    count = 0
    pods = []
    for ns in namespaces:
        docs.append({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
        k = 0
        while k < per_ns and count < n_policies:
            if k == 0 and mode == "l7":  # one namespace-wide DENY per namespace
                spec: dict[str, Any] = {
                    "action": "DENY",
                    "rules": [
                        {
                            "to": [{"operation": {"paths": [f"/internal-{j}/*"], "methods": ["DELETE"]}}],
                            "when": [{"key": "request.headers[x-debug]", "values": [f"on-{j}"]}],
                        }
                        for j in range(RULES_PER_POLICY)
                    ],
                }
                name = "deny-internal"
            elif k == 0:
                spec = {
                    "action": "DENY",
                    "rules": [
                        {
                            "from": [{"source": {"ipBlocks": [f"172.16.{j}.0/24"]}}],
                            "to": [{"operation": {"ports": ["22"]}}],
                        }
                        for j in range(RULES_PER_POLICY)
                    ],
                }
                name = "deny-ssh"
            else:
                app = f"app-{k}"
                spec = {
                    "selector": {"matchLabels": {"app": app}},
                    "action": "ALLOW",
                    "rules": [(_l7_rule if mode == "l7" else _rule)(rng, ns, j) for j in range(RULES_PER_POLICY)],
                }
                name = f"allow-{app}"
                if len(pods) < 200:
                    pods.append((ns, app))
            docs.append(
                {
                    "apiVersion": "security.istio.io/v1",
                    "kind": "AuthorizationPolicy",
                    "metadata": {"name": name, "namespace": ns},
                    "spec": spec,
                }
            )
            count += 1
            k += 1
    for i, (ns, app) in enumerate(pods):
        docs.append(
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": f"{app}-pod", "namespace": ns, "labels": {"app": app}},
                "spec": {"nodeName": "node-1", "serviceAccountName": app},
                "status": {"podIP": f"10.{100 + i // 60000}.{(i // 250) % 250}.{i % 250 + 1}"},
            }
        )
    objects = [_obj(d, i) for i, d in enumerate(docs)]
    config = build_config(objects)
    t0 = time.perf_counter()
    engine = PolicyEngine.from_config(config)
    build_s = time.perf_counter() - t0
    assert not engine.errors, engine.errors[:3]
    conns = []
    for w in config.workloads:
        for j in range(20):
            principal = (
                f"spiffe://cluster.local/ns/{w.namespace}/sa/client-{j % RULES_PER_POLICY}"
                if j % 3
                else f"spiffe://cluster.local/ns/elsewhere/sa/x{j}"
            )
            port = 8000 + (j % 12)
            conns.append(ConnectionAttributes(principal, f"10.1.{j}.7", w, w.ips[0], port))
    rng.shuffle(conns)
    engine.build_seconds = build_s  # type: ignore[attr-defined]
    return config, engine, conns


def requests(conns: list[ConnectionAttributes], seed: int = 2) -> list[HttpRequestAttributes]:
    """One HTTP request per connection for `--mode l7`, aimed at the destination's namespace; some allowed."""
    rng = random.Random(seed)
    out = []
    for i, conn in enumerate(conns):
        ns = conn.destination.namespace
        j = rng.randrange(RULES_PER_POLICY)
        jwt = i % 4 == 0
        claims: dict[str, Any] = (
            {"iss": f"https://idp-{j}.example", "sub": f"user-{i}", "aud": [f"api-{j}"], "realm": {"roles": ["user"]}}
            if jwt
            else {}
        )
        path = rng.choice([f"/api/v{j}/orders/{i}", f"/shop/items-{j}", f"/exact-{j}", "/admin/x", f"/internal-{j}/y"])
        out.append(
            HttpRequestAttributes(
                method="GET" if j % 2 else rng.choice(["POST", "DELETE"]),
                path=path + ("?page=2" if i % 5 == 0 else ""),
                host=f"svc-{j}.{ns}.svc.cluster.local" + (":8080" if i % 3 == 0 else ""),
                headers={
                    "x-tenant": rng.choice([f"tenant-{j}", "shared-eu", "other"]),
                    "user-agent": "bench/1.0",
                    "accept": "*/*",
                    "x-forwarded-for": f"198.51.100.{i % 250}, 203.0.113.{j}",
                },
                request_principal=f"https://idp-{j}.example/user-{i}" if jwt else None,
                request_claims=claims,
                trusted_hops=1,
            )
        )
    return out


def measure(n: int, layout: str, decisions: int, mode: str = "l4") -> dict[str, Any]:
    config, engine, conns = build(n, layout, mode=mode)
    reqs = requests(conns)

    def check(i: int) -> Any:
        c = conns[i % len(conns)]
        return engine.check_l7(c, reqs[i % len(reqs)]) if mode == "l7" else engine.check_l4(c)

    t_rebuild = time.perf_counter()
    PolicyEngine.from_config(config, previous=engine)
    rebuild_ms = (time.perf_counter() - t_rebuild) * 1000
    t0 = time.perf_counter_ns()
    check(0)  # includes compiling the workload's policy set
    cold_us = (time.perf_counter_ns() - t0) / 1000
    for i in range(len(conns)):  # warm every workload once
        check(i)
    samples = []
    allowed = 0
    for i in range(decisions):
        t = time.perf_counter_ns()
        d = check(i)
        samples.append(time.perf_counter_ns() - t)
        allowed += d.allowed
    samples.sort()
    return {
        "mode": mode,
        "layout": layout,
        "policies": n,
        "rules_per_policy": RULES_PER_POLICY,
        "engine_build_ms": round(engine.build_seconds * 1000, 1),  # type: ignore[attr-defined]
        "engine_rebuild_unchanged_ms": round(rebuild_ms, 1),
        "first_decision_us": round(cold_us, 1),
        "median_us": round(statistics.median(samples) / 1000, 2),
        "p99_us": round(samples[int(len(samples) * 0.99)] / 1000, 2),
        "decisions": decisions,
        "allowed_fraction": round(allowed / decisions, 3),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mode", choices=["l4", "l7"], default="l4", help="check_l4 (node proxy) or check_l7 (waypoint)")
    p.add_argument("--sizes", default="100,1000,10000")
    p.add_argument("--layouts", default="spread,one-namespace")
    p.add_argument("--decisions", type=int, default=3000)
    p.add_argument("--output", help="also write the JSON here")
    p.add_argument("--quick", action="store_true", help="100 and 1,000 policies, spread layout only")
    args = p.parse_args(argv)
    if args.quick:
        args.sizes, args.layouts, args.decisions = "100,1000", "spread", min(args.decisions, 1000)
    results = [
        measure(int(n), layout, args.decisions, args.mode)
        for layout in args.layouts.split(",")
        for n in args.sizes.split(",")
    ]
    largest = max(results, key=lambda r: (r["policies"], r["median_us"]))
    summary = (
        f"{largest['policies']} policies x {RULES_PER_POLICY} rules ({largest['layout']}): "
        f"median {largest['median_us']} us, p99 {largest['p99_us']} us per {args.mode.upper()} decision; "
        + ", ".join(f"{r['policies']}: {r['median_us']} us" for r in results if r["layout"] == largest["layout"])
    )
    out = {
        "benchmark": f"policy_decision_{args.mode}",
        "python": sys.version.split()[0],
        "summary": summary,
        "results": results,
    }
    text = json.dumps(out, indent=2)
    print(text)
    if args.output:
        Path(args.output).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
