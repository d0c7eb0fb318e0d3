"""Request (origin) authentication: the JWTs of a request, checked against the RequestAuthentication rules.

`authenticate(request, rules, keys, now)` answers one of three things, as Istio's waypoint does:
- `NoToken`: no token at any location a rule reads -> the request goes on unauthenticated (an AuthorizationPolicy
  with `requestPrincipals` then decides, typically 403);
- `Authenticated`: a token verified -> principal `<iss>/<sub>` and its claims, for `request.auth.*` conditions;
- `Rejected`: a token is present but not valid (bad signature, expired, not yet valid, unknown issuer, wrong
  audience, malformed, no key) -> 401 with the reason.

Everything here is pure: keys come from a lookup (inline `jwks`, or the last good `jwksUri` fetch, see jwks.py)
and the time from the caller. Istio's rules kept: default locations (`Authorization: Bearer` and the
`access_token` query parameter) when a rule names none; a token is checked by the rule of its `iss`, and only if
that rule reads the location it came in; 60 s clock skew on `exp`/`nbf` (Envoy's default, which Istio does not
change); `aud` must meet `audiences` when they are set; `iat` is type-checked only, as in Envoy.
Istio leaves the principal of a request with several tokens unspecified; here every token must verify and the
first one (in rule order, then location order) gives the principal, so a bad token is never hidden by a good one.

Algorithms: RS256/384/512, PS256, ES256/384, EdDSA. Never `none`, never HMAC (a public key used as an HMAC
secret is the classic algorithm confusion), and a key is used only for the algorithms of its type (jwks.py).
"""

from __future__ import annotations

import base64
import binascii
import enum
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

from jwt import PyJWS
from jwt.exceptions import InvalidSignatureError, InvalidTokenError

from ztunnel.policy.model import JwtRule as PolicyJwtRule
from ztunnel.waypoint.jwks import FETCH_TIMEOUT, KEY_TYPES, JwksError, KeySet, parse_jwks

CLOCK_SKEW = 60.0
ALGORITHMS = tuple(KEY_TYPES)
DEFAULT_HEADER = ("authorization", "Bearer ")
DEFAULT_PARAM = "access_token"

_JWS = PyJWS(algorithms=list(ALGORITHMS))  # the library's verifier, with only our algorithms registered


# ---------------------------------------------------------------------------------------------------
# Rules
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class ClaimToHeader:
    header: str
    claim: str  # nested claims with `.`: `realm.role`


@dataclass(frozen=True, slots=True)
class Location:
    kind: str  # "header" | "param" | "cookie"
    name: str  # header names lowercased
    prefix: str = ""  # headers only: what precedes the token (`Bearer `)

    def __str__(self) -> str:
        return f"{self.kind} {self.name!r}" + (f" (prefix {self.prefix!r})" if self.prefix else "")


@dataclass(frozen=True, slots=True)
class JwtRule:
    """One `jwtRules` entry, with everything the waypoint needs (policy.model.JwtRule, header names ready)."""

    issuer: str
    audiences: tuple[str, ...] = ()
    jwks_uri: str | None = None
    jwks: str | None = None  # inline key set; wins over jwks_uri when both are set (Istio)
    from_headers: tuple[tuple[str, str], ...] = ()  # (name, prefix)
    from_params: tuple[str, ...] = ()
    from_cookies: tuple[str, ...] = ()
    forward_original_token: bool = False
    output_payload_to_header: str | None = None
    output_claim_to_headers: tuple[ClaimToHeader, ...] = ()
    timeout: float | None = None  # one jwksUri fetch, seconds; None = FETCH_TIMEOUT (Istio's 5 s)

    @classmethod
    def from_policy(cls, rule: PolicyJwtRule) -> JwtRule:
        """From the policy model's validated JwtRule."""
        return cls(
            issuer=rule.issuer,
            audiences=tuple(rule.audiences),
            jwks_uri=rule.jwks_uri,
            jwks=rule.jwks,
            from_headers=tuple(rule.from_headers),
            from_params=tuple(rule.from_params),
            from_cookies=tuple(rule.from_cookies),
            forward_original_token=rule.forward_original_token,
            output_payload_to_header=rule.output_payload_to_header,
            output_claim_to_headers=tuple(ClaimToHeader(h, c) for h, c in rule.output_claim_to_headers),
            timeout=rule.timeout,
        )

    def locations(self) -> tuple[Location, ...]:
        """Where this rule reads tokens: its own locations in order, or Istio's defaults when it names none."""
        if not (self.from_headers or self.from_params or self.from_cookies):
            return (Location("header", *DEFAULT_HEADER), Location("param", DEFAULT_PARAM))
        return (
            *(Location("header", name.lower(), prefix) for name, prefix in self.from_headers),
            *(Location("param", p) for p in self.from_params),
            *(Location("cookie", c) for c in self.from_cookies),
        )


