"""Issue 12's greeter acceptance in the lab (seed 002): the lab deploys the waypoint of a Gateway by itself, and
the seed's AuthorizationPolicies, unchanged, are enforced per HTTP request by it; real curl in the helloweb pod.

The cluster is examples/lab-greeter-waypoint.yaml (the seed's Service and pods, a waypoint Gateway and the
namespace label) applied to the session's lab on its nodes, and deleted at the end: the waypoint pod goes too.
The lab is built with `--mesh on`: a missing or broken component fails these tests (never skips them).
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator

import pytest
import yaml

from tests.support.lab_waypoint import applied, gateway_yaml, http, waypoint_pod
from tests.support.waypoint_config import GREETER_DENY_ALL, GREETER_GET_HELLO

from .conftest import ROOT, LabHandle

pytestmark = pytest.mark.netns  # root + network namespaces; conftest skips with the reason otherwise

WAYPOINT = waypoint_pod("default")
CLIENT = "default/helloweb"
GREETER = "default/greeter-service-v1"
URL = "http://greeter-service.default.svc.cluster.local:3000"
DENIED = (403, "RBAC: access denied")

# the seed's policies, verbatim
DENY_ALL = GREETER_DENY_ALL.format(ns="default")
GET_HELLO = GREETER_GET_HELLO.format(ns="default")


def greeter_cluster() -> str:
    """The example on the session lab's nodes (a running lab cannot lose nodes, so it gets none)."""
    docs = list(yaml.safe_load_all((ROOT / "examples" / "lab-greeter-waypoint.yaml").read_text()))
    out = []
    for d in docs:
        if d["kind"] == "Node":
            continue
        if d["kind"] == "Pod":
            d["spec"]["nodeName"] = {"node1": "n1", "node2": "n2"}[d["spec"]["nodeName"]]
        out.append(d)
    return yaml.safe_dump_all(out, sort_keys=False, allow_unicode=True)


@pytest.fixture(scope="module")
def greeter(lab: LabHandle) -> Iterator[LabHandle]:
    lab.require("ca", "node-agent", "proxy", "cni-plugin")
    with applied(lab, greeter_cluster(), WAYPOINT):
        yield lab


Apply = Callable[[str], None]


@pytest.fixture
def policy(greeter: LabHandle) -> Iterator[Apply]:
    """Apply a policy for one test, delete it afterwards."""
    texts: list[str] = []

    def apply(text: str) -> None:
        greeter.apply(text)
        texts.append(text)

    yield apply
    for text in reversed(texts):
        greeter.delete(text)


def waypoint_log(lab: LabHandle) -> str:
    return (lab.dir / "logs" / f"pod_{WAYPOINT.replace('/', '_')}_istio-proxy.log").read_text(errors="replace")


def test_the_lab_deploys_the_waypoint_as_a_pod_with_its_own_svid(greeter: LabHandle) -> None:
    pod = greeter.pod(WAYPOINT)
    assert pod["waypoint"] == "default/waypoint" and pod["ips"]
    assert pod["identity"] == "spiffe://cluster.local/ns/default/sa/waypoint"
    assert not pod["enrolled"] and not pod["ambient"]  # not captured: it speaks HBONE itself
    assert pod["containers"]["istio-proxy"]["running"]
    dump = json.loads(greeter.run(WAYPOINT, "curl", "-sS", "http://127.0.0.1:15000/config_dump", check=True).stdout)
    assert dump["waypoint"] == "default/waypoint"
    assert dump["identity"] == "spiffe://cluster.local/ns/default/sa/waypoint"  # its SVID, from the lab's CA
    # the Gateway's status says where its waypoint is, as Istio's controller reports it
    live = yaml.safe_load_all((greeter.dir / "cluster.yaml").read_text())
    gateway = next(d for d in live if d["kind"] == "Gateway" and d["metadata"]["name"] == "waypoint")
    assert gateway["status"]["addresses"] == [{"type": "IPAddress", "value": pod["ips"][0]}]
    assert gateway["status"]["conditions"] == [{"type": "Programmed", "status": "True"}]
    # the Service the seed wrote without an address got one, and the name resolves to it in the pod
    svc = greeter.run(CLIENT, "getent", "hosts", "greeter-service.default.svc.cluster.local", check=True).stdout
    assert svc.split()[0].startswith("10.96.")
    # no policy: allowed, and through the waypoint (its access line names the client's SVID and the pod)
    assert http(greeter, CLIENT, f"{URL}/hello")[0][0] == 200
    line = [x for x in waypoint_log(greeter).splitlines() if "request complete" in x and "path=/hello" in x][-1]
    assert "src.identity=spiffe://cluster.local/ns/default/sa/helloweb" in line
    assert f"upstream={greeter.pod_ip(GREETER)}:3000" in line


