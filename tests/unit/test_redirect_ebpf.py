"""eBPF redirection without a kernel: the map layouts the agent's C and the proxy share, the defines the C is
compiled with, the support report, the agent refusing `--redirect ebpf` where it cannot run, and the proxy's
inbound destination under sk_lookup steering."""

from __future__ import annotations

import argparse
import ctypes
import errno
import re
import socket
import struct
from pathlib import Path

import pytest

from ztunnel.errors import ZtunnelError
from ztunnel.inpod import ebpf as maps
from ztunnel.ports import DNS_PORT, HBONE_PORT, OUTBOUND_PORT, PLAINTEXT_INBOUND_PORT, PROBE_SNAT_V4
from ztunnel.proxy.listeners import WorkloadSockets
from ztunnel.redirect import bcc, commands, ebpf

SOURCE = Path(__file__).resolve().parents[2] / "bpf" / "redirect.c"


def c_struct_size(name: str) -> int:
    """Bytes of a struct of bpf/redirect.c made of u64/u32/u16 fields (no padding in these)."""
    body = re.search(rf"struct {name} \{{(.*?)\}};", SOURCE.read_text(), re.S)
    assert body, name
    size = 0
    for kind, count in re.findall(r"u(\d+) \w+(?:\[(\d+)\])?;", body.group(1)):
        size += int(kind) // 8 * int(count or 1)
    return size


def test_key_and_value_layouts_match_the_c_structs() -> None:
    assert len(maps.pod_cfg_value(["10.244.1.2", "fd00::2"], dns=True)) == c_struct_size("pod_cfg")
    assert len(maps.conn_key(1, socket.AF_INET, "127.0.0.1", 40000)) == c_struct_size("conn_key")
    key = maps.conn_key(7, socket.AF_INET6, "::ffff:10.244.1.2", 40000)  # as the proxy's v4 listener sees it
    assert key == maps.conn_key(7, socket.AF_INET, "10.244.1.2", 40000)
    assert key[8:12] == socket.inet_aton("10.244.1.2") and struct.unpack("=II", key[24:]) == (socket.AF_INET, 40000)
    assert len(maps.listener_key("10.244.1.2", PLAINTEXT_INBOUND_PORT)) == c_struct_size("listener_key")
    assert c_struct_size("orig_dst") == maps.ORIG_DST_SIZE


def test_values_are_in_the_byte_order_the_programs_read() -> None:
    cfg = maps.pod_cfg_value(["fd00::2", "10.244.1.2"], dns=True)
    assert cfg[:4] == socket.inet_aton("10.244.1.2")  # network order, first v4 address
    assert cfg[4:20] == socket.inet_pton(socket.AF_INET6, "fd00::2")
    assert struct.unpack("=I", cfg[20:])[0] == 1  # FLAG_DNS
    assert maps.pod_cfg_value(["10.244.1.2"], dns=False)[4:] == bytes(20)
    key = maps.listener_key("10.244.1.2", 15006)
    assert key[:4] == socket.inet_aton("10.244.1.2") and key[4:16] == bytes(12)
    assert struct.unpack("=II", key[16:]) == (15006, socket.AF_INET)
    raw = socket.inet_aton("10.244.2.7") + bytes(12) + struct.pack("!H", 8080) + struct.pack("=H", socket.AF_INET)
    assert maps.parse_orig_dst(raw) == ("10.244.2.7", 8080)
    raw6 = socket.inet_pton(socket.AF_INET6, "fd00::7") + struct.pack("!H", 443) + struct.pack("=H", socket.AF_INET6)
    assert maps.parse_orig_dst(raw6) == ("fd00::7", 443)


