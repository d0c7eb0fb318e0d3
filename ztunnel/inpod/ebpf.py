"""The eBPF redirection state the node agent and the node proxy share: bpf(2) on pinned maps and links.

The agent loads `bpf/redirect.c` with bcc and pins its maps under the node's bpffs directory; the proxy needs
no bcc, only these few bpf(2) commands (ctypes, stdlib): it reads a redirected connection's original
destination from `orig_dst` (cgroup connect4/6 rewrote it to 15001, so there is no conntrack entry for
SO_ORIGINAL_DST), and puts each pod's 15006 listeners into the `listeners` sockhash, where the pod netns'
sk_lookup program finds them. The key and value layouts below mirror the structs of bpf/redirect.c.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import ipaddress
import os
import socket
import struct
from dataclasses import dataclass

from ztunnel.errors import ZtunnelError

SYS_BPF = 321  # x86_64
SO_NETNS_COOKIE = 71  # asm-generic/socket.h, Linux 5.14

# bpf(2) commands and attach types (uapi/linux/bpf.h)
MAP_LOOKUP_ELEM, MAP_UPDATE_ELEM, MAP_DELETE_ELEM = 1, 2, 3
MAP_LOOKUP_AND_DELETE_ELEM = 21  # hash maps since Linux 5.14
OBJ_PIN, OBJ_GET = 6, 7
PROG_ATTACH, PROG_DETACH = 8, 9
PROG_QUERY = 16
LINK_CREATE, LINK_UPDATE = 28, 29
ATTACH_SK_LOOKUP = 36
ANY = 0

# the maps under a node's pin directory (names fixed by bpf/redirect.c)
PODS_MAP = "pods"
ORIG_DST_MAP = "orig_dst"
LISTENERS_MAP = "listeners"
PROXY_SOCKS_MAP = "proxy_socks"


class BpfError(ZtunnelError):
    """A bpf(2) call failed; `errno` says how."""

    def __init__(self, msg: str, err: int = 0) -> None:
        super().__init__(msg)
        self.errno = err


_libc: ctypes.CDLL | None = None  # loaded once per process; immutable after load


def bpf(cmd: int, attr: ctypes.Array[ctypes.c_char]) -> int:
    """One bpf(2) call with a zero-padded attribute buffer; raises BpfError on failure."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    ret = int(_libc.syscall(ctypes.c_long(SYS_BPF), ctypes.c_int(cmd), attr, ctypes.c_uint(len(attr))))
    if ret < 0:
        err = ctypes.get_errno()
        raise BpfError(f"bpf command {cmd}: {os.strerror(err)}", err)
    return ret


def _attr(fmt: str, *values: object) -> ctypes.Array[ctypes.c_char]:
    buf = ctypes.create_string_buffer(128)
    struct.pack_into(fmt, buf, 0, *values)
    return buf


def obj_get(path: str) -> int:
    """An fd for the object pinned at `path` (BpfError with ENOENT when nothing is pinned there)."""
    name = ctypes.create_string_buffer(path.encode())
    try:
        return bpf(OBJ_GET, _attr("=QII", ctypes.addressof(name), 0, 0))
    except BpfError as e:
        raise BpfError(f"{path}: {os.strerror(e.errno)}", e.errno) from None


def obj_pin(fd: int, path: str) -> None:
    name = ctypes.create_string_buffer(path.encode())
    bpf(OBJ_PIN, _attr("=QII", ctypes.addressof(name), fd, 0))


def map_lookup(fd: int, key: bytes, value_size: int) -> bytes | None:
    k = ctypes.create_string_buffer(key, len(key))
    v = ctypes.create_string_buffer(value_size)
    try:
        bpf(MAP_LOOKUP_ELEM, _attr("=IIQQQ", fd, 0, ctypes.addressof(k), ctypes.addressof(v), 0))
    except BpfError as e:
        if e.errno == errno.ENOENT:
            return None
        raise
    return v.raw


def map_lookup_and_delete(fd: int, key: bytes, value_size: int) -> bytes | None:
    """Take an entry out of a map in one call (BpfError EINVAL/ENOTSUPP where the kernel lacks it for hash maps)."""
    k = ctypes.create_string_buffer(key, len(key))
    v = ctypes.create_string_buffer(value_size)
    try:
        bpf(MAP_LOOKUP_AND_DELETE_ELEM, _attr("=IIQQQ", fd, 0, ctypes.addressof(k), ctypes.addressof(v), 0))
    except BpfError as e:
        if e.errno == errno.ENOENT:
            return None
        raise
    return v.raw


