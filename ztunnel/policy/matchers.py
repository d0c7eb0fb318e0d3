"""Matchers compiled once per policy so a decision only does set lookups and string prefix tests.

Value matchers (`StringSet`, `CidrSet`) and the matchers of one request attribute built on them (ports,
service accounts, headers, JWT claims and audiences, paths). Istio's string forms: `exact`, `prefix*`, `*suffix`,
and `*` meaning "present" (any non-empty value). IP fields take addresses or CIDRs; ports are exact numbers.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

# An address as the engine compares it: (IP version, integer value). Cheaper than ipaddress objects.
IpAddress = tuple[int, int]

_V4 = re.compile(r"^(\d{1,3})\.(\d{1,3})\.(\d{1,3})\.(\d{1,3})(?:/(\d{1,2}))?$")


@dataclass(frozen=True, slots=True)
class StringSet:
    """Any-of string matcher. An absent value is matched as the empty string, which only `exact ""` matches."""

    exact: frozenset[str]
    prefixes: tuple[str, ...]
    suffixes: tuple[str, ...]
    presence: bool
    ignore_case: bool = False

    @classmethod
    def compile(cls, values: Iterable[str], *, ignore_case: bool = False) -> StringSet:
        exact: set[str] = set()
        prefixes: list[str] = []
        suffixes: list[str] = []
        presence = False
        for raw in values:
            v = raw.lower() if ignore_case else raw
            if v == "*":
                presence = True
            elif v.startswith("*"):
                suffixes.append(v[1:])
            elif v.endswith("*"):
                prefixes.append(v[:-1])
            else:
                exact.add(v)
        return cls(frozenset(exact), tuple(prefixes), tuple(suffixes), presence, ignore_case)

    def matches(self, value: str | None) -> bool:
        if value is None:
            value = ""
        elif self.ignore_case:
            value = value.lower()
        if value in self.exact:
            return True
        if not value:
            return False
        # str.startswith/endswith take the whole tuple in one C call (an empty tuple matches nothing)
        return self.presence or value.startswith(self.prefixes) or value.endswith(self.suffixes)


@dataclass(frozen=True, slots=True)
class CidrSet:
    """Any-of IP/CIDR matcher over integer ranges (no ipaddress objects on the hot path)."""

    v4: tuple[tuple[int, int], ...]  # (network int, mask int)
    v6: tuple[tuple[int, int], ...]

    @classmethod
    def compile(cls, values: Iterable[str]) -> CidrSet:
        """Raises ValueError naming the bad value."""
        v4: list[tuple[int, int]] = []
        v6: list[tuple[int, int]] = []
        for v in values:
            version, net, mask = parse_cidr(v)
            (v4 if version == 4 else v6).append((net, mask))
        return cls(tuple(v4), tuple(v6))

    def matches(self, ip: IpAddress | None) -> bool:
        if ip is None:
            return False
        version, n = ip
        for net, mask in self.v4 if version == 4 else self.v6:  # noqa: SIM110 - hot path
            if n & mask == net:
                return True
        return False


@lru_cache(maxsize=65536)
def parse_cidr(value: str) -> tuple[int, int, int]:
    """(version, network, mask) of an address or CIDR. Host bits set (10.0.0.1/8) are an error: a typo there
    would silently widen or narrow a rule. Cached: clusters repeat the same blocks across many policies."""
    if not isinstance(value, str) or not value:
        raise ValueError(f"{value!r} is not an IP address or CIDR")
    m = _V4.match(value)
    if m and all(len(g) == 1 or g[0] != "0" for g in m.groups()[:4]):  # fast path; leading zeros go the slow way
        octets = [int(g) for g in m.groups()[:4]]
        prefix = int(m.group(5)) if m.group(5) is not None else 32
        if all(o < 256 for o in octets) and prefix <= 32 and (m.group(5) is None or m.group(5) == str(prefix)):
            addr = (octets[0] << 24) | (octets[1] << 16) | (octets[2] << 8) | octets[3]
            mask = (0xFFFFFFFF << (32 - prefix)) & 0xFFFFFFFF
            if addr & ~mask & 0xFFFFFFFF:
                raise ValueError(f"{value!r} has host bits set; did you mean {_v4_str(addr & mask)}/{prefix}?")
            return 4, addr, mask
    try:
        net = ipaddress.ip_network(value, strict=True)
    except ValueError as e:
        raise ValueError(f"{value!r} is not an IP address or CIDR ({e})") from None
    return net.version, int(net.network_address), int(net.netmask)


def _v4_str(n: int) -> str:
    return ".".join(str((n >> s) & 0xFF) for s in (24, 16, 8, 0))


@lru_cache(maxsize=65536)
def _parse_ip(value: str) -> IpAddress | None:
    m = _V4.match(value)
    if m and m.group(5) is None and all(len(g) == 1 or g[0] != "0" for g in m.groups()[:4]):
        octets = [int(g) for g in m.groups()[:4]]
        if all(o < 256 for o in octets):
            return 4, (octets[0] << 24) | (octets[1] << 16) | (octets[2] << 8) | octets[3]
    try:
        ip = ipaddress.ip_address(value.split("%", 1)[0])
    except ValueError:
        return None
    if ip.version == 6 and ip.ipv4_mapped is not None:  # ::ffff:10.0.0.1 is the IPv4 client 10.0.0.1
        return 4, int(ip.ipv4_mapped)
    return ip.version, int(ip)


def parse_ip(value: str | None) -> IpAddress | None:
    """(version, int) of an address; None when absent or not an address (matches no ipBlocks)."""
    if not value:
        return None
    return _parse_ip(value)


def parse_port(value: object) -> int:
    """A port as Istio writes it (a string of digits; plain YAML integers accepted too)."""
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a port number")
    if isinstance(value, int):
        port = value
    elif isinstance(value, str) and value.strip().isdigit():
        port = int(value.strip())
    else:
        raise ValueError(f"{value!r} is not a port number")
    if not 0 < port < 65536:
        raise ValueError(f"{value!r} is not a port number from 1 to 65535")
    return port


# ---------------------------------------------------------------------------------------------------
# Matchers that read one attribute
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class PortSet:
    ports: frozenset[int]

    def matches(self, value: int | None) -> bool:
        return value in self.ports


@dataclass(frozen=True, slots=True)
class ExactSet:
    values: frozenset[str]

    def matches(self, value: str | None) -> bool:
        return (value or "") in self.values


@dataclass(frozen=True, slots=True)
class HeaderMatcher:
    name: str  # lower-case
    values: StringSet

    def matches(self, headers: Mapping[str, str]) -> bool:
        return self.values.matches(headers.get(self.name))


@dataclass(frozen=True, slots=True)
class ClaimMatcher:
    """`request.auth.claims[a][b]`: the claim at that path, a string or a list of strings (any element
    matching), as Istio supports; booleans read as "true"/"false". Other types and absent claims never match."""

    path: tuple[str, ...]
    values: StringSet

    def matches(self, claims: Mapping[str, Any]) -> bool:
        value: Any = claims
        for part in self.path:
            if not isinstance(value, Mapping):
                return False
            value = value.get(part)
        return _claim_matches(self.values, value)


def _claim_matches(values: StringSet, value: Any) -> bool:
    if isinstance(value, str):
        return values.matches(value)
    if isinstance(value, bool):
        return values.matches("true" if value else "false")
    if isinstance(value, list | tuple):
        for v in value:
            if isinstance(v, str | bool) and _claim_matches(values, v):
                return True
    return False


@dataclass(frozen=True, slots=True)
class ListMatcher:
    """A list-valued attribute (`request.auth.audiences`): any element matching."""

    values: StringSet

    def matches(self, items: tuple[str, ...]) -> bool:
        for v in items:  # noqa: SIM110 - hot path
            if self.values.matches(v):
                return True
        return False


@dataclass(frozen=True, slots=True)
class PathMatcher:
    """Paths with Istio's path templates (`/books/{*}/pages`, `/static/{**}`: one segment, any remaining
    segments) among the plain values. Plain lists compile to a `StringSet`. The path arrives without its query
    string (match_attributes strips it once per request)."""

    values: StringSet
    templates: tuple[re.Pattern[str], ...] = ()

    def matches(self, path: str | None) -> bool:
        if self.values.matches(path):
            return True
        if not path:
            return False
        for t in self.templates:  # noqa: SIM110 - hot path
            if t.fullmatch(path):
                return True
        return False


def compile_path_template(value: str) -> re.Pattern[str]:
    """`{*}` = one non-empty segment, `{**}` = the rest (last operator only), as Istio's path templates."""
    parts = re.split(r"(\{\*\*\}|\{\*\})", value)
    if value.count("{**}") > 1 or ("{**}" in value and "{*}" in value.split("{**}", 1)[1]):
        raise ValueError(f"{value!r}: {{**}} must be the last operator of a path template")
    if re.search(r"\{[^}]*\}", re.sub(r"\{\*\*?\}", "", value)) or "*" in re.sub(r"\{\*\*?\}", "", value):
        raise ValueError(f"{value!r}: a path template may only use {{*}} and {{**}}")
    if not value.startswith("/"):
        raise ValueError(f"{value!r}: a path template must start with /")
    out = []
    for part in parts:
        if part == "{*}":
            out.append(r"[^/]+")
        elif part == "{**}":
            out.append(r".+")
        else:
            out.append(re.escape(part))
    return re.compile("".join(out))


Matcher = (
    StringSet | CidrSet | PortSet | ExactSet | HeaderMatcher | ClaimMatcher | ListMatcher | PathMatcher
)