def test_the_programs_are_compiled_with_the_projects_ports_and_marks() -> None:
    d = ebpf.defines(Path("/sys/fs/bpf/ztunnel/n1"))
    assert d["PIN_DIR"] == '"/sys/fs/bpf/ztunnel/n1"'
    assert (d["OUTBOUND_PORT"], d["PLAINTEXT_PORT"], d["HBONE_PORT"], d["DNS_PORT"]) == (
        OUTBOUND_PORT,
        PLAINTEXT_INBOUND_PORT,
        HBONE_PORT,
        DNS_PORT,
    )
    assert (d["PROXY_MARK"], d["CONNMARK"], d["MARK_MASK"]) == (0x539, 0x111, 0xFFF)
    v4 = struct.unpack("=I", socket.inet_aton(PROBE_SNAT_V4))[0]  # as the program reads remote_ip4
    assert d["PROBE_V4"] == f"{v4}U"
    used = set(re.findall(r"\b([A-Z][A-Z0-9_]+)\b", SOURCE.read_text()))
    assert {k for k in d} <= used  # nothing defined that the source does not use
    assert {"PIN_DIR", "CONNMARK", "PROBE_V6_3"} <= used


def test_every_program_in_the_source_is_loaded_with_an_attach_type() -> None:
    functions = set(re.findall(r"^int (\w+)\(struct", SOURCE.read_text(), re.M))
    assert functions == set(bcc.CGROUP_PROGRAMS) | set(bcc.NETNS_PROGRAMS)


def test_unsupported_names_every_missing_piece() -> None:
    checks = [
        ebpf.Check("BTF", True, "/sys/kernel/btf/vmlinux"),
        ebpf.Check("bcc", False, "bcc is not importable: install python3-bpfcc"),
        ebpf.Check("kernel headers", False, "/lib/modules/x/build missing"),
    ]
    msg = ebpf.unsupported(checks)
    assert msg.startswith("eBPF redirection is not supported here: ")
    assert "bcc: bcc is not importable" in msg and "kernel headers: /lib/modules/x/build" in msg
    assert "BTF" not in msg
    assert ebpf.unsupported(checks[:1]) == ""


def _agent_args(**kw: object) -> argparse.Namespace:
    base: dict[str, object] = dict(
        action="run", node="n1", files=["/nonexistent.yaml"], redirect="ebpf", bpffs_dir=None, cgroup=None,
        iptables="auto", no_probe_snat=False, dns_capture=False, trust_domain="cluster.local",
        cni_socket="/tmp/x.sock", proxy_socket="/tmp/y.sock", state_dir=None,
    )  # fmt: skip
    base.update(kw)
    return argparse.Namespace(**base)


