"""Invalid security objects are rejected whole, named by file/object/field, and never widen access."""

from __future__ import annotations

import pytest
from test_policy_support import BAR_CLIENT, Conn, decide, engine_of, policy

from ztunnel.config.loader import load_documents
from ztunnel.policy.authz import parse_authorization_policy
from ztunnel.policy.model import PolicyError
from ztunnel.policy.peerauth import parse_request_authentication

INVALID = [
    # (id, spec, field named in the message, words in the message)
    (
        "empty-value",
        {"rules": [{"from": [{"source": {"namespaces": ["foo", ""]}}]}]},
        "namespaces[1]",
        "empty value not allowed",
    ),
    (
        "empty-when-value",
        {"rules": [{"when": [{"key": "request.headers[x]", "notValues": [""]}]}]},
        "notValues[0]",
        "empty value",
    ),
    (
        "path-template-double-star-not-last",
        {"rules": [{"to": [{"operation": {"paths": ["/a/{**}/b/{*}"]}}]}]},
        "paths[0]",
        "last operator",
    ),
    (
        "path-template-bad-operator",
        {"rules": [{"to": [{"operation": {"paths": ["/a/{id}/{*}"]}}]}]},
        "paths[0]",
        "only use",
    ),
    ("unknown-action", {"action": "PERMIT"}, "spec.action", "unknown action 'PERMIT'"),
    ("action-wrong-type", {"action": 1}, "spec.action", "unknown action"),
    (
        "bad-cidr",
        {"rules": [{"from": [{"source": {"ipBlocks": ["10.0.0.300/8"]}}]}]},
        "spec.rules[0].from[0].source.ipBlocks[0]",
        "not an IP address or CIDR",
    ),
    (
        "cidr-host-bits",
        {"rules": [{"from": [{"source": {"ipBlocks": ["10.0.0.1/8"]}}]}]},
        "ipBlocks[0]",
        "host bits set",
    ),
    (
        "bad-not-cidr",
        {"rules": [{"from": [{"source": {"notIpBlocks": ["nope"]}}]}]},
        "notIpBlocks[0]",
        "not an IP address",
    ),
    (
        "bad-remote-cidr",
        {"rules": [{"from": [{"source": {"remoteIpBlocks": ["1.2.3"]}}]}]},
        "remoteIpBlocks[0]",
        "CIDR",
    ),
    (
        "bad-port-text",
        {"rules": [{"to": [{"operation": {"ports": ["http"]}}]}]},
        "spec.rules[0].to[0].operation.ports[0]",
        "not a port number",
    ),
    ("bad-port-range", {"rules": [{"to": [{"operation": {"ports": ["70000"]}}]}]}, "ports[0]", "1 to 65535"),
    ("bad-port-zero", {"rules": [{"to": [{"operation": {"notPorts": [0]}}]}]}, "notPorts[0]", "1 to 65535"),
    ("port-wrong-type", {"rules": [{"to": [{"operation": {"ports": [[80]]}}]}]}, "ports[0]", "must be a port number"),
    (
        "principals-not-list",
        {"rules": [{"from": [{"source": {"principals": "cluster.local/ns/a/sa/b"}}]}]},
        "principals",
        "must be a list of strings",
    ),
    (
        "principal-not-string",
        {"rules": [{"from": [{"source": {"principals": [42]}}]}]},
        "principals[0]",
        "must be a string",
    ),
    ("rules-not-list", {"rules": {"from": []}}, "spec.rules", "must be a list"),
    ("rule-not-mapping", {"rules": ["allow"]}, "spec.rules[0]", "must be a mapping"),
    (
        "unknown-source-field",
        {"rules": [{"from": [{"source": {"principal": ["x"]}}]}]},
        "source.principal",
        "unknown field",
    ),
    (
        "unknown-operation-field",
        {"rules": [{"to": [{"operation": {"method": ["GET"]}}]}]},
        "operation.method",
        "unknown field",
    ),
    ("unknown-rule-field", {"rules": [{"form": []}]}, "spec.rules[0].form", "unknown field"),
    ("unknown-spec-field", {"rulez": []}, "spec.rulez", "unknown field"),
    ("empty-source", {"rules": [{"from": [{"source": {}}]}]}, "from[0].source", "must not be empty"),
    ("missing-source", {"rules": [{"from": [{}]}]}, "from[0].source", "is required"),
    (
        "unknown-when-key",
        {"rules": [{"when": [{"key": "source.color", "values": ["red"]}]}]},
        "spec.rules[0].when[0].key",
        "unknown key 'source.color'",
    ),
    ("when-without-values", {"rules": [{"when": [{"key": "source.ip"}]}]}, "when[0]", "needs values or notValues"),
    ("when-bad-ip", {"rules": [{"when": [{"key": "source.ip", "values": ["x"]}]}]}, "when[0].values[0]", "not an IP"),
    (
        "when-bad-port",
        {"rules": [{"when": [{"key": "destination.port", "values": ["x"]}]}]},
        "when[0].values[0]",
        "port",
    ),
    ("when-missing-key", {"rules": [{"when": [{"values": ["a"]}]}]}, "when[0].key", "is required"),
    (
        "when-l7-key-typo",
        {"rules": [{"when": [{"key": "request.auth.claim[group]", "values": ["a"]}]}]},
        "spec.rules[0].when[0].key",
        "unknown key 'request.auth.claim[group]'",
    ),
    (
        "when-header-without-name",
        {"rules": [{"when": [{"key": "request.headers[ ]", "values": ["a"]}]}]},
        "spec.rules[0].when[0].key",
        "unknown key",
    ),
    (
        "when-claims-without-name",
        {"rules": [{"when": [{"key": "request.auth.claims[]", "values": ["a"]}]}]},
        "spec.rules[0].when[0].key",
        "unknown key",
    ),
    (
        "when-remote-ip-bad",
        {"rules": [{"when": [{"key": "remote.ip", "values": ["10.0.0.1/8"]}]}]},
        "when[0].values[0]",
        "host bits set",
    ),
    (
        "remoteIpBlocks-bad",
        {"rules": [{"from": [{"source": {"remoteIpBlocks": ["nope"]}}]}]},
        "from[0].source.remoteIpBlocks[0]",
        "not an IP",
    ),
    ("methods-not-list", {"rules": [{"to": [{"operation": {"methods": "GET"}}]}]}, "operation.methods", "list"),
    ("custom-without-provider", {"action": "CUSTOM", "rules": [{}]}, "spec.provider", "required for action CUSTOM"),
    (
        "provider-without-custom",
        {"action": "ALLOW", "provider": {"name": "x"}},
        "spec.provider",
        "only allowed with action CUSTOM",
    ),
    (
        "selector-and-targetref",
        {"selector": {"matchLabels": {"a": "b"}}, "targetRefs": [{"kind": "Service", "name": "s"}]},
        "spec.selector",
        "cannot be used together",
    ),
    (
        "selector-bad-label",
        {"selector": {"matchLabels": {"bad key!": "x"}}},
        "spec.selector.matchLabels",
        "not a valid label key",
    ),
    ("selector-not-mapping", {"selector": ["app"]}, "spec.selector", "must be a mapping"),
]


