"""PeerAuthentication (mTLS mode per workload and port) and RequestAuthentication (for the waypoint):
their specs validated into the model. Which PeerAuthentication applies is evaluation.py's.

PeerAuthentication inheritance, as Istio documents it: a workload policy (selector) beats the namespace policy
(no selector) beats the mesh policy (root namespace, no selector); `UNSET` inherits from the next level up and
the mesh default is PERMISSIVE. `portLevelMtls` is keyed by the workload's (target) port and only allowed on
policies with a selector, as Istio's validation requires.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlparse

from ztunnel.config.loader import parse_duration
from ztunnel.config.model import KubeObject
from ztunnel.policy.matchers import parse_port
from ztunnel.policy.model import MTLS_MODES, JwtRule, PeerAuthentication, RequestAuthentication
from ztunnel.policy.validation import ObjectReader, parse_selector, parse_target_refs, type_name


def _mode(ctx: ObjectReader, raw: Any, path: str) -> str:
    m = ctx.mapping(raw, path)
    ctx.known_fields(m, ["mode"], path)
    mode = m.get("mode", "UNSET")
    if mode is None:
        mode = "UNSET"
    if not isinstance(mode, str) or mode not in MTLS_MODES:
        raise ctx.error(f"{path}.mode", f"unknown mode {mode!r}; use one of {', '.join(MTLS_MODES)}")
    return mode


def parse_peer_authentication(obj: KubeObject, *, order: int = 0, origin: str = "") -> PeerAuthentication:
    ctx = ObjectReader(obj)
    ctx.check_api_version()
    spec = ctx.mapping(obj.body.get("spec"), "spec")
    ctx.known_fields(spec, ["selector", "mtls", "portLevelMtls"], "spec")
    selector = parse_selector(ctx, spec)
    mode = _mode(ctx, spec.get("mtls"), "spec.mtls")
    port_modes: dict[int, str] = {}
    raw_ports = ctx.mapping(spec.get("portLevelMtls"), "spec.portLevelMtls")
    if raw_ports and selector is None:
        raise ctx.error(
            "spec.portLevelMtls", "is only allowed with a selector; mesh and namespace policies cannot set it"
        )
    for k, v in raw_ports.items():
        path = f"spec.portLevelMtls[{k}]"
        try:
            port = parse_port(k)
        except ValueError as e:
            raise ctx.error(path, str(e)) from None
        port_modes[port] = _mode(ctx, v, path)
    meta = obj.body.get("metadata") or {}
    created = str(meta.get("creationTimestamp") or "") if isinstance(meta, Mapping) else ""
    return PeerAuthentication(
        namespace=obj.namespace,
        name=obj.name,
        selector=selector,
        mode=mode,
        port_modes=port_modes,
        created=created,
        order=order,
        source=obj.source,
        origin=origin,
    )


_JWT_FIELDS = (
    "issuer",
    "audiences",
    "jwksUri",
    "jwks",
    "fromHeaders",
    "fromParams",
    "fromCookies",
    "outputPayloadToHeader",
    "forwardOriginalToken",
    "outputClaimToHeaders",
    "timeout",
)


# Header names the waypoint writes: Istio's CRD pattern for `outputClaimToHeaders[].header`, also applied to
# `outputPayloadToHeader` (the name goes on the wire as written, so nothing but token characters).
_OUTPUT_HEADER = re.compile(r"^[-_A-Za-z0-9]+$")
MIN_JWKS_TIMEOUT = 0.001  # Istio's CRD: a duration of at least 1ms


def parse_request_authentication(obj: KubeObject) -> RequestAuthentication:
    ctx = ObjectReader(obj)
    ctx.check_api_version()
    spec = ctx.mapping(obj.body.get("spec"), "spec")
    ctx.known_fields(spec, ["selector", "targetRef", "targetRefs", "jwtRules"], "spec")
    selector = parse_selector(ctx, spec)
    target_refs = parse_target_refs(ctx, spec, obj.namespace, selector)
    raw_rules = ctx.list_of(spec.get("jwtRules"), "spec.jwtRules")
    rules = [_jwt_rule(ctx, raw, f"spec.jwtRules[{i}]") for i, raw in enumerate(raw_rules)]
    return RequestAuthentication(obj.namespace, obj.name, selector, tuple(rules), obj.source, target_refs)


def _jwt_rule(ctx: ObjectReader, raw: Any, path: str) -> JwtRule:
    """One `jwtRules` entry, every field checked as Istio's validation does (errors name the field)."""
    r = ctx.mapping(raw, path)
    ctx.known_fields(r, _JWT_FIELDS, path)
    issuer = r.get("issuer")
    if not isinstance(issuer, str) or not issuer:
        raise ctx.error(f"{path}.issuer", "is required: the JWT `iss` to accept")
    jwks_uri = r.get("jwksUri")
    if jwks_uri is not None and (not isinstance(jwks_uri, str) or urlparse(jwks_uri).scheme not in ("http", "https")):
        raise ctx.error(f"{path}.jwksUri", f"{jwks_uri!r} is not an http(s) URL")
    jwks = r.get("jwks")
    if jwks is not None and not isinstance(jwks, str):
        raise ctx.error(f"{path}.jwks", f"must be a string (a JSON Web Key Set), not {type_name(jwks)}")
    headers = []
    for j, h in enumerate(ctx.list_of(r.get("fromHeaders"), f"{path}.fromHeaders")):
        hp = f"{path}.fromHeaders[{j}]"
        hm = ctx.mapping(h, hp)
        ctx.known_fields(hm, ["name", "prefix"], hp)
        if not isinstance(hm.get("name"), str) or not hm["name"]:
            raise ctx.error(f"{hp}.name", "is required")
        prefix = hm.get("prefix")
        if prefix is not None and not isinstance(prefix, str):
            raise ctx.error(f"{hp}.prefix", f"must be a string, not {type_name(prefix)}")
        headers.append((hm["name"], prefix or ""))
    fwd = r.get("forwardOriginalToken", False)
    if not isinstance(fwd, bool):
        raise ctx.error(f"{path}.forwardOriginalToken", f"must be true or false, not {type_name(fwd)}")
    out_hdr = r.get("outputPayloadToHeader")
    if out_hdr is not None:
        if not isinstance(out_hdr, str):
            raise ctx.error(f"{path}.outputPayloadToHeader", f"must be a string, not {type_name(out_hdr)}")
        if not _OUTPUT_HEADER.match(out_hdr):
            raise ctx.error(
                f"{path}.outputPayloadToHeader", f"{out_hdr!r} is not a header name (letters, digits, - and _)"
            )
    return JwtRule(
        issuer=issuer,
        audiences=tuple(ctx.str_list(r.get("audiences"), f"{path}.audiences")),
        jwks_uri=jwks_uri,
        jwks=jwks,
        from_headers=tuple(headers),
        from_params=_names(ctx, r.get("fromParams"), f"{path}.fromParams", "query parameter"),
        forward_original_token=fwd,
        output_payload_to_header=out_hdr or None,
        from_cookies=_names(ctx, r.get("fromCookies"), f"{path}.fromCookies", "cookie"),
        output_claim_to_headers=_claims_to_headers(ctx, r.get("outputClaimToHeaders"), f"{path}.outputClaimToHeaders"),
        timeout=_timeout(ctx, r.get("timeout"), f"{path}.timeout"),
    )