# ---------------------------------------------------------------------------------------------------
# Outcomes
# ---------------------------------------------------------------------------------------------------
class Failure(enum.StrEnum):
    MALFORMED = "malformed"
    UNSUPPORTED_ALGORITHM = "unsupported algorithm"
    UNKNOWN_ISSUER = "unknown issuer"
    NO_KEYS = "no keys"
    NO_MATCHING_KEY = "no matching key"
    BAD_SIGNATURE = "bad signature"
    EXPIRED = "expired"
    NOT_YET_VALID = "not yet valid"
    WRONG_AUDIENCE = "wrong audience"


@dataclass(frozen=True, slots=True)
class FoundToken:
    token: str
    location: Location


@dataclass(frozen=True, slots=True)
class NoToken:
    pass


@dataclass(frozen=True, slots=True)
class Authenticated:
    principal: str  # "<iss>/<sub>"
    claims: Mapping[str, Any]
    found: FoundToken
    rule: JwtRule
    tokens: tuple[tuple[FoundToken, JwtRule, Mapping[str, Any]], ...]  # every token that verified, in order

    @property
    def issuer(self) -> str:
        return str(self.claims["iss"])

    @property
    def audiences(self) -> tuple[str, ...]:
        return _audiences(self.claims.get("aud"))

    @property
    def presenter(self) -> str | None:
        azp = self.claims.get("azp")
        return azp if isinstance(azp, str) else None


@dataclass(frozen=True, slots=True)
class Rejected:
    reason: Failure
    detail: str
    location: Location | None = None
    status: int = 401

    def message(self) -> str:
        where = f" in {self.location}" if self.location else ""
        return f"JWT{where} rejected: {self.reason}: {self.detail}"


Outcome = NoToken | Authenticated | Rejected
KeyLookup = Callable[[JwtRule], KeySet | None]  # the rule's key set: inline, or the last good jwksUri fetch


def remote_uris(rules: Sequence[JwtRule]) -> list[str]:
    """The `jwksUri`s to fetch: those of rules without an inline `jwks` (which wins when both are set)."""
    return list(remote_timeouts(rules))


def remote_timeouts(rules: Sequence[JwtRule]) -> dict[str, float]:
    """Each `jwksUri` to fetch and its fetch timeout: the rule's `timeout` (default 5 s); when several rules name
    one URI (it is fetched once), the longest of theirs, so no rule's fetch is cut shorter than it asked."""
    out: dict[str, float] = {}
    for r in rules:
        if r.jwks_uri and not r.jwks:
            t = FETCH_TIMEOUT if r.timeout is None else r.timeout
            out[r.jwks_uri] = max(out.get(r.jwks_uri, 0.0), t)
    return out


class KeyStore:
    """The `KeyLookup` of a set of rules: inline key sets parsed once, remote ones from `remote(uri)` (the
    refresher's last good keys). An inline set that does not parse gives no keys: its tokens get 401."""

    def __init__(self, remote: Callable[[str], KeySet | None]) -> None:
        self._remote = remote
        self._inline: dict[str, KeySet | None] = {}
        self.errors: dict[str, str] = {}  # issuer -> why its inline jwks is unusable

    def __call__(self, rule: JwtRule) -> KeySet | None:
        if rule.jwks:
            if rule.jwks not in self._inline:
                try:
                    self._inline[rule.jwks] = parse_jwks(rule.jwks, what=f"jwks of issuer {rule.issuer!r}")
                except JwksError as e:
                    self._inline[rule.jwks] = None
                    self.errors[rule.issuer] = str(e)
            return self._inline[rule.jwks]
        return self._remote(rule.jwks_uri) if rule.jwks_uri else None