def _obj(spec: object, **meta: object):  # type: ignore[no-untyped-def]
    return load_documents(policy("bad", spec, **meta), "bad.yaml")[0]


@pytest.mark.parametrize(("spec", "field", "words"), [c[1:] for c in INVALID], ids=[c[0] for c in INVALID])
def test_invalid_policy_names_file_object_and_field(spec: object, field: str, words: str) -> None:
    with pytest.raises(PolicyError) as info:
        parse_authorization_policy(_obj(spec))
    msg = str(info.value)
    assert msg.startswith("bad.yaml (document 1): AuthorizationPolicy foo/bad: field ")
    assert field in info.value.field, msg
    assert words in msg
    assert "\n" not in msg


def test_bad_dry_run_annotation_is_rejected() -> None:
    with pytest.raises(PolicyError, match=r"istio\.io/dry-run"):
        parse_authorization_policy(_obj({}, annotations={"istio.io/dry-run": "yes"}))


def test_unsupported_api_version_is_rejected() -> None:
    text = policy("bad", {}).replace("security.istio.io/v1", "security.istio.io/v2")
    with pytest.raises(PolicyError, match="apiVersion"):
        parse_authorization_policy(load_documents(text, "x.yaml")[0])


def test_v1beta1_is_accepted() -> None:
    text = policy("ok", {"rules": [{}]}).replace("security.istio.io/v1", "security.istio.io/v1beta1")
    assert parse_authorization_policy(load_documents(text, "x.yaml")[0]).rules


def test_experimental_and_claim_keys_are_known() -> None:
    p = parse_authorization_policy(
        _obj(
            {
                "rules": [
                    {
                        "when": [
                            {"key": "request.auth.claims[iss]", "values": ["a"]},
                            {"key": "request.auth.claims[nested][key]", "values": ["b"]},
                            {"key": "experimental.envoy.filters.network.mysql_proxy[db.table]", "values": ["[update]"]},
                            {"key": "request.auth.audiences", "values": ["x"]},
                            {"key": "request.auth.presenter", "values": ["x"]},
                            {"key": "connection.sni", "values": ["x"]},
                        ]
                    }
                ]
            }
        )
    )
    assert p.rules[0].l7_fields


# ---- fail closed ----------------------------------------------------------------------------------------
def test_rejected_allow_policy_makes_selected_workload_deny() -> None:
    bad = policy(
        "bad", {"selector": {"matchLabels": {"app": "server"}}, "rules": [{"from": [{"source": {"ipBlocks": ["x"]}}]}]}
    )
    engine, config = engine_of(bad)
    assert len(engine.errors) == 1
    assert "AuthorizationPolicy foo/bad" in str(engine.errors[0]) and "ipBlocks[0]" in str(engine.errors[0])
    d = decide(engine, config, Conn())
    assert not d.allowed and d.policy == "foo/bad"
    assert "invalid" in d.reason and "until it is fixed" in d.reason
    # workloads it did not select are unaffected
    assert decide(engine, config, Conn(dest="foo/other")).allowed


