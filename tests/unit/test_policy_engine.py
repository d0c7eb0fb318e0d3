"""The engine API the proxy and waypoint use: decisions' extra fields, peer modes, caching, reuse, matchers."""

from __future__ import annotations

import dataclasses

import pytest
from test_policy_support import BAR_CLIENT, FOO_CLIENT, Conn, decide, engine_of, policy

from ztunnel.config.model import Workload
from ztunnel.policy.decision import ConnectionAttributes, Decision, HttpRequestAttributes
from ztunnel.policy.engine import PolicyEngine
from ztunnel.policy.matchers import CidrSet, StringSet, parse_cidr, parse_ip, parse_port


def test_decision_is_frozen() -> None:
    d = Decision(True, None, "x")
    with pytest.raises(dataclasses.FrozenInstanceError):
        d.allowed = False  # type: ignore[misc]
    assert d.dry_run_policies == ()


def test_source_namespace_derived_from_principal_or_given() -> None:
    engine, config = engine_of(policy("p", {"rules": [{"from": [{"source": {"namespaces": ["bar"]}}]}]}))
    w = config.workload("foo", "server")
    assert w is not None
    assert engine.check_l4(ConnectionAttributes(BAR_CLIENT, "10.244.2.10", w, "10.244.1.10", 8080)).allowed
    given = ConnectionAttributes(FOO_CLIENT, "10.244.2.10", w, "10.244.1.10", 8080, source_namespace="bar")
    assert engine.check_l4(given).allowed


def test_dry_run_fields() -> None:
    dry = policy(
        "d",
        {"action": "DENY", "rules": [{"from": [{"source": {"namespaces": ["foo"]}}]}]},
        annotations={"istio.io/dry-run": "true"},
    )
    engine, config = engine_of(dry)
    d = decide(engine, config, Conn())
    assert d.allowed and d.dry_run_policies == ("foo/d",) and d.dry_run_allowed is False
    d = decide(engine, config, Conn(source=BAR_CLIENT))
    assert d.allowed and d.dry_run_policies == () and d.dry_run_allowed is True


def test_dry_run_allow_shadow_decision() -> None:
    dry = policy(
        "a", {"rules": [{"from": [{"source": {"namespaces": ["bar"]}}]}]}, annotations={"istio.io/dry-run": "true"}
    )
    engine, config = engine_of(dry)
    d = decide(engine, config, Conn())
    assert d.allowed and d.dry_run_allowed is False  # would be denied once enforced
    assert decide(engine, config, Conn(source=BAR_CLIENT)).dry_run_policies == ("foo/a",)


def test_audit_and_custom_are_reported() -> None:
    audit = policy("audit", {"action": "AUDIT", "rules": [{"to": [{"operation": {"ports": ["8080"]}}]}]})
    custom = policy(
        "ext",
        {"action": "CUSTOM", "provider": {"name": "opa"}, "rules": [{"to": [{"operation": {"paths": ["/admin/*"]}}]}]},
    )
    engine, config = engine_of(audit, custom)
    assert decide(engine, config, Conn()).audit_policies == ("foo/audit",)
    assert decide(engine, config, Conn(port=9090)).audit_policies == ()
    l4 = decide(engine, config, Conn())
    assert l4.custom_policies == () and l4.allowed
    l7 = decide(engine, config, Conn(layer="l7", path="/admin/x"))
    assert l7.custom_policies == ("foo/ext",) and l7.allowed
    assert decide(engine, config, Conn(layer="l7", path="/public")).custom_policies == ()
    assert any("CUSTOM" in w for w in engine.warnings)


def test_invalid_custom_denies_only_at_l7() -> None:
    engine, config = engine_of(policy("ext", {"action": "CUSTOM", "rules": [{}]}))
    assert engine.errors
    assert decide(engine, config, Conn()).allowed
    assert not decide(engine, config, Conn(layer="l7")).allowed


