"""Authorization end to end: each case is decided by `ztunnel authz check` and by two real local-mode proxies.

The same policy files (tests/fixtures/policy/e2e/, and the seed fixtures with their pods moved onto loopback)
go to the CLI and, by rewriting the proxies' config file, to a running pair of proxies (node-f: clients,
node-g: servers; seed pods on either). The proxies stay up across cases; a case starts when both report the new
config generation with the expected policies and served pods in /config_dump.

For every probe the CLI verdict must equal the table's, and the proxies must agree:
- mesh source, allowed: bytes echo through SOCKS5 -> HBONE -> app, and a direct HBONE CONNECT with the source's
  SVID gets 200;
- mesh source, denied: the SOCKS5 client gets reply 2 (not allowed) and a closed connection with no app data,
  a direct HBONE CONNECT with the source's SVID gets 401, and the destination proxy counts response_flags="DENY"
  and logs the deciding policy;
- plaintext source (to <podIP>:15006): allowed -> echoed, denied -> closed without data, counted as DENY.
"""

from __future__ import annotations

import asyncio
import errno
import io
import json
import socket
import ssl
import struct
from collections.abc import Iterator
from contextlib import redirect_stderr, redirect_stdout, suppress
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from tests.integration.conftest import AppServer, ProxyProcess, raw_hbone_status, recv_all, start_proxy
from tests.support.eventually import eventually
from tests.support.svids import signed_svid
from ztunnel.cli import main as cli_main
from ztunnel.config.loader import load_files
from ztunnel.identity.tls import client_context

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "policy"
E2E = FIXTURES / "e2e"
CLUSTER = E2E / "cluster.yaml"

PLAIN = "plaintext"
PLAINTEXT_IP = "127.0.185.1"  # a client outside the mesh; it talks to <podIP>:15006
A, B, OTHER = "az/client", "azb/client", "az/other"
SERVER, BACKEND, SERVER_B = "az/server", "az/backend", "azb/server"
ANY = "<any>"  # the deciding policy is not checked

# Seed pods moved onto loopback: (namespace/name) -> (pod IP, node, containerPort added when the seed has none).
SEED_PODS: dict[str, tuple[str, str, int | None]] = {
    "with-istio/couchdb-0": ("127.0.191.1", "node-g", None),
    "with-istio/test-app": ("127.0.181.1", "node-f", None),
    "with-istio/intruder": ("127.0.181.2", "node-f", None),
    "customer/customer-1": ("127.0.181.3", "node-f", 8080),
    "customer/preference-1": ("127.0.191.2", "node-g", 8080),
    "default/greeter-v1": ("127.0.191.3", "node-g", None),
    "default/greeter-v2": ("127.0.191.4", "node-g", None),
    "default/helloweb": ("127.0.181.4", "node-f", None),
    "other/stranger": ("127.0.181.5", "node-f", None),
    "other/outside": ("127.0.181.6", "node-f", None),
    "prod/service-a-1": ("127.0.191.5", "node-g", 8000),
    "prod/service-b-1": ("127.0.191.6", "node-g", 9090),
    "prod/service-c-1": ("127.0.191.7", "node-g", 8000),
    "demo/testapp-1": ("127.0.191.8", "node-g", None),
    "demo/testapp-2": ("127.0.191.9", "node-g", None),
    "demo/ext-authz": ("127.0.181.7", "node-f", None),
}
# Every (address, port) a probe connects to: the apps echo there.
APP_ADDRESSES = [
    ("127.0.190.1", 8080),
    ("127.0.190.1", 9090),
    ("127.0.190.2", 8080),
    ("127.0.190.3", 8080),
    ("127.0.191.1", 5984),
    ("127.0.181.3", 8080),
    ("127.0.191.2", 8080),
    ("127.0.191.3", 3000),
    ("127.0.191.4", 3000),
    ("127.0.191.5", 8000),
    ("127.0.191.6", 9090),
    ("127.0.191.7", 8000),
    ("127.0.191.8", 8080),
    ("127.0.191.9", 8080),
    ("127.0.181.7", 9000),
]


@dataclass(frozen=True)
class Probe:
    source: str  # "namespace/name" of a mesh pod, or PLAIN
    dest: str  # "namespace/name"
    port: int
    verdict: str  # "allow" | "deny"
    policy: str | None = ANY  # "namespace/name" that decided (None: no single policy), or ANY


