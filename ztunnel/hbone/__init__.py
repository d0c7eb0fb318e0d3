"""HBONE: TCP streams carried as HTTP/2 CONNECT streams inside mutual TLS 1.3.

- protocol.py: sans-IO wire rules (authority, CONNECT validation, settings, status codes)
- connection.py: one HTTP/2 connection (h2) over TLS, client or server, and its `HboneStream`s
- client.py: `HbonePool` keyed by (source identity, destination identity, address), secure naming
- server.py: `HboneServer` serving listening sockets with a workload's SVID
- streams.py: the `ByteStream` interface and `TcpStream`; tls_cache.py: SSL contexts per certificate
"""