def test_target_refs_not_enforced_at_l4_but_at_l7() -> None:
    p = policy(
        "p",
        {
            "targetRefs": [{"kind": "Service", "group": "", "name": "server"}],
            "rules": [{"to": [{"operation": {"methods": ["GET"]}}]}],
        },
    )
    engine, config = engine_of(p)
    assert engine.errors == []
    assert decide(engine, config, Conn()).allowed
    assert decide(engine, config, Conn(layer="l7", method="GET")).allowed
    assert not decide(engine, config, Conn(layer="l7", method="POST")).allowed


def test_peer_authentication_mode_api() -> None:
    engine, config = engine_of(
        policy("default", {"mtls": {"mode": "STRICT"}}, kind="PeerAuthentication", namespace="istio-system"),
        policy("default", {"mtls": {"mode": "DISABLE"}}, kind="PeerAuthentication", namespace="bar"),
        policy(
            "srv",
            {
                "selector": {"matchLabels": {"app": "server"}},
                "mtls": {"mode": "UNSET"},
                "portLevelMtls": {"8080": {"mode": "PERMISSIVE"}},
            },
            kind="PeerAuthentication",
        ),
    )
    foo_server, foo_other = config.workload("foo", "server"), config.workload("foo", "other")
    bar_server = config.workload("bar", "server")
    assert foo_server and foo_other and bar_server
    assert engine.peer_authentication_mode(foo_server, 8080) == "PERMISSIVE"
    assert engine.peer_authentication_mode(foo_server, 9090) == "STRICT"  # UNSET -> namespace (none) -> mesh
    assert engine.peer_authentication_mode(foo_other, 8080) == "STRICT"
    assert engine.peer_authentication_mode(bar_server, 8080) == "DISABLE"
    assert engine.peer_authentication_for(foo_server, 9090) == ("STRICT", "istio-system/default")
    empty, _ = engine_of()
    assert empty.peer_authentication_mode(bar_server, 1) == "PERMISSIVE"


def test_oldest_workload_peer_authentication_wins() -> None:
    newer = policy(
        "b",
        {"selector": {"matchLabels": {"app": "server"}}, "mtls": {"mode": "DISABLE"}},
        kind="PeerAuthentication",
        creationTimestamp="2024-02-01T00:00:00Z",
    )
    older = policy(
        "a",
        {"selector": {"matchLabels": {"app": "server"}}, "mtls": {"mode": "STRICT"}},
        kind="PeerAuthentication",
        creationTimestamp="2024-01-01T00:00:00Z",
    )
    engine, config = engine_of(newer, older)
    w = config.workload("foo", "server")
    assert w and engine.peer_authentication_mode(w, 80) == "STRICT"


def test_cache_follows_label_changes() -> None:
    engine, config = engine_of(policy("p", {"selector": {"matchLabels": {"app": "server"}}}))
    w = config.workload("foo", "server")
    assert w is not None
    attrs = ConnectionAttributes(FOO_CLIENT, "10.244.1.12", w, "10.244.1.10", 8080)
    assert not engine.check_l4(attrs).allowed
    relabelled = dataclasses.replace(w, labels={"app": "renamed"})
    assert engine.check_l4(dataclasses.replace(attrs, destination=relabelled)).allowed


def test_engine_reuses_unchanged_policies_from_previous() -> None:
    p1 = policy("p", {"rules": [{"from": [{"source": {"namespaces": ["foo"]}}]}]})
    p2 = policy("q", {"selector": {"matchLabels": {"app": "other"}}})
    engine, config = engine_of(p1, p2)
    again = PolicyEngine.from_config(config, previous=engine)
    by_name = {p.name: p for p in engine.policies}
    assert all(p is by_name[p.name] for p in again.policies)
    _, config2 = engine_of(p1.replace('["foo"]', '["bar"]').replace("- foo", "- bar"), p2)
    rebuilt = PolicyEngine.from_config(config2, previous=engine)
    assert not decide(rebuilt, config2, Conn()).allowed
    assert decide(rebuilt, config2, Conn(source=BAR_CLIENT, source_ip="10.244.2.10")).allowed


