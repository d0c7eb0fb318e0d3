"""The `ztunnel-cni` executable as a runtime runs it: env + stdin in, stdout + exit code out, against a
stand-in agent on a unix socket (and against no agent at all).

Every case runs twice: against the venv's console script (the Python module) and against the self-contained
binary cni/build.sh makes for nodes without Python (tests/support/cni_binary.py), the latter with only the CNI
reference plugins' dir and its own dir on PATH, as a node's runtime would run it (issue 14).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import ztunnel.lab.cni as runtime_mod
from tests.support.cni_binary import cni_binary
from ztunnel.lab.cni import CniInvocationError, PodRef, Runtime, node_conflist, plugin_dirs

PREV = {"cniVersion": "1.1.0", "interfaces": [{"name": "eth0"}], "ips": [{"address": "10.244.1.7/24"}], "dns": {}}


@dataclass(frozen=True)
class Plugin:
    """One build of the plugin and the PATH its runtime gives it (the environment is otherwise empty: env -i)."""

    path: str
    search_path: str


@pytest.fixture(scope="module", params=["module", "binary"])
def plugin(request: pytest.FixtureRequest) -> Plugin:
    if request.param == "module":
        return Plugin(str(Path(sys.executable).parent / "ztunnel-cni"), "/usr/bin:/bin")
    binary = cni_binary()
    search_path = ":".join([*plugin_dirs(), str(binary.parent)])
    assert not any(shutil.which(p, path=search_path) for p in ("python3", "python")), search_path
    return Plugin(str(binary), search_path)


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


async def run(plugin: Plugin, command: str, stdin: bytes, **env: str) -> tuple[int, str]:
    full = {
        "CNI_COMMAND": command,
        "CNI_CONTAINERID": "cid",
        "CNI_NETNS": "/var/run/netns/none",
        "CNI_IFNAME": "eth0",
        "CNI_ARGS": "K8S_POD_NAMESPACE=ns;K8S_POD_NAME=pod;K8S_POD_UID=u",
        "PATH": plugin.search_path,
    }
    full.update(env)
    proc = await asyncio.create_subprocess_exec(
        plugin.path, env=full, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    out, _ = await proc.communicate(stdin)
    return proc.returncode or 0, out.decode()


def conf(sock: str, **extra: Any) -> bytes:
    return json.dumps(
        {"cniVersion": "1.1.0", "name": "net", "type": "ztunnel-cni", "agent_socket": sock, **extra}
    ).encode()


async def test_add_passes_prev_result_and_forwards_the_pod(plugin: Plugin, agent: tuple[StandInAgent, str]) -> None:
    a, sock = agent
    rc, out = await run(plugin, "ADD", conf(sock, prevResult=PREV))
    assert rc == 0 and json.loads(out) == PREV
    path, body = a.requests[-1]
    assert path == "/v1/cni/add" and body["podName"] == "pod" and body["ips"] == ["10.244.1.7"]


async def test_agent_refusal_and_absence(plugin: Plugin, agent: tuple[StandInAgent, str], tmp_path: Path) -> None:
    a, sock = agent
    a.status, a.body = 503, {"msg": "node proxy not connected", "code": 11}
    rc, out = await run(plugin, "ADD", conf(sock, prevResult=PREV))
    assert rc != 0 and json.loads(out) == {"cniVersion": "1.1.0", "code": 11, "msg": "node proxy not connected"}
    rc, out = await run(plugin, "ADD", conf(str(tmp_path / "nobody.sock"), prevResult=PREV))
    assert rc != 0 and json.loads(out)["code"] == 11
    rc, out = await run(plugin, "DEL", conf(str(tmp_path / "nobody.sock")), CNI_NETNS="")
    assert (rc, out) == (0, "")


async def test_malformed_stdin_version_status_gc(plugin: Plugin, agent: tuple[StandInAgent, str]) -> None:
    a, sock = agent
    rc, out = await run(plugin, "ADD", b"\x00garbage")
    assert rc != 0 and json.loads(out)["code"] == 6
    rc, out = await run(plugin, "ADD", json.dumps({"cniVersion": "9.9.9", "name": "net"}).encode())
    assert rc != 0 and json.loads(out)["code"] == 1 and "9.9.9" in json.loads(out)["msg"]
    rc, out = await run(plugin, "FROB", conf(sock))
    assert rc != 0 and json.loads(out)["code"] == 4 and "FROB" in json.loads(out)["msg"]
    rc, out = await run(plugin, "VERSION", b'{"cniVersion":"0.3.1"}')
    assert rc == 0 and "1.1.0" in json.loads(out)["supportedVersions"]
    rc, out = await run(plugin, "STATUS", conf(sock))
    assert (rc, out) == (0, "") and a.requests[-1][0] == "/v1/status"
    valid = [{"containerID": "x", "ifname": "eth0"}]
    rc, out = await run(plugin, "GC", conf(sock, **{"cni.dev/valid-attachments": valid}))
    assert rc == 0 and a.requests[-1] == (
        "/v1/cni/gc",
        {"network": "net", "validAttachments": a.requests[-1][1]["validAttachments"]},
    )
    a.status = 503
    rc, out = await run(plugin, "STATUS", conf(sock))
    assert rc != 0 and json.loads(out)["code"] == 50


def test_install_cli_round_trip(plugin: Plugin, tmp_path: Path) -> None:
    conf_dir, bin_dir = tmp_path / "net.d", tmp_path / "bin"
    conf_dir.mkdir()
    original = b'{"cniVersion": "1.0.0", "name": "k", "plugins": [{"type": "bridge"}]}\n'
    (conf_dir / "10-k.conflist").write_bytes(original)
    args = ["install", "--cni-conf-dir", str(conf_dir), "--cni-bin-dir", str(bin_dir), "--agent-socket", "/run/a.sock"]
    env = {"PATH": plugin.search_path}
    subprocess.run([plugin.path, *args], check=True, capture_output=True, env=env)
    assert json.loads((conf_dir / "10-k.conflist").read_text())["plugins"][-1]["type"] == "ztunnel-cni"
    assert (bin_dir / "ztunnel-cni").exists()
    subprocess.run([plugin.path, *args, "--uninstall"], check=True, capture_output=True, env=env)
    assert (conf_dir / "10-k.conflist").read_bytes() == original
    assert not (bin_dir / "ztunnel-cni").exists()


IP = shutil.which("ip") or "/usr/sbin/ip"


def chain_unusable() -> str | None:
    if os.geteuid() != 0:
        return "needs root to create network namespaces"
    if not Path(IP).exists() or not Path("/usr/lib/cni/bridge").exists():
        return "needs iproute2 and the CNI reference plugins (apt-get install containernetworking-plugins)"
    return None


@pytest.fixture
def node_and_pod() -> Iterator[tuple[str, str]]:
    """A node netns (where the runtime runs plugins, and where bridge makes cni0) and a pod netns, removed after."""
    reason = chain_unusable()
    if reason:
        pytest.skip(reason)
    names = (f"ztcni-node-{os.getpid()}", f"ztcni-pod-{os.getpid()}")
    try:
        for name in names:
            subprocess.run([IP, "netns", "add", name], check=True, capture_output=True)
        subprocess.run([IP, "-n", names[0], "link", "set", "lo", "up"], check=True, capture_output=True)
        yield names
    finally:
        for name in names:
            subprocess.run([IP, "netns", "delete", name], capture_output=True)


async def test_chained_after_bridge_and_host_local(
    plugin: Plugin,
    agent: tuple[StandInAgent, str],
    node_and_pod: tuple[str, str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """As the lab wires pods: the reference bridge + host-local, then ztunnel-cni; ADD, CHECK, DEL, a refused ADD."""
    a, sock = agent
    node, pod = node_and_pod
    # the runtime's plugins see only plugin.search_path on PATH; `ip netns exec` is found by its absolute path
    monkeypatch.setenv("PATH", plugin.search_path)
    monkeypatch.setattr(runtime_mod, "exec_prefix", lambda netns: [IP, "netns", "exec", netns])
    ipam = tmp_path / "ipam"
    conflist = node_conflist("ztnet", "10.250.7.0/24", str(ipam), [{"type": "ztunnel-cni", "agent_socket": sock}])
    ref = PodRef("ns", "pod", "uid-1", "cid-1", f"/var/run/netns/{pod}")
    rt = Runtime(node, [str(Path(plugin.path).parent), *plugin_dirs()])

    result = await asyncio.to_thread(rt.add, conflist, ref)
    address = result["ips"][0]["address"]
    assert address.startswith("10.250.7.") and result["interfaces"][0]["name"] == "cni0"
    path, body = a.requests[-1]
    assert path == "/v1/cni/add" and body["ips"] == [address.split("/")[0]] and body["netns"] == ref.netns_path
    assert body["podName"] == "pod" and body["podNamespace"] == "ns" and body["podUid"] == "uid-1"
    shown = subprocess.run([IP, "-n", pod, "-o", "addr", "show", "eth0"], capture_output=True, text=True).stdout
    assert address in shown
    assert (ipam / "ztnet" / address.split("/")[0]).exists()  # host-local's lease

    await asyncio.to_thread(rt.check, conflist, ref, result)
    assert a.requests[-1][0] == "/v1/cni/check"

    await asyncio.to_thread(rt.delete, conflist, ref, result)
    assert a.requests[-1][0] == "/v1/cni/del" and not (ipam / "ztnet" / address.split("/")[0]).exists()

    # the agent refuses: the runtime sees ztunnel-cni's CNI error (code/msg) and tears the chain down again
    a.status, a.body = 503, {"msg": "node proxy not connected", "code": 11}
    with pytest.raises(CniInvocationError) as refused:
        await asyncio.to_thread(rt.add, conflist, ref)
    assert (refused.value.plugin, refused.value.code) == ("ztunnel-cni", 11)
    assert refused.value.msg == "node proxy not connected"
    assert a.requests[-1][0] == "/v1/cni/del" and not list((ipam / "ztnet").glob("10.250.7.*"))
