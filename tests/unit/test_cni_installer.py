"""The CNI installer: appends to the primary conflist, converts a .conf, atomic, reversible, sticky."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

from tests.support.eventually import eventually
from ztunnel.cni.installer import Installer, primary_conf

CONFLIST = {
    "cniVersion": "1.0.0",
    "name": "cbr0",
    "plugins": [{"type": "bridge", "bridge": "cni0", "ipam": {"type": "host-local"}}, {"type": "portmap"}],
}
SINGLE = {"cniVersion": "0.4.0", "name": "mynet", "type": "bridge", "bridge": "cni0", "ipam": {"type": "host-local"}}


def write(path: Path, obj: object) -> bytes:
    data = (json.dumps(obj, indent=4) + "\n").encode()
    path.write_bytes(data)
    return data


def test_primary_is_lexically_first_config() -> None:
    assert primary_conf(["20-b.conflist", "10-a.conf", "05-x.txt", ".10-tmp.conf", "99.json"]) == "10-a.conf"
    assert primary_conf(["README"]) is None


def test_appends_to_the_primary_conflist_only_and_uninstall_restores_bytes(tmp_path: Path) -> None:
    conf_dir, bin_dir = tmp_path / "net.d", tmp_path / "bin"
    conf_dir.mkdir()
    original = write(conf_dir / "10-cbr0.conflist", CONFLIST)
    other = write(conf_dir / "20-other.conflist", CONFLIST)
    binary = tmp_path / "plugin"
    binary.write_bytes(b"#!/bin/sh\n")
    inst = Installer(conf_dir, bin_dir, "/run/zt/cni.sock", binary)
    assert inst.install()
    conf = json.loads((conf_dir / "10-cbr0.conflist").read_text())
    assert [p["type"] for p in conf["plugins"]] == ["bridge", "portmap", "ztunnel-cni"]
    assert conf["plugins"][-1]["agent_socket"] == "/run/zt/cni.sock"
    assert (conf_dir / "20-other.conflist").read_bytes() == other
    assert os.access(bin_dir / "ztunnel-cni", os.X_OK)
    assert not inst.install()  # already there: nothing written
    assert not [n for n in os.listdir(conf_dir) if ".tmp" in n]  # no temp file left behind
    inst.uninstall()
    assert (conf_dir / "10-cbr0.conflist").read_bytes() == original
    assert sorted(os.listdir(conf_dir)) == ["10-cbr0.conflist", "20-other.conflist"]
    assert not (bin_dir / "ztunnel-cni").exists()


def test_single_conf_is_converted_and_restored(tmp_path: Path) -> None:
    original = write(tmp_path / "10-mynet.conf", SINGLE)
    inst = Installer(tmp_path, tmp_path / "bin")
    inst.install()
    assert not (tmp_path / "10-mynet.conf").exists()
    conf = json.loads((tmp_path / "10-mynet.conflist").read_text())
    assert conf["cniVersion"] == "0.4.0" and conf["name"] == "mynet"
    assert conf["plugins"][0] == {"type": "bridge", "bridge": "cni0", "ipam": {"type": "host-local"}}
    assert conf["plugins"][1]["type"] == "ztunnel-cni"
    inst.uninstall()
    assert (tmp_path / "10-mynet.conf").read_bytes() == original
    assert not (tmp_path / "10-mynet.conflist").exists()
    assert os.listdir(tmp_path) == ["10-mynet.conf"]


def test_write_is_atomic_rename(tmp_path: Path) -> None:
    write(tmp_path / "10-cbr0.conflist", CONFLIST)
    inode = os.stat(tmp_path / "10-cbr0.conflist").st_ino
    Installer(tmp_path, tmp_path / "bin").install()
    assert os.stat(tmp_path / "10-cbr0.conflist").st_ino != inode  # replaced, never rewritten in place


def test_uninstall_keeps_someone_elses_later_change(tmp_path: Path) -> None:
    write(tmp_path / "10-cbr0.conflist", CONFLIST)
    inst = Installer(tmp_path, tmp_path / "bin")
    inst.install()
    conf = json.loads((tmp_path / "10-cbr0.conflist").read_text())
    conf["plugins"].insert(0, {"type": "tuning"})
    write(tmp_path / "10-cbr0.conflist", conf)
    inst.uninstall()
    after = json.loads((tmp_path / "10-cbr0.conflist").read_text())
    assert [p["type"] for p in after["plugins"]] == ["tuning", "bridge", "portmap"]


def test_watch_puts_the_plugin_back_after_a_rewrite(tmp_path: Path) -> None:
    path = tmp_path / "10-cbr0.conflist"
    write(path, CONFLIST)
    inst = Installer(tmp_path, tmp_path / "bin")
    stop = threading.Event()
    t = threading.Thread(target=inst.watch, args=(stop, 0.02))
    t.start()
    try:
        for _ in range(2):
            eventually(lambda: "ztunnel-cni" in path.read_text(), 5, interval=0.01, what="the plugin (re-)added")
            write(path, CONFLIST)  # the primary CNI rewrites its file
    finally:
        stop.set()
        t.join()
    inst.uninstall()
    assert json.loads(path.read_text()) == CONFLIST