# ---------------------------------------------------------------------------------------------------
# Extraction
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class RequestTokens:
    """The parts of a request tokens can be in: headers (names lowercased, in order) and the raw query."""

    headers: Sequence[tuple[str, str]]
    query: str = ""

    def header_values(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k == name]

    def params(self) -> list[tuple[str, str]]:
        return parse_qsl(self.query, keep_blank_values=True)

    def cookies(self) -> list[tuple[str, str]]:
        out = []
        for value in self.header_values("cookie"):
            for part in value.split(";"):
                name, sep, v = part.strip().partition("=")
                if sep:
                    v = v.strip()
                    if len(v) >= 2 and v[0] == v[-1] == '"':
                        v = v[1:-1]
                    out.append((name.strip(), v))
        return out


_DEFAULT_HEADER = Location("header", *DEFAULT_HEADER)


def extract(request: RequestTokens, location: Location) -> list[str]:
    """The tokens at one location. A header without the location's prefix holds none (`Authorization: Basic`)."""
    if location.kind == "header":
        out = []
        for value in request.header_values(location.name):
            if location.prefix:
                # The default `Bearer ` scheme is case-insensitive (RFC 7235); a configured prefix is exact.
                head = value[: len(location.prefix)]
                if location == _DEFAULT_HEADER:
                    head, want = head.lower(), location.prefix.lower()
                else:
                    want = location.prefix
                if head != want:
                    continue
                value = value[len(location.prefix) :]
            value = value.strip()
            if value:
                out.append(value)
        return out
    pairs = request.params() if location.kind == "param" else request.cookies()
    return [v for k, v in pairs if k == location.name and v]



def find_tokens(request: RequestTokens, rules: Sequence[JwtRule]) -> list[FoundToken]:
    """Every distinct (token, location) any rule reads, in rule order then location order."""
    seen: dict[tuple[str, Location], FoundToken] = {}
    for rule in rules:
        for loc in rule.locations():
            for token in extract(request, loc):
                seen.setdefault((token, loc), FoundToken(token, loc))
    return list(seen.values())


# ---------------------------------------------------------------------------------------------------
# Verification
# ---------------------------------------------------------------------------------------------------
def authenticate(
    request: RequestTokens, rules: Sequence[JwtRule], keys: KeyLookup, now: float, *, clock_skew: float = CLOCK_SKEW
) -> Outcome:
    """The request's authentication outcome under `rules` at wall-clock time `now` (seconds since the epoch)."""
    found = find_tokens(request, rules)
    if not found:
        return NoToken()
    verified: list[tuple[FoundToken, JwtRule, Mapping[str, Any]]] = []
    for ft in found:
        result = verify(ft, rules, keys, now, clock_skew=clock_skew)
        if isinstance(result, Rejected):
            return result
        verified.append((ft, *result))
    first, rule, claims = verified[0]
    sub = claims.get("sub")
    return Authenticated(
        principal=f"{claims['iss']}/{sub if isinstance(sub, str) else ''}",
        claims=claims,
        found=first,
        rule=rule,
        tokens=tuple(verified),
    )


