"""The one place bcc is imported: compile bpf/redirect.c and load its programs, behind typed functions.

bcc (Debian's python3-bpfcc) has no type hints and is built for the system Python; the venv sees only its
`bcc` package (scripts/setup.sh links it in). Nothing else in the project imports bcc, so a machine without
it fails here with a message that says what to install, and the rest of the code stays typed.
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ztunnel.errors import ZtunnelError

SOURCE = Path(__file__).resolve().parents[2] / "bpf" / "redirect.c"

# bpf_prog_type / bpf_attach_type (uapi/linux/bpf.h)
PROG_CGROUP_SOCK_ADDR = 18
PROG_SOCK_OPS = 13
PROG_SK_LOOKUP = 30
ATTACH_CGROUP_SOCK_OPS = 3
ATTACH_INET4_CONNECT, ATTACH_INET6_CONNECT = 10, 11
ATTACH_UDP4_SENDMSG, ATTACH_UDP6_SENDMSG = 14, 15
ATTACH_UDP4_RECVMSG, ATTACH_UDP6_RECVMSG = 19, 20
ATTACH_INET4_GETPEERNAME, ATTACH_INET6_GETPEERNAME = 29, 30
ATTACH_INET4_GETSOCKNAME, ATTACH_INET6_GETSOCKNAME = 31, 32
ATTACH_SK_LOOKUP = 36

# function in redirect.c -> (program type, attach type); the cgroup ones attach to each pod's cgroup
CGROUP_PROGRAMS: dict[str, tuple[int, int]] = {
    "connect4": (PROG_CGROUP_SOCK_ADDR, ATTACH_INET4_CONNECT),
    "connect6": (PROG_CGROUP_SOCK_ADDR, ATTACH_INET6_CONNECT),
    "sendmsg4": (PROG_CGROUP_SOCK_ADDR, ATTACH_UDP4_SENDMSG),
    "sendmsg6": (PROG_CGROUP_SOCK_ADDR, ATTACH_UDP6_SENDMSG),
    "recvmsg4": (PROG_CGROUP_SOCK_ADDR, ATTACH_UDP4_RECVMSG),
    "recvmsg6": (PROG_CGROUP_SOCK_ADDR, ATTACH_UDP6_RECVMSG),
    "getpeername4": (PROG_CGROUP_SOCK_ADDR, ATTACH_INET4_GETPEERNAME),
    "getpeername6": (PROG_CGROUP_SOCK_ADDR, ATTACH_INET6_GETPEERNAME),
    "getsockname4": (PROG_CGROUP_SOCK_ADDR, ATTACH_INET4_GETSOCKNAME),
    "getsockname6": (PROG_CGROUP_SOCK_ADDR, ATTACH_INET6_GETSOCKNAME),
    "sockops": (PROG_SOCK_OPS, ATTACH_CGROUP_SOCK_OPS),
}
NETNS_PROGRAMS: dict[str, tuple[int, int]] = {"sk_lookup": (PROG_SK_LOOKUP, ATTACH_SK_LOOKUP)}


class BccUnavailable(ZtunnelError):
    """bcc cannot be imported or cannot compile/load the programs here."""


def import_bcc() -> Any:
    """The bcc module, or BccUnavailable saying how to get it."""
    try:
        import bcc  # type: ignore[import-not-found, import-untyped, unused-ignore]
    except ImportError as e:
        raise BccUnavailable(
            f"bcc is not importable ({e}): install Debian's python3-bpfcc and run scripts/setup.sh "
            "(it links the bcc package into the venv)"
        ) from e
    return bcc


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[io.StringIO]:
    """bcc prints compiler and verifier output on fd 2; keep it for the error message instead."""
    captured = io.StringIO()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield captured
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            captured.write(tmp.read().decode(errors="replace"))


@dataclass
class Loaded:
    """The compiled module (kept alive: it owns the program fds) and each program's fd by function name."""

    module: Any
    prog_fds: dict[str, int] = field(default_factory=dict)

    def table(self, name: str) -> Any:
        return self.module[name]


def compile_and_load(defines: Mapping[str, str | int], *, source: Path = SOURCE) -> Loaded:
    """Compile `source` with `-D` defines and load every program (maps pinned as the source declares)."""
    bcc = import_bcc()
    cflags = [f"-D{k}={v}" for k, v in defines.items()]
    failure: Exception | None = None
    with _quiet_stderr() as err:  # the compiler's and verifier's words are in `err` once the block is left
        try:
            module = bcc.BPF(src_file=str(source).encode(), cflags=cflags)
        except Exception as e:  # bcc raises bare Exception
            failure = e
    if failure is not None:
        raise BccUnavailable(f"compiling {source} failed: {failure}\n{err.getvalue().strip()[-2000:]}")
    loaded = Loaded(module)
    for name, (prog_type, attach_type) in {**CGROUP_PROGRAMS, **NETNS_PROGRAMS}.items():
        with _quiet_stderr() as err:
            try:
                loaded.prog_fds[name] = int(module.load_func(name.encode(), prog_type, attach_type=attach_type).fd)
            except Exception as e:
                failure = e
        if failure is not None:
            raise BccUnavailable(f"loading program {name} of {source} failed: {failure}\n{err.getvalue()[-2000:]}")
    return loaded


def table_keys(loaded: Loaded, name: str) -> list[bytes]:
    """Raw keys of a map (for pruning stale entries)."""
    import ctypes

    table = loaded.table(name)
    return [bytes(ctypes.string_at(ctypes.addressof(k), ctypes.sizeof(k))) for k in table]
