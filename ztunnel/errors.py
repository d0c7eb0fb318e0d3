"""The root of the project's exceptions: each subsystem derives its own from `ZtunnelError`."""


class ZtunnelError(Exception):
    """Base of every error the project raises on purpose; its text is meant for the user."""