def test_reuse_keeps_errors() -> None:
    bad = policy("p", {"rules": [{"from": [{"source": {"ipBlocks": ["x"]}}]}]})
    engine, config = engine_of(bad)
    again = PolicyEngine.from_config(config, previous=engine)
    assert [str(e) for e in again.errors] == [str(e) for e in engine.errors]
    assert not decide(again, config, Conn()).allowed


def test_decision_not_linear_in_unrelated_policies() -> None:
    many = [policy(f"p{i}", {"selector": {"matchLabels": {"app": f"app-{i}"}}, "rules": [{}]}) for i in range(300)]
    engine, config = engine_of(*many)
    w = config.workload("foo", "server")
    assert w is not None
    assert engine.policies_for(w) == ()
    assert decide(engine, config, Conn()).allowed


def test_l7_header_host_fallback() -> None:
    engine, config = engine_of(policy("p", {"rules": [{"to": [{"operation": {"hosts": ["server.foo"]}}]}]}))
    w = config.workload("foo", "server")
    assert w is not None
    attrs = ConnectionAttributes(FOO_CLIENT, "10.244.1.12", w, "10.244.1.10", 8080)
    assert engine.check_l7(attrs, HttpRequestAttributes("GET", "/", "", {"Host": "server.foo"})).allowed


def test_ipv4_mapped_source_matches_v4_blocks() -> None:
    engine, config = engine_of(policy("p", {"rules": [{"from": [{"source": {"ipBlocks": ["10.244.1.0/24"]}}]}]}))
    assert decide(engine, config, Conn(source_ip="::ffff:10.244.1.12")).allowed


# ---- matchers ---------------------------------------------------------------------------------------------
def test_string_set_kinds() -> None:
    s = StringSet.compile(["exact", "pre*", "*suf", "*"])
    assert s.matches("exact") and s.matches("prefix") and s.matches("x-suf") and s.matches("anything")
    assert not s.matches("") and not s.matches(None)
    e = StringSet.compile(["a", "b*"])
    assert not e.matches("c") and e.matches("b") and not e.matches(None)
    assert StringSet.compile(["*"]).matches("x") and not StringSet.compile(["*"]).matches("")


def test_cidr_set() -> None:
    c = CidrSet.compile(["10.0.0.0/8", "192.168.1.1", "2001:db8::/32"])
    assert c.matches(parse_ip("10.1.2.3")) and c.matches(parse_ip("192.168.1.1"))
    assert not c.matches(parse_ip("192.168.1.2")) and c.matches(parse_ip("2001:db8::1"))
    assert not c.matches(parse_ip("2001:db9::1")) and not c.matches(None) and parse_ip("nope") is None
    assert parse_cidr("0.0.0.0/0") == (4, 0, 0)
    for bad in ("10.0.0.1/8", "256.0.0.0", "10.0.0.0/33", "01.2.3.4", "", "::1/200"):
        with pytest.raises(ValueError):
            parse_cidr(bad)


def test_parse_port() -> None:
    assert parse_port("8080") == 8080 and parse_port(443) == 443
    for bad in ("0", 65536, "x", True, None, "-1"):
        with pytest.raises(ValueError):
            parse_port(bad)


def test_workload_type_is_config_workload() -> None:
    _, config = engine_of()
    assert isinstance(config.workloads[0], Workload)


def test_request_authentications_for_workload() -> None:
    def ra(name: str, ns: str, selector: dict | None = None) -> str:
        spec: dict = {"jwtRules": [{"issuer": f"https://{name}"}]}
        if selector:
            spec["selector"] = {"matchLabels": selector}
        return policy(name, spec, kind="RequestAuthentication", namespace=ns)

    engine, config = engine_of(
        ra("mesh", "istio-system"), ra("ns", "foo"), ra("srv", "foo", {"app": "server"}), ra("b", "bar")
    )
    server, other = config.workload("foo", "server"), config.workload("foo", "other")
    assert server and other
    assert [r.name for r in engine.request_authentications_for(server)] == ["mesh", "ns", "srv"]
    assert [r.name for r in engine.request_authentications_for(other)] == ["mesh", "ns"]