@dataclass(frozen=True)
class Case:
    id: str
    files: tuple[str, ...]  # relative to tests/fixtures/policy; cluster.yaml is always added first
    probes: tuple[Probe, ...]
    seed: bool = False  # the files are a seed's own cluster: move its pods onto loopback first
    rejected: tuple[str, ...] = ()  # policies both proxies must report in /config_dump policy_errors


def case(name: str, *probes: Probe, rejected: tuple[str, ...] = ()) -> Case:
    return Case(name, (f"e2e/{name}.yaml",), probes, rejected=rejected)


def seed(name: str, files: tuple[str, ...], *probes: Probe) -> Case:
    return Case(name, files, probes, seed=True)


CASES = [
    case("c01-no-policy", Probe(A, SERVER, 8080, "allow", None), Probe(PLAIN, SERVER, 8080, "allow", None)),
    case(
        "c02-principals-exact",
        Probe(A, SERVER, 8080, "allow", "az/c02-principals-exact"),
        Probe(B, SERVER, 8080, "deny", "az/c02-principals-exact"),
    ),
    case("c03-principals-prefix", Probe(B, SERVER, 8080, "allow"), Probe(A, SERVER, 8080, "deny")),
    case("c04-principals-suffix", Probe(OTHER, SERVER, 8080, "allow"), Probe(A, SERVER, 8080, "deny")),
    case("c05-principals-presence", Probe(A, SERVER, 8080, "allow"), Probe(PLAIN, SERVER, 8080, "deny")),
    case("c06-notPrincipals", Probe(OTHER, SERVER, 8080, "allow"), Probe(A, SERVER, 8080, "deny")),
    case("c07-namespaces", Probe(B, SERVER, 8080, "allow"), Probe(A, SERVER, 8080, "deny")),
    case(
        "c08-notNamespaces-deny",
        Probe(A, SERVER, 8080, "allow", None),
        Probe(B, SERVER, 8080, "deny", "az/c08-notnamespaces"),
    ),
    case("c09-ipBlocks", Probe(B, SERVER, 8080, "allow"), Probe(A, SERVER, 8080, "deny")),
    case("c10-notIpBlocks", Probe(PLAIN, SERVER, 8080, "allow"), Probe(A, SERVER, 8080, "deny")),
    case("c11-ports", Probe(A, SERVER, 9090, "allow"), Probe(A, SERVER, 8080, "deny")),
    case("c12-notPorts-deny", Probe(A, SERVER, 8080, "allow"), Probe(A, SERVER, 9090, "deny", "az/c12-notports")),
    case("c13-when-source-ip", Probe(A, SERVER, 8080, "allow"), Probe(B, SERVER, 8080, "deny")),
    case("c14-when-source-namespace", Probe(A, SERVER, 8080, "allow"), Probe(B, SERVER, 8080, "deny")),
    case("c15-when-source-principal", Probe(OTHER, SERVER, 8080, "allow"), Probe(A, SERVER, 8080, "deny")),
    case("c16-when-destination-ip", Probe(A, BACKEND, 8080, "allow"), Probe(A, SERVER, 8080, "deny")),
    case("c17-when-destination-port", Probe(A, SERVER, 8080, "allow"), Probe(A, SERVER, 9090, "deny")),
    case(
        "c18-namespace-deny-all",
        Probe(A, SERVER, 8080, "deny", "az/c18-deny-all"),
        Probe(A, BACKEND, 8080, "deny", "az/c18-deny-all"),
        Probe(A, SERVER_B, 8080, "allow", None),
    ),
    case(
        "c19-mesh-deny-all",
        Probe(A, SERVER_B, 8080, "deny", "istio-system/c19-deny-all"),
        Probe(B, SERVER, 8080, "deny", "istio-system/c19-deny-all"),
    ),
    case(
        "c20-mesh-selector",
        Probe(B, SERVER, 8080, "allow"),
        Probe(A, SERVER, 8080, "deny", "istio-system/c20-mesh-selector"),
        Probe(A, SERVER_B, 8080, "deny", "istio-system/c20-mesh-selector"),
        Probe(A, BACKEND, 8080, "allow", None),
    ),
    case(
        "c21-selector-scope",
        Probe(A, SERVER, 8080, "deny", "az/c21-selector-deny"),
        Probe(A, BACKEND, 8080, "allow", None),
    ),
    case(
        "c22-allow-all",
        Probe(A, SERVER, 8080, "allow", "az/c22-allow-all"),
        Probe(PLAIN, SERVER, 8080, "allow", "az/c22-allow-all"),
    ),
    case(
        "c23-deny-beats-allow",
        Probe(A, SERVER, 8080, "deny", "az/c23-deny-client"),
        Probe(B, SERVER, 8080, "allow", "az/c23-allow-all"),
    ),
    case("c24-audit", Probe(A, SERVER, 8080, "allow", None), Probe(PLAIN, SERVER, 8080, "allow", None)),
    case("c25-dry-run", Probe(A, SERVER, 8080, "allow", None)),
    case(
        "c26-l7-allow-dropped",
        Probe(A, SERVER, 8080, "deny", "az/c26-l7-allow"),
        Probe(A, BACKEND, 8080, "allow", None),
    ),
    case("c27-l7-deny-reduced", Probe(A, SERVER, 8080, "deny", "az/c27-l7-deny"), Probe(A, SERVER, 9090, "allow")),
    case(
        "c28-invalid-allow-denies",
        Probe(A, SERVER, 8080, "deny", "az/c28-invalid-allow"),
        Probe(A, BACKEND, 8080, "allow", None),
        rejected=("az/c28-invalid-allow",),
    ),
    case(
        "c29-pa-namespace-strict",
        Probe(PLAIN, SERVER, 8080, "deny", "az/c29-strict"),
        Probe(A, SERVER, 8080, "allow", None),
    ),
    case(
        "c30-pa-selector-over-mesh",
        Probe(PLAIN, SERVER, 8080, "allow", None),
        Probe(PLAIN, BACKEND, 8080, "deny", "istio-system/c30-mesh-strict"),
    ),
    case(
        "c31-pa-disable",
        Probe(PLAIN, BACKEND, 8080, "allow", None),
        Probe(PLAIN, SERVER, 8080, "deny", "az/c31-strict"),
    ),
    case(
        "c32-pa-port-level",
        Probe(PLAIN, SERVER, 8080, "allow", None),
        Probe(PLAIN, BACKEND, 8080, "deny", "az/c32-backend"),
    ),
    # ---- the seeds, where they apply at L4 ---------------------------------------------------------------
    seed(
        "s000-couchdb-rbac-strict",
        ("seed000_couchdb.yaml",),
        Probe("with-istio/test-app", "with-istio/couchdb-0", 5984, "deny"),  # the GET-only role needs a waypoint
        Probe("with-istio/intruder", "with-istio/couchdb-0", 5984, "deny"),
        Probe(PLAIN, "with-istio/couchdb-0", 5984, "deny", "with-istio/default"),
    ),
    seed(
        "s001-customer-jwt",
        ("seed001_customer.yaml",),
        Probe(PLAIN, "customer/preference-1", 8080, "deny", "customer/default"),
        Probe("customer/customer-1", "customer/preference-1", 8080, "allow"),
        Probe("customer/preference-1", "customer/customer-1", 8080, "deny"),  # needs a JWT: a waypoint's job
    ),
    seed(
        "s002-greeter-principal-get-header",
        ("greeter_cluster.yaml", "greeter_principal_get_header.yaml"),
        Probe("default/helloweb", "default/greeter-v2", 3000, "deny", "default/greeter-service"),
        Probe("other/stranger", "default/greeter-v1", 3000, "allow"),
    ),
    seed(
        "s002-greeter-allow-all",
        ("greeter_cluster.yaml", "allow_all.yaml"),
        Probe(PLAIN, "default/greeter-v1", 3000, "allow", "default/allow-all"),
        Probe("other/stranger", "default/greeter-v2", 3000, "allow", "default/allow-all"),
    ),
    seed(
        "s002-greeter-deny-all",
        ("greeter_cluster.yaml", "deny_all.yaml"),
        Probe("default/helloweb", "default/greeter-v1", 3000, "deny", "default/deny-all"),
    ),
    seed(
        "s002a-authn-policy",
        ("seed002_authn.yaml",),
        Probe(PLAIN, "prod/service-a-1", 8000, "deny"),
        Probe(PLAIN, "prod/service-b-1", 9090, "deny"),
        Probe(PLAIN, "prod/service-c-1", 8000, "allow"),
    ),
    seed(
        "s003-demo-port-level",
        ("seed003_demo.yaml",),
        Probe(PLAIN, "demo/testapp-1", 8080, "allow"),
        Probe(PLAIN, "demo/testapp-2", 8080, "allow"),
        Probe("demo/testapp-1", "demo/ext-authz", 9000, "allow"),
    ),
]


