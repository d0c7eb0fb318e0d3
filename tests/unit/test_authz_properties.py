"""Property tests: adding a DENY never widens access, rule and policy order never matter, the node proxy
(l4) never allows what a waypoint (l7) with the same policies would deny, and the waypoint's rule indexes (by
port and method) never change a decision."""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_policy_support import CLUSTER_YAML, Conn, decide

from ztunnel.config.loader import build_config, load_documents
from ztunnel.config.model import KubeObject, Source
from ztunnel.policy.decision import ConnectionAttributes
from ztunnel.policy.engine import PolicyEngine
from ztunnel.policy.evaluation import match_attributes, rule_matches
from ztunnel.policy.model import AuthorizationPolicy

BASE_OBJECTS = load_documents(CLUSTER_YAML, "cluster.yaml")
CONFIG = build_config(BASE_OBJECTS)

VALUES: dict[str, list[Any]] = {
    "principals": [
        "cluster.local/ns/foo/sa/client",
        "cluster.local/ns/bar/*",
        "*/sa/client",
        "*",
        "spiffe://cluster.local/ns/foo/sa/server",
    ],
    "namespaces": ["foo", "bar", "b*", "*o", "*"],
    "ipBlocks": ["10.244.1.0/24", "10.244.2.10", "10.0.0.0/8", "192.168.0.0/16"],
    "requestPrincipals": ["iss/alice", "iss/*", "*"],
    "ports": ["8080", "9090"],
    "methods": ["GET", "POST", "P*"],
    "paths": ["/a", "/a/*", "*/b", "*"],
    "hosts": ["server.foo", "*.foo"],
}
SOURCE_FIELDS = ["principals", "namespaces", "ipBlocks", "remoteIpBlocks", "requestPrincipals"]
OPERATION_FIELDS = ["ports", "methods", "paths", "hosts"]
WHEN = {
    "source.ip": VALUES["ipBlocks"],
    "source.namespace": VALUES["namespaces"],
    "source.principal": VALUES["principals"][:4],
    "destination.port": VALUES["ports"],
    "request.headers[x-user]": ["u1", "u2", "*"],
    "request.auth.claims[group]": ["admin"],
}


def _values(field: str) -> st.SearchStrategy[list[Any]]:
    base = field[3].lower() + field[4:] if field.startswith("not") else field
    pool = VALUES["ipBlocks"] if base == "remoteIpBlocks" else VALUES[base]
    return st.lists(st.sampled_from(pool), min_size=1, max_size=2, unique=True)


def _entry(fields: list[str]) -> st.SearchStrategy[dict[str, Any]]:
    names = fields + ["not" + f[0].upper() + f[1:] for f in fields]
    return st.lists(st.sampled_from(names), min_size=1, max_size=2, unique=True).flatmap(
        lambda chosen: st.fixed_dictionaries({n: _values(n) for n in chosen})
    )


condition = st.sampled_from(sorted(WHEN)).flatmap(
    lambda key: st.one_of(
        st.fixed_dictionaries(
            {"key": st.just(key), "values": st.lists(st.sampled_from(WHEN[key]), min_size=1, max_size=2, unique=True)}
        ),
        st.fixed_dictionaries(
            {
                "key": st.just(key),
                "notValues": st.lists(st.sampled_from(WHEN[key]), min_size=1, max_size=2, unique=True),
            }
        ),
    )
)

rule = st.fixed_dictionaries(
    {},
    optional={
        "from": st.lists(_entry(SOURCE_FIELDS).map(lambda e: {"source": e}), min_size=1, max_size=2),
        "to": st.lists(_entry(OPERATION_FIELDS).map(lambda e: {"operation": e}), min_size=1, max_size=2),
        "when": st.lists(condition, min_size=1, max_size=2),
    },
)


def policy_spec(action: str | None = None) -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries(
        {
            "action": st.just(action) if action else st.sampled_from(["ALLOW", "DENY"]),
            "rules": st.lists(rule, min_size=0, max_size=4),
        },
        optional={"selector": st.sampled_from([{"matchLabels": {"app": "server"}}, {"matchLabels": {"app": "other"}}])},
    )


policy = st.tuples(st.sampled_from(["foo", "bar", "istio-system"]), policy_spec())
policies = st.lists(policy, min_size=0, max_size=4)