def test_validated_jwt_fields_override_the_claims() -> None:
    """The JWT module hands over principal, audiences and presenter; without them they come from the claims."""
    when = [{"key": "request.auth.audiences", "values": ["api"]}, {"key": "request.auth.presenter", "values": ["web"]}]
    engine, config = engine_of(policy("p", {"rules": [{"when": when}]}))
    w = config.workload("foo", "server")
    assert w is not None
    attrs = ConnectionAttributes(FOO_CLIENT, "10.244.1.12", w, "10.244.1.10", 8080)
    claims = {"iss": "https://idp", "sub": "alice", "aud": ["other"], "azp": "web"}
    req = HttpRequestAttributes.with_jwt("GET", "/", "server.foo", claims)
    assert req.request_principal == "https://idp/alice"
    assert not engine.check_l7(attrs, req).allowed
    assert engine.check_l7(attrs, dataclasses.replace(req, request_audiences=("api",))).allowed
    other_presenter = dataclasses.replace(req, request_audiences=("api",), request_presenter="cli")
    assert not engine.check_l7(attrs, other_presenter).allowed
    with pytest.raises(dataclasses.FrozenInstanceError):
        req.path = "/x"  # type: ignore[misc]


def test_jwt_principal_needs_iss_and_sub_strings() -> None:
    from ztunnel.policy.decision import jwt_principal

    assert jwt_principal({"iss": "i", "sub": "s"}) == "i/s"
    assert jwt_principal({"iss": "i"}) is None and jwt_principal({"iss": "i", "sub": 5}) is None


def test_after_custom_deny_wins_over_allow_and_keeps_deny() -> None:
    custom = policy("ext", {"action": "CUSTOM", "provider": {"name": "opa"}, "rules": [{}]})
    deny = policy("d", {"action": "DENY", "rules": [{"to": [{"operation": {"methods": ["DELETE"]}}]}]})
    engine, config = engine_of(custom, policy("all", {"rules": [{}]}), deny)
    allowed = decide(engine, config, Conn(layer="l7"))
    assert allowed.allowed and allowed.custom_providers == ("opa",) and allowed.custom_policies == ("foo/ext",)
    d = allowed.after_custom(False)
    assert (d.allowed, d.policy, d.reason) == (False, "foo/ext", "denied by CUSTOM policy foo/ext (opa denied)")
    denied = decide(engine, config, Conn(layer="l7", method="DELETE"))
    assert denied.after_custom(True).policy == "foo/d" and not denied.after_custom(True).allowed


def test_l7_headers_lower_cased_once_and_only_when_read() -> None:
    from ztunnel.policy.evaluation import match_attributes

    _, config = engine_of()
    w = config.workload("foo", "server")
    assert w is not None
    attrs = ConnectionAttributes(FOO_CLIENT, "10.244.1.12", w, "10.244.1.10", 8080)
    lower = {"x-a": "1"}
    a = match_attributes(attrs, HttpRequestAttributes("GET", "/", "", lower))
    assert a.headers is lower  # already lower-case: no copy
    b = match_attributes(attrs, HttpRequestAttributes("GET", "/", "", {"X-A": "1"}))
    assert b.headers == {"x-a": "1"} and b.headers is b.headers


# ---- targetRefs: what a waypoint applies, as Istio ambient attaches policies ------------------------------------
WAYPOINT = """
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: waypoint, namespace: foo}
spec: {gatewayClassName: istio-waypoint, listeners: [{name: mesh, port: 15008, protocol: HBONE}]}
---
apiVersion: v1
kind: Service
metadata: {name: server-l7, namespace: foo, labels: {istio.io/use-waypoint: waypoint}}
spec: {clusterIP: 10.96.0.11, selector: {app: server}, ports: [{port: 80, targetPort: 8080}]}
"""
GATEWAY_REF = {"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": "waypoint"}


