"""The issue's acceptance tests on the lab: real CNI chain, node agents, in-pod redirection, node proxies, CA.

The lab is built with `--mesh on`: a missing or broken component fails these tests (never skips them). Every
test runs twice, on a lab with iptables redirection and on one with eBPF redirection (issue 13; skipped with
the node agent's reason on a machine that cannot load the programs).
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support import ebpf
from tests.support.eventually import eventually

from .conftest import ROOT, ZTUNNEL, LabHandle

pytestmark = pytest.mark.netns  # root + network namespaces; conftest skips with the reason otherwise

MESH = ("ca", "node-agent", "proxy", "cni-plugin")
NETNS_EXEC = ["ip", "netns", "exec"]
TCPDUMP = ["tcpdump", "-i", "eth0", "-nn", "-U", "--immediate-mode", "-Z", "root", "-w"]
CLIENT_PRINCIPAL = "spiffe://cluster.local/ns/lab/sa/client"

STRICT = """
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: strict-server, namespace: lab}
spec:
  selector: {matchLabels: {app: server}}
  mtls: {mode: STRICT}
"""

DENY_CLIENT = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-client, namespace: lab}
spec:
  selector: {matchLabels: {app: server}}
  action: DENY
  rules:
  - from: [{source: {principals: ["cluster.local/ns/lab/sa/client"]}}]
"""

LATE_POD = """
apiVersion: v1
kind: Pod
metadata: {name: late, namespace: lab, labels: {app: late, istio.io/dataplane-mode: ambient}}
spec:
  nodeName: n1
  serviceAccountName: late
  containers: [{name: main, command: [sleep, infinity]}]
"""


@pytest.fixture(params=["iptables", "ebpf"])
def lab(request: pytest.FixtureRequest) -> LabHandle:
    """The session's lab of this redirection mode (both stay up for the session: tests alternate modes)."""
    return request.getfixturevalue("iptables_lab" if request.param == "iptables" else "ebpf_lab")


def is_ebpf(lab: LabHandle) -> bool:
    return bool(json.loads((lab.dir / "state.json").read_text())["redirect"] == "ebpf")


def server_url(lab: LabHandle) -> str:
    return f"http://{lab.pod_ip('lab/server')}:8080/"


def ruleset(lab: LabHandle, target: str) -> str:
    """Everything redirection depends on inside a pod: iptables (both families), ip rules, table 100; in eBPF
    mode also the programs attached for it (which ones and where, not their ids: a restarted agent swaps them)."""
    parts = []
    for cmd in (["iptables-save"], ["ip6tables-save"], ["ip", "rule"], ["ip", "route", "show", "table", "100"]):
        out = lab.run(target, *cmd).stdout
        parts.append("\n".join(x for x in out.splitlines() if not x.startswith("#")))
    if is_ebpf(lab):
        node = lab.pod(target)["node"]
        parts.append(f"cgroup: {ebpf.attached_cgroup_programs(lab.dir, node)}")
        parts.append(f"sk_lookup: {ebpf.sk_lookup_attached(lab.dir, node, lab.netns(target))}")
    return "\n====\n".join(parts)


def refused(lab: LabHandle, target: str, url: str) -> bool:
    code, body = lab.curl(target, url, max_time=2)
    return code != 0 or not body.startswith("peer=")


def test_pods_are_enrolled_and_the_chain_ran(lab: LabHandle) -> None:
    lab.require(*MESH)
    pods = {f"{p['namespace']}/{p['name']}": p for p in lab.status()["pods"]}
    assert pods["lab/client"]["enrolled"] and pods["lab/server"]["enrolled"]
    assert not pods["lab/outsider"]["enrolled"]
    if is_ebpf(lab):  # no redirect rule in the pod netns: programs attached instead
        for pod in ("lab/client", "lab/server"):
            assert "ZTUNNEL" not in lab.run(pod, "iptables-save").stdout + lab.run(pod, "ip6tables-save").stdout
            assert "REDIRECT" not in lab.run(pod, "iptables-save", "-t", "nat").stdout
            assert ebpf.sk_lookup_attached(lab.dir, pods[pod]["node"], lab.netns(pod))
        assert not ebpf.sk_lookup_attached(lab.dir, "n1", lab.netns("lab/outsider"))
        for node in ("n1", "n2"):
            assert ebpf.attached_cgroup_programs(lab.dir, node) == sorted(
                ["connect4", "connect6", "recvmsg4", "recvmsg6", "sendmsg4", "sendmsg6", "sockops",
                 "getpeername4", "getpeername6", "getsockname4", "getsockname6"]
            )
    else:
        assert "ZTUNNEL" in lab.run("lab/client", "iptables-save", "-t", "nat").stdout
    assert "ZTUNNEL" not in lab.run("lab/outsider", "iptables-save", "-t", "nat").stdout
    # the chain's final result is the bridge plugin's, passed through by ztunnel-cni
    result = lab.pod("lab/client")
    cached = json.loads((lab.dir / "state.json").read_text())["pods"]["lab/client"]["cni_result"]
    assert {i["name"] for i in cached["interfaces"]} >= {"cni0", "eth0"}
    assert cached["ips"][0]["address"] == f"{result['ips'][0]}/24"
    conflist = (lab.dir / "nodes" / "n1" / "net.d" / "10-lab.conflist").read_text()
    assert conflist.index('"bridge"') < conflist.index('"ztunnel-cni"')  # chained after the primary plugin


