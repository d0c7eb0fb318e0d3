"""Decisions over compiled policies (DESIGN §4.5, Istio's documented order): a matching DENY denies; with no
ALLOW policy for the workload the connection is allowed; a matching ALLOW allows; otherwise deny. Dry-run,
AUDIT and CUSTOM matches are listed on the decision, never change it. Also: which PeerAuthentication applies.

This is the per-connection hot path: plain loops, no allocation beyond the attributes and the decision.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from ztunnel.config.model import DEFAULT_PATH_NORMALIZATION, Workload, labels_match
from ztunnel.config.model import PATH_NORMALIZATIONS as PATH_NORMALIZATIONS  # re-exported (http1)
from ztunnel.identity.spiffe import principal_parts
from ztunnel.policy.compile import CompiledPolicy, WorkloadPolicies
from ztunnel.policy.decision import ConnectionAttributes, Decision, HttpRequestAttributes, MatchAttributes
from ztunnel.policy.matchers import IpAddress, parse_ip
from ztunnel.policy.model import Entry, PeerAuthentication, Rule


# ---------------------------------------------------------------------------------------------------
# Authorization
# ---------------------------------------------------------------------------------------------------
def match_attributes(
    attrs: ConnectionAttributes,
    request: HttpRequestAttributes | None,
    path_normalization: str = DEFAULT_PATH_NORMALIZATION,
) -> MatchAttributes:
    """Everything a rule can read, normalised once per decision (the path as the mesh config's
    `pathNormalization` says, as the waypoint normalizes what it forwards)."""
    principal, namespace, service_account = principal_parts(attrs.source_principal or "")
    if attrs.source_namespace is not None:
        namespace = attrs.source_namespace
    source_ip = parse_ip(attrs.source_ip)
    a = MatchAttributes(
        principal=principal,
        namespace=namespace,
        service_account=service_account,
        source_ip=source_ip,
        destination_ip=parse_ip(attrs.destination_ip),
        destination_port=attrs.destination_port,
    )
    if request is not None:
        _add_request(a, request, source_ip, path_normalization)
    return a


def _add_request(
    a: MatchAttributes, request: HttpRequestAttributes, source_ip: IpAddress | None, path_normalization: str
) -> None:
    """The L7 attributes; header names are lower-cased only if a rule reads a header (MatchAttributes.headers)."""
    a.method = request.method
    a.path = request_path(request.path, path_normalization)
    a.raw_headers = request.headers
    a.host = request.host or _header(request.headers, ":authority") or _header(request.headers, "host")
    claims = request.request_claims
    a.request_principal = request.request_principal
    a.claims = claims
    audiences = request.request_audiences
    if audiences is None:
        audiences = _audiences(claims.get("aud") if claims else None)
    a.audiences = audiences
    presenter = request.request_presenter
    if presenter is None and claims:
        azp = claims.get("azp")
        presenter = azp if isinstance(azp, str) else None
    a.presenter = presenter
    a.sni = request.sni
    a.remote_ip = source_ip if request.trusted_hops <= 0 else remote_address(request, source_ip)


def _audiences(aud: Any) -> tuple[str, ...]:
    """The `aud` claim: a string or a list of strings (anything else: no audience)."""
    if isinstance(aud, str):
        return (aud,)
    if isinstance(aud, list | tuple):
        return tuple(x for x in aud if isinstance(x, str))
    return ()


def _header(headers: Mapping[str, str], name: str) -> str | None:
    v = headers.get(name)
    if v is None and headers:
        for k, val in headers.items():
            if k.lower() == name:
                return val
    return v


def remote_address(request: HttpRequestAttributes, peer: IpAddress | None) -> IpAddress | None:
    """The client as Istio determines it with numTrustedProxies = N: the N-th X-Forwarded-For address from
    the right (written by the nearest trusted proxy); with fewer than N addresses, or one that is not an IP
    address, the connection's peer. Addresses further left are the client's own word and never used."""
    n = request.trusted_hops
    chain = request.forwarded_for
    if chain is None:
        raw = _header(request.headers, "x-forwarded-for")
        if not raw:
            return peer
        chain = tuple(raw.split(","))
    if len(chain) < n:
        return peer
    ip = parse_ip(chain[-n].strip())
    return ip if ip is not None else peer


def request_path(path: str, normalization: str = DEFAULT_PATH_NORMALIZATION) -> str:
    """The path policies match: without query or fragment, normalized as the waypoint normalizes what it
    forwards (`normalize_path`, the mesh config's mode), so that `authz check` answers for
    `/public/%2e%2e/admin` what the waypoint does. Cheap when there is nothing to do (the common case)."""
    for sep in ("?", "#"):
        i = path.find(sep)
        if i >= 0:
            path = path[:i]
    return normalize_path(path, normalization)


_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_HEX = frozenset("0123456789abcdefABCDEF")


def normalize_path(path: str, normalization: str = DEFAULT_PATH_NORMALIZATION) -> str:
    """A path (no query) as Istio normalizes it for policy and app alike (its "Authorization Policy
    Normalization"): but for NONE, `%XX` of an unreserved character decoded once (`%2e%2e` is `..`, `%2561`
    stays) and other escapes upper-cased (Envoy's canonical form), `\\` as `/`, dot segments removed (RFC 3986
    §5.2.4): BASE; MERGE_SLASHES also merges `//` (the waypoint's default, one step past Istio's BASE: `//admin`
    is /admin to most apps); DECODE_AND_MERGE_SLASHES first decodes `%2F` and `%5C` too."""
    if normalization == "NONE":
        return path
    if "%" in path:
        path = _decode_unreserved(path, normalization == "DECODE_AND_MERGE_SLASHES")
    if "\\" in path:
        path = path.replace("\\", "/")
    if normalization != "BASE":
        while "//" in path:
            path = path.replace("//", "/")
    if "/." in path:
        path = _remove_dot_segments(path)
    return path


def _decode_unreserved(path: str, slashes: bool) -> str:
    out: list[str] = []
    i, n = 0, len(path)
    while i < n:
        c = path[i]
        if c == "%" and i + 2 < n and path[i + 1] in _HEX and path[i + 2] in _HEX:
            v = chr(int(path[i + 1 : i + 3], 16))
            if v in _UNRESERVED or (slashes and v in "/\\"):
                out.append(v)
            else:  # kept encoded, in one spelling: `%2f` is matched (and sent) as `%2F`
                out.append(path[i : i + 3].upper())
            i += 3
            continue
        out.append(c)
        i += 1
    return "".join(out)


def _remove_dot_segments(path: str) -> str:
    rooted = path.startswith("/")
    segments = path.split("/")[1:] if rooted else path.split("/")
    out: list[str] = []
    last = len(segments) - 1
    for i, seg in enumerate(segments):
        if seg == "..":
            if out:
                out.pop()
            if i == last:
                out.append("")
        elif seg == ".":
            if i == last:
                out.append("")
        else:
            out.append(seg)
    return "/" + "/".join(out)


def _entries_match(entries: tuple[Entry, ...], a: MatchAttributes) -> bool:
    """Any entry whose checks all pass."""
    for entry in entries:
        for c in entry:
            if c.matcher.matches(getattr(a, c.attr)) is c.negate:
                break
        else:
            return True
    return False


def rule_matches(r: Rule, a: MatchAttributes) -> bool:
    if r.sources is not None and not _entries_match(r.sources, a):
        return False
    if r.operations is not None and not _entries_match(r.operations, a):
        return False
    for c in r.conditions:  # noqa: SIM110 - a plain loop is faster on this hot path
        if c.matcher.matches(getattr(a, c.attr)) is c.negate:
            return False
    return True


def first_match(c: CompiledPolicy, a: MatchAttributes) -> int | None:
    """Index of the first rule of the policy that matches, or None."""
    by_method = c.by_method
    if by_method is None or a.method is None:
        rules = c.by_port.get(a.destination_port, c.any_port)
    else:
        by_port, any_port = by_method.get(a.method) or by_method[""]
        rules = by_port.get(a.destination_port, any_port)
    for i, r in rules:
        if rule_matches(r, a):
            return i
    return None


def _evaluate(wp: WorkloadPolicies, a: MatchAttributes) -> Decision:
    if wp.rejected is not None:
        return wp.rejected
    for c in wp.deny:
        i = first_match(c, a)
        if i is not None:
            return c.decisions[i]
    for c in wp.allow:
        i = first_match(c, a)
        if i is not None:
            return c.decisions[i]
    return wp.fallback


def _matching(policies: Iterable[CompiledPolicy], a: MatchAttributes) -> tuple[str, ...]:
    return tuple(c.key for c in policies if first_match(c, a) is not None)


def decide(wp: WorkloadPolicies, a: MatchAttributes) -> Decision:
    """The enforced decision, with the dry-run, AUDIT and CUSTOM policies that matched listed on it."""
    decision = _evaluate(wp, a)
    if not (wp.shadow or wp.audit or wp.custom):
        return decision
    extras: dict[str, Any] = {}
    if wp.shadow is not None:
        extras["dry_run_policies"] = _matching(wp.dry_run, a)
        extras["dry_run_allowed"] = _evaluate(wp.shadow, a).allowed
    if wp.audit:
        extras["audit_policies"] = _matching(wp.audit, a)
    if wp.custom:
        matched = [c for c in wp.custom if first_match(c, a) is not None]
        extras["custom_policies"] = tuple(c.key for c in matched)
        extras["custom_providers"] = tuple(dict.fromkeys(c.provider for c in matched if c.provider))
    return Decision(decision.allowed, decision.policy, decision.reason, **extras)


# ---------------------------------------------------------------------------------------------------
# Peer authentication
# ---------------------------------------------------------------------------------------------------
class PeerAuthenticationIndex:
    """Which PeerAuthentication sets the mTLS mode of a workload's port.

    A workload policy (selector) beats the namespace policy beats the mesh policy (root namespace); `UNSET`
    inherits from the next level up; the mesh default is PERMISSIVE. Of two conflicting policies the oldest
    wins; rejected ones come first so that they win (they act as STRICT).
    """

    def __init__(
        self,
        peer_authentications: Iterable[PeerAuthentication],
        rejected: Iterable[PeerAuthentication],
        root_namespace: str,
    ) -> None:
        by_age = sorted(peer_authentications, key=lambda x: (x.created, x.order))
        self._mesh: PeerAuthentication | None = None
        self._ns: dict[str, PeerAuthentication] = {}
        self._selector: dict[str, list[PeerAuthentication]] = {}
        for pa in (*rejected, *by_age):
            if pa.selector:
                self._selector.setdefault(pa.namespace, []).append(pa)
            elif pa.namespace == root_namespace:
                self._mesh = self._mesh or pa
            else:
                self._ns.setdefault(pa.namespace, pa)

    def resolve(self, w: Workload, port: int) -> tuple[str, PeerAuthentication | None]:
        """(mode, the policy that set it or None for the PERMISSIVE default) for the workload's (target) port."""
        for pa in self._selector.get(w.namespace, ()):
            if pa.selector is not None and labels_match(pa.selector, w.labels):
                port_mode = pa.port_modes.get(port, "UNSET")
                if port_mode != "UNSET":
                    return port_mode, pa
                if pa.mode != "UNSET":
                    return pa.mode, pa
                break  # only the oldest matching workload policy counts, as in Istio
        pa_ns = self._ns.get(w.namespace)
        if pa_ns is not None and pa_ns.mode != "UNSET":
            return pa_ns.mode, pa_ns
        if self._mesh is not None and self._mesh.mode != "UNSET":
            return self._mesh.mode, self._mesh
        return "PERMISSIVE", None


def plaintext_refused(w: Workload, port: int, mode: str, pa: PeerAuthentication | None) -> Decision | None:
    """The refusal of a plaintext connection when peer authentication is STRICT; None when it may go on."""
    if mode != "STRICT":
        return None
    who = f"PeerAuthentication {pa.key}" if pa else "the mesh"
    invalid = " (it is invalid, so it is treated as STRICT until fixed)" if pa and pa.origin == "invalid" else ""
    return Decision(
        False,
        pa.key if pa else None,
        f"plaintext connection to {w.ref} port {port} refused: {who} requires mutual TLS (STRICT){invalid}",
    )
