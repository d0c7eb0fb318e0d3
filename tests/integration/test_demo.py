"""The README's main command: the embedded two-node mesh comes up and shows traffic through it."""

from __future__ import annotations

import random
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def _free_port_base() -> int:
    """A base below the ephemeral range whose six ports (base+0/20/21, base+100/120/121) are free now."""
    for _ in range(50):
        base = random.randrange(20000, 30000, 200)
        try:
            for offset in (0, 20, 21, 100, 120, 121):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", base + offset))
        except OSError:
            continue
        return base
    raise AssertionError("no free port base for the demo")


def test_demo_shows_allowed_denied_and_service_traffic(tmp_path: Path) -> None:
    port_base = _free_port_base()
    ztunnel = Path(sys.executable).with_name("ztunnel")
    result = subprocess.run(
        [str(ztunnel), "demo", "--once", "--workdir", str(tmp_path), "--port-base", str(port_base)],
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert out.count("hello from backend, through the mesh") == 2  # pod IP and Service IP
    assert "[ok] stranger -> backend pod (denied by AuthorizationPolicy): refused" in out
    assert 'reporter="destination"' in out
    assert 'source_principal="spiffe://cluster.local/ns/shop/sa/frontend"' in out


def _hold(address: tuple[str, int]) -> socket.socket | None:
    """A listening socket on `address`, or None if something else already holds it (the demo must refuse
    either way)."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # an earlier demo's TIME_WAIT must not stop it
    try:
        s.bind(address)
        s.listen()
    except OSError:
        s.close()
        return None
    return s


@pytest.mark.parametrize(
    ("held", "port_base", "words"),
    [
        (("127.0.0.1", 15020), None, ["127.0.0.1:15020", "metrics of node-a", "--port-base"]),  # the default base
        (("127.0.10.1", 15080), "free", ["127.0.10.1:15080", "SOCKS5 of pod shop/frontend", "another `ztunnel demo`"]),
    ],
)
def test_demo_fails_fast_naming_a_port_in_use(
    tmp_path: Path, held: tuple[str, int], port_base: str | None, words: list[str]
) -> None:
    ztunnel = Path(sys.executable).with_name("ztunnel")
    argv = [str(ztunnel), "demo", "--once", "--workdir", str(tmp_path)]
    if port_base is not None:
        argv += ["--port-base", str(_free_port_base())]
    holder = _hold(held)
    try:
        started = time.monotonic()
        result = subprocess.run(
            argv, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL, check=False
        )
        elapsed = time.monotonic() - started
    finally:
        if holder is not None:
            holder.close()
    assert result.returncode != 0, result.stdout
    assert elapsed < 10, f"took {elapsed:.1f}s to give up"
    for w in words:
        assert w in result.stderr, result.stderr
    assert "[2/5]" not in result.stdout  # nothing was started