# ---- seed files onto loopback ------------------------------------------------------------------------------
def relocate_seed(text: str, source: str) -> str:
    """The seed's objects with every Pod moved to its SEED_PODS address and node (others unchanged)."""
    out = []
    for doc in yaml.safe_load_all(text):
        if not doc:
            continue
        if doc.get("kind") == "Pod":
            meta = doc["metadata"]
            ref = f"{meta.get('namespace', 'default')}/{meta['name']}"
            assert ref in SEED_PODS, f"{source}: pod {ref} has no loopback address in SEED_PODS"
            ip, node, port = SEED_PODS[ref]
            meta.setdefault("uid", f"seed-{ref.replace('/', '-')}")
            spec = doc.setdefault("spec", {})
            spec["nodeName"] = node
            if port is not None and not spec.get("containers"):
                spec["containers"] = [{"name": "app", "ports": [{"containerPort": port}]}]
            doc["status"] = {"podIP": ip}
        out.append(yaml.safe_dump(doc, sort_keys=False))
    return "---\n".join(out)


# ---- clients -------------------------------------------------------------------------------------------------
def socks_from(pod_ip: str, dst: tuple[str, int], timeout: float = 10.0) -> tuple[int, socket.socket]:
    """SOCKS5 CONNECT from the pod's own address to its proxy (<podIP>:15080): (reply code, socket)."""
    s = socket.create_connection((pod_ip, 15080), timeout=timeout, source_address=(pod_ip, 0))
    try:
        s.sendall(b"\x05\x01\x00")
        assert s.recv(2) == b"\x05\x00"
        s.sendall(b"\x05\x01\x00\x01" + socket.inet_aton(dst[0]) + struct.pack("!H", dst[1]))
        head = b""
        while len(head) < 10:
            chunk = s.recv(10 - len(head))
            if not chunk:
                break
            head += chunk
        return (head[1] if len(head) >= 2 else -1), s
    except BaseException:
        s.close()
        raise


