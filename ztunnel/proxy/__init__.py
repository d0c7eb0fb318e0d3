"""The node proxy: listeners, outbound routing, inbound, relay, connection tracking.

Modules, top down:
- main.py: the `ztunnel proxy` process (config source, certificates, admin/metrics/readiness, signals, drain)
- node.py: `NodeProxy` (serves workloads; `add_workload(workload, WorkloadSockets)`, `remove_workload(uid)`,
  `apply_config`, `drain`, `close`) and `LocalWorkloads` (local mode: pods of --node from the config)
- outbound.py / inbound.py: per-connection handling; report.py: metrics + access log; state.py: shared state
- listeners.py: `WorkloadSockets`, `ListenerFactory`, `Connector` (how in-pod mode plugs in its sockets)
- routing.py, socks5.py: sans-IO routing decisions and the SOCKS5 handshake; relay.py: the byte pump
- tracking.py: open connections, re-checked on policy changes; inpod.py: the node agent hand-off
"""
