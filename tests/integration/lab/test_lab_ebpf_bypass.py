"""A process in an enrolled pod, with no capability, trying to reach another pod without its node proxy, on the
iptables lab and the eBPF lab (issue 13: eBPF must be correct in every case the iptables mode is).

The attacker runs as nobody with an empty bounding set. An outbound connection went through the proxy when the
client's proxy logged it (its source port, the destination the app dialled); its reply says it arrived.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support.eventually import eventually

from .conftest import LabHandle

pytestmark = pytest.mark.netns  # root + network namespaces; conftest skips with the reason otherwise

UNPRIVILEGED = ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups"]
UNPRIVILEGED += ["--bounding-set=-all", "--inh-caps=-all", "/usr/bin/python3", "-c"]

# argv: attack, ip, port[, extra...]; prints {"local": getsockname(), "peer": getpeername(), "reply": body} (the
# names read after the reply: a connection the peer closed still has them) or {"error": ...}
DIAL = r"""
import ctypes, json, select, socket, struct, sys
attack, ip, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
REQ = b"GET / HTTP/1.0\r\nHost: x\r\n\r\n"
s = socket.socket(socket.AF_INET6 if ":" in ip else socket.AF_INET)
try:
    if attack == "connect":
        s.connect((ip, port)); s.sendall(REQ)
    elif attack == "tfo_sendto":  # TCP Fast Open: the SYN carries the data, no connect()
        s.sendto(REQ, socket.MSG_FASTOPEN, (ip, port))
    elif attack == "tfo_connect":
        s.setsockopt(socket.IPPROTO_TCP, 30, 1); s.connect((ip, port)); s.sendall(REQ)  # TCP_FASTOPEN_CONNECT
    elif attack == "nonblock":
        s.setblocking(False); s.connect_ex((ip, port)); select.select([], [s], [], 4); s.setblocking(True)
        s.sendall(REQ)
    elif attack == "bind":
        s.bind(("", 0)); s.connect((ip, port)); s.sendall(REQ)
    elif attack == "unspec":  # connected elsewhere first, dissolved by AF_UNSPEC, connected again
        s.connect((sys.argv[4], int(sys.argv[5])))
        sa = struct.pack("=H14s", 0, b"")
        assert ctypes.CDLL(None).connect(s.fileno(), sa, len(sa)) == 0
        s.connect((ip, port)); s.sendall(REQ)
    elif attack == "somark":
        s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, 0x539); s.connect((ip, port)); s.sendall(REQ)
    s.settimeout(4)
    data = b""
    while chunk := s.recv(4096):
        data += chunk
    reply = data.decode().split("\r\n\r\n")[-1].strip()
    print(json.dumps({"local": s.getsockname()[:2], "peer": s.getpeername()[:2], "reply": reply}))
except OSError as e:
    print(json.dumps({"error": f"{type(e).__name__}: {e}"}))
"""

# argv: A's source address, B's, then two destinations: socket A bound to (A's address, P) dials the first,
# socket B bound to (B's address, P) the second (B first with "b-first"): one source port, two connections, both
# made before any is read
SHARED_PORT = r"""
import json, socket, sys
srcs, dsts = sys.argv[1:3], [(sys.argv[i], int(sys.argv[i + 1])) for i in (3, 5)]
REQ = b"GET / HTTP/1.0\r\nHost: x\r\n\r\n"
pairs, failed = [], {}
for _ in range(int(sys.argv[7])):
    a = socket.socket(); a.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); a.bind((srcs[0], 0))
    b = socket.socket(); b.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); b.bind((srcs[1], a.getsockname()[1]))
    pairs.append((a, b))
    order = list(zip((a, b), dsts))
    for s, dst in order[::-1] if sys.argv[8] == "b-first" else order:
        try:
            s.connect(dst)
        except OSError as e:
            failed[s] = f"error {e}"
