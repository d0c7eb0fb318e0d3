"""A lab's whole life on its own small cluster: nothing changes in the root netns, `down` removes every
netns, process and file, and `down` also cleans up after a run that crashed and lost its state."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.support import ebpf as ebpf_state
from tests.support.eventually import eventually
from ztunnel.lab import cgroups

from .conftest import root_netns_snapshot, ztunnel

pytestmark = pytest.mark.netns  # root + network namespaces; conftest skips with the reason otherwise

SMALL = [
    {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "solo"}},
    {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": "web",
            "namespace": "default",
            "labels": {"app": "web", "istio.io/dataplane-mode": "ambient"},  # in-pod rules too, when the mesh runs
        },
        "spec": {
            "nodeName": "solo",
            "containers": [
                {
                    "name": "main",
                    "command": ["python3", "-m", "http.server", "8080"],
                    "ports": [{"containerPort": 8080}],
                }
            ],
        },
    },
    {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "idle", "namespace": "default"},
        "spec": {"containers": [{"name": "main", "command": ["sleep", "infinity"]}]},  # scheduled by the lab
    },
]


def _netns(prefix: str) -> list[str]:
    d = Path("/var/run/netns")
    return sorted(p.name for p in d.iterdir() if p.name.startswith(prefix)) if d.exists() else []


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_up_down_leaves_nothing_and_root_netns_unchanged(tmp_path: Path) -> None:
    name = f"lc{os.getpid()}"
    cluster = tmp_path / "small.yaml"
    cluster.write_text(yaml.safe_dump_all(SMALL))
    before = root_netns_snapshot()
    try:
        ztunnel("lab", "up", "--name", name, "-f", str(cluster), "--timeout", "90")
        state = json.loads((Path("/run/ztunnel-lab") / name / "state.json").read_text())
        pids = [p["pid"] for p in state["processes"].values()]
        assert pids and all(_alive(p) for p in pids)
        # `up` without --mesh runs the whole mesh (never silently a cluster without mTLS)
        assert state["mesh"] == "on" and state["components"] == dict.fromkeys(
            ["ca", "node-agent", "proxy", "cni-plugin"], True
        )
        assert {"node/solo/node-agent", "node/solo/proxy"} <= set(state["processes"])
        # the proxy in a cgroup of its own: the in-pod rules trust its mark only from there
        proxy_pid = state["processes"]["node/solo/proxy"]["pid"]
        assert f"0::/ztunnel-lab-{name}/solo-proxy" in Path(f"/proc/{proxy_pid}/cgroup").read_text().splitlines()
        assert state["pods"]["default/idle"]["node"] == "solo"  # no nodeName: the lab scheduled it
        assert len(_netns(f"ztl-{name}-")) == 4  # fabric, node, two pods
        assert root_netns_snapshot() == before
    finally:
        down = ztunnel("lab", "down", "--name", name, check=False)
    assert down.returncode == 0, down.stderr
    assert _netns(f"ztl-{name}-") == []
    assert not any(_alive(p) for p in pids)
    assert not (Path("/run/ztunnel-lab") / name).exists()
    assert root_netns_snapshot() == before
    cgroup_root = cgroups.cgroup2_root()
    assert cgroup_root is None or not (cgroup_root / f"ztunnel-lab-{name}").exists()


def test_down_cleans_up_after_a_crashed_run(tmp_path: Path) -> None:
    name = f"cr{os.getpid()}"
    stray: subprocess.Popen[bytes] | None = None
    cluster = tmp_path / "small.yaml"
    cluster.write_text(yaml.safe_dump_all(SMALL))
    try:
        ztunnel("lab", "up", "--name", name, "-f", str(cluster), "--mesh", "off", "--timeout", "60")
        lab_dir = Path("/run/ztunnel-lab") / name
        state = json.loads((lab_dir / "state.json").read_text())
        pids = [p["pid"] for p in state["processes"].values()]
        shutil.rmtree(lab_dir)  # the state is gone, as after a crash: only the netns prefix is left to go by
        assert _netns(f"ztl-{name}-")
        leftover = cgroups.proxy_cgroup(name, "solo")  # and a proxy's cgroup with a process still in it
        if leftover is not None:
            stray = subprocess.Popen(["sleep", "300"], preexec_fn=cgroups.joiner(leftover))
        # `up` again over the wreck works too: it cleans first
        ztunnel("lab", "up", "--name", name, "-f", str(cluster), "--mesh", "off", "--timeout", "60")
        eventually(lambda: not any(_alive(p) for p in pids), 5, 0.1, what="old processes to be gone")
        state = json.loads((lab_dir / "state.json").read_text())
        pids = [p["pid"] for p in state["processes"].values()]
        shutil.rmtree(lab_dir)
    finally:
        down = ztunnel("lab", "down", "--name", name, check=False)
    assert down.returncode == 0, down.stderr
    assert _netns(f"ztl-{name}-") == []
    assert not any(_alive(p) for p in pids)
    if stray is not None:
        assert stray.wait(5) == -9  # killed by the clean-up (`up` over the wreck, or `down`), its cgroup removed
        assert leftover is not None and not leftover.parent.exists()


def test_errors_name_what_to_do(tmp_path: Path) -> None:
    missing = ztunnel("lab", "status", "--name", "nolab", check=False)
    assert missing.returncode == 2 and "no lab at /run/ztunnel-lab/nolab" in missing.stderr
    assert "ztunnel lab up" in missing.stderr
    nodeless = tmp_path / "nodeless.yaml"
    nodeless.write_text("apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec: {containers: []}\n")
    up = ztunnel("lab", "up", "--name", "nolab", "-f", str(nodeless), check=False)
    assert up.returncode == 2 and "add a Node" in up.stderr
    bad_name = ztunnel("lab", "up", "--name", "Bad-Name", "-f", str(nodeless), check=False)
    assert bad_name.returncode == 2 and "lowercase letters or digits" in bad_name.stderr
    assert _netns("ztl-nolab-") == []
    assert not Path("/run/ztunnel-lab/nolab").exists()


EBPF_CLUSTER = [
    {
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {"name": "ebpf", "labels": {"istio.io/dataplane-mode": "ambient"}},
    },
    {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "client", "namespace": "ebpf"},
        "spec": {"nodeName": "solo", "containers": [{"name": "main", "command": ["sleep", "infinity"]}]},
    },
    {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "web", "namespace": "ebpf"},
        "spec": {
            "nodeName": "solo",
            "containers": [
                {
                    "name": "main",
                    "command": ["python3", "-m", "http.server", "8080"],
                    "ports": [{"containerPort": 8080}],
                }
            ],
        },
    },
]


def _attached(infos: dict[str, ebpf_state.ebpf.LinkInfo]) -> dict[str, bool]:
    """For each recorded cgroup link: is its program still attached to the cgroup v2 root?"""
    return {n: i.prog_id in ebpf_state.cgroup_root_programs(i.attach_type) for n, i in infos.items()}


def test_ebpf_unenroll_and_down_after_a_crash_leave_nothing(tmp_path: Path) -> None:
    """eBPF mode on one node: mesh traffic flows with no rule in the pods; deleting a pod detaches its sk_lookup;
    after the agent and proxy crash (SIGKILL) the programs stay attached (fail closed), and `lab down` leaves no
    pinned map or link, no attached program, no netns and no mount."""
    name = f"eb{os.getpid()}"
    lab_dir = Path("/run/ztunnel-lab") / name
    cluster = tmp_path / "ebpf.yaml"
    cluster.write_text(yaml.safe_dump_all(EBPF_CLUSTER))
    before = root_netns_snapshot()
    try:
        up = ztunnel("lab", "up", "--name", name, "-f", str(cluster), "--redirect", "ebpf", "--timeout", "90",
                     check=False)  # fmt: skip
        if up.returncode != 0 and "eBPF redirection is not supported here" in up.stderr:
            pytest.skip(next(x for x in up.stderr.splitlines() if "not supported here" in x))
        assert up.returncode == 0, up.stderr
        st = json.loads(ztunnel("lab", "status", "--name", name, "-o", "json").stdout)
        pods = {p["name"]: p for p in st["pods"]}
        assert pods["client"]["enrolled"] and pods["web"]["enrolled"]
        curl = ztunnel("lab", "exec", "--name", name, "ebpf/client", "--", "curl", "-sS", "-m", "5", "-o", "/dev/null",
                       "-w", "%{http_code}", f"http://{pods['web']['ips'][0]}:8080/")  # fmt: skip
        assert curl.stdout == "200"
        pinned = sorted(p.name for p in (lab_dir / "bpffs" / "solo").iterdir())
        assert pinned == ["bypass", "dns_orig", "links", "listeners", "orig_dst", "pending", "pods", "proxy_socks"]
        links = ebpf_state.links_dir(lab_dir, "solo")
        cgroup_links = {p.name: ebpf_state.ebpf.link_info(str(p)) for p in links.glob("cgroup-*")}
        assert len(cgroup_links) == 11 and all(_attached(cgroup_links).values())
        client_netns = pods["client"]["netns"]
        assert ebpf_state.sk_lookup_attached(lab_dir, "solo", client_netns)
        client_link = links / f"netns-{os.stat(f'/var/run/netns/{client_netns}').st_ino}"

        # un-enroll (the pod is deleted: CNI DEL): its sk_lookup link is unpinned, so detached
        client = next(o for o in EBPF_CLUSTER if o["kind"] == "Pod" and o["metadata"]["name"] == "client")
        (tmp_path / "client.yaml").write_text(yaml.safe_dump(client))
        ztunnel("lab", "delete", "--name", name, "-f", str(tmp_path / "client.yaml"))
        assert not client_link.exists()
        assert ebpf_state.sk_lookup_attached(lab_dir, "solo", pods["web"]["netns"])

        # a crash of the node's components: the pinned links keep the programs attached
        ztunnel("lab", "kill", "node-agent", "--node", "solo", "--name", name)
        ztunnel("lab", "kill", "proxy", "--node", "solo", "--name", name)
        assert all(_attached(cgroup_links).values())
        (lab_dir / "state.json").unlink()  # and `lab` lost its state: down goes by name and path alone
    finally:
        down = ztunnel("lab", "down", "--name", name, check=False)
    assert down.returncode == 0, down.stderr
    assert _netns(f"ztl-{name}-") == []
    assert str(lab_dir) not in Path("/proc/self/mounts").read_text()
    assert not lab_dir.exists()
    # links are released (and their programs detached) by a deferred kernel work item: poll, briefly
    eventually(lambda: not any(_attached(cgroup_links).values()), 5, 0.05, what="the programs to be detached")
    assert root_netns_snapshot() == before