def test_deny_all_is_rbac_access_denied(greeter: LabHandle, policy: Apply) -> None:
    policy(DENY_ALL)
    assert http(greeter, CLIENT, f"{URL}/hello") == [DENIED]


def test_get_hello_only_each_request_decided_on_its_own(greeter: LabHandle, policy: Apply) -> None:
    policy(GET_HELLO)
    (code, body), = http(greeter, CLIENT, f"{URL}/hello")
    assert code == 200 and json.loads(body)["message"].startswith("hello")
    assert http(greeter, CLIENT, f"{URL}/version") == [DENIED]
    assert http(greeter, CLIENT, "-X", "POST", "-d", "x=1", f"{URL}/hello") == [DENIED]
    # two requests on one keep-alive connection: allowed, then denied (curl reuses the connection: 1 connect, 0)
    p = greeter.run(
        CLIENT, "curl", "-sS", "-m", "5", "-w", "%{http_code} %{num_connects}\n",
        "-o", "/dev/null", "-o", "/dev/null",  # one -o per URL
        f"{URL}/hello", f"{URL}/version",
    )  # fmt: skip
    assert p.stdout.split("\n")[:2] == ["200 1", "403 0"], (p.stdout, p.stderr)
    metrics = greeter.run(WAYPOINT, "curl", "-sS", "http://127.0.0.1:15020/metrics", check=True).stdout
    denied = [
        line for line in metrics.splitlines()
        if line.startswith("istio_requests_total{") and 'response_code="403"' in line and 'reporter="waypoint"' in line
    ]  # fmt: skip
    assert denied and float(denied[0].rsplit(" ", 1)[1]) >= 3


def test_the_pod_ip_does_not_serve_a_client_that_skips_the_waypoint(greeter: LabHandle, policy: Apply) -> None:
    policy(GET_HELLO)
    direct = f"http://{greeter.pod_ip(GREETER)}:3000"
    for client in (CLIENT, "lab/outsider"):  # a mesh client (HBONE, its own SVID) and a plaintext one
        for path in ("/version", "/hello"):
            (code, body), = http(greeter, client, f"{direct}{path}")
            assert code == 0 and "version" not in body, (client, path, code, body)
    assert http(greeter, CLIENT, f"{URL}/hello")[0][0] == 200  # through the waypoint it still answers


H2C = "--http2-prior-knowledge"  # h2c: HTTP/2 without TLS or Upgrade, as a gRPC client speaks it
HOST = "greeter-service.default.svc.cluster.local"
H2C_TWO_STREAMS = """\
import socket, sys
import h2.config, h2.connection, h2.events
host, port, paths = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
sock = socket.create_connection((host, port), timeout=5)
conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
conn.initiate_connection()
sock.sendall(conn.data_to_send())
for i, path in enumerate(paths):
    sid = 1 + 2 * i
    head = [(":method", "GET"), (":path", path), (":scheme", "http"), (":authority", f"{host}:{port}")]
    conn.send_headers(sid, head, end_stream=True)
    sock.sendall(conn.data_to_send())
    status, body, done = b"", b"", False
    while not done:
        data = sock.recv(65536)
        if not data:
            sys.exit(f"connection closed before stream {sid} ended")
        for ev in conn.receive_data(data):
            if isinstance(ev, (h2.events.ConnectionTerminated, h2.events.StreamReset)):
                sys.exit(f"{ev}")
            if getattr(ev, "stream_id", None) != sid:
                continue
            if isinstance(ev, h2.events.ResponseReceived):
                status = dict(ev.headers)[b":status"]
            elif isinstance(ev, h2.events.DataReceived):
                body += ev.data
                conn.acknowledge_received_data(ev.flow_controlled_length, sid)
            elif isinstance(ev, h2.events.StreamEnded):
                done = True
        sock.sendall(conn.data_to_send())
    print(sid, status.decode(), body.decode())
"""