def test_mesh_traffic_is_hbone_on_the_wire_and_keeps_the_client_ip(lab: LabHandle) -> None:
    lab.require(*MESH)
    pcap = lab.work / "n2-eth0.pcap"
    dump = subprocess.Popen(
        # --immediate-mode: hand each packet over at once (not after the ring buffer's block timeout);
        # -Z root: keep writing into the test's private tmp dir
        [
            *NETNS_EXEC,
            lab.netns("node/n2"),
            *TCPDUMP,
            str(pcap),
            "tcp",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert dump.stderr is not None
        line = dump.stderr.readline()  # "listening on eth0 ..." once the capture runs
        assert "listening on" in line, line
        code, body = lab.curl("lab/client", server_url(lab))
        assert code == 0
        assert body.strip() == f"peer={lab.pod_ip('lab/client')}"  # the server sees the client pod's IP
    finally:
        dump.send_signal(signal.SIGINT)
        dump.wait(timeout=10)
        if dump.stderr is not None:
            dump.stderr.close()
    raw = pcap.read_bytes()
    assert b"GET / HTTP" not in raw and b"peer=" not in raw  # never the HTTP payload in clear

    def count(expr: str) -> int:
        out = subprocess.run(["tcpdump", "-r", str(pcap), "-nn", expr], capture_output=True, text=True).stdout
        return len(out.splitlines())

    assert count("tcp port 15008") > 0
    tls_record = (
        "tcp port 15008 and (tcp[((tcp[12:1] & 0xf0) >> 2):1] = 0x17 or tcp[((tcp[12:1] & 0xf0) >> 2):1] = 0x16)"
    )
    assert count(tls_record) > 0  # TLS records (application data or handshake)
    assert count("tcp port 8080") == 0

    metrics = lab.metrics("n2")
    opened = [
        line
        for line in metrics.splitlines()
        if line.startswith("istio_tcp_connections_opened_total{")
        and 'reporter="destination"' in line
        and f'source_principal="{CLIENT_PRINCIPAL}"' in line
    ]
    assert opened and float(opened[0].rsplit(" ", 1)[1]) >= 1


def test_out_of_mesh_pod_permissive_then_strict_and_node_probes_still_work(lab: LabHandle) -> None:
    lab.require(*MESH)
    url = server_url(lab)
    code, body = lab.curl("lab/outsider", url)
    assert code == 0 and body.strip() == f"peer={lab.pod_ip('lab/outsider')}"  # PERMISSIVE: plaintext accepted
    lab.apply(STRICT)
    try:
        eventually(lambda: refused(lab, "lab/outsider", url), 5, 0.1, what="STRICT to refuse the plaintext client")
        code, body = lab.curl("node/n2", url)  # kubelet-style probe from the node
        assert code == 0 and body.strip() == "peer=169.254.7.127", body
        code, body = lab.curl("lab/client", url)  # mesh clients are unaffected
        assert code == 0 and body.startswith("peer=")
    finally:
        lab.delete(STRICT)
    eventually(lambda: not refused(lab, "lab/outsider", url), 5, 0.1, what="plaintext to be accepted again")


def test_authorization_policy_refuses_within_2s_and_removal_restores(lab: LabHandle) -> None:
    lab.require(*MESH)
    url = server_url(lab)
    assert not refused(lab, "lab/client", url)
    policy_file = lab.work / "deny-client.yaml"
    live = lab.dir / "cluster.yaml"
    # The clock starts when the policy file is written and `lab apply` starts: the CLI's own start-up, the live
    # config write, the components' config polling and the proxy's policy rebuild all count towards the 2 s.
    start = time.monotonic()
    policy_file.write_text(DENY_CLIENT)
    apply = subprocess.Popen(
        [*ZTUNNEL, "lab", "apply", "--name", lab.name, "-f", str(policy_file)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        live_written = None  # when the live config first held the policy (for the failure message)
        refused_after = None
        while refused_after is None and time.monotonic() - start < 2.0:
            if live_written is None and "deny-client" in live.read_text():
                live_written = time.monotonic() - start
            if refused(lab, "lab/client", url):
                refused_after = time.monotonic() - start
            else:
                time.sleep(0.02)
        _out, err = apply.communicate(timeout=30)
        assert apply.returncode == 0, err
        assert refused_after is not None and refused_after <= 2.0, (
            f"the client was not refused within 2 s of `lab apply` starting "
            f"(live config written after {live_written}s, refused after {refused_after}s)"
        )
        assert not refused(lab, "lab/outsider", url)  # the policy names only the client's principal
    finally:
        if apply.poll() is None:
            apply.kill()
            apply.wait()
        lab.delete(DENY_CLIENT)
    eventually(lambda: not refused(lab, "lab/client", url), 2.0, 0.05, what="access to come back")


def test_fail_closed_without_the_client_nodes_proxy(lab: LabHandle) -> None:
    lab.require(*MESH)
    url = server_url(lab)
    before = ruleset(lab, "lab/client")
    server_log = Path(lab.pod("lab/server")["containers"]["main"]["log"])
    client_ip = lab.pod_ip("lab/client")
    seen_before = server_log.read_text().count(f"request from {client_ip}")
    subprocess.run(
        [*ZTUNNEL, "lab", "kill", "proxy", "--node", "n1", "--name", lab.name],
        check=True,
        cwd=ROOT,
        capture_output=True,
    )
    try:
        code, _ = lab.curl("lab/client", url, max_time=2)
        assert code != 0  # refused, not sent around the proxy
        assert server_log.read_text().count(f"request from {client_ip}") == seen_before
        assert ruleset(lab, "lab/client") == before  # the rules stay while the proxy is gone
    finally:
        subprocess.run(
            [*ZTUNNEL, "lab", "restart", "proxy", "--node", "n1", "--name", lab.name],
            check=True,
            cwd=ROOT,
            capture_output=True,
        )
    eventually(lambda: not refused(lab, "lab/client", url), 10, 0.1, what="the client to work again after the restart")
    assert ruleset(lab, "lab/client") == before  # nothing lost, nothing duplicated


def test_node_agent_restart_keeps_redirection_and_enrolls_a_pod_started_meanwhile(lab: LabHandle) -> None:
    lab.require(*MESH)
    url = server_url(lab)
    before = ruleset(lab, "lab/client")
    lab_args = ["--name", lab.name]
    subprocess.run(
        [*ZTUNNEL, "lab", "kill", "node-agent", "--node", "n1", *lab_args], check=True, cwd=ROOT, capture_output=True
    )
    late_yaml = lab.work / "late.yaml"
    late_yaml.write_text(LATE_POD)
    apply = None
    try:
        assert not refused(lab, "lab/client", url)  # enrolled pods keep working without the agent
        assert ruleset(lab, "lab/client") == before
        apply = subprocess.Popen(
            [*ZTUNNEL, "lab", "apply", "-f", str(late_yaml), "--timeout", "60", *lab_args],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert apply.stderr is not None
        lines = []
        for line in apply.stderr:  # the kubelet-style retry of a failing CNI ADD
            lines.append(line)
            if "retrying" in line:
                break
        assert any("retrying" in x for x in lines), lines
    finally:
        subprocess.run(
            [*ZTUNNEL, "lab", "restart", "node-agent", "--node", "n1", *lab_args],
            check=True,
            cwd=ROOT,
            capture_output=True,
        )
    try:
        _out, err = apply.communicate(timeout=60)  # reads both pipes to the end and closes them
        assert apply.returncode == 0, err
        assert ruleset(lab, "lab/client") == before  # reconcile re-applied idempotently
        assert not refused(lab, "lab/client", url)
        if is_ebpf(lab):
            assert ebpf.sk_lookup_attached(lab.dir, "n1", lab.netns("lab/late"))
        else:
            assert "ZTUNNEL" in lab.run("lab/late", "iptables-save", "-t", "nat").stdout
        code, body = lab.curl("lab/late", url)
        assert code == 0 and body.strip() == f"peer={lab.pod_ip('lab/late')}"
        eventually(
            lambda: 'source_principal="spiffe://cluster.local/ns/lab/sa/late"' in lab.metrics("n2"),
            5,
            0.1,
            what="the late pod's principal in the server node's metrics",
        )
    finally:
        lab.delete(LATE_POD)


def test_status_reports_processes_and_metrics_endpoints(lab: LabHandle) -> None:
    lab.require("proxy")
    st = lab.status()
    for n in st["nodes"]:
        assert n["proxy"]["running"] and "15020/metrics" in n["proxy"]["metrics"]
        assert n["node_agent"]["running"]
    assert re.match(r"\d+\.\d+\.\d+\.\d+:\d+", st["ca"]["address"])
    assert sys.executable  # the lab runs this interpreter's CLI
