"""The node proxy: listeners, outbound routing, inbound, relay, connection tracking."""
