"""The original client's address through a waypoint, in the lab: the app behind it, the waypoint's `ipBlocks`/
`remoteIpBlocks` rules and its access log all see the client pod's IP, whichever node the client runs on.

The source node proxy opens its HBONE connections from its own netns (DESIGN §4.2 pools per identity pair and
node, not per pod), so the waypoint's TCP peer is a node address (10.244.x.1 for a client on the waypoint's
node); the client's address travels in the CONNECT's `forwarded` header, which the waypoint checks against the
caller's SVID and passes on, and the destination node proxy trusts from the pod's own waypoint (DESIGN §4.6:
the app sees the real client IP).
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Iterator

import pytest
import yaml

from tests.support.eventually import eventually
from tests.support.lab_waypoint import applied, gateway_yaml, http, waypoint_pod

from .conftest import ECHO_SERVER, LabHandle

pytestmark = pytest.mark.netns  # root + network namespaces; conftest skips with the reason otherwise

NS = "wpsrc"
WAYPOINT = waypoint_pod(NS)
SERVER = f"{NS}/echo"
CLIENTS = (f"{NS}/client-near", f"{NS}/client-far")  # on the waypoint's node, and on another one
URL = f"http://echo.{NS}.svc.cluster.local:8080/"
LABELS = {"istio.io/dataplane-mode": "ambient", "istio.io/use-waypoint": "waypoint"}
NAMESPACE = yaml.safe_dump({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS, "labels": LABELS}})


def workloads(near: str, far: str) -> str:
    """The echo server and a client on NEAR (the waypoint's node) and one on FAR. The lab schedules the waypoint
    (the node with the fewest pods); the session lab may have more nodes than n1 and n2 by then (the network
    tests add n3), so the clients follow the waypoint rather than the other way round."""

    def pod(name: str, node: str, command: list[str], **extra: object) -> dict:
        container = {"name": "main", "command": command, **extra}
        return {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name, "namespace": NS, "labels": {"app": name}},
            "spec": {"nodeName": node, "serviceAccountName": name, "containers": [container]},
        }

    docs = [
        pod("echo", "n2", ["python3", "-c", ECHO_SERVER], readinessProbe={"tcpSocket": {"port": 8080}}),
        pod("client-near", near, ["sleep", "infinity"]),
        pod("client-far", far, ["sleep", "infinity"]),
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "echo", "namespace": NS},
            "spec": {"selector": {"app": "echo"}, "ports": [{"port": 8080, "name": "http"}]},
        },
    ]
    return yaml.safe_dump_all(docs, sort_keys=False)


@pytest.fixture(scope="module", params=["iptables_lab", "ebpf_lab"])
def wlab(request: pytest.FixtureRequest) -> Iterator[LabHandle]:
    """Both redirection modes: the app's node proxy dials it from the client's address through the pod's
    iptables rules or its eBPF programs (marks and policy routing differ)."""
    lab: LabHandle = request.getfixturevalue(request.param)
    lab.require("ca", "node-agent", "proxy", "cni-plugin")
    with applied(lab, NAMESPACE + "---\n" + gateway_yaml(NS), WAYPOINT):
        near = lab.pod(WAYPOINT)["node"]
        far = next(n["name"] for n in lab.status()["nodes"] if n["name"] != near)
        with applied(lab, workloads(near, far)):
            yield lab


def policy(name: str, rule_source: dict[str, list[str]]) -> str:
    """An ALLOW for the echo pod. Each gets its own name: `lab apply` waits for the proxies and the waypoint to
    list a policy by name, so a changed policy under an old name could be tested before they load it."""
    return yaml.safe_dump(
        {
            "apiVersion": "security.istio.io/v1",
            "kind": "AuthorizationPolicy",
            "metadata": {"name": name, "namespace": NS},
            "spec": {"selector": {"matchLabels": {"app": "echo"}}, "rules": [{"from": [{"source": rule_source}]}]},
        }
    )


def waypoint_lines(lab: LabHandle) -> list[str]:
    text = (lab.dir / "logs" / f"pod_{WAYPOINT.replace('/', '_')}_istio-proxy.log").read_text(errors="replace")
    return [line for line in text.splitlines() if "request complete" in line]


def test_the_app_and_the_waypoint_log_see_the_client_pod_on_either_node(wlab: LabHandle) -> None:
    waypoint_node = wlab.pod(WAYPOINT)["node"]
    assert [wlab.pod(c)["node"] == waypoint_node for c in CLIENTS] == [True, False]  # both cases covered
    seen: dict[str, tuple[int, str, str]] = {}
    expected: dict[str, tuple[int, str, str]] = {}
    for client in CLIENTS:
        ip = wlab.pod_ip(client)
        before = len(waypoint_lines(wlab))
        (code, body), = http(wlab, client, URL)
        line = waypoint_lines(wlab)[before:][-1]
        assert f"src.identity=spiffe://cluster.local/ns/{NS}/sa/{client.split('/')[1]}" in line
        src = re.search(r"src\.addr=(\S+?):\d+ ", line)
        # the app's peer and the waypoint's src.addr: the client pod, not its node or the waypoint
        seen[client] = (code, body.strip(), src.group(1) if src else line)
        expected[client] = (200, f"peer={ip}", ip)
    assert seen == expected, f"waypoint on {waypoint_node}"
    # the echo pod's node proxy logs the tunnels from the waypoint (its SVID) with the client's address too
    waypoint_id = f"src.identity=spiffe://cluster.local/ns/{NS}/sa/waypoint"
    proxy_log = wlab.dir / "logs" / f"node_{wlab.pod(SERVER)['node']}_proxy.log"

    def inbound_sources() -> set[str]:
        text = proxy_log.read_text(errors="replace")
        lines = [x for x in text.splitlines() if "direction=inbound" in x and waypoint_id in x]
        return {m.group(1) for x in lines if (m := re.search(r"src\.addr=(\S+?):\d+ ", x))}

    want = {wlab.pod_ip(c) for c in CLIENTS}
    eventually(lambda: want <= inbound_sources(), 10, 0.1, what=f"inbound lines from {want}")
    assert wlab.pod_ip(WAYPOINT) not in inbound_sources()


@pytest.mark.parametrize("field", ["ipBlocks", "remoteIpBlocks"])
def test_an_ip_rule_at_the_waypoint_admits_only_the_named_client(wlab: LabHandle, field: str) -> None:
    # the client on the waypoint's node: its tunnel's TCP peer there is the node's bridge address
    allowed, other = CLIENTS
    texts = [policy(f"{field.lower()}-client", {field: [f"{wlab.pod_ip(allowed)}/32"]})]
    wlab.apply(texts[0])
    try:
        assert http(wlab, other, URL) == [(403, "RBAC: access denied")]
        (code, body), = http(wlab, allowed, URL)
        assert (code, body.strip()) == (200, f"peer={wlab.pod_ip(allowed)}")
        # the rule names the node's bridge address instead: nobody passes (the TCP peer is not the client)
        cidr = json.loads((wlab.dir / "state.json").read_text())["nodes"][wlab.pod(allowed)["node"]]["pod_cidr"]
        bridge = next(ipaddress.ip_network(cidr).hosts())  # the node's address on its pod bridge
        wlab.delete(texts.pop())
        texts.append(policy(f"{field.lower()}-bridge", {field: [f"{bridge}/32"]}))
        wlab.apply(texts[0])
        assert http(wlab, allowed, URL) == [(403, "RBAC: access denied")]
    finally:
        for text in texts:
            wlab.delete(text)