def read_to_end(s: socket.socket) -> bytes:
    """Everything until EOF; a reset counts as the end."""
    try:
        return recv_all(s)
    except ConnectionError:
        return b""


def plaintext_exchange(dst: tuple[str, int], payload: bytes) -> bytes:
    """Send `payload` to <podIP>:15006 from outside the mesh, half-close, read until the end. A refusal (a reset,
    even during the handshake) reads as no data."""
    try:
        with socket.create_connection((dst[0], 15006), timeout=10, source_address=(PLAINTEXT_IP, 0)) as s:
            try:
                s.sendall(payload)
                s.shutdown(socket.SHUT_WR)
            except OSError as e:  # a reset before the half-close: ENOTCONN from shutdown() is not a ConnectionError
                if not isinstance(e, ConnectionError) and e.errno != errno.ENOTCONN:
                    raise
            return read_to_end(s)
    except ConnectionError:
        return b""


async def _hbone_connect(ctx: ssl.SSLContext, source_ip: str, dst: tuple[str, int]) -> int | None:
    """One raw HTTP/2 CONNECT to the destination pod's HBONE port from `source_ip`: the response :status."""
    headers = [(":method", "CONNECT"), (":authority", f"{dst[0]}:{dst[1]}")]
    return await raw_hbone_status(ctx, (dst[0], 15008), headers, local_addr=(source_ip, 0))


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        rc = cli_main(argv)
    return rc, out.getvalue(), err.getvalue()


def deny_count(metrics: str, destination_workload: str) -> float:
    total = 0.0
    for line in metrics.splitlines():
        if (
            line.startswith("istio_tcp_connections_closed_total{")
            and 'reporter="destination"' in line
            and 'response_flags="DENY"' in line
            and f'destination_workload="{destination_workload}"' in line
        ):
            total += float(line.rsplit(" ", 1)[1])
    return total


