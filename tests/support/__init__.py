"""The shared test kit: in-memory transports, polling with a deadline, an echo server, a fake clock, SVIDs."""
