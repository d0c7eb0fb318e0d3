"""Table of AuthorizationPolicy/PeerAuthentication behaviours, each decided by the engine and by `authz check`.

Every field, its not* form, each match kind, scope, action, the L4 reduction, dry-run, deny-all, allow-all and
port-level mTLS. A case is (policies, connection, expected verdict, expected deciding policy or None).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
from test_policy_support import (
    BAR_CLIENT,
    BAR_CLIENT_IP,
    FOO_CLIENT,
    Conn,
    check_via_cli,
    decide,
    engine_of,
    policy,
)

ANY = object()  # don't care which policy decided


@dataclass
class Case:
    id: str
    policies: list[str]
    conn: Conn
    verdict: str
    policy: object = ANY
    root_namespace: str = "istio-system"


def allow(rule: dict, name: str = "p", **kw: object) -> str:
    return policy(name, {"action": "ALLOW", "rules": [rule]}, **kw)  # type: ignore[arg-type]


def deny(rule: dict, name: str = "d", **kw: object) -> str:
    return policy(name, {"action": "DENY", "rules": [rule]}, **kw)  # type: ignore[arg-type]


def src(**fields: object) -> dict:
    return {"from": [{"source": dict(fields)}]}


def op(**fields: object) -> dict:
    return {"to": [{"operation": dict(fields)}]}


def when(key: str, values: list[str] | None = None, not_values: list[str] | None = None) -> dict:
    cond: dict = {"key": key}
    if values is not None:
        cond["values"] = values
    if not_values is not None:
        cond["notValues"] = not_values
    return {"when": [cond]}


L7 = {"layer": "l7"}
PLAIN = {"source": None}
BAR = {"source": BAR_CLIENT, "source_ip": BAR_CLIENT_IP}

CASES = [
    # ---- no policy, allow-all, deny-all ------------------------------------------------------------
    Case("no-policy-allows", [], Conn(), "allow", None),
    Case("allow-all-rules-empty-rule", [policy("allow-all", {"action": "ALLOW", "rules": [{}]})], Conn(), "allow"),
    Case("allow-all-plaintext", [policy("allow-all", {"rules": [{}]})], Conn(**PLAIN), "allow", "foo/allow-all"),
    Case("deny-all-empty-spec", [policy("deny-all", {})], Conn(), "deny", "foo/deny-all"),
    Case("deny-all-empty-spec-l7", [policy("deny-all", {})], Conn(**L7), "deny", "foo/deny-all"),
    Case("allow-empty-rules-list-denies", [policy("p", {"action": "ALLOW", "rules": []})], Conn(), "deny", "foo/p"),
    Case("deny-without-rules-matches-nothing", [policy("d", {"action": "DENY"})], Conn(), "allow", None),
    # ---- principals: exact, prefix, suffix, presence, not ------------------------------------------
    Case("principals-exact", [allow(src(principals=["cluster.local/ns/foo/sa/client"]))], Conn(), "allow", "foo/p"),
    Case("principals-exact-miss", [allow(src(principals=["cluster.local/ns/foo/sa/client"]))], Conn(**BAR), "deny"),
    Case("principals-spiffe-prefix-written", [allow(src(principals=[FOO_CLIENT]))], Conn(), "allow", "foo/p"),
    Case("principals-prefix", [allow(src(principals=["cluster.local/ns/bar/*"]))], Conn(**BAR), "allow"),
    Case("principals-prefix-miss", [allow(src(principals=["cluster.local/ns/bar/*"]))], Conn(), "deny"),
    Case("principals-suffix", [allow(src(principals=["*/sa/client"]))], Conn(**BAR), "allow"),
    Case("principals-suffix-miss", [allow(src(principals=["*/sa/server"]))], Conn(**BAR), "deny"),
    Case("principals-presence-mtls", [allow(src(principals=["*"]))], Conn(), "allow"),
    Case("principals-presence-plaintext", [allow(src(principals=["*"]))], Conn(**PLAIN), "deny"),
    Case("notPrincipals-allow", [allow(src(notPrincipals=["cluster.local/ns/bar/sa/client"]))], Conn(), "allow"),
    Case("notPrincipals-excluded", [allow(src(notPrincipals=["cluster.local/ns/bar/*"]))], Conn(**BAR), "deny"),
    Case("deny-notPrincipals-star-plaintext", [deny(src(notPrincipals=["*"]))], Conn(**PLAIN), "deny", "foo/d"),
    Case("deny-notPrincipals-star-mtls", [deny(src(notPrincipals=["*"]))], Conn(), "allow", None),
    # ---- namespaces ------------------------------------------------------------------------------------
    Case("namespaces-exact", [allow(src(namespaces=["bar"]))], Conn(**BAR), "allow"),
    Case("namespaces-exact-miss", [allow(src(namespaces=["bar"]))], Conn(), "deny"),
    Case("namespaces-prefix", [allow(src(namespaces=["ba*"]))], Conn(**BAR), "allow"),
    Case("namespaces-suffix", [allow(src(namespaces=["*oo"]))], Conn(), "allow"),
    Case("namespaces-plaintext-has-none", [allow(src(namespaces=["*"]))], Conn(**PLAIN), "deny"),
    Case("notNamespaces", [allow(src(notNamespaces=["bar"]))], Conn(**BAR), "deny"),
    Case("notNamespaces-other", [allow(src(notNamespaces=["bar"]))], Conn(), "allow"),
    Case("deny-namespaces", [deny(src(namespaces=["bar"]))], Conn(**BAR), "deny", "foo/d"),
    # ---- serviceAccounts ----------------------------------------------------------------------------------
    Case("serviceAccounts", [allow(src(serviceAccounts=["bar/client"]))], Conn(**BAR), "allow"),
    Case("serviceAccounts-short-is-policy-ns", [allow(src(serviceAccounts=["client"]))], Conn(**BAR), "deny"),
    Case("notServiceAccounts", [allow(src(notServiceAccounts=["foo/client"]))], Conn(), "deny"),
    # ---- ipBlocks ------------------------------------------------------------------------------------------
    Case("ipBlocks-address", [allow(src(ipBlocks=["10.244.1.12"]))], Conn(), "allow"),
    Case("ipBlocks-cidr", [allow(src(ipBlocks=["10.244.2.0/24"]))], Conn(**BAR), "allow"),
    Case("ipBlocks-cidr-miss", [allow(src(ipBlocks=["10.244.2.0/24"]))], Conn(), "deny"),
    Case("ipBlocks-plaintext", [allow(src(ipBlocks=["10.244.0.0/16"]))], Conn(**PLAIN), "allow"),
    Case("notIpBlocks", [allow(src(notIpBlocks=["10.244.2.0/24"]))], Conn(**BAR), "deny"),
    Case("notIpBlocks-other", [allow(src(notIpBlocks=["10.244.2.0/24"]))], Conn(), "allow"),
    Case("ipBlocks-v6", [allow(src(ipBlocks=["fd00::/8"]))], Conn(source_ip="fd00::5"), "allow"),
    # ---- remoteIpBlocks (L7 attribute) -----------------------------------------------------------------
    Case("remoteIpBlocks-allow-dropped-at-l4", [allow(src(remoteIpBlocks=["10.244.0.0/16"]))], Conn(), "deny"),
    Case("remoteIpBlocks-allow-l7", [allow(src(remoteIpBlocks=["10.244.0.0/16"]))], Conn(**L7), "allow"),
    Case("notRemoteIpBlocks-deny-reduced-l4", [deny(src(notRemoteIpBlocks=["10.0.0.0/8"]))], Conn(), "deny"),
    Case("notRemoteIpBlocks-deny-l7", [deny(src(notRemoteIpBlocks=["10.0.0.0/8"]))], Conn(**L7), "allow"),
    # ---- requestPrincipals (L7) --------------------------------------------------------------------------
    Case("requestPrincipals-allow-l4-dropped", [allow(src(requestPrincipals=["*"]))], Conn(), "deny", "foo/p"),
    Case(
        "requestPrincipals-l7",
        [allow(src(requestPrincipals=["https://issuer/*"]))],
        Conn(layer="l7", request_principal="https://issuer/alice"),
        "allow",
    ),
    Case("requestPrincipals-l7-missing", [allow(src(requestPrincipals=["*"]))], Conn(**L7), "deny"),
    Case("notRequestPrincipals-deny-l4-reduced", [deny(src(notRequestPrincipals=["*"]))], Conn(), "deny", "foo/d"),
    Case("notRequestPrincipals-deny-l7-no-jwt", [deny(src(notRequestPrincipals=["*"]))], Conn(**L7), "deny"),
    Case(
        "notRequestPrincipals-deny-l7-jwt",
        [deny(src(notRequestPrincipals=["*"]))],
        Conn(layer="l7", request_principal="iss/sub"),
        "allow",
    ),
    # ---- ports --------------------------------------------------------------------------------------------
    Case("ports", [allow(op(ports=["8080"]))], Conn(), "allow"),
    Case("ports-int", [allow(op(ports=[8080]))], Conn(), "allow"),
    Case("ports-miss", [allow(op(ports=["8080"]))], Conn(port=9090), "deny"),
    Case("notPorts", [allow(op(notPorts=["8080"]))], Conn(), "deny"),
    Case("notPorts-other", [allow(op(notPorts=["8080"]))], Conn(port=9090), "allow"),
    Case("deny-ports", [deny(op(ports=["9090"]))], Conn(port=9090), "deny", "foo/d"),
    # ---- hosts (L7) -------------------------------------------------------------------------------------
    Case("hosts-l4-dropped", [allow(op(hosts=["server.foo"]))], Conn(), "deny"),
    Case("hosts-exact", [allow(op(hosts=["server.foo"]))], Conn(layer="l7", host="server.foo"), "allow"),
    Case("hosts-case-insensitive", [allow(op(hosts=["Server.Foo"]))], Conn(layer="l7", host="server.FOO"), "allow"),
    # Istio matches the Host value as sent: a host without a port does not match it with one (write `h:*`)
    Case("hosts-with-port-missed", [allow(op(hosts=["server.foo"]))], Conn(layer="l7", host="server.foo:8080"), "deny"),
    Case("hosts-any-port", [allow(op(hosts=["server.foo:*"]))], Conn(layer="l7", host="server.foo:8080"), "allow"),
    Case(
        "hosts-suffix",
        [allow(op(hosts=["*.foo.svc.cluster.local"]))],
        Conn(layer="l7", host="a.foo.svc.cluster.local"),
        "allow",
    ),
    Case("hosts-miss", [allow(op(hosts=["server.foo"]))], Conn(layer="l7", host="evil.foo"), "deny"),
    Case("notHosts", [allow(op(notHosts=["evil.*"]))], Conn(layer="l7", host="evil.com"), "deny"),
    # ---- methods (L7) -----------------------------------------------------------------------------------
    Case("methods-l4-dropped", [allow(op(methods=["GET"]))], Conn(), "deny", "foo/p"),
    Case("methods-l7", [allow(op(methods=["GET"]))], Conn(layer="l7", method="GET"), "allow"),
    Case("methods-l7-miss", [allow(op(methods=["GET"]))], Conn(layer="l7", method="POST"), "deny"),
    Case("notMethods-l7", [allow(op(notMethods=["DELETE"]))], Conn(layer="l7", method="DELETE"), "deny"),
    Case("deny-methods-l4-reduced-denies-all", [deny(op(methods=["DELETE"]))], Conn(), "deny", "foo/d"),
    Case("deny-methods-l7-other-method", [deny(op(methods=["DELETE"]))], Conn(layer="l7", method="GET"), "allow"),
    # ---- paths (L7) -------------------------------------------------------------------------------------
    Case("paths-exact", [allow(op(paths=["/hello"]))], Conn(layer="l7", path="/hello"), "allow"),
    Case("paths-query-ignored", [allow(op(paths=["/hello"]))], Conn(layer="l7", path="/hello?x=1"), "allow"),
    Case("paths-prefix", [allow(op(paths=["/api/*"]))], Conn(layer="l7", path="/api/v1/users"), "allow"),
    Case("paths-prefix-miss", [allow(op(paths=["/api/*"]))], Conn(layer="l7", path="/apix"), "deny"),
    Case("paths-suffix", [allow(op(paths=["*/hello"]))], Conn(layer="l7", path="/x/hello"), "allow"),
    Case("paths-presence", [allow(op(paths=["*"]))], Conn(layer="l7", path="/anything"), "allow"),
    Case(
        "paths-template-one-segment",
        [allow(op(paths=["/books/{*}/pages"]))],
        Conn(layer="l7", path="/books/7/pages"),
        "allow",
    ),
    Case(
        "paths-template-one-segment-miss",
        [allow(op(paths=["/books/{*}/pages"]))],
        Conn(layer="l7", path="/books/7/8/pages"),
        "deny",
    ),
    Case("paths-template-rest", [allow(op(paths=["/static/{**}"]))], Conn(layer="l7", path="/static/a/b.css"), "allow"),
    Case("notPaths", [allow(op(notPaths=["/private"]))], Conn(layer="l7", path="/private"), "deny"),
    Case("notPaths-other", [allow(op(notPaths=["/private"]))], Conn(layer="l7", path="/public"), "allow"),
    # ---- when ---------------------------------------------------------------------------------------------
    Case("when-source.ip", [allow(when("source.ip", ["10.244.1.0/24"]))], Conn(), "allow"),
    Case("when-source.ip-notValues", [allow(when("source.ip", not_values=["10.244.1.0/24"]))], Conn(), "deny"),
    Case("when-source.namespace", [allow(when("source.namespace", ["bar"]))], Conn(**BAR), "allow"),
    Case("when-source.namespace-miss", [allow(when("source.namespace", ["bar"]))], Conn(), "deny"),
    Case("when-source.principal", [allow(when("source.principal", ["cluster.local/ns/foo/*"]))], Conn(), "allow"),
    Case("when-destination.ip", [allow(when("destination.ip", ["10.244.1.10"]))], Conn(), "allow"),
    Case("when-destination.ip-miss", [allow(when("destination.ip", ["10.244.9.0/24"]))], Conn(), "deny"),
    Case("when-destination.port", [allow(when("destination.port", ["8080"]))], Conn(), "allow"),
    Case("when-destination.port-notValues", [allow(when("destination.port", not_values=["8080"]))], Conn(), "deny"),
    Case("when-header-l4-dropped", [allow(when("request.headers[x-user]", ["u1"]))], Conn(), "deny"),
    Case(
        "when-header-l7",
        [allow(when("request.headers[X-User]", ["u1"]))],
        Conn(layer="l7", headers={"x-user": "u1"}),
        "allow",
    ),
    Case(
        "when-header-l7-miss",
        [allow(when("request.headers[x-user]", ["u1"]))],
        Conn(layer="l7", headers={"x-user": "u2"}),
        "deny",
    ),
    Case(
        "when-header-notValues-absent", [allow(when("request.headers[x-user]", not_values=["u1"]))], Conn(**L7), "allow"
    ),
    Case(
        "when-claims-l7",
        [allow(when("request.auth.claims[group]", ["admin"]))],
        Conn(layer="l7", claims={"group": "admin"}),
        "allow",
    ),
    Case(
        "when-claims-l7-miss",
        [allow(when("request.auth.claims[group]", ["admin"]))],
        Conn(layer="l7", claims={"group": "dev"}),
        "deny",
    ),
    Case(
        "when-request.auth.principal",
        [allow(when("request.auth.principal", ["iss/sub"]))],
        Conn(layer="l7", request_principal="iss/sub"),
        "allow",
    ),
    Case("when-remote.ip-l7", [allow(when("remote.ip", ["10.244.1.12"]))], Conn(**L7), "allow"),
    Case("when-remote.ip-l4-dropped", [allow(when("remote.ip", ["10.244.1.12"]))], Conn(), "deny"),
    Case("when-deny-header-reduced-l4", [deny(when("request.headers[x-evil]", ["1"]))], Conn(), "deny", "foo/d"),
    Case("when-connection.sni-l7-absent", [allow(when("connection.sni", ["*"]))], Conn(**L7), "deny"),
    # ---- combining ------------------------------------------------------------------------------------------
    Case(
        "entry-fields-all-must-pass",
        [allow({"from": [{"source": {"namespaces": ["foo"], "ipBlocks": ["10.244.2.0/24"]}}]})],
        Conn(),
        "deny",
    ),
    Case(
        "from-entries-any",
        [allow({"from": [{"source": {"namespaces": ["bar"]}}, {"source": {"ipBlocks": ["10.244.1.0/24"]}}]})],
        Conn(),
        "allow",
    ),
    Case("rule-parts-all", [allow({**src(namespaces=["foo"]), **op(ports=["9090"])})], Conn(), "deny"),
    Case(
        "rules-any",
        [policy("p", {"rules": [src(namespaces=["bar"]), op(ports=["8080"])]})],
        Conn(),
        "allow",
        "foo/p",
    ),
    Case(
        "deny-reduced-to-l4-part-port-matches",
        [deny({**op(ports=["8080"], methods=["DELETE"])})],
        Conn(port=8080),
        "deny",
        "foo/d",
    ),
    Case(
        "deny-reduced-to-l4-part-port-differs",
        [deny({**op(ports=["8080"], methods=["DELETE"])})],
        Conn(port=9090),
        "allow",
        None,
    ),
    Case(
        "allow-with-l7-rule-and-l4-rule",
        [policy("p", {"rules": [op(methods=["GET"]), src(namespaces=["foo"])]})],
        Conn(),
        "allow",
        "foo/p",
    ),
    # ---- actions ------------------------------------------------------------------------------------------
    Case("deny-beats-allow", [allow({}, "a"), deny(src(namespaces=["foo"]), "d")], Conn(), "deny", "foo/d"),
    Case(
        "allow-any-of-policies",
        [allow(src(namespaces=["bar"]), "a1"), allow(src(namespaces=["foo"]), "a2")],
        Conn(),
        "allow",
        "foo/a2",
    ),
    Case("audit-does-not-decide", [policy("audit", {"action": "AUDIT", "rules": [{}]})], Conn(), "allow", None),
    Case(
        "audit-does-not-make-allow-apply",
        [policy("audit", {"action": "AUDIT", "rules": [{}]}), deny(src(namespaces=["bar"]))],
        Conn(),
        "allow",
        None,
    ),
    Case(
        "custom-not-enforced-at-l4",
        [policy("ext", {"action": "CUSTOM", "provider": {"name": "authz"}, "rules": [{}]})],
        Conn(),
        "allow",
        None,
    ),
    # ---- dry-run --------------------------------------------------------------------------------------
    Case(
        "dry-run-deny-only-logs",
        [policy("d", {"action": "DENY", "rules": [{}]}, annotations={"istio.io/dry-run": "true"})],
        Conn(),
        "allow",
        None,
    ),
    Case(
        "dry-run-allow-does-not-apply",
        [policy("p", {"rules": [src(namespaces=["bar"])]}, annotations={"istio.io/dry-run": "true"})],
        Conn(),
        "allow",
        None,
    ),
    Case(
        "dry-run-false-enforced",
        [policy("d", {"action": "DENY", "rules": [{}]}, annotations={"istio.io/dry-run": "false"})],
        Conn(),
        "deny",
        "foo/d",
    ),
    # ---- scope -------------------------------------------------------------------------------------------
    Case("selector-selects", [policy("p", {"selector": {"matchLabels": {"app": "server"}}})], Conn(), "deny", "foo/p"),
    Case(
        "selector-other-workload-unaffected",
        [policy("p", {"selector": {"matchLabels": {"app": "server"}}})],
        Conn(dest="foo/other"),
        "allow",
        None,
    ),
    Case(
        "selector-all-labels-must-match",
        [policy("p", {"selector": {"matchLabels": {"app": "server", "version": "v2"}}})],
        Conn(),
        "allow",
        None,
    ),
    Case("namespace-scope-other-namespace", [policy("deny-all", {})], Conn(dest="bar/server"), "allow", None),
    Case("namespace-scope", [policy("deny-all", {})], Conn(dest="foo/other"), "deny", "foo/deny-all"),
    Case(
        "mesh-scope-root",
        [policy("deny-all", {}, namespace="istio-system")],
        Conn(dest="bar/server"),
        "deny",
        "istio-system/deny-all",
    ),
    Case(
        "mesh-scope-root-selector-any-namespace",
        [policy("p", {"selector": {"matchLabels": {"app": "server"}}}, namespace="istio-system")],
        Conn(dest="bar/server"),
        "deny",
    ),
    Case(
        "mesh-scope-custom-root",
        [policy("deny-all", {}, namespace="mesh-root")],
        Conn(dest="bar/server"),
        "deny",
        "mesh-root/deny-all",
        root_namespace="mesh-root",
    ),
    Case(
        "custom-root-makes-istio-system-ordinary",
        [policy("deny-all", {}, namespace="istio-system")],
        Conn(dest="bar/server"),
        "allow",
        None,
        root_namespace="mesh-root",
    ),
    Case(
        "mesh-allow-plus-namespace-allow-union",
        [allow(src(namespaces=["bar"]), "mesh", namespace="istio-system"), allow(src(namespaces=["foo"]), "ns")],
        Conn(**BAR),
        "allow",
        "istio-system/mesh",
    ),
    # ---- PeerAuthentication -----------------------------------------------------------------------------
    Case("pa-default-permissive-plaintext", [], Conn(**PLAIN), "allow", None),
    Case(
        "pa-strict-refuses-plaintext",
        [policy("default", {"mtls": {"mode": "STRICT"}}, kind="PeerAuthentication")],
        Conn(**PLAIN),
        "deny",
        "foo/default",
    ),
    Case(
        "pa-strict-mtls-ok",
        [policy("default", {"mtls": {"mode": "STRICT"}}, kind="PeerAuthentication")],
        Conn(),
        "allow",
        None,
    ),
    Case(
        "pa-mesh-strict",
        [policy("default", {"mtls": {"mode": "STRICT"}}, kind="PeerAuthentication", namespace="istio-system")],
        Conn(**PLAIN, dest="bar/server"),
        "deny",
        "istio-system/default",
    ),
    Case(
        "pa-namespace-beats-mesh",
        [
            policy("default", {"mtls": {"mode": "STRICT"}}, kind="PeerAuthentication", namespace="istio-system"),
            policy("default", {"mtls": {"mode": "PERMISSIVE"}}, kind="PeerAuthentication"),
        ],
        Conn(**PLAIN),
        "allow",
    ),
    Case(
        "pa-unset-inherits-mesh",
        [
            policy("default", {"mtls": {"mode": "STRICT"}}, kind="PeerAuthentication", namespace="istio-system"),
            policy("default", {"mtls": {"mode": "UNSET"}}, kind="PeerAuthentication"),
        ],
        Conn(**PLAIN),
        "deny",
        "istio-system/default",
    ),
    Case(
        "pa-selector-beats-namespace",
        [
            policy("default", {"mtls": {"mode": "STRICT"}}, kind="PeerAuthentication"),
            policy(
                "srv",
                {"selector": {"matchLabels": {"app": "server"}}, "mtls": {"mode": "DISABLE"}},
                kind="PeerAuthentication",
            ),
        ],
        Conn(**PLAIN),
        "allow",
    ),
    Case(
        "pa-port-level-permissive",
        [
            policy(
                "srv",
                {
                    "selector": {"matchLabels": {"app": "server"}},
                    "mtls": {"mode": "STRICT"},
                    "portLevelMtls": {8080: {"mode": "PERMISSIVE"}},
                },
                kind="PeerAuthentication",
            )
        ],
        Conn(**PLAIN, port=8080),
        "allow",
    ),
    Case(
        "pa-port-level-other-port-strict",
        [
            policy(
                "srv",
                {
                    "selector": {"matchLabels": {"app": "server"}},
                    "mtls": {"mode": "STRICT"},
                    "portLevelMtls": {8080: {"mode": "PERMISSIVE"}},
                },
                kind="PeerAuthentication",
            )
        ],
        Conn(**PLAIN, port=9090),
        "deny",
        "foo/srv",
    ),
    Case(
        "pa-port-level-strict-over-permissive",
        [
            policy(
                "srv",
                {"selector": {"matchLabels": {"app": "server"}}, "portLevelMtls": {"9090": {"mode": "STRICT"}}},
                kind="PeerAuthentication",
            )
        ],
        Conn(**PLAIN, port=9090),
        "deny",
        "foo/srv",
    ),
    Case(
        "pa-strict-then-authz-for-mtls",
        [
            policy("default", {"mtls": {"mode": "STRICT"}}, kind="PeerAuthentication"),
            allow(src(namespaces=["bar"])),
        ],
        Conn(),
        "deny",
        "foo/p",
    ),
]


def r7(**kw: object) -> Conn:
    """An HTTP request at the waypoint (l7) from foo/client (10.244.1.12) to foo/server:8080."""
    return Conn(layer="l7", **kw)  # type: ignore[arg-type]


JWT = {"iss": "https://issuer.example", "sub": "alice"}
CUSTOM = {"action": "CUSTOM", "provider": {"name": "ext-authz"}}

# The L7 table: what a waypoint decides (engine.check_l7 and `authz check --layer l7`, one engine). Istio's
# documented semantics for every L7 field, `when` key and not* form; a case is (policies, request, verdict).
L7_CASES = [
    # ---- methods: exact, case-sensitive, prefix, not ----------------------------------------------------
    Case("l7-methods-exact", [allow(op(methods=["GET", "HEAD"]))], r7(method="HEAD"), "allow", "foo/p"),
    Case("l7-methods-case-sensitive", [allow(op(methods=["GET"]))], r7(method="get"), "deny", "foo/p"),
    Case("l7-methods-prefix", [allow(op(methods=["P*"]))], r7(method="PATCH"), "allow"),
    Case("l7-notMethods-other", [allow(op(notMethods=["DELETE"]))], r7(method="GET"), "allow"),
    Case("l7-deny-methods", [deny(op(methods=["DELETE"]))], r7(method="DELETE"), "deny", "foo/d"),
    # ---- paths: exact, prefix*, *suffix, *, not, query, dot segments, case --------------------------------
    Case("l7-paths-exact", [allow(op(paths=["/hello"]))], r7(path="/hello"), "allow"),
    Case("l7-paths-case-sensitive", [allow(op(paths=["/hello"]))], r7(path="/Hello"), "deny"),
    Case("l7-paths-exact-not-prefix", [allow(op(paths=["/hello"]))], r7(path="/hello/x"), "deny"),
    Case("l7-paths-prefix", [allow(op(paths=["/api/*"]))], r7(path="/api/v1?q=1"), "allow"),
    Case("l7-paths-prefix-is-not-segment", [allow(op(paths=["/api*"]))], r7(path="/apix"), "allow"),
    Case("l7-paths-suffix-greeter", [allow(op(methods=["GET"], paths=["*/hello"]))], r7(path="/v2/hello"), "allow"),
    Case("l7-paths-suffix-miss", [allow(op(paths=["*/hello"]))], r7(path="/hello/x"), "deny"),
    Case("l7-paths-presence", [allow(op(paths=["*"]))], r7(path="/"), "allow"),
    Case("l7-paths-query-not-matched", [allow(op(paths=["*x=1"]))], r7(path="/a?x=1"), "deny"),
    Case("l7-notPaths-prefix", [allow(op(notPaths=["/admin/*"]))], r7(path="/admin/users"), "deny"),
    Case("l7-notPaths-other", [allow(op(notPaths=["/admin/*"]))], r7(path="/public"), "allow"),
    Case("l7-paths-dot-segments-deny", [deny(op(paths=["/admin/*"]))], r7(path="/public/../admin/x"), "deny", "foo/d"),
    Case("l7-paths-dot-segments-allow", [allow(op(paths=["/public/*"]))], r7(path="/public/../admin"), "deny"),
    Case("l7-paths-single-dot", [allow(op(paths=["/a/b"]))], r7(path="/a/./b"), "allow"),
    # the waypoint's normalization (Istio's, MERGE_SLASHES): `authz check` answers what the waypoint does
    Case("l7-paths-encoded-dots", [allow(op(paths=["/public/*"]))], r7(path="/public/%2e%2E/admin"), "deny"),
    Case("l7-paths-encoded-letter", [deny(op(paths=["/admin*"]))], r7(path="/%61dmin"), "deny", "foo/d"),
    Case("l7-paths-backslash", [deny(op(paths=["/admin*"]))], r7(path="/x\\..\\admin"), "deny", "foo/d"),
    Case("l7-paths-double-slash", [deny(op(paths=["/admin*"]))], r7(path="//admin"), "deny", "foo/d"),
    Case("l7-paths-encoded-slash-kept", [allow(op(paths=["/public/*"]))], r7(path="/public/..%2Fadmin"), "allow"),
    Case("l7-paths-no-double-decoding", [deny(op(paths=["/admin*"]))], r7(path="/%2561dmin"), "allow"),
    Case("l7-paths-escape-case", [deny(op(paths=["/a%2Fb"]))], r7(path="/a%2fb"), "deny", "foo/d"),
    # ---- hosts: case-insensitive, port as sent, prefix/suffix, not, Host header ----------------------------
    Case(
        "l7-hosts-exact",
        [allow(op(hosts=["server.foo.svc.cluster.local"]))],
        r7(host="server.foo.svc.cluster.local"),
        "allow",
    ),
    Case("l7-hosts-upper", [allow(op(hosts=["server.foo"]))], r7(host="SERVER.Foo"), "allow"),
    Case("l7-hosts-port-missed", [allow(op(hosts=["server.foo"]))], r7(host="server.foo:80"), "deny"),
    Case("l7-hosts-port-prefix", [allow(op(hosts=["server.foo", "server.foo:*"]))], r7(host="server.foo:80"), "allow"),
    Case(
        "l7-hosts-suffix",
        [allow(op(hosts=["*.foo.svc.cluster.local"]))],
        r7(host="x.foo.svc.cluster.local"),
        "allow",
    ),
    Case("l7-hosts-prefix", [allow(op(hosts=["server.*"]))], r7(host="server.bar"), "allow"),
    Case("l7-notHosts", [allow(op(notHosts=["*.evil.com"]))], r7(host="a.EVIL.com"), "deny"),
    Case("l7-hosts-from-host-header", [allow(op(hosts=["server.foo"]))], r7(headers={"Host": "server.foo"}), "allow"),
    Case("l7-hosts-absent", [allow(op(hosts=["*"]))], r7(), "deny"),
    # ---- ports and combinations --------------------------------------------------------------------------
    Case("l7-ports-and-methods", [allow(op(ports=["8080"], methods=["GET"]))], r7(port=8080), "allow"),
    Case("l7-ports-and-methods-port-miss", [allow(op(ports=["9090"], methods=["GET"]))], r7(port=8080), "deny"),
    Case("l7-notPorts", [allow(op(notPorts=["8080"]))], r7(), "deny"),
    Case("l7-entry-all-fields", [allow(op(methods=["GET"], notPaths=["/admin*"]))], r7(path="/admin"), "deny"),
    Case(
        "l7-to-entries-any",
        [allow({"to": [{"operation": {"methods": ["POST"]}}, {"operation": {"paths": ["/ok"]}}]})],
        r7(path="/ok"),
        "allow",
    ),
    Case("l7-rule-from-and-to", [allow({**src(namespaces=["foo"]), **op(methods=["GET"])})], r7(), "allow"),
    Case("l7-rule-from-and-to-miss", [allow({**src(namespaces=["bar"]), **op(methods=["GET"])})], r7(), "deny"),
    # ---- request.headers[...] -------------------------------------------------------------------------------
    Case(
        "l7-header-name-any-case",
        [allow(when("request.headers[X-User]", ["u1"]))],
        r7(headers={"X-USER": "u1"}),
        "allow",
    ),
    Case(
        "l7-header-value-case-sensitive",
        [allow(when("request.headers[x-user]", ["u1"]))],
        r7(headers={"x-user": "U1"}),
        "deny",
    ),
    Case(
        "l7-header-prefix",
        [allow(when("request.headers[user-agent]", ["curl/*"]))],
        r7(headers={"User-Agent": "curl/8.5"}),
        "allow",
    ),
    Case("l7-header-presence", [allow(when("request.headers[x-token]", ["*"]))], r7(headers={"x-token": "t"}), "allow"),
    Case("l7-header-presence-absent", [allow(when("request.headers[x-token]", ["*"]))], r7(), "deny"),
    Case(
        "l7-header-notValues",
        [allow(when("request.headers[x-user]", not_values=["eve"]))],
        r7(headers={"x-user": "eve"}),
        "deny",
    ),
    Case(
        "l7-deny-header",
        [deny(when("request.headers[x-debug]", ["*"]))],
        r7(headers={"X-Debug": "1"}),
        "deny",
        "foo/d",
    ),
    # ---- requestPrincipals and request.auth.* ------------------------------------------------------------------
    Case(
        "l7-requestPrincipals-from-jwt",
        [allow(src(requestPrincipals=["https://issuer.example/alice"]))],
        r7(claims=JWT),
        "allow",
    ),
    Case("l7-requestPrincipals-suffix", [allow(src(requestPrincipals=["*/alice"]))], r7(claims=JWT), "allow"),
    Case("l7-requestPrincipals-presence-no-jwt", [allow(src(requestPrincipals=["*"]))], r7(), "deny"),
    Case("l7-notRequestPrincipals", [allow(src(notRequestPrincipals=["*/alice"]))], r7(claims=JWT), "deny"),
    Case("l7-deny-no-jwt", [deny(src(notRequestPrincipals=["*"]))], r7(), "deny", "foo/d"),
    Case(
        "l7-auth-principal",
        [allow(when("request.auth.principal", ["https://issuer.example/*"]))],
        r7(claims=JWT),
        "allow",
    ),
    Case(
        "l7-auth-audiences-list",
        [allow(when("request.auth.audiences", ["b"]))],
        r7(claims={**JWT, "aud": ["a", "b"]}),
        "allow",
    ),
    Case(
        "l7-auth-audiences-string",
        [allow(when("request.auth.audiences", ["api.*"]))],
        r7(claims={**JWT, "aud": "api.x"}),
        "allow",
    ),
    Case("l7-auth-audiences-none", [allow(when("request.auth.audiences", ["*"]))], r7(claims=JWT), "deny"),
    Case(
        "l7-auth-audiences-notValues",
        [allow(when("request.auth.audiences", not_values=["b"]))],
        r7(claims={**JWT, "aud": ["a", "b"]}),
        "deny",
    ),
    Case(
        "l7-auth-presenter",
        [allow(when("request.auth.presenter", ["web-app"]))],
        r7(claims={**JWT, "azp": "web-app"}),
        "allow",
    ),
    Case(
        "l7-auth-presenter-miss",
        [allow(when("request.auth.presenter", ["web-app"]))],
        r7(claims={**JWT, "azp": "cli"}),
        "deny",
    ),
    Case(
        "l7-claims-string",
        [allow(when("request.auth.claims[group]", ["admin"]))],
        r7(claims={**JWT, "group": "admin"}),
        "allow",
    ),
    Case(
        "l7-claims-list",
        [allow(when("request.auth.claims[groups]", ["admin"]))],
        r7(claims={**JWT, "groups": ["dev", "admin"]}),
        "allow",
    ),
    Case(
        "l7-claims-list-miss",
        [allow(when("request.auth.claims[groups]", ["admin"]))],
        r7(claims={**JWT, "groups": ["dev"]}),
        "deny",
    ),
    Case(
        "l7-claims-nested-list",
        [allow(when("request.auth.claims[realm_access][roles]", ["admin"]))],
        r7(claims={**JWT, "realm_access": {"roles": ["user", "admin"]}}),
        "allow",
    ),
    Case(
        "l7-claims-nested-miss",
        [allow(when("request.auth.claims[realm_access][roles]", ["admin"]))],
        r7(claims={**JWT, "realm_access": ["admin"]}),
        "deny",
    ),
    Case(
        "l7-claims-number-never-matches",
        [allow(when("request.auth.claims[level]", ["3"]))],
        r7(claims={**JWT, "level": 3}),
        "deny",
    ),
    Case(
        "l7-claims-bool",
        [allow(when("request.auth.claims[admin]", ["true"]))],
        r7(claims={**JWT, "admin": True}),
        "allow",
    ),
    Case(
        "l7-claims-notValues-absent",
        [allow(when("request.auth.claims[group]", not_values=["x"]))],
        r7(claims=JWT),
        "allow",
    ),
    # ---- remoteIpBlocks / remote.ip: X-Forwarded-For with trusted hops ---------------------------------------
    Case(
        "l7-remote-untrusted-xff-ignored",
        [allow(src(remoteIpBlocks=["1.2.3.4"]))],
        r7(forwarded_for="1.2.3.4"),
        "deny",
    ),
    Case(
        "l7-remote-is-peer-without-hops",
        [allow(src(remoteIpBlocks=["10.244.1.12"]))],
        r7(forwarded_for="1.2.3.4"),
        "allow",
    ),
    Case(
        "l7-remote-one-hop-rightmost",
        [allow(src(remoteIpBlocks=["203.0.113.0/24"]))],
        r7(forwarded_for="1.2.3.4, 203.0.113.7", trusted_hops=1),
        "allow",
    ),
    Case(
        "l7-remote-one-hop-spoof-left-ignored",
        [allow(src(remoteIpBlocks=["1.2.3.4"]))],
        r7(forwarded_for="1.2.3.4, 203.0.113.7", trusted_hops=1),
        "deny",
    ),
    Case(
        "l7-remote-two-hops",
        [allow(src(remoteIpBlocks=["1.2.3.4"]))],
        r7(forwarded_for="1.2.3.4, 203.0.113.7", trusted_hops=2),
        "allow",
    ),
    Case(
        "l7-remote-short-chain-falls-back-to-peer",
        [allow(src(remoteIpBlocks=["10.244.1.12"]))],
        r7(forwarded_for="203.0.113.7", trusted_hops=2),
        "allow",
    ),
    Case(
        "l7-remote-from-header",
        [allow(when("remote.ip", ["198.51.100.0/24"]))],
        r7(headers={"X-Forwarded-For": "198.51.100.9"}, trusted_hops=1),
        "allow",
    ),
    Case(
        "l7-notRemoteIpBlocks-deny",
        [deny(src(notRemoteIpBlocks=["203.0.113.0/24"]))],
        r7(forwarded_for="198.51.100.9", trusted_hops=1),
        "deny",
        "foo/d",
    ),
    Case(
        "l7-ipBlocks-stay-the-peer",
        [allow(src(ipBlocks=["198.51.100.9"]))],
        r7(forwarded_for="198.51.100.9", trusted_hops=1),
        "deny",
    ),
    # ---- source.*, destination.*, connection.sni at the waypoint ---------------------------------------------
    Case("l7-source-principal", [allow(when("source.principal", ["cluster.local/ns/foo/sa/client"]))], r7(), "allow"),
    Case("l7-source-namespace-notValues", [allow(when("source.namespace", not_values=["foo"]))], r7(), "deny"),
    Case("l7-source-ip", [allow(when("source.ip", ["10.244.1.0/24"]))], r7(), "allow"),
    Case("l7-destination-ip", [allow(when("destination.ip", ["10.244.1.10"]))], r7(), "allow"),
    Case("l7-destination-port", [allow(when("destination.port", ["9090"]))], r7(), "deny"),
    Case(
        "l7-sni",
        [allow(when("connection.sni", ["*.foo.svc.cluster.local"]))],
        r7(sni="server.foo.svc.cluster.local"),
        "allow",
    ),
    Case("l7-sni-notValues", [allow(when("connection.sni", not_values=["evil"]))], r7(sni="evil"), "deny"),
    # ---- order CUSTOM -> DENY -> ALLOW, dry-run, AUDIT, allow-all, deny-all ------------------------------------
    Case(
        "l7-deny-beats-allow",
        [allow(op(paths=["*"]), "a"), deny(op(paths=["/admin*"]), "d")],
        r7(path="/admin"),
        "deny",
        "foo/d",
    ),
    Case(
        "l7-allow-any-policy",
        [allow(op(paths=["/x"]), "a1"), allow(op(methods=["GET"]), "a2")],
        r7(),
        "allow",
        "foo/a2",
    ),
    Case(
        "l7-custom-alone-leaves-allow",
        [policy("ext", {**CUSTOM, "rules": [op(paths=["/book"])]})],
        r7(path="/book"),
        "allow",
        None,
    ),
    Case(
        "l7-custom-then-deny",
        [policy("ext", {**CUSTOM, "rules": [{}]}), deny(op(methods=["POST"]))],
        r7(method="POST"),
        "deny",
        "foo/d",
    ),
    Case(
        "l7-dry-run-deny-logs-only",
        [policy("d", {"action": "DENY", "rules": [op(paths=["/x"])]}, annotations={"istio.io/dry-run": "true"})],
        r7(path="/x"),
        "allow",
        None,
    ),
    Case(
        "l7-audit-does-not-decide",
        [policy("au", {"action": "AUDIT", "rules": [op(paths=["*"])]})],
        r7(),
        "allow",
        None,
    ),
    Case("l7-allow-all", [policy("all", {"rules": [{}]})], r7(method="DELETE", path="/anything"), "allow", "foo/all"),
    Case("l7-deny-all", [policy("none", {})], r7(), "deny", "foo/none"),
    Case("l7-no-policy", [], r7(method="DELETE"), "allow", None),
]


@pytest.mark.parametrize("case", CASES + L7_CASES, ids=[c.id for c in CASES + L7_CASES])
def test_engine(case: Case) -> None:
    engine, config = engine_of(*case.policies, root_namespace=case.root_namespace)
    assert engine.errors == []
    d = decide(engine, config, case.conn)
    assert d.verdict == case.verdict, d.reason
    if case.policy is not ANY:
        assert d.policy == case.policy, d.reason
    assert d.reason


_BASE = {"decision", "policy", "reason"}


@pytest.mark.parametrize("case", CASES + L7_CASES, ids=[c.id for c in CASES + L7_CASES])
def test_authz_check_cli(case: Case, tmp_path: Path) -> None:
    rc, out = check_via_cli(tmp_path, case.policies, case.conn, case.root_namespace)
    assert out["decision"] == case.verdict, out
    assert rc == (0 if case.verdict == "allow" else 1)
    assert _BASE <= set(out) <= {*_BASE, "dry_run", "audit_policies", "custom_policies", "custom_providers"}
    if case.policy is not ANY:
        assert out["policy"] == case.policy, out


def test_case_ids_unique() -> None:
    assert len({c.id for c in CASES + L7_CASES}) == len(CASES + L7_CASES)
    assert all(c.conn.layer == "l7" for c in L7_CASES)
