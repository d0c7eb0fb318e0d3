"""Plain pod networking built by the lab: IPAM addresses, cross-node routing, node probes, exec, apply/delete."""

from __future__ import annotations

import ipaddress
import json
import subprocess
from pathlib import Path

import pytest
import yaml

from .conftest import ZTUNNEL, LabHandle, ztunnel

pytestmark = pytest.mark.netns  # root + network namespaces; conftest skips with the reason otherwise

NEW_POD = """
apiVersion: v1
kind: Pod
metadata: {name: late, namespace: lab, labels: {app: late}}
spec:
  nodeName: n2
  containers:
  - name: main
    command: [python3, -m, http.server, "9090", --bind, 0.0.0.0]
    ports: [{containerPort: 9090}]
"""


def test_pods_get_addresses_from_host_local_in_their_nodes_cidr(lab: LabHandle) -> None:
    st = lab.status()
    nodes = {n["name"]: n for n in st["nodes"]}
    assert nodes["n1"]["pod_cidr"] == "10.244.1.0/24" and nodes["n2"]["pod_cidr"] == "10.244.2.0/24"
    for p in st["pods"]:
        cidr = ipaddress.ip_network(nodes[p["node"]]["pod_cidr"])
        assert p["ips"] and ipaddress.ip_address(p["ips"][0]) in cidr, p
        # the address came from the bridge plugin's IPAM, and it is what the pod's eth0 carries
        out = lab.run(f"{p['namespace']}/{p['name']}", "ip", "-o", "-4", "addr", "show", "dev", "eth0").stdout
        assert f"inet {p['ips'][0]}/24" in out
    # host-local kept its allocations in the node's own dataDir
    assert (lab.dir / "nodes" / "n1" / "ipam" / f"ztl-{lab.name}" / lab.pod_ip("lab/client")).exists()


def test_live_config_holds_pod_ips_and_node_addresses(lab: LabHandle) -> None:
    docs = list(yaml.safe_load_all((lab.dir / "cluster.yaml").read_text()))
    pods = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Pod"}
    nodes = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Node"}
    assert pods["server"]["status"]["podIP"] == lab.pod_ip("lab/server")
    assert pods["server"]["status"]["podIPs"] == [{"ip": lab.pod_ip("lab/server")}]
    assert pods["server"]["metadata"]["uid"] == lab.pod("lab/server")["uid"]
    assert nodes["n2"]["status"]["addresses"][0] == {"type": "InternalIP", "address": "172.30.0.12"}


def test_plain_pod_to_pod_across_nodes(lab: LabHandle) -> None:
    code, body = lab.curl("lab/outsider", f"http://{lab.pod_ip('lab/plain')}:8080/")
    assert code == 0
    assert body.strip() == f"peer={lab.pod_ip('lab/outsider')}"


def test_node_reaches_its_pods_like_a_kubelet_probe(lab: LabHandle) -> None:
    code, body = lab.curl("node/n2", f"http://{lab.pod_ip('lab/plain')}:8080/")
    assert code == 0 and body.startswith("peer=10.244.2.1")  # the node's address on cni0


def test_exec_cli_runs_in_the_pods_netns(lab: LabHandle) -> None:
    out = ztunnel("lab", "exec", "--name", lab.name, "lab/outsider", "--", "ip", "-o", "-4", "addr", "show", "eth0")
    assert lab.pod_ip("lab/outsider") in out.stdout
    out = ztunnel("lab", "exec", "--name", lab.name, "node/n1", "--", "ip", "-o", "-4", "addr", "show", "eth0")
    assert "172.30.0.11/24" in out.stdout
    bad = ztunnel("lab", "exec", "--name", lab.name, "lab/nope", "--", "true", check=False)
    assert bad.returncode == 2 and "NAMESPACE/POD" in bad.stderr


def test_status_text_and_json(lab: LabHandle) -> None:
    text = ztunnel("lab", "status", "--name", lab.name).stdout
    assert "n1" in text and "lab/client" in text and lab.pod_ip("lab/server") in text
    st = json.loads(ztunnel("lab", "status", "--name", lab.name, "-o", "json").stdout)
    assert st["ready"] is True
    assert all(c["running"] for p in st["pods"] for c in p["containers"].values())


def test_apply_adds_a_pod_through_cni_add_and_delete_removes_it(lab: LabHandle) -> None:
    out = lab.apply(NEW_POD)
    assert "Pod lab/late created" in out.stdout
    ip = lab.pod_ip("lab/late")
    assert ipaddress.ip_address(ip) in ipaddress.ip_network("10.244.2.0/24")
    code, _ = lab.curl("lab/outsider", f"http://{ip}:9090/")
    assert code == 0
    netns = lab.netns("lab/late")
    ipam_file = lab.dir / "nodes" / "n2" / "ipam" / f"ztl-{lab.name}" / ip
    assert ipam_file.exists()

    out = lab.delete(NEW_POD)
    assert "Pod lab/late deleted" in out.stdout
    assert not Path(f"/var/run/netns/{netns}").exists()
    assert not ipam_file.exists()  # CNI DEL released the address
    assert "late" not in (lab.dir / "cluster.yaml").read_text()


def test_bad_apply_names_file_object_and_field(lab: LabHandle) -> None:
    bad = "apiVersion: v1\nkind: Pod\nmetadata: {name: broken, namespace: lab}\nstatus: {podIP: not-an-ip}\n"
    f = lab.work / "bad.yaml"
    f.write_text(bad)
    proc = subprocess.run([*ZTUNNEL, "lab", "apply", "--name", lab.name, "-f", str(f)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert str(f) in proc.stderr and "Pod lab/broken" in proc.stderr and "status.podIPs" in proc.stderr
    assert "broken" not in (lab.dir / "cluster.yaml").read_text()


NEW_NODE = """
apiVersion: v1
kind: Node
metadata: {name: n3}
---
apiVersion: v1
kind: Pod
metadata: {name: far, namespace: lab, labels: {app: far}}
spec:
  nodeName: n3
  containers:
  - name: main
    command: [python3, -m, http.server, "9191", --bind, 0.0.0.0]
    ports: [{containerPort: 9191}]
"""


def test_apply_adds_a_node_with_routes_from_the_others(lab: LabHandle) -> None:
    out = lab.apply(NEW_NODE)
    assert "Node n3 created" in out.stdout and "Pod lab/far created" in out.stdout
    ip = lab.pod_ip("lab/far")
    assert ipaddress.ip_address(ip) in ipaddress.ip_network("10.244.3.0/24")
    code, _ = lab.curl("lab/outsider", f"http://{ip}:9191/")
    assert code == 0
    n3 = next(n for n in lab.status()["nodes"] if n["name"] == "n3")
    assert n3["address"] == "172.30.0.13"
    assert n3["proxy"]["running"] and n3["node_agent"]["running"]  # a new node gets its mesh components
    lab.delete(NEW_NODE.split("---")[1])  # the pod; nodes stay for the lab's lifetime
    assert "far" not in (lab.dir / "cluster.yaml").read_text()
