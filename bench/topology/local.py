"""The local topology: every path on loopback addresses in the current netns (the bench's own, as root), the
proxies in local mode (no redirection: clients enter through the SOCKS5 port)."""

from __future__ import annotations

from bench.processes import ProcessGroup, log, port_open, wait_until
from bench.settings import CLIENT_POD, ECHO_PORT, HTTP_PORT, LOADGEN, NODE_A, NODE_B, PY, SERVER_POD
from bench.topology import AMBIENT_NAMESPACE_YAML

# The local cluster: node a with the client pod, node b with the server pod (the proxies read this file).
CLUSTER_YAML = AMBIENT_NAMESPACE_YAML + f"""---
apiVersion: v1
kind: Node
metadata:
  name: a
status:
  addresses:
  - type: InternalIP
    address: {NODE_A}
---
apiVersion: v1
kind: Node
metadata:
  name: b
status:
  addresses:
  - type: InternalIP
    address: {NODE_B}
---
apiVersion: v1
kind: Pod
metadata:
  name: client
  namespace: bench
  labels:
    app: client
spec:
  nodeName: a
  serviceAccountName: client
status:
  podIP: {CLIENT_POD}
  podIPs:
  - ip: {CLIENT_POD}
---
apiVersion: v1
kind: Pod
metadata:
  name: server
  namespace: bench
  labels:
    app: server
spec:
  nodeName: b
  serviceAccountName: server
status:
  podIP: {SERVER_POD}
  podIPs:
  - ip: {SERVER_POD}
"""



class LocalTopology:
    """Every path on loopback addresses in the current netns (the bench's own, as root)."""

    def __init__(self, netns: str | None) -> None:
        self.mode = f"local mode on loopback{' inside netns ' + netns if netns else ' (host namespace)'}"

    def start(self, group: ProcessGroup) -> None:
        log(f"starting the apps (echo and HTTP servers on {SERVER_POD}; iperf3 per test) in {group.workdir}")
        echo = group.start("echo-server", [PY, LOADGEN, "echo-server", f"{SERVER_POD}:{ECHO_PORT}"])
        wait_until(lambda: port_open(SERVER_POD, ECHO_PORT), 10, "the echo server", echo)
        http = group.start("http-app", [PY, LOADGEN, "http-server", f"{SERVER_POD}:{HTTP_PORT}"])
        wait_until(lambda: port_open(SERVER_POD, HTTP_PORT), 10, "the HTTP app", http)

    def close(self) -> None:
        pass