def verify(
    found: FoundToken, rules: Sequence[JwtRule], keys: KeyLookup, now: float, *, clock_skew: float = CLOCK_SKEW
) -> tuple[JwtRule, Mapping[str, Any]] | Rejected:
    """One token against the rules of its issuer that read its location: (the rule, the claims) or why not."""
    loc = found.location
    try:
        unverified = _JWS.decode_complete(found.token, options={"verify_signature": False})
    except InvalidTokenError as e:
        return Rejected(Failure.MALFORMED, str(e), loc)
    header = unverified["header"]
    try:
        claims = json.loads(unverified["payload"])
    except (ValueError, UnicodeDecodeError):
        return Rejected(Failure.MALFORMED, "the payload is not JSON", loc)
    if not isinstance(claims, dict):
        return Rejected(Failure.MALFORMED, "the payload is not a JSON object", loc)
    alg = header.get("alg")
    if alg not in KEY_TYPES:
        return Rejected(Failure.UNSUPPORTED_ALGORITHM, f"alg {alg!r}; accepted: {', '.join(ALGORITHMS)}", loc)
    kid = header.get("kid")
    if kid is not None and not isinstance(kid, str):
        return Rejected(Failure.MALFORMED, "kid is not a string", loc)
    iss = claims.get("iss")
    if not isinstance(iss, str):
        return Rejected(Failure.UNKNOWN_ISSUER, "the token has no `iss` claim", loc)
    candidates = [r for r in rules if r.issuer == iss and loc in r.locations()]
    if not candidates:
        known = any(r.issuer == iss for r in rules)
        detail = f"issuer {iss!r} is not read from {loc}" if known else f"no rule for issuer {iss!r}"
        return Rejected(Failure.UNKNOWN_ISSUER, detail, loc)
    rejection: Rejected | None = None
    for rule in candidates:  # several RequestAuthentications may name the same issuer: any may accept
        result = _verify_with(found.token, alg, kid, claims, rule, keys(rule), now, clock_skew, loc)
        if not isinstance(result, Rejected):
            return rule, result
        rejection = rejection or result
    assert rejection is not None
    return rejection


def _verify_with(
    token: str,
    alg: str,
    kid: str | None,
    claims: Mapping[str, Any],
    rule: JwtRule,
    key_set: KeySet | None,
    now: float,
    skew: float,
    loc: Location,
) -> Mapping[str, Any] | Rejected:
    if key_set is None:
        source = "inline jwks" if rule.jwks else (rule.jwks_uri or "no jwks or jwksUri")
        return Rejected(Failure.NO_KEYS, f"no keys for issuer {rule.issuer!r} ({source})", loc)
    keys = key_set.candidates(alg, kid)
    if not keys:
        return Rejected(Failure.NO_MATCHING_KEY, f"no {alg} key" + (f" with kid {kid!r}" if kid else ""), loc)
    for k in keys:
        try:
            _JWS.decode_complete(token, key=k.key, algorithms=[alg])
        except InvalidSignatureError:
            continue
        except InvalidTokenError as e:
            return Rejected(Failure.MALFORMED, str(e), loc)
        return _check_claims(claims, rule, now, skew, loc)
    return Rejected(Failure.BAD_SIGNATURE, f"the signature does not verify with the {len(keys)} {alg} key(s)", loc)


def _check_claims(
    claims: Mapping[str, Any], rule: JwtRule, now: float, skew: float, loc: Location
) -> Mapping[str, Any] | Rejected:
    for name in ("exp", "nbf", "iat"):
        value = claims.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
            return Rejected(Failure.MALFORMED, f"`{name}` is not a number", loc)
    exp, nbf = claims.get("exp"), claims.get("nbf")
    if exp is not None and now > exp + skew:
        return Rejected(Failure.EXPIRED, f"expired {now - exp:.0f}s ago", loc)
    if nbf is not None and now + skew < nbf:
        return Rejected(Failure.NOT_YET_VALID, f"valid only in {nbf - now:.0f}s", loc)
    if rule.audiences:
        if not isinstance(claims.get("aud", ""), str | list):
            return Rejected(Failure.MALFORMED, "`aud` is neither a string nor a list", loc)
        theirs = {_norm_aud(a) for a in _audiences(claims.get("aud"))}
        if not theirs & {_norm_aud(a) for a in rule.audiences}:
            return Rejected(
                Failure.WRONG_AUDIENCE, f"audiences {sorted(theirs)} meet none of {list(rule.audiences)}", loc
            )
    return claims


