"""The Dockerfile and scripts/build-image.sh agree with deploy/: the plugin the installer copies is where
the image puts cni/build.sh's executable, the default user is the non-root one the CA and waypoints run
as, and everything the Dockerfile copies passes .dockerignore. (No container engine here to build it.)"""

from __future__ import annotations

import os
import re
import subprocess

from tests.support.deploy import ROOT, helm_objects

DOCKERFILE = (ROOT / "Dockerfile").read_text()
BUILD = ROOT / "scripts" / "build-image.sh"


def _node_containers() -> dict[str, dict[str, object]]:
    ds = next(o for o in helm_objects({}) if o["kind"] == "DaemonSet")
    spec = ds["spec"]["template"]["spec"]
    return {c["name"]: c for c in spec["initContainers"] + spec["containers"]}


def test_multi_stage_with_the_self_contained_plugin_where_the_installer_looks() -> None:
    stages = re.findall(r"^FROM\s+(\S+)(?:\s+AS\s+(\S+))?", DOCKERFILE, re.M)
    assert [name for _, name in stages] == ["wheels", "compiled", "cni", ""]
    assert "COPY --from=compiled /src/build/compiled /opt/ztunnel/app/build/compiled" in DOCKERFILE  # mypyc's build
    assert "bash cni/build.sh /out" in DOCKERFILE and "--zipapp" not in DOCKERFILE
    assert "COPY --from=cni /out/ztunnel-cni /opt/ztunnel/cni/ztunnel-cni" in DOCKERFILE
    installer = _node_containers()["cni-installer"]
    args = installer["args"]
    assert isinstance(args, list)
    assert installer["command"] == ["/opt/ztunnel/cni/ztunnel-cni"]
    assert args[args.index("--plugin-binary") + 1] == "/opt/ztunnel/cni/ztunnel-cni"
    assert "COPY bpf /opt/ztunnel/app/bpf" in DOCKERFILE  # the eBPF loader compiles bpf/redirect.c beside ztunnel/


def test_non_root_by_default_as_the_ca_and_waypoints_run() -> None:
    assert re.search(r"^USER 1337:1337$", DOCKERFILE, re.M)
    ca = next(o for o in helm_objects({}) if o["kind"] == "Deployment")
    assert ca["spec"]["template"]["spec"]["containers"][0]["securityContext"]["runAsUser"] == 1337
    assert re.search(r"^ENTRYPOINT \[\"ztunnel\"\]$", DOCKERFILE, re.M)


def test_everything_copied_passes_dockerignore() -> None:
    allowed = {
        line[1:].rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines() if line.startswith("!")
    }
    for m in re.finditer(r"^COPY (?!--from)(.+) \S+$", DOCKERFILE, re.M):
        for src in m.group(1).split():
            path = src.rstrip("/")
            assert any(path == a or path.startswith(a + "/") for a in allowed), f"COPY {src}: excluded by .dockerignore"
            assert (ROOT / src).exists(), f"COPY {src}: no such path"


def test_build_script_says_what_is_missing_without_an_engine() -> None:
    assert subprocess.run(["bash", "-n", str(BUILD)], check=False).returncode == 0
    env = {**os.environ, "CONTAINER_ENGINE": "no-such-engine-here"}
    p = subprocess.run(["bash", str(BUILD)], capture_output=True, text=True, env=env, check=False, timeout=30)
    assert p.returncode == 1 and "no container engine 'no-such-engine-here'" in p.stderr
    h = subprocess.run(["bash", str(BUILD), "--help"], capture_output=True, text=True, check=False, timeout=30)
    assert h.returncode == 0 and "--kind-load" in h.stdout