out = []
for pair in pairs:
    row = []
    for s in pair:
        if s in failed:
            row.append(failed[s])
            continue
        try:
            s.sendall(REQ); s.settimeout(4); data = b""
            while chunk := s.recv(4096):
                data += chunk
            row.append(data.decode().split("\r\n\r\n")[-1].strip())
        except OSError as e:
            row.append(f"error {e}")
    out.append(row)
print(json.dumps(out))
"""

# argv: how (sendto, connected, tcp), resolver; prints the answer's source address and port and its id
DNS_QUERY = r"""
import socket, struct, sys
how, resolver = sys.argv[1], sys.argv[2]
name = b"".join(bytes([len(p)]) + p.encode() for p in b"server.lab.svc.cluster.local".decode().split(".")) + b"\0"
q = struct.pack("!HHHHHH", 0x5A5A, 0x0100, 1, 0, 0, 0) + name + struct.pack("!HH", 1, 1)
s = socket.socket(socket.AF_INET6 if ":" in resolver else socket.AF_INET,
                  socket.SOCK_STREAM if how == "tcp" else socket.SOCK_DGRAM)
s.settimeout(3)
try:
    if how == "sendto":
        s.sendto(q, (resolver, 53)); data, src = s.recvfrom(512)
    elif how == "connected":
        s.connect((resolver, 53)); s.send(q); data, src = s.recvfrom(512)
    else:
        s.connect((resolver, 53)); s.sendall(struct.pack("!H", len(q)) + q); data = s.recv(512)[2:]
        src = s.getpeername()
    print(src[0], src[1], hex(struct.unpack("!H", data[:2])[0]))
except OSError as e:
    print("error", e)
"""


@pytest.fixture(params=["iptables", "ebpf"])
def mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def mode_lab(request: pytest.FixtureRequest, mode: str) -> LabHandle:
    lab: LabHandle = request.getfixturevalue(f"{mode}_lab")
    lab.require("node-agent", "proxy")
    return lab


def unprivileged(lab: LabHandle, pod: str, script: str, *args: str, timeout: float = 30) -> str:
    p = lab.run(pod, *UNPRIVILEGED, script, *args, timeout=timeout)
    assert p.returncode == 0, p.stderr
    return p.stdout.strip()


def node_of(lab: LabHandle, pod: str) -> str:
    return str(lab.pod(pod)["node"])


def proxied(lab: LabHandle, node: str, src: str, dst: str) -> bool:
    """Whether the node's proxy logged an outbound connection from src (ip:port) to dst (ip:port)."""
    log = (lab.dir / "logs" / f"node_{node}_proxy.log").read_text()
    return any(
        f"src.addr={src} " in line and f"dst.addr={dst} " in line and "direction=outbound" in line
        for line in log.splitlines()
    )


def source_port(lab: LabHandle, pod: str, local: list[object]) -> str:
    """How the proxy logs a client: the pod's address and the app socket's port."""
    return f"{lab.pod_ip(pod)}:{local[1]}"


@pytest.mark.parametrize("family", ["v4", "v4-mapped"])
@pytest.mark.parametrize("attack", ["connect", "tfo_sendto", "tfo_connect", "nonblock", "bind", "unspec"])
def test_every_way_of_connecting_goes_through_the_proxy(mode_lab: LabHandle, attack: str, family: str) -> None:
    """An AF_INET6 socket dialling ::ffff:<pod> sends IPv4 packets: iptables redirects them; connect6 let them
    out untouched (plaintext, no policy, no mTLS) until it gave them connect4's decision."""
    lab = mode_lab
    server = lab.pod_ip("lab/server")
    target = server if family == "v4" else f"::ffff:{server}"
    first = lab.pod_ip("lab/plain") if family == "v4" else f"::ffff:{lab.pod_ip('lab/plain')}"
    extra = [first, "8080"] if attack == "unspec" else []
    out = json.loads(unprivileged(lab, "lab/client", DIAL, attack, target, "8080", *extra))
    client = lab.pod_ip("lab/client")
    assert out.get("reply") == f"peer={client}", out
    # the app's view of its socket is the same in both modes: what it dialled, from the pod's address
    assert out["peer"] == [target, 8080] and out["local"][0] == (client if family == "v4" else f"::ffff:{client}")
    src = source_port(lab, "lab/client", out["local"])
    eventually(lambda: proxied(lab, "n1", src, f"{server}:8080"), 5, 0.1, what=f"the proxy to log {src}")