def test_the_agent_refuses_ebpf_mode_with_the_check_message(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("apiVersion: v1\nkind: Namespace\nmetadata: {name: x}\n")
    missing = [ebpf.Check("bcc", False, "not importable")]
    monkeypatch.setattr(ebpf, "check_support", lambda pin_dir=None, programs=True: missing)
    monkeypatch.setattr("ztunnel.redirect.iptables.detect_backend", lambda preferred=None: None)
    with pytest.raises(ZtunnelError, match=r"--redirect ebpf: eBPF redirection is not supported here: bcc: not imp"):
        commands.run_node_agent(_agent_args(files=[str(cfg)]))


def test_a_program_the_kernel_refuses_on_a_capable_machine_is_an_error_not_unsupported(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The lab tests skip eBPF where it is "not supported here"; a verifier refusal on a machine that has every
    piece must fail them instead, so it is worded as what it is."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text("apiVersion: v1\nkind: Namespace\nmetadata: {name: x}\n")
    monkeypatch.setattr(ebpf, "check_support", lambda pin_dir=None, programs=True: [ebpf.Check("BTF", True, "ok")])
    monkeypatch.setattr("ztunnel.redirect.iptables.detect_backend", lambda preferred=None: None)

    def refused(self: ebpf.EbpfRedirector) -> None:
        raise ebpf.RedirectError("loading program sk_lookup of bpf/redirect.c failed: Permission denied")

    monkeypatch.setattr(ebpf.EbpfRedirector, "load", refused)
    with pytest.raises(ZtunnelError) as e:
        commands.run_node_agent(_agent_args(files=[str(cfg)]))
    assert str(e.value).startswith("--redirect ebpf: loading program sk_lookup")
    assert "not supported here" not in str(e.value)


def test_check_prints_each_item_and_fails_when_one_is_missing(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    checks = [ebpf.Check("BTF", True, "/sys/kernel/btf/vmlinux"), ebpf.Check("bcc", False, "no")]
    monkeypatch.setattr(ebpf, "check_support", lambda pin_dir=None, programs=True: checks)
    assert commands.check("ebpf") == 1
    out = capsys.readouterr().out
    assert "ok       BTF: /sys/kernel/btf/vmlinux" in out and "MISSING  bcc: no" in out
    assert "not supported here: bcc: no" in out


def test_without_bcc_the_loader_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    real_import = builtins.__import__

    def no_bcc(name: str, *args: object, **kw: object) -> object:
        if name == "bcc":
            raise ImportError("No module named 'bcc'")
        return real_import(name, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(builtins, "__import__", no_bcc)
    with pytest.raises(bcc.BccUnavailable, match=r"install Debian's python3-bpfcc and run scripts/setup\.sh"):
        bcc.import_bcc()


def test_steered_inbound_connections_keep_their_destination_as_local_address() -> None:
    """sk_lookup hands the proxy's 15006 listener a connection whose local address is where the client was
    going; only when the sockets say so (eBPF mode), and never a proxy port."""
    srv = socket.create_server(("127.0.0.1", 0))
    port = srv.getsockname()[1]
    cli = socket.create_connection(("127.0.0.1", port))
    conn, _ = srv.accept()
    try:
        assert WorkloadSockets().inbound_destination(conn) is None  # iptables/local mode: conntrack or nothing
        assert WorkloadSockets(preserves_destination=True).inbound_destination(conn) == ("127.0.0.1", port)
    finally:
        for s in (cli, conn, srv):
            s.close()


def test_the_outbound_original_destination_takes_one_bpf_call(monkeypatch: pytest.MonkeyPatch) -> None:
    """The 15001 accept path reads and removes the connection's orig_dst entry in one bpf(2) call; a kernel
    refusing lookup-and-delete (before 5.14) is remembered and served by lookup then delete."""
    entry = socket.inet_pton(socket.AF_INET, "10.0.2.7") + b"\0" * 12 + struct.pack("!H", 8080)
    entry += struct.pack("=H", socket.AF_INET)
    calls: list[int] = []
    refuse = {maps.MAP_LOOKUP_AND_DELETE_ELEM: False}

    def fake_bpf(cmd: int, attr: ctypes.Array[ctypes.c_char]) -> int:
        calls.append(cmd)
        if refuse.get(cmd):
            raise maps.BpfError("refused", errno.EINVAL)
        if cmd in (maps.MAP_LOOKUP_ELEM, maps.MAP_LOOKUP_AND_DELETE_ELEM):
            ctypes.memmove(struct.unpack_from("=Q", attr, 16)[0], entry, len(entry))
        return 0

    monkeypatch.setattr(maps, "bpf", fake_bpf)
    pinned = maps.PinnedMaps("/nonexistent", orig_dst_fd=3)
    with socket.create_server(("127.0.0.1", 0)) as server, socket.create_connection(server.getsockname()):
        accepted, _ = server.accept()
        with accepted:
            assert pinned.original_destination(accepted) == ("10.0.2.7", 8080)
            assert calls == [maps.MAP_LOOKUP_AND_DELETE_ELEM]
            calls.clear()
            refuse[maps.MAP_LOOKUP_AND_DELETE_ELEM] = True
            assert pinned.original_destination(accepted) == ("10.0.2.7", 8080)
            assert pinned.original_destination(accepted) == ("10.0.2.7", 8080)
            lookup_then_delete = [maps.MAP_LOOKUP_ELEM, maps.MAP_DELETE_ELEM]
            assert calls == [maps.MAP_LOOKUP_AND_DELETE_ELEM, *lookup_then_delete, *lookup_then_delete]