def map_update(fd: int, key: bytes, value: bytes, flags: int = ANY) -> None:
    k = ctypes.create_string_buffer(key, len(key))
    v = ctypes.create_string_buffer(value, len(value))
    bpf(MAP_UPDATE_ELEM, _attr("=IIQQQ", fd, 0, ctypes.addressof(k), ctypes.addressof(v), flags))


def map_delete(fd: int, key: bytes) -> bool:
    k = ctypes.create_string_buffer(key, len(key))
    try:
        bpf(MAP_DELETE_ELEM, _attr("=IIQQQ", fd, 0, ctypes.addressof(k), 0, 0))
    except BpfError as e:
        if e.errno == errno.ENOENT:
            return False
        raise
    return True


def prog_attach(prog_fd: int, target_fd: int, attach_type: int, flags: int = 0) -> None:
    bpf(PROG_ATTACH, _attr("=IIIII", target_fd, prog_fd, attach_type, flags, 0))


def prog_detach(target_fd: int, attach_type: int, prog_fd: int = 0) -> None:
    bpf(PROG_DETACH, _attr("=IIIII", target_fd, prog_fd, attach_type, 0, 0))


def prog_query(target_fd: int, attach_type: int) -> list[int]:
    """Ids of the programs attached to a cgroup (or netns) for `attach_type`."""
    ids = (ctypes.c_uint32 * 64)()
    attr = _attr("=IIIIQI", target_fd, attach_type, 0, 0, ctypes.addressof(ids), 64)
    bpf(PROG_QUERY, attr)
    count = struct.unpack_from("=I", attr, 24)[0]
    return list(ids[: min(count, 64)])


def link_create(prog_fd: int, target_fd: int, attach_type: int) -> int:
    return bpf(LINK_CREATE, _attr("=IIII", prog_fd, target_fd, attach_type, 0))


def link_update(link_fd: int, prog_fd: int) -> None:
    bpf(LINK_UPDATE, _attr("=IIII", link_fd, prog_fd, 0, 0))


OBJ_GET_INFO_BY_FD = 15
LINK_TYPE_CGROUP, LINK_TYPE_NETNS = 3, 5


@dataclass(frozen=True, slots=True)
class LinkInfo:
    """What a bpf link attaches: its program, and the cgroup id or netns inode it is attached to, and how."""

    type: int
    prog_id: int
    target: int
    attach_type: int


def link_info(path: str) -> LinkInfo:
    """The link pinned at `path` (BpfError if none)."""
    fd = obj_get(path)
    try:
        info = ctypes.create_string_buffer(64)
        bpf(OBJ_GET_INFO_BY_FD, _attr("=IIQ", fd, len(info), ctypes.addressof(info)))
    finally:
        os.close(fd)
    kind, _id, prog_id = struct.unpack_from("=III", info, 0)
    if kind == LINK_TYPE_CGROUP:
        target, attach_type = struct.unpack_from("=QI", info, 16)
    else:
        target, attach_type = struct.unpack_from("=II", info, 16)
    return LinkInfo(kind, prog_id, target, attach_type)


# ---- the maps' layouts (bpf/redirect.c) ---------------------------------------------------------------------


def netns_cookie(sock: socket.socket) -> int:
    """The cookie of the network namespace `sock` lives in (the key bpf_get_netns_cookie gives programs)."""
    return int(struct.unpack("=Q", sock.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8))[0])


def _addr16(ip: str) -> tuple[int, bytes]:
    if ":" in ip:
        return socket.AF_INET6, socket.inet_pton(socket.AF_INET6, ip)
    return socket.AF_INET, socket.inet_pton(socket.AF_INET, ip).ljust(16, b"\0")


def pod_cfg_value(ips: list[str] | tuple[str, ...], *, dns: bool) -> bytes:
    """struct pod_cfg: the pod's first v4 and v6 address (network order) and its flags."""
    v4 = next((socket.inet_pton(socket.AF_INET, ip) for ip in ips if ":" not in ip), b"\0" * 4)
    v6 = next((socket.inet_pton(socket.AF_INET6, ip) for ip in ips if ":" in ip), b"\0" * 16)
    return v4 + v6 + struct.pack("=I", 1 if dns else 0)


def cookie_key(cookie: int) -> bytes:
    return struct.pack("=Q", cookie)


