"""HBONE: TCP streams carried as HTTP/2 CONNECT streams inside mutual TLS 1.3."""
