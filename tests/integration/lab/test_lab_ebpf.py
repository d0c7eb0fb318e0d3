"""eBPF redirection's DNS capture on the session's eBPF lab (issue 13): port 53 reaches the node proxy's 15053
in the pod with no rule there, connected UDP (glibc) through connect4, unconnected UDP through sendmsg4, and the
answer seems to come from the resolver the app asked (recvmsg4), as glibc and apps that check it need.

Skipped, with the node agent's reason, on a machine that cannot load the programs.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

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