def test_the_proxy_mark_needs_a_capability(mode_lab: LabHandle) -> None:
    out = json.loads(unprivileged(mode_lab, "lab/client", DIAL, "somark", mode_lab.pod_ip("lab/server"), "8080"))
    assert out == {"error": "PermissionError: [Errno 1] Operation not permitted"}


def test_connections_sharing_a_source_port_keep_their_own_destinations(mode_lab: LabHandle, mode: str) -> None:
    """Two sockets bound to one port on different local addresses: keyed by the port alone, the second
    connect's destination replaced the first one's, and the proxy sent the first connection there."""
    lab = mode_lab
    client, server = lab.pod_ip("lab/client"), lab.pod_ip("lab/server")
    metrics = "172.30.0.12"  # n2's address: its metrics port answers "no such path /" to GET /
    args = ["127.0.0.1", client, server, "8080", metrics, "15020", "8", "a-first"]
    out = json.loads(unprivileged(lab, "lab/client", SHARED_PORT, *args))
    for a, b in out:
        # iptables mode: a socket bound to 127.0.0.1 cannot leave the pod (EINVAL); eBPF: it reaches the proxy
        assert a == f"peer={client}" or a.startswith("error"), out
        assert b.startswith("no such path /"), out
    if mode == "ebpf":
        assert all(a == f"peer={client}" for a, _ in out), out


@pytest.mark.parametrize("how", ["sendto", "connected", "tcp"])
def test_dns_over_v4_mapped_addresses_is_captured_like_ipv4(mode_lab: LabHandle, how: str) -> None:
    """A query to ::ffff:<resolver> is IPv4 on the wire: captured, and answered from the resolver's address
    (recvfrom(), and getpeername() of a connected socket: the loopback:15053 it was sent to is ours)."""
    lab = mode_lab
    conf = lab.run("lab/client", "cat", "/etc/resolv.conf").stdout
    resolver = next(line.split()[1] for line in conf.splitlines() if line.startswith("nameserver"))
    other = lab.pod_ip("lab/plain")  # not the pod's resolver: port 53 anywhere is captured
    for target in (resolver, f"::ffff:{resolver}", other, f"::ffff:{other}"):
        out = unprivileged(lab, "lab/client", DNS_QUERY, how, target)
        assert out == f"{target} 53 0x5a5a", (target, out)  # nothing listens there: only the capture answers


def test_the_pod_itself_is_never_redirected(mode_lab: LabHandle) -> None:
    """0.0.0.0 means the host itself to connect() (the kernel dials 127.0.0.1): iptables leaves it in the pod;
    eBPF sent it to the proxy, which had nowhere to take 0.0.0.0:8080. A query to the pod's own address:53 is
    not captured either (iptables accepts everything that stays on lo)."""
    lab = mode_lab
    for target in ("0.0.0.0", "127.0.0.1", "::ffff:127.0.0.1"):
        out = json.loads(unprivileged(lab, "lab/server", DIAL, "connect", target, "8080"))
        assert out.get("reply") in ("peer=127.0.0.1", "peer=::ffff:127.0.0.1"), (target, out)
    server_log = Path(lab.pod("lab/server")["containers"]["main"]["log"]).read_text()
    assert "request from 127.0.0.1" in server_log
    own = lab.pod_ip("lab/client")
    assert unprivileged(lab, "lab/client", DNS_QUERY, "sendto", own) == "error timed out"