def ra(name: str, namespace: str = "foo", **spec: object) -> str:
    body = {**spec, "jwtRules": [{"issuer": f"https://{name}"}]}
    return policy(name, body, kind="RequestAuthentication", namespace=namespace)


def test_request_authentication_target_refs_attach_to_a_waypoint_or_a_service_not_the_namespace() -> None:
    engine, config = engine_of(
        WAYPOINT,
        ra("gw", targetRefs=[GATEWAY_REF]),
        ra("svc", targetRefs=[{"group": "", "kind": "Service", "name": "server"}]),
        ra("class", "istio-system", targetRefs=[{**GATEWAY_REF, "kind": "GatewayClass", "name": "istio-waypoint"}]),
        ra("class-not-root", targetRefs=[{**GATEWAY_REF, "kind": "GatewayClass", "name": "istio-waypoint"}]),
        ra("other-gw", targetRefs=[{**GATEWAY_REF, "name": "elsewhere"}]),
        ra("entry", targetRefs=[{"group": "networking.istio.io", "kind": "ServiceEntry", "name": "server"}]),
        ra("ns"),
    )
    assert engine.errors == []
    server, other = config.workload("foo", "server"), config.workload("foo", "other")
    assert server and other
    # server: behind server-l7, which uses the waypoint, and selected by Service server
    assert sorted(r.name for r in engine.request_authentications_for(server)) == ["class", "gw", "ns", "svc"]
    assert [r.name for r in engine.request_authentications_for(other)] == ["ns"]  # no waypoint, no targeted Service
    at_waypoint = PolicyEngine.from_config(config, waypoint="foo/waypoint")
    assert sorted(r.name for r in at_waypoint.request_authentications_for(server)) == ["class", "gw", "ns", "svc"]
    # the deciding waypoint is another one: what targets foo/waypoint is not its
    at_other = PolicyEngine.from_config(config, waypoint="foo/elsewhere")
    assert sorted(r.name for r in at_other.request_authentications_for(server)) == ["class", "ns", "other-gw", "svc"]


def test_request_authentication_target_refs_are_validated_as_an_authorization_policys() -> None:
    engine, _ = engine_of(
        ra("both", selector={"matchLabels": {"app": "server"}}, targetRefs=[GATEWAY_REF]),
        ra("nameless", targetRef={"kind": "Gateway"}),
    )
    text = "\n".join(str(e) for e in engine.errors)
    assert "RequestAuthentication foo/both" in text and "spec.selector" in text and "targetRef" in text, text
    assert "spec.targetRef.name: is required" in text, text
    assert engine.request_authentications == ()


def test_authorization_policy_target_refs_to_the_waypoint_apply_at_l7_only() -> None:
    deny_admin = {"action": "DENY", "rules": [{"to": [{"operation": {"paths": ["/admin"]}}]}]}
    engine, config = engine_of(WAYPOINT, policy("gw-deny", {**deny_admin, "targetRefs": [GATEWAY_REF]}))
    assert engine.errors == []
    denied = decide(engine, config, Conn(layer="l7", path="/admin"))
    assert (denied.allowed, denied.policy) == (False, "foo/gw-deny")
    assert decide(engine, config, Conn(layer="l7", path="/hello")).allowed
    assert decide(engine, config, Conn(layer="l7", path="/admin", dest="foo/other")).allowed  # not behind it
    assert decide(engine, config, Conn()).allowed  # the node proxy leaves it to the waypoint
    elsewhere = PolicyEngine.from_config(config, waypoint="foo/elsewhere")
    assert decide(elsewhere, config, Conn(layer="l7", path="/admin")).allowed
