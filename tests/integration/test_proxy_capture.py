"""On the wire between the proxies (port 15008) there are only TLS records, never the app's bytes."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
from pathlib import Path

import pytest

from tests.integration.conftest import ECHO_PORT, NODE_A_CLIENT, NODE_B_SERVER, LocalMesh, recv_all, socks_connect
from tests.support.eventually import eventually

MARKER = b"THIS-IS-THE-SECRET-PAYLOAD-0123456789" * 64


@pytest.mark.skipif(shutil.which("tcpdump") is None, reason="tcpdump is not installed")
def test_capture_on_port_15008_shows_tls_records_and_never_the_payload(local_mesh: LocalMesh, tmp_path: Path) -> None:
    pcap = tmp_path / "hbone.pcap"
    dump = subprocess.Popen(
        ["tcpdump", "-i", "lo", "-U", "-n", "-s", "0", "-w", str(pcap), f"tcp port 15008 and host {NODE_B_SERVER}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        assert dump.stderr is not None
        line = dump.stderr.readline()  # "listening on lo, ..." once the capture runs
        assert b"listening on" in line, line
        with socks_connect(NODE_A_CLIENT, (NODE_B_SERVER, ECHO_PORT)) as s:
            s.sendall(MARKER)
            s.shutdown(socket.SHUT_WR)
            assert recv_all(s) == MARKER
        eventually(lambda: pcap.stat().st_size >= 2 * len(MARKER), 10, what="the tunnel's packets in the capture")
    finally:
        dump.send_signal(signal.SIGINT)
        try:
            dump.wait(10)
        except subprocess.TimeoutExpired:
            dump.kill()
            dump.wait()
        if dump.stderr is not None:
            dump.stderr.close()
    captured = pcap.read_bytes()
    assert len(captured) > 2 * len(MARKER), "the capture saw the tunnel traffic"
    assert MARKER[:32] not in captured
    assert b"THIS-IS-THE-SECRET" not in captured
    assert b"\x17\x03\x03" in captured  # TLS application_data records