def test_rejected_l7_allow_policy_makes_the_waypoint_deny() -> None:
    """An unknown `when` key in an ALLOW rejects the whole policy; at the waypoint its workloads deny (never widen)."""
    bad = policy(
        "bad",
        {
            "selector": {"matchLabels": {"app": "server"}},
            "rules": [
                {"to": [{"operation": {"methods": ["GET"]}}], "when": [{"key": "request.user", "values": ["a"]}]}
            ],
        },
    )
    engine, config = engine_of(bad, policy("all", {"rules": [{}]}))
    assert len(engine.errors) == 1 and "spec.rules[0].when[0].key" in str(engine.errors[0])
    for layer in ("l4", "l7"):
        d = decide(engine, config, Conn(layer=layer))
        assert not d.allowed and d.policy == "foo/bad" and "invalid" in d.reason, layer


def test_rejected_allow_policy_denies_even_when_another_allow_matches() -> None:
    bad = policy("bad", {"rules": [{"to": [{"operation": {"ports": ["eighty"]}}]}]})
    good = policy("good", {"rules": [{}]})
    engine, config = engine_of(bad, good)
    assert not decide(engine, config, Conn()).allowed


def test_rejected_policy_with_unreadable_selector_covers_whole_namespace() -> None:
    bad = policy("bad", {"selector": {"matchLabels": "app=server"}, "rules": [{}]})
    engine, config = engine_of(bad)
    assert engine.errors
    assert not decide(engine, config, Conn(dest="foo/other")).allowed
    assert decide(engine, config, Conn(dest="bar/server")).allowed


def test_rejected_unknown_action_fails_closed() -> None:
    engine, config = engine_of(policy("bad", {"action": "ALLOWW", "rules": [{}]}))
    assert not decide(engine, config, Conn()).allowed


def test_rejected_dry_run_policy_does_not_deny() -> None:
    bad = policy("bad", {"action": "DENY", "rules": [{"foo": 1}]}, annotations={"istio.io/dry-run": "true"})
    engine, config = engine_of(bad)
    assert engine.errors
    assert decide(engine, config, Conn()).allowed


def test_fixing_the_policy_restores_access() -> None:
    bad = policy("p", {"rules": [{"from": [{"source": {"namespaces": "foo"}}]}]})
    good = policy("p", {"rules": [{"from": [{"source": {"namespaces": ["foo"]}}]}]})
    engine, config = engine_of(bad)
    assert not decide(engine, config, Conn()).allowed
    engine, config = engine_of(good)
    assert decide(engine, config, Conn()).allowed
    assert not decide(engine, config, Conn(source=BAR_CLIENT)).allowed


def test_invalid_peer_authentication_is_strict_for_its_scope() -> None:
    bad = policy("default", {"mtls": {"mode": "STRIC"}}, kind="PeerAuthentication")
    engine, config = engine_of(bad)
    assert "unknown mode 'STRIC'" in str(engine.errors[0])
    d = decide(engine, config, Conn(source=None))
    assert not d.allowed and "invalid" in d.reason
    assert decide(engine, config, Conn(source=None, dest="bar/server")).allowed


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        ({"mtls": {"mode": "STRICT"}, "portLevelMtls": {8080: {"mode": "DISABLE"}}}, "only allowed with a selector"),
        ({"selector": {"matchLabels": {"app": "server"}}, "portLevelMtls": {"http": {"mode": "STRICT"}}}, "not a port"),
        ({"selector": {"matchLabels": {"app": "server"}}, "portLevelMtls": {8080: {"mode": "ON"}}}, "unknown mode"),
        ({"mtls": "STRICT"}, "must be a mapping"),
    ],
)
def test_invalid_peer_authentication_messages(spec: object, words: str) -> None:
    engine, _ = engine_of(policy("pa", spec, kind="PeerAuthentication"))
    assert len(engine.errors) == 1
    assert words in str(engine.errors[0])
    assert "PeerAuthentication foo/pa" in str(engine.errors[0])


def test_request_authentication_parsed_and_validated() -> None:
    ok = policy(
        "jwt",
        {
            "selector": {"matchLabels": {"app": "server"}},
            "jwtRules": [
                {
                    "issuer": "https://issuer.example",
                    "jwksUri": "https://issuer.example/jwks",
                    "audiences": ["a"],
                    "fromHeaders": [{"name": "x-jwt", "prefix": "Bearer "}],
                    "forwardOriginalToken": True,
                }
            ],
        },
        kind="RequestAuthentication",
    )
    ra = parse_request_authentication(load_documents(ok, "ra.yaml")[0])
    assert ra.jwt_rules[0].issuer == "https://issuer.example"
    assert ra.jwt_rules[0].from_headers == (("x-jwt", "Bearer "),)
    engine, _ = engine_of(ok)
    assert engine.errors == [] and engine.request_authentications[0].key == "foo/jwt"

    bad = policy("jwt", {"jwtRules": [{"jwksUri": "ftp://x"}]}, kind="RequestAuthentication")
    engine, _ = engine_of(bad)
    assert "jwtRules[0].issuer" in str(engine.errors[0])