def test_a_connection_dialled_straight_to_the_outbound_port_takes_no_other_destination(mode_lab: LabHandle) -> None:
    """B, bound to A's address and port, dials the pod's own address:15001 (no redirection: the pod itself), then A
    dials the server (redirected to 127.0.0.1:15001 from the same address and port): the proxy looked B up by
    its peer alone and sent B where A was going."""
    lab = mode_lab
    client, server = lab.pod_ip("lab/client"), lab.pod_ip("lab/server")
    args = [client, client, server, "8080", client, "15001", "8", "b-first"]
    out = json.loads(unprivileged(lab, "lab/client", SHARED_PORT, *args))
    for a, b in out:
        assert not b.startswith("peer="), out  # B never reaches the server
        assert a == f"peer={client}" or a.startswith("error"), out
    assert any(a == f"peer={client}" for a, _ in out), out


# argv: own address, victim, port. With CAP_NET_RAW (containers' default): a 0x111-marked connect from (own
# address, P) that never reaches a pod, then the victim's app dialled from that address and port
PLANT = r"""
import json, socket, sys
me, victim, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, 0x111); s.bind((me, 0)); p = s.getsockname()[1]
s.setblocking(False); s.connect_ex(("192.0.2.1", port)); s.close()  # TEST-NET-1: its SYN reaches no pod
t = socket.socket(); t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); t.bind((me, p)); t.settimeout(3)
try:
    t.connect((victim, port)); t.sendall(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n"); data = b""
    while chunk := t.recv(4096):
        data += chunk
    print(json.dumps({"reply": data.decode(errors="replace").split("\r\n\r\n")[-1].strip()}))
except OSError as e:
    print(json.dumps({"error": str(e)}))
"""

STRICT = """
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: strict-server, namespace: lab}
spec:
  selector: {matchLabels: {app: server}}
  mtls: {mode: STRICT}
"""


def test_the_proxys_marks_alone_do_not_open_an_app_under_strict(mode_lab: LabHandle) -> None:
    """A pod with CAP_NET_RAW (no more) on the server's node, in the mesh or not: SO_MARK 0x111 on a connect()
    made connect4 note its address and port in `bypass`, as for the proxy's delivery to an app, and sk_lookup
    then let its next SYN from there straight to any app on the node, STRICT or not. The programs now trust
    only sockets the proxy tagged; iptables mode never had node-wide state to plant."""
    lab = mode_lab
    plain, server = lab.pod_ip("lab/plain"), lab.pod_ip("lab/server")
    url = f"http://{server}:8080/"
    lab.apply(STRICT)
    try:
        eventually(lambda: lab.curl("lab/plain", url)[0] != 0, 5, 0.1, what="STRICT to refuse plaintext")
        net_raw = ["setpriv", "--bounding-set=-all,+net_raw", "--inh-caps=-all", "/usr/bin/python3", "-c"]
        for _ in range(3):
            p = lab.run("lab/plain", *net_raw, PLANT, plain, server, "8080", timeout=30)
            assert p.returncode == 0, p.stderr
            assert "reply" not in json.loads(p.stdout), p.stdout  # refused by the server's proxy, never the app
    finally:
        lab.delete(STRICT)
    eventually(lambda: lab.curl("lab/plain", url)[0] == 0, 5, 0.1, what="plaintext to be accepted again")


def test_the_proxy_mark_set_with_cap_net_raw_is_still_redirected(mode_lab: LabHandle) -> None:
    """SO_MARK 0x539 needs only CAP_NET_RAW on Linux >= 5.17. The programs trust only sockets the proxy tagged;
    the rules only marked sockets of the proxy's cgroup (before, iptables mode trusted the mark: such an app
    reached the server in plaintext around both proxies)."""
    lab = mode_lab
    server = lab.pod_ip("lab/server")
    net_raw = ["setpriv", "--bounding-set=-all,+net_raw", "--inh-caps=-all", "/usr/bin/python3", "-c"]
    p = lab.run("lab/client", *net_raw, DIAL, "somark", server, "8080", timeout=30)
    out = json.loads(p.stdout)
    assert out.get("reply") == f"peer={lab.pod_ip('lab/client')}", (out, p.stderr)
    src = source_port(lab, "lab/client", out["local"])
    eventually(lambda: proxied(lab, "n1", src, f"{server}:8080"), 5, 0.1, what=f"the proxy to log {src}")


