"""The `ztunnel-cni` executable as a runtime runs it: env + stdin in, stdout + exit code out, against a
stand-in agent on a unix socket (and against no agent at all)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

PLUGIN = str(Path(sys.executable).parent / "ztunnel-cni")
PREV = {"cniVersion": "1.1.0", "interfaces": [{"name": "eth0"}], "ips": [{"address": "10.244.1.7/24"}], "dns": {}}


class StandInAgent:
    """Answers every request with a fixed status/body and records what it was asked."""

    def __init__(self) -> None:
        self.status = 200
        self.body: dict[str, Any] = {"enrolled": True}
        self.requests: list[tuple[str, dict[str, Any]]] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = (await reader.readuntil(b"\r\n\r\n")).decode()
        length = int(next((h.split(":")[1] for h in head.split("\r\n") if h.lower().startswith("content-length")), 0))
        raw = await reader.readexactly(length) if length else b""
        self.requests.append((head.split(" ")[1], json.loads(raw) if raw else {}))
        payload = json.dumps(self.body).encode()
        writer.write(f"HTTP/1.1 {self.status} X\r\nContent-Length: {len(payload)}\r\n\r\n".encode() + payload)
        await writer.drain()
        writer.close()


@pytest.fixture
async def agent(tmp_path: Path) -> AsyncIterator[tuple[StandInAgent, str]]:
    a = StandInAgent()
    path = str(tmp_path / "cni.sock")
    server = await asyncio.start_unix_server(a.handle, path=path)
    async with server:
        yield a, path


async def run(command: str, stdin: bytes, **env: str) -> tuple[int, str]:
    full = {
        "CNI_COMMAND": command,
        "CNI_CONTAINERID": "cid",
        "CNI_NETNS": "/var/run/netns/none",
        "CNI_IFNAME": "eth0",
        "CNI_ARGS": "K8S_POD_NAMESPACE=ns;K8S_POD_NAME=pod;K8S_POD_UID=u",
        "PATH": "/usr/bin:/bin",
    }
    full.update(env)
    proc = await asyncio.create_subprocess_exec(
        PLUGIN, env=full, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    out, _ = await proc.communicate(stdin)
    return proc.returncode or 0, out.decode()


def conf(sock: str, **extra: Any) -> bytes:
    return json.dumps(
        {"cniVersion": "1.1.0", "name": "net", "type": "ztunnel-cni", "agent_socket": sock, **extra}
    ).encode()


async def test_add_passes_prev_result_and_forwards_the_pod(agent: tuple[StandInAgent, str]) -> None:
    a, sock = agent
    rc, out = await run("ADD", conf(sock, prevResult=PREV))
    assert rc == 0 and json.loads(out) == PREV
    path, body = a.requests[-1]
    assert path == "/v1/cni/add" and body["podName"] == "pod" and body["ips"] == ["10.244.1.7"]


async def test_agent_refusal_and_absence(agent: tuple[StandInAgent, str], tmp_path: Path) -> None:
    a, sock = agent
    a.status, a.body = 503, {"msg": "node proxy not connected", "code": 11}
    rc, out = await run("ADD", conf(sock, prevResult=PREV))
    assert rc != 0 and json.loads(out) == {"cniVersion": "1.1.0", "code": 11, "msg": "node proxy not connected"}
    rc, out = await run("ADD", conf(str(tmp_path / "nobody.sock"), prevResult=PREV))
    assert rc != 0 and json.loads(out)["code"] == 11
    rc, out = await run("DEL", conf(str(tmp_path / "nobody.sock")), CNI_NETNS="")
    assert (rc, out) == (0, "")


async def test_malformed_stdin_version_status_gc(agent: tuple[StandInAgent, str]) -> None:
    a, sock = agent
    rc, out = await run("ADD", b"\x00garbage")
    assert rc != 0 and json.loads(out)["code"] == 6
    rc, out = await run("VERSION", b'{"cniVersion":"0.3.1"}')
    assert rc == 0 and "1.1.0" in json.loads(out)["supportedVersions"]
    rc, out = await run("STATUS", conf(sock))
    assert (rc, out) == (0, "") and a.requests[-1][0] == "/v1/status"
    rc, out = await run("GC", conf(sock, **{"cni.dev/valid-attachments": [{"containerID": "x", "ifname": "eth0"}]}))
    assert rc == 0 and a.requests[-1] == (
        "/v1/cni/gc",
        {"network": "net", "validAttachments": a.requests[-1][1]["validAttachments"]},
    )
    a.status = 503
    rc, out = await run("STATUS", conf(sock))
    assert rc != 0 and json.loads(out)["code"] == 50


def test_install_cli_round_trip(tmp_path: Path) -> None:
    conf_dir, bin_dir = tmp_path / "net.d", tmp_path / "bin"
    conf_dir.mkdir()
    original = b'{"cniVersion": "1.0.0", "name": "k", "plugins": [{"type": "bridge"}]}\n'
    (conf_dir / "10-k.conflist").write_bytes(original)
    args = ["install", "--cni-conf-dir", str(conf_dir), "--cni-bin-dir", str(bin_dir), "--agent-socket", "/run/a.sock"]
    subprocess.run([PLUGIN, *args], check=True, capture_output=True)
    assert json.loads((conf_dir / "10-k.conflist").read_text())["plugins"][-1]["type"] == "ztunnel-cni"
    assert (bin_dir / "ztunnel-cni").exists()
    subprocess.run([PLUGIN, *args, "--uninstall"], check=True, capture_output=True)
    assert (conf_dir / "10-k.conflist").read_bytes() == original
    assert not (bin_dir / "ztunnel-cni").exists()
