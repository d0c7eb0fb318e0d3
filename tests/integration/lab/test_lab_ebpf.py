"""eBPF redirection on the session's eBPF lab (issue 13): un-enrolling by label, and DNS capture: port 53
reaches the node proxy's 15053 in the pod with no rule there, connected UDP (glibc) through connect4,
unconnected UDP through sendmsg4, and the answer seems to come from the resolver the app asked (recvmsg4), as
glibc and apps that check it need.

Skipped, with the node agent's reason, on a machine that cannot load the programs.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import ebpf
from tests.support.eventually import eventually

from .conftest import LabHandle

pytestmark = pytest.mark.netns  # root + network namespaces; conftest skips with the reason otherwise

SERVICE_IP = "10.96.0.21"
SERVICE = f"""
apiVersion: v1
kind: Service
metadata: {{name: server, namespace: lab}}
spec: {{clusterIP: {SERVICE_IP}, selector: {{app: server}}, ports: [{{port: 80, targetPort: 8080}}]}}
"""

# one A query by unconnected sendto(), printing the reply's source and answer (no resolver library involved)
SENDTO_QUERY = """
import socket, struct, sys
name = b"".join(bytes([len(p)]) + p.encode() for p in sys.argv[2].split(".")) + b"\\0"
q = struct.pack("!HHHHHH", 0x5A5A, 0x0100, 1, 0, 0, 0) + name + struct.pack("!HH", 1, 1)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(3)
s.sendto(q, (sys.argv[1], 53))
data, src = s.recvfrom(512)
print(src[0], src[1], hex(struct.unpack("!H", data[:2])[0]), socket.inet_ntoa(data[-4:]))
"""


@pytest.fixture(scope="module")
def service(ebpf_lab: LabHandle) -> Iterator[str]:
    ebpf_lab.require("node-agent", "proxy")
    ebpf_lab.apply(SERVICE)
    try:
        yield SERVICE_IP
    finally:
        ebpf_lab.delete(SERVICE)


def gateway(lab: LabHandle, target: str) -> str:
    conf = lab.run(target, "cat", "/etc/resolv.conf").stdout
    return next(line.split()[1] for line in conf.splitlines() if line.startswith("nameserver"))


def test_enrolled_pods_resolve_service_names_through_the_proxy(ebpf_lab: LabHandle, service: str) -> None:
    lab = ebpf_lab
    assert "REDIRECT" not in lab.run("lab/client", "iptables-save", "-t", "nat").stdout
    fqdn = "server.lab.svc.cluster.local"

    def resolved() -> list[str]:
        p = lab.run("lab/client", "getent", "hosts", fqdn, timeout=20)
        return [line.split()[0] for line in p.stdout.splitlines() if line.strip()]

    eventually(lambda: resolved() == [service], 30, 0.2, what="the Service name to resolve in the client pod")
    code, body = lab.curl("lab/client", "http://server/")  # the short name, through the search path and the mesh
    assert code == 0 and body.strip() == f"peer={lab.pod_ip('lab/client')}"
    assert lab.run("lab/outsider", "getent", "hosts", "server", timeout=20).returncode != 0  # not in the mesh


def test_unconnected_udp_queries_are_answered_as_the_resolver_asked(ebpf_lab: LabHandle, service: str) -> None:
    lab = ebpf_lab
    resolver = gateway(lab, "lab/client")  # nothing listens there: only the capture can answer
    out = ""

    def answered() -> bool:
        nonlocal out
        p = lab.run("lab/client", "python3", "-c", SENDTO_QUERY, resolver, "server.lab.svc.cluster.local")
        out = p.stdout.strip()
        return p.returncode == 0 and out.endswith(service)

    eventually(answered, 30, 0.2, what="an answer to a sendto() query")
    assert out == f"{resolver} 53 0x5a5a {service}"  # from the resolver's address and port, our id


def _client_pod(ambient: bool) -> str:
    import yaml

    from .conftest import cluster_objects

    pod = next(o for o in cluster_objects() if o["kind"] == "Pod" and o["metadata"]["name"] == "client")
    if not ambient:
        del pod["metadata"]["labels"]["istio.io/dataplane-mode"]
    return str(yaml.safe_dump(pod))


def test_a_pod_taken_out_of_the_mesh_loses_its_programs_and_gets_them_back(ebpf_lab: LabHandle) -> None:
    """Un-enrolling by label (not deleting the pod) detaches its sk_lookup and drops it from the pods map: its
    traffic then goes out directly, plaintext; labelled again, it is redirected again."""
    lab = ebpf_lab
    url = f"http://{lab.pod_ip('lab/server')}:8080/"
    client_ns = lab.netns("lab/client")
    server_log = Path(lab.pod("lab/server")["containers"]["main"]["log"])

    def mesh_requests() -> int:  # connections the server's proxy took in with the client's SPIFFE identity
        log = (lab.dir / "logs" / "node_n2_proxy.log").read_text()
        return log.count("src.identity=spiffe://cluster.local/ns/lab/sa/client dst.addr")

    def enrolled() -> set[str]:  # pods their node proxy serves (its admin config_dump), as `lab status` says
        return {f"{p['namespace']}/{p['name']}" for p in lab.status()["pods"] if p["enrolled"]}

    assert ebpf.sk_lookup_attached(lab.dir, "n1", client_ns)
    lab.apply(_client_pod(ambient=False))
    try:
        eventually(lambda: not ebpf.sk_lookup_attached(lab.dir, "n1", client_ns), 10, 0.1, what="sk_lookup detached")
        assert "lab/client" not in enrolled()
        before, mesh_before = server_log.read_text().count("request from"), mesh_requests()
        code, body = lab.curl("lab/client", url)  # out of the mesh: plaintext to the server pod (PERMISSIVE)
        assert code == 0 and body.strip() == f"peer={lab.pod_ip('lab/client')}"
        assert server_log.read_text().count("request from") == before + 1
        assert mesh_requests() == mesh_before
    finally:
        lab.apply(_client_pod(ambient=True))
    eventually(lambda: ebpf.sk_lookup_attached(lab.dir, "n1", client_ns), 10, 0.1, what="sk_lookup attached again")
    # The redirect is back before the proxy serves the pod (its certificate is issued first): a connection made in
    # between (tens of ms) is reset, fail closed. Served by the proxy (status `enrolled`) is back in the mesh.
    eventually(lambda: "lab/client" in enrolled(), 10, 0.05, what="lab/client served by n1's proxy again")
    mesh_before = mesh_requests()
    code, body = lab.curl("lab/client", url)
    assert code == 0 and body.strip() == f"peer={lab.pod_ip('lab/client')}"
    eventually(lambda: mesh_requests() == mesh_before + 1, 5, 0.1, what="the request to arrive through the mesh")