# argv: port, destination ip, port: accept one connection (the proxy's delivery: mark 0x111 in eBPF mode, from
# tcp_fwmark_accept), dissolve it with AF_UNSPEC and dial the destination with that very socket
REUSE_ACCEPTED = r"""
import ctypes, json, socket, struct, sys
l = socket.socket(); l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); l.bind(("0.0.0.0", int(sys.argv[1])))
l.listen(4); l.settimeout(15)
print("listening", flush=True)
c, _ = l.accept()
sa = struct.pack("=H14s", 0, b"")
assert ctypes.CDLL(None).connect(c.fileno(), sa, len(sa)) == 0
try:
    c.settimeout(4); c.connect((sys.argv[2], int(sys.argv[3]))); c.sendall(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
    data = b""
    while chunk := c.recv(4096):
        data += chunk
    reply = data.decode(errors="replace").split("\r\n\r\n")[-1].strip()
    print(json.dumps({"local": c.getsockname()[:2], "reply": reply}))
except OSError as e:
    print(json.dumps({"error": str(e)}))
"""


def test_a_socket_accepted_from_the_proxy_and_reused_is_redirected(mode_lab: LabHandle) -> None:
    """The proxy delivers to the app with mark 0x111, which the app's socket keeps in eBPF mode: dissolved and
    connected elsewhere, connect4 took it for the proxy's and skipped it (the policy routing then failed it,
    ENETUNREACH). iptables mode redirects it like any connection."""
    import subprocess

    lab = mode_lab
    client, plain = lab.pod_ip("lab/client"), lab.pod_ip("lab/plain")
    argv = ["ip", "netns", "exec", lab.netns("lab/client"), *UNPRIVILEGED, REUSE_ACCEPTED, "9090", plain, "8080"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "listening"
        lab.run("lab/server", "curl", "-sS", "-m", "3", f"http://{client}:9090/", timeout=15)  # through the mesh
        out, err = proc.communicate(timeout=20)
    finally:
        proc.kill()
        proc.wait()
    res = json.loads(out)
    assert res.get("reply") == f"peer={client}", (res, err)
    src = source_port(lab, "lab/client", res["local"])
    eventually(lambda: proxied(lab, "n1", src, f"{plain}:8080"), 5, 0.1, what=f"the proxy to log {src}")


def test_under_strict_no_port_of_the_pod_reaches_the_app_in_plaintext(mode_lab: LabHandle) -> None:
    """From a pod out of the mesh and from another node, the app's port and the proxy's own ports of the server
    pod: sk_lookup hands every SYN but 15008's to the 15006 listener (iptables: nat PREROUTING), which refuses
    plaintext under STRICT; none is answered by the app."""
    lab = mode_lab
    server = lab.pod_ip("lab/server")
    lab.apply(STRICT)
    try:
        eventually(lambda: lab.curl("lab/outsider", f"http://{server}:8080/")[0] != 0, 5, 0.1, what="STRICT")
        for source in ("lab/outsider", "node/n1"):
            for port in (8080, 15001, 15006, 15053, 15021):
                code, body = lab.curl(source, f"http://{server}:{port}/", max_time=2)
                assert code != 0 and "peer=" not in body, (source, port, code, body)
    finally:
        lab.delete(STRICT)
    eventually(lambda: lab.curl("lab/outsider", f"http://{server}:8080/")[0] == 0, 5, 0.1, what="PERMISSIVE again")