connection = st.builds(
    Conn,
    source=st.sampled_from(
        [
            "spiffe://cluster.local/ns/foo/sa/client",
            "spiffe://cluster.local/ns/bar/sa/client",
            "spiffe://cluster.local/ns/foo/sa/server",
            None,
        ]
    ),
    source_ip=st.sampled_from(["10.244.1.12", "10.244.2.10", "192.168.3.4"]),
    dest=st.sampled_from(["foo/server", "foo/other", "bar/server"]),
    port=st.sampled_from([8080, 9090]),
    layer=st.sampled_from(["l4", "l7"]),
    method=st.sampled_from(["GET", "POST", "PUT", "get"]),
    path=st.sampled_from(["/a", "/a/b", "/c", "/c/../a?x"]),
    host=st.sampled_from(["server.foo", "x.foo", ""]),
    headers=st.sampled_from([{}, {"x-user": "u1"}, {"x-user": "u2"}]),
    request_principal=st.sampled_from([None, "iss/alice", "other/bob"]),
    claims=st.sampled_from([{}, {"group": "admin"}]),
)


def engine_for(specs: list[tuple[str, dict[str, Any]]]) -> PolicyEngine:
    objects = []
    for i, (ns, spec) in enumerate(specs):
        body = {
            "apiVersion": "security.istio.io/v1",
            "kind": "AuthorizationPolicy",
            "metadata": {"name": f"p{i}", "namespace": ns},
            "spec": spec,
        }
        objects.append(
            KubeObject(body["apiVersion"], "AuthorizationPolicy", f"p{i}", ns, {}, {}, body, Source("gen.yaml", i))
        )
    engine = PolicyEngine.from_objects(objects, config=CONFIG)
    assert engine.errors == [], engine.errors
    return engine


COMMON = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@COMMON
@given(
    policies,
    policy_spec("DENY"),
    st.sampled_from(["foo", "bar", "istio-system"]),
    st.lists(connection, min_size=1, max_size=8),
)
def test_adding_a_deny_never_allows_what_was_denied(base: list, extra: dict, ns: str, conns: list[Conn]) -> None:
    before = engine_for(base)
    after = engine_for([*base, (ns, extra)])
    for c in conns:
        if decide(after, CONFIG, c).allowed:
            assert decide(before, CONFIG, c).allowed, c


@COMMON
@given(policies, st.randoms(use_true_random=False), st.lists(connection, min_size=1, max_size=8))
def test_rule_and_policy_order_do_not_change_decisions(specs: list, rnd: Any, conns: list[Conn]) -> None:
    shuffled = []
    for ns, spec in specs:
        rules = list(spec["rules"])
        rnd.shuffle(rules)
        shuffled.append((ns, {**spec, "rules": rules}))
    # the same policies, listed in another order (so also under other names)
    order = list(range(len(specs)))
    rnd.shuffle(order)
    a = engine_for(specs)
    b = engine_for(shuffled)
    for c in conns:
        assert decide(a, CONFIG, c).allowed == decide(b, CONFIG, c).allowed, c
    reordered = [specs[i] for i in order]
    objects_b = engine_for(reordered)
    for c in conns:
        # policy names differ after reordering, so compare verdicts only
        assert decide(a, CONFIG, c).allowed == decide(objects_b, CONFIG, c).allowed, c


@COMMON
@given(policies, st.lists(connection, min_size=1, max_size=8))
def test_node_proxy_never_allows_what_the_waypoint_denies(specs: list, conns: list[Conn]) -> None:
    engine = engine_for(specs)
    for c in conns:
        l4 = decide(engine, CONFIG, Conn(**{**c.__dict__, "layer": "l4"}))
        l7 = decide(engine, CONFIG, Conn(**{**c.__dict__, "layer": "l7"}))
        if l4.allowed:
            assert l7.allowed, (c, l4, l7)


def _reference_l7(engine: PolicyEngine, c: Conn) -> bool:
    """DENY -> ALLOW over every rule of every selecting policy, no index: what check_l7 must agree with."""
    ns, name = c.dest.split("/")
    w = CONFIG.workload(ns, name)
    assert w is not None
    a = match_attributes(ConnectionAttributes(c.source, c.source_ip, w, w.ips[0], c.port), c.request())
    selected = [p for p in engine.policies_for(w, "l7") if isinstance(p, AuthorizationPolicy)]

    def hit(p: AuthorizationPolicy) -> bool:
        return any(rule_matches(r, a) for r in p.rules)

    if any(hit(p) for p in selected if p.action == "DENY"):
        return False
    allows = [p for p in selected if p.action == "ALLOW"]
    return not allows or any(hit(p) for p in allows)


@COMMON
@given(policies, st.lists(connection, min_size=1, max_size=8))
def test_waypoint_indexes_never_change_a_decision(specs: list, conns: list[Conn]) -> None:
    engine = engine_for(specs)
    for c in conns:
        c7 = Conn(**{**c.__dict__, "layer": "l7"})
        d = decide(engine, CONFIG, c7)
        assert d.allowed == _reference_l7(engine, c7), (c7, d)
