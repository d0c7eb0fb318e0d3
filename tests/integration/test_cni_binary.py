"""cni/build.sh makes a `ztunnel-cni` that runs on a node with no Python (DESIGN §4.8).

The binary is built once per machine and reused (tests/support/cni_binary.py); the plugin's behaviour through
it (VERSION, ADD, CHECK, DEL, STATUS, GC, errors, chained after bridge + host-local) is tested by
test_cni_plugin_process.py, parametrized over the module and the binary. Here: that it is self-contained.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.cni_binary import cni_binary


def run_plugin(binary: Path, env: dict[str, str], stdin: str, *, hide_python: bool = False) -> tuple[int, str]:
    argv = [str(binary)]
    if hide_python:
        # Every Python install on this machine is hidden in a private mount namespace, as on a node without one.
        pythons = {sys.base_prefix, sys.prefix, *glob.glob("/usr/lib/python3*"), *glob.glob("/usr/local/lib/python3*")}
        masks = " && ".join(f"mount -t tmpfs none {p}" for p in sorted(pythons) if Path(p).is_dir())
        script = f'{masks} && ! python3 -c 1 2>/dev/null && ! {sys.executable} -c 1 2>/dev/null && exec "$0"'
        argv = ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, str(binary)]
    proc = subprocess.run(argv, input=stdin, capture_output=True, text=True, env=env, timeout=60)
    return proc.returncode, proc.stdout


@pytest.fixture(scope="module")
def binary() -> Path:
    return cni_binary()


def test_the_binary_is_self_contained(binary: Path) -> None:
    assert binary.read_bytes()[:4] == b"\x7fELF"  # an executable, not a script with a python3 shebang
    ldd = subprocess.run(["ldd", str(binary)], capture_output=True, text=True).stdout
    assert "libpython" not in ldd, ldd


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None, reason="needs root and unshare(1)")
def test_runs_with_every_python_on_the_machine_hidden(binary: Path) -> None:
    rc, out = run_plugin(binary, {"CNI_COMMAND": "VERSION"}, '{"cniVersion": "1.1.0"}', hide_python=True)
    assert rc == 0, out
    assert json.loads(out)["cniVersion"] == "1.1.0"
    # a DEL with no agent to talk to succeeds (idempotent), an ADD says "try again later"
    env = {
        "CNI_COMMAND": "DEL",
        "CNI_CONTAINERID": "c1",
        "CNI_NETNS": "/var/run/netns/none",
        "CNI_IFNAME": "eth0",
        "CNI_ARGS": "K8S_POD_NAMESPACE=a;K8S_POD_NAME=b",
    }
    conf = {"cniVersion": "1.0.0", "name": "t", "type": "ztunnel-cni", "agent_socket": "/nonexistent/cni.sock"}
    rc, out = run_plugin(binary, env, json.dumps(conf), hide_python=True)
    assert rc == 0, out
    prev = {"cniVersion": "1.0.0", "ips": [{"address": "10.244.1.2/24"}]}
    add = json.dumps({**conf, "prevResult": prev})
    rc, out = run_plugin(binary, {**env, "CNI_COMMAND": "ADD"}, add, hide_python=True)
    assert rc != 0 and json.loads(out)["code"] == 11
