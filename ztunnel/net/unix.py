"""Unix sockets that are private from the moment they exist."""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import tempfile
from pathlib import Path

SUN_PATH_MAX = 107  # bytes of sun_path a path may use (108 with the NUL)


def bind_unix_private(sock: socket.socket, path: Path) -> None:
    """Bind a unix socket at PATH that is mode 0600 from the moment the path exists.

    A socket file gets its mode from the umask at bind(2); chmod after bind leaves a window in which any
    local user may connect (and enroll pods or pose as the proxy). Setting the umask instead would race with
    worker threads. So: bind inside a fresh 0700 directory next to PATH, chmod there, where no one else can
    reach it, then rename it over PATH in one step (which also replaces a stale socket).
    """
    if len(os.fsencode(path)) > SUN_PATH_MAX:  # the rename would succeed, but no one could connect to the path
        raise OSError(errno.ENAMETOOLONG, f"unix socket path longer than {SUN_PATH_MAX} bytes: {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    private = Path(tempfile.mkdtemp(prefix=".", dir=path.parent))  # 0700; short: sun_path holds 107 bytes
    staged = private / "s"
    try:
        sock.bind(str(staged))
        os.chmod(staged, 0o600)
        os.replace(staged, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            staged.unlink()
        private.rmdir()
