"""Node authorization for the CA: which node is calling, and may it have a cert for this identity.

Sans-IO: the gRPC server (and the in-process CA of local mode) feed it the bearer header, the CSR and
the current config snapshot; it answers with the identity to sign or a `NodeAuthError` whose `code`
names the gRPC status to return and whose text says why.
"""

from __future__ import annotations

import contextvars
import enum
import hmac
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import yaml

from ztunnel.config.model import ClusterConfig
from ztunnel.identity.ca import CAError, IdentityRejectedError, InvalidRequestError, SigningRequest, parse_csr
from ztunnel.identity.spiffe import SpiffeId, SpiffeIdError

IMPERSONATED_IDENTITY = "ImpersonatedIdentity"  # the metadata key Istio's CA client uses
# The gRPC peer ("ipv4:10.0.0.1:40000") of the request being authenticated, set by the CA server: an
# authenticator that asks an API per token bounds what each caller's refused tokens may cost by it.
CALLER_PEER: contextvars.ContextVar[str] = contextvars.ContextVar("ztunnel_ca_caller_peer", default="")


class Refusal(enum.Enum):
    """Why a request is refused, named after the gRPC status the server returns."""

    UNAUTHENTICATED = "UNAUTHENTICATED"
    PERMISSION_DENIED = "PERMISSION_DENIED"
    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    UNAVAILABLE = "UNAVAILABLE"  # the CA cannot decide now (the Kubernetes API is down): refused, retry later


class NodeAuthError(CAError):
    def __init__(self, refusal: Refusal, message: str) -> None:
        super().__init__(message)
        self.refusal = refusal


class TokenFileError(CAError):
    pass


def load_node_tokens(path: str | Path) -> dict[str, str]:
    """Read the local-mode token file (`token: node-name` per line); refuse one others can read."""
    p = Path(path)
    try:
        st = os.stat(p)
    except OSError as e:
        raise TokenFileError(f"{p}: cannot read the node token file ({e.strerror})") from e
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise TokenFileError(
            f"{p}: the node token file is readable by group or others (mode {stat.S_IMODE(st.st_mode):o}); "
            f"run `chmod 600 {p}`"
        )
    try:
        data = yaml.safe_load(p.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise TokenFileError(f"{p}: not UTF-8 text (byte {e.start}); write it as `token: node-name` lines") from e
    except (OSError, yaml.YAMLError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TokenFileError(f"{p}: not a YAML mapping of token: node-name ({first})") from e
    if not isinstance(data, Mapping) or not data:
        raise TokenFileError(f"{p}: expected a non-empty YAML mapping of token: node-name")
    tokens: dict[str, str] = {}
    for token, node in data.items():
        if not isinstance(token, str) or not isinstance(node, str) or not token or not node:
            raise TokenFileError(f"{p}: entry {token!r}: both the token and the node name must be non-empty strings")
        tokens[token] = node
    return tokens


def bearer_token(authorization: str | None) -> str:
    if not authorization:
        raise NodeAuthError(Refusal.UNAUTHENTICATED, "no node credential: send `authorization: Bearer <token>`")
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise NodeAuthError(Refusal.UNAUTHENTICATED, "the authorization header must be `Bearer <token>`")
    return token.strip()


@dataclass(frozen=True)
class Caller:
    """Who is asking, once authenticated: the node it runs on and, with Kubernetes, its own identity.

    `node_proxy`: it may have the identities of every pod on its node (a node token, or a TokenReview of the
    node proxy's service account); otherwise only `identity`, its own.
    """

    node: str
    identity: SpiffeId | None = None
    node_proxy: bool = True
    name: str = ""  # for logs: the pod (namespace/name) or the node

    def __str__(self) -> str:
        return self.name or f"node {self.node}"


class Authenticator(Protocol):
    async def authenticate(self, authorization: str | None) -> Caller: ...


@dataclass(frozen=True)
class NodeTokens:
    """Maps bearer tokens to node names, compared in constant time."""

    tokens: Mapping[str, str]

    def node_for(self, authorization: str | None) -> str:
        token = bearer_token(authorization)
        found = ""
        for known, node in self.tokens.items():
            if hmac.compare_digest(known.encode(), token.encode()):
                found = node
        if not found:
            raise NodeAuthError(Refusal.UNAUTHENTICATED, "unknown node token; check the token file the CA was given")
        return found

    async def authenticate(self, authorization: str | None) -> Caller:
        return Caller(self.node_for(authorization))


def authorize_identity(config: ClusterConfig | None, node: str, identity: SpiffeId) -> None:
    """A node may have a cert only for an identity of a pod the config places on it."""
    if config is None:
        raise NodeAuthError(Refusal.PERMISSION_DENIED, "the CA has no cluster config yet; cannot place pods on nodes")
    if identity.uri in config.identities_on_node(node):
        return
    elsewhere = sorted({w.node or "<unscheduled>" for w in config.workloads if w.identity == identity.uri})
    if elsewhere:
        why = f"pods with identity {identity} run only on {', '.join(elsewhere)}"
    else:
        why = f"no pod in the config has identity {identity}"
    raise NodeAuthError(Refusal.PERMISSION_DENIED, f"node {node!r} may not have a certificate for {identity}: {why}")


def check_request(
    config: ClusterConfig | None,
    node: str,
    csr_pem: str | bytes,
    *,
    trust_domain: str,
    impersonated: str = "",
    caller: Caller | None = None,
) -> SigningRequest:
    """Everything the CA checks about one request from `node`; returns the request to sign. A `caller` that is
    not a node proxy may have only its own identity (a waypoint's or an app's own agent)."""
    try:
        req = parse_csr(csr_pem, trust_domain)
    except InvalidRequestError as e:
        raise NodeAuthError(Refusal.INVALID_ARGUMENT, str(e)) from e
    except IdentityRejectedError as e:
        raise NodeAuthError(Refusal.PERMISSION_DENIED, str(e)) from e
    if impersonated:
        try:
            asked = SpiffeId.parse(impersonated)
        except SpiffeIdError as e:
            raise NodeAuthError(Refusal.PERMISSION_DENIED, f"metadata {IMPERSONATED_IDENTITY}: {e}") from e
        if asked != req.identity:
            raise NodeAuthError(
                Refusal.PERMISSION_DENIED,
                f"the CSR's SAN {req.identity} differs from metadata {IMPERSONATED_IDENTITY} {asked}",
            )
    if caller is not None and caller.identity is not None and req.identity == caller.identity:
        return req  # its own identity, of a pod the API just confirmed on its node
    if caller is not None and not caller.node_proxy:
        raise NodeAuthError(
            Refusal.PERMISSION_DENIED,
            f"{caller} ({caller.identity}) may have only its own identity, not {req.identity}: only a node proxy's "
            "service account (ca serve --node-proxy-account) may have the identities of the pods on its node",
        )
    authorize_identity(config, node, req.identity)
    return req
