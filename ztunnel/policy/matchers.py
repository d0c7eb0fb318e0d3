"""Value matchers compiled once per policy so a decision only does set lookups and string prefix tests.

Istio's string forms: `exact`, `prefix*`, `*suffix`, and `*` meaning "present" (any non-empty value).
IP fields take addresses or CIDRs; ports are exact numbers.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


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
        if self.presence:
            return True
        for p in self.prefixes:
            if value.startswith(p):
                return True
        return any(value.endswith(s) for s in self.suffixes)

    def matches_any(self, values: Iterable[str]) -> bool:
        return any(self.matches(v) for v in values)


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
            net = parse_cidr(v)
            (v4 if net.version == 4 else v6).append((int(net.network_address), int(net.netmask)))
        return cls(tuple(v4), tuple(v6))

    def matches(self, ip: IpAddress | None) -> bool:
        if ip is None:
            return False
        n = int(ip)
        ranges = self.v4 if ip.version == 4 else self.v6
        return any(n & mask == net for net, mask in ranges)


def parse_cidr(value: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """An address or a CIDR. Host bits set (10.0.0.1/8) are an error, as a typo there would widen a rule."""
    if not isinstance(value, str) or not value:
        raise ValueError(f"{value!r} is not an IP address or CIDR")
    try:
        return ipaddress.ip_network(value, strict=True)
    except ValueError as e:
        raise ValueError(f"{value!r} is not an IP address or CIDR ({e})") from None


def parse_ip(value: str | None) -> IpAddress | None:
    if not value:
        return None
    try:
        return ipaddress.ip_address(value.split("%", 1)[0])
    except ValueError:
        return None


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