# ---- the running pair ----------------------------------------------------------------------------------------
@dataclass
class AuthzMesh:
    workdir: Path
    config: Path
    ca_dir: Path
    proxies: dict[str, ProxyProcess]
    generation: dict[str, int] = field(default_factory=dict)
    dumps: dict[str, dict] = field(default_factory=dict)  # type: ignore[type-arg]  # last /config_dump per node
    _contexts: dict[str, ssl.SSLContext] = field(default_factory=dict)

    def apply(self, files: list[Path]) -> list[Path]:
        """Make `files` the proxies' config; return once both serve it. Returns the files for `authz check`."""
        text = "\n---\n".join(f.read_text() for f in files)
        tmp = self.config.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.replace(self.config)  # atomic: the proxies never read half a file
        expected = load_files([self.config])
        policies = sorted(o.ref for o in expected.policy_objects)
        for node, proxy in self.proxies.items():
            served = sorted(w.ref for w in expected.workloads if w.node == node and w.enrolled)
            previous = self.generation.get(node, 0)

            def current(proxy: ProxyProcess = proxy, previous: int = previous, served: list[str] = served) -> dict:  # type: ignore[type-arg]
                dump = proxy.config_dump()
                ok = (
                    dump["generation"] > previous
                    and sorted(dump["policies"]) == policies
                    and sorted(w["name"] for w in dump["served_workloads"]) == served
                )
                return dump if ok else {}

            dump = eventually(current, 20, what=f"{node} to serve the new config")
            self.generation[node] = dump["generation"]
            self.dumps[node] = dump
        return files

    def ssl_for(self, identity: str) -> ssl.SSLContext:
        if identity not in self._contexts:
            self._contexts[identity] = client_context(signed_svid(self.ca_dir, identity))
        return self._contexts[identity]


@pytest.fixture(scope="module")
def authz_mesh(tmp_path_factory: pytest.TempPathFactory, ca_dir: Path) -> Iterator[AuthzMesh]:
    workdir = tmp_path_factory.mktemp("authz")
    config = workdir / "cluster.yaml"
    config.write_text(CLUSTER.read_text())
    apps = AppServer()
    started: list[ProxyProcess] = []
    try:
        for ip, port in APP_ADDRESSES:
            apps.echo(ip, port)
        for node in ("node-f", "node-g"):
            started.append(start_proxy(node, config, ca_dir, workdir))
        mesh = AuthzMesh(workdir, config, ca_dir, {p.node: p for p in started})
        for node, proxy in mesh.proxies.items():
            mesh.generation[node] = proxy.config_dump()["generation"]
        yield mesh
    finally:
        for p in started:
            p.stop()
        apps.close()


def authz_check(files: list[Path], probe: Probe) -> dict:  # type: ignore[type-arg]
    argv = ["authz", "check"]
    for f in files:
        argv += ["-f", str(f)]
    if probe.source == PLAIN:
        argv += ["--from", PLAIN, "--source-ip", PLAINTEXT_IP]
    else:
        argv += ["--from", f"pod/{probe.source}"]
    argv += ["--to", f"pod/{probe.dest}", "--port", str(probe.port), "-o", "json"]
    rc, out, err = run_cli(argv)
    assert rc in (0, 1), f"authz check failed ({rc}): {err}"
    answer = json.loads(out)
    assert rc == (0 if answer["decision"] == "allow" else 1)
    return answer


def run_probe(mesh: AuthzMesh, files: list[Path], probe: Probe) -> tuple[str, str]:
    """Check one probe through the CLI and the proxies. Returns (destination node, destination workload name)."""
    config = load_files(files)
    dest = config.workload(*probe.dest.split("/"))
    assert dest is not None and dest.ips, probe.dest
    dst = (dest.ips[0], probe.port)
    what = f"{probe.source} -> {probe.dest}:{probe.port}"

    answer = authz_check(files, probe)
    assert answer["decision"] == probe.verdict, f"authz check: {what}: {answer}"
    if probe.policy != ANY:
        assert answer["policy"] == probe.policy, f"authz check: {what}: {answer}"

    payload = f"{what}\n".encode()
    if probe.source == PLAIN:
        got = plaintext_exchange(dst, payload)
        assert got == (payload if probe.verdict == "allow" else b""), f"proxy (plaintext): {what}"
        return dest.node, dest.name

    src = config.workload(*probe.source.split("/"))
    assert src is not None and src.ips, probe.source
    code, s = socks_from(src.ips[0], dst)
    with s:
        if probe.verdict == "allow":
            assert code == 0, f"proxy: {what}: SOCKS5 reply {code}"
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)
            assert read_to_end(s) == payload, f"proxy: {what}"
        else:
            assert code == 2, f"proxy: {what}: SOCKS5 reply {code}, expected 2 (not allowed)"
            assert read_to_end(s) == b"", f"proxy: {what}: data after a refusal"
    status = asyncio.run(_hbone_connect(mesh.ssl_for(src.identity), src.ips[0], dst))
    assert status == (200 if probe.verdict == "allow" else 401), f"HBONE: {what}: status {status}"
    return dest.node, dest.name


