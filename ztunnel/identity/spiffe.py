"""SPIFFE ids of the form spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>, and the principals
(ids without `spiffe://`) that AuthorizationPolicies match."""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

from ztunnel.errors import ZtunnelError

_LABEL = re.compile(r"^[a-z0-9]([a-z0-9.\-]*[a-z0-9])?$")
_TRUST_DOMAIN = re.compile(r"^[a-z0-9._\-]+$")
_SCHEME = "spiffe://"


class SpiffeIdError(ZtunnelError):
    pass


@dataclass(frozen=True, slots=True, order=True)
class SpiffeId:
    trust_domain: str
    namespace: str
    service_account: str

    @classmethod
    def parse(cls, uri: str) -> SpiffeId:
        if not uri.startswith("spiffe://"):
            raise SpiffeIdError(f"{uri!r} is not a SPIFFE id: it must start with spiffe://")
        parts = uri[len("spiffe://") :].split("/")
        if len(parts) != 5 or parts[1] != "ns" or parts[3] != "sa":
            raise SpiffeIdError(f"{uri!r} is not a workload id: expected spiffe://<trust-domain>/ns/<ns>/sa/<sa>")
        td, _, ns, _, sa = parts
        if not _TRUST_DOMAIN.match(td):
            raise SpiffeIdError(f"{uri!r}: trust domain {td!r} may hold only lowercase letters, digits, . _ -")
        for what, value in (("namespace", ns), ("service account", sa)):
            if not value or not _LABEL.match(value):
                raise SpiffeIdError(f"{uri!r}: {what} {value!r} is not a valid Kubernetes name")
        return cls(td, ns, sa)

    @property
    def uri(self) -> str:
        return f"spiffe://{self.trust_domain}/ns/{self.namespace}/sa/{self.service_account}"

    @property
    def principal(self) -> str:
        """The form AuthorizationPolicy `principals` use: the id without `spiffe://`."""
        return self.uri[len("spiffe://") :]

    def __str__(self) -> str:
        return self.uri


def strip_scheme(value: str) -> str:
    """`spiffe://td/ns/a/sa/b` -> `td/ns/a/sa/b`, the form policies write principals in; other values as given."""
    return value[len(_SCHEME) :] if value.startswith(_SCHEME) else value


def principal_namespace(principal: str) -> str:
    """`cluster.local/ns/foo/sa/bar` -> `foo` ("" when the principal has no namespace part)."""
    parts = principal.split("/")
    for i in range(len(parts) - 1):
        if parts[i] == "ns":
            return parts[i + 1]
    return ""


def principal_service_account(principal: str) -> str:
    """`cluster.local/ns/foo/sa/bar` -> `foo/bar` ("" when the principal does not end in ns/NS/sa/SA)."""
    parts = principal.split("/")
    if len(parts) >= 5 and parts[-4] == "ns" and parts[-2] == "sa":
        return f"{parts[-3]}/{parts[-1]}"
    return ""


@lru_cache(maxsize=16384)
def principal_parts(uri: str) -> tuple[str, str, str]:
    """(principal, namespace, "ns/sa") of a peer identity, read leniently (any URI, no validation) because
    policies match whatever the peer presented. Cached: a node sees the same few peers again and again."""
    principal = strip_scheme(uri)
    return principal, principal_namespace(principal), principal_service_account(principal)
