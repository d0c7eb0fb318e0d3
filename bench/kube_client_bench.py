"""Kubernetes client choice for `--source kubernetes`: our thin list+watch client against kubernetes_asyncio and
lightkube, measured inside a process like the proxy.

Each candidate runs in a fresh child process that first imports what the proxy imports (`ztunnel.proxy.main`),
then measures:
- `import_rss_mib`: the RSS added by importing the client (its modules and their dependencies: aiohttp, httpx,
  the generated models, ...);
- `cpu_us_per_1000_events`: CPU (process time, best of `--rounds`) to turn 1,000 watch event lines of
  realistic Pods (managedFields, env, volumes, status: ~3 KB each) into what the cache keeps, the way each
  client's watch does it (ours: `decode_event` + `strip_object`; kubernetes_asyncio: `Watch.unmarshal_event`
  into `V1Pod`; lightkube: `decode_watch_event` + `decode_object` into `Pod`);
- `cache_rss_mib_5000_pods`: the RSS added by holding 5,000 such Pods as each client hands them over (ours:
  already stripped to the fields the model reads).

The libraries are not project dependencies: install them in a separate venv and pass its site-packages with
`--lib-path` (they are appended to sys.path, after the project's own packages). Prints JSON.

    python -m venv /tmp/kb && /tmp/kb/bin/pip install kubernetes_asyncio lightkube
    .venv/bin/python bench/kube_client_bench.py --lib-path /tmp/kb/lib/python3.11/site-packages \\
        --output bench/results/2026-12-04-kube-client.json
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CANDIDATES = ("thin", "kubernetes_asyncio", "lightkube")


def rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def events(n: int) -> list[bytes]:
    from tests.support.kubeapi import pod

    out = []
    for i in range(n):
        ip = f"10.{i // 65536}.{i // 256 % 256}.{i % 256}"
        obj = pod(f"app-{i}", f"ns-{i % 50}", node=f"node-{i % 20}", ip=ip, heavy=True)
        obj["metadata"]["resourceVersion"] = str(1000 + i)
        obj["metadata"]["uid"] = f"{i:08x}-0000-4000-8000-000000000000"
        out.append(json.dumps({"type": "ADDED", "object": obj}).encode())
    return out


def decoder(name: str) -> Any:
    """name -> a function line -> what the cache keeps, with the client's modules imported."""
    if name == "thin":
        from ztunnel.config.kube.wire import decode_event, strip_object

        def thin(line: bytes) -> Any:
            return strip_object(decode_event(line).object, "v1", "Pod")

        return thin
    if name == "kubernetes_asyncio":
        from kubernetes_asyncio import client, config, watch  # noqa: F401 - what a user of it imports

        w = watch.Watch()
        return lambda line: w.unmarshal_event(line, "V1Pod")["object"]
    if name == "lightkube":
        from lightkube import AsyncClient  # noqa: F401
        from lightkube.core import decoders
        from lightkube.resources.core_v1 import Pod

        def light(line: bytes) -> Any:
            return decoders.decode_object(decoders.decode_watch_event(line).object, Pod)

        return light
    raise ValueError(name)


# What the proxy imports besides the config source's client: imported first, so a candidate's figure is what it
# adds on top (ztunnel.proxy.main itself now imports our client, so it cannot be the baseline).
BASELINE = ("uvloop", "ztunnel.proxy.node", "ztunnel.identity.manager", "ztunnel.config.source", "ztunnel.net.http")


def child(name: str, rounds: int) -> dict[str, Any]:
    import asyncio
    import importlib

    for module in BASELINE:
        importlib.import_module(module)
    assert "ztunnel.config.kube" not in sys.modules
    return asyncio.run(_measure(name, rounds))  # kubernetes_asyncio's Watch wants a running loop


async def _measure(name: str, rounds: int) -> dict[str, Any]:
    gc.collect()
    before = rss_kib()
    decode = decoder(name)
    gc.collect()
    imported = rss_kib()
    lines = events(1000)
    best = float("inf")
    for _ in range(rounds):
        started = time.process_time()
        for line in lines:
            decode(line)
        best = min(best, time.process_time() - started)
    many = events(5000)
    gc.collect()
    held_before = rss_kib()
    cache = {i: decode(line) for i, line in enumerate(many)}
    del many
    gc.collect()
    held = rss_kib() - held_before
    assert len(cache) == 5000
    return {
        "import_rss_mib": round((imported - before) / 1024, 1),
        "cpu_us_per_1000_events": round(best * 1e6),
        "cache_rss_mib_5000_pods": round(held / 1024, 1),
        "event_bytes_avg": round(sum(len(x) for x in lines) / len(lines)),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lib-path", default="", help="site-packages holding kubernetes_asyncio and lightkube")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--output")
    ap.add_argument("--child", choices=CANDIDATES, help=argparse.SUPPRESS)
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    if args.lib_path:
        sys.path.append(args.lib_path)
    if args.child:
        print(json.dumps(child(args.child, args.rounds)))
        return
    results: dict[str, Any] = {}
    for name in CANDIDATES:
        cmd = [sys.executable, __file__, "--child", name, "--rounds", str(args.rounds), "--lib-path", args.lib_path]
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if done.returncode != 0 or not done.stdout.strip():
            results[name] = {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed"}
            continue
        results[name] = json.loads(done.stdout.strip().splitlines()[-1])
    versions = {}
    for lib in ("kubernetes_asyncio", "lightkube"):
        probe = (
            f"import sys; sys.path.append({args.lib_path!r}); import importlib.metadata as m; print(m.version({lib!r}))"
        )
        done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
        versions[lib] = done.stdout.strip() or None
    out = {"bench": "kube_client", "python": sys.version.split()[0], "versions": versions, "results": results}
    text = json.dumps(out, indent=2)
    print(text)
    if args.output:
        Path(args.output).write_text(text + "\n")


if __name__ == "__main__":
    main()