def _names(ctx: ObjectReader, raw: Any, path: str, what: str) -> tuple[str, ...]:
    names = ctx.str_list(raw, path)
    for i, name in enumerate(names):
        if not name:
            raise ctx.error(f"{path}[{i}]", f"is empty; give the {what} name the token is in")
    return tuple(names)


def _claims_to_headers(ctx: ObjectReader, raw: Any, path: str) -> tuple[tuple[str, str], ...]:
    """`outputClaimToHeaders`: each `{header, claim}` required; a header at most once (Istio: must be unique)."""
    out: list[tuple[str, str]] = []
    seen: set[str] = set()
    for i, item in enumerate(ctx.list_of(raw, path)):
        ip = f"{path}[{i}]"
        m = ctx.mapping(item, ip)
        ctx.known_fields(m, ["header", "claim"], ip)
        header, claim = m.get("header"), m.get("claim")
        if not isinstance(header, str) or not header:
            raise ctx.error(f"{ip}.header", "is required: the request header to write the claim to")
        if not _OUTPUT_HEADER.match(header):
            raise ctx.error(f"{ip}.header", f"{header!r} is not a header name (letters, digits, - and _)")
        if header.lower() in seen:
            raise ctx.error(f"{ip}.header", f"{header!r} is named twice; each header holds one claim")
        seen.add(header.lower())
        if not isinstance(claim, str) or not claim:
            raise ctx.error(f"{ip}.claim", "is required: the claim to copy (nested claims as `a.b`)")
        out.append((header, claim))
    return tuple(out)


def _timeout(ctx: ObjectReader, raw: Any, path: str) -> float | None:
    if raw is None:
        return None
    try:
        seconds = parse_duration(raw)
    except ValueError as e:
        raise ctx.error(path, str(e)) from None
    if seconds < MIN_JWKS_TIMEOUT:
        raise ctx.error(path, f"{raw!r} is too short: the JWKS fetch timeout must be at least 1ms")
    return seconds
