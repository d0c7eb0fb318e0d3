"""Metrics, access log, structured logging, and the admin and readiness servers."""
