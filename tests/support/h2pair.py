"""Two in-memory `h2` connections with CONNECT streams 1 and 3 open: the HBONE DATA path's tests start here."""

from __future__ import annotations

import h2.config
import h2.connection

CONNECT = [(":method", "CONNECT"), (":authority", "10.0.0.1:80")]


def connect_pair() -> tuple[h2.connection.H2Connection, h2.connection.H2Connection]:
    """A client and a server with two open CONNECT streams (1 and 3), settings exchanged, nothing left to send."""
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    server = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding="utf-8"))
    client.initiate_connection()
    server.initiate_connection()
    server.receive_data(client.data_to_send())
    client.receive_data(server.data_to_send())
    server.receive_data(client.data_to_send())
    for sid in (1, 3):
        client.send_headers(sid, CONNECT)
        server.receive_data(client.data_to_send())
        server.send_headers(sid, [(":status", "200")])
        client.receive_data(server.data_to_send())
    client.data_to_send()
    server.data_to_send()
    return client, server