@pytest.mark.parametrize("c", CASES, ids=[c.id for c in CASES])
def test_authz_check_and_proxies_agree(authz_mesh: AuthzMesh, c: Case) -> None:
    if c.seed:
        relocated = authz_mesh.workdir / f"{c.id}.yaml"
        relocated.write_text("\n---\n".join(relocate_seed((FIXTURES / f).read_text(), f) for f in c.files))
        files = [CLUSTER, relocated]
    else:
        files = [CLUSTER, *(FIXTURES / f for f in c.files)]
    authz_mesh.apply(files)
    for node, dump in authz_mesh.dumps.items():
        errors = "\n".join(dump["policy_errors"])
        assert all(p in errors for p in c.rejected), f"{node} policy_errors: {errors}"
        assert bool(errors) == bool(c.rejected), f"{node} policy_errors: {errors}"
    before = {node: p.metrics() for node, p in authz_mesh.proxies.items()}
    expected_denies: dict[tuple[str, str], int] = {}  # (node, destination workload) -> DENY closures
    for probe in c.probes:
        node, workload = run_probe(authz_mesh, files, probe)
        denies = 0 if probe.verdict == "allow" else 1 if probe.source == PLAIN else 2  # SOCKS5 + direct HBONE
        expected_denies[(node, workload)] = expected_denies.get((node, workload), 0) + denies
        if probe.verdict == "deny" and probe.policy not in (ANY, None):
            logged = f"policy={probe.policy}"
            proxy = authz_mesh.proxies[node]
            eventually(lambda p=proxy, text=logged: text in p.log(), what=f"{node} to log {logged}")
    for (node, workload), n in expected_denies.items():
        proxy = authz_mesh.proxies[node]
        start = deny_count(before[node], workload)
        if n:
            want = start + n
            eventually(
                lambda p=proxy, w=workload, want=want: deny_count(p.metrics(), w) >= want,
                what=f"{node} to count {want} DENY for {workload}",
            )
        assert deny_count(proxy.metrics(), workload) - start == n, f"{node}: DENY count for {workload}"


REEVAL_DENY = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: reeval-deny-client, namespace: az}
spec:
  selector: {matchLabels: {app: server}}
  action: DENY
  rules: [{from: [{source: {principals: [cluster.local/ns/az/sa/client]}}]}]
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: reeval-strict, namespace: az}
spec: {selector: {matchLabels: {app: server}}, mtls: {mode: STRICT}}
"""


def test_policy_change_closes_open_connections_now_denied(authz_mesh: AuthzMesh) -> None:
    """Open connections are re-evaluated: the ones the new policy denies close, the others keep flowing."""
    authz_mesh.apply([CLUSTER, E2E / "c01-no-policy.yaml"])
    server = ("127.0.190.1", 8080)
    node_g = authz_mesh.proxies["node-g"]
    before = deny_count(node_g.metrics(), "server")
    code_a, conn_a = socks_from("127.0.180.1", server)
    code_b, conn_b = socks_from("127.0.180.2", server)
    plain = socket.create_connection((server[0], 15006), timeout=10, source_address=(PLAINTEXT_IP, 0))
    with conn_a, conn_b, plain:
        assert (code_a, code_b) == (0, 0)
        for s in (conn_a, conn_b, plain):
            s.sendall(b"before")
            assert s.recv(100) == b"before"

        policy = authz_mesh.workdir / "reeval.yaml"
        policy.write_text(REEVAL_DENY)
        files = authz_mesh.apply([CLUSTER, policy])
        assert authz_check(files, Probe(A, SERVER, 8080, "deny"))["policy"] == "az/reeval-deny-client"
        assert authz_check(files, Probe(B, SERVER, 8080, "allow"))["decision"] == "allow"
        assert authz_check(files, Probe(PLAIN, SERVER, 8080, "deny"))["policy"] == "az/reeval-strict"

        for s in (conn_a, plain):  # closed by the proxy: EOF (or a reset) without further data
            with suppress(ConnectionError):
                s.sendall(b"after")
            assert read_to_end(s) == b""
        conn_b.sendall(b"still allowed")
        assert conn_b.recv(100) == b"still allowed"
        conn_b.shutdown(socket.SHUT_WR)
        assert read_to_end(conn_b) == b""
    eventually(lambda: deny_count(node_g.metrics(), "server") >= before + 2, what="node-g to count the two DENY")
    assert deny_count(node_g.metrics(), "server") - before == 2
    assert "policy=az/reeval-deny-client" in node_g.log()
