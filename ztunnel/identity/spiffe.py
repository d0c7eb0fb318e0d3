"""SPIFFE ids of the form spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>."""

from __future__ import annotations

import re
from dataclasses import dataclass

from ztunnel.errors import ZtunnelError

_LABEL = re.compile(r"^[a-z0-9]([a-z0-9.\-]*[a-z0-9])?$")
_TRUST_DOMAIN = re.compile(r"^[a-z0-9._\-]+$")


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