def _audiences(aud: Any) -> tuple[str, ...]:
    if isinstance(aud, str):
        return (aud,)
    if isinstance(aud, list):
        return tuple(a for a in aud if isinstance(a, str))
    return ()


def _norm_aud(aud: str) -> str:
    """Envoy compares audiences without an http(s):// scheme or a trailing slash."""
    for scheme in ("https://", "http://"):
        if aud.startswith(scheme):
            aud = aud[len(scheme) :]
            break
    return aud.rstrip("/")


# ---------------------------------------------------------------------------------------------------
# Upstream header edits
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class HeaderEdits:
    remove: tuple[str, ...]  # lowercased names: every header of that name goes
    set: tuple[tuple[str, str], ...]  # added after the removals

    def apply(self, headers: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
        gone = set(self.remove)
        return [(k, v) for k, v in headers if k not in gone] + list(self.set)


def header_edits(rules: Sequence[JwtRule], outcome: Outcome) -> HeaderEdits:
    """What to change in the request before it goes upstream.

    The headers a rule outputs (`outputPayloadToHeader`, `outputClaimToHeaders`) are removed from every request
    first, so a client cannot send its own `x-jwt-payload` past a waypoint that would have written it (ours:
    the application trusts these headers). On success: the verified token's header is removed unless the rule
    says `forwardOriginalToken` (query and cookie tokens stay: the request target and other cookies are not
    rewritten), the payload goes base64url-encoded as the token carried it, and each claim to its header.
    """
    remove: dict[str, None] = {}
    for rule in rules:
        if rule.output_payload_to_header:
            remove[rule.output_payload_to_header.lower()] = None
        for c in rule.output_claim_to_headers:
            remove[c.header.lower()] = None
    out: list[tuple[str, str]] = []
    if isinstance(outcome, Authenticated):
        for found, rule, claims in outcome.tokens:
            if not rule.forward_original_token and found.location.kind == "header":
                remove[found.location.name] = None
            if rule.output_payload_to_header:
                out.append((rule.output_payload_to_header.lower(), found.token.split(".")[1]))
            for c in rule.output_claim_to_headers:
                value = claim_value(claims, c.claim)
                if value is not None:
                    out.append((c.header.lower(), value))
    return HeaderEdits(tuple(remove), tuple(out))


def claim_value(claims: Mapping[str, Any], path: str) -> str | None:
    """A claim as a header value, as Envoy's jwt_authn (Istio's waypoint) writes it: a string as it is, a boolean
    `true`/`false`, a whole non-negative number in integer form and any other number with six decimals, a list
    or an object as base64 of its compact JSON; a missing claim gives nothing. Nested claims by `.`
    (`realm.role`), each step an object. Values go out as UTF-8 (returned as latin-1 text, one char a byte);
    a string with CR, LF or NUL gives nothing: it would split the header (request smuggling)."""
    value: Any = claims
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    if isinstance(value, str):
        text = value
    elif isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, int | float):
        whole = isinstance(value, int) or value.is_integer()
        text = str(int(value)) if whole and 0 <= value < 2**64 else f"{value:f}"
    elif isinstance(value, list | dict):
        compact = json.dumps(value, separators=(",", ":"), ensure_ascii=False, sort_keys=True)
        text = base64.b64encode(compact.encode()).decode("ascii")
    else:  # null
        return None
    if not text or any(c in text for c in _UNSAFE_IN_HEADER):
        return None
    return text.encode("utf-8").decode("latin-1")


_UNSAFE_IN_HEADER = ("\r", "\n", "\0")


def payload_of(header_value: str) -> Mapping[str, Any]:
    """Decode an `outputPayloadToHeader` value (for the application's side, and tests)."""
    try:
        data = base64.urlsafe_b64decode(header_value + "=" * (-len(header_value) % 4))
        result = json.loads(data)
    except (binascii.Error, ValueError) as e:
        raise ValueError(f"not a base64url JSON payload: {e}") from None
    if not isinstance(result, dict):
        raise ValueError("not a JSON object")
    return result
