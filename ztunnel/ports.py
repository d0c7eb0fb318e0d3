"""The ports and marks of DESIGN §4.1, defined once.

They are Istio's, so existing NetworkPolicies, dashboards and runbooks apply unchanged. Everything that
listens, redirects or guards imports them from here; flags may move the admin, metrics and readiness
servers, and the proxy then guards the sockets it really has, not these numbers.
"""

from __future__ import annotations

# Listeners of the node proxy.
ADMIN_PORT = 15000  # localhost only: /config_dump, /quitquitquit, /logging
OUTBOUND_PORT = 15001  # transparent outbound capture (in-pod redirection, SO_ORIGINAL_DST)
PLAINTEXT_INBOUND_PORT = 15006  # plaintext inbound (PeerAuthentication decides)
HBONE_PORT = 15008  # HBONE inbound: HTTP/2 CONNECT over mutual TLS
METRICS_PORT = 15020  # /metrics and /stats/prometheus
READINESS_PORT = 15021  # /healthz/ready
DNS_PORT = 15053  # DNS capture (optional)
SOCKS5_PORT = 15080  # local mode's outbound entry, one per pod IP, loopback only

# Marks and routing of in-pod redirection.
PROXY_MARK = 0x539  # SO_MARK on every proxy socket: the pod's rules let these through
CONNMARK = 0x111  # connmark of connections the proxy made, restored on replies
MARK_MASK = 0xFFF
ROUTE_TABLE = 100  # `fwmark 0x111/0xfff lookup 100` with `local 0.0.0.0/0 dev lo table 100`

# The address node probes are SNATed to, so they pass untouched under STRICT.
PROBE_SNAT_V4 = "169.254.7.127"
PROBE_SNAT_V6 = "fd16:9254:7127:1337:ffff:ffff:ffff:ffff"
