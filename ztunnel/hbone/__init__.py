"""HBONE: TCP streams carried as HTTP/2 CONNECT streams inside mutual TLS 1.3.

- protocol.py: sans-IO wire rules (authority, CONNECT validation, settings, status codes)
- http2.py: h2 adapted to HBONE (graceful GOAWAY, cheap frame reprs, header-block cap, our settings)
- dataframes.py: DATA frames of open tunnels sent and received without h2's per-frame machinery
- budgets.py: what a peer may cost (rapid-reset budget per connection, bytes per peer identity)
- keepalive.py: when to PING and when a silent peer is gone, on an injected clock
- stream.py: `HboneStream`, one tunnel, read/written or relayed by callbacks
- connection.py: `HboneConnection`, one HTTP/2 connection over TLS, client or server, and its streams
- client.py: `HbonePool` keyed by (source identity, destination identity, address), secure naming
- server.py: `HboneServer` serving listening sockets with a workload's SVID
- tls_cache.py: SSL contexts per certificate

The byte-stream interface the relay speaks (`ByteStream`, `TcpStream`) and `Deadline` are in ztunnel.net.
"""
