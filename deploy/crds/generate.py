"""Write the CRDs of deploy/crds/ and of the Helm chart's crds/ from the schemas below.

One definition, two copies: the Kustomize install (deploy/crds, `kubectl create -k`) and the Helm chart
(deploy/helm/ztunnel-py/crds, Helm's install-if-absent directory) must carry the same bytes, and
tests/unit/test_deploy_crds.py fails when they differ from what this script writes. Run it after editing:

    .venv/bin/python deploy/crds/generate.py

The schemas are tight where a typo would silently drop a policy (enums, required keys, types, no unknown
fields, so `kubectl apply` refuses `acton: DENY`) and loose only where Istio itself is (free-form Gateway
status). Every seed policy of the project is accepted (the test checks each one).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
HELM_CRDS = HERE.parent / "helm" / "ztunnel-py" / "crds"
LABELS = {"app.kubernetes.io/part-of": "ztunnel-py"}

S: dict[str, Any] = {"type": "string"}
STRINGS: dict[str, Any] = {"type": "array", "items": {"type": "string"}}
STRING_MAP: dict[str, Any] = {"type": "object", "additionalProperties": {"type": "string"}}
PORT_NUMBER: dict[str, Any] = {"type": "integer", "minimum": 0, "maximum": 65535}
PORT_STRINGS: dict[str, Any] = {"type": "array", "items": {"type": "string", "pattern": "^[0-9]{1,5}$"}}
FREE: dict[str, Any] = {"type": "object", "x-kubernetes-preserve-unknown-fields": True}


def obj(props: dict[str, Any], required: list[str] | None = None, **extra: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"type": "object", "properties": props}
    if required:
        out["required"] = required
    out.update(extra)
    return out


def arr(items: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"type": "array", "items": items, **extra}


# ---- security.istio.io (v1 and v1beta1 carry the same schema, as in Istio) ------------------------------

LABEL_VALUES = {"type": "object", "additionalProperties": {"type": "string", "maxLength": 63}, "maxProperties": 4096}
SELECTOR = obj({"matchLabels": LABEL_VALUES})
TARGET_REF = obj({"group": S, "kind": S, "name": S, "namespace": S}, ["kind", "name"])
TARGETING = {"selector": SELECTOR, "targetRef": TARGET_REF, "targetRefs": arr(TARGET_REF, maxItems=16)}

SOURCE_FIELDS = [
    "principals",
    "notPrincipals",
    "requestPrincipals",
    "notRequestPrincipals",
    "namespaces",
    "notNamespaces",
    "serviceAccounts",
    "notServiceAccounts",
    "ipBlocks",
    "notIpBlocks",
    "remoteIpBlocks",
    "notRemoteIpBlocks",
]
OPERATION = obj(
    {
        "hosts": STRINGS,
        "notHosts": STRINGS,
        "ports": PORT_STRINGS,
        "notPorts": PORT_STRINGS,
        "methods": STRINGS,
        "notMethods": STRINGS,
        "paths": STRINGS,
        "notPaths": STRINGS,
    }
)
RULE = obj(
    {
        "from": arr(obj({"source": obj({f: STRINGS for f in SOURCE_FIELDS})})),
        "to": arr(obj({"operation": OPERATION})),
        "when": arr(obj({"key": S, "values": STRINGS, "notValues": STRINGS}, ["key"])),
    }
)
AUTHORIZATION_POLICY = obj(
    {
        **TARGETING,
        "action": {"type": "string", "enum": ["ALLOW", "DENY", "AUDIT", "CUSTOM"]},
        "provider": obj({"name": S}),
        "rules": arr(RULE, maxItems=512),
    }
)
MTLS_MODE = {"type": "string", "enum": ["UNSET", "DISABLE", "PERMISSIVE", "STRICT"]}
PEER_AUTHENTICATION = obj(
    {
        "selector": SELECTOR,
        "mtls": obj({"mode": MTLS_MODE}),
        # Keys are port numbers ("8080"): YAML's integer keys become strings on their way to the API.
        "portLevelMtls": {"type": "object", "additionalProperties": obj({"mode": MTLS_MODE}), "minProperties": 1},
    }
)
JWT_RULE = obj(
    {
        "issuer": {"type": "string", "minLength": 1},
        "audiences": STRINGS,
        "jwksUri": S,
        "jwks": S,
        "fromHeaders": arr(obj({"name": {"type": "string", "minLength": 1}, "prefix": S}, ["name"])),
        "fromParams": STRINGS,
        "fromCookies": STRINGS,
        "outputPayloadToHeader": S,
        "forwardOriginalToken": {"type": "boolean"},
        "outputClaimToHeaders": arr(obj({"header": S, "claim": S}, ["header", "claim"])),
        "timeout": S,
    },
    ["issuer"],
)
REQUEST_AUTHENTICATION = obj({**TARGETING, "jwtRules": arr(JWT_RULE, maxItems=4096)})

# ---- legacy kinds the seeds (and old clusters) carry: rbac.istio.io and authentication.istio.io v1alpha1 -----

ACCESS_RULE = obj(
    {
        "services": STRINGS,
        "hosts": STRINGS,
        "notHosts": STRINGS,
        "paths": STRINGS,
        "notPaths": STRINGS,
        "methods": STRINGS,
        "notMethods": STRINGS,
        "ports": arr(PORT_NUMBER),
        "notPorts": arr(PORT_NUMBER),
        "constraints": arr(obj({"key": S, "values": STRINGS}, ["key"])),
    }
)
SERVICE_ROLE = obj({"rules": arr(ACCESS_RULE)})
SUBJECT = obj(
    {
        "user": S,
        "group": S,
        "properties": STRING_MAP,
        "names": STRINGS,
        "notNames": STRINGS,
        "groups": STRINGS,
        "notGroups": STRINGS,
        "namespaces": STRINGS,
        "notNamespaces": STRINGS,
        "ips": STRINGS,
        "notIps": STRINGS,
    }
)
SERVICE_ROLE_BINDING = obj(
    {
        "subjects": arr(SUBJECT),
        "roleRef": obj({"kind": {"type": "string", "enum": ["ServiceRole"]}, "name": S}, ["kind", "name"]),
        "role": S,
        "mode": {"type": "string", "enum": ["ENFORCED", "PERMISSIVE"]},
    }
)
TARGET_LIST = obj({"services": STRINGS, "namespaces": STRINGS})
RBAC_CONFIG = obj(
    {
        "mode": {"type": "string", "enum": ["OFF", "ON", "ON_WITH_INCLUSION", "ON_WITH_EXCLUSION"]},
        "inclusion": TARGET_LIST,
        "exclusion": TARGET_LIST,
        "enforcementMode": {"type": "string", "enum": ["ENFORCED", "PERMISSIVE"]},
    }
)
LEGACY_TARGET = arr(
    obj(
        {
            "name": {"type": "string", "minLength": 1},
            "labels": STRING_MAP,
            "ports": arr(obj({"number": PORT_NUMBER, "name": S})),
        },
        ["name"],
    )
)
LEGACY_JWT = obj(
    {
        "issuer": S,
        "audiences": STRINGS,
        "jwksUri": S,
        "jwks": S,
        "jwtHeaders": STRINGS,
        "jwtParams": STRINGS,
        "triggerRules": arr(FREE),
        "trigger_rules": arr(FREE),
    }
)
AUTHN_POLICY = obj(
    {
        "targets": LEGACY_TARGET,
        "target": LEGACY_TARGET,  # a spelling the seeds use; the config loader reads it as `targets`
        # `peers:` with nothing after it and `- mtls:` with nothing after it are how the seeds write "defaults".
        "peers": arr(
            obj(
                {
                    "mtls": obj(
                        {"mode": {"type": "string", "enum": ["STRICT", "PERMISSIVE"]}, "allowTls": {"type": "boolean"}},
                        nullable=True,
                    ),
                    "jwt": LEGACY_JWT,
                }
            ),
            nullable=True,
        ),
        "peerIsOptional": {"type": "boolean"},
        "origins": arr(obj({"jwt": LEGACY_JWT}), nullable=True),
        "originIsOptional": {"type": "boolean"},
        "principalBinding": {"type": "string", "enum": ["USE_PEER", "USE_ORIGIN"]},
    }
)

# ---- gateway.networking.k8s.io Gateway (the fields waypoints use; the full CRD may already be installed) -----

GATEWAY = obj(
    {
        "gatewayClassName": {"type": "string", "minLength": 1, "maxLength": 253},
        "listeners": arr(
            obj(
                {
                    "name": {"type": "string", "minLength": 1, "maxLength": 253},
                    "hostname": S,
                    "port": {"type": "integer", "minimum": 1, "maximum": 65535},
                    "protocol": {"type": "string", "minLength": 1, "maxLength": 255},
                    "tls": FREE,
                    "allowedRoutes": FREE,
                },
                ["name", "port", "protocol"],
            ),
            minItems=1,
            maxItems=64,
        ),
        "addresses": arr(obj({"type": S, "value": {"type": "string", "minLength": 1}}, ["value"]), maxItems=16),
        "infrastructure": obj({"labels": STRING_MAP, "annotations": STRING_MAP, "parametersRef": FREE}),
    },
    ["gatewayClassName", "listeners"],
)


def version(name: str, spec: dict[str, Any], *, storage: bool, columns: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "name": name,
        "served": True,
        "storage": storage,
        "schema": {
            "openAPIV3Schema": {
                "type": "object",
                "properties": {
                    "apiVersion": S,
                    "kind": S,
                    "metadata": {"type": "object"},
                    "spec": spec,
                    "status": FREE,
                },
            }
        },
        "subresources": {"status": {}},
        "additionalPrinterColumns": [
            *columns,
            {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
        ],
    }


def crd(
    group: str,
    kind: str,
    plural: str,
    spec: dict[str, Any],
    versions: list[str],
    *,
    scope: str = "Namespaced",
    short: list[str] | None = None,
    categories: list[str] | None = None,
    columns: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    names: dict[str, Any] = {"kind": kind, "listKind": kind + "List", "plural": plural, "singular": kind.lower()}
    if short:
        names["shortNames"] = short
    if categories:
        names["categories"] = categories
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{group}", "labels": dict(LABELS)},
        "spec": {
            "group": group,
            "names": names,
            "scope": scope,
            "versions": [version(v, spec, storage=i == 0, columns=columns or []) for i, v in enumerate(versions)],
        },
    }


def col(name: str, path: str) -> dict[str, Any]:
    return {"name": name, "type": "string", "jsonPath": path}


ISTIO = ["istio-io", "security-istio-io"]
FILES: dict[str, list[dict[str, Any]]] = {
    "security.istio.io.yaml": [
        crd(
            "security.istio.io",
            "AuthorizationPolicy",
            "authorizationpolicies",
            AUTHORIZATION_POLICY,
            ["v1", "v1beta1"],
            short=["ap"],
            categories=ISTIO,
            columns=[col("Action", ".spec.action")],
        ),
        crd(
            "security.istio.io",
            "PeerAuthentication",
            "peerauthentications",
            PEER_AUTHENTICATION,
            ["v1", "v1beta1"],
            short=["pa"],
            categories=ISTIO,
            columns=[col("Mode", ".spec.mtls.mode")],
        ),
        crd(
            "security.istio.io",
            "RequestAuthentication",
            "requestauthentications",
            REQUEST_AUTHENTICATION,
            ["v1", "v1beta1"],
            short=["ra"],
            categories=ISTIO,
        ),
    ],
    "rbac.istio.io.yaml": [
        crd("rbac.istio.io", "ServiceRole", "serviceroles", SERVICE_ROLE, ["v1alpha1"], categories=["istio-io"]),
        crd(
            "rbac.istio.io",
            "ServiceRoleBinding",
            "servicerolebindings",
            SERVICE_ROLE_BINDING,
            ["v1alpha1"],
            categories=["istio-io"],
            columns=[col("Role", ".spec.roleRef.name")],
        ),
        crd(
            "rbac.istio.io",
            "ClusterRbacConfig",
            "clusterrbacconfigs",
            RBAC_CONFIG,
            ["v1alpha1"],
            scope="Cluster",
            categories=["istio-io"],
            columns=[col("Mode", ".spec.mode")],
        ),
        crd(
            "rbac.istio.io",
            "RbacConfig",
            "rbacconfigs",
            RBAC_CONFIG,
            ["v1alpha1"],
            categories=["istio-io"],
            columns=[col("Mode", ".spec.mode")],
        ),
    ],
    "authentication.istio.io.yaml": [
        crd("authentication.istio.io", "Policy", "policies", AUTHN_POLICY, ["v1alpha1"], categories=["istio-io"]),
        crd(
            "authentication.istio.io",
            "MeshPolicy",
            "meshpolicies",
            AUTHN_POLICY,
            ["v1alpha1"],
            scope="Cluster",
            categories=["istio-io"],
        ),
    ],
    "gateway.networking.k8s.io.yaml": [
        crd(
            "gateway.networking.k8s.io",
            "Gateway",
            "gateways",
            GATEWAY,
            ["v1", "v1beta1"],
            short=["gtw"],
            categories=["gateway-api"],
            columns=[col("Class", ".spec.gatewayClassName")],
        ),
    ],
}
HEADER = "# Generated by deploy/crds/generate.py; edit that file and run it, not this one.\n"


class _NoAliases(yaml.SafeDumper):
    """The schemas share dicts; written out, each must stand alone (no YAML anchors in a CRD)."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def render(docs: list[dict[str, Any]]) -> str:
    return HEADER + "---\n".join(yaml.dump(d, Dumper=_NoAliases, sort_keys=False, width=120) for d in docs)


def expected() -> dict[Path, str]:
    """Every file this script owns, with its content (the test compares them with the tree)."""
    out: dict[Path, str] = {}
    for name, docs in FILES.items():
        text = render(docs)
        out[HERE / name] = text
        out[HELM_CRDS / name] = text
    out[HERE / "kustomization.yaml"] = (
        HEADER
        + "# `kubectl create -k deploy/crds` creates only the absent CRDs (AlreadyExists for the others, which are\n"
        + "# left untouched); the overlays' crds component applies them all, for a fresh cluster.\n"
        + yaml.safe_dump(
            {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization", "resources": sorted(FILES)},
            sort_keys=False,
        )
    )
    return out


def main() -> int:
    for path, text in expected().items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(f"wrote {path.relative_to(HERE.parent.parent)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