def conn_key(cookie: int, family: int, ip: str, port: int) -> bytes:
    """struct conn_key: the client's netns, family, address (a v4-mapped one as IPv4) and port."""
    if family == socket.AF_INET6 and ip.startswith("::ffff:") and "." in ip:
        family, ip = socket.AF_INET, ip.removeprefix("::ffff:")
    return struct.pack("=Q16sII", cookie, _addr16(ip)[1], family, port)


def listener_key(ip: str, port: int) -> bytes:
    family, addr = _addr16(ip)
    return addr + struct.pack("=II", port, family)


ORIG_DST_SIZE = 20


def parse_orig_dst(raw: bytes) -> tuple[str, int]:
    """struct orig_dst -> (ip, port)."""
    port = struct.unpack_from("!H", raw, 16)[0]
    family = struct.unpack_from("=H", raw, 18)[0]
    if family == socket.AF_INET6:
        return socket.inet_ntop(socket.AF_INET6, raw[:16]), port
    return socket.inet_ntop(socket.AF_INET, raw[:4]), port


# ---- the proxy's side -------------------------------------------------------------------------------------


@dataclass
class PinnedMaps:
    """The proxy's handles on a node's pinned maps (opened once per pin directory, closed with the proxy)."""

    pin_dir: str
    orig_dst_fd: int = -1
    listeners_fd: int = -1
    proxy_socks_fd: int = -1
    take_in_one_call: bool = True  # MAP_LOOKUP_AND_DELETE_ELEM works here (until the kernel refuses it once)

    def open(self) -> PinnedMaps:
        try:
            self.orig_dst_fd = obj_get(f"{self.pin_dir}/{ORIG_DST_MAP}")
            self.listeners_fd = obj_get(f"{self.pin_dir}/{LISTENERS_MAP}")
            self.proxy_socks_fd = obj_get(f"{self.pin_dir}/{PROXY_SOCKS_MAP}")
        except BpfError:
            self.close()
            raise
        return self

    def close(self) -> None:
        for fd in (self.orig_dst_fd, self.listeners_fd, self.proxy_socks_fd):
            if fd >= 0:
                os.close(fd)
        self.orig_dst_fd = self.listeners_fd = self.proxy_socks_fd = -1

    def tag(self, sock: socket.socket) -> None:
        """Mark `sock` as the proxy's for the programs (socket storage, keyed by fd from user space): only a
        tagged socket with the proxy's mark escapes redirection or lets a connection through to the app."""
        map_update(self.proxy_socks_fd, struct.pack("=i", sock.fileno()), struct.pack("=I", 1))

    def original_destination(self, sock: socket.socket) -> tuple[str, int] | None:
        """Where the app connected to, for a connection accepted on 15001 (taken out of the map: read once).

        Only one that connect4/6 sent here, to loopback: one dialled straight to the pod's address:15001 from
        the same address and port as a redirected one would otherwise take that one's destination."""
        try:
            if not ipaddress.ip_address(sock.getsockname()[0]).is_loopback:
                return None
            peer = sock.getpeername()
            key = conn_key(netns_cookie(sock), sock.family, peer[0], peer[1])
            raw = self._take(key)
        except (OSError, BpfError):
            return None
        return None if raw is None else parse_orig_dst(raw)

    def _take(self, key: bytes) -> bytes | None:
        """The orig_dst entry for `key`, deleted: one bpf call per connection on the accept path (two on a
        kernel before 5.14, which refuses lookup-and-delete on hash maps)."""
        if self.take_in_one_call:
            try:
                return map_lookup_and_delete(self.orig_dst_fd, key, ORIG_DST_SIZE)
            except BpfError as e:
                if e.errno not in (errno.EINVAL, errno.ENOTSUP, 524):  # 524: the kernel's ENOTSUPP
                    raise
                self.take_in_one_call = False
        raw = map_lookup(self.orig_dst_fd, key, ORIG_DST_SIZE)
        if raw is not None:
            map_delete(self.orig_dst_fd, key)
        return raw

    def add_listeners(self, ips: list[str] | tuple[str, ...], socks: list[socket.socket], port: int) -> None:
        """Make `socks` (the pod's 15006 listeners, one per family) where sk_lookup steers the pod's inbound."""
        by_family = {s.family: s for s in socks}
        for ip in ips:
            sock = by_family.get(socket.AF_INET6 if ":" in ip else socket.AF_INET)
            if sock is not None:
                map_update(self.listeners_fd, listener_key(ip, port), struct.pack("=I", sock.fileno()))