def test_h2c_deny_all_is_rbac_access_denied(greeter: LabHandle, policy: Apply) -> None:
    policy(DENY_ALL)
    assert http(greeter, CLIENT, H2C, f"{URL}/hello") == [DENIED]


def test_h2c_with_prior_knowledge_each_stream_decided_on_its_own(greeter: LabHandle, policy: Apply) -> None:
    policy(GET_HELLO)
    (code, body), = http(greeter, CLIENT, H2C, f"{URL}/hello")
    assert code == 200 and json.loads(body)["message"].startswith("hello")
    assert http(greeter, CLIENT, H2C, f"{URL}/version") == [DENIED]
    assert http(greeter, CLIENT, H2C, "-X", "POST", "-d", "x=1", f"{URL}/hello") == [DENIED]
    # two streams on one HTTP/2 connection, one after the other: allowed, then denied. Not with curl: this
    # machine's 7.88.1 breaks a reused h2c connection itself (curl/curl#10634, fixed in 8.0), so h2's client
    script = greeter.work / "h2c_two_streams.py"
    script.write_text(H2C_TWO_STREAMS)
    p = greeter.run(CLIENT, sys.executable, str(script), HOST, "3000", "/hello", "/version", timeout=20)
    lines = p.stdout.splitlines()
    assert lines[:1] and lines[0].startswith("1 200 {") and lines[1:] == ["3 403 RBAC: access denied"], p
    (code, body), = http(greeter, CLIENT, H2C, f"http://{greeter.pod_ip(GREETER)}:3000/version")
    assert code == 0 and "version" not in body  # and no way around the waypoint over h2c either


def _ready_condition(lab: LabHandle) -> str:
    """The waypoint pod's Ready condition in the live config ("" while it has no IP)."""
    for doc in yaml.safe_load_all((lab.dir / "cluster.yaml").read_text()):
        meta = doc.get("metadata") or {}
        if doc.get("kind") == "Pod" and f"{meta.get('namespace')}/{meta.get('name')}" == WAYPOINT:
            status = doc.get("status") or {}
            conditions = [c["status"] for c in status.get("conditions") or [] if c.get("type") == "Ready"]
            return conditions[0] if conditions and status.get("podIP") else ""
    return ""


def test_a_reapplied_gateway_brings_back_its_dead_waypoint(greeter: LabHandle) -> None:
    """As a Deployment would: the waypoint's process killed, then the Gateway applied again -> a new pod."""
    before = greeter.pod(WAYPOINT)["containers"]["istio-proxy"]["pid"]
    os.kill(before, signal.SIGKILL)
    assert http(greeter, CLIENT, f"{URL}/hello")[0][0] == 0  # no waypoint: refused, never around it
    # while the new waypoint starts, its pod has an IP but is not Ready: the node proxies do not send to it yet
    seen: list[str] = []
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        applying = pool.submit(greeter.apply, gateway_yaml("default"))
        while not applying.done():
            seen.append(_ready_condition(greeter))
            time.sleep(0.02)
        out = applying.result().stdout
    assert "False" in seen and _ready_condition(greeter) == "True", seen
    assert f"Pod {WAYPOINT} (waypoint) created" in out
    pod = greeter.pod(WAYPOINT)
    assert pod["containers"]["istio-proxy"]["running"] and pod["containers"]["istio-proxy"]["pid"] != before
    assert http(greeter, CLIENT, f"{URL}/hello")[0][0] == 200
    # applied again while it runs: left alone
    assert "(waypoint)" not in greeter.apply(gateway_yaml("default")).stdout
    assert greeter.pod(WAYPOINT)["containers"]["istio-proxy"]["pid"] == pod["containers"]["istio-proxy"]["pid"]
